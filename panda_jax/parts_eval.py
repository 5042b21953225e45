"""Scoring parts and masks against a ground-truth segmentation (best-IoU matching).

Used with generators whose samples carry their own label maps (the embedded
toy-faces GAN): a part "finds" a ground-truth region when their intersection
over union is high. IoUs are pooled over the samples,

    IoU(l, k) = sum_i |G_il & M_ik| / sum_i |G_il | M_ik|,

with `G_il` the pixels of sample i labelled l and `M_ik` the pixels of sample i
assigned to part (or mask) k. Parts (`[s, r_s]` global or `[n, s, r_s]` refined)
become one label per pixel by rescaling each part to its own peak
(`relative_parts`), upsampling them to the image size and taking the argmax
over parts, as in the paper's figures.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST


def relative_parts(parts):
  """Each part divided by its peak over the positions: `[..., s, r_s]` -> same shape.

  A part's height scales like `1 / sqrt(its size)` (the columns of `P` have
  about unit norm), so a raw argmax hands the pixels on a boundary to the
  smaller part; the official plots likewise rescale every part to its own
  range before overlaying them. All-zero parts stay zero.
  """
  parts = jnp.asarray(parts)
  peak = jnp.max(parts, axis=-2, keepdims=True)
  return parts / jnp.where(peak > 0, peak, 1)


def assign_parts(parts):
  """The part each position belongs to: argmax of `relative_parts`, `[..., s, r_s]` -> `[..., s]`."""
  return jnp.argmax(relative_parts(parts), axis=-1).astype(jnp.int32)


def part_label_maps(parts, grid, size, method: str = "bilinear"):
  """The argmax relative part (`relative_parts`) of every pixel: `[n, H, W]` int32.

  n = 1 for global parts.

  Args:
    parts: `[s, r_s]` or refined `[n, s, r_s]`, `s = h * w` row-major.
    grid: the feature grid `(h, w)`.
    size: the image size `(H, W)`.
    method: `jax.image.resize` method ("bilinear", or "nearest" for blocks).
  """
  fields = _upsampled(relative_parts(_batched_parts(parts, grid)), grid, size, method)
  return jnp.argmax(fields, axis=-1).astype(jnp.int32)


def _batched_parts(parts, grid):
  """`[s, r_s]` or `[n, s, r_s]` -> `[1 or n, s, r_s]`, `s = h * w` checked."""
  parts = jnp.asarray(parts)
  h, w = grid
  if parts.ndim == 2:
    parts = parts[None]
  if parts.ndim != 3 or parts.shape[1] != h * w:
    raise ValueError(
      f"parts must be [s={h * w}, r_s] or [n, s={h * w}, r_s], got shape {tuple(parts.shape)}"
    )
  return parts


def _upsampled(parts, grid, size, method):
  """`[n, s, r_s]` on the grid `(h, w)` -> `[n, H, W, r_s]` by `jax.image.resize`."""
  n, _, r_s = parts.shape
  return jax.image.resize(
    jnp.reshape(parts, (n,) + tuple(grid) + (r_s,)), (n,) + tuple(size) + (r_s,), method=method
  )


def iou_matrix(masks, labels, num_labels: int):
  """Pooled IoU of every ground-truth label with every predicted mask.

  Args:
    masks: boolean `[n, H, W, k]` (or `[H, W, k]`, shared by all samples).
    labels: int `[n, H, W]`, ground-truth labels in `[0, num_labels)`.
    num_labels: L.

  Returns:
    `[L, k]`; 0 where a label and a mask are both empty.
  """
  labels = jnp.asarray(labels)
  masks = jnp.asarray(masks)
  if labels.ndim != 3:
    raise ValueError(f"labels must be [n, H, W], got shape {tuple(labels.shape)}")
  if masks.ndim == 3:
    masks = masks[None]
  if (
    masks.ndim != 4
    or masks.shape[1:3] != labels.shape[1:]
    or masks.shape[0] not in (1, labels.shape[0])
  ):
    raise ValueError(
      f"masks must be [n, H, W, k] matching labels {tuple(labels.shape)}, got "
      f"shape {tuple(masks.shape)}"
    )
  masks = jnp.broadcast_to(masks, labels.shape + masks.shape[-1:]).astype(jnp.float32)
  truth = jax.nn.one_hot(labels, num_labels, dtype=jnp.float32)  # [n, H, W, L]
  inter = jnp.einsum("nhwl,nhwk->lk", truth, masks, precision=_HIGHEST)  # [L, k]
  union = jnp.sum(truth, axis=(0, 1, 2))[:, None] + jnp.sum(masks, axis=(0, 1, 2))[None] - inter
  return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1), 0.0)


def best_part_iou(parts, labels, num_labels: int, grid, method: str = "bilinear"):
  """Each ground-truth label's best-matching part and its IoU.

  Args:
    parts: `[s, r_s]` or refined `[n, s, r_s]` on the feature grid `grid=(h, w)`.
    labels: int `[n, H, W]` ground-truth label maps.
    num_labels: L.
    grid: `(h, w)`.
    method: upsampling of the parts (see `part_label_maps`).

  Returns:
    `(best [L], match [L] int32, iou [L, r_s])`.
  """
  labels = jnp.asarray(labels)
  if labels.ndim != 3:
    raise ValueError(f"labels must be [n, H, W], got shape {tuple(labels.shape)}")
  r_s = parts.shape[-1]
  assigned = part_label_maps(parts, grid, labels.shape[1:], method)  # [n or 1, H, W]
  iou = iou_matrix(jax.nn.one_hot(assigned, r_s, dtype=jnp.bool_), labels, num_labels)
  return jnp.max(iou, axis=1), jnp.argmax(iou, axis=1).astype(jnp.int32), iou


def matched_iou(masks, labels, num_labels: int, *, per_sample: bool = False) -> np.ndarray:
  """IoU of each label l with its own mask `masks[..., l]` (the diagonal of `iou_matrix`).

  Counted exactly (int64 pixel counts, float64 ratios; NumPy, not traced), so
  that reported IoUs do not depend on float32 rounding.

  Args:
    masks: boolean `[n, H, W, L]` (or `[H, W, L]`, shared by all samples), mask l
      standing for label l.
    labels: int `[n, H, W]`.
    num_labels: L.
    per_sample: pooled over the samples (`[L]`, as `iou_matrix`) or one IoU per
      sample (`[n, L]`, as `region_ious`).

  Returns:
    float64 `[L]` or `[n, L]`; 0 where a label and its mask are both empty.
  """
  labels = np.asarray(labels)
  if labels.ndim != 3:
    raise ValueError(f"labels must be [n, H, W], got shape {labels.shape}")
  masks = np.broadcast_to(np.asarray(masks, bool), labels.shape + (num_labels,))
  truth = labels[..., None] == np.arange(num_labels)  # [n, H, W, L]
  axes = (1, 2) if per_sample else (0, 1, 2)
  inter = np.sum(masks & truth, axis=axes)
  union = np.sum(masks | truth, axis=axes)
  return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def part_regions(parts, labels, label_names, grid, part):
  """The ground-truth regions a part (index or list of indices) stands for.

  A label belongs to part k when k is its best-matching part by IoU
  (`best_part_iou`); a part that is no label's best match stands for the label
  it overlaps most.

  Args:
    parts: `[s, r_s]` or `[n, s, r_s]` on the grid `(h, w)`.
    labels: int `[n, H, W]`; label_names: one name per label.
    grid: `(h, w)`.
    part: an index or a list of indices (their union).

  Returns:
    `(masks [n, H, W] float32, names of the labels)`.
  """
  _, match, iou = best_part_iou(parts, labels, len(label_names), grid)
  match, iou = np.asarray(match), np.asarray(iou)
  chosen = set()
  for k in [part] if isinstance(part, (int, np.integer)) else part:
    chosen |= set(np.flatnonzero(match == k).tolist()) or {int(np.argmax(iou[:, k]))}
  chosen = sorted(chosen)
  return (np.isin(labels, chosen).astype(np.float32), [label_names[l] for l in chosen])


def fixed_region_bound(labels, num_labels: int):
  """The highest pooled IoU any fixed region (one mask for all samples) reaches, per label.

  Global parts give every sample the same masks, so when the labelled regions
  move from sample to sample no global part can beat this. For label l with
  frequency `f(x)` (fraction of the n samples labelled l at pixel x), a region
  M scores `n sum_M f / (sum_i |G_il| + n |M| - n sum_M f)`; at fixed `|M|` the
  best M holds the `|M|` most frequent pixels, so the bound is the maximum over
  the sizes of the prefixes of the pixels sorted by frequency.

  Args:
    labels: int `[n, H, W]`.
    num_labels: L.

  Returns:
    `[L]` float32.
  """
  labels = jnp.asarray(labels)
  if labels.ndim != 3:
    raise ValueError(f"labels must be [n, H, W], got shape {tuple(labels.shape)}")
  freq = jnp.mean(jax.nn.one_hot(labels, num_labels, dtype=jnp.float32), axis=0)  # [H, W, L]
  freq = jnp.reshape(freq, (-1, num_labels))
  covered = jnp.cumsum(-jnp.sort(-freq, axis=0), axis=0)  # [HW, L]
  size = jnp.arange(1, freq.shape[0] + 1, dtype=jnp.float32)[:, None]
  iou = covered / (jnp.sum(freq, axis=0) + size - covered)
  return jnp.max(iou, axis=0)


# ----------------------------------------------------------------------------- region masks
# Ground truth given as (possibly overlapping) boolean region masks per sample,
# e.g. landmark regions of a real face GAN (`panda_jax.landmarks`), instead of
# one label per pixel: each part becomes its own binary mask by thresholding,
# and IoUs are per sample, then averaged ("best-part IoU", issue 17).


def threshold_part_masks(parts, grid, size, threshold: float = 0.5):
  """Each part as a binary image mask, bool `[1 or n, H, W, r_s]` from `[s, r_s]` or `[n, s, r_s]`.

  A part is bilinearly upsampled from the grid `(h, w)` to `size=(H, W)` with
  half-pixel centres (`jax.image.resize(method="bilinear")`, the convention of
  torch's `interpolate(align_corners=False)`: output pixel `x` samples the
  grid at `(x + 0.5) h / H - 0.5`, clamped to the edge cells), divided by its
  maximum over the image (per sample for per-sample parts), and kept where it
  is `>= threshold`. A part with no positive value is empty.
  """
  parts = _batched_parts(jnp.asarray(parts, jnp.float32), grid)
  fields = _upsampled(parts, grid, size, "bilinear")  # [n, H, W, r_s]
  peak = jnp.max(fields, axis=(1, 2), keepdims=True)
  return (fields >= threshold * peak) & (peak > 0)


def region_ious(part_masks, regions):
  """Per-sample IoU of every region with every part mask: `[n, L, k]`.

  Args:
    part_masks: bool `[n, H, W, k]` (or `[1, H, W, k]`, shared by all samples).
    regions: bool `[n, H, W, L]`.

  Returns:
    `[n, L, k]`; 0 where a region and a mask are both empty.
  """
  regions = jnp.asarray(regions)
  part_masks = jnp.asarray(part_masks)
  if regions.ndim != 4:
    raise ValueError(f"regions must be [n, H, W, L], got shape {tuple(regions.shape)}")
  if (
    part_masks.ndim != 4
    or part_masks.shape[1:3] != regions.shape[1:3]
    or part_masks.shape[0] not in (1, regions.shape[0])
  ):
    raise ValueError(
      f"part masks must be [n or 1, H, W, k] matching regions "
      f"{tuple(regions.shape)}, got shape {tuple(part_masks.shape)}"
    )
  r = regions.astype(jnp.float32)
  m = jnp.broadcast_to(part_masks, regions.shape[:3] + part_masks.shape[-1:]).astype(jnp.float32)
  inter = jnp.einsum("nhwl,nhwk->nlk", r, m, precision=_HIGHEST)  # [n, L, k], exact counts
  union = jnp.sum(r, axis=(1, 2))[:, :, None] + jnp.sum(m, axis=(1, 2))[:, None, :] - inter
  return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1), 0.0)


def best_region_part_iou(
  parts, regions, grid, *, detected=None, threshold: float = 0.5, match: str = "global"
):
  """Best-part IoU of each region (issue 17's metric for a real GAN with landmark regions).

  Each part becomes a binary mask (`threshold_part_masks`); the IoU of region
  l and part k is computed per sample and averaged over the detected samples;
  each region's best part is the one of highest mean IoU (`match="global"`:
  one part per region for every sample, for global parts and for per-sample
  parts whose indices correspond across samples, such as refined parts).

  `match="per_sample"` instead takes every sample's own best part before
  averaging (`mean_i max_k IoU_i(l, k)`), for per-sample parts whose indices
  mean nothing across samples (a k-means of each sample's fibres): the match
  then uses the ground truth of every sample, so it is an optimistic score.

  Args:
    parts: `[s, r_s]` or `[n, s, r_s]` on the feature grid `grid=(h, w)`.
    regions: bool `[n, H, W, L]` ground-truth regions (they may overlap).
    grid: `(h, w)`.
    detected: optional bool `[n]`: the samples scored (default all).
    threshold: of the parts relative to their maximum.
    match: "global" or "per_sample".

  Returns:
    `(best [L], match, ious [n, L, r_s])`: the per-sample IoUs of every region
    and part (undetected samples included, for the caller's spreads); match
    `[L]` int32 with "global", `[n, L]` with "per_sample" (each sample's best
    part; -1 for undetected samples).
  """
  if match not in ("global", "per_sample"):
    raise ValueError(f"match must be 'global' or 'per_sample', got {match!r}")
  regions = jnp.asarray(regions, jnp.bool_)
  if regions.ndim != 4:
    raise ValueError(f"regions must be [n, H, W, L], got shape {tuple(regions.shape)}")
  n = regions.shape[0]
  keep = jnp.ones(n, bool) if detected is None else jnp.asarray(detected, jnp.bool_)
  if keep.shape != (n,):
    raise ValueError(f"detected must be [n={n}], got shape {tuple(keep.shape)}")
  if not bool(jnp.any(keep)):
    raise ValueError("no detected sample to score")
  if jnp.ndim(parts) == 3 and jnp.shape(parts)[0] != n:
    raise ValueError(f"per-sample parts are for {jnp.shape(parts)[0]} samples, regions for {n}")
  ious = region_ious(threshold_part_masks(parts, grid, regions.shape[1:3], threshold), regions)
  weights = keep.astype(jnp.float32) / jnp.sum(keep)
  if match == "per_sample":
    best = jnp.einsum("n,nl->l", weights, jnp.max(ious, axis=2), precision=_HIGHEST)
    which = jnp.where(keep[:, None], jnp.argmax(ious, axis=2), -1).astype(jnp.int32)
    return best, which, ious
  mean = jnp.einsum("n,nlk->lk", weights, ious, precision=_HIGHEST)  # [L, r_s]
  return jnp.max(mean, axis=1), jnp.argmax(mean, axis=1).astype(jnp.int32), ious
