"""Local editing, object removal and rewriting vs direct NumPy transcriptions."""
import jax
import numpy as np
import pytest

from panda_jax import editing

N, H, W, C, RC, RS = 3, 4, 6, 5, 4, 3
S = H * W
TOL = dict(rtol=1e-5, atol=1e-5)


def _random(seed=0):
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(N, H, W, C)).astype(np.float32)
  a = np.linalg.qr(rng.normal(size=(C, RC)))[0].astype(np.float32)
  p = np.maximum(rng.normal(size=(S, RS)), 0).astype(np.float32)
  return z, a, p


def _np_edit(z, a, p_col, j, alpha):
  """Eq. in Sec. 3.3.1 in the paper's layout: Z_i(3) + alpha a_j p^_k^T."""
  out = []
  for i in range(z.shape[0]):
    z3 = z[i].reshape(S, C).T  # [C, S], the mode-3 unfolding
    col = p_col if p_col.ndim == 1 else p_col[i]
    al = alpha if np.ndim(alpha) == 0 else alpha[i]
    out.append((z3 + al * np.outer(a[:, j], col / col.max())).T)
  return np.stack(out).reshape(z.shape)


def test_edit_matches_numpy_index_union_and_refined():
  z, a, p = _random()
  np.testing.assert_allclose(editing.edit(z, a, p, 1, 2, 7.5),
                             _np_edit(z, a, p[:, 1], 2, 7.5), **TOL)
  np.testing.assert_allclose(editing.edit(z, a, p, [0, 2], 1, -3.0),
                             _np_edit(z, a, p[:, 0] + p[:, 2], 1, -3.0), **TOL)
  refined = np.abs(np.random.default_rng(1).normal(size=(N, S, RS))).astype(np.float32)
  alpha = np.array([1.0, -2.0, 4.0], np.float32)
  np.testing.assert_allclose(editing.edit(z, a, refined, 2, 0, alpha),
                             _np_edit(z, a, refined[:, :, 2], 0, alpha), **TOL)


def test_edit_keeps_layout_and_several_triples_add():
  z, a, p = _random()
  flat = z.reshape(N, S, C)
  out = editing.edit_many(flat, a, p, [(0, 1, 2.0), ([1, 2], 3, -1.0)])
  assert out.shape == (N, S, C)
  expected = (_np_edit(z, a, p[:, 0], 1, 2.0) - z
              + _np_edit(z, a, p[:, 1] + p[:, 2], 3, -1.0))
  np.testing.assert_allclose(out, expected.reshape(N, S, C), **TOL)


def test_edit_alpha_zero_is_identity():
  z, a, p = _random()
  np.testing.assert_array_equal(editing.edit(z, a, p, [0, 1], 3, 0.0), z)


def test_mask_equal_to_binary_part_support_gives_same_edit():
  z, a, p = _random()
  support = np.zeros((H, W), np.float32)
  support[1:3, 2:5] = 1
  p[:, 1] = 0.37 * support.reshape(S)  # a binary part (two values)
  image_mask = np.kron(support, np.ones((4, 4), np.float32))  # [4H, 4W]
  by_part = editing.edit(z, a, p, 1, 2, 5.0)
  np.testing.assert_allclose(editing.edit(z, a, p, image_mask, 2, 5.0), by_part,
                             **TOL)
  np.testing.assert_allclose(editing.edit(z, a, p, support.reshape(S), 2, 5.0),
                             by_part, **TOL)


def test_image_mask_is_area_averaged():
  rng = np.random.default_rng(3)
  mask = rng.uniform(size=(N, 2 * H, 3 * W)).astype(np.float32)
  expected = mask.reshape(N, H, 2, W, 3).mean(axis=(2, 4)).reshape(N, S)
  np.testing.assert_allclose(editing.downsample_mask(mask, (H, W)), expected, **TOL)
  z, a, p = _random()
  got = editing.edit(z, a, p, mask, 0, 2.0)
  delta = 2.0 * expected[:, :, None] * a[None, None, :, 0]
  np.testing.assert_allclose(got, z + delta.reshape(N, H, W, C), **TOL)


def test_edit_is_jittable():
  z, a, p = _random()
  mask = np.zeros((H, W), np.float32)
  mask[0, 0] = 1
  fn = jax.jit(lambda z, p, m, al: editing.edit_many(
      z, a, p, [([0, 1], 2, al), (m, 1, al)]))
  expected = editing.edit_many(z, a, p, [([0, 1], 2, 3.0), (mask, 1, 3.0)])
  np.testing.assert_allclose(fn(z, p, mask, 3.0), expected, **TOL)


@pytest.mark.parametrize("part, appearance, alpha, message", [
    (RS, 0, 1.0, "part must be an integer"),
    ([0, 0], 0, 1.0, "repeated"),
    ([], 0, 1.0, "empty"),
    (np.ones((H + 1, W), np.float32), 0, 1.0, "multiple of the grid"),
    (np.ones((S + 1,), np.float32), 0, 1.0, "mask must be"),
    (np.full((H, W), 2.0, np.float32), 0, 1.0, r"\[0, 1\]"),
    (0, RC, 1.0, "appearance must be"),
    (0, 0, float("nan"), "alpha contains"),
    (0, 0, np.ones(N + 1, np.float32), "alpha must be"),
])
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


def _np_rewrite(z, a, j, k, alpha):
  """Eqs. (14)-(16) in the paper's layout, reconstructed with A Z^."""
  out = []
  for i in range(z.shape[0]):
    zhat = a.T @ z[i].reshape(S, -1).T  # [C, S]
    positive, negative = np.maximum(zhat[j], 0), np.minimum(zhat[j], 0)
    zhat[k] = zhat[k] + alpha * positive
    zhat[j] = negative
    out.append((a @ zhat).T)
  return np.stack(out).reshape(z.shape)


def _full_basis(seed=0):
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(N, H, W, C)).astype(np.float32)
  a = np.linalg.qr(rng.normal(size=(C, C)))[0].astype(np.float32)
  return z, a


def test_rewrite_matches_numpy():
  z, a = _full_basis()
  for j, k, alpha in [(0, 3, 1.0), (4, 1, 0.5), (2, 0, 2.0)]:
    np.testing.assert_allclose(editing.rewrite(z, a, j, k, alpha),
                               _np_rewrite(z, a, j, k, alpha), **TOL)


def test_rewrite_is_jittable():
  z, a = _full_basis()
  alpha = np.array([0.5, 1.0, 2.0], np.float32)
  jitted = jax.jit(lambda z, al: editing.rewrite(z, a, 2, 4, al))(z, alpha)
  expected = [_np_rewrite(z[i:i + 1], a, 2, 4, alpha[i]) for i in range(N)]
  np.testing.assert_allclose(jitted, np.concatenate(expected), **TOL)


def test_rewrite_alpha_one_moves_positive_mass():
  z, a = _full_basis(1)
  j, k = 1, 3
  before = np.einsum("nhwc,cr->nhwr", z, a)
  after = np.einsum("nhwc,cr->nhwr", np.asarray(editing.rewrite(z, a, j, k, 1.0)), a)
  np.testing.assert_allclose(after[..., j] + after[..., k],
                             before[..., j] + before[..., k], **TOL)
  np.testing.assert_allclose(after[..., j], np.minimum(before[..., j], 0), **TOL)
  moved = np.maximum(before[..., j], 0).sum()
  assert moved > 1.0
  np.testing.assert_allclose(after[..., k].sum() - before[..., k].sum(), moved,
                             rtol=1e-4)
  others = [r for r in range(C) if r not in (j, k)]
  np.testing.assert_allclose(after[..., others], before[..., others], **TOL)


def test_rewrite_low_rank_keeps_residual():
  z, a, _ = _random(2)  # r_c < c
  out = np.asarray(editing.rewrite(z, a, 0, 2, 1.5))
  projector = np.eye(C) - a @ a.T
  np.testing.assert_allclose(out @ projector, z @ projector, **TOL)


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
  z = (3 * ring[None, :, :, None] * a[:, 2] + 3 * (1 - ring)[None, :, :, None] * a[:, 0]
       + 0.3 * rng.normal(size=(N, h, w, C)))
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
  z, a = _planted_background()
  p = np.abs(np.random.default_rng(4).normal(size=(36, RS))).astype(np.float32)
  removed, b = editing.remove_object(z, a, p, 1, 4.0)
  assert int(b) == 2
  np.testing.assert_allclose(removed, editing.edit(z, a, p, 1, 2, 4.0), **TOL)
  jitted, b = jax.jit(lambda z: editing.remove_object(z, a, p, 1, 4.0))(z)
  assert int(b) == 2
  np.testing.assert_allclose(jitted, removed, **TOL)
  removed, b = editing.remove_object(z, a, p, [0, 1], 4.0, background=3)
  assert b == 3
  np.testing.assert_allclose(removed, editing.edit(z, a, p, [0, 1], 3, 4.0), **TOL)
