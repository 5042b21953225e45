r"""Benchmark: Algorithm 1 in JAX against the PyTorch original, same inputs, one process.

    python -m experiments.benchmark --out=benchmark.json            # full grid (~10 min on 2 cores)
    python -m experiments.benchmark --out=b.json --quick            # smoke run

Per configuration (C, H=W, N, r_c; r_s = 8), seconds per Algorithm-1 step for
  (a) `jax_s`: this implementation, `fit`'s steady state (adaptive step size and
      its line searches included), per step of a compiled `lax.scan` chunk;
  (b) `torch_official_s`: the matrix products exactly in the order of the
      official `model.py` `decompose` (left to right: forms an [s, s] matrix per
      sample), written here in torch; skipped where its intermediates would need
      more than `--official_max_gb`;
  (c) `torch_best_s`: the same fixed-step update in torch in our contraction
      order (`Z_i P` first; see `panda_jax/objective.py`).
Medians after a warm-up; JAX compile time separately. Also refinement step times
(full Gram and mutual kNN), XLA's temporary memory of the step beyond its inputs,
and the fraction of the machine's measured GEMM throughput and copy bandwidth each
row reaches. A last section measures time to solution: wall time for the adaptive
default to reach the loss that the official fixed-lr recipe reaches after 10,000
steps, on the same data. Torch is optional: without it JAX rows only.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import statistics
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

import panda_jax as pj
from panda_jax import decomposition
from panda_jax.data import synthetic

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command-line flags; defined only when run as a program, so that importing this
  module (tests, notebooks) never clashes with another launcher's `--out`."""
  flags.DEFINE_string("out", "benchmark.json", "Where to write the JSON report.")
  flags.DEFINE_bool("quick", False, "Tiny grid (smoke test).")
  flags.DEFINE_integer("repeats", 5, "Timed repetitions (median reported).")
  flags.DEFINE_float("official_max_gb", 16.0, "Skip the official ordering above this memory.")
  flags.DEFINE_integer("tts_steps", 10_000, "Steps of the official recipe for time to solution.")
  flags.DEFINE_list("sizes", ["16", "32", "64", "128"], "Feature map sides H = W.")
  flags.DEFINE_list("batches", ["1", "8"], "Batch sizes N.")
  flags.DEFINE_list("ranks_c", ["512", "64"], "Appearance ranks Rc.")

RANK_S = 8


def _median_seconds(fn, repeats: int) -> float:
  fn()  # warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _parallel_copy(src: np.ndarray, dst: np.ndarray, pool: concurrent.futures.Executor,
                   chunks: int) -> None:
  """`dst[:] = src` in `chunks` contiguous pieces run on `pool` (NumPy releases the GIL)."""
  bounds = np.linspace(0, src.size, chunks + 1).astype(int)
  list(pool.map(lambda lo, hi: np.copyto(dst[lo:hi], src[lo:hi]), bounds[:-1], bounds[1:]))


def machine_peaks(repeats: int) -> dict:
  """2048^3 float32 GEMM throughput (JAX) and large-copy bandwidth of this machine.

  The copy reference is a memcpy of 256 MiB split over every core: an XLA
  elementwise op measured only 4.2 GB/s here, below what the fit itself
  streams, so fractions of it exceeded 1.
  """
  a = jax.random.normal(jax.random.PRNGKey(0), (2048, 2048))
  gemm = jax.jit(lambda x: x @ x)
  t_gemm = _median_seconds(lambda: gemm(a).block_until_ready(), repeats)
  src = np.random.default_rng(1).random(64 * 1024 * 1024, np.float32)  # 256 MiB
  dst = np.empty_like(src)
  threads = os.cpu_count() or 1
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:  # Started once, outside the timing.
    t_copy = _median_seconds(lambda: _parallel_copy(src, dst, pool, threads), repeats)
  return {"gemm_gflops": 2 * 2048**3 / t_gemm / 1e9,
          "copy_gbps": 2 * src.nbytes / t_copy / 1e9,  # read + write
          "copy_threads": threads}


def _step_flops(n, s, c, rank_c, rank_s=RANK_S) -> float:
  """Multiply-adds x 2 of one step in our order: three passes over Z, and the small products."""
  return 2.0 * n * s * c * rank_s * 3 + 2.0 * n * c * rank_c * rank_s * 12


def jax_row(z, rank_c, repeats) -> dict:
  """Steady-state seconds per `fit` step (adaptive), compile time, temporaries."""
  config = pj.FitConfig()
  state = pj.init(z, rank_c, RANK_S, key=jax.random.PRNGKey(0), config=config)
  unfolded = jax.block_until_ready(pj.unfolded(z))

  def chunk(length):
    return lambda: pj.run_steps(state, unfolded, length, config)[1].block_until_ready()

  start = time.perf_counter()
  compiled = decomposition._run_steps.lower(state, unfolded.z, None, steps=10, config=config,
                                            axis_name=None).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  t10 = _median_seconds(chunk(10), repeats)
  t30 = _median_seconds(chunk(30), repeats)
  per_step = max((t30 - t10) / 20, t10 / 10 * 0.5)
  return {"jax_s": per_step, "jax_compile_s": compile_s,
          "jax_temp_bytes": getattr(memory, "temp_size_in_bytes", None)}


def refine_row(z, rank_c, repeats, k=16) -> dict:
  """Seconds per Eq. (10) step of the paper's refinement (full Gram, mutual kNN), per batch,
  and the default (translation) refinement's total time."""
  a = pj.hosvd_init(z, rank_c)
  p = jax.random.uniform(jax.random.PRNGKey(0), (z.shape[1], RANK_S))
  out = {}
  for name, kk in (("refine_full_s", None), ("refine_knn_s", k)):
    timed = lambda steps: _median_seconds(
        lambda: pj.refine(z, a, p, method="paper", k=kk, steps=steps).block_until_ready(),
        max(1, repeats // 2))
    t_short, t_long = timed(2), timed(12)
    out[name] = max(t_long - t_short, 0.0) / 10
    if kk is not None:
      out["refine_knn_graph_s"] = max(t_short - 2 * out[name], 0.0)
  out["refine_default_s"] = _median_seconds(
      lambda: pj.refine(z, a, p).block_until_ready(), max(1, repeats // 2))
  out["refine_k"] = k
  return out


def torch_rows(z, rank_c, repeats, official_max_gb) -> dict:
  """Official left-to-right ordering and our ordering, fixed-lr step, in torch."""
  import torch  # Optional dependency.

  zt = torch.from_numpy(np.asarray(jnp.swapaxes(z, 1, 2)).copy())   # [n, c, s], as official
  n, c, s = zt.shape
  a = torch.from_numpy(np.asarray(pj.hosvd_init(z, rank_c)).copy())
  p = torch.rand(s, RANK_S) * 0.01
  lr = 1e-8

  def official():
    us, uc = p, a
    g = -4 * (zt.transpose(1, 2) @ uc @ uc.T @ zt @ us) + 2 * (
        us @ us.T @ zt.transpose(1, 2) @ uc @ uc.T @ uc @ uc.T @ zt @ us
        + zt.transpose(1, 2) @ uc @ uc.T @ uc @ uc.T @ zt @ us @ us.T @ us)
    us = torch.clamp_min(us - lr * g.sum(0), 0)
    g = -4 * (zt @ us @ us.T @ zt.transpose(1, 2) @ uc) + 2 * (
        uc @ uc.T @ zt @ us @ us.T @ us @ us.T @ zt.transpose(1, 2) @ uc
        + zt @ us @ us.T @ us @ us.T @ zt.transpose(1, 2) @ uc @ uc.T @ uc)
    return us, uc - lr * g.sum(0)

  def best():
    us, uc = p, a
    flat = zt.reshape(n * c, s)
    m = (flat @ us).reshape(n, c, RANK_S)                       # Z_i P
    lam = uc.T @ m                                               # [n, r_c, r_s]
    dec = uc @ lam                                               # A Lambda_i
    gp = us.T @ us
    d = uc @ (uc.T @ dec) @ gp - 2 * dec
    grad_p = 2 * (us @ torch.einsum("ncq,ncu->qu", dec, dec)
                  + torch.bmm(d.transpose(1, 2), zt).sum(0).T)
    us = torch.clamp_min(us - lr * grad_p, 0)
    m = (flat @ us).reshape(n, c, RANK_S)
    lam = uc.T @ m
    dec = uc @ lam
    gp = us.T @ us
    back = uc.T @ dec
    grad_a = 2 * (torch.einsum("ncq,nrq->cr", dec @ gp, lam) + torch.einsum("ncq,nrq->cr", m @ gp, back)
                  - 2 * torch.einsum("ncq,nrq->cr", m, lam))
    return us, uc - lr * grad_a

  row = {}
  official_gb = 3 * n * s * s * 4 / 1e9 + 2 * n * c * c * 4 / 1e9
  with torch.no_grad():
    if official_gb <= official_max_gb:
      row["torch_official_s"] = _median_seconds(official, max(1, min(repeats, 3)))
    else:
      row["torch_official_s"] = None
      row["torch_official_skipped"] = f"needs ~{official_gb:.1f} GB (> {official_max_gb} GB)"
    row["torch_best_s"] = _median_seconds(best, repeats)
  return row


def time_to_solution(tts_steps: int, have_torch: bool) -> dict:
  """Adaptive default vs the official fixed-lr recipe (HOSVD A, U(0, 0.01) P) on one dataset."""
  data = synthetic.planted(jax.random.PRNGKey(0), num_samples=64, height=16, width=16,
                           channels=512, rank_c=32, rank_s=RANK_S, noise=0.5)
  z = data.features.reshape(64, 256, 512) * 20.0  # activation scale of a mid-layer StyleGAN2 (entries of order 10)
  rank_c = 64
  # The official recipe needs a hand-picked lr: the largest power of ten that stays monotone.
  lr = next(10.0**e for e in range(-4, -14, -1) if _stable(z, rank_c, 10.0**e))
  official = pj.fit(z, rank_c, RANK_S, steps=tts_steps, key=jax.random.PRNGKey(1), step_size=lr,
                    parts_init="uniform", progress=False, chunk_size=1000)
  target = float(official.loss_history[-1])
  reached = None
  for total in (5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, tts_steps):
    start = time.perf_counter()  # A fresh run each time: init and compile included.
    run = pj.fit(z, rank_c, RANK_S, steps=total, key=jax.random.PRNGKey(1), progress=False)
    seconds = time.perf_counter() - start
    steps = total
    if run.loss_history[-1] <= target:
      reached = seconds
      break
  out = {"dataset": "planted 64 x 16 x 16 x 512 (noise 0.5, x20), r_c=64, r_s=8",
         "official_lr": lr, "official_steps": tts_steps, "official_final_loss": target,
         "adaptive_steps_to_reach": steps if reached is not None else None,
         "adaptive_seconds_to_reach": reached,
         "adaptive_final_loss": float(run.loss_history[-1])}
  if have_torch:
    per_step = torch_rows(z, rank_c, 3, 16.0)["torch_official_s"]
    out["official_torch_s_per_step"] = per_step
    out["official_torch_seconds_estimated"] = per_step * tts_steps if per_step else None
  return out


def _stable(z, rank_c, lr) -> bool:
  """The fixed-lr recipe stays finite and non-increasing for 200 steps."""
  try:
    out = pj.fit(z, rank_c, RANK_S, steps=200, key=jax.random.PRNGKey(1), step_size=lr,
                 parts_init="uniform", progress=False, chunk_size=200)
  except FloatingPointError:
    return False
  return bool(np.all(np.diff(out.loss_history) <= 1e-6 * abs(out.loss_history[0])))


def run(out: str, quick: bool = False, repeats: int = 5, official_max_gb: float = 16.0,
        tts_steps: int = 10_000, sizes=(16, 32, 64, 128), batches=(1, 8),
        ranks_c=(512, 64)) -> dict:
  try:
    import torch  # noqa: F401
    have_torch = True
  except ImportError:
    have_torch = False
  peaks = machine_peaks(repeats)
  grid = ([(64, 8, 2, 16)] if quick else
          [(512, hw, n, rc) for rc in ranks_c for hw in sizes for n in batches])
  rows = []
  for c, hw, n, rank_c in grid:
    z = jax.random.normal(jax.random.PRNGKey(hw * 10 + n), (n, hw * hw, c))
    row = {"C": c, "H": hw, "W": hw, "N": n, "rank_c": rank_c, "rank_s": RANK_S}
    row.update(jax_row(z, rank_c, repeats))
    if have_torch:
      row.update(torch_rows(z, rank_c, repeats, official_max_gb))
      official = row.get("torch_official_s")
      row["speedup_vs_official"] = official / row["jax_s"] if official else None
      row["speedup_vs_torch_best"] = row["torch_best_s"] / row["jax_s"]
    else:
      row.update(torch_official_s=None, torch_best_s=None, speedup_vs_official=None)
    flops = _step_flops(n, hw * hw, c, rank_c)
    row["gflops_jax"] = flops / row["jax_s"] / 1e9
    row["fraction_of_gemm_peak"] = row["gflops_jax"] / peaks["gemm_gflops"]
    streamed = 3 * n * hw * hw * c * 4  # bytes: three passes over Z
    row["fraction_of_copy_bandwidth"] = streamed / row["jax_s"] / 1e9 / peaks["copy_gbps"]
    row["feature_bytes"] = n * hw * hw * c * 4
    row.update(refine_row(z, rank_c, repeats))
    rows.append(row)
    print(json.dumps(row), flush=True)
  report = {"device": str(jax.devices()[0]), "backend": jax.default_backend(),
            "cpu_count": os.cpu_count(), "jax_version": jax.__version__, "torch": have_torch,
            "machine": peaks, "rows": rows}
  report["time_to_solution"] = time_to_solution(200 if quick else tts_steps, have_torch)
  with open(out, "w") as f:
    json.dump(report, f, indent=1)
  return report


def main(argv):
  del argv
  ints = lambda values: tuple(int(v) for v in values)
  run(FLAGS.out, FLAGS.quick, FLAGS.repeats, FLAGS.official_max_gb, FLAGS.tts_steps,
      ints(FLAGS.sizes), ints(FLAGS.batches), ints(FLAGS.ranks_c))


if __name__ == "__main__":
  define_flags()
  app.run(main)
