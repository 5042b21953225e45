"""Refinement (Eqs. 10-12, Algorithm 2), method="paper": the sparse mutual-kNN
graph, the low-rank gradient against autodiff on the dense affinity, k = s - 1
against the full Gram matrix, the paper's fixed-step loop, and planted shifted
parts. The default method (unaligned samples): test_refine_unaligned.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import panda_jax as pj
from panda_jax import refinement as refine_lib
from panda_jax.data import synthetic


def _dense_mutual_knn(x, k):
  """Algorithm 2's G * (X^T X) with a dense S x S matrix, NumPy (diagonal kept)."""
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
  np.add.at(w, (np.repeat(np.arange(s), graph.neighbours.shape[1]),
                np.asarray(graph.neighbours).ravel()), np.asarray(graph.weights).ravel())
  return w


@pytest.mark.parametrize("k", [1, 3, 7, 35])
def test_graph_is_mutual_knn_and_symmetric(k):
  x = jax.random.normal(jax.random.PRNGKey(k), (36, 5))
  graph = pj.mutual_knn_graph(x, k)
  assert graph.neighbours.shape == (36, k + 1)
  dense = _dense(graph, 36)
  np.testing.assert_allclose(dense, dense.T, atol=1e-6)
  np.testing.assert_allclose(dense, _dense_mutual_knn(x, k), rtol=1e-5, atol=1e-5)
  if k == 35:  # k = s - 1: every pair is a mutual neighbour, W is the full Gram matrix.
    np.testing.assert_allclose(dense, np.asarray(x @ x.T), rtol=1e-5, atol=1e-5)


def test_gradients_match_autodiff_of_eq10():
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
      np.testing.assert_allclose(value, eq10(p), rtol=1e-12)
      np.testing.assert_allclose(refine_lib._gradient(p, wp), jax.grad(eq10)(p), rtol=1e-10)


def _paper_refinement(z, a, p, lr, steps, k=None):
  """Algorithm 2 with a dense W and fixed step, NumPy float64."""
  x = np.asarray(z, np.float64) @ np.asarray(a, np.float64)
  w = x @ x.T if k is None else _dense_mutual_knn(x, k)
  p = np.asarray(p, np.float64)
  for _ in range(steps):
    grad = 2 * p @ p.T @ w @ p + 2 * w @ p @ p.T @ p - 4 * w @ p
    p = np.maximum(0, p - lr * grad)
  return p


@pytest.mark.parametrize("k", [None, 6])
def test_fixed_step_equals_paper_loop(k):
  z = jax.random.normal(jax.random.PRNGKey(2), (2, 25, 6))
  a = pj.hosvd_init(z, 4)
  p = jax.random.uniform(jax.random.PRNGKey(3), (25, 3))
  out = pj.refine(z, a, p, method="paper", k=k, steps=10, step_size=1e-3)
  for i in range(2):
    np.testing.assert_allclose(out[i], _paper_refinement(z[i], a, p, 1e-3, 10, k),
                               rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(pj.refine(z[1], a, p, method="paper", k=k, steps=10, step_size=1e-3),
                             out[1], rtol=1e-5, atol=1e-6)


def test_k_equal_s_minus_one_reproduces_full_gram():
  z = jax.random.normal(jax.random.PRNGKey(4), (3, 36, 8))
  a = pj.hosvd_init(z, 5)
  p = jax.random.uniform(jax.random.PRNGKey(5), (36, 4))
  full = pj.refine(z, a, p, method="paper", steps=20)
  knn = pj.refine(z, a, p, method="paper", k=35, steps=20)
  np.testing.assert_allclose(knn, full, rtol=1e-4, atol=1e-4 * float(jnp.abs(full).max()))


def test_adaptive_refinement_decreases_eq10():
  z = jax.random.normal(jax.random.PRNGKey(6), (1, 49, 8))
  a = pj.hosvd_init(z, 5)
  p = jax.random.uniform(jax.random.PRNGKey(7), (49, 4))
  x = z[0] @ a
  values = []
  for steps in (0, 1, 5, 20):
    q = pj.refine(z[0], a, p, method="paper", steps=steps)
    values.append(float(refine_lib._objective(lambda v: x @ (x.T @ v), q)[0]))
    assert float(q.min()) >= 0
  assert all(b <= a_ + 1e-5 * abs(values[0]) for a_, b in zip(values, values[1:]))
  assert values[-1] < values[0]


@pytest.mark.parametrize("k,seed", [(None, 22), (8, 22), (8, 23)])
def test_refinement_follows_shifted_parts(k, seed):
  """Global parts from aligned samples; one sample whose regions are rolled by one
  column (of 8): refinement moves the parts onto the shifted regions. (Larger
  shifts, and regions smaller than k, defeat this paper-faithful refinement.)"""
  data = synthetic.planted(jax.random.PRNGKey(seed), num_samples=32, height=8, width=8,
                           channels=16, rank_c=6, rank_s=4, noise=0.02)
  fitted = pj.fit(data.features, 6, 4, steps=50, key=jax.random.PRNGKey(0), progress=False)
  assert synthetic.matched_iou(fitted.parts, data.labels).min() > 0.95
  shifted = jnp.roll(data.features[:1], 1, axis=2)
  shifted_labels = jnp.roll(data.labels.reshape(8, 8), 1, axis=1).ravel()
  before = synthetic.matched_iou(fitted.parts, shifted_labels)
  refined = pj.refine(shifted, fitted.appearances, fitted.parts, method="paper", k=k, steps=100)
  after = synthetic.matched_iou(refined[0], shifted_labels)
  assert after.mean() > before.mean() + 0.2, (before, after)
  assert after.mean() >= 0.9, after


def test_bad_arguments():
  z = jax.random.normal(jax.random.PRNGKey(8), (2, 16, 4))
  a, p = jnp.eye(4)[:, :2], jnp.ones((16, 3))
  with pytest.raises(ValueError, match="k must be"):
    pj.refine(z, a, p, k=16)
  with pytest.raises(ValueError, match="k must be"):
    pj.refine(z, a, p, k=0)
  with pytest.raises(ValueError, match="parts must be"):
    pj.refine(z, a, p[:-1])
  with pytest.raises(ValueError, match="non-negative"):
    pj.refine(z, a, -p)
  with pytest.raises(ValueError, match="non-finite"):
    pj.refine(z.at[0, 0, 0].set(jnp.nan), a, p)
