"""Interpreting the appearance factors: saliency, localisation and ranking.

Saliency maps and unsupervised localisation (paper Section 5.1.2), global and
part-based ranking (Section 5.6, Eqs. 17-18). Everything works on feature arrays
(`[n, h, w, c]` or `[n, s, c]`) and factors, and is jittable; the dataset-level
statistics (the concept means mu_k, the top/bottom ranking) are streamed over
batches as pure `init / update / finalize` triples, so no dataset is ever held.

Indices of appearances (and of parts, in `editing`) may be Python ints or
integer arrays, concrete or traced (`take_index`), so a ranking or an edit can
be `jit`-ed or `vmap`-ed over them.
"""

from __future__ import annotations

import math
from typing import Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from panda_jax import checks

_HIGHEST = jax.lax.Precision.HIGHEST


def take_index(matrix: jax.typing.ArrayLike, index: jax.typing.ArrayLike, name: str) -> jax.Array:
  """Columns `index` of `matrix` (`[..., r]`), for an index that may be traced.

  Args:
    matrix: `[..., r]`, e.g. the appearances `[c, r_c]` or parts `[(n,) s, r_s]`.
    index: a Python int or an integer array, `[]` or `[t]`, concrete or traced
      (inside `jit` / `vmap`).
    name: the argument's name, for errors.

  Returns:
    `[...]` for a scalar index, `[..., t]` for `[t]` indices.

  Raises:
    ValueError: a concrete index that is not an integer in `[0, r)`, or an
      array index that is not 0-d or 1-d. A traced index cannot be checked:
      one outside `[0, r)` (negative ones included) selects a column of NaNs, so
      a bad index shows as NaN in the result instead of silently selecting
      another column.
  """
  size = matrix.shape[-1]
  if isinstance(index, (bool, np.bool_)) or not (
    isinstance(index, (int, np.integer))
    or jnp.issubdtype(getattr(index, "dtype", np.float32), jnp.integer)
  ):
    raise ValueError(f"{name} must be an integer in [0, {size}) or an integer array, got {index!r}")
  index = jnp.asarray(index)
  if index.ndim > 1:
    raise ValueError(
      f"{name} must be an integer or a 1-d integer array, got shape {tuple(index.shape)}"
    )
  if checks.is_concrete(index):
    values = np.asarray(index)
    if values.size and (values.min() < 0 or values.max() >= size):
      shown = values.tolist()
      raise ValueError(f"{name} must be an integer in [0, {size}), got {shown!r}")
  # Negative indices would wrap around: send them past the end, where the gather fills NaN.
  index = jnp.where(index < 0, size, index)
  return jnp.take(matrix, index, axis=-1, mode="fill", fill_value=jnp.nan)


def feature_grid(features: jax.typing.ArrayLike) -> tuple[int, int]:
  """The spatial grid `(h, w)` of `[n, h, w, c]` features.

  `[n, s, c]` features are read as a square `sqrt(s) x sqrt(s)` grid (row-major,
  as a plain reshape of NHWC); pass NHWC features when the grid is not square.
  """
  if features.ndim == 4:
    return int(features.shape[1]), int(features.shape[2])
  if features.ndim != 3:
    raise ValueError(
      f"features must be [n, s, c] or [n, h, w, c], got shape {tuple(features.shape)}"
    )
  s = int(features.shape[1])
  g = math.isqrt(s)
  if g * g != s:
    raise ValueError(
      f"cannot infer the spatial grid of [n, s={s}, c] features "
      "(s is not a square): pass them as [n, h, w, c]"
    )
  return g, g


def saliency(features: jax.typing.ArrayLike, appearances: jax.typing.ArrayLike) -> jax.Array:
  """Saliency maps `m_ik = a_k^T Z_i` for every sample and concept (Sec. 5.1.2).

  Args:
    features: `[n, h, w, c]` or `[n, s, c]`.
    appearances: A, `[c, r_c]`.

  Returns:
    `[n, s, r_c]`: entry `(i, s, k)` is how much of appearance k is at position
    s of sample i (the coordinates of the channel fibres in the basis A).

  Relies on A having orthonormal columns: only then is `a_k^T z` the amount of
  appearance k in a fibre rather than a mix with its neighbours (`pj.fit`
  reports the drift as `Factors.orthogonality_error` and warns above
  `pj.ORTHOGONALITY_BOUND`).
  """
  z, _ = checks.flatten_features(features)
  checks.check_factors(z.shape, appearances)
  return jnp.einsum("nsc,cr->nsr", z, appearances, precision=_HIGHEST)


def upsample_saliency(
  maps: jax.typing.ArrayLike, grid: tuple[int, int], size: tuple[int, int], method: str = "bilinear"
) -> jax.Array:
  """Resizes `[n, s, r]` saliency maps on a `grid=(h, w)` to image `size=(H, W)`.

  Uses `jax.image.resize` (half-pixel centres); `method` is any of its methods,
  e.g. "bilinear" (default, smooth maps) or "nearest" (the feature cells as
  blocks, the right choice for thresholded masks).

  Returns:
    `[n, H, W, r]`.
  """
  h, w = grid
  if maps.ndim != 3 or maps.shape[1] != h * w:
    raise ValueError(
      f"maps must be [n, s={h * w}, r] for grid {(h, w)}, got shape {tuple(maps.shape)}"
    )
  n, _, r = maps.shape
  big_h, big_w = size
  return jax.image.resize(jnp.reshape(maps, (n, h, w, r)), (n, big_h, big_w, r), method=method)


class ConceptMeanState(NamedTuple):
  """Streamed mean of the saliency maps per concept (mu_k of Sec. 5.1.2)."""

  mean: jax.Array  # [r_c] running mean of m_iks over the samples and positions seen
  count: jax.Array  # [] int32, number of samples seen


def concept_mean_init(rank_c: int) -> ConceptMeanState:
  """Empty statistics for `rank_c` concepts."""
  return ConceptMeanState(mean=jnp.zeros((rank_c,), jnp.float32), count=jnp.zeros((), jnp.int32))


def concept_mean_update(
  state: ConceptMeanState, features: jax.typing.ArrayLike, appearances: jax.typing.ArrayLike
) -> ConceptMeanState:
  """Adds one batch of features `[n, (h, w | s), c]` to the statistics.

  A running mean (not a running sum), so that float32 keeps its precision over
  many batches.
  """
  m = saliency(features, appearances)  # [n, s, r_c]
  if m.shape[2] != state.mean.shape[0]:
    raise ValueError(f"appearances have r_c={m.shape[2]} columns, the state {state.mean.shape[0]}")
  n = m.shape[0]
  count = state.count + n
  batch_mean = jnp.mean(m, axis=(0, 1)).astype(jnp.float32)  # [r_c]
  mean = state.mean + (batch_mean - state.mean) * (n / count).astype(jnp.float32)
  return ConceptMeanState(mean=mean, count=count)


def concept_mean_finalize(state: ConceptMeanState) -> jax.Array:
  """`mu_k = 1/(N S) sum_{n,s} m_nks`, `[r_c]` (Sec. 5.1.2)."""
  if checks.is_concrete(state.count) and int(state.count) == 0:
    raise ValueError("no batch was given to concept_mean_update")
  return state.mean


def concept_means(
  batches: Iterable[jax.typing.ArrayLike], appearances: jax.typing.ArrayLike
) -> jax.Array:
  """mu_k, `[r_c]`, over an iterable of feature batches (streamed)."""
  update = jax.jit(concept_mean_update)
  state = concept_mean_init(int(appearances.shape[1]))
  for batch in batches:
    state = update(state, batch, appearances)
  return concept_mean_finalize(state)


def localise(maps: jax.typing.ArrayLike, mu: jax.typing.ArrayLike) -> jax.Array:
  """Unsupervised localisation masks `[m_iks >= mu_k]` (Sec. 5.1.2, after [14]).

  Args:
    maps: saliency maps with the concepts on the last axis, `[..., r_c]`.
    mu: the concept means `[r_c]` (see `concept_means`).

  Returns:
    boolean masks of the shape of `maps`.
  """
  if mu.ndim != 1 or maps.shape[-1] != mu.shape[0]:
    raise ValueError(f"mu must be [r_c={maps.shape[-1]}], got shape {tuple(mu.shape)}")
  return maps >= jnp.reshape(mu, (1,) * (maps.ndim - 1) + mu.shape)


def rank(
  features: jax.typing.ArrayLike,
  appearances: jax.typing.ArrayLike,
  appearance: jax.typing.ArrayLike,
  part: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  """Amount of concept j per sample: Eq. (17), or Eq. (18) at a part.

  Args:
    features: `[n, h, w, c]` or `[n, s, c]`.
    appearances: A, `[c, r_c]`.
    appearance: j, the column of A: an int or an integer scalar array (may be
      traced, e.g. `jax.vmap` over appearances; see `take_index`).
    part: None for the global score `r_ij = a_j^T Z_i 1` (Eq. 17), or a
      non-negative spatial weight, `[s]` (a column of P, a mask) or `[n, s]` (a
      refined per-sample part), for `r_ijk = a_j^T Z_i p_k` (Eq. 18).

  Returns:
    `[n]` scores.
  """
  z, _ = checks.flatten_features(features)
  checks.check_factors(z.shape, appearances)
  a_j = take_index(appearances, appearance, "appearance")  # [c]
  if a_j.ndim != 1:
    raise ValueError(f"appearance must be one index, got shape {tuple(jnp.shape(appearance))}")
  n, s, _ = z.shape
  m = jnp.einsum("nsc,c->ns", z, a_j, precision=_HIGHEST)  # [n, s]
  if part is None:
    return jnp.sum(m, axis=1)
  part = jnp.asarray(part)
  if part.shape not in ((s,), (n, s)):
    raise ValueError(f"part must be [s={s}] or [n={n}, s={s}], got shape {tuple(part.shape)}")
  if checks.is_concrete(part):
    checks.check_finite(part, "part")
    if np.any(np.asarray(part) < 0):
      raise ValueError("part must be non-negative (Eq. 18)")
  return jnp.sum(m * jnp.reshape(part, (-1, s)), axis=1)


class RankState(NamedTuple):
  """The k highest and k lowest scores seen so far, and their sample indices."""

  top_scores: jax.Array  # [k] descending; -inf where empty
  top_index: jax.Array  # [k] int32 global sample indices; -1 where empty
  bottom_scores: jax.Array  # [k] ascending; +inf where empty
  bottom_index: jax.Array  # [k] int32; -1 where empty
  count: jax.Array  # [] int32, samples seen (the next global index)


class Ranking(NamedTuple):
  """Result of a streamed ranking (numpy arrays of length min(k, samples))."""

  top_index: np.ndarray
  top_scores: np.ndarray
  bottom_index: np.ndarray
  bottom_scores: np.ndarray


def rank_init(k: int) -> RankState:
  """An empty top/bottom-`k` ranking."""
  if not (isinstance(k, (int, np.integer)) and k >= 1):
    raise ValueError(f"k must be a positive integer, got {k!r}")
  empty = -jnp.ones((k,), jnp.int32)
  return RankState(
    top_scores=jnp.full((k,), -jnp.inf, jnp.float32),
    top_index=empty,
    bottom_scores=jnp.full((k,), jnp.inf, jnp.float32),
    bottom_index=empty,
    count=jnp.zeros((), jnp.int32),
  )


def _merge_top(
  scores: jax.Array, index: jax.Array, new_scores: jax.Array, new_index: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """The k largest of the union; earlier samples win ties."""
  k = scores.shape[0]
  all_scores = jnp.concatenate([scores, new_scores])
  all_index = jnp.concatenate([index, new_index])
  top, pos = jax.lax.top_k(all_scores, k)
  return top, all_index[pos]


def rank_update(state: RankState, scores: jax.Array) -> RankState:
  """Adds the `[b]` scores of the next batch (samples `count .. count + b - 1`)."""
  if scores.ndim != 1:
    raise ValueError(f"scores must be [b], got shape {tuple(scores.shape)}")
  scores = scores.astype(jnp.float32)
  index = state.count + jnp.arange(scores.shape[0], dtype=jnp.int32)
  top, top_index = _merge_top(state.top_scores, state.top_index, scores, index)
  neg_bottom, bottom_index = _merge_top(-state.bottom_scores, state.bottom_index, -scores, index)
  return RankState(
    top_scores=top,
    top_index=top_index,
    bottom_scores=-neg_bottom,
    bottom_index=bottom_index,
    count=state.count + scores.shape[0],
  )


def rank_finalize(state: RankState) -> Ranking:
  """Top (descending) and bottom (ascending) sample indices and scores."""
  k = min(int(state.top_index.shape[0]), int(state.count))
  return Ranking(
    top_index=np.asarray(state.top_index)[:k],
    top_scores=np.asarray(state.top_scores)[:k],
    bottom_index=np.asarray(state.bottom_index)[:k],
    bottom_scores=np.asarray(state.bottom_scores)[:k],
  )


def rank_dataset(
  batches: Iterable[jax.typing.ArrayLike],
  appearances: jax.typing.ArrayLike,
  appearance: jax.typing.ArrayLike,
  part: jax.typing.ArrayLike | None = None,
  *,
  k: int = 10,
) -> Ranking:
  """Streams `rank` (Eq. 17 / 18) over feature batches; the top and bottom `k`.

  Sample indices count the samples in the order the batches come.
  """
  update = jax.jit(rank_update)
  state = rank_init(k)
  for batch in batches:
    state = update(state, rank(batch, appearances, appearance, part))
  return rank_finalize(state)
