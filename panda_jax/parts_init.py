"""Initialisations of the parts factor `P` (`[s, r_s]`).

* `uniform`: the paper's `P^(1) ~ U(0, 0.01)` (Algorithm 1).
* `kmeans`: the k-means reading of the parts subproblem (Section 4.1). Eq. (9)
  is a regularised k-means over the positions with affinity
  `W = sum_i (A^T Z_i)^T (A^T Z_i)`, i.e. over position descriptors that stack
  every sample's fibre in the appearance basis. We embed the positions with the
  top eigenvectors of `W` (subspace iteration, `W` applied as
  `sum_i Z_i^T A (A^T (Z_i Q))`, never formed), run k-means++ with Lloyd
  iterations from several seeds, keep the lowest inertia, and start from the
  orthonormal cluster indicator (`1 / sqrt(|cluster|)` on its positions).
  Projected gradient from `U(0, 0.01)` stalls in poor local minima of the
  quartic objective (matched IoU about 0.75 on planted parts); this start sits
  in the basin of the planted solution.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from panda_jax import objective

Reduce = Callable[[jax.Array], jax.Array]


def _no_reduce(x):
  return x


def uniform(key, num_positions: int, rank_s: int, scale: float = 0.01) -> jax.Array:
  """The paper's start, `U(0, scale)`, `[s, r_s]`."""
  return jax.random.uniform(key, (num_positions, rank_s), maxval=scale)


def apply_affinity(z, appearances, q, reduce: Reduce = _no_reduce) -> jax.Array:
  """`W q = sum_i Z_i^T A A^T Z_i q` for `q` `[s, k]`, without forming `W` `[s, s]`."""
  zq = objective.project_parts(z, q)                                   # [n, c, k]
  back = jnp.einsum("cr,dr,ndk->nck", appearances, appearances, zq)    # A A^T Z_i q
  return reduce(jnp.einsum("ncs,nkc->nks", z, jnp.swapaxes(back, 1, 2)).sum(0).T)


def position_embedding(z, appearances, dim: int, key, iterations: int = 12,
                       reduce: Reduce = _no_reduce) -> jax.Array:
  """Rows of `Q diag(sqrt(eig))` for the top-`dim` eigenpairs of `W`: `[s, dim]`.

  Inner products of the rows approximate `W`, so Euclidean k-means on them
  approximates kernel k-means with kernel `W`.
  """
  s = z.shape[2]
  q = jax.random.normal(key, (s, dim), z.dtype)

  def power(q, _):
    q, _ = jnp.linalg.qr(apply_affinity(z, appearances, q, reduce))
    return q, None

  q, _ = jax.lax.scan(power, jnp.linalg.qr(q)[0], None, length=iterations)
  ritz = q.T @ apply_affinity(z, appearances, q, reduce)
  values, vectors = jnp.linalg.eigh(0.5 * (ritz + ritz.T))
  return (q @ vectors) * jnp.sqrt(jnp.maximum(values, 0.0))


def _sq_distances(points, centres):
  """`[s, k]` squared Euclidean distances."""
  return (jnp.sum(points**2, 1)[:, None] - 2.0 * points @ centres.T
          + jnp.sum(centres**2, 1)[None, :])


def _kmeans_pp(key, points, k: int):
  """k-means++ seeding: `[k, d]` centres drawn with probability ~ D(x)^2."""
  keys = jax.random.split(key, k)
  first = points[jax.random.randint(keys[0], (), 0, points.shape[0])]
  centres = jnp.zeros((k, points.shape[1]), points.dtype).at[0].set(first)
  nearest = jnp.sum((points - first) ** 2, 1)

  def pick(carry, i):
    centres, nearest = carry
    logits = jnp.log(jnp.maximum(nearest, 1e-30))
    centre = points[jax.random.categorical(keys[i], logits)]
    nearest = jnp.minimum(nearest, jnp.sum((points - centre) ** 2, 1))
    return (centres.at[i].set(centre), nearest), None

  (centres, _), _ = jax.lax.scan(pick, (centres, nearest), jnp.arange(1, k))
  return centres


def _lloyd(points, centres, iterations: int):
  """Lloyd iterations; an emptied cluster restarts at the worst-served point."""
  k = centres.shape[0]

  def body(centres, _):
    dist = _sq_distances(points, centres)
    labels = jnp.argmin(dist, 1)
    one_hot = jax.nn.one_hot(labels, k, dtype=points.dtype)
    counts = one_hot.sum(0)
    means = (one_hot.T @ points) / jnp.maximum(counts, 1.0)[:, None]
    worst = points[jnp.argmax(jnp.min(dist, 1))]
    centres = jnp.where((counts > 0)[:, None], means, worst[None])
    return centres, None

  centres, _ = jax.lax.scan(body, centres, None, length=iterations)
  dist = _sq_distances(points, centres)
  return jnp.argmin(dist, 1), jnp.sum(jnp.min(dist, 1))


def kmeans(key, z, appearances, rank_s: int, *, restarts: int = 8, iterations: int = 30,
           embed_dim: int | None = None, reduce: Reduce = _no_reduce) -> jax.Array:
  """k-means++ start in the appearance basis (Section 4.1): `[s, r_s]`, orthonormal columns.

  Args:
    key: PRNG key.
    z: features `[n, c, s]` (this device's shard when `reduce` is a `psum`).
    appearances: `A`, `[c, r_c]`.
    rank_s: number of parts.
    restarts: k-means++ seeds; the lowest inertia wins.
    iterations: Lloyd iterations per seed.
    embed_dim: embedding width (default `min(s, 2 r_s + 8)`).
    reduce: the sum over all samples of all devices (identity on one device).
  """
  s = z.shape[2]
  dim = min(s, embed_dim or 2 * rank_s + 8)
  embed_key, seed_key = jax.random.split(key)
  points = position_embedding(z, appearances, dim, embed_key, reduce=reduce)

  def run(key):
    return _lloyd(points, _kmeans_pp(key, points, rank_s), iterations)

  labels, inertia = jax.vmap(run)(jax.random.split(seed_key, restarts))
  labels = labels[jnp.argmin(inertia)]
  indicator = jax.nn.one_hot(labels, rank_s, dtype=z.dtype)
  return indicator / jnp.sqrt(jnp.maximum(indicator.sum(0), 1.0))
