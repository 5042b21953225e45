"""Refinement (Eqs. 10-12, Algorithm 2), method="paper" (the default): which call
is which, the sparse mutual-kNN graph, the low-rank gradient against autodiff on
the dense affinity, k = s - 1 against the full Gram matrix, the paper's
fixed-step loop, monotone descent, and planted shifted parts. The translation
(method="register"): test_refine_unaligned.py.

Tolerances are derived rounding bounds (tests/_bounds.py); the iterated
comparisons run in float64 (`jax.enable_x64`), where the bound propagated
through the iterations stays far below the differences the tests look for.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _bounds import U64, assert_within, gamma
import panda_jax as pj
from panda_jax import refinement as refine_lib
from panda_jax.data import synthetic


def _dense_mutual_knn(x, k):
  """Algorithm 2's G * (X^T X) with a dense S x S matrix, NumPy float64 (diagonal kept)."""
  x = np.asarray(x, np.float64)
  d = ((x[:, None] - x[None]) ** 2).sum(-1)
  np.fill_diagonal(d, np.inf)
  knn = np.argsort(d, axis=1, kind="stable")[:, :k]
  adj = np.zeros(d.shape, bool)
  adj[np.repeat(np.arange(len(x)), k), knn.ravel()] = True
  adj = adj & adj.T
  np.fill_diagonal(adj, True)
  return adj * (x @ x.T)


def _dense(graph, s):
  w = np.zeros((s, s))
  np.add.at(
    w,
    (np.repeat(np.arange(s), graph.neighbours.shape[1]), np.asarray(graph.neighbours).ravel()),
    np.asarray(graph.weights).ravel(),
  )
  return w


def _eq10(w, p):
  """Eq. (10) with a dense affinity, NumPy float64."""
  ptwp = p.T @ w @ p
  return -2 * np.trace(ptwp) + np.sum(ptwp * (p.T @ p))


def _eq11(w, p):
  """Eq. (11), NumPy float64."""
  return 2 * p @ (p.T @ w @ p) + 2 * w @ p @ (p.T @ p) - 4 * w @ p


def _rounding(s):
  """Roundings along the longest chain of Eqs. (10)-(12): four nested
  contractions of length <= s (`X^T (X P)`, `P^T (W P)`, ...), and a few sums."""
  return 4 * s + 8


@pytest.mark.parametrize("k", [1, 3, 7, 35])
def test_graph_is_mutual_knn_and_symmetric(k):
  """The float32 graph has the float64 graph's edges when no two candidate
  neighbours are closer than the float32 distances' error; then each weight
  `x_j . x_l` (a dot of length d = 5) is off by at most gamma(5) |x_j| . |x_l|."""
  x = jax.random.normal(jax.random.PRNGKey(k), (36, 5))
  x64 = np.asarray(x, np.float64)
  # `_knn` ranks |x_l|^2 - 2 x_l . x_j (two dots of length 5, a product, a
  # subtraction): off by at most gamma(7) (|x_l|^2 + 2 |x_l| . |x_j|).
  distance = (x64**2).sum(1)[None, :] - 2 * x64 @ x64.T
  error = gamma(7) * ((x64**2).sum(1)[None, :] + 2 * np.abs(x64) @ np.abs(x64).T)
  np.fill_diagonal(distance, np.inf)
  if k < 35:
    ordered = np.sort(distance, axis=1)
    assert np.all(ordered[:, k] - ordered[:, k - 1] > 2 * error.max(1)), "near-tie: pick a seed"
  graph = pj.mutual_knn_graph(x, k)
  assert graph.neighbours.shape == (36, k + 1)
  dense = _dense(graph, 36)
  bound = gamma(5) * np.abs(x64) @ np.abs(x64).T
  assert_within(dense, _dense_mutual_knn(x, k), bound, "graph")
  assert_within(dense, dense.T, 2 * bound, "symmetry")
  if k == 35:  # k = s - 1: every pair is a mutual neighbour, W is the full Gram matrix.
    assert_within(dense, x64 @ x64.T, bound, "full Gram")


def test_gradients_match_autodiff_of_eq10():
  """Float64: ours (low-rank or sparse order) and autodiff of the dense formula
  are each within gamma(K) of the value computed on absolute values."""
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.PRNGKey(0), (30, 4), jnp.float64)
    p = jax.random.uniform(jax.random.PRNGKey(1), (30, 3), jnp.float64)
    for k in (None, 5):
      w = jnp.asarray(x @ x.T if k is None else _dense(pj.mutual_knn_graph(x, k), 30))
      eq10 = lambda q: -2 * jnp.trace(q.T @ w @ q) + jnp.trace(q @ q.T @ w @ q @ q.T)
      if k is None:
        matvec = lambda q: x @ (x.T @ q)
      else:
        graph = pj.mutual_knn_graph(x, k)
        matvec = lambda q: refine_lib.graph_matvec(graph, q)
      value, wp = refine_lib._objective(matvec, p)
      w_abs = np.abs(np.asarray(x)) @ np.abs(np.asarray(x)).T  # >= |W| for both affinities
      p_abs = np.asarray(p)
      both = 2 * gamma(_rounding(30), U64)
      assert_within(
        value,
        eq10(p),
        both
        * (
          2 * np.trace(p_abs.T @ w_abs @ p_abs)
          + np.sum((p_abs.T @ w_abs @ p_abs) * (p_abs.T @ p_abs))
        ),
        f"Eq. 10, k={k}",
      )
      assert_within(
        refine_lib._gradient(p, wp),
        jax.grad(eq10)(p),
        both
        * (
          4 * p_abs @ (p_abs.T @ w_abs @ p_abs)
          + 4 * w_abs @ p_abs @ (p_abs.T @ p_abs)
          + 4 * w_abs @ p_abs
        ),
        f"Eq. 11, k={k}",
      )


def _paper_refinement(z, a, p, lr, steps, k=None):
  """Algorithm 2 with a dense W and a fixed step, NumPy float64, and the bound of
  a float64 implementation's distance to it.

  One step `P+ = max(0, P - lr g(P))` of a computed `P^` (error e = ||P^ - P||_F)
  lands within (1 + lr L) e + lr ||dg|| + gamma(2) ||(|P^| + lr |g|)|| of the
  exact step: the projection is 1-Lipschitz, `dg` (the rounding of g) is at most
  gamma(K) of g evaluated on absolute values, and L bounds the derivative of
  g = 2 P (P^T W P) + 2 (W P)(P^T P) - 4 W P on the segment:
  ||Dg|| <= ||W||_2 (12 ||P||_2^2 + 4), with ||P||_2 <= ||P||_2(exact) + e.
  """
  x = np.asarray(z, np.float64) @ np.asarray(a, np.float64)
  w = x @ x.T if k is None else _dense_mutual_knn(x, k)
  w_abs = np.abs(x) @ np.abs(x).T
  w_norm = np.linalg.norm(w, 2)
  p = np.asarray(p, np.float64)
  error = 0.0
  for _ in range(steps):
    grad = _eq11(w, p)
    grad_abs = (
      4 * np.abs(p) @ (np.abs(p).T @ w_abs @ np.abs(p))
      + 4 * w_abs @ np.abs(p) @ (np.abs(p).T @ np.abs(p))
      + 4 * w_abs @ np.abs(p)
    )
    lipschitz = w_norm * (12 * (np.linalg.norm(p, 2) + error) ** 2 + 4)
    error = (
      (1 + lr * lipschitz) * error
      + lr * gamma(_rounding(len(x)), U64) * np.linalg.norm(grad_abs)
      + gamma(2, U64) * np.linalg.norm(np.abs(p) + lr * np.abs(grad))
    )
    p = np.maximum(0, p - lr * grad)
  return p, error


@pytest.mark.parametrize("k", [None, 6])
def test_fixed_step_equals_paper_loop(k):
  """Float64 (the bound of `_paper_refinement` is about 1e-10 here, the steps
  move P by order 1)."""
  with jax.enable_x64(True):
    z = jax.random.normal(jax.random.PRNGKey(2), (2, 25, 6), jnp.float64)
    a = pj.hosvd_init(z, 4)
    p = jax.random.uniform(jax.random.PRNGKey(3), (25, 3), jnp.float64)
    out = pj.refine(z, a, p, k=k, steps=10, step_size=1e-4)
    one = pj.refine(z[1], a, p, k=k, steps=10, step_size=1e-4)
  for i in range(2):
    expected, error = _paper_refinement(z[i], a, p, 1e-4, 10, k)
    assert error < 1e-6 * np.linalg.norm(expected - np.asarray(p)), "bound too loose to test"
    assert np.linalg.norm(np.asarray(out[i]) - expected) <= error
  # A sample alone (`[s, c]`): its own compiled program, within the same bound.
  expected, error = _paper_refinement(z[1], a, p, 1e-4, 10, k)
  assert np.linalg.norm(np.asarray(one) - expected) <= error


def test_k_equal_s_minus_one_reproduces_full_gram():
  """Float64: the graph with k = s - 1 (the full Gram matrix, per pair) and the
  low-rank form X^T (X P) follow the same dense loop within its bound."""
  with jax.enable_x64(True):
    z = jax.random.normal(jax.random.PRNGKey(4), (3, 36, 8), jnp.float64)
    a = pj.hosvd_init(z, 5)
    p = jax.random.uniform(jax.random.PRNGKey(5), (36, 4), jnp.float64)
    full = pj.refine(z, a, p, steps=20, step_size=2e-5)
    knn = pj.refine(z, a, p, k=35, steps=20, step_size=2e-5)
  for i in range(3):
    expected, error = _paper_refinement(z[i], a, p, 2e-5, 20)
    assert error < 1e-6 * np.linalg.norm(expected - np.asarray(p)), "bound too loose to test"
    assert np.linalg.norm(np.asarray(full[i]) - expected) <= error
    assert np.linalg.norm(np.asarray(knn[i]) - expected) <= error


def test_adaptive_refinement_decreases_eq10():
  """Float64. An accepted backtracking step satisfies, as computed,
  f(P+) <= f(P) + <g, D> + ||D||^2 / (2 t) and, D being a projected step,
  <g, D> <= -||D||^2 / t: so the computed value does not increase by more than
  the rounding of that bound, and the exact Eq. (10) (NumPy) by more than that
  plus the rounding of both values: gamma(K) (|f|(P) + |f|(P+) + 4 |g| . |D|)
  with |f| Eq. (10) evaluated on absolute values."""
  with jax.enable_x64(True):
    z = jax.random.normal(jax.random.PRNGKey(6), (1, 49, 8), jnp.float64)
    a = pj.hosvd_init(z, 5)
    p = jax.random.uniform(jax.random.PRNGKey(7), (49, 4), jnp.float64)
    iterates = [np.asarray(pj.refine(z[0], a, p, steps=t)) for t in range(21)]
  x = np.asarray(z[0]) @ np.asarray(a)
  w, w_abs = x @ x.T, np.abs(x) @ np.abs(x).T
  f_abs = lambda q: 2 * np.trace(q.T @ w_abs @ q) + np.sum((q.T @ w_abs @ q) * (q.T @ q))
  g = gamma(_rounding(49), U64)
  for q, q_next in zip(iterates, iterates[1:]):
    assert q_next.min() >= 0
    slack = g * (f_abs(q) + f_abs(q_next) + 4 * np.sum(np.abs(_eq11(w, q)) * np.abs(q_next - q)))
    assert _eq10(w, q_next) <= _eq10(w, q) + slack
  assert _eq10(w, iterates[-1]) < _eq10(w, iterates[0]) - 0.1 * abs(_eq10(w, iterates[0]))


def test_each_call_is_its_equation():
  """The table of refinement.py: no option = the translation gated at 10% gain;
  steps = T full-Gram steps (ICLR); k = Algorithm 2 with 50 steps; method="paper"
  = 50 full-Gram steps."""
  z = jax.random.normal(jax.random.PRNGKey(9), (2, 6, 6, 5))
  a = pj.hosvd_init(z, 3)
  p = jax.random.uniform(jax.random.PRNGKey(10), (36, 4))
  np.testing.assert_array_equal(
    pj.refine(z, a, p), pj.refine(z, a, p, method="register", min_gain=0.1)
  )
  np.testing.assert_array_equal(pj.refine(z, a, p, steps=50), pj.refine(z, a, p, method="paper"))
  np.testing.assert_array_equal(
    pj.refine(z, a, p, k=16), pj.refine(z, a, p, method="paper", k=16, steps=50)
  )
  assert not np.array_equal(pj.refine(z, a, p, k=16), pj.refine(z, a, p, steps=50))
  moved, shifts = pj.refine(z, a, p, method="register", min_gain=0.0, return_shifts=True)
  expected = jax.vmap(lambda d: refine_lib._roll(p, d, (6, 6)))(shifts)
  np.testing.assert_array_equal(moved, expected)
  _, none = pj.refine(z, a, p, steps=50, return_shifts=True)
  np.testing.assert_array_equal(none, 0)


@pytest.mark.parametrize("k,seed", [(None, 22), (8, 22), (8, 23)])
def test_refinement_follows_shifted_parts(k, seed):
  """Global parts from aligned samples; one sample whose regions are rolled by one
  column (of 8): refinement moves the parts onto the shifted regions. (Larger
  shifts, and regions smaller than k, defeat this paper-faithful refinement.)"""
  data = synthetic.planted(
    jax.random.PRNGKey(seed),
    num_samples=32,
    height=8,
    width=8,
    channels=16,
    rank_c=6,
    rank_s=4,
    noise=0.02,
  )
  fitted = pj.fit(data.features, 6, 4, steps=50, key=jax.random.PRNGKey(0), progress=False)
  assert synthetic.matched_iou(fitted.parts, data.labels).min() > 0.95
  shifted = jnp.roll(data.features[:1], 1, axis=2)
  shifted_labels = jnp.roll(data.labels.reshape(8, 8), 1, axis=1).ravel()
  before = synthetic.matched_iou(fitted.parts, shifted_labels)
  refined = pj.refine(shifted, fitted.appearances, fitted.parts, k=k, steps=100)
  after = synthetic.matched_iou(refined[0], shifted_labels)
  assert after.mean() > before.mean() + 0.2, (before, after)
  assert after.mean() >= 0.9, after


def test_bad_arguments():
  z = jax.random.normal(jax.random.PRNGKey(8), (2, 16, 4))
  a, p = jnp.eye(4)[:, :2], jnp.ones((16, 3))
  with pytest.raises(ValueError, match="k must be"):
    pj.refine(z, a, p, k=16)  # s = 16: at most 15 neighbours.
  with pytest.raises(ValueError, match="k must be"):
    pj.refine(z, a, p, k=0)
  with pytest.raises(ValueError, match="steps = 0"):
    pj.refine(z, a, p, k=3, steps=0)
  with pytest.raises(ValueError, match="parts must be"):
    pj.refine(z, a, p[:-1])
  with pytest.raises(ValueError, match="non-negative"):
    pj.refine(z, a, -p)
  with pytest.raises(ValueError, match="non-finite"):
    pj.refine(z.at[0, 0, 0].set(jnp.nan), a, p)
  with pytest.raises(ValueError, match="min_gain must be"):
    pj.refine(z, a, p, min_gain=1.5)
  with pytest.raises(ValueError, match="min_gain are used by method='register' only"):
    pj.refine(z, a, p, steps=5, min_gain=0.1)
