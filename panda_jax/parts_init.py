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


def _no_reduce(x: jax.Array) -> jax.Array:
  return x


def uniform(key: jax.Array, num_positions: int, rank_s: int, scale: float = 0.01) -> jax.Array:
  """The paper's start, `U(0, scale)`, `[s, r_s]`."""
  return jax.random.uniform(key, (num_positions, rank_s), maxval=scale)


def apply_affinity(
  z: jax.Array, appearances: jax.Array, q: jax.Array, reduce: Reduce = _no_reduce
) -> jax.Array:
  """`W q = sum_i Z_i^T A A^T Z_i q` for `q` `[s, k]`, without forming `W` `[s, s]`."""
  zq = objective.project_parts(z, q)  # [n, c, k]
  back = objective.decode(objective.coefficients(zq, appearances), appearances)  # A A^T Z_i q
  return reduce(objective.positions_product(z, back))


def position_embedding(
  z: jax.Array,
  appearances: jax.Array,
  dim: int,
  key: jax.Array,
  iterations: int = 12,
  reduce: Reduce = _no_reduce,
) -> jax.Array:
  """Rows of `Q diag(sqrt(eig))` for the top-`dim` eigenpairs of `W`: `[s, dim]`.

  Inner products of the rows approximate `W`, so Euclidean k-means on them
  approximates kernel k-means with kernel `W`.
  """
  s = z.shape[2]
  q = jax.random.normal(key, (s, dim), z.dtype)

  def power(q: jax.Array, _: None) -> tuple[jax.Array, None]:
    q, _ = jnp.linalg.qr(apply_affinity(z, appearances, q, reduce))
    return q, None

  q, _ = jax.lax.scan(power, jnp.linalg.qr(q)[0], None, length=iterations)
  ritz = q.T @ apply_affinity(z, appearances, q, reduce)
  values, vectors = jnp.linalg.eigh(0.5 * (ritz + ritz.T))
  return (q @ vectors) * jnp.sqrt(jnp.maximum(values, 0.0))


def _sq_distances(points: jax.Array, centres: jax.Array) -> jax.Array:
  """`[s, k]` squared Euclidean distances."""
  return jnp.sum(points**2, 1)[:, None] - 2.0 * points @ centres.T + jnp.sum(centres**2, 1)[None, :]


def _kmeans_pp(
  key: jax.Array, points: jax.Array, k: int, weights: jax.Array | None = None
) -> jax.Array:
  """k-means++ seeding: `[k, d]` centres drawn with probability ~ w(x) D(x)^2."""
  keys = jax.random.split(key, k)
  if weights is None:
    first = points[jax.random.randint(keys[0], (), 0, points.shape[0])]
  else:
    first = points[jax.random.categorical(keys[0], jnp.log(jnp.maximum(weights, 1e-30)))]
  centres = jnp.zeros((k, points.shape[1]), points.dtype).at[0].set(first)
  nearest = jnp.sum((points - first) ** 2, 1)
  if weights is not None:
    nearest = nearest * weights

  def pick(
    carry: tuple[jax.Array, jax.Array], i: jax.Array
  ) -> tuple[tuple[jax.Array, jax.Array], None]:
    centres, nearest = carry
    logits = jnp.log(jnp.maximum(nearest, 1e-30))
    centre = points[jax.random.categorical(keys[i], logits)]
    moved = jnp.sum((points - centre) ** 2, 1)
    nearest = jnp.minimum(nearest, moved if weights is None else moved * weights)
    return (centres.at[i].set(centre), nearest), None

  (centres, _), _ = jax.lax.scan(pick, (centres, nearest), jnp.arange(1, k))
  return centres


def _lloyd(
  points: jax.Array,
  centres: jax.Array,
  iterations: int,
  *,
  weights: jax.Array | None = None,
  reduce: Reduce = _no_reduce,
) -> tuple[jax.Array, jax.Array]:
  """Lloyd iterations: `(labels [m], inertia)`, sums over every shard by `reduce`.

  `weights` `[m]` (default ones) weight each point in the means and the inertia.
  An emptied cluster restarts at the worst-served point on one shard
  (`reduce` the identity); over shards it keeps its centre, which every shard
  holds alike.
  """
  k = centres.shape[0]
  weights = jnp.ones(points.shape[:1], points.dtype) if weights is None else weights

  def body(centres: jax.Array, _: None) -> tuple[jax.Array, None]:
    dist = _sq_distances(points, centres)
    one_hot = jax.nn.one_hot(jnp.argmin(dist, 1), k, dtype=points.dtype) * weights[:, None]
    counts = reduce(one_hot.sum(0))
    means = reduce(one_hot.T @ points) / jnp.maximum(counts, 1.0)[:, None]
    if reduce is _no_reduce:
      refill = points[jnp.argmax(jnp.min(dist, 1) * weights)][None]
    else:
      refill = centres
    return jnp.where((counts > 0)[:, None], means, refill), None

  centres, _ = jax.lax.scan(body, centres, None, length=iterations)
  dist = _sq_distances(points, centres)
  return jnp.argmin(dist, 1), reduce(jnp.sum(jnp.min(dist, 1) * weights))


def kmeans(
  key: jax.Array,
  z: jax.Array,
  appearances: jax.Array,
  rank_s: int,
  *,
  restarts: int = 8,
  iterations: int = 30,
  embed_dim: int | None = None,
  reduce: Reduce = _no_reduce,
) -> jax.Array:
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

  def run(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    return _lloyd(points, _kmeans_pp(key, points, rank_s), iterations)

  labels, inertia = jax.vmap(run)(jax.random.split(seed_key, restarts))
  labels = labels[jnp.argmin(inertia)]
  indicator = jax.nn.one_hot(labels, rank_s, dtype=z.dtype)
  return indicator / jnp.sqrt(jnp.maximum(indicator.sum(0), 1.0))


def fibres(
  key: jax.Array,
  z: jax.Array,
  rank_s: int,
  *,
  restarts: int = 4,
  iterations: int = 30,
  seed_points: int = 8192,
  reduce: Reduce = _no_reduce,
  gather: Reduce = _no_reduce,
) -> jax.Array:
  """Where each kind of channel fibre lives: `[s, r_s]`, unit-norm columns.

  Every channel fibre `z_i[:, x]` of every sample is a point in `R^c`; k-means
  (k-means++ on a subsample, then Lloyd over all fibres, `restarts` seeds, the
  lowest inertia wins) sorts them into `r_s` kinds, and part k is the fraction
  of samples whose fibre at position x is of kind k. Unlike the position
  k-means of `kmeans` (positions compared by their fibres across samples, so
  by what every sample has there, padding artefacts and left/right background
  colours included), this groups positions by what *kind* of content sits
  there, which on a real DCGAN (WORKSPACE.md, "Parts on a real GAN") is what
  keeps the background ring and the mouth as parts.

  Args:
    key: PRNG key.
    z: features `[n, c, s]` (this shard's; all-zero samples are padding and
      are ignored).
    rank_s: number of parts (kinds of fibre).
    restarts, iterations: k-means seeds and Lloyd iterations per seed.
    seed_points: fibres (over all shards) that k-means++ seeds from.
    reduce: the sum over all shards (identity on one device).
    gather: concatenation over shards along axis 0 (identity on one device).
  """
  n, c, s = z.shape
  points = jnp.swapaxes(z, 1, 2).reshape(n * s, c)  # [n s, c] fibres.
  valid = jnp.any(z != 0, axis=(1, 2)).astype(z.dtype)  # [n]: not padding.
  weights = jnp.repeat(valid, s)
  stride = max(1, (n * s) // seed_points)
  seeds = gather(points[::stride])
  seed_weights = gather(weights[::stride])
  seed_key, _ = jax.random.split(key)

  def run(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    centres = _kmeans_pp(key, seeds, rank_s, weights=seed_weights)
    return _lloyd(points, centres, iterations, weights=weights, reduce=reduce)

  labels, inertia = jax.vmap(run)(jax.random.split(seed_key, restarts))
  labels = labels[jnp.argmin(inertia)].reshape(n, s)
  kinds = jax.nn.one_hot(labels, rank_s, dtype=z.dtype) * valid[:, None, None]
  share = reduce(kinds.sum(0)) / jnp.maximum(reduce(valid.sum()), 1.0)  # [s, r_s]
  return share / jnp.maximum(jnp.linalg.norm(share, axis=0, keepdims=True), 1e-30)
