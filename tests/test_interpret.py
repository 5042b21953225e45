"""Saliency, localisation and ranking vs direct NumPy transcriptions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from panda_jax import interpret

N, H, W, C, RC = 5, 4, 4, 6, 3
S = H * W
TOL = dict(rtol=1e-5, atol=1e-5)


def _random(seed=0, n=N):
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(n, H, W, C)).astype(np.float32)
  a = np.linalg.qr(rng.normal(size=(C, RC)))[0].astype(np.float32)
  return z, a


def _np_saliency(z, a):
  """m_ik = a_k^T Z_i(3), stacked as [n, s, r_c]."""
  return np.stack([(a.T @ zi.reshape(S, C).T).T for zi in z])


def test_saliency_matches_numpy_for_both_layouts():
  z, a = _random()
  expected = _np_saliency(z, a)
  np.testing.assert_allclose(interpret.saliency(z, a), expected, **TOL)
  np.testing.assert_allclose(interpret.saliency(z.reshape(N, S, C), a), expected,
                             **TOL)
  with pytest.raises(ValueError, match="appearances must be"):
    interpret.saliency(z, a[1:])


def test_upsample_saliency():
  z, a = _random()
  maps = interpret.saliency(z, a)
  nearest = interpret.upsample_saliency(maps, (H, W), (3 * H, 3 * W), "nearest")
  blocks = np.kron(np.asarray(maps).reshape(N, H, W, RC),
                   np.ones((1, 3, 3, 1), np.float32))
  np.testing.assert_allclose(nearest, blocks, **TOL)
  flat = jnp.full((1, S, 2), 1.5)
  np.testing.assert_allclose(
      interpret.upsample_saliency(flat, (H, W), (10, 12)), np.full((1, 10, 12, 2), 1.5),
      **TOL)
  with pytest.raises(ValueError, match="maps must be"):
    interpret.upsample_saliency(maps, (H, W + 1), (8, 8))


def test_concept_means_streamed_equal_dataset_mean():
  z, a = _random(n=11)
  batches = [z[:4], z[4:5], z[5:]]  # unequal sizes
  mu = interpret.concept_means(batches, a)
  np.testing.assert_allclose(mu, _np_saliency(z, a).mean(axis=(0, 1)), **TOL)
  with pytest.raises(ValueError, match="no batch"):
    interpret.concept_mean_finalize(interpret.concept_mean_init(RC))


def test_localise_matches_threshold():
  z, a = _random()
  maps = np.asarray(interpret.saliency(z, a))
  mu = maps.mean(axis=(0, 1))
  masks = np.asarray(interpret.localise(maps, mu))
  np.testing.assert_array_equal(masks, maps >= mu[None, None, :])
  assert 0 < masks.mean() < 1
  with pytest.raises(ValueError, match="mu must be"):
    interpret.localise(maps, mu[:2])


def test_rank_matches_equations_17_and_18():
  z, a = _random()
  m = _np_saliency(z, a)[:, :, 1]  # a_1^T Z_i, [n, s]
  np.testing.assert_allclose(interpret.rank(z, a, 1), m @ np.ones(S), **TOL)
  p = np.random.default_rng(1).uniform(size=S).astype(np.float32)
  np.testing.assert_allclose(interpret.rank(z, a, 1, p), m @ p, **TOL)
  refined = np.random.default_rng(2).uniform(size=(N, S)).astype(np.float32)
  np.testing.assert_allclose(interpret.rank(z, a, 1, refined),
                             np.sum(m * refined, axis=1), **TOL)
  np.testing.assert_allclose(jax.jit(lambda z, p: interpret.rank(z, a, 1, p))(z, p),
                             m @ p, **TOL)
  with pytest.raises(ValueError, match="non-negative"):
    interpret.rank(z, a, 1, -p)
  with pytest.raises(ValueError, match="part must be"):
    interpret.rank(z, a, 1, p[1:])
  with pytest.raises(ValueError, match="appearance must be"):
    interpret.rank(z, a, RC, p)


def _planted(seed=0, n=40):
  """Concept 0 planted with amount t_i in the top half, u_i in the bottom half."""
  rng = np.random.default_rng(seed)
  a = np.linalg.qr(rng.normal(size=(C, RC)))[0].astype(np.float32)
  t = rng.permutation(n).astype(np.float32)
  u = (rng.permutation(n) / n).astype(np.float32)  # t + u has no ties
  top = np.zeros((H, W), np.float32)
  top[: H // 2] = 1
  amount = t[:, None, None] * top + u[:, None, None] * (1 - top)  # [n, H, W]
  z = amount[..., None] * a[:, 0] + 0.01 * rng.normal(size=(n, H, W, C))
  return z.astype(np.float32), a, t, u, top.reshape(S)


def test_rank_recovers_planted_order():
  z, a, t, u, top = _planted()
  np.testing.assert_array_equal(np.argsort(-np.asarray(interpret.rank(z, a, 0))),
                                np.argsort(-(t + u)))
  np.testing.assert_array_equal(np.argsort(-np.asarray(interpret.rank(z, a, 0, top))),
                                np.argsort(-t))
  np.testing.assert_array_equal(
      np.argsort(-np.asarray(interpret.rank(z, a, 0, 1 - top))), np.argsort(-u))


def test_streamed_ranking_returns_planted_top_and_bottom():
  z, a, t, u, top = _planted(1)
  batches = [z[i:i + 7] for i in range(0, len(z), 7)]
  k = 5
  result = interpret.rank_dataset(batches, a, 0, top, k=k)
  np.testing.assert_array_equal(result.top_index, np.argsort(-t)[:k])
  np.testing.assert_array_equal(result.bottom_index, np.argsort(t)[:k])
  assert np.all(np.diff(result.top_scores) < 0)
  assert np.all(np.diff(result.bottom_scores) > 0)
  scores = np.asarray(interpret.rank(z, a, 0, top))
  np.testing.assert_allclose(result.top_scores, scores[result.top_index], **TOL)
  # Fewer samples than k: only the seen ones come back.
  small = interpret.rank_dataset([z[:3]], a, 0, k=k)
  assert sorted(small.top_index.tolist()) == [0, 1, 2]
  with pytest.raises(ValueError, match="k must be"):
    interpret.rank_init(0)


def test_feature_grid():
  assert interpret.feature_grid(jnp.zeros((1, 2, 3, 4))) == (2, 3)
  assert interpret.feature_grid(jnp.zeros((1, 9, 4))) == (3, 3)
  with pytest.raises(ValueError, match="not a square"):
    interpret.feature_grid(jnp.zeros((1, 6, 4)))
