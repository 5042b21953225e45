"""Algorithm 1 through `pj.fit`: the official update order, planted-structure
recovery, the adaptive step size, the autograd variant with any optax
transformation, the orthogonality report, checkpoints and errors.

Tolerances: comparisons of iterated runs are made in float64, bounded by the
same run's float32 effect (`conftest.assert_float64_runs_agree`); one-shot
values use the rounding bounds of tests/_bounds.py; the loss record's
monotonicity is exact (`_assert_non_increasing`).
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from _bounds import assert_within, gamma
from conftest import assert_float64_runs_agree, to_float32
import panda_jax as pj
from panda_jax.data import synthetic


def _assert_non_increasing(history):
  """Exact, no tolerance. An adaptive step is accepted when its computed loss change
  is <= the computed bound <g, D> + ||D||^2 / (2 t) of the sufficient-decrease
  condition. D is a projected step, so every g_i D_i <= 0 and, as computed (a
  coordinate rounds to D_i = -rho t g_i with 0 <= rho <= 2), g_i D_i + D_i^2 / (2 t)
  <= 0 term by term: the bound is <= 0 up to gamma(K) times |<g, D>| (K = s r_s or
  c r_c, the dot lengths), which is below half an ulp of the loss for K < 1 / (24 u)
  = 7e5. A rejected step changes nothing. Adding a non-positive change to a float
  never increases it (rounding is monotone), and `fit` continues the record
  across chunks (`run_steps(loss=...)`)."""
  assert np.all(np.diff(history) <= 0), np.max(np.diff(history))


def _official_steps(z, a, p, lr, steps):
  """The official `decompose` loop in NumPy: P <- max(0, P - lr dP); A <- A - lr dA(P_new)."""
  z = np.swapaxes(np.asarray(z, np.float64), 1, 2)
  a, p = np.asarray(a, np.float64), np.asarray(p, np.float64)
  for _ in range(steps):
    abar, pbar = a @ a.T, p @ p.T
    gp = 2 * sum(
      pbar @ zi.T @ abar @ abar @ zi @ p
      + zi.T @ abar @ abar @ zi @ pbar @ p
      - 2 * zi.T @ abar @ zi @ p
      for zi in z
    )
    p = np.maximum(0, p - lr * gp)
    pbar = p @ p.T
    ga = 2 * sum(
      abar @ zi @ pbar @ pbar @ zi.T @ a
      + zi @ pbar @ pbar @ zi.T @ abar @ a
      - 2 * zi @ pbar @ zi.T @ a
      for zi in z
    )
    a = a - lr * ga
  return a, p


def test_fixed_step_equals_official_update_order():
  """Float64 against the official loop in NumPy float64; the float32 run starts from
  the same factors (a fixed step and given factors: `init` draws nothing)."""
  config = pj.FitConfig(step_size=1e-3)
  with jax.enable_x64(True):
    z = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 6), jnp.float64)
    a0 = pj.hosvd_init(z, 3)
    p0 = jax.random.uniform(jax.random.PRNGKey(1), (16, 2), jnp.float64, maxval=0.01) + 0.05
    runs = [
      pj.fit(
        zz,
        3,
        2,
        steps=5,
        key=jax.random.PRNGKey(2),
        step_size=1e-3,
        appearances=aa,
        parts=pp,
        progress=False,
      )
      for zz, aa, pp in [(z, a0, p0), to_float32((z, a0, p0))]
    ]
    # One iteration through the public `init` / `update`.
    state = pj.init(z, 3, 2, key=jax.random.PRNGKey(2), appearances=a0, parts=p0, config=config)
    steps = [pj.update(st, zz, config) for st, zz in [(state, z), to_float32((state, z))]]
    a1, p1 = _official_steps(z, a0, p0, 1e-3, 1)
    loss1 = pj.loss(z, a1, p1)
  a_ref, p_ref = _official_steps(z, a0, p0, 1e-3, 5)
  assert_float64_runs_agree(runs[0].parts, p_ref, runs[1].parts, "parts")
  assert_float64_runs_agree(runs[0].appearances, a_ref, runs[1].appearances, "appearances")
  (state, metrics), (state32, metrics32) = steps
  assert_float64_runs_agree(state.parts, p1, state32.parts, "parts after update")
  assert_float64_runs_agree(state.appearances, a1, state32.appearances, "A after update")
  assert_float64_runs_agree(metrics["loss"], loss1, metrics32["loss"], "loss after update")


def test_hosvd_init_streams_and_matches_svd():
  z = jax.random.normal(jax.random.PRNGKey(0), (10, 12, 5)) * jnp.arange(1, 6)
  whole = pj.hosvd_init(z, 3)
  streamed = pj.hosvd_init((z[i : i + 3] for i in range(0, 10, 3)), 3)
  u = np.linalg.svd(np.asarray(z).reshape(-1, 5).T, full_matrices=False)[0][:, :3]
  np.testing.assert_allclose(np.abs(whole.T @ u), np.eye(3), atol=1e-4)
  np.testing.assert_allclose(streamed, whole, atol=1e-5)
  with pytest.raises(ValueError, match="no batches"):
    pj.hosvd_init(iter([]), 2)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_recovers_planted_parts(seed):
  data = synthetic.planted(
    jax.random.PRNGKey(100 + seed),
    num_samples=48,
    height=8,
    width=8,
    channels=24,
    rank_c=6,
    rank_s=5,
    noise=0.05,
  )
  out = pj.fit(data.features, 6, 5, steps=100, key=jax.random.PRNGKey(seed), progress=False)
  iou = synthetic.matched_iou(out.parts, data.labels)
  assert iou.min() >= 0.9, iou
  history = out.loss_history
  _assert_non_increasing(history)  # 100 steps: two chunks.
  scale = float(jnp.sum(data.features**2))
  assert history[-1] < 0.2 * history[0] or history[0] < 0.01 * scale
  assert float(out.parts.min()) >= 0.0
  # The planted A* is orthonormal: the fit stays within the documented bound.
  assert out.orthogonality_error <= pj.ORTHOGONALITY_BOUND, out.orthogonality_error


def test_loss_history_is_the_loss_and_monotone_from_paper_start():
  data = synthetic.planted(jax.random.PRNGKey(7), num_samples=16, noise=0.1)
  out = pj.fit(
    data.features,
    6,
    4,
    steps=60,
    key=jax.random.PRNGKey(0),
    parts_init="uniform",
    chunk_size=25,
    progress=False,
  )
  _assert_non_increasing(out.loss_history)
  assert out.loss_history[-1] < 0.5 * out.loss_history[0]
  # The record (expanded Eq. 3 at the start, then exact changes) is Eq. (3) at the
  # end, formed from the residual: float64, both runs from one initial state.
  with jax.enable_x64(True):
    z = data.features.astype(jnp.float64)
    state = pj.init(z, 6, 4, key=jax.random.PRNGKey(0), parts_init="uniform")
    (end, losses), (_, losses32) = [
      pj.run_steps(st, pj.unfolded(zz), 60) for st, zz in [(state, z), to_float32((state, z))]
    ]
    residual = pj.loss(z, end.appearances, end.parts)
  assert_float64_runs_agree(losses[-1], residual, losses32[-1], "recorded vs residual loss")


def test_adam_variant_decreases_loss_and_keeps_parts_nonnegative():
  data = synthetic.planted(jax.random.PRNGKey(8), num_samples=16)
  out = pj.fit(
    data.features,
    6,
    4,
    steps=100,
    key=jax.random.PRNGKey(0),
    method="adam",
    learning_rate=1e-2,
    progress=False,
  )
  assert out.loss_history[-1] < 0.5 * out.loss_history[0]
  assert float(out.parts.min()) >= 0.0


def test_autograd_takes_any_optax_transformation():
  """`optax.sgd(lr)` with the projection is the paper's fixed-step projected
  gradient: the same iterates as `step_size=lr` (float64; jax.grad against Eqs. 4-5)."""
  data = synthetic.planted(jax.random.PRNGKey(15), num_samples=16)
  lr = 1e-4
  with jax.enable_x64(True):
    z = data.features.astype(jnp.float64)
    a0 = pj.hosvd_init(z, 6)
    p0 = jax.random.uniform(jax.random.PRNGKey(1), (64, 4), jnp.float64, maxval=0.01)
    kw = dict(steps=10, key=jax.random.PRNGKey(0), progress=False)
    sgd = pj.fit(
      z, 6, 4, method="autograd", optimizer=optax.sgd(lr), appearances=a0, parts=p0, **kw
    )
    fixed = pj.fit(z, 6, 4, step_size=lr, appearances=a0, parts=p0, **kw)
    fixed32 = pj.fit(
      to_float32(z), 6, 4, step_size=lr, appearances=to_float32(a0), parts=to_float32(p0), **kw
    )
  # The steps do something, and the projection is active.
  assert fixed.loss_history[-1] < 0.5 * fixed.loss_history[0]
  assert np.min(np.asarray(fixed.parts)) == 0
  for field in ("parts", "appearances", "loss_history"):
    assert_float64_runs_agree(
      getattr(sgd, field), getattr(fixed, field), getattr(fixed32, field), field
    )
  # Any other transformation, e.g. clipped AdamW.
  chained = optax.chain(optax.clip_by_global_norm(100.0), optax.adamw(1e-2))
  out = pj.fit(
    data.features,
    6,
    4,
    steps=60,
    key=jax.random.PRNGKey(0),
    method="autograd",
    optimizer=chained,
    progress=False,
  )
  assert out.loss_history[-1] < 0.75 * out.loss_history[0]
  assert float(out.parts.min()) >= 0.0
  with pytest.raises(ValueError, match="optimizer"):
    pj.fit(
      data.features, 6, 4, steps=1, key=jax.random.PRNGKey(0), optimizer=chained, progress=False
    )


def test_stochastic_sampler_and_iterator():
  data = synthetic.planted(jax.random.PRNGKey(9), num_samples=64)
  feats = data.features

  def sampler(key):
    return feats[jax.random.choice(key, 64, (16,), replace=False)]

  out = pj.fit(sampler, 6, 4, steps=30, key=jax.random.PRNGKey(1), progress=False)
  assert synthetic.matched_iou(out.parts, data.labels).min() >= 0.9
  again = pj.fit(sampler, 6, 4, steps=30, key=jax.random.PRNGKey(1), progress=False)
  np.testing.assert_array_equal(out.parts, again.parts)
  batches = (feats[i % 4 * 16 : (i % 4 + 1) * 16] for i in range(10))
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
  assert back.orthogonality_error == out.orthogonality_error
  # Factors saved before `orthogonality_error` existed (three scalars) still load.
  old = {
    "appearances": np.asarray(out.appearances),
    "parts": np.asarray(out.parts),
    "loss_history": out.loss_history,
    "scalars": np.asarray([out.step_size_parts, out.step_size_appearances, 5.0]),
  }
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(str(tmp_path / "old"), old)
  back = pj.load_factors(str(tmp_path / "old"))
  assert back.steps == 5 and back.orthogonality_error == out.orthogonality_error
  assert back.layer is None and back.generator is None and out.layer is None
  # Where the features came from is kept (a name with non-ASCII characters too).
  pj.save_factors(str(tmp_path / "g"), out._replace(layer=3, generator="runs/gän"))
  back = pj.load_factors(str(tmp_path / "g"))
  assert (back.layer, back.generator) == (3, "runs/gän")
  np.testing.assert_array_equal(back.parts, out.parts)
  with pytest.raises(FileNotFoundError):
    pj.load_factors(str(tmp_path / "missing"))


def test_orthogonality_is_reported_and_warned():
  """`Factors.orthogonality_error` is max |A^T A - I| of the returned A (dots of
  length c: gamma(c + 1) (|A|^T |A| + 1), the +1 for subtracting I); a warning above
  `ORTHOGONALITY_BOUND`."""
  data = synthetic.planted(jax.random.PRNGKey(16), num_samples=16)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    out = pj.fit(data.features, 6, 4, steps=20, key=jax.random.PRNGKey(0), progress=False)
  a = np.asarray(out.appearances, np.float64)
  c = a.shape[0]
  assert_within(
    out.orthogonality_error,
    np.max(np.abs(a.T @ a - np.eye(6))),
    gamma(c + 1) * (np.max(np.abs(a).T @ np.abs(a)) + 1),
    "orthogonality",
  )
  a0 = pj.hosvd_init(data.features, 6)
  with pytest.warns(UserWarning, match=r"max \|A\^T A - I\| = 3"):
    out = pj.fit(
      data.features, 6, 4, steps=0, key=jax.random.PRNGKey(0), appearances=2 * a0, progress=False
    )
  assert abs(out.orthogonality_error - 3.0) <= gamma(c + 2) * 5  # 4 A0^T A0 - I: |.| <= 4 + 1.


def test_divergence_names_step_and_step_size():
  data = synthetic.planted(jax.random.PRNGKey(12), num_samples=8)
  with pytest.raises(FloatingPointError, match=r"non-finite at step \d+ \(step size"):
    pj.fit(data.features, 6, 4, steps=50, key=jax.random.PRNGKey(0), step_size=10.0, progress=False)


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(rank_c=40), "rank_c"),
    (dict(rank_s=65), "rank_s"),
    (dict(rank_s=0), "rank_s"),
    (dict(method="sgd"), "method"),
    (dict(optimizer=optax.sgd(1e-3)), "optimizer"),
    (dict(parts_init="random"), "parts_init"),
    (dict(step_size=-1.0), "step_size"),
    (dict(appearances=jnp.zeros((5, 6))), "appearances"),
    (dict(parts=jnp.zeros((64, 3))), "parts"),
    (dict(steps=-1), "steps"),
  ],
)
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
