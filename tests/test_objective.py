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
  """Roundings along the longest chain: in ours `A^T (Z P)` -> `G_A (.)` (`G_A = A^T A`) ->
  `(.) G_P` -> `A (.)` -> `Z^T (.)` and the sum over samples (contractions s, c + c, r_c,
  r_s, r_c, c, n), in the paper's order two [s, s] / [c, c] products more; a few additions."""
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


def _change_case(key, n=4, c=9, rank_c=3, rank_s=5, size=1e-4):
  """Coefficients, Grams and small changes of all three (`size` relative): float32."""
  k = jax.random.split(key, 6)
  lam = jax.random.normal(k[0], (n, rank_c, rank_s))
  a = jax.random.normal(k[1], (c, rank_c))
  p = jax.random.uniform(k[2], (20, rank_s))
  d_lam = size * jax.random.normal(k[3], lam.shape)
  d_a = size * jax.random.normal(k[4], a.shape)
  d_p = size * jax.random.uniform(k[5], p.shape)
  return lam, d_lam, a, d_a, p, d_p


@pytest.mark.parametrize("which", ["parts", "appearances"])
def test_coefficient_change_is_exact_relative_to_the_change(which):
  """`coefficient_change` against the float64 difference of the expanded loss
  `-2 ||Lambda||^2 + <G_A Lambda, Lambda G_P>` at the new and old values (the
  constant `||Z||^2` cancels). The changes are 1e-4 of the values; `coefficient_change` must be within gamma(K) of its own terms on absolute values
  (K: the longest chain, an `[r_c, r_c]` or `[r_s, r_s]` product, then a dot of
  length n r_c r_s, a few additions), far below the loss's own rounding."""
  lam, d_lam, a, d_a, p, d_p = _change_case(jax.random.PRNGKey(11))
  gram_a, gram_p = a.T @ a, p.T @ p
  if which == "parts":
    kwargs, grams_new = dict(d_gram_p=objective.gram_change(p, d_p)), (a, p + d_p)
  else:
    kwargs, grams_new = dict(d_gram_a=objective.gram_change(a, d_a)), (a + d_a, p)
  ours = objective.coefficient_change(lam, d_lam, gram_a, gram_p, **kwargs)

  def loss64(lam, a, p):
    lam, a, p = (np.asarray(x, np.float64) for x in (lam, a, p))
    g_a, g_p = a.T @ a, p.T @ p
    return -2 * np.sum(lam**2) + sum(np.sum((g_a @ l) * (l @ g_p)) for l in lam)

  lam64 = np.asarray(lam, np.float64) + np.asarray(d_lam, np.float64)
  exact = loss64(lam64, *grams_new) - loss64(lam, a, p)
  # Terms of the change on absolute values (`d_gram` by its own absolute formula).
  absd = lambda x: np.abs(np.asarray(x, np.float64))
  l_abs, d_abs, new_abs = absd(lam), absd(d_lam), absd(lam) + absd(d_lam)
  ga_abs, gp_abs = absd(a).T @ absd(a), absd(p).T @ absd(p)
  dga = 2 * absd(a).T @ absd(d_a) + absd(d_a).T @ absd(d_a) if which != "parts" else 0 * ga_abs
  dgp = 2 * absd(p).T @ absd(d_p) + absd(d_p).T @ absd(d_p) if which == "parts" else 0 * gp_abs
  terms = sum(
    4 * np.sum(li * di)
    + 2 * np.sum(di**2)
    + 2 * np.sum((ga_abs @ li) * (di @ gp_abs))
    + np.sum((ga_abs @ di) * (di @ gp_abs))
    + np.sum((dga @ ni) * (ni @ gp_abs))
    + np.sum(((ga_abs + dga) @ ni) * (ni @ dgp))
    for li, di, ni in zip(l_abs, d_abs, new_abs)
  )
  n, rank_c, rank_s = lam.shape
  g = gamma(2 * (rank_c + rank_s) + n * rank_c * rank_s + 8)
  bound = g * terms
  # A float32 difference of two expanded losses is only good to gamma(K) of the loss's
  # own terms: this bound is 100x tighter, so the test would catch one.
  loss_terms = sum(2 * np.sum(li**2) + np.sum((ga_abs @ li) * (li @ gp_abs)) for li in l_abs)
  assert bound < 0.01 * g * loss_terms
  assert_within(ours, exact, bound, "coefficient_change")


def test_positions_product_and_gram_change_against_numpy():
  """`sum_i Z_i^T B_i` and `(F + D)^T (F + D) - F^T F` against float64 NumPy: sums of
  products of length n c (a sum over c, then over n) and 2 c + 1."""
  k = jax.random.split(jax.random.PRNGKey(12), 4)
  z = jax.random.normal(k[0], (3, 7, 10))
  b = jax.random.normal(k[1], (3, 7, 4))
  z64, b64 = np.asarray(z, np.float64), np.asarray(b, np.float64)
  expected = sum(zi.T @ bi for zi, bi in zip(z64, b64))
  scale = sum(np.abs(zi).T @ np.abs(bi) for zi, bi in zip(z64, b64))
  assert_within(objective.positions_product(z, b), expected, gamma(7 + 3) * scale, "Z^T B")
  f = jax.random.normal(k[2], (7, 3))
  d = jax.random.normal(k[3], (7, 3))
  f64, d64 = np.asarray(f, np.float64), np.asarray(d, np.float64)
  expected = (f64 + d64).T @ (f64 + d64) - f64.T @ f64
  scale = 2 * np.abs(f64).T @ np.abs(d64) + np.abs(d64).T @ np.abs(d64)
  assert_within(objective.gram_change(f, d), expected, gamma(2 * 7 + 2) * scale, "gram change")


@pytest.mark.parametrize("n,rank_c,rank_s", [(6, 4, 3), (2, 9, 3)])
def test_appearances_change_either_order_is_the_exact_change(n, rank_c, rank_s):
  """The A block's trial change, with `dG_A` formed (r_c <= n r_s) or through the
  decodings (r_c > n r_s), against the float64 expanded loss at `A + delta` minus at
  `A` (`M` fixed). Float64 throughout: both sides are within a few u64 of the loss's
  terms on absolute values (chains of length c + r_c + r_s + n r_c r_s)."""
  with jax.enable_x64(True):
    k = jax.random.split(jax.random.PRNGKey(13), 3)
    c = 9
    zp = jax.random.normal(k[0], (n, c, rank_s), jnp.float64)
    a = jax.random.normal(k[1], (c, rank_c), jnp.float64)
    delta = 1e-3 * jax.random.normal(k[2], a.shape, jnp.float64)
    p_gram = jnp.eye(rank_s, dtype=jnp.float64) + 0.1
    ours = objective.appearances_change(
      zp, objective.coefficients(zp, a), a, delta, a.T @ a, p_gram
    )
    expanded = lambda a: objective.loss_from_coefficients(
      0.0, objective.coefficients(zp, a), a.T @ a, p_gram
    )
    a_abs = jnp.abs(a) + jnp.abs(delta)
    lam_abs = objective.coefficients(jnp.abs(zp), a_abs)
    scale = 2 * jnp.vdot(lam_abs, lam_abs) + jnp.vdot(
      (a_abs.T @ a_abs) @ lam_abs, lam_abs @ jnp.abs(p_gram)
    )
    bound = 4 * gamma(c + 2 * rank_c + 2 * rank_s + n * rank_c * rank_s + 8, U64) * scale
    assert_within(ours, expanded(a + delta) - expanded(a), bound, "appearances change")
