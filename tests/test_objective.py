"""Eq. (3) and its reordered gradients (Eqs. 4-5) against the paper's formulas
written literally (float64 NumPy), autodiff and finite differences.

Tolerances are rounding bounds (tests/_bounds.py): every quantity here is a sum
of products of Z, A and P, and a computed chain of matrix products with
contraction lengths k_1..k_m is off by at most gamma(k_1 + ... + k_m) times the
same chain on absolute values, in any association (Higham 2002, Sec. 3.5). So
each result is within gamma(K) of the paper's formula evaluated on |Z|, |A|, |P|
with every sign made positive (`_paper(..., absolute=True)`), K the longest
chain of roundings (`_chain`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _bounds import U64, assert_within, gamma
import panda_jax as pj
from panda_jax import objective


def _random(key, n=3, s=20, c=7, rank_c=4, rank_s=5, dtype=jnp.float32):
  k1, k2, k3 = jax.random.split(key, 3)
  return (
    jax.random.normal(k1, (n, s, c), dtype),
    jax.random.normal(k2, (c, rank_c), dtype),
    jax.random.uniform(k3, (s, rank_s), dtype),
  )


def _chain(z, a, p):
  """Roundings along the longest chain: in ours `A^T (Z P)` -> `A (.)` -> `A^T (.)` -> `A (.)`
  -> `(.) G_P` -> `Z^T (.)` and the sum over samples (contractions s, c, r_c, c, r_c, r_s
  + s, c, n), in the paper's order two [s, s] / [c, c] products more; a few additions."""
  n, s, c = z.shape
  return n + 4 * s + 5 * c + 2 * a.shape[1] + 2 * p.shape[1] + 8


def _paper(z, a, p, absolute=False):
  """Eq. (3) and Eqs. (4)-(5) exactly as printed (with S x S and C x C products), NumPy
  float64: `(loss, dA, dP)`. `absolute`: on |Z|, |A|, |P| with every term added (the
  scale of the rounding bounds; the loss as sum_i (|Z_i| + |A A^T| |Z_i| |P P^T|)^2)."""
  z = np.swapaxes(np.asarray(z, np.float64), 1, 2)  # Z_i(3): [n, c, s]
  a, p = np.asarray(a, np.float64), np.asarray(p, np.float64)
  sign = 1 if absolute else -1
  if absolute:
    z, a, p = np.abs(z), np.abs(a), np.abs(p)
  abar, pbar = a @ a.T, p @ p.T
  gp = 2 * sum(
    pbar @ zi.T @ abar @ abar @ zi @ p
    + zi.T @ abar @ abar @ zi @ pbar @ p
    + sign * 2 * zi.T @ abar @ zi @ p
    for zi in z
  )
  ga = 2 * sum(
    abar @ zi @ pbar @ pbar @ zi.T @ a
    + zi @ pbar @ pbar @ zi.T @ abar @ a
    + sign * 2 * zi @ pbar @ zi.T @ a
    for zi in z
  )
  loss = sum(np.sum((zi + sign * abar @ zi @ pbar) ** 2) for zi in z)
  return loss, ga, gp


def _loss_bound(z, a, p, u):
  """Eq. (3) as a sum over the n c s residual entries R = Z - A A^T Z P P^T: each entry is
  off by gamma(K) of its absolute scale, the sum of squares adds gamma(n c s): in all
  gamma(2 K + n c s + 1) sum_i (|Z_i| + |A A^T| |Z_i| |P P^T|)^2."""
  return gamma(2 * _chain(z, a, p) + z.size + 1, u) * _paper(z, a, p, absolute=True)[0]


@pytest.mark.parametrize("seed", [0, 1])
def test_gradients_match_paper_and_autodiff_float32(seed):
  """Float32 ours and float32 autodiff of `pj.loss`, each within gamma(K) of the
  float64 formulas (the reference's own error, u64, is not counted)."""
  z, a, p = _random(jax.random.PRNGKey(seed))
  _, pa, pp = _paper(z, a, p)
  _, abs_a, abs_p = _paper(z, a, p, absolute=True)
  g = gamma(_chain(z, a, p))
  ga, gp = pj.gradients(z, a, p)
  ra, rp = jax.grad(pj.loss, argnums=(1, 2))(z, a, p)
  for name, (da, dp) in (("ours", (ga, gp)), ("autodiff", (ra, rp))):
    assert_within(da, pa, g * abs_a, f"dA, {name}")
    assert_within(dp, pp, g * abs_p, f"dP, {name}")


def test_gradients_match_paper_formulas_and_finite_differences_float64():
  """Float64. Ours, autodiff and the paper's order are each within gamma(K) of
  the exact values: two of them differ by at most twice that.

  Finite differences: along a line, Eq. (3) is a polynomial of degree 4 in the
  step (A and P each appear four times), so the five-point stencil
  `(8 (f(h) - f(-h)) - (f(2h) - f(-2h))) / (12 h)` is its exact derivative; what
  remains is the rounding of the four values, each off by at most the loss bound
  plus the rounding of `x + t d` (u |x + t d| times |grad| on absolute values):
  18 / (12 h) of that.
  """
  with jax.enable_x64(True):
    z, a, p = _random(jax.random.PRNGKey(3), dtype=jnp.float64)
    loss, pa, pp = _paper(z, a, p)
    _, abs_a, abs_p = _paper(z, a, p, absolute=True)
    g = 2 * gamma(_chain(z, a, p), U64)
    assert_within(pj.loss(z, a, p), loss, 2 * _loss_bound(z, a, p, U64), "loss")
    ga, gp = pj.gradients(z, a, p)
    ra, rp = jax.grad(pj.loss, argnums=(1, 2))(z, a, p)
    for name, (da, dp) in (("ours", (ga, gp)), ("autodiff", (ra, rp))):
      assert_within(da, pa, g * abs_a, f"dA, {name}")
      assert_within(dp, pp, g * abs_p, f"dP, {name}")
    h = 1e-2
    for i, (grad, grad_abs, arg) in enumerate([(ga, abs_a, 1), (gp, abs_p, 2)]):
      direction = jax.random.normal(jax.random.PRNGKey(10 + i), grad.shape, jnp.float64)
      values, error = {}, 0.0
      for t in (-2, -1, 1, 2):
        args = [z, a, p]
        args[arg] = args[arg] + t * h * direction  # Two roundings of each entry.
        values[t] = pj.loss(*args)
        at_abs = _paper(*args, absolute=True)[arg]
        error = max(
          error,
          _loss_bound(*args, U64)
          + gamma(2, U64) * float(np.sum(np.abs(np.asarray(args[arg])) * at_abs)),
        )
      stencil = (8 * (values[1] - values[-1]) - (values[2] - values[-2])) / (12 * h)
      # The stencil's own four roundings; the directional derivative's: the gradient's
      # bound and a dot of length `size` on top.
      slope_abs = float(grad_abs.ravel() @ np.abs(np.asarray(direction)).ravel())
      assert_within(
        stencil,
        jnp.vdot(grad, direction),
        18 / (12 * h) * error
        + gamma(4, U64) * abs(float(stencil))
        + (g + gamma(grad.size, U64)) * slope_abs,
        f"finite differences, argument {arg}",
      )


def test_expanded_loss_equals_residual_loss():
  """Float64. The expanded form `sum ||Z_i||^2 - 2 ||Lambda_i||^2 + <B_i, B_i G_P>` is
  off by at most gamma(K + n c s) times its terms on absolute values (each bounded
  by the absolute loss scale: |Lambda|^2 and |B| |B G_P| are terms of it), the
  residual form by the loss bound."""
  with jax.enable_x64(True):
    z, a, p = _random(jax.random.PRNGKey(5), dtype=jnp.float64)
    u = objective.unfold(z)
    expanded = objective.loss_from_projection(
      objective.squared_norm(u), objective.project_parts(u, p), a, p
    )
    scale = _paper(z, a, p, absolute=True)[0]
    bound = 4 * gamma(2 * _chain(z, a, p) + z.size, U64) * scale + _loss_bound(z, a, p, U64)
    assert_within(expanded, pj.loss(z, a, p), bound, "expanded vs residual")


def test_layouts_and_unfolded_batches_give_the_same_loss():
  """`[n, h, w, c]`, `[n, s, c]` and `unfolded` are the same `[n, c, s]` array handed to the
  same compiled function: the same floats, no tolerance."""
  z, a, p = _random(jax.random.PRNGKey(6), s=12)
  expected = pj.loss(z, a, p)
  assert pj.loss(z.reshape(3, 3, 4, 7), a, p) == expected
  assert pj.loss(pj.unfolded(z), a, p) == expected
  for mine, theirs in zip(pj.gradients(pj.unfolded(z), a, p), pj.gradients(z, a, p)):
    np.testing.assert_array_equal(mine, theirs)


def test_loss_is_compiled_once_per_shape():
  z, a, p = _random(jax.random.PRNGKey(7))
  pj.loss(z, a, p)
  compiled = objective._residual_loss._cache_size()  # pylint: disable=protected-access
  pj.loss(z + 1, a, p * 2)
  assert objective._residual_loss._cache_size() == compiled  # pylint: disable=protected-access


@pytest.mark.parametrize("bad", ["appearances", "parts", "features"])
def test_shape_errors(bad):
  z, a, p = _random(jax.random.PRNGKey(0))
  args = dict(features=z, appearances=a, parts=p)
  args[bad] = args[bad][0] if bad == "features" else args[bad][:-1]  # wrong rank / size
  with pytest.raises(ValueError, match=bad if bad != "features" else "features must be"):
    pj.loss(**args)


def test_orthogonality_error():
  """`max |A^T A - I|` against float64: a dot of length c per entry, gamma(c) |A|^T |A|,
  and the subtraction of I."""
  a = jax.random.normal(jax.random.PRNGKey(8), (9, 4))
  a64 = np.asarray(a, np.float64)
  expected = np.max(np.abs(a64.T @ a64 - np.eye(4)))
  scale = np.max(np.abs(a64).T @ np.abs(a64)) + 1  # The subtraction of I: one rounding more.
  assert_within(pj.orthogonality_error(a), expected, gamma(9 + 1) * scale, "orthogonality")
  q = np.linalg.qr(a64)[0]  # Rounded to float32 first: two roundings more per product.
  assert pj.orthogonality_error(q) <= gamma(9 + 3) * (np.max(np.abs(q).T @ np.abs(q)) + 1)
