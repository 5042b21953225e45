"""Input validation shared by the public functions.

Every check runs on shapes (static under `jit`) or, for value checks, on concrete
arrays only, so that it raises a clear `ValueError` before any compilation and is
skipped (not silently wrong) when called with tracers.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x: Any) -> bool:
  """True when `x` holds values (not a tracer inside `jit`/`vmap`/`grad`)."""
  return not isinstance(x, jax.core.Tracer)


def flatten_features(
  features: jax.typing.ArrayLike, name: str = "features"
) -> tuple[jax.Array | np.ndarray, Unflatten]:
  """Views `[n, h, w, c]` or `[n, s, c]` features as `[n, s, c]`.

  Returns:
    `(z, unflatten)`: `z` is `[n, s, c]`; `unflatten(y)` gives an `[n, s, ...]`
    array back the caller's layout (`[n, h, w, ...]` when the input was 4-D).
  """
  if not hasattr(features, "shape"):
    features = jnp.asarray(features)
  if features.ndim == 4:
    n, h, w, c = features.shape
    return (
      jnp.reshape(features, (n, h * w, c)),
      lambda y: jnp.reshape(y, (n, h, w) + tuple(y.shape[2:])),
    )
  if features.ndim == 3:
    return features, lambda y: y
  raise ValueError(f"{name} must be [n, s, c] or [n, h, w, c], got shape {tuple(features.shape)}")


@jax.jit
def _count_non_finite(x: jax.Array) -> jax.Array:
  # Counted where the array lives (sharded arrays: on every device); only the count
  # reaches the host. float32 above 2^31 elements: the count is for the message.
  dtype = jnp.int32 if x.size < 2**31 else jnp.float32
  return jnp.sum(jnp.logical_not(jnp.isfinite(x)), dtype=dtype)


def check_finite(x: jax.typing.ArrayLike, name: str) -> None:
  """Raises if a concrete array holds NaN or Inf (no-op on tracers).

  A NumPy array is checked on the host, a `jax.Array` on its device(s): the
  features are never copied to the host for this.
  """
  if not is_concrete(x):
    return
  if isinstance(x, jax.Array):
    bad = int(_count_non_finite(x))
  else:
    finite = np.isfinite(np.asarray(x))
    bad = int(finite.size - finite.sum())
  if bad:
    raise ValueError(f"{name} contains {bad} non-finite value(s) (NaN or Inf)")


def check_factors(
  z_shape: tuple[int, ...],
  appearances: jax.typing.ArrayLike,
  parts: jax.typing.ArrayLike | None = None,
) -> None:
  """Checks `[c, r_c]` appearances and `[s, r_s]` parts against `[n, s, c]` features."""
  _, s, c = z_shape
  if appearances.ndim != 2 or appearances.shape[0] != c:
    raise ValueError(f"appearances must be [c={c}, r_c], got shape {tuple(appearances.shape)}")
  if parts is not None and (parts.ndim != 2 or parts.shape[0] != s):
    raise ValueError(f"parts must be [s={s}, r_s], got shape {tuple(parts.shape)}")


def check_ranks(s: int, c: int, rank_c: int, rank_s: int) -> None:
  """Ranks must be positive integers no larger than the mode they compress."""
  if not (isinstance(rank_c, (int, np.integer)) and 1 <= rank_c <= c):
    raise ValueError(f"rank_c must be an integer in [1, c={c}], got {rank_c!r}")
  if not (isinstance(rank_s, (int, np.integer)) and 1 <= rank_s <= s):
    raise ValueError(f"rank_s must be an integer in [1, s={s}], got {rank_s!r}")


def check_index(index: Any, size: int, name: str) -> None:
  """A Python integer index in [0, size)."""
  if not (isinstance(index, (int, np.integer)) and 0 <= index < size):
    raise ValueError(f"{name} must be an integer in [0, {size}), got {index!r}")


Unflatten = Callable[[jax.Array], jax.Array]
