"""Per-sample refinement of the parts (paper Section 4.2, Eqs. 10-12, Algorithm 2).

For one sample, `P~_i >= 0` (`[s, r_s]`) descends

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

Which call is which (`refine(features, A, P, ...)`):

    =================================  ==========================================  ============
    call                               what runs                                   paper
    =================================  ==========================================  ============
    (no option)                        the translation of P minimising Eq. (10),   Eq. 10 over
                                       kept only where it lowers the sample's      translations
                                       error by >= `min_gain` = 10%; no steps
    `steps=T` (e.g. 50)                T steps of Eq. (10) from P, full Gram       Eqs. 10, 12
                                       (the ICLR refinement)                       (ICLR [62])
    `k=16`                             50 steps of Eq. (10) from P, mutual 16-NN   Algorithm 2,
                                       graph                                       Eqs. 10-11
    `steps=T`, `k=...`                 T steps instead of 50                       Algorithm 2's T
    `step_size=lam`                    the fixed step `lam` of Algorithm 2         Algorithm 2's
                                       (default: adaptive backtracking)            lambda
    `method="paper"`                   50 steps of Eq. (10) from P (as `steps=50`) Eqs. 10, 12
    `method="register"`                the translation, then `steps` (default 0)   Eq. 10 over
                                       steps of Eq. (10) with `k`'s affinity       translations
    =================================  ==========================================  ============

`method=None` (default) is "register" when neither `k` nor `steps` is given,
else "paper" (the published refinement). The translation of the global parts is

    d_i = argmin_d L_G(X_i^T X_i, Pi_d P),    P~_i = Pi_d P,

over every circular translation `Pi_d` of the `h x w` grid, evaluated for all
`d` at once by FFT cross-correlation: with `Y_d = X_i Pi_d P` (`[r_c, r_s]`, the
paper's `Y_i` of Eq. 12) and `Pi_d` a permutation, `L_G(d) = <Y_d^T Y_d, P^T P -
2 I>`, and `Y_d` for every `d` takes `r_c r_s` cross-correlations (O(r_c r_s s
log s), no `[s, s]` matrix). For the exact model of Eq. (1) with disjoint parts
(orthonormal `P`) the true translation is the minimiser (Jensen's inequality on
`||Y_d||^2`). `d_i` is kept only when it lowers the sample's reconstruction
error in the appearance basis, `E(d) = ||X_i - X_i Pi_d P (Pi_d P)^T||^2 =
||X_i||^2 + L_G(d)`, by at least `min_gain E(0)`; otherwise `P~_i = P`.

Why the default (README.md, "What differs"; `python -m experiments.refine
--compare`; WORKSPACE.md, "Parts on a real GAN"): on samples as a GAN generates
them a translation gains at most a few percent of E (toy faces: 90th percentile
0-3%; the DCGAN of `gan-face-generate`: 2-6%), on samples rolled by up to a
quarter of the side 11-47% (10th to 90th percentile). With the 10% gate the
aligned samples keep the global parts (toy faces: equal on 6 of 6 fits; DCGAN:
within 0.007 best-part IoU per region on 3 fits) and rolled ones are recovered
at the ungated translation's IoU (within 0.011). The descent of Eq. (10)
follows each sample's reconstruction, which on the DCGAN splits the background
(best-part IoU 0.08 lower than the global parts'); on the toy faces it gains
up to 0.02 on aligned samples and recovers nothing rolled.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from panda_jax import checks, pgd

METHODS = ("paper", "register")
_DEFAULT_STEPS = {"paper": 50, "register": 0}  # T of Algorithm 2; "register": WORKSPACE.md.
_REGISTER_TOL = 1e-2
_REGISTER_MIN_GAIN = 0.1  # Module docstring: "Why the default".
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

  def row(
    args: tuple[jax.Array, jax.Array],
  ) -> jax.Array:  # lax.map vmaps this over `block` rows at a time: [block, s] distances.
    xj, j = args
    dist = sq - 2.0 * x @ xj  # |x_j|^2 is constant along the row.
    return jax.lax.top_k(-jnp.where(jnp.arange(s) == j, jnp.inf, dist), k)[1]

  return jax.lax.map(row, (x, jnp.arange(s)), batch_size=min(block, s))


def mutual_knn_graph(x: jax.Array, k: int) -> Graph:
  """Algorithm 2's `G * (X^T X)` for one sample, sparse.

  Args:
    x: fibres in the appearance basis, `[s, r_c]` (rows of `(A^T Z_i(3))^T`).
    k: neighbours per position, `1 <= k <= s - 1`.
  """
  s = x.shape[0]
  neighbours = _knn(x, k).astype(jnp.int32)  # [s, k]
  rows = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[:, None], neighbours.shape)
  forward = (rows.astype(jnp.uint32) * s + neighbours.astype(jnp.uint32)).ravel()
  backward = (neighbours.astype(jnp.uint32) * s + rows.astype(jnp.uint32)).ravel()
  present = jnp.sort(forward)
  where = jnp.clip(jnp.searchsorted(present, backward), 0, present.size - 1)
  mutual = (present[where] == backward).reshape(neighbours.shape)
  weights = jnp.where(mutual, jnp.einsum("sd,skd->sk", x, x[neighbours]), 0.0)
  self_weight = jnp.sum(x * x, axis=1, keepdims=True)
  return Graph(
    jnp.concatenate([rows[:, :1], neighbours], 1), jnp.concatenate([self_weight, weights], 1)
  )


def graph_matvec(graph: Graph, p: jax.Array) -> jax.Array:
  """`W P~` for a sparse graph: `[s, r_s]`."""
  return jnp.einsum("sk,skr->sr", graph.weights, p[graph.neighbours])


def _objective(
  matvec: Callable[[jax.Array], jax.Array], p: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Eq. (10) and `W P~`, `(value, wp)`."""
  wp = matvec(p)
  ptwp = p.T @ wp
  return -2.0 * jnp.trace(ptwp) + jnp.vdot(ptwp, p.T @ p), wp


def _gradient(p: jax.Array, wp: jax.Array) -> jax.Array:
  """Eq. (11) (Eq. 12 when `wp` comes from the low-rank form)."""
  return 2.0 * p @ (p.T @ wp) + 2.0 * wp @ (p.T @ p) - 4.0 * wp


def translation_values(x: jax.Array, parts: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """Eq. (10) (full Gram matrix) at every circular translation of the parts.

  Args:
    x: fibres in the appearance basis, `[s, r_c]`.
    parts: `P`, `[s, r_s]`, `s = h * w` row-major.
    grid: `(h, w)`.

  Returns:
    `[h, w]`: entry `(dy, dx)` is `L_G(X^T X, roll(P, (dy, dx)))`, the parts
    rolled down by `dy` rows and right by `dx` columns.
  """
  h, w = grid
  r_s = parts.shape[1]
  fx = jnp.fft.rfft2(x.reshape(h, w, -1), axes=(0, 1))  # [h, w', r_c]
  fp = jnp.conj(jnp.fft.rfft2(parts.reshape(h, w, r_s), axes=(0, 1)))  # [h, w', r_s]

  def add_channel(
    yty: jax.Array, fx_r: jax.Array
  ) -> tuple[jax.Array, None]:  # One appearance r: Y_d[r, :] for every d, [h, w, r_s].
    y = jnp.fft.irfft2(fx_r[:, :, None] * fp, s=(h, w), axes=(0, 1))
    return yty + y[..., :, None] * y[..., None, :], None

  yty, _ = jax.lax.scan(
    add_channel, jnp.zeros((h, w, r_s, r_s), x.dtype), jnp.moveaxis(fx, -1, 0)
  )  # [h, w, r_s, r_s]
  return jnp.einsum("hwkl,kl->hw", yty, parts.T @ parts - 2.0 * jnp.eye(r_s, dtype=x.dtype))


def _roll(parts: jax.Array, shift: jax.Array, grid: tuple[int, int]) -> jax.Array:
  h, w = grid
  return jnp.roll(parts.reshape(h, w, -1), (shift[0], shift[1]), axis=(0, 1)).reshape(h * w, -1)


def _register_one(
  x: jax.Array, parts: jax.Array, grid: tuple[int, int], min_gain: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """`(roll(P, d_i) [s, r_s], d_i [2])`: the translation minimising Eq. (10), or
  none when it lowers `E = ||X||^2 + L_G` by less than `min_gain E(0)`."""
  values = translation_values(x, parts, grid).ravel()  # [h w], L_G(d)
  best = jnp.argmin(values)
  error_at_rest = jnp.sum(x * x) + values[0]  # E(0) >= 0
  best = jnp.where(values[0] - values[best] >= min_gain * error_at_rest, best, 0)
  shift = jnp.stack(jnp.divmod(best, grid[1])).astype(jnp.int32)
  return _roll(parts, shift, grid), shift


def _descend(
  matvec: Callable[[jax.Array], jax.Array],
  p: jax.Array,
  x: jax.Array,
  steps: jax.Array,
  step_size: float | None,
  search: pgd.LineSearch,
  tol: float | None,
) -> jax.Array:
  """Projected gradient descent on Eq. (10): `steps` steps, fewer when the
  relative decrease of one step falls below `tol` (never, when None)."""
  value, wp = _objective(matvec, p)
  if step_size is None:
    v = jnp.ones((x.shape[0], 1), x.dtype)
    v = jax.lax.fori_loop(
      0,
      10,
      lambda _, v: (w := matvec(v)) / jnp.maximum(jnp.linalg.norm(w), 1e-30),
      v / jnp.linalg.norm(v),
    )
    t0 = 1.0 / (8.0 * jnp.maximum(jnp.vdot(v, matvec(v)), jnp.finfo(x.dtype).tiny))
  else:
    t0 = jnp.asarray(step_size, x.dtype)
  slack = 8.0 * jnp.finfo(x.dtype).eps * jnp.sum(x * x)

  def cond(carry: tuple) -> jax.Array:
    i, _, _, _, _, moving = carry
    return jnp.logical_and(i < steps, moving)

  def body(carry: tuple) -> tuple:
    i, p, value, wp, t, _ = carry
    grad = _gradient(p, wp)
    if step_size is None:
      p, new_value, wp, t = pgd.backtracking_step(
        lambda q: _objective(matvec, q), p, value, wp, grad, t, pgd.nonnegative, search, slack
      )
    else:
      p = pgd.nonnegative(p - t * grad)
      new_value, wp = _objective(matvec, p)
    moving = True if tol is None else value - new_value > tol * jnp.maximum(jnp.abs(value), slack)
    return i + 1, p, new_value, wp, t, moving

  _, p, _, _, _, _ = jax.lax.while_loop(
    cond, body, (jnp.int32(0), p, value, wp, t0, jnp.bool_(True))
  )
  return p


def _refine_one(
  x: jax.Array,
  parts: jax.Array,
  *,
  method: str,
  grid: tuple[int, int] | None,
  k: int | None,
  steps: jax.Array,
  step_size: float | None,
  search: pgd.LineSearch,
  tol: float | None,
  min_gain: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """Refines one sample from `x` (`[s, r_c]`, fibres in the appearance basis)."""
  if method == "register":
    parts, shift = _register_one(x, parts, grid, min_gain)
  else:
    shift = jnp.zeros((2,), jnp.int32)
  if k is None:
    matvec = lambda p: x @ (x.T @ p)  # Eq. (12): X^T (X P~).
  else:
    graph = mutual_knn_graph(x, k)
    matvec = lambda p: graph_matvec(graph, p)
  return _descend(matvec, parts, x, steps, step_size, search, tol), shift


def _refine_batch(
  z: jax.Array,
  appearances: jax.Array,
  parts: jax.Array,
  steps: jax.Array,
  min_gain: jax.Array,
  **options: Any,
) -> tuple[jax.Array, jax.Array]:
  x = jnp.einsum("nsc,cr->nsr", z, appearances)  # [n, s, r_c], fibres in the A basis.
  return jax.vmap(lambda xi: _refine_one(xi, parts, steps=steps, min_gain=min_gain, **options))(x)


_STATIC = ("method", "grid", "k", "step_size", "search", "tol")  # `steps`, `min_gain` are traced.
_jit_refine = jax.jit(_refine_batch, static_argnames=_STATIC)


def _grid(features_i: jax.Array, s: int, grid: Sequence[int] | None) -> tuple[int, int]:
  """The feature grid `(h, w)`: from `[n, h, w, c]` input, `grid`, or a square `s`."""
  if features_i.ndim == 4:
    inferred = tuple(features_i.shape[1:3])
    if grid is not None and tuple(grid) != inferred:
      raise ValueError(f"grid {tuple(grid)} does not match the features' {inferred}")
    return inferred
  if grid is not None:
    if len(grid) != 2 or math.prod(int(g) for g in grid) != s:
      raise ValueError(f"grid must be (h, w) with h * w = s = {s}, got {tuple(grid)}")
    return int(grid[0]), int(grid[1])
  side = math.isqrt(s)
  if side * side != s:
    raise ValueError(
      f"s = {s} positions is not square: pass [n, h, w, c] features or grid=(h, w) "
      "(method='register' translates the parts on the grid)"
    )
  return side, side


def arguments(
  features_i: jax.typing.ArrayLike,
  appearances: jax.typing.ArrayLike,
  parts: jax.typing.ArrayLike,
  *,
  method: str | None = None,
  k: int | None = None,
  steps: int | None = None,
  step_size: float | None = None,
  search: pgd.LineSearch = pgd.LineSearch(),
  tol: float | None = None,
  grid: Sequence[int] | None = None,
  min_gain: float | None = None,
) -> tuple[tuple[jax.Array, jax.Array, jax.Array, jax.Array], dict[str, Any], bool]:
  """`refine`'s checks (ValueError before any compilation) and the arguments of the
  jitted batch, `(args, static options, single)`: `_jit_refine(*args, **options)`."""
  if method is None:
    method = "register" if k is None and steps is None else "paper"
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS} or None, got {method!r}")
  features_i = jnp.asarray(features_i)
  appearances, parts = jnp.asarray(appearances), jnp.asarray(parts)
  if features_i.ndim not in (2, 3, 4):
    raise ValueError(
      f"features must be [s, c], [n, s, c] or [n, h, w, c], got shape {tuple(features_i.shape)}"
    )
  single = features_i.ndim == 2
  z, _ = checks.flatten_features(features_i[None] if single else features_i)
  n, s, c = z.shape
  checks.check_factors(z.shape, appearances, parts)
  if not 1 <= parts.shape[1] <= s:
    raise ValueError(f"parts must have between 1 and s = {s} columns, got {parts.shape[1]}")
  if not 1 <= appearances.shape[1] <= c:
    raise ValueError(
      f"appearances must have between 1 and c = {c} columns, got {appearances.shape[1]}"
    )
  if n < 1:
    raise ValueError("features hold no sample (n = 0)")
  if k is not None:
    if not (isinstance(k, (int, np.integer)) and 1 <= k <= s - 1):
      raise ValueError(f"k must be None or an integer in [1, s - 1 = {s - 1}], got {k!r}")
    if s > _MAX_GRAPH_POSITIONS:
      raise ValueError(
        f"the mutual-kNN graph supports up to {_MAX_GRAPH_POSITIONS} positions, got {s}"
      )
    k = int(k)
  if steps is None:
    steps = _DEFAULT_STEPS[method]
  if not (isinstance(steps, (int, np.integer)) and 0 <= steps < 2**31):
    raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
  if k is not None and steps == 0:
    default = " (the default of method='register')" if method == "register" else ""
    raise ValueError(
      f"k={k} sets the affinity of the Eq. (10) steps, but steps = 0{default}: "
      "pass steps > 0, or drop k"
    )
  if step_size is not None and not (np.isfinite(step_size) and step_size > 0):
    raise ValueError(f"step_size must be a positive finite float or None, got {step_size!r}")
  if tol is not None and not (np.isfinite(tol) and tol >= 0):
    raise ValueError(f"tol must be a non-negative finite float or None, got {tol!r}")
  if method == "register":
    grid = _grid(features_i, s, grid)
    tol = _REGISTER_TOL if tol is None else tol
    min_gain = _REGISTER_MIN_GAIN if min_gain is None else min_gain
    if not (isinstance(min_gain, (int, float, np.floating)) and 0 <= min_gain <= 1):
      raise ValueError(f"min_gain must be a float in [0, 1], got {min_gain!r}")
  elif grid is not None or min_gain is not None:
    raise ValueError(
      "grid and min_gain are used by method='register' only (method='paper' does not translate)"
    )
  checks.check_finite(z, "features")
  checks.check_finite(appearances, "appearances")
  checks.check_finite(parts, "parts")
  if checks.is_concrete(parts) and bool(jnp.any(parts < 0)):
    raise ValueError("parts must be non-negative (P >= 0)")
  return (
    (z, appearances, parts, jnp.int32(steps), jnp.asarray(min_gain or 0.0, z.dtype)),
    dict(
      method=method,
      grid=grid,
      k=k,
      step_size=None if step_size is None else float(step_size),
      search=search,
      tol=None if tol is None else float(tol),
    ),
    single,
  )


def compile_refine(
  features_i: jax.typing.ArrayLike,
  appearances: jax.typing.ArrayLike,
  parts: jax.typing.ArrayLike,
  **options: Any,
) -> tuple[jax.stages.Compiled, tuple[jax.Array, jax.Array, jax.Array, jax.Array], dict[str, Any]]:
  """`refine` compiled ahead of time: `(compiled, arguments, static)`.

  `options` are `refine`'s keywords (not `return_shifts`); `compiled(*arguments)`
  returns `(refined [n, s, r_s], shifts [n, 2])`; `static` holds the resolved
  options (`method`, `tol`, ...) and `arguments[3]` the number of steps.
  `compiled.memory_analysis()` gives XLA's temporaries (the benchmarks' use).
  """
  args, static, _ = arguments(features_i, appearances, parts, **options)
  return _jit_refine.lower(*args, **static).compile(), args, static


def refine(
  features_i: jax.typing.ArrayLike,
  appearances: jax.typing.ArrayLike,
  parts: jax.typing.ArrayLike,
  *,
  method: str | None = None,
  k: int | None = None,
  steps: int | None = None,
  step_size: float | None = None,
  search: pgd.LineSearch = pgd.LineSearch(),
  tol: float | None = None,
  grid: Sequence[int] | None = None,
  min_gain: float | None = None,
  return_shifts: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Per-sample parts `P~_i` (Section 4.2, Eqs. 10-12, Algorithm 2).

  `refine(z, A, P)` translates the global parts onto each sample where that
  lowers its error by at least 10% (else keeps them); `refine(z, A, P,
  steps=50)` runs the ICLR refinement (Eq. 10 with the full Gram matrix, via
  Eq. 12); `refine(z, A, P, k=16)` Algorithm 2 (mutual 16-NN graph). Table and
  measurements: the module doc.

  Args:
    features_i: one sample `[s, c]`, or a batch `[n, s, c]` / `[n, h, w, c]`
      (samples refined independently, `vmap`).
    appearances: `A`, `[c, r_c]`; Eq. (10) (`A A^T` as the projection onto the
      appearances) relies on orthonormal columns (`Factors.orthogonality_error`).
    parts: the global parts `P`, `[s, r_s]`, `P >= 0`.
    method: "paper" (`steps` steps of Eq. 10 from `P`), "register" (the
      translation of `P` minimising Eq. 10, then `steps` steps of Eq. 10), or
      None (default): "register" when neither `k` nor `steps` is given, else
      "paper".
    k: None for the full Gram matrix (ICLR refinement), or the number of
      neighbours of the mutual-kNN graph (Algorithm 2), `1 <= k <= s - 1`: the
      affinity of the Eq. (10) steps ("register" translates with the full Gram
      matrix).
    steps: projected gradient steps T of Eq. (10); default 50 for "paper", 0
      for "register".
    step_size: None (adaptive backtracking, non-increasing Eq. 10) or the
      paper's fixed `lambda`.
    search: backtracking constants.
    tol: stop once one step lowers Eq. (10) by less than `tol` times its value;
      None: no stopping rule (exactly T steps) for "paper", 1e-2 for "register".
    grid: `(h, w)` for `[s, c]` / `[n, s, c]` features whose `s` is not square
      ("register" only).
    min_gain: "register" keeps a translation only when it lowers the sample's
      error `||X||^2 + L_G` by at least this fraction of its value without
      one; default 0.1 (module doc), 0 keeps every best translation.
    return_shifts: also return the translations `(dy, dx)` found by
      "register" (zeros for "paper").

  Returns:
    `[s, r_s]` for one sample, `[n, s, r_s]` for a batch (and, with
    `return_shifts`, int32 `[2]` / `[n, 2]` shifts: the start was
    `jnp.roll(P.reshape(h, w, r_s), shift, axis=(0, 1))`).

  Raises:
    ValueError (before any compilation): bad shapes, ranks, k, steps, method,
      non-finite or negative inputs; `k` with `method="register"` and no steps
      (the graph would be unused).

  Example:
    >>> moved = pj.refine(features[:4], A, P)               # [4, s, r_s]
    >>> iclr = pj.refine(features[:4], A, P, steps=50)
    >>> algorithm2 = pj.refine(features[:4], A, P, k=16)
    >>> moved, shifts = pj.refine(features[:4], A, P, method="register", return_shifts=True)
  """
  args, options, single = arguments(
    features_i,
    appearances,
    parts,
    method=method,
    k=k,
    steps=steps,
    step_size=step_size,
    search=search,
    tol=tol,
    grid=grid,
    min_gain=min_gain,
  )
  refined, shifts = _jit_refine(*args, **options)
  if single:
    refined, shifts = refined[0], shifts[0]
  return (refined, shifts) if return_shifts else refined
