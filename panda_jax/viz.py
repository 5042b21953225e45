"""Figures of the factors and of their uses, written as PNG files.

Matplotlib's object API with the Agg canvas: no pyplot, no global backend
switch, nothing shown. Images are `[H, W, ch]` in the generator's raw range
(about [-1, 1]); parts `[s, r_s]` and saliency maps `[n, s, r_c]` are drawn on
the feature grid `(h, w)` (square by default). Every function returns the path
it wrote.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib import colors as mcolors
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from panda_jax import parts_eval

_PANEL = 1.6  # inches per panel
_DPI = 80


def _grid(s: int, grid):
  if grid is not None:
    h, w = grid
    if h * w != s:
      raise ValueError(f"grid {tuple(grid)} does not hold s={s} positions")
    return h, w
  g = math.isqrt(s)
  if g * g != s:
    raise ValueError(f"s={s} is not a square: pass grid=(h, w)")
  return g, g


def _image(x):
  """Raw generator output `[H, W, ch]` -> displayable `[H, W]` or `[H, W, 3]`."""
  x = np.asarray(x, np.float32)
  if x.ndim != 3 or x.shape[-1] not in (1, 3):
    raise ValueError(f"images must be [H, W, 1 or 3], got shape {x.shape}")
  x = np.clip((x + 1) / 2, 0, 1)
  return x[..., 0] if x.shape[-1] == 1 else x


def _figure(rows: int, cols: int):
  fig = Figure(figsize=(_PANEL * cols, _PANEL * rows), dpi=_DPI)
  FigureCanvasAgg(fig)
  axes = np.asarray(fig.subplots(rows, cols, squeeze=False))
  for ax in axes.ravel():
    ax.set_axis_off()
  return fig, axes


def _save(fig, path):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, format="png")
  return path


def _show(ax, image, title=None, **kwargs):
  kwargs.setdefault("cmap", "gray" if image.ndim == 2 else None)
  ax.imshow(image, interpolation="nearest", **kwargs)
  if title is not None:
    ax.set_title(title, fontsize=8)


def _upsample(field, size):
  """Nearest upsampling of `[h, w, ...]` to `size=(H, W)` (block replication)."""
  h, w = field.shape[:2]
  rows = (np.arange(size[0]) * h) // size[0]
  cols = (np.arange(size[1]) * w) // size[1]
  return field[rows][:, cols]


def plot_parts(parts, path, *, grid=None, ncols: int = 8):
  """The parts `[s, r_s]` as a grid of heat maps, each scaled to its maximum."""
  parts = np.asarray(parts, np.float32)
  if parts.ndim != 2:
    raise ValueError(f"parts must be [s, r_s], got shape {parts.shape}")
  s, r_s = parts.shape
  h, w = _grid(s, grid)
  cols = min(ncols, r_s)
  fig, axes = _figure(-(-r_s // cols), cols)
  for k in range(r_s):
    _show(axes.ravel()[k], np.reshape(parts[:, k], (h, w)), f"part {k}",
          vmin=0, vmax=max(float(parts[:, k].max()), 1e-12), cmap="viridis")
  return _save(fig, path)


def part_colours(r_s: int):
  """`[r_s, 3]` distinct RGB colours (tab10/tab20, then evenly spaced hues)."""
  if r_s <= 10:
    return np.asarray(mcolors.to_rgba_array(
        [f"C{k}" for k in range(r_s)])[:, :3])
  if r_s <= 20:
    return np.asarray(colormaps["tab20"].colors[:r_s])
  hues = np.stack([np.arange(r_s) / r_s, np.full(r_s, 0.8), np.full(r_s, 0.9)], 1)
  return mcolors.hsv_to_rgb(hues)


def plot_parts_overlay(image, parts, path, *, grid=None, alpha: float = 0.5):
  """The image, and the image with each position coloured by its argmax part.

  Parts are compared relative to their own peaks (`parts_eval.relative_parts`).

  Positions where every part is zero stay uncoloured; `alpha` is the colour's
  opacity.
  """
  img = _image(image)
  parts = np.asarray(parts, np.float32)
  s, r_s = parts.shape
  h, w = _grid(s, grid)
  rgba = np.zeros((s, 4), np.float32)
  rgba[:, :3] = part_colours(r_s)[np.asarray(parts_eval.assign_parts(parts))]
  rgba[:, 3] = np.where(parts.max(axis=1) > 0, alpha, 0)
  overlay = _upsample(np.reshape(rgba, (h, w, 4)), img.shape[:2])
  fig, axes = _figure(1, 2)
  _show(axes[0, 0], img, "image")
  _show(axes[0, 1], img, f"{r_s} parts (argmax)")
  axes[0, 1].imshow(overlay, interpolation="nearest")
  return _save(fig, path)


def plot_saliency(images, maps, mu, path, *, concepts: Sequence[int] = (0,),
                  grid=None):
  """Per sample: the image, then the saliency map and `m >= mu_k` mask of each concept.

  Args:
    images: `[n, H, W, ch]`.
    maps: saliency maps `[n, s, r_c]` (`interpret.saliency`).
    mu: concept means `[r_c]` (`interpret.concept_means`).
    path: the PNG to write.
    concepts: the columns k to show.
    grid: the feature grid `(h, w)`, square by default.
  """
  maps = np.asarray(maps, np.float32)
  mu = np.asarray(mu, np.float32)
  n, s, r_c = maps.shape
  if len(images) != n or mu.shape != (r_c,):
    raise ValueError(f"need {n} images and mu of shape ({r_c},), got {len(images)} "
                     f"images and mu of shape {mu.shape}")
  h, w = _grid(s, grid)
  fig, axes = _figure(n, 1 + 2 * len(concepts))
  for i in range(n):
    img = _image(images[i])
    _show(axes[i, 0], img, "image" if i == 0 else None)
    for col, k in enumerate(concepts):
      field = np.reshape(maps[i, :, k], (h, w))
      _show(axes[i, 1 + 2 * col], field, f"m_{k}" if i == 0 else None,
            cmap="magma")
      _show(axes[i, 2 + 2 * col], img,
            f"m_{k} >= mu_{k}" if i == 0 else None)
      mask = _upsample((field >= mu[k]).astype(np.float32), img.shape[:2])
      axes[i, 2 + 2 * col].imshow(np.ma.masked_where(mask > 0, mask),
                                  cmap="gray", vmin=0, vmax=1, alpha=0.8,
                                  interpolation="nearest")
  return _save(fig, path)


def plot_edit(originals, edits, path):
  """Before / after / squared-error strips of an edit (as the paper's Fig. 7).

  Row 1 the originals, row 2 the edits, row 3 the per-pixel mean (over the
  channels) squared error between them, on one colour scale for the batch.
  """
  originals = np.asarray(originals, np.float32)
  edits = np.asarray(edits, np.float32)
  if originals.ndim != 4 or originals.shape != edits.shape:
    raise ValueError(f"originals and edits must both be [n, H, W, ch], got "
                     f"{originals.shape} and {edits.shape}")
  mse = np.mean(np.square(originals - edits), axis=-1)  # [n, H, W]
  top = max(float(mse.max()), 1e-12)
  fig, axes = _figure(3, len(originals))
  for i in range(len(originals)):
    _show(axes[0, i], _image(originals[i]), "original" if i == 0 else None)
    _show(axes[1, i], _image(edits[i]), "edited" if i == 0 else None)
    _show(axes[2, i], mse[i], "squared error" if i == 0 else None, cmap="inferno",
          vmin=0, vmax=top)
  return _save(fig, path)


def plot_ranking(top_images, bottom_images, path, *, top_scores=None,
                 bottom_scores=None):
  """Two strips: the highest-ranked images (row 1) and the lowest (row 2)."""
  top_images, bottom_images = np.asarray(top_images), np.asarray(bottom_images)
  cols = max(len(top_images), len(bottom_images))
  fig, axes = _figure(2, cols)
  for row, (images, scores, name) in enumerate(
      [(top_images, top_scores, "top"), (bottom_images, bottom_scores, "bottom")]):
    for i, image in enumerate(images):
      title = name if scores is None else f"{name} {i}: {float(scores[i]):.3g}"
      _show(axes[row, i], _image(image), title)
  return _save(fig, path)
