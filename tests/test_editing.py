"""Local editing, object removal and rewriting vs float64 NumPy transcriptions.

Tolerances are the float32 rounding bounds of each formula (tests/_bounds.py),
derived where the reference is defined.
"""

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _bounds import U32, U64, assert_within, dot_bound, gamma
from panda_jax import editing
from panda_jax import generators
from panda_jax import recipes

N, H, W, C, RC, RS = 3, 4, 6, 5, 4, 3
S = H * W


def _random(seed=0):
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(N, H, W, C)).astype(np.float32)
  a = np.linalg.qr(rng.normal(size=(C, RC)))[0].astype(np.float32)
  p = np.maximum(rng.normal(size=(S, RS)), 0).astype(np.float32)
  return z, a, p


def _np_weights(columns, normalise="minmax"):
  """`p^` of Sec. 3.3.1 in float64: the union `[(n,) s, t] -> [(n,) s]` mapped to [0, 1]."""
  summed = np.asarray(columns, np.float64).sum(-1)
  low = summed.min(-1, keepdims=True) if normalise == "minmax" else 0.0
  span = summed.max(-1, keepdims=True) - low
  return np.where(span == 0, 0.0, (summed - low) / np.where(span == 0, 1.0, span))


def _weights_error(columns):
  """Bound of |float32 p^ - p^| for the union of `columns` (`[(n,) s, t]`), per sample.

  The sum of t parts is off by E <= gamma(t - 1) max sum |p| at every position,
  so are its min and max; `(sum - low)` and `span` are then off by 2E plus one
  rounding each, and the quotient (<= 1) by one more rounding:
  |dp^| <= 4E / span + gamma(3) (first order; the gammas absorb the rest).
  """
  columns = np.asarray(columns, np.float64)
  summed = columns.sum(-1)
  span = summed.max(-1, keepdims=True) - summed.min(-1, keepdims=True)
  e = gamma(columns.shape[-1] - 1) * np.abs(columns).sum(-1).max(-1, keepdims=True)
  return 4 * e / np.maximum(span, 1e-300) * (1 + gamma(3)) + gamma(3)


def _np_edit(z, a, edits):
  """`Z_i + sum_t alpha_t a_j p^^T` in float64 and its float32 bound.

  Args:
    edits: `(weights [(n,) s], weights_error, j, alpha)` per edit.

  The bound: each term `alpha w a_j` takes two roundings after w's own error,
  the T terms are summed (T - 1 roundings) and added to Z (one more), so
  |error| <= u |Z| + sum_t |alpha_t| |a_j| (|dw_t| + gamma(T + 2)).
  """
  z64 = np.asarray(z, np.float64).reshape(N, S, C)
  delta, bound = 0.0, U32 * np.abs(z64)
  for weights, weights_error, j, alpha in edits:
    alpha = np.reshape(np.asarray(alpha, np.float64), (-1, 1, 1))
    weights = np.reshape(weights, (-1, S, 1))
    delta = delta + alpha * weights * np.asarray(a, np.float64)[:, j]
    bound = bound + np.abs(alpha) * np.abs(a[:, j]) * (
      np.reshape(weights_error, (-1, 1, 1)) + gamma(len(edits) + 2)
    )
  return (z64 + delta).reshape(z.shape), np.broadcast_to(bound, z64.shape).reshape(z.shape)


def _part_edit(z, a, columns, j, alpha, normalise="minmax"):
  """`_np_edit` of one edit at the union of `columns`."""
  return _np_edit(z, a, [(_np_weights(columns, normalise), _weights_error(columns), j, alpha)])


@pytest.mark.parametrize("normalise", ["minmax", "max"])
def test_edit_matches_numpy_index_union_and_refined(normalise):
  z, a, p = _random()
  assert_within(
    editing.edit(z, a, p, 1, 2, 7.5, normalise=normalise),
    *_part_edit(z, a, p[:, 1:2], 2, 7.5, normalise),
    "index",
  )
  assert_within(
    editing.edit(z, a, p, [0, 2], 1, -3.0, normalise=normalise),
    *_part_edit(z, a, p[:, [0, 2]], 1, -3.0, normalise),
    "union",
  )
  refined = np.abs(np.random.default_rng(1).normal(size=(N, S, RS))).astype(np.float32)
  alpha = np.array([1.0, -2.0, 4.0], np.float32)
  assert_within(
    editing.edit(z, a, refined, 2, 0, alpha, normalise=normalise),
    *_part_edit(z, a, refined[:, :, 2:3], 0, alpha, normalise),
    "refined",
  )


def test_minmax_and_max_differ_only_for_parts_without_zeros():
  z, a, p = _random()
  assert p[:, 1].min() == 0  # A part with zeros: both normalisations are p / max p.
  np.testing.assert_array_equal(
    editing.edit(z, a, p, 1, 2, 5.0), editing.edit(z, a, p, 1, 2, 5.0, normalise="max")
  )
  lifted = p + 0.5  # No zeros: min-max maps the minimum to 0, max-normalisation to > 0.
  weights = editing.part_weights(1, lifted, z)
  assert float(weights.min()) == 0 and float(weights.max()) == 1
  by_max = editing.part_weights(1, lifted, z, normalise="max")
  assert_within(by_max, _np_weights(lifted[:, 1:2], "max"), _weights_error(lifted[:, 1:2]))
  assert float(by_max.min()) > 0.1
  # A constant part has no region under min-max: no edit; max-normalisation edits everywhere.
  flat = np.full((S, 1), 0.3, np.float32)
  np.testing.assert_array_equal(editing.edit(z, a, flat, 0, 0, 5.0), z)
  np.testing.assert_array_equal(editing.part_weights(0, flat, z, normalise="max"), 1.0)
  with pytest.raises(ValueError, match="normalise must be"):
    editing.edit(z, a, p, 0, 0, 1.0, normalise="peak")


def test_edit_keeps_layout_and_several_triples_add():
  z, a, p = _random()
  out = editing.edit_many(z.reshape(N, S, C), a, p, [(0, 1, 2.0), ([1, 2], 3, -1.0)])
  assert out.shape == (N, S, C)
  expected, bound = _np_edit(
    z,
    a,
    [
      (_np_weights(p[:, :1]), _weights_error(p[:, :1]), 1, 2.0),
      (_np_weights(p[:, 1:]), _weights_error(p[:, 1:]), 3, -1.0),
    ],
  )
  assert_within(out, expected.reshape(N, S, C), bound.reshape(N, S, C))


def test_edit_alpha_zero_is_identity():
  z, a, p = _random()
  np.testing.assert_array_equal(editing.edit(z, a, p, [0, 1], 3, 0.0), z)


def test_mask_equal_to_binary_part_support_gives_same_edit():
  """Exact: the part's min-max weights and the mask's block means are 0 or 1 exactly."""
  z, a, p = _random()
  support = np.zeros((H, W), np.float32)
  support[1:3, 2:5] = 1
  p[:, 1] = 0.37 * support.reshape(S)  # a binary part (two values)
  image_mask = np.kron(support, np.ones((4, 4), np.float32))  # [4H, 4W]
  by_part = editing.edit(z, a, p, 1, 2, 5.0)
  np.testing.assert_array_equal(editing.edit(z, a, p, image_mask, 2, 5.0), by_part)
  np.testing.assert_array_equal(editing.edit(z, a, p, support.reshape(S), 2, 5.0), by_part)


def test_image_mask_is_area_averaged():
  """The mean of b = 6 pixels in [0, 1] is off by at most gamma(6) (5 additions, 1 division)."""
  rng = np.random.default_rng(3)
  mask = rng.uniform(size=(N, 2 * H, 3 * W)).astype(np.float32)
  expected = mask.astype(np.float64).reshape(N, H, 2, W, 3).mean(axis=(2, 4)).reshape(N, S)
  assert_within(editing.downsample_mask(mask, (H, W)), expected, gamma(6))
  z, a, p = _random()
  assert_within(
    editing.edit(z, a, p, mask, 0, 2.0),
    *_np_edit(z, a, [(expected, gamma(6), 0, 2.0)]),
    "mask edit",
  )


def test_edit_is_jittable():
  z, a, p = _random()
  mask = np.zeros((H, W), np.float32)
  mask[0, 0] = 1
  fn = jax.jit(lambda z, p, m, al: editing.edit_many(z, a, p, [([0, 1], 2, al), (m, 1, al)]))
  expected, bound = _np_edit(
    z,
    a,
    [(_np_weights(p[:, :2]), _weights_error(p[:, :2]), 2, 3.0), (mask.reshape(S), 0.0, 1, 3.0)],
  )
  assert_within(fn(z, p, mask, 3.0), expected, bound)


def test_vmap_over_triples_equals_the_loop_of_single_edits():
  """Issue 18 (5): traced part, appearance and alpha; `[t, n, h, w, c]` out."""
  z, a, p = _random()
  refined = np.abs(np.random.default_rng(5).normal(size=(N, S, RS))).astype(np.float32)
  ks, js = np.array([0, 2, 1, 2]), np.array([3, 0, 1, 1])
  alphas = np.array([2.0, -4.0, 0.5, 8.0], np.float32)
  for parts in (p, refined):
    batched = jax.jit(jax.vmap(lambda k, j, al: editing.edit(z, a, parts, k, j, al)))(
      ks, js, alphas
    )
    assert batched.shape == (len(ks), N, H, W, C)
    for t, (k, j, al) in enumerate(zip(ks, js, alphas)):
      expected, bound = _part_edit(z, a, parts[..., k : k + 1], j, al)
      assert_within(batched[t], expected, bound, f"vmap edit {t}")
      assert_within(editing.edit(z, a, parts, int(k), int(j), al), expected, bound, "loop")
  # A union of traced indices, and several traced triples in one call.
  union = jax.jit(lambda ks: editing.edit(z, a, p, ks, 1, 3.0))(jnp.array([0, 2]))
  assert_within(union, *_part_edit(z, a, p[:, [0, 2]], 1, 3.0), "traced union")
  many = jax.jit(lambda k, j: editing.edit_many(z, a, p, [(k, j, 1.0), ([k, 1], 0, 2.0)]))(
    jnp.int32(2), jnp.int32(3)
  )
  assert_within(
    many,
    *_np_edit(
      z,
      a,
      [
        (_np_weights(p[:, 2:3]), _weights_error(p[:, 2:3]), 3, 1.0),
        (_np_weights(p[:, [2, 1]]), _weights_error(p[:, [2, 1]]), 0, 2.0),
      ],
    ),
    "traced edit_many",
  )


def test_traced_index_out_of_range_gives_nan():
  z, a, p = _random()
  for part, appearance in ((RS, 0), (-1, 0), (0, RC), (0, -1)):
    out = jax.jit(lambda k, j: editing.edit(z, a, p, k, j, 1.0))(part, appearance)
    assert np.all(np.isnan(out)), (part, appearance)
  assert np.all(np.isnan(jax.jit(lambda j: editing.rewrite(z, a, j, 0, 1.0))(RC)))


@pytest.mark.parametrize(
  "part, appearance, alpha, message",
  [
    (RS, 0, 1.0, "part must be an integer"),
    (-1, 0, 1.0, "part must be an integer"),
    ([0, 0], 0, 1.0, "repeated"),
    (np.array([1, 1]), 0, 1.0, "repeated"),
    ([], 0, 1.0, "empty"),
    ([0, 1.5], 0, 1.0, "must hold integers"),
    (np.zeros((H, W), np.int32), 0, 1.0, "float or bool"),
    (True, 0, 1.0, "part must be an index"),
    ("eyes", 0, 1.0, "part must be an int"),
    (np.ones((H + 1, W), np.float32), 0, 1.0, "multiple of the grid"),
    (np.ones((S + 1,), np.float32), 0, 1.0, "mask must be"),
    (np.full((H, W), 2.0, np.float32), 0, 1.0, r"\[0, 1\]"),
    (0, RC, 1.0, "appearance must be"),
    (0, 1.0, 1.0, "appearance must be"),
    (0, np.array([0, 1]), 1.0, "appearance must be one index"),
    (0, 0, float("nan"), "alpha contains"),
    (0, 0, np.ones(N + 1, np.float32), "alpha must be"),
  ],
)
def test_edit_bad_input_raises(part, appearance, alpha, message):
  z, a, p = _random()
  with pytest.raises(ValueError, match=message):
    editing.edit(z, a, p, part, appearance, alpha)


def test_edit_bad_factors_raise():
  z, a, p = _random()
  with pytest.raises(ValueError, match="appearances must be"):
    editing.edit(z, a[:-1], p, 0, 0, 1.0)
  with pytest.raises(ValueError, match="parts must be"):
    editing.edit(z, a, p[:-1], 0, 0, 1.0)


def _np_coefficients(z, a, j, k, alpha):
  """`(Z^, Z^')` of Eqs. (14)-(16) in float64, `[n, s, r_c]` (the paper's rows as columns)."""
  zhat = np.asarray(z, np.float64).reshape(-1, S, C) @ np.asarray(a, np.float64)
  alpha = np.reshape(np.asarray(alpha, np.float64), (-1, 1))
  new = zhat.copy()
  new[..., k] += alpha * np.maximum(zhat[..., j], 0)
  new[..., j] = np.minimum(zhat[..., j], 0)
  return zhat, new


def _np_rewrite(z, a, j, k, alpha, keep_residual=True):
  """The rewritten features in float64, `Z + A (Z^' - Z^)` or the paper's `A Z^'`,
  and the float32 bound.

  Bound: `pos = [z . a_j]_+` is off by d <= gamma(c) |z| . |a_j| (clipping adds
  none); `alpha pos a_k` takes two roundings, `pos a_j` one, their difference
  one: |d delta| <= (|alpha| |a_k| + |a_j|) (d + gamma(3) (pos + d)). The base
  `Z` is exact; `(Z A) A^T` is off by gamma(r_c) (|Z A| + e) |A|^T + e |A|^T with
  e = gamma(c) |Z| |A| the first contraction's error. The final sum rounds once
  more: + u (|result| + bound).
  """
  z64, a64 = np.asarray(z, np.float64).reshape(-1, S, C), np.asarray(a, np.float64)
  r_c = a64.shape[1]
  alpha64 = np.reshape(np.asarray(alpha, np.float64), (-1, 1, 1))
  zhat, new = _np_coefficients(z, a, j, k, alpha)
  out = z64 + (new - zhat) @ a64.T if keep_residual else new @ a64.T
  positive = np.maximum(zhat[..., j : j + 1], 0)
  d_positive = dot_bound(np.abs(z64), np.abs(a64[:, j : j + 1]), C)
  size = np.abs(alpha64) * np.abs(a64[:, k]) + np.abs(a64[:, j])
  bound = size * (d_positive + gamma(3) * (positive + d_positive))
  if not keep_residual:
    d_coefficients = dot_bound(np.abs(z64), np.abs(a64), C)
    bound = (
      bound
      + dot_bound(np.abs(zhat) + d_coefficients, np.abs(a64).T, r_c)
      + d_coefficients @ np.abs(a64).T
    )
  bound = bound + U32 * (np.abs(out) + bound)
  return out.reshape(z.shape), bound.reshape(z.shape)


def _full_basis(seed=0):
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(N, H, W, C)).astype(np.float32)
  a = np.linalg.qr(rng.normal(size=(C, C)))[0].astype(np.float32)
  return z, a


@pytest.mark.parametrize("keep_residual", [True, False])
def test_rewrite_matches_numpy(keep_residual):
  for z, a in (_full_basis(), _random(2)[:2]):  # r_c = c and r_c < c
    for j, k, alpha in [(0, 3, 1.0), (3, 1, 0.5), (2, 0, 2.0)]:
      assert_within(
        editing.rewrite(z, a, j, k, alpha, keep_residual=keep_residual),
        *_np_rewrite(z, a, j, k, alpha, keep_residual),
        f"rewrite {j}->{k}",
      )


def test_rewrite_forms_agree_for_a_full_orthogonal_basis():
  """`A Z^' = Z + A (Z^' - Z^) - (I - A A^T) Z`: with `A A^T = I` (up to the
  float32 QR's rounding, `gap`, evaluated in float64) the two forms agree within
  their two bounds."""
  z, a = _full_basis(1)
  _, paper_bound = _np_rewrite(z, a, 1, 3, 1.0, keep_residual=False)
  _, ours_bound = _np_rewrite(z, a, 1, 3, 1.0)
  a64 = a.astype(np.float64)
  gap = np.abs(z.reshape(-1, C).astype(np.float64) @ (np.eye(C) - a64 @ a64.T)).reshape(z.shape)
  assert_within(
    editing.rewrite(z, a, 1, 3, 1.0, keep_residual=False),
    editing.rewrite(z, a, 1, 3, 1.0),
    paper_bound + ours_bound + 2 * gap,
  )


def test_rewrite_is_jittable_and_vmaps_over_concepts():
  z, a = _full_basis()
  alpha = np.array([0.5, 1.0, 2.0], np.float32)
  jitted = jax.jit(lambda z, al: editing.rewrite(z, a, 2, 4, al))(z, alpha)
  assert_within(jitted, *_np_rewrite(z, a, 2, 4, alpha), "jit")
  pairs = np.array([[2, 4], [0, 1], [3, 0]])
  batched = jax.vmap(lambda jk: editing.rewrite(z, a, jk[0], jk[1], 1.5))(pairs)
  for t, (j, k) in enumerate(pairs):
    assert_within(batched[t], *_np_rewrite(z, a, j, k, 1.5), f"vmap {j}->{k}")


def test_rewrite_alpha_one_moves_positive_mass():
  """In the basis: `out A = Z^' + (Z^' - Z^)(A^T A - I)` for the exact `out`, so
  the float32 result projected (in float64) is `Z^'` up to its bound carried
  through |A|, the float32 basis' non-orthonormality, and float64 rounding."""
  z, a = _full_basis(1)
  j, k = 1, 3
  out = np.asarray(editing.rewrite(z, a, j, k, 1.0), np.float64).reshape(-1, S, C)
  _, bound = _np_rewrite(z, a, j, k, 1.0)
  zhat, new = _np_coefficients(z, a, j, k, 1.0)
  a64 = a.astype(np.float64)
  float64_error = gamma(2 * C + 2, U64) * (np.abs(out) + np.abs(z.reshape(-1, S, C))) @ np.abs(a64)
  tolerance = (
    bound.reshape(-1, S, C) @ np.abs(a64)
    + np.abs(new - zhat) @ np.abs(a64.T @ a64 - np.eye(C))
    + float64_error
  )
  assert_within(out @ a64, new, tolerance)
  assert np.maximum(zhat[..., j], 0).sum() > 1.0  # Mass did move.


def test_rewrite_low_rank_keeps_residual():
  """With r_c < c the edit `A (Z^' - Z^)` lies in the span of A: projected by
  `I - A A^T` the result is Z's projection, up to the bound carried through
  |I - A A^T|, `A^T (I - A A^T)` of the float32 basis, and float64 rounding."""
  z, a, _ = _random(2)
  out = np.asarray(editing.rewrite(z, a, 0, 2, 1.5), np.float64).reshape(-1, S, C)
  _, bound = _np_rewrite(z, a, 0, 2, 1.5)
  zhat, new = _np_coefficients(z, a, 0, 2, 1.5)
  a64 = a.astype(np.float64)
  projector = np.eye(C) - a64 @ a64.T
  z64 = z.astype(np.float64).reshape(-1, S, C)
  tolerance = (
    bound.reshape(-1, S, C) @ np.abs(projector)
    + np.abs(new - zhat) @ np.abs(a64.T @ projector)
    + gamma(3 * C, U64) * (np.abs(out) + np.abs(z64)) @ (np.eye(C) + np.abs(a64) @ np.abs(a64.T))
  )
  assert_within(out @ projector, z64 @ projector, tolerance)


def test_rewrite_bad_input_raises():
  z, a = _full_basis()
  with pytest.raises(ValueError, match="must differ"):
    editing.rewrite(z, a, 1, 1, 1.0)
  with pytest.raises(ValueError, match="target must be"):
    editing.rewrite(z, a, 1, C, 1.0)
  with pytest.raises(ValueError, match="alpha contains"):
    editing.rewrite(z, a, 0, 1, float("nan"))


def _planted_background(seed=0, h=6, w=6):
  """Concept 2 on the border ring, concept 0 in the interior."""
  rng = np.random.default_rng(seed)
  a = np.linalg.qr(rng.normal(size=(C, RC)))[0].astype(np.float32)
  ring = np.ones((h, w), np.float32)
  ring[1:-1, 1:-1] = 0
  z = (
    3 * ring[None, :, :, None] * a[:, 2]
    + 3 * (1 - ring)[None, :, :, None] * a[:, 0]
    + 0.3 * rng.normal(size=(N, h, w, C))
  )
  return z.astype(np.float32), a


def test_propose_background_finds_the_border_concept():
  z, a = _planted_background()
  k, scores = editing.propose_background(z, a)
  assert int(k) == 2
  assert scores.shape == (RC,)
  assert float(scores[2]) > 0.9  # all border cells in, no interior cell in
  k_jit, _ = jax.jit(editing.propose_background)(z, a)
  assert int(k_jit) == 2
  with pytest.raises(ValueError, match="border must be"):
    editing.propose_background(z, a, border=3)


def test_remove_object_adds_the_background():
  """The same formula as `edit` with j = b: equal bit for bit eagerly; jitted (XLA
  may fuse differently) both lie within the float64 edit's bound."""
  z, a = _planted_background()
  p = np.abs(np.random.default_rng(4).normal(size=(36, RS))).astype(np.float32)
  removed, b = editing.remove_object(z, a, p, 1, 4.0)
  assert int(b) == 2
  np.testing.assert_array_equal(removed, editing.edit(z, a, p, 1, 2, 4.0))
  jitted, b = jax.jit(lambda z: editing.remove_object(z, a, p, 1, 4.0))(z)
  assert int(b) == 2
  weights, error = _np_weights(p[:, 1:2]), _weights_error(p[:, 1:2])
  delta = 4.0 * weights[:, None] * a[:, 2].astype(np.float64)
  bound = U32 * np.abs(z) + 4.0 * np.abs(a[:, 2]) * (error + gamma(3))
  assert_within(jitted, z + delta.reshape(6, 6, C), bound)
  removed, b = editing.remove_object(z, a, p, [0, 1], 4.0, background=3)
  assert b == 3
  np.testing.assert_array_equal(removed, editing.edit(z, a, p, [0, 1], 3, 4.0))
  traced, _ = jax.jit(lambda b: editing.remove_object(z, a, p, 1, 4.0, background=b))(2)
  assert_within(traced, z + delta.reshape(6, 6, C), bound)


def test_max_normalisation_is_the_former_formula_bit_for_bit():
  """`normalise="max"` computes `(p - 0) / (max p - 0)`; `p - 0` is exact, so it runs
  the former code's operations (transcribed here) on the same values, and cards made
  before replay the same pixels."""
  z, a, p = _random()
  refined = np.abs(np.random.default_rng(6).normal(size=(N, S, RS))).astype(np.float32)
  for parts, part in ((p, 1), (p, [0, 2]), (refined, 2), (refined, [1, 2])):
    summed = jnp.sum(jnp.asarray(parts)[..., np.atleast_1d(part)], axis=-1)
    peak = jnp.max(summed, axis=-1, keepdims=True)
    former = jnp.where(peak > 0, summed / jnp.where(peak > 0, peak, 1), 0)
    np.testing.assert_array_equal(editing.part_weights(part, parts, z, normalise="max"), former)


def test_recipe_cards_record_the_edit_and_format_1_replays_as_made():
  """A format-1 card (before normalisation and refinement were recorded) replays
  exactly as a new card that records what the library did then: "max" and the
  ungated translation; so does a format-2 card with the translation (recorded
  before the gate existed); a new card records min-max and the gated translation."""
  gen = generators.load("toyfaces")
  rng = np.random.default_rng(7)
  factors = types.SimpleNamespace(
    appearances=jnp.asarray(np.linalg.qr(rng.normal(size=(64, 4)))[0], jnp.float32),
    parts=jnp.asarray(np.maximum(rng.normal(size=(256, 4)), 0) + 0.1, jnp.float32),
  )
  ids = dict(
    generator=recipes.generator_identity("toyfaces", gen),
    factors=recipes.factors_identity(factors, 5),
  )
  then = recipes.make_card(
    **ids,
    part=[0, 2],
    appearance=1,
    alpha=30.0,
    seed=0,
    seeds=[1],
    normalise="max",
    refined={"method": "register", "k": None, "steps": 0, "min_gain": 0.0},
  )
  old = json.loads(json.dumps(then))
  old["format"] = "panda-jax-recipe/1"
  del old["edit"]["normalise"]
  old["edit"]["refined"] = True
  old["checksum"] = recipes._checksum(old)  # pylint: disable=protected-access
  old = recipes.validate(old)
  format_2 = json.loads(json.dumps(then))
  format_2["format"] = "panda-jax-recipe/2"
  del format_2["edit"]["refined"]["min_gain"]
  format_2["checksum"] = recipes._checksum(format_2)  # pylint: disable=protected-access
  format_2 = recipes.validate(format_2)
  assert (
    recipes.settings(old)
    == recipes.settings(then)
    == recipes.settings(format_2)
    == ("max", {"method": "register", "k": None, "steps": 0, "min_gain": 0.0})
  )
  _, from_old, roir_old = recipes.replay(old, gen, factors)
  _, from_then, roir_then = recipes.replay(then, gen, factors)
  np.testing.assert_array_equal(from_old, from_then)
  assert roir_old == roir_then
  now = recipes.make_card(
    **ids, part=[0, 2], appearance=1, alpha=30.0, seed=0, seeds=[1], refined=True
  )
  assert now["format"] == "panda-jax-recipe/3"
  assert now["edit"]["normalise"] == "minmax" and now["edit"]["refined"] == recipes.REFINE
  _, from_now, _ = recipes.replay(now, gen, factors)
  assert np.abs(from_now - from_old).max() > 0  # parts with no zeros: min-max differs
  bad = json.loads(json.dumps(now))
  bad["edit"]["normalise"] = "peak"
  bad["checksum"] = recipes._checksum(bad)  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="normalise must be"):
    recipes.validate(bad)
  bad = json.loads(json.dumps(now))
  bad["edit"]["refined"]["min_gain"] = 2.0
  bad["checksum"] = recipes._checksum(bad)  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="min_gain in"):
    recipes.validate(bad)
