"""Planted feature maps: features with known parts and appearances.

`Z_i(3) = A* Lambda_i P*^T + noise` with `P*` the indicator of `r_s` disjoint
spatial regions of unequal sizes (Voronoi cells of random seeds, so regions are
contiguous, like parts of an object), `A*` orthonormal `[c, r_c]` and
`Lambda_i` random coefficients: the exact model of Eq. (1). A fit recovers the
regions up to a permutation; `matched_iou` scores it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from panda_jax import parts_eval


class Planted(NamedTuple):
  features: jax.Array  # [n, h, w, c]
  labels: jax.Array  # [s] int32, region of each position
  parts: jax.Array  # [s, r_s] orthonormal region indicators (P*)
  appearances: jax.Array  # [c, r_c] orthonormal (A*)


def voronoi_regions(key, height: int, width: int, num_regions: int) -> jax.Array:
  """`[h*w]` labels of `num_regions` Voronoi cells of distinct random seed cells."""
  seeds = jax.random.choice(key, height * width, (num_regions,), replace=False)
  rows, cols = jnp.divmod(jnp.arange(height * width), width)
  seed_rows, seed_cols = jnp.divmod(seeds, width)
  dist = (rows[:, None] - seed_rows[None]) ** 2 + (cols[:, None] - seed_cols[None]) ** 2
  return jnp.argmin(dist, axis=1).astype(jnp.int32)


def planted(
  key,
  num_samples: int = 64,
  height: int = 8,
  width: int = 8,
  channels: int = 32,
  rank_c: int = 6,
  rank_s: int = 4,
  noise: float = 0.05,
) -> Planted:
  """Samples features from the separable model of Eq. (1) with known factors."""
  k_regions, k_app, k_coef, k_noise = jax.random.split(key, 4)
  labels = voronoi_regions(k_regions, height, width, rank_s)
  indicator = jax.nn.one_hot(labels, rank_s)
  parts = indicator / jnp.sqrt(jnp.maximum(indicator.sum(0), 1.0))
  appearances, _ = jnp.linalg.qr(jax.random.normal(k_app, (channels, rank_c)))
  coefficients = jax.random.normal(k_coef, (num_samples, rank_c, rank_s))
  z = jnp.einsum("sq,nrq,cr->nsc", indicator, coefficients, appearances)
  z = z + noise * jax.random.normal(k_noise, z.shape)
  return Planted(z.reshape(num_samples, height, width, channels), labels, parts, appearances)


def matched_iou(parts, labels, num_regions: int | None = None) -> np.ndarray:
  """IoU of each true region with its matched discovered part (Hungarian matching).

  Discovered parts are `parts_eval.assign_parts(parts)` (`[s, r_s]` -> `[s]`).
  Returns `[num_regions]`.
  """
  from scipy.optimize import linear_sum_assignment  # scipy is a jax dependency.

  predicted = np.asarray(parts_eval.assign_parts(parts))
  labels = np.asarray(labels)
  num_regions = num_regions or int(labels.max()) + 1
  pred = predicted[:, None] == np.arange(parts.shape[1])[None]  # [s, r_s]
  true = labels[:, None] == np.arange(num_regions)[None]  # [s, regions]
  inter = pred.T.astype(np.float64) @ true
  union = pred.sum(0)[:, None] + true.sum(0)[None] - inter
  iou = inter / np.maximum(union, 1)
  rows, cols = linear_sum_assignment(-iou)
  out = np.zeros(num_regions)
  out[cols] = iou[rows, cols]
  return out
