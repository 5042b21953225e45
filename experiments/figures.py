"""Grid figures of parts over samples (the single-panel figures are `panda_jax.viz`)."""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from panda_jax import parts_eval
from panda_jax import viz

_PANEL = 1.5  # inches


def _rgb(image):
  """Raw `[H, W, 3]` (about [-1, 1]) -> displayable [0, 1]."""
  return np.clip((np.asarray(image, np.float32) + 1) / 2, 0, 1)


def _overlay(image, parts, grid, alpha: float):
  """The image with every pixel tinted by its argmax relative part (nearest upsampling)."""
  h, w = grid
  big_h, big_w = image.shape[:2]
  labels = np.asarray(parts_eval.assign_parts(parts))                       # [s]
  colours = viz.part_colours(parts.shape[-1])[labels]                       # [s, 3]
  opacity = np.where(parts.max(axis=-1) > 0, alpha, 0.0)[:, None]          # [s, 1]
  tint = np.reshape(np.concatenate([colours, opacity], 1), (h, w, 4))
  tint = tint[(np.arange(big_h) * h) // big_h][:, (np.arange(big_w) * w) // big_w]
  return (1 - tint[..., 3:]) * _rgb(image) + tint[..., 3:] * tint[..., :3]


def parts_grid(images, rows: Sequence, grid, path: str, *,
               heatmaps: Optional[np.ndarray] = None, alpha: float = 0.55) -> str:
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
  h, w = grid
  r_s = 0 if heatmaps is None else heatmaps.shape[1]
  cols = max(n, min(r_s, 8))
  heat_rows = -(-r_s // cols)
  fig = Figure(figsize=(_PANEL * cols, _PANEL * (1 + len(rows) + heat_rows)), dpi=80)
  FigureCanvasAgg(fig)
  axes = np.asarray(fig.subplots(1 + len(rows) + heat_rows, cols, squeeze=False))
  fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.95, wspace=0.05, hspace=0.25)
  for ax in axes.ravel():
    ax.set_axis_off()
  for i in range(n):
    axes[0, i].imshow(_rgb(images[i]), interpolation="nearest")
    for r, (title, parts) in enumerate(rows):
      parts = np.asarray(parts, np.float32)
      axes[1 + r, i].imshow(_overlay(images[i], parts[i] if parts.ndim == 3 else parts, grid,
                                     alpha), interpolation="nearest")
      if i == 0:
        axes[1 + r, i].set_title(title, fontsize=8, loc="left")
  for k in range(r_s):
    ax = axes[1 + len(rows) + k // cols, k % cols]
    ax.imshow(np.reshape(heatmaps[:, k], (h, w)), cmap="viridis", interpolation="nearest",
              vmin=0, vmax=max(float(heatmaps[:, k].max()), 1e-12))
    ax.set_title(f"part {k}", fontsize=8, color=viz.part_colours(r_s)[k])
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, format="png")
  return path
