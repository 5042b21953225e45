"""k-means of the activations: parts without any factorisation (issue 17's baseline).

The channel fibres `z_is [c]` of feature maps `[n, h, w, c]` are clustered
(Euclidean k-means, k-means++ seeding and Lloyd iterations of
`parts_init`, the lowest-inertia restart kept); the indicator of each cluster
is a part. Three variants:

  * `per_sample`: every sample's `s = h w` fibres clustered on their own,
    `[n, s, k]` indicators. Cluster indices are arbitrary per sample, so the
    same index names different things in different samples: score it with
    `parts_eval.best_region_part_iou(match="per_sample")` (each sample's best
    cluster per region, an optimistic score since the ground truth picks it).
  * `fit_pooled` + `assign`: one k-means over the fibres of every training
    sample; any sample's fibres then take the label of their nearest centre,
    so indices are consistent across samples and the part of a region is
    chosen once (`match="global"`), exactly as for PandA's parts. The fairer,
    and stronger, baseline.
  * `frequency_parts`: global parts `[s, k]`, the frequency of each pooled
    cluster at each position over samples (what a global part can be made of
    k-means alone).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from panda_jax import parts_init


def _fibres(features):
  """`[n, h, w, c]` or `[n, s, c]` -> float32 `[n, s, c]`."""
  features = jnp.asarray(features, jnp.float32)
  if features.ndim == 4:
    features = jnp.reshape(features, (features.shape[0], -1, features.shape[-1]))
  if features.ndim != 3:
    raise ValueError(
      f"features must be [n, h, w, c] or [n, s, c], got shape {tuple(features.shape)}"
    )
  return features


def _check(k: int, num_points: int, restarts: int, iterations: int) -> None:
  if not 1 <= k <= num_points:
    raise ValueError(f"k must be in [1, {num_points}] (the points to cluster), got {k}")
  if restarts < 1 or iterations < 0:
    raise ValueError(f"need restarts >= 1 and iterations >= 0, got {restarts}, {iterations}")


def _kmeans(key, points, k: int, restarts: int, iterations: int):
  """`(labels [m], inertia)` of the best of `restarts` k-means++ / Lloyd runs on `[m, d]`."""

  def run(key):
    centres = parts_init._kmeans_pp(key, points, k)  # pylint: disable=protected-access
    return parts_init._lloyd(points, centres, iterations)  # pylint: disable=protected-access

  labels, inertia = jax.vmap(run)(jax.random.split(key, restarts))
  best = jnp.argmin(inertia)
  return labels[best], inertia[best]


@functools.partial(jax.jit, static_argnames=("k", "restarts", "iterations"))
def _per_sample_labels(keys, z, *, k: int, restarts: int, iterations: int):
  # lax.map, not vmap: the same run time here, half the compilation time.
  return jax.lax.map(lambda a: _kmeans(a[0], a[1], k, restarts, iterations)[0], (keys, z))


@functools.partial(jax.jit, static_argnames=("k", "restarts", "iterations"))
def _pooled(key, points, *, k: int, restarts: int, iterations: int):
  labels, inertia = _kmeans(key, points, k, restarts, iterations)
  return centres_of(points, labels, k), inertia


def centres_of(points, labels, k: int):
  """`[k, d]` mean of the points of each label (0 for an empty one)."""
  one_hot = jax.nn.one_hot(labels, k, dtype=points.dtype)  # [m, k]
  return (one_hot.T @ points) / jnp.maximum(one_hot.sum(0), 1.0)[:, None]


def per_sample(key, features, k: int, *, restarts: int = 4, iterations: int = 30):
  """Each sample's fibres clustered alone: indicator parts `[n, s, k]` (float32 0/1).

  Args:
    key: PRNG key (sample i uses `fold_in(key, i)`).
    features: `[n, h, w, c]` or `[n, s, c]`.
    k: clusters per sample, `1 <= k <= s`.
  """
  z = _fibres(features)
  _check(k, z.shape[1], restarts, iterations)
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(z.shape[0]))
  labels = _per_sample_labels(keys, z, k=k, restarts=restarts, iterations=iterations)
  return jax.nn.one_hot(labels, k, dtype=jnp.float32)


def fit_pooled(key, features, k: int, *, restarts: int = 4, iterations: int = 30):
  """One k-means over the fibres of all samples: `(centres [k, c], inertia)`."""
  z = _fibres(features)
  points = jnp.reshape(z, (-1, z.shape[-1]))
  _check(k, points.shape[0], restarts, iterations)
  return _pooled(key, points, k=k, restarts=restarts, iterations=iterations)


def assign(features, centres):
  """Indicator parts `[n, s, k]` of the nearest centre of every fibre (consistent labels)."""
  z = _fibres(features)
  centres = jnp.asarray(centres, jnp.float32)
  if centres.ndim != 2 or centres.shape[1] != z.shape[-1]:
    raise ValueError(f"centres must be [k, c={z.shape[-1]}], got shape {tuple(centres.shape)}")
  dist = jnp.sum(centres**2, 1)[None, None, :] - 2.0 * jnp.einsum(
    "nsc,kc->nsk", z, centres
  )  # [n, s, k] + const
  return jax.nn.one_hot(jnp.argmin(dist, axis=-1), centres.shape[0], dtype=jnp.float32)


def frequency_parts(indicators):
  """Global parts `[s, k]`: how often each cluster holds each position, over `[n, s, k]`."""
  indicators = jnp.asarray(indicators, jnp.float32)
  if indicators.ndim != 3:
    raise ValueError(f"indicators must be [n, s, k], got shape {tuple(indicators.shape)}")
  return jnp.mean(indicators, axis=0)
