"""Per-sample refinement of the parts (paper Section 4.2, Eqs. 10-12, Algorithm 2).

For one sample, `P~_i >= 0` (`[s, r_s]`, started at the global parts) descends

    L_G = -2 tr(P~^T W_i P~) + tr(P~ P~^T W_i P~ P~^T)                  (Eq. 10)
    dL_G = 2 P~ (P~^T W_i P~) + 2 (W_i P~)(P~^T P~) - 4 W_i P~            (Eq. 11)

which needs `W_i` only through `W_i P~` (`[s, r_s]`). Two affinities:

* `k=None`, the full Gram matrix `W_i = X_i^T X_i` with `X_i = A^T Z_i(3)`:
  `W_i P~ = X_i^T (X_i P~)`, the low-rank form of Eq. (12), O(s r_c r_s).
* integer `k`, the mutual-kNN graph of Algorithm 2: `w_jl = x_j . x_l` when
  fibres j and l (in the appearance basis, Euclidean distance) are each among
  the other's k nearest neighbours, else 0. Stored sparsely as `[s, k + 1]`
  neighbour indices and weights (column 0 is the position itself: the diagonal
  of the Gram matrix is kept, so `k = s - 1` gives back the full Gram matrix, as
  the paper states); `W_i P~` is a gather, O(s k r_s). No `[s, s]` matrix in
  either path.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from panda_jax import _checks, pgd

_MAX_GRAPH_POSITIONS = 65535  # Edge keys j * s + l must fit in uint32.


class Graph(NamedTuple):
  """Sparse symmetric affinity of one sample.

  neighbours: int32 `[s, k + 1]`; column 0 is the position itself.
  weights: `[s, k + 1]`, `x_j . x_l` on mutual edges (and the diagonal), else 0.
  """
  neighbours: jax.Array
  weights: jax.Array


def _knn(x: jax.Array, k: int, block: int = 256) -> jax.Array:
  """Indices of the k nearest other rows of `x` (`[s, d]`), `[s, k]`, row blocks at a time."""
  s = x.shape[0]
  sq = jnp.sum(x * x, axis=1)

  def row(args):  # lax.map vmaps this over `block` rows at a time: [block, s] distances.
    xj, j = args
    dist = sq - 2.0 * x @ xj                            # |x_j|^2 is constant along the row.
    return jax.lax.top_k(-jnp.where(jnp.arange(s) == j, jnp.inf, dist), k)[1]

  return jax.lax.map(row, (x, jnp.arange(s)), batch_size=min(block, s))


def mutual_knn_graph(x: jax.Array, k: int) -> Graph:
  """Algorithm 2's `G * (X^T X)` for one sample, sparse.

  Args:
    x: fibres in the appearance basis, `[s, r_c]` (rows of `(A^T Z_i(3))^T`).
    k: neighbours per position, `1 <= k <= s - 1`.
  """
  s = x.shape[0]
  neighbours = _knn(x, k).astype(jnp.int32)                          # [s, k]
  rows = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[:, None], neighbours.shape)
  forward = (rows.astype(jnp.uint32) * s + neighbours.astype(jnp.uint32)).ravel()
  backward = (neighbours.astype(jnp.uint32) * s + rows.astype(jnp.uint32)).ravel()
  present = jnp.sort(forward)
  where = jnp.clip(jnp.searchsorted(present, backward), 0, present.size - 1)
  mutual = (present[where] == backward).reshape(neighbours.shape)
  weights = jnp.where(mutual, jnp.einsum("sd,skd->sk", x, x[neighbours]), 0.0)
  self_weight = jnp.sum(x * x, axis=1, keepdims=True)
  return Graph(jnp.concatenate([rows[:, :1], neighbours], 1),
               jnp.concatenate([self_weight, weights], 1))


def graph_matvec(graph: Graph, p: jax.Array) -> jax.Array:
  """`W P~` for a sparse graph: `[s, r_s]`."""
  return jnp.einsum("sk,skr->sr", graph.weights, p[graph.neighbours])


def _objective(matvec, p):
  """Eq. (10) and `W P~`, `(value, wp)`."""
  wp = matvec(p)
  ptwp = p.T @ wp
  return -2.0 * jnp.trace(ptwp) + jnp.vdot(ptwp, p.T @ p), wp


def _gradient(p, wp):
  """Eq. (11) (Eq. 12 when `wp` comes from the low-rank form)."""
  return 2.0 * p @ (p.T @ wp) + 2.0 * wp @ (p.T @ p) - 4.0 * wp


def _refine_one(x, parts, k: Optional[int], steps: int, step_size: Optional[float],
                search: pgd.LineSearch):
  """Refines one sample from `x` (`[s, r_c]`, fibres in the appearance basis)."""
  if k is None:
    matvec = lambda p: x @ (x.T @ p)                       # Eq. (12): X^T (X P~).
  else:
    graph = mutual_knn_graph(x, k)
    matvec = lambda p: graph_matvec(graph, p)
  value, wp = _objective(matvec, parts)
  if step_size is None:
    v = jnp.ones((x.shape[0], 1), x.dtype)
    v = jax.lax.fori_loop(0, 10, lambda _, v: (w := matvec(v)) / jnp.maximum(
        jnp.linalg.norm(w), 1e-30), v / jnp.linalg.norm(v))
    t0 = 1.0 / (8.0 * jnp.maximum(jnp.vdot(v, matvec(v)), jnp.finfo(x.dtype).tiny))
  else:
    t0 = jnp.asarray(step_size, x.dtype)
  slack = 8.0 * jnp.finfo(x.dtype).eps * jnp.sum(x * x)

  def body(carry, _):
    p, value, wp, t = carry
    grad = _gradient(p, wp)
    if step_size is None:
      p, value, wp, t = pgd.backtracking_step(lambda q: _objective(matvec, q), p, value, wp,
                                              grad, t, pgd.nonnegative, search, slack)
    else:
      p = pgd.nonnegative(p - t * grad)
      value, wp = _objective(matvec, p)
    return (p, value, wp, t), value

  (p, _, _, _), _ = jax.lax.scan(body, (parts, value, wp, t0), None, length=steps)
  return p


def _refine_batch(z, appearances, parts, k, steps, step_size, search):
  x = jnp.einsum("nsc,cr->nsr", z, appearances)           # [n, s, r_c], fibres in the A basis.
  return jax.vmap(lambda xi: _refine_one(xi, parts, k, steps, step_size, search))(x)


_jit_refine = jax.jit(_refine_batch, static_argnames=("k", "steps", "step_size", "search"))


def refine(features_i, appearances, parts, *, k: Optional[int] = None, steps: int = 50,
           step_size: Optional[float] = None,
           search: pgd.LineSearch = pgd.LineSearch()) -> jax.Array:
  """Per-sample parts `P~_i` by projected gradient descent on Eq. (10).

  Args:
    features_i: one sample `[s, c]`, or a batch `[n, s, c]` / `[n, h, w, c]`
      (samples refined independently, `vmap`).
    appearances: `A`, `[c, r_c]`.
    parts: the global parts `P`, `[s, r_s]` (the start, Algorithm 2).
    k: None for the full Gram matrix (ICLR refinement), or the number of
      neighbours of the mutual-kNN graph (Algorithm 2), `1 <= k <= s - 1`.
    steps: projected gradient steps T.
    step_size: None (adaptive backtracking, non-increasing Eq. 10) or the
      paper's fixed `lambda`.
    search: backtracking constants.

  Returns:
    `[s, r_s]` for one sample, `[n, s, r_s]` for a batch.
  """
  features_i = jnp.asarray(features_i)
  single = features_i.ndim == 2
  z, _ = _checks.flatten_features(features_i[None] if single else features_i)
  n, s, c = z.shape
  _checks.check_factors(z.shape, appearances, parts)
  if k is not None:
    if not (isinstance(k, (int, np.integer)) and 1 <= k <= s - 1):
      raise ValueError(f"k must be None or an integer in [1, s - 1 = {s - 1}], got {k!r}")
    if s > _MAX_GRAPH_POSITIONS:
      raise ValueError(f"the mutual-kNN graph supports up to {_MAX_GRAPH_POSITIONS} positions, got {s}")
    k = int(k)
  if not (isinstance(steps, (int, np.integer)) and steps >= 0):
    raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
  if step_size is not None and not (np.isfinite(step_size) and step_size > 0):
    raise ValueError(f"step_size must be a positive finite float or None, got {step_size!r}")
  _checks.check_finite(z, "features")
  _checks.check_finite(parts, "parts")
  if _checks.is_concrete(parts) and bool(jnp.any(parts < 0)):
    raise ValueError("parts must be non-negative (P >= 0)")
  refined = _jit_refine(z, appearances, parts, k=k, steps=int(steps),
                        step_size=None if step_size is None else float(step_size), search=search)
  return refined[0] if single else refined
