"""The locality metric ROIR (paper Section 5.2.1, Eq. 13)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from panda_jax import checks


def roir_per_sample(
  originals: jax.typing.ArrayLike, edits: jax.typing.ArrayLike, masks: jax.typing.ArrayLike
) -> jax.Array:
  """Per-sample ratio `||(1 - M) * (X_i - X'_i)|| / ||M * (X_i - X'_i)||`.

  The summand of Eq. (13), with Frobenius norms over `[H, W, ch]` and the
  spatial mask replicated along the channels. An edit that changes nothing in
  the ROI gives `inf` (or NaN when it changes nothing at all), as the formula.

  Args:
    originals: X, `[n, H, W, ch]`.
    edits: X', `[n, H, W, ch]`.
    masks: M, the regions of interest in [0, 1], `[n, H, W]` (or `[H, W]`
      shared by all samples).

  Returns:
    `[n]` ratios (small = local edit).
  """
  if originals.ndim != 4 or edits.shape != originals.shape:
    raise ValueError(
      f"originals and edits must both be [n, H, W, ch], got "
      f"{tuple(originals.shape)} and {tuple(edits.shape)}"
    )
  n, big_h, big_w, _ = originals.shape
  if masks.shape not in ((n, big_h, big_w), (big_h, big_w)):
    raise ValueError(
      f"masks must be [n={n}, H={big_h}, W={big_w}] or [H, W], got shape {tuple(masks.shape)}"
    )
  if checks.is_concrete(masks):
    checks.check_finite(masks, "masks")
    values = np.asarray(masks)
    if values.min() < 0 or values.max() > 1:
      raise ValueError("mask values must lie in [0, 1]")
  inside, outside = masked_norms(originals, edits, masks)
  return jnp.sqrt(outside) / jnp.sqrt(inside)


def masked_norms(
  originals: jax.typing.ArrayLike, edits: jax.typing.ArrayLike, masks: jax.typing.ArrayLike
) -> tuple[jax.Array, jax.Array]:
  """The two norms of Eq. (13), squared: `(||M * (X - X')||^2, ||(1 - M) * (X - X')||^2)`.

  Args:
    originals, edits: `[n, H, W, ch]`.
    masks: `[n, H, W]` or `[H, W]` in [0, 1], replicated along the channels.

  Returns:
    `(inside [n], outside [n])`.
  """
  big_h, big_w = originals.shape[1:3]
  m = jnp.reshape(masks, (-1, big_h, big_w, 1)).astype(originals.dtype)
  diff = originals - edits  # [n, H, W, ch]
  inside = jnp.sum(jnp.square(m * diff), axis=(1, 2, 3))
  outside = jnp.sum(jnp.square((1 - m) * diff), axis=(1, 2, 3))
  return inside, outside


def roir(
  originals: jax.typing.ArrayLike, edits: jax.typing.ArrayLike, masks: jax.typing.ArrayLike
) -> tuple[jax.Array, jax.Array]:
  """ROIR (Eq. 13): mean and standard deviation over samples of the ratios.

  See `roir_per_sample`. The standard deviation is the population one
  (`ddof=0`); the paper's Table 2 reports "mean +- std" without saying which.

  Returns:
    `(mean, std)` scalars.
  """
  ratios = roir_per_sample(originals, edits, masks)
  return jnp.mean(ratios), jnp.std(ratios)
