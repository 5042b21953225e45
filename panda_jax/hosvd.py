"""HOSVD initialisation of the appearances (paper Section 3.4, Algorithm 1).

`A^(1)` = the top-`r_c` left singular vectors of `Z_(2) Z_(2)^T`, the `[c, c]`
channel scatter summed over the whole dataset. The scatter is accumulated one
batch at a time (`scatter_init` / `scatter_update` / `scatter_finalize`), so the
dataset is never held in memory at once.
"""

from __future__ import annotations

from typing import Iterable

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from panda_jax import checks


def scatter_init(num_channels: int, dtype: jax.typing.DTypeLike = jnp.float32) -> jax.Array:
  """An empty `[c, c]` channel scatter."""
  return jnp.zeros((num_channels, num_channels), dtype)


def unfolded_scatter(z: jax.Array) -> jax.Array:
  """`sum_i Z_i(3) Z_i(3)^T` of mode-3 unfoldings `[n, c, s]`: `[c, c]`."""
  return jnp.einsum("ncs,nds->cd", z, z)


@jax.jit
def _accumulate(scatter: jax.Array, features: jax.typing.ArrayLike) -> jax.Array:
  z, _ = checks.flatten_features(features)
  flat = jnp.reshape(z, (-1, z.shape[-1]))  # [n*s, c]: one GEMM, no per-sample [c, c].
  return scatter + flat.T @ flat


def scatter_update(scatter: jax.Array, features: jax.typing.ArrayLike) -> jax.Array:
  """Adds `sum_i Z_i(3) Z_i(3)^T` of a batch (`[n, s, c]` or `[n, h, w, c]`)."""
  if features.shape[-1] != scatter.shape[0]:
    raise ValueError(f"batch has {features.shape[-1]} channels, the scatter {scatter.shape[0]}")
  checks.flatten_features(features)
  checks.check_finite(features, "features")
  return _accumulate(scatter, features)


def scatter_finalize(scatter: jax.Array, rank_c: int) -> jax.Array:
  """Top-`r_c` eigenvectors of the scatter, `[c, r_c]`, in decreasing order.

  Signs are fixed (largest-magnitude entry of each column positive) so that the
  result does not depend on how the scatter was summed.
  """
  c = scatter.shape[0]
  if not (isinstance(rank_c, (int, np.integer)) and 1 <= rank_c <= c):
    raise ValueError(f"rank_c must be an integer in [1, c={c}], got {rank_c!r}")
  _, vectors = jnp.linalg.eigh(scatter)
  top = vectors[:, ::-1][:, :rank_c]
  pivot = jnp.take_along_axis(top, jnp.argmax(jnp.abs(top), axis=0)[None], axis=0)
  return top * jnp.sign(pivot)


def hosvd_init(
  features_or_batches: jax.typing.ArrayLike | Iterable[jax.typing.ArrayLike], rank_c: int
) -> jax.Array:
  """`A^(1)`: top-`r_c` left singular vectors of the channel scatter.

  In a run of several processes each passes its own samples: the `[c, c]`
  scatters are summed over the processes (the only data exchanged).

  Args:
    features_or_batches: one `[n, s, c]` / `[n, h, w, c]` array, or an iterable
      of such batches (streamed: each batch is added to the scatter and dropped).
    rank_c: number of appearances `r_c <= c`.

  Returns:
    `[c, r_c]` with orthonormal columns.
  """
  batches = [features_or_batches] if hasattr(features_or_batches, "shape") else features_or_batches
  scatter = None
  for batch in batches:
    batch = jnp.asarray(batch)
    if scatter is None:
      scatter = scatter_init(batch.shape[-1], batch.dtype)
    scatter = scatter_update(scatter, batch)
  if scatter is None:
    raise ValueError("hosvd_init got no batches (empty iterable)")
  if jax.process_count() > 1:
    scatter = jnp.sum(multihost_utils.process_allgather(scatter), axis=0)
  return scatter_finalize(scatter, rank_c)
