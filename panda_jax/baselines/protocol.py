"""The locality protocol of the evaluation (paper Section 5.2.1, Table 2).

For every method and region of interest (ROI), candidate edits (a direction or
appearance and a strength) are scored on a validation split, and the candidate
with the smallest ROIR (Eq. 13) among those that change the ROI by at least a
fixed amount is kept (the same threshold for every method, so that an edit that
changes nothing cannot win); its ROIR is then reported on a disjoint test split.
Splits are ranges of sample indices (sample i has the latents of
`fold_in(key, i)`, `generator_ops.sample_latents`).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax.numpy as jnp
import numpy as np

from panda_jax import metrics


class Splits(NamedTuple):
  train: np.ndarray  # [num_train] sample indices the methods are fitted on.
  val: np.ndarray  # [num_val] where candidates are chosen.
  test: np.ndarray  # [num_test] where the chosen edits are reported.


def splits(num_train: int, num_val: int, num_test: int) -> Splits:
  """Consecutive, disjoint index ranges: train, then validation, then test."""
  sizes = (num_train, num_val, num_test)
  if any(not isinstance(s, (int, np.integer)) or s < 1 for s in sizes):
    raise ValueError(f"split sizes must be positive integers, got {sizes}")
  ends = np.cumsum(sizes)
  return Splits(*(np.arange(e - s, e) for s, e in zip(sizes, ends)))


def _masked_norms(originals, edits, masks):
  """`(inside, outside)` `[n]` squared norms of the change (`metrics.masked_norms`, Eq. 13),
  masks `[n, H, W]` (binary here: the protocol's ROIs)."""
  if originals.ndim != 4 or edits.shape != originals.shape:
    raise ValueError(
      f"originals and edits must both be [n, H, W, ch], got "
      f"{tuple(originals.shape)} and {tuple(edits.shape)}"
    )
  if masks.shape != originals.shape[:3]:
    raise ValueError(
      f"masks must be [n, H, W] = {tuple(originals.shape[:3])}, got {tuple(masks.shape)}"
    )
  return metrics.masked_norms(originals, edits, jnp.asarray(masks, originals.dtype))


def roi_change(originals, edits, masks):
  """`[n]`: root-mean-square change of the pixels inside each sample's ROI.

  `sqrt(||M * (X - X')||^2 / (ch * sum M))` (0 for an empty ROI); images
  `[n, H, W, ch]`, masks `[n, H, W]` in [0, 1].
  """
  inside, _ = _masked_norms(originals, edits, masks)
  area = jnp.sum(jnp.asarray(masks, originals.dtype), axis=(1, 2)) * originals.shape[-1]
  return jnp.where(area > 0, jnp.sqrt(inside / jnp.where(area > 0, area, 1)), 0.0)


def inside_share(originals, edits, masks):
  """`[n]`: `||M * (X - X')||^2 / ||X - X'||^2` (0 when nothing changed)."""
  inside, outside = _masked_norms(originals, edits, masks)
  total = inside + outside
  return jnp.where(total > 0, inside / jnp.where(total > 0, total, 1), 0.0)


def signed(strengths) -> list:
  """Every strength with both signs: `[-t0, t0, -t1, t1, ...]` (the candidates' strengths)."""
  return [s * t for t in strengths for s in (-1.0, 1.0)]


def select(roirs, changes, threshold: float) -> Optional[int]:
  """The threshold rule: the candidate of smallest ROIR among those with change >= threshold.

  Args:
    roirs: `[k]` validation ROIR of each candidate (NaN/inf rank last).
    changes: `[k]` its mean ROI change (`roi_change`).
    threshold: the minimum mean ROI change.

  Returns:
    the index of the chosen candidate, or None when no candidate changes the
    ROI enough.
  """
  roirs, changes = np.asarray(roirs, np.float64), np.asarray(changes, np.float64)
  if roirs.ndim != 1 or roirs.shape != changes.shape:
    raise ValueError(
      f"roirs and changes must be [k] vectors of one length, got {roirs.shape} and {changes.shape}"
    )
  eligible = np.flatnonzero(changes >= threshold)
  if eligible.size == 0:
    return None
  values = np.where(np.isfinite(roirs[eligible]), roirs[eligible], np.inf)
  return int(eligible[np.argmin(values)])


# ----------------------------------------------------------------------------- any generator
# The selection and the report of the protocol for any generator and any set of
# ROIs: a method is a `render(candidate) -> edited images` of one split and a
# list of `(candidate, rois it may be chosen for)`; masks are `{roi: [n, H, W]}`.


def roi_statistics(originals, edits, masks, min_pixels: int = 1):
  """`(ratios [m], changes [m])`: per-sample ROIR (Eq. 13) and RMS ROI change.

  Over the `m` samples whose ROI has at least `min_pixels` pixels (so samples
  whose ROI is empty, e.g. a face not detected, are left out).
  """
  originals, edits, masks = (
    jnp.asarray(originals),
    jnp.asarray(edits),
    jnp.asarray(masks, jnp.float32),
  )
  keep = np.asarray(jnp.sum(masks, axis=(1, 2))) >= min_pixels
  ratios = np.asarray(metrics.roir_per_sample(originals, edits, masks), np.float64)
  changes = np.asarray(roi_change(originals, edits, masks), np.float64)
  return ratios[keep], changes[keep]


def choose_edits(
  render, candidates, originals, masks: dict, threshold: float, min_pixels: int = 1
) -> dict:
  """The threshold rule on a validation split, per ROI.

  Args:
    render: `candidate -> edited images [n, H, W, ch]` of the split.
    candidates: `[(candidate, rois)]`: every candidate is rendered once and
      scored for each of its `rois`.
    originals: `[n, H, W, ch]` unedited images of the split.
    masks: `{roi: [n, H, W]}` in [0, 1].
    threshold: minimum mean RMS change inside the ROI (`select`).
    min_pixels: see `roi_statistics`.

  Returns:
    `{roi: None (no candidate changes it enough) or dict(candidate, val_roir,
    val_change, num_candidates)}`.
  """
  scores = {roi: ([], [], []) for roi in masks}
  for candidate, rois in candidates:
    edited = np.asarray(render(candidate))
    for roi in rois:
      ratios, changes = roi_statistics(originals, edited, masks[roi], min_pixels)
      scores[roi][0].append(candidate)
      scores[roi][1].append(float(np.mean(ratios)) if ratios.size else np.inf)
      scores[roi][2].append(float(np.mean(changes)) if changes.size else 0.0)
  chosen = {}
  for roi, (cands, roirs, changes) in scores.items():
    index = select(roirs, changes, threshold) if cands else None
    chosen[roi] = (
      None
      if index is None
      else dict(
        candidate=cands[index],
        val_roir=roirs[index],
        val_change=changes[index],
        num_candidates=len(cands),
      )
    )
  return chosen


def report_edits(render, chosen: dict, originals, masks: dict, min_pixels: int = 1) -> dict:
  """Test ROIR of the chosen edits: `{roi: {"mean", "std", "median", "n", "roi_change"}}`.

  `render`, `originals` and `masks` of the test split; a ROI with no chosen
  edit gets `mean = std = None` and a note. Std is the population one.
  """
  out = {}
  for roi, pick in chosen.items():
    if pick is None:
      out[roi] = dict(
        mean=None, std=None, median=None, n=0, note="no candidate reached the threshold"
      )
      continue
    out[roi] = summary(
      *roi_statistics(originals, np.asarray(render(pick["candidate"])), masks[roi], min_pixels)
    )
  return out


def summary(ratios, changes) -> dict:
  """A chosen edit's test record: `{"mean", "std", "median", "n"}` of the ROIR `ratios`
  `[m]` (population std) and `roi_change`, the mean of `changes` `[m]`."""
  return dict(
    mean=float(np.mean(ratios)),
    std=float(np.std(ratios)),
    median=float(np.median(ratios)),
    n=int(np.size(ratios)),
    roi_change=float(np.mean(changes)),
  )
