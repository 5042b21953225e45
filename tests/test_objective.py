"""Eq. (3) and its reordered gradients (Eqs. 4-5) against autodiff, finite
differences and the paper's formulas written literally."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import panda_jax as pj
from panda_jax import objective


def _random(key, n=3, s=20, c=7, rank_c=4, rank_s=5, dtype=jnp.float32):
  k1, k2, k3 = jax.random.split(key, 3)
  return (jax.random.normal(k1, (n, s, c), dtype), jax.random.normal(k2, (c, rank_c), dtype),
          jax.random.uniform(k3, (s, rank_s), dtype))


def _paper_gradients(z, a, p):
  """Eqs. (4)-(5) exactly as printed (with S x S and C x C products), NumPy float64."""
  z = np.swapaxes(np.asarray(z, np.float64), 1, 2)  # Z_i(3): [n, c, s]
  a, p = np.asarray(a, np.float64), np.asarray(p, np.float64)
  abar, pbar = a @ a.T, p @ p.T
  gp = 2 * sum(pbar @ zi.T @ abar @ abar @ zi @ p + zi.T @ abar @ abar @ zi @ pbar @ p
               - 2 * zi.T @ abar @ zi @ p for zi in z)
  ga = 2 * sum(abar @ zi @ pbar @ pbar @ zi.T @ a + zi @ pbar @ pbar @ zi.T @ abar @ a
               - 2 * zi @ pbar @ zi.T @ a for zi in z)
  loss = sum(np.sum((zi - abar @ zi @ pbar) ** 2) for zi in z)
  return loss, ga, gp


@pytest.mark.parametrize("seed", [0, 1])
def test_gradients_match_autodiff_float32(seed):
  z, a, p = _random(jax.random.PRNGKey(seed))
  ga, gp = pj.gradients(z, a, p)
  ra, rp = jax.grad(pj.loss, argnums=(1, 2))(z, a, p)
  np.testing.assert_allclose(ga, ra, rtol=1e-5, atol=1e-5 * np.abs(ra).max())
  np.testing.assert_allclose(gp, rp, rtol=1e-5, atol=1e-5 * np.abs(rp).max())


def test_gradients_match_paper_formulas_and_finite_differences_float64():
  with jax.enable_x64(True):
    z, a, p = _random(jax.random.PRNGKey(3), dtype=jnp.float64)
    ga, gp = pj.gradients(z, a, p)
    loss, pa, pp = _paper_gradients(z, a, p)
    np.testing.assert_allclose(pj.loss(z, a, p), loss, rtol=1e-12)
    np.testing.assert_allclose(ga, pa, rtol=1e-10, atol=1e-10 * np.abs(pa).max())
    np.testing.assert_allclose(gp, pp, rtol=1e-10, atol=1e-10 * np.abs(pp).max())
    # Central differences along random directions.
    eps = 1e-6
    for i, (grad, arg) in enumerate([(ga, 1), (gp, 2)]):
      args = [z, a, p]
      direction = jax.random.normal(jax.random.PRNGKey(10 + i), args[arg].shape, jnp.float64)
      plus, minus = list(args), list(args)
      plus[arg] = args[arg] + eps * direction
      minus[arg] = args[arg] - eps * direction
      numeric = (pj.loss(*plus) - pj.loss(*minus)) / (2 * eps)
      np.testing.assert_allclose(jnp.vdot(grad, direction), numeric, rtol=1e-7)


def test_expanded_loss_equals_residual_loss():
  with jax.enable_x64(True):
    z, a, p = _random(jax.random.PRNGKey(5), dtype=jnp.float64)
    u = objective.unfold(z)
    expanded = objective.loss_from_projection(objective.squared_norm(u),
                                              objective.project_parts(u, p), a, p)
    np.testing.assert_allclose(expanded, pj.loss(z, a, p), rtol=1e-12)


def test_nhwc_and_nsc_layouts_agree():
  z, a, p = _random(jax.random.PRNGKey(6), s=12)
  np.testing.assert_allclose(pj.loss(z.reshape(3, 3, 4, 7), a, p), pj.loss(z, a, p), rtol=1e-6)


@pytest.mark.parametrize("bad", ["appearances", "parts", "features"])
def test_shape_errors(bad):
  z, a, p = _random(jax.random.PRNGKey(0))
  args = dict(features=z, appearances=a, parts=p)
  args[bad] = args[bad][0] if bad == "features" else args[bad][:-1]  # wrong rank / size
  with pytest.raises(ValueError, match=bad if bad != "features" else "features must be"):
    pj.loss(**args)
