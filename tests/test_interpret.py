"""Saliency, localisation and ranking vs float64 NumPy transcriptions.

Tolerances are the float32 rounding bounds of each formula (tests/_bounds.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _bounds import assert_within, dot_bound, gamma
from panda_jax import interpret

N, H, W, C, RC = 5, 4, 4, 6, 3
S = H * W


def _random(seed=0, n=N):
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(n, H, W, C)).astype(np.float32)
  a = np.linalg.qr(rng.normal(size=(C, RC)))[0].astype(np.float32)
  return z, a


def _np_saliency(z, a):
  """m_ik = a_k^T Z_i(3), stacked as [n, s, r_c], float64."""
  return np.stack([(a.T @ zi.reshape(S, C).T).T for zi in np.asarray(z, np.float64)])


def _saliency_bound(z, a):
  """A dot product of length c per entry: gamma(c) |Z| |A|."""
  return dot_bound(np.abs(z).reshape(-1, S, C), np.abs(a), C)


def _rank_reference(z, a, j, part=None):
  """Eq. (17) / (18) in float64, and the float32 bound.

  `m = Z a_j` is off by e_s <= gamma(c) (|Z| |a_j|)_s; the weighted sum over s
  positions (one product and s - 1 additions per term) adds gamma(s) sum |m p|:
  |error| <= sum_s e_s |p_s| + gamma(s) sum_s (|m_s| + e_s) |p_s|.
  """
  m = _np_saliency(z, a)[:, :, j]
  e = _saliency_bound(z, a)[:, :, j]
  p = np.ones(S) if part is None else np.reshape(np.asarray(part, np.float64), (-1, S))
  return (
    np.sum(m * p, axis=1),
    np.sum(e * np.abs(p), axis=1) + gamma(S) * np.sum((np.abs(m) + e) * np.abs(p), axis=1),
  )


def test_saliency_matches_numpy_for_both_layouts():
  z, a = _random()
  expected, bound = _np_saliency(z, a), _saliency_bound(z, a)
  assert_within(interpret.saliency(z, a), expected, bound)
  assert_within(interpret.saliency(z.reshape(N, S, C), a), expected, bound)
  with pytest.raises(ValueError, match="appearances must be"):
    interpret.saliency(z, a[1:])


def test_upsample_saliency():
  z, a = _random()
  maps = interpret.saliency(z, a)
  nearest = interpret.upsample_saliency(maps, (H, W), (3 * H, 3 * W), "nearest")
  blocks = np.kron(np.asarray(maps).reshape(N, H, W, RC), np.ones((1, 3, 3, 1), np.float32))
  np.testing.assert_array_equal(nearest, blocks)  # Nearest copies values: exact.
  # Bilinear of a constant: each of the two separable passes is a weighted sum
  # over at most 4 input positions of weights normalised to sum 1 (a sum of 4
  # and a division: gamma(5), then the weighted sum: gamma(4)), so the constant
  # comes back within gamma(9) per pass: 1.5 gamma(18) for both.
  flat = jnp.full((1, S, 2), 1.5)
  assert_within(
    interpret.upsample_saliency(flat, (H, W), (10, 12)),
    np.full((1, 10, 12, 2), 1.5),
    1.5 * gamma(18),
  )
  with pytest.raises(ValueError, match="maps must be"):
    interpret.upsample_saliency(maps, (H, W + 1), (8, 8))


def test_concept_means_streamed_equal_dataset_mean():
  z, a = _random(n=11)
  batches = [z[:4], z[4:5], z[5:]]  # unequal sizes
  mu = interpret.concept_means(batches, a)
  # Each update `mean + (batch_mean - mean) (b / count)` averages b s maps off by
  # gamma(c) |Z| |A| (their mean: gamma(b s) of the mean |m|), then rounds 4 more
  # times; earlier errors are scaled by 1 - b / count <= 1. So the error is at
  # most the sum over batches of gamma(b s + 4) max|m| + mean saliency bound.
  maps, bound = _np_saliency(z, a), _saliency_bound(z, a)
  tolerance = sum(gamma(len(b) * S + 4) * np.abs(maps).max((0, 1)) for b in batches)
  assert_within(mu, maps.mean(axis=(0, 1)), tolerance + bound.max((0, 1)))
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
  assert_within(interpret.rank(z, a, 1), *_rank_reference(z, a, 1), "Eq. 17")
  p = np.random.default_rng(1).uniform(size=S).astype(np.float32)
  assert_within(interpret.rank(z, a, 1, p), *_rank_reference(z, a, 1, p), "Eq. 18")
  refined = np.random.default_rng(2).uniform(size=(N, S)).astype(np.float32)
  assert_within(interpret.rank(z, a, 1, refined), *_rank_reference(z, a, 1, refined), "refined")
  assert_within(
    jax.jit(lambda z, p: interpret.rank(z, a, 1, p))(z, p), *_rank_reference(z, a, 1, p), "jit"
  )
  with pytest.raises(ValueError, match="non-negative"):
    interpret.rank(z, a, 1, -p)
  with pytest.raises(ValueError, match="part must be"):
    interpret.rank(z, a, 1, p[1:])
  with pytest.raises(ValueError, match="appearance must be"):
    interpret.rank(z, a, RC, p)
  with pytest.raises(ValueError, match="appearance must be"):
    interpret.rank(z, a, 1.0, p)
  with pytest.raises(ValueError, match="one index"):
    interpret.rank(z, a, np.array([0, 1]), p)


def test_rank_vmaps_over_appearances_and_parts():
  """Issue 18 (5): traced indices; `[t, n]` scores against the single ranks."""
  z, a = _random()
  p = np.random.default_rng(3).uniform(size=(2, S)).astype(np.float32)
  js = np.array([2, 0, 1])
  scores = jax.jit(jax.vmap(lambda j: interpret.rank(z, a, j)))(js)
  both = jax.vmap(lambda j, part: interpret.rank(z, a, j, part))(js[:2], p)
  for t, j in enumerate(js):
    assert_within(scores[t], *_rank_reference(z, a, j), f"vmap Eq. 17, j={j}")
  for t in range(2):
    assert_within(both[t], *_rank_reference(z, a, js[t], p[t]), f"vmap Eq. 18, t={t}")
  assert np.all(np.isnan(jax.jit(lambda j: interpret.rank(z, a, j))(RC)))
  assert_within(interpret.take_index(a, np.array([2, 0]), "appearance"), a[:, [2, 0]], 0.0)


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
  np.testing.assert_array_equal(
    np.argsort(-np.asarray(interpret.rank(z, a, 0))), np.argsort(-(t + u))
  )
  np.testing.assert_array_equal(
    np.argsort(-np.asarray(interpret.rank(z, a, 0, top))), np.argsort(-t)
  )
  np.testing.assert_array_equal(
    np.argsort(-np.asarray(interpret.rank(z, a, 0, 1 - top))), np.argsort(-u)
  )


def test_streamed_ranking_returns_planted_top_and_bottom():
  z, a, t, u, top = _planted(1)
  batches = [z[i : i + 7] for i in range(0, len(z), 7)]
  k = 5
  result = interpret.rank_dataset(batches, a, 0, top, k=k)
  np.testing.assert_array_equal(result.top_index, np.argsort(-t)[:k])
  np.testing.assert_array_equal(result.bottom_index, np.argsort(t)[:k])
  assert np.all(np.diff(result.top_scores) < 0)
  assert np.all(np.diff(result.bottom_scores) > 0)
  # Each streamed score is a float32 rank of its batch of 7: within the bound of the exact one.
  expected, bound = _rank_reference(z, a, 0, top)
  assert_within(result.top_scores, expected[result.top_index], bound[result.top_index])
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
