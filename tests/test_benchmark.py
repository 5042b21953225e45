"""`experiments/benchmark.py`: the machine reference, the torch transcriptions of the update,
and the structure of its report (timings themselves live in its JSON).

Tolerance policy of the fixed-step comparisons: every variant computes the same
update in float32 with sums in different orders. A sum of K products is exact to
`K eps` of the sum of their magnitudes (the standard gamma_K bound), the longest
sum in a gradient entry runs over K = n c s terms, and at a step size below the
adaptive start's (the rows' `lr`) a step moves the factors by less than their own size; over T
steps the differences then stay below `T K eps` of the factors' magnitude. The
loss is quartic in factors of norm <= 1 (orthonormal A, small P), so it moves by
at most `8 x` that, relative to `||Z||^2`.
"""

import concurrent.futures
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import panda_jax as pj
from experiments import benchmark
from experiments.plumbing import options

N, HW, C, RANK_C, STEPS = 2, 4, 16, 4, 5
EPS = float(np.finfo(np.float32).eps)
FACTOR_TOL = STEPS * N * HW * HW * C * EPS
LOSS_TOL = 8 * FACTOR_TOL


@pytest.mark.parametrize("size,threads", [(1, 1), (1001, 3), (4096, 8)])
def test_parallel_copy_copies_every_element(size, threads):
  src = np.random.default_rng(size).random(size, np.float32)
  dst = np.full_like(src, np.nan)
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    benchmark._parallel_copy(src, dst, pool, threads)  # pylint: disable=protected-access
  np.testing.assert_array_equal(dst, src)


def test_machine_peaks_are_positive_rates():
  peaks = benchmark.machine_peaks(repeats=1)
  assert peaks["gemm_gflops"] > 0 and peaks["copy_gbps"] > 0 and peaks["copy_threads"] >= 1


def _case():
  """The tiny row's features, common start and fixed step (what `bench_config` times)."""
  u, a, p, adaptive = benchmark.case_start(C, HW, N, RANK_C)
  return u, a, p, benchmark.fixed_step_size(adaptive)


def test_fixed_step_variants_agree_step_by_step():
  """The official order, our order in torch and `jax_fixed` take the same steps from the same
  start: the same factors and the same loss after every step (tolerance: module docstring)."""
  torch = pytest.importorskip("torch")
  u, a, p, lr = _case()
  zt = torch.from_numpy(np.array(u.z))
  torch_runs = {
    name: (torch.from_numpy(np.array(a)), torch.from_numpy(np.array(p)))
    for name in ("official", "ours")
  }
  steps = {"official": benchmark.torch_official_step, "ours": benchmark.torch_ours_step}
  config = pj.FitConfig(step_size=lr)
  state = pj.init(
    u,
    RANK_C,
    benchmark.RANK_S,
    key=jax.random.PRNGKey(HW * 10 + N),
    config=config,
    appearances=a,
    parts=p,
  )
  scale, loss = float(np.sum(np.asarray(u.z, np.float64) ** 2)), None
  with torch.no_grad():
    for _ in range(STEPS):
      torch_runs = {k: steps[k](zt, *v, lr) for k, v in torch_runs.items()}
      state, losses = pj.run_steps(state, u, 1, config, loss=loss)
      loss = losses[-1]
      ref = {"a": np.asarray(state.appearances), "p": np.asarray(state.parts)}
      ref_loss = benchmark.loss64(u.z, ref["a"], ref["p"])
      assert abs(float(loss) - ref_loss) <= LOSS_TOL * scale  # JAX's own record.
      for name, (ta, tp) in torch_runs.items():
        got = {"a": ta.numpy(), "p": tp.numpy()}
        assert benchmark.max_rel_diff(got, ref) <= FACTOR_TOL, name
        assert abs(benchmark.loss64(u.z, got["a"], got["p"]) - ref_loss) <= LOSS_TOL * scale, name


@pytest.fixture(scope="module")
def torch_side():
  pytest.importorskip("torch")
  side = benchmark.TorchSide(2, one_thread=True)
  yield side
  side.close()


def test_worker_rows_and_time_to_solution(torch_side, tmp_path):
  """A configuration row and a time-to-solution run with the torch workers: every variant
  timed, threads pinned, one step of each matching `jax_fixed`, the recipe measured."""
  assert torch_side.info["threads"] == 2
  assert torch_side.info["matmul_precision"] == "highest"
  with jax.default_matmul_precision("float32"):
    row = benchmark.bench_config(
      torch_side,
      C,
      HW,
      N,
      RANK_C,
      rounds=2,
      steps=2,
      official_max_gb=1.0,
      compile_torch=False,
      workdir=str(tmp_path),
    )
    u, _, _, _ = benchmark.case_start(C, HW, N, RANK_C)  # Same programs as the row: cached.
    tts = benchmark.time_to_solution(
      torch_side,
      jnp.swapaxes(u.z, 1, 2),
      RANK_C,
      steps=2,
      rounds=2,
      compile_torch=False,
      workdir=str(tmp_path),
      lr=row["lr"],
      default_fit=False,
      start_key=jax.random.fold_in(jax.random.PRNGKey(HW * 10 + N), 1),
    )
  timed = {"official", "torch_ours", "torch_ours_1thread", "jax_fixed", "jax_adaptive"}
  assert set(row["seconds_per_step"]) == timed
  assert all(
    len(s["all"]) == 2 and 0 < s["min"] <= s["median"] for s in row["seconds_per_step"].values()
  )
  assert set(row["max_rel_diff_one_step_vs_jax_fixed"]) == set(benchmark.TORCH_VARIANTS) - {
    "torch_compiled"
  }
  assert max(row["max_rel_diff_one_step_vs_jax_fixed"].values()) <= FACTOR_TOL / STEPS
  assert row["ratios"]["best_torch_over_jax_fixed"] > 0
  assert "torch_compiled_over_jax_fixed" not in row["ratios"]  # Not compiled: no row, no ratio.
  assert set(tts["seconds"]) == timed
  assert tts["target_from"] == "official" and tts["jax_adaptive_reached"]
  assert max(tts["max_rel_diff_final_vs_official"].values()) <= FACTOR_TOL * 2 / STEPS  # 2 steps.
  scale = float(np.sum(np.asarray(u.z, np.float64) ** 2))
  assert abs(tts["final_loss"]["jax_fixed"] - tts["target_loss"]) <= LOSS_TOL * 2 / STEPS * scale


def test_run_quick_without_torch_writes_the_report(tmp_path, monkeypatch):
  """`run(config)` from `SPEC`'s options (the command line's path): the quick grid and time to
  solution, JAX rows only when torch is absent; the JSON written is the report returned."""
  monkeypatch.setattr(benchmark, "_torch_side", lambda threads, one_thread: None)
  peaks = {"gemm_gflops": 1.0, "copy_gbps": 1.0, "copy_threads": 1}  # Measured: a test above.
  monkeypatch.setattr(benchmark, "machine_peaks", lambda repeats: peaks)
  out = tmp_path / "b.json"
  config = options.make_config(
    benchmark.SPEC, out=str(out), quick=True, rounds=1, steps=1, tts_steps=3, tts_rounds=1
  )
  report = benchmark.run(config, log=lambda line: None)
  assert json.loads(out.read_text()) == json.loads(json.dumps(report))
  assert report["torch"] is False and report["settings"]["steps"] == 1
  (row,) = report["rows"]
  assert (row["C"], row["H"], row["N"], row["rank_c"]) == (64, 8, 2, 16)  # The quick grid.
  assert set(row["seconds_per_step"]) == set(benchmark.JAX_VARIANTS)
  tts = report["time_to_solution"]
  assert tts["features"] == [4, 16, 32] and tts["official_steps"] == 3
  assert tts["target_from"] == "jax_fixed"
