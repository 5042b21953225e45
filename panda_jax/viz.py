"""Figures of the factors and of their uses, and the pixels the explorer shows.

Matplotlib's object API with the Agg canvas: no pyplot, no global backend
switch, nothing shown. Images are `[H, W, ch]` in the generator's raw range
(about [-1, 1]); parts `[s, r_s]` and saliency maps `[n, s, r_c]` are drawn on
the feature grid `(h, w)` (square by default). Every `plot_*` function returns
the path it wrote.

One palette (`part_colours`) and one overlay (`overlay_parts`) serve every
figure and the explorer, so part k has one colour everywhere; feature cells
become pixel blocks by `upsample_blocks`.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib import colors as mcolors
from matplotlib import image as mpimg
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from panda_jax import parts_eval
from panda_jax.data import toyfaces

_PANEL = 1.6  # inches per panel
_GRID_PANEL = 1.5  # inches per panel of `plot_parts_grid`
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


# ----------------------------------------------------------------------------- pixels


def to_unit(images) -> np.ndarray:
  """Raw images (about [-1, 1]) -> float32 in [0, 1] (clipped), any shape."""
  return np.clip((np.asarray(images, np.float32) + 1) / 2, 0, 1)


def to_uint8(images) -> np.ndarray:
  """Raw images (about [-1, 1]) -> uint8 in [0, 255] (rounded, clipped); uint8 passes through."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images
  return np.clip(np.round((images.astype(np.float32) + 1) * 127.5), 0, 255).astype(np.uint8)


def upsample_blocks(field, size, axis: int = 0) -> np.ndarray:
  """Nearest upsampling of axes `(axis, axis + 1)` of `field` to `size=(H, W)`.

  Pixel `y` takes cell `y * h // H`: each cell becomes a block of pixels (block
  replication when `H, W` are multiples of `h, w`).
  """
  field = np.asarray(field)
  h, w = field.shape[axis : axis + 2]
  rows = (np.arange(size[0]) * h) // size[0]
  cols = (np.arange(size[1]) * w) // size[1]
  return np.take(np.take(field, rows, axis=axis), cols, axis=axis + 1)


def _image(x):
  """Raw generator output `[H, W, ch]` -> displayable `[H, W]` or `[H, W, 3]`."""
  x = np.asarray(x, np.float32)
  if x.ndim != 3 or x.shape[-1] not in (1, 3):
    raise ValueError(f"images must be [H, W, 1 or 3], got shape {x.shape}")
  x = to_unit(x)
  return x[..., 0] if x.shape[-1] == 1 else x


def display(images) -> np.ndarray:
  """Raw generator output `[1, H, W, ch]` -> the uint8 `[H, W, 3]` a page shows.

  Label channels are dropped (`toyfaces.split_labels`) and grey is repeated.
  """
  rgb = toyfaces.split_labels(images).rgb[0]
  return to_uint8(np.repeat(rgb, 3, -1) if rgb.shape[-1] == 1 else rgb)


def heat(field, vmax=None, cmap: str = "inferno") -> np.ndarray:
  """A `[h, w]` field as a uint8 colour map in [0, vmax] (its max by default)."""
  field = np.asarray(field, np.float32)
  vmax = float(field.max()) if vmax is None else vmax
  scaled = field / vmax if vmax > 0 else np.zeros_like(field)
  return (colormaps[cmap](np.clip(scaled, 0, 1))[..., :3] * 255).astype(np.uint8)


def difference(before, after) -> np.ndarray:
  """The heat map of `|after - before|` (uint8 `[H, W, 3]` images), full scale at 1/4."""
  diff = np.abs(after.astype(np.float32) - before.astype(np.float32)).mean(-1)
  return heat(diff, 255.0 / 4)


# ----------------------------------------------------------------------------- figures


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


def _part_map(ax, parts, k: int, grid, **title):
  """Part k of `[s, r_s]` as a heat map on the grid, scaled to its maximum."""
  ax.imshow(
    np.reshape(parts[:, k], grid),
    cmap="viridis",
    interpolation="nearest",
    vmin=0,
    vmax=max(float(parts[:, k].max()), 1e-12),
  )
  ax.set_title(f"part {k}", fontsize=8, **title)


def plot_parts(parts, path, *, grid=None, ncols: int = 8):
  """The parts `[s, r_s]` as a grid of heat maps, each scaled to its maximum."""
  parts = np.asarray(parts, np.float32)
  if parts.ndim != 2:
    raise ValueError(f"parts must be [s, r_s], got shape {parts.shape}")
  s, r_s = parts.shape
  grid = _grid(s, grid)
  cols = min(ncols, r_s)
  fig, axes = _figure(-(-r_s // cols), cols)
  for k in range(r_s):
    _part_map(axes.ravel()[k], parts, k, grid)
  return _save(fig, path)


def part_colours(r_s: int):
  """`[r_s, 3]` distinct RGB colours (tab10/tab20, then evenly spaced hues)."""
  if r_s <= 10:
    return np.asarray(mcolors.to_rgba_array([f"C{k}" for k in range(r_s)])[:, :3])
  if r_s <= 20:
    return np.asarray(colormaps["tab20"].colors[:r_s])
  hues = np.stack([np.arange(r_s) / r_s, np.full(r_s, 0.8), np.full(r_s, 0.9)], 1)
  return mcolors.hsv_to_rgb(hues)


def part_labels(parts, min_relative: float = 0.0) -> np.ndarray:
  """The part each position shows, `[..., s, r_s]` -> int `[..., s]`.

  The argmax of the parts relative to their peaks (`parts_eval.assign_parts`),
  -1 where no relative part exceeds `min_relative` (0: where every part is zero).
  """
  relative = np.asarray(parts_eval.relative_parts(parts))
  return np.where(relative.max(-1) > min_relative, relative.argmax(-1), -1)


def _part_rgba(parts, grid, size, alpha: float, min_relative: float) -> np.ndarray:
  """`[H, W, 4]` float64: each position's part colour, opacity `alpha` where a part shows."""
  labels = part_labels(parts, min_relative)  # [s]
  colours = part_colours(parts.shape[-1])[np.maximum(labels, 0)]  # [s, 3]
  opacity = np.where(labels >= 0, alpha, 0.0)[:, None]  # [s, 1]
  return upsample_blocks(
    np.reshape(np.concatenate([colours, opacity], 1), tuple(grid) + (4,)), size
  )


def overlay_parts(
  image, parts, grid=None, *, alpha: float = 0.55, min_relative: float = 0.0
) -> np.ndarray:
  """An image `[H, W, 3]` in [0, 1] with each pixel tinted by the colour of its part.

  Every feature cell shows its `part_labels` colour (`part_colours`) at opacity
  `alpha` over the block of pixels it covers; cells where no part shows stay as
  they are. Parts `[s, r_s]` on the feature grid (square by default).

  Returns:
    float64 `[H, W, 3]` in [0, 1].
  """
  parts = np.asarray(parts, np.float32)
  rgba = _part_rgba(parts, _grid(parts.shape[0], grid), np.shape(image)[:2], alpha, min_relative)
  return (1 - rgba[..., 3:]) * image + rgba[..., 3:] * rgba[..., :3]


def plot_parts_overlay(image, parts, path, *, grid=None, alpha: float = 0.5):
  """The image, and the image with each position coloured by its argmax part.

  Parts are compared relative to their own peaks (`parts_eval.relative_parts`).

  Positions where every part is zero stay uncoloured; `alpha` is the colour's
  opacity.
  """
  img = _image(image)
  parts = np.asarray(parts, np.float32)
  s, r_s = parts.shape
  rgba = _part_rgba(parts, _grid(s, grid), img.shape[:2], alpha, 0.0).astype(np.float32)
  fig, axes = _figure(1, 2)
  _show(axes[0, 0], img, "image")
  _show(axes[0, 1], img, f"{r_s} parts (argmax)")
  axes[0, 1].imshow(rgba, interpolation="nearest")
  return _save(fig, path)


def plot_parts_grid(
  images,
  rows: Sequence,
  grid,
  path: str,
  *,
  heatmaps: Optional[np.ndarray] = None,
  alpha: float = 0.55,
) -> str:
  """One column per sample: the image, then one argmax-part overlay per row.

  Args:
    images: `[n, H, W, 3]` raw RGB.
    rows: `(title, parts)` pairs, parts `[s, r_s]` (global) or `[n, s, r_s]`.
    grid: the feature grid `(h, w)`.
    path: the PNG to write.
    heatmaps: optional global parts `[s, r_s]` drawn below as heat maps.
    alpha: opacity of the part colours.
  """
  images = np.asarray(images, np.float32)
  n = len(images)
  r_s = 0 if heatmaps is None else heatmaps.shape[1]
  cols = max(n, min(r_s, 8))
  heat_rows = -(-r_s // cols)
  fig = Figure(figsize=(_GRID_PANEL * cols, _GRID_PANEL * (1 + len(rows) + heat_rows)), dpi=_DPI)
  FigureCanvasAgg(fig)
  axes = np.asarray(fig.subplots(1 + len(rows) + heat_rows, cols, squeeze=False))
  fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.95, wspace=0.05, hspace=0.25)
  for ax in axes.ravel():
    ax.set_axis_off()
  for i in range(n):
    rgb = to_unit(images[i])
    axes[0, i].imshow(rgb, interpolation="nearest")
    for r, (title, parts) in enumerate(rows):
      parts = np.asarray(parts, np.float32)
      axes[1 + r, i].imshow(
        overlay_parts(rgb, parts[i] if parts.ndim == 3 else parts, grid, alpha=alpha),
        interpolation="nearest",
      )
      if i == 0:
        axes[1 + r, i].set_title(title, fontsize=8, loc="left")
  for k in range(r_s):
    _part_map(
      axes[1 + len(rows) + k // cols, k % cols],
      heatmaps,
      k,
      tuple(grid),
      color=part_colours(r_s)[k],
    )
  return _save(fig, path)


def plot_regions(images, regions, detected, names: Sequence[str], path: str) -> str:
  """The images, then each with its regions tinted (undetected samples: a grey title).

  Args:
    images: `[n, H, W, 3]` raw RGB.
    regions: bool `[n, H, W, L]` (they may overlap: tinted in order).
    detected: bool `[n]`.
    names: the L region names (a legend in their colours).
    path: the PNG to write.
  """
  n = len(images)
  colours = part_colours(len(names))
  fig = Figure(figsize=(1.6 * n, 3.4), dpi=_DPI)
  FigureCanvasAgg(fig)
  axes = np.asarray(fig.subplots(2, n, squeeze=False))
  for i in range(n):
    image = to_unit(images[i])
    tinted = image.copy()
    for l in range(len(names)):
      m = regions[i, ..., l][..., None]
      tinted = np.where(m, 0.45 * tinted + 0.55 * colours[l], tinted)
    for r, shown in enumerate((image, tinted)):
      axes[r, i].imshow(shown, interpolation="nearest")
      axes[r, i].set_axis_off()
    axes[1, i].set_title(
      "detected" if detected[i] else "no face", fontsize=7, color="black" if detected[i] else "grey"
    )
  for l, name in enumerate(names):
    fig.text(0.02 + 0.12 * l, 0.96, name, color=colours[l], fontsize=8, va="top")
  return _save(fig, path)


def save_label_grid(path: str, images, cols: int = 4, zoom: int = 1) -> str:
  """Toy-faces generator output `[n, r, r, 3 + P]` as a PNG grid of (RGB, label map) pairs.

  `zoom` enlarges every pixel to `zoom x zoom` (nearest neighbour); label maps
  in `toyfaces.PALETTE`.
  """
  rgb, probs = toyfaces.split_channels(np.asarray(images))
  pairs = np.concatenate(
    [to_unit(rgb), toyfaces.colourise(probs.argmax(-1))], axis=2
  )  # [n, r, 2r, 3]
  rows = -(-len(pairs) // cols)
  pairs = np.concatenate([pairs, np.ones((rows * cols - len(pairs),) + pairs.shape[1:])])
  r, w = pairs.shape[1:3]
  grid = pairs.reshape(rows, cols, r, w, 3).transpose(0, 2, 1, 3, 4)
  grid = grid.reshape(rows * r, cols * w, 3)
  mpimg.imsave(path, upsample_blocks(grid, (rows * r * zoom, cols * w * zoom)))
  return path


def plot_saliency(images, maps, mu, path, *, concepts: Sequence[int] = (0,), grid=None):
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
    raise ValueError(
      f"need {n} images and mu of shape ({r_c},), got {len(images)} "
      f"images and mu of shape {mu.shape}"
    )
  h, w = _grid(s, grid)
  fig, axes = _figure(n, 1 + 2 * len(concepts))
  for i in range(n):
    img = _image(images[i])
    _show(axes[i, 0], img, "image" if i == 0 else None)
    for col, k in enumerate(concepts):
      field = np.reshape(maps[i, :, k], (h, w))
      _show(axes[i, 1 + 2 * col], field, f"m_{k}" if i == 0 else None, cmap="magma")
      _show(axes[i, 2 + 2 * col], img, f"m_{k} >= mu_{k}" if i == 0 else None)
      mask = upsample_blocks((field >= mu[k]).astype(np.float32), img.shape[:2])
      axes[i, 2 + 2 * col].imshow(
        np.ma.masked_where(mask > 0, mask),
        cmap="gray",
        vmin=0,
        vmax=1,
        alpha=0.8,
        interpolation="nearest",
      )
  return _save(fig, path)


def plot_edit(originals, edits, path):
  """Before / after / squared-error strips of an edit (as the paper's Fig. 7).

  Row 1 the originals, row 2 the edits, row 3 the per-pixel mean (over the
  channels) squared error between them, on one colour scale for the batch.
  """
  originals = np.asarray(originals, np.float32)
  edits = np.asarray(edits, np.float32)
  if originals.ndim != 4 or originals.shape != edits.shape:
    raise ValueError(
      f"originals and edits must both be [n, H, W, ch], got {originals.shape} and {edits.shape}"
    )
  mse = np.mean(np.square(originals - edits), axis=-1)  # [n, H, W]
  top = max(float(mse.max()), 1e-12)
  fig, axes = _figure(3, len(originals))
  for i in range(len(originals)):
    _show(axes[0, i], _image(originals[i]), "original" if i == 0 else None)
    _show(axes[1, i], _image(edits[i]), "edited" if i == 0 else None)
    _show(axes[2, i], mse[i], "squared error" if i == 0 else None, cmap="inferno", vmin=0, vmax=top)
  return _save(fig, path)


def plot_ranking(top_images, bottom_images, path, *, top_scores=None, bottom_scores=None):
  """Two strips: the highest-ranked images (row 1) and the lowest (row 2)."""
  top_images, bottom_images = np.asarray(top_images), np.asarray(bottom_images)
  cols = max(len(top_images), len(bottom_images))
  fig, axes = _figure(2, cols)
  for row, (images, scores, name) in enumerate(
    [(top_images, top_scores, "top"), (bottom_images, bottom_scores, "bottom")]
  ):
    for i, image in enumerate(images):
      title = name if scores is None else f"{name} {i}: {float(scores[i]):.3g}"
      _show(axes[row, i], _image(image), title)
  return _save(fig, path)


def plot_bars(
  groups: Sequence[str], series: Sequence[str], values, errors, ylabel: str, path: str
) -> str:
  """Grouped bars: one group per `groups` entry, one bar per `series` entry in each.

  `values` and `errors` are `[len(series)][len(groups)]` (NaN: no bar).
  """
  fig = Figure(figsize=(1.2 + 0.9 * len(groups), 3.2), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  width = 0.8 / len(series)
  for k, name in enumerate(series):
    x = np.arange(len(groups)) + (k - (len(series) - 1) / 2) * width
    ax.bar(x, values[k], width, yerr=errors[k], label=name, capsize=2)
  ax.set_xticks(np.arange(len(groups)), groups)
  ax.set_ylabel(ylabel)
  ax.legend(fontsize=7)
  fig.tight_layout()
  return _save(fig, path)


def plot_strips(rows: Sequence, path: str) -> str:
  """A montage with one labelled row of samples per `(title, images, is_error_map)`.

  Images `[n, H, W, 3]` are raw; error maps `[n, H, W]` share one inferno scale
  (0 to the largest error of any error row).
  """
  top = max([float(np.max(x)) for _, x, err in rows if err] + [1e-12])
  inferno = colormaps["inferno"]
  strips = []
  for _, images, err in rows:
    images = np.asarray(images)
    shown = inferno(np.clip(images / top, 0, 1))[..., :3] if err else to_unit(images)
    strips.append(
      np.concatenate(
        list(np.pad(shown, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=1)), axis=1
      )
    )
  montage = np.concatenate(strips, axis=0)
  h = montage.shape[0] / len(rows)
  fig = Figure(figsize=(2 + montage.shape[1] / 24, 0.3 + montage.shape[0] / 24), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  ax.imshow(montage, interpolation="nearest")
  ax.set_yticks((np.arange(len(rows)) + 0.5) * h, [title for title, _, _ in rows], fontsize=7)
  ax.set_xticks([])
  fig.tight_layout()
  return _save(fig, path)


def plot_sensitivity(rows: Sequence[dict], path: str) -> str:
  """One panel per factor of a sensitivity study: ROIR and part IoU against its values.

  `rows`: `{"factor", "value", "roir_mean_over_rois", "part_iou_mean"}` (rows
  with an `"error"` are left out; a None ROIR is a gap).
  """
  factors = list(dict.fromkeys(r["factor"] for r in rows))
  fig = Figure(figsize=(3.2 * len(factors), 2.8), dpi=100)
  FigureCanvasAgg(fig)
  for k, factor in enumerate(factors):
    ax = fig.add_subplot(1, len(factors), k + 1)
    pts = [r for r in rows if r["factor"] == factor and "error" not in r]
    labels = [str(r["value"]) for r in pts]
    ax.plot(
      labels,
      [np.nan if r["roir_mean_over_rois"] is None else r["roir_mean_over_rois"] for r in pts],
      "o-",
    )
    ax.set_ylabel("ROIR, mean over ROIs", color="C0", fontsize=8)
    twin = ax.twinx()
    twin.plot(labels, [r["part_iou_mean"] for r in pts], "s--", color="C1")
    twin.set_ylabel("part IoU, mean over parts", color="C1", fontsize=8)
    ax.set_title(factor)
  fig.tight_layout()
  return _save(fig, path)
