"""Algorithm 1: the official update order, planted-structure recovery, the
adaptive step size, the autograd variant, checkpoints and errors."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import panda_jax as pj
from panda_jax.data import synthetic


def _official_steps(z, a, p, lr, steps):
  """The official `decompose` loop in NumPy: P <- max(0, P - lr dP); A <- A - lr dA(P_new)."""
  z = np.swapaxes(np.asarray(z, np.float64), 1, 2)
  a, p = np.asarray(a, np.float64), np.asarray(p, np.float64)
  for _ in range(steps):
    abar, pbar = a @ a.T, p @ p.T
    gp = 2 * sum(pbar @ zi.T @ abar @ abar @ zi @ p + zi.T @ abar @ abar @ zi @ pbar @ p
                 - 2 * zi.T @ abar @ zi @ p for zi in z)
    p = np.maximum(0, p - lr * gp)
    pbar = p @ p.T
    ga = 2 * sum(abar @ zi @ pbar @ pbar @ zi.T @ a + zi @ pbar @ pbar @ zi.T @ abar @ a
                 - 2 * zi @ pbar @ zi.T @ a for zi in z)
    a = a - lr * ga
  return a, p


def test_fixed_step_equals_official_update_order():
  z = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 6))
  a0 = pj.hosvd_init(z, 3)
  p0 = jax.random.uniform(jax.random.PRNGKey(1), (16, 2), maxval=0.01) + 0.05
  a_ref, p_ref = _official_steps(z, a0, p0, 1e-3, 5)
  out = pj.fit(z, 3, 2, steps=5, key=jax.random.PRNGKey(2), step_size=1e-3, appearances=a0,
               parts=p0, progress=False)
  np.testing.assert_allclose(out.parts, p_ref, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(out.appearances, a_ref, rtol=1e-4, atol=1e-6)
  # One step through the public `update` equals the same transcription.
  state = pj.init_state(z, 3, 2, key=jax.random.PRNGKey(2), appearances=a0, parts=p0,
                        config=pj.FitConfig(step_size=1e-3))
  state, metrics = pj.update(state, z, pj.FitConfig(step_size=1e-3))
  a1, p1 = _official_steps(z, a0, p0, 1e-3, 1)
  np.testing.assert_allclose(state.parts, p1, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(metrics["loss"], pj.loss(z, a1, p1), rtol=1e-4)


def test_hosvd_init_streams_and_matches_svd():
  z = jax.random.normal(jax.random.PRNGKey(0), (10, 12, 5)) * jnp.arange(1, 6)
  whole = pj.hosvd_init(z, 3)
  streamed = pj.hosvd_init((z[i:i + 3] for i in range(0, 10, 3)), 3)
  u = np.linalg.svd(np.asarray(z).reshape(-1, 5).T, full_matrices=False)[0][:, :3]
  np.testing.assert_allclose(np.abs(whole.T @ u), np.eye(3), atol=1e-4)
  np.testing.assert_allclose(streamed, whole, atol=1e-5)
  with pytest.raises(ValueError, match="no batches"):
    pj.hosvd_init(iter([]), 2)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_recovers_planted_parts(seed):
  data = synthetic.planted(jax.random.PRNGKey(100 + seed), num_samples=48, height=8, width=8,
                           channels=24, rank_c=6, rank_s=5, noise=0.05)
  out = pj.fit(data.features, 6, 5, steps=100, key=jax.random.PRNGKey(seed), progress=False)
  iou = synthetic.matched_iou(out.parts, data.labels)
  assert iou.min() >= 0.9, iou
  history = out.loss_history
  # Non-increasing up to the float32 resolution of the loss, eps * ||Z||^2.
  scale = float(jnp.sum(data.features ** 2))
  assert np.all(np.diff(history) <= 8 * np.finfo(np.float32).eps * scale)
  assert history[-1] < 0.2 * history[0] or history[0] < 0.01 * scale
  assert float(out.parts.min()) >= 0.0
  gram = np.asarray(out.appearances.T @ out.appearances)
  np.testing.assert_allclose(gram, np.eye(6), atol=0.05)


def test_loss_history_is_the_loss_and_monotone_from_paper_start():
  data = synthetic.planted(jax.random.PRNGKey(7), num_samples=16, noise=0.1)
  out = pj.fit(data.features, 6, 4, steps=60, key=jax.random.PRNGKey(0), parts_init="uniform",
               progress=False)
  scale = float(jnp.sum(data.features ** 2))
  assert np.all(np.diff(out.loss_history) <= 8 * np.finfo(np.float32).eps * scale)
  assert out.loss_history[-1] < 0.5 * out.loss_history[0]
  np.testing.assert_allclose(out.loss_history[-1], pj.loss(data.features, out.appearances,
                                                           out.parts), rtol=1e-3)


def test_adam_variant_decreases_loss_and_keeps_parts_nonnegative():
  data = synthetic.planted(jax.random.PRNGKey(8), num_samples=16)
  out = pj.fit(data.features, 6, 4, steps=100, key=jax.random.PRNGKey(0), method="adam",
               learning_rate=1e-2, progress=False)
  assert out.loss_history[-1] < 0.5 * out.loss_history[0]
  assert float(out.parts.min()) >= 0.0


def test_stochastic_sampler_and_iterator():
  data = synthetic.planted(jax.random.PRNGKey(9), num_samples=64)
  feats = data.features

  def sampler(key):
    return feats[jax.random.choice(key, 64, (16,), replace=False)]

  out = pj.fit(sampler, 6, 4, steps=30, key=jax.random.PRNGKey(1), progress=False)
  assert synthetic.matched_iou(out.parts, data.labels).min() >= 0.9
  again = pj.fit(sampler, 6, 4, steps=30, key=jax.random.PRNGKey(1), progress=False)
  np.testing.assert_array_equal(out.parts, again.parts)
  batches = (feats[i % 4 * 16:(i % 4 + 1) * 16] for i in range(10))
  out = pj.fit(batches, 6, 4, steps=10, key=jax.random.PRNGKey(1), progress=False)
  assert np.isfinite(out.loss_history).all()
  with pytest.raises(ValueError, match="exhausted"):
    pj.fit(iter([feats[:8]] * 3), 6, 4, steps=5, key=jax.random.PRNGKey(1), progress=False)
  with pytest.raises(ValueError, match="exhausted"):
    pj.fit(iter([]), 6, 4, steps=5, key=jax.random.PRNGKey(1), progress=False)


def test_resumed_run_equals_uninterrupted(tmp_path):
  data = synthetic.planted(jax.random.PRNGKey(10), num_samples=16)
  kwargs = dict(key=jax.random.PRNGKey(3), checkpoint_every=10, progress=False)
  whole = pj.fit(data.features, 6, 4, steps=30, checkpoint_dir=str(tmp_path / "a"), **kwargs)
  pj.fit(data.features, 6, 4, steps=20, checkpoint_dir=str(tmp_path / "b"), **kwargs)
  resumed = pj.fit(data.features, 6, 4, steps=30, checkpoint_dir=str(tmp_path / "b"), **kwargs)
  np.testing.assert_array_equal(resumed.parts, whole.parts)
  np.testing.assert_array_equal(resumed.appearances, whole.appearances)
  np.testing.assert_array_equal(resumed.loss_history, whole.loss_history)
  # Adam's optimiser state is restored too.
  kwargs["method"] = "adam"
  whole = pj.fit(data.features, 6, 4, steps=20, checkpoint_dir=str(tmp_path / "c"), **kwargs)
  pj.fit(data.features, 6, 4, steps=10, checkpoint_dir=str(tmp_path / "d"), **kwargs)
  resumed = pj.fit(data.features, 6, 4, steps=20, checkpoint_dir=str(tmp_path / "d"), **kwargs)
  np.testing.assert_array_equal(resumed.parts, whole.parts)
  with pytest.raises(ValueError, match="does not match"):
    pj.fit(data.features, 5, 4, steps=40, checkpoint_dir=str(tmp_path / "b"), **kwargs)


def test_save_and_load_factors(tmp_path):
  data = synthetic.planted(jax.random.PRNGKey(11), num_samples=8)
  out = pj.fit(data.features, 6, 4, steps=5, key=jax.random.PRNGKey(0), progress=False)
  pj.save_factors(str(tmp_path / "f"), out)
  back = pj.load_factors(str(tmp_path / "f"))
  np.testing.assert_array_equal(back.parts, out.parts)
  np.testing.assert_array_equal(back.appearances, out.appearances)
  np.testing.assert_array_equal(back.loss_history, out.loss_history)
  assert back.steps == 5 and back.step_size_parts == out.step_size_parts
  with pytest.raises(FileNotFoundError):
    pj.load_factors(str(tmp_path / "missing"))


def test_divergence_names_step_and_step_size():
  data = synthetic.planted(jax.random.PRNGKey(12), num_samples=8)
  with pytest.raises(FloatingPointError, match=r"non-finite at step \d+ \(step size"):
    pj.fit(data.features, 6, 4, steps=50, key=jax.random.PRNGKey(0), step_size=10.0,
           progress=False)


@pytest.mark.parametrize("kwargs,match", [
    (dict(rank_c=40), "rank_c"),
    (dict(rank_s=65), "rank_s"),
    (dict(rank_s=0), "rank_s"),
    (dict(method="sgd"), "method"),
    (dict(parts_init="random"), "parts_init"),
    (dict(step_size=-1.0), "step_size"),
    (dict(appearances=jnp.zeros((5, 6))), "appearances"),
    (dict(parts=jnp.zeros((64, 3))), "parts"),
    (dict(steps=-1), "steps"),
])
def test_bad_arguments_raise(kwargs, match):
  data = synthetic.planted(jax.random.PRNGKey(13), num_samples=4)
  args = dict(rank_c=6, rank_s=4, steps=3, key=jax.random.PRNGKey(0), progress=False)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    pj.fit(data.features, **args)


def test_non_finite_features_raise():
  data = synthetic.planted(jax.random.PRNGKey(14), num_samples=4)
  for value in (np.nan, np.inf):
    bad = data.features.at[1, 2, 3, 4].set(value)
    with pytest.raises(ValueError, match="non-finite"):
      pj.fit(bad, 6, 4, steps=3, key=jax.random.PRNGKey(0), progress=False)
