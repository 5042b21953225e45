"""Toy faces: procedural face-like images with an exact part segmentation.

The embedded default generator (`generators.load("toyfaces")`) is a small
StyleGAN2 trained on these images (`experiments/train_toy_gan.py`), with one
extra output channel per part, so every generated sample carries its own
ground-truth label map and the parts PandA finds can be scored.

A face is drawn with the painter's algorithm in a head frame that is
translated, scaled, rotated and turned a little per sample (`Layout`: by
default little enough that one fixed region covers most samples' eyes and
mouth, so global parts fit, while refinement still has something to fix): a
textured background (a gradient or stripes from a random colour part of the
way towards another), hair (long or short, with a fringe), skin, a nose, two
eyes (open: sclera and a random iris colour; closed: an eyelid) and a mouth
(closed, smiling or open). Every colour and every shape choice is drawn
independently. Images are rendered at `supersample` times the resolution and
box-filtered, so edges are anti-aliased; `soft` is the
area fraction of each part in each pixel and `labels` its argmax.

    batch = toyfaces.sample(0, 16)  # seed 0 (or a np.random.Generator)
    batch.images  # [16, 32, 32, 3] in [-1, 1]
    batch.labels  # [16, 32, 32] int32 indices into PARTS
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

PARTS = ("background", "hair", "skin", "nose", "eyes", "mouth")
"""Part names in label order (`labels == PARTS.index(name)`)."""

RGB_CHANNELS = 3
MOUTH_SHAPES = ("closed", "smile", "open")


class FaceParams(NamedTuple):
  """Per-sample layout and appearance, `n` samples; colours RGB in [0, 1]."""

  center: np.ndarray  # [n, 2] head centre (x, y), image width = 1.
  scale: np.ndarray  # [n]
  angle: np.ndarray  # [n] radians, in-plane rotation.
  turn: np.ndarray  # [n] in [-1, 1], head turn (features shift sideways).
  hair_length: np.ndarray  # [n] lowest hair row in the head frame.
  fringe: np.ndarray  # [n] fringe line in the head frame.
  eyes_open: np.ndarray  # [n] bool.
  gaze: np.ndarray  # [n, 2] iris offset.
  mouth: np.ndarray  # [n] int index into MOUTH_SHAPES.
  background: np.ndarray  # [n, 2, 3] the two background colours.
  stripes: np.ndarray  # [n] bool: stripes, else a linear gradient.
  direction: np.ndarray  # [n] radians, texture direction.
  frequency: np.ndarray  # [n] stripes per image width.
  phase: np.ndarray  # [n] radians.
  hair: np.ndarray  # [n, 3]
  skin: np.ndarray  # [n, 3]
  nose: np.ndarray  # [n, 3]
  sclera: np.ndarray  # [n, 3]
  iris: np.ndarray  # [n, 3]
  eyelid: np.ndarray  # [n, 3]
  lips: np.ndarray  # [n, 3]


class Layout(NamedTuple):
  """How much the head frame varies per sample (uniform draws within these bounds)."""

  shift: tuple[float, float] = (
    0.02,
    0.02,
  )  # Max |offset| of the head centre (x, y), image width 1.
  scale: tuple[float, float] = (1.33, 1.43)  # Range of the head scale.
  angle: float = 5.0  # Max |in-plane rotation|, degrees.
  turn: float = 0.5  # Max |head turn| in [0, 1].


LAYOUT = Layout()
"""The layout variation of the shipped generator's training data."""


class Batch(NamedTuple):
  images: np.ndarray  # [n, h, w, 3] float32 in [-1, 1].
  labels: np.ndarray  # [n, h, w] int32, index into PARTS.
  soft: np.ndarray  # [n, h, w, P] float32, area fraction of each part (sums to 1).


def sample_params(rng: int | np.random.Generator, n: int, layout: Layout = LAYOUT) -> FaceParams:
  """Draws `n` independent faces' layouts and appearances (`rng`: a seed or a Generator)."""
  if not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"n must be a positive int, got {n!r}")
  layout = Layout(*layout)
  if (
    min(layout.shift) < 0
    or not 0 < layout.scale[0] <= layout.scale[1]
    or layout.angle < 0
    or not 0 <= layout.turn <= 1
  ):
    raise ValueError(
      f"layout needs shifts >= 0, 0 < scale[0] <= scale[1], angle >= 0 and "
      f"turn in [0, 1], got {layout}"
    )
  rng = np.random.default_rng(rng)
  u = lambda lo, hi, *shape: rng.uniform(lo, hi, (n,) + shape)
  skin_tone = u(0, 1)[:, None]
  skin = (
    (1 - skin_tone) * np.array([0.96, 0.80, 0.68])
    + skin_tone * np.array([0.42, 0.27, 0.18])
    + u(-0.05, 0.05, 3)
  )
  # The texture's second colour lies part of the way towards another random
  # colour: the background stays one region with a texture, not two regions.
  background = u(0, 1, 2, 3)
  background[:, 1] = background[:, 0] + u(0.25, 0.5)[:, None] * (
    background[:, 1] - background[:, 0]
  )
  return FaceParams(
    center=np.stack(
      [0.5 + u(-layout.shift[0], layout.shift[0]), 0.56 + u(-layout.shift[1], layout.shift[1])],
      axis=1,
    ),
    scale=u(*layout.scale),
    angle=np.deg2rad(u(-layout.angle, layout.angle)),
    turn=u(-layout.turn, layout.turn),
    hair_length=u(-0.05, 0.25),
    fringe=u(-0.22, -0.13),
    eyes_open=rng.uniform(size=n) < 0.75,
    gaze=u(-0.015, 0.015, 2),
    mouth=rng.integers(0, len(MOUTH_SHAPES), n),
    background=background,
    stripes=rng.uniform(size=n) < 0.5,
    direction=u(0, np.pi),
    frequency=u(2.5, 5.0),
    phase=u(0, 2 * np.pi),
    hair=u(0, 1, 3),
    skin=np.clip(skin, 0, 1),
    nose=np.clip(skin * u(0.6, 0.8)[:, None], 0, 1),
    sclera=u(0.85, 1.0)[:, None] * np.ones(3),
    iris=u(0, 1, 3),
    eyelid=np.clip(skin * u(0.35, 0.6)[:, None], 0, 1),
    lips=np.stack([u(0.5, 0.95), u(0.05, 0.35), u(0.1, 0.4)], axis=1),
  )


def _ellipse(u, v, cu, cv, a, b):
  """Inside the axis-aligned ellipse; all `[n, 1, 1]` or `[n, h, w]` broadcastable."""
  return ((u - cu) / a) ** 2 + ((v - cv) / b) ** 2 < 1


def _col(c):
  return np.asarray(c, np.float32)[:, None, None, :]  # [n, 3] -> [n, 1, 1, 3]


def render(params: FaceParams, resolution: int = 32, supersample: int = 2) -> Batch:
  """Draws the faces of `params` (pure): images `[n, r, r, 3]`, labels, soft labels."""
  if not isinstance(resolution, (int, np.integer)) or resolution < 8:
    raise ValueError(f"resolution must be an int >= 8, got {resolution!r}")
  if not isinstance(supersample, (int, np.integer)) or supersample < 1:
    raise ValueError(f"supersample must be a positive int, got {supersample!r}")
  p = params
  n, hi = p.scale.shape[0], resolution * supersample
  col = lambda a: np.asarray(a, np.float32).reshape(n, 1, 1)
  grid = ((np.arange(hi) + 0.5) / hi).astype(np.float32)
  x, y = grid[None, None, :], grid[None, :, None]  # [1, 1, hi], [1, hi, 1]
  # Head frame: undo translation, rotation and scale.
  dx, dy = x - col(p.center[:, 0]), y - col(p.center[:, 1])
  cos, sin, s = col(np.cos(p.angle)), col(np.sin(p.angle)), col(p.scale)
  u, v = (cos * dx + sin * dy) / s, (-sin * dx + cos * dy) / s  # [n, hi, hi]
  t = col(p.turn)

  # Background texture.
  proj = col(np.cos(p.direction)) * x + col(np.sin(p.direction)) * y
  ramp = np.where(
    col(p.stripes),
    0.5 + 0.5 * np.sin(2 * np.pi * col(p.frequency) * proj + col(p.phase)),
    np.clip(proj / np.sqrt(2), 0, 1),
  )
  # Painter's algorithm on indices: `layer` is the last paint op covering each
  # pixel (0: background); colours are gathered once at the end.
  layer = np.zeros((n, hi, hi), np.int8)
  ops = [(0, np.zeros((n, 3), np.float32))]  # (part, colour [n, 3]) per paint op.

  def paint(mask, part, colour):
    ops.append((PARTS.index(part), np.asarray(colour, np.float32)))
    np.putmask(layer, mask, len(ops) - 1)

  face = _ellipse(u, v, 0, 0, 0.25, 0.30)
  fringe = face & (v < col(p.fringe) + 0.03 * np.sin(12 * u))  # Wavy hairline.
  paint((_ellipse(u, v, 0, -0.05, 0.31, 0.34) & (v < col(p.hair_length))) | fringe, "hair", p.hair)
  paint(face & ~fringe, "skin", p.skin)
  paint(_ellipse(u, v, 0.06 * t, 0.065, 0.035, 0.045), "nose", p.nose)
  for side in (-1, 1):
    cu, cv = side * 0.11 + 0.05 * t, -0.03
    a = 0.08 * (1 + 0.2 * side * t)
    eye_open = _ellipse(u, v, cu, cv, a, 0.065) & col(p.eyes_open).astype(bool)
    eye_shut = _ellipse(u, v, cu, cv + 0.01, a, 0.03) & ~col(p.eyes_open).astype(bool)
    iris = eye_open & _ellipse(u, v, cu + col(p.gaze[:, 0]), cv + col(p.gaze[:, 1]), 0.045, 0.045)
    paint(eye_open, "eyes", p.sclera)
    paint(iris, "eyes", p.iris)
    paint(eye_shut, "eyes", p.eyelid)
  mu, mv, shape = 0.04 * t, 0.19, col(p.mouth)
  closed = _ellipse(u, v, mu, mv, 0.12, 0.045) & (shape == 0)
  smile = _ellipse(u, v, mu, mv - 0.02, 0.13, 0.09) & (v > mv - 0.02) & (shape == 1)
  opened = _ellipse(u, v, mu, mv, 0.095, 0.07) & (shape == 2)
  paint(closed | smile, "mouth", p.lips)
  paint(opened, "mouth", p.lips * 0.35)

  colours = np.stack([c for _, c in ops], axis=1)  # [n, ops, 3]
  painted = np.take_along_axis(colours, layer.reshape(n, -1, 1).astype(np.intp), axis=1)
  background = (
    _col(p.background[:, 0]) * (1 - ramp[..., None]) + _col(p.background[:, 1]) * ramp[..., None]
  )  # [n, hi, hi, 3]
  image = np.where((layer == 0)[..., None], background, painted.reshape(n, hi, hi, 3))
  labels = np.array([part for part, _ in ops], np.int32)[layer]  # [n, hi, hi]

  # Box filter down to the output resolution.
  k, r = supersample, resolution
  image = image.reshape(n, r, k, r, k, 3).mean(axis=(2, 4))
  onehot = (labels[..., None] == np.arange(len(PARTS))).astype(np.float32)
  soft = onehot.reshape(n, r, k, r, k, len(PARTS)).mean(axis=(2, 4))
  return Batch(
    images=(2 * image - 1).astype(np.float32),
    labels=np.argmax(soft, axis=-1).astype(np.int32),
    soft=soft.astype(np.float32),
  )


def sample(
  rng: int | np.random.Generator,
  n: int,
  resolution: int = 32,
  supersample: int = 2,
  layout: Layout = LAYOUT,
) -> Batch:
  """`n` random faces: `render(sample_params(rng, n, layout), resolution, supersample)`."""
  return render(sample_params(rng, n, layout), resolution, supersample)


def to_channels(batch: Batch) -> np.ndarray:
  """The generator's training images `[n, h, w, 3 + P]`: RGB, then soft labels in [-1, 1]."""
  return np.concatenate([batch.images, 2 * batch.soft - 1], axis=-1)


def split_channels(images):
  """Splits generator output `[n, h, w, 3 + P]` into `(rgb [n, h, w, 3], probs [n, h, w, P])`.

  `rgb` is in about [-1, 1]; `probs` maps the label channels from [-1, 1] back
  to [0, 1] and normalises them to sum to one per pixel. `argmax(probs, -1)`
  is the label map (indices into `PARTS`).
  """
  if images.ndim != 4 or images.shape[-1] != RGB_CHANNELS + len(PARTS):
    raise ValueError(
      f"images must be [n, h, w, {RGB_CHANNELS + len(PARTS)}] "
      f"(RGB + one channel per part), got {tuple(images.shape)}"
    )
  rgb, logits = images[..., :RGB_CHANNELS], images[..., RGB_CHANNELS:]
  probs = (logits + 1) / 2
  probs = probs.clip(0, None) + 1e-6
  return rgb, probs / probs.sum(axis=-1, keepdims=True)


def colour_consistency(rgb, labels, min_pixels: int = 4) -> float:
  """Mean within-part colour variance over the variance of part mean colours.

  For each image (`rgb [n, h, w, 3]`, `labels [n, h, w]`) and each part with at
  least `min_pixels` pixels: the within-part variance (mean squared distance of
  its pixels to the part's mean colour) and, across those parts, the variance
  of their mean colours. Returns the ratio of the averages over images: small
  when the label map follows the colours (each part one colour, parts distinct).
  """
  rgb, labels = np.asarray(rgb, np.float64), np.asarray(labels)
  within, between = [], []
  for img, lab in zip(rgb, labels):
    means, var = [], []
    for k in range(len(PARTS)):
      px = img[lab == k]
      if len(px) >= min_pixels:
        means.append(px.mean(axis=0))
        var.append(np.square(px - means[-1]).sum(axis=1).mean())
    if len(means) >= 2:
      means = np.stack(means)
      within.append(np.mean(var))
      between.append(np.square(means - means.mean(axis=0)).sum(axis=1).mean())
  if not within:
    raise ValueError("no image has two parts with enough pixels")
  return float(np.mean(within) / np.mean(between))


def part_areas(labels) -> np.ndarray:
  """Fraction of each image's pixels per part: `labels [n, h, w]` -> `[n, P]`."""
  labels = np.asarray(labels)
  return np.stack([(labels == k).mean(axis=(1, 2)) for k in range(len(PARTS))], axis=1)


PALETTE = np.array(
  [
    [0.35, 0.35, 0.35],
    [0.55, 0.27, 0.07],
    [1.0, 0.8, 0.6],
    [0.9, 0.3, 0.9],
    [0.1, 0.6, 1.0],
    [0.9, 0.1, 0.1],
  ],
  np.float32,
)
"""A fixed RGB colour in [0, 1] per part, in `PARTS` order."""


def colourise(labels) -> np.ndarray:
  """Label map `[n, h, w]` -> RGB `[n, h, w, 3]` in [0, 1] (`PALETTE`)."""
  return PALETTE[np.asarray(labels)]


class Samples(NamedTuple):
  """Generated images split into what is shown and the ground truth they carry."""

  rgb: np.ndarray  # [n, H, W, 3] (or 1 channel), raw range
  labels: np.ndarray | None  # [n, H, W] int32 ground-truth labels, or None
  label_names: tuple  # one name per label (empty without labels)


def split_labels(images) -> Samples:
  """Splits any generator's images `[n, H, W, ch]` into RGB and ground-truth labels.

  The embedded toy-faces generator emits RGB followed by one soft label channel
  per part of `PARTS` (`to_channels`); the label map is their argmax. Images
  with 1 or 3 channels have no labels.
  """
  images = np.asarray(images, np.float32)
  if images.shape[-1] in (1, 3):
    return Samples(images, None, ())
  rgb, probs = split_channels(images)
  return Samples(np.asarray(rgb), np.argmax(probs, axis=-1).astype(np.int32), PARTS)
