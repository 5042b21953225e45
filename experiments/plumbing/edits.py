"""What the editing launchers share: the strength of an edit and its locality record."""

from __future__ import annotations

import jax.numpy as jnp

from panda_jax import metrics


def fibre_scale(features) -> float:
  """The mean norm of a channel fibre of `features` `[n, h, w, c]`: the unit of a relative alpha."""
  return float(jnp.mean(jnp.linalg.norm(features, axis=-1)))


def absolute_alpha(config, features, alpha: float) -> float:
  """`alpha` times the mean channel-fibre norm of `features` under --relative_alpha."""
  if not config.relative_alpha:
    return float(alpha)
  return float(alpha) * fibre_scale(features)


def roir(originals, edited, masks) -> dict:
  """`{"roir_mean", "roir_std"}`: ROIR (Eq. 13) of an edit of RGB images inside `masks`
  `[n, H, W]`."""
  mean, std = metrics.roir(jnp.asarray(originals), jnp.asarray(edited), jnp.asarray(masks))
  return {"roir_mean": float(mean), "roir_std": float(std)}
