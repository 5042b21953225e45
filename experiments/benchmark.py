r"""Benchmark: Algorithm 1 in JAX against PyTorch on this CPU, like for like (issue 20, item 3).

    python -m experiments.benchmark --out=docs/benchmarks/cpu_targets.json   # full grid
    python -m experiments.benchmark --out=/tmp/b.json --quick               # smoke run

Protocol. Torch runs in its own process (`experiments/torch_worker.py`) with
`torch.set_num_threads` = the cores JAX uses, so the two thread pools never
share the cores; rounds interleave one repetition of every variant of a case
(load from other jobs then affects all alike), each after a short pause for the
other side's spinning threads to sleep. Matmul precision is pinned to float32
on both sides (`jax.default_matmul_precision("float32")`,
`torch.set_float32_matmul_precision("highest")`). Every variant starts from the
same factors (HOSVD `A`, `U(0, 0.01)` `P`: the official recipe's start) on the
same features. Min and median per variant; ratios of medians (`ratios`) and
of minima (`ratios_of_min`). Load averages, versions, threads and precision
are in the JSON.

Seconds per Algorithm-1 step, per configuration (C, H=W, N, r_c; r_s = 8):
  official        torch, the products of the official `model.py` `decompose`
                  in its left-to-right order (an `[s, s]` and a `[c, c]` matrix
                  per sample), its fixed step `lr`; skipped above
                  `--official_max_gb` of intermediates;
  torch_ours      torch, our contraction order (`panda_jax/objective.py`:
                  `Z_i P` first, three passes over Z), the same fixed `lr`;
  torch_compiled  `torch_ours` under `torch.compile` (its compile time apart;
                  the reason in the JSON when it cannot run);
  torch_ours_1thread  a diagnostic outside the protocol (`--torch_1thread`):
                  `torch_ours` with the worker on one thread; on a loaded
                  machine torch's OpenMP pool stalls when a core is taken;
  jax_fixed       `pj.run_steps` with `FitConfig(step_size=lr)`: the same update,
                  the same work (it also carries the loss by exact changes);
  jax_adaptive    the default (`step_size=None`): per step, its backtracking
                  line searches included.
`lr` is the smaller of the adaptive start's two step sizes. After one step from
the common start, every variant's factors are compared with `jax_fixed`'s
(`max_rel_diff`). Also XLA's temporary memory of the step, and the fraction of
this machine's GEMM throughput and copy bandwidth `jax_fixed` reaches.

Time to solution, measured on both sides: on a planted dataset small enough for
the official order to finish the official recipe (a hand-picked fixed `lr`: the
largest stable power of ten; 10,000 steps) in minutes, the wall time of that
recipe in each fixed-step variant (one trajectory, so one final loss), and the
time the adaptive default takes to reach the recipe's final loss, from the same
start (compiled beforehand) and as `pj.fit` from nothing (its k-means start,
initialisation and compilation included). Losses are float64 residuals of the
final factors. Without torch: JAX rows only.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import statistics
import tempfile
import time

import jax
import numpy as np

import panda_jax as pj
from panda_jax import decomposition, parts_init
from panda_jax.data import synthetic
from experiments import torch_worker
from experiments.plumbing import cli
from experiments.plumbing import options
from experiments.torch_worker import TorchProcess, cores, serve

RANK_S = 8
WORKER = "experiments.benchmark:_torch_worker"
TORCH_VARIANTS = ("official", "torch_ours", "torch_compiled", "torch_ours_1thread")
JAX_VARIANTS = ("jax_fixed", "jax_adaptive")
SETTLE_S = 0.02  # Pause before each timed call: the other side's spinning threads go to sleep.


SPEC = options.replace(
  options.spec(
    "out",
    "steps",
    quick=options.Flag("bool", False, "Tiny grid and time to solution (smoke test)."),
    rounds=options.Flag(
      "integer", 5, "Interleaved repetitions per case (min and median reported)."
    ),
    official_max_gb=options.Flag("float", 6.0, "Skip the official order above this memory."),
    torch_compile=options.Flag("bool", True, "Time the torch.compile variant."),
    torch_1thread=options.Flag("bool", True, "Also torch_ours on one thread (a diagnostic)."),
    refine=options.Flag("bool", False, "Also time the refinement per configuration."),
    sizes=options.Flag("list", ["16", "32", "64", "128"], "Feature map sides H = W."),
    batches=options.Flag("list", ["8"], "Batch sizes N."),
    ranks_c=options.Flag("list", ["512"], "Appearance ranks Rc."),
    tts_steps=options.Flag("integer", 10_000, "Steps of the official recipe (time to solution)."),
    tts_rounds=options.Flag("integer", 2, "Interleaved repetitions of the time to solution."),
    tts_shape=options.Flag("list", ["8", "8", "128"], "N, H = W, C of the planted dataset."),
    tts_rank_c=options.Flag("integer", 16, "Appearance rank of the time-to-solution fit."),
  ),
  out=dict(default="benchmark.json", help="Where to write the JSON report."),
  steps=dict(default=10, help="Steps per timed call (the official order: 1)."),
)


# ----------------------------------------------------------------- the update, in torch


def torch_official_step(z, a, p, lr: float):
  """One iteration of Algorithm 1 as the official `model.py` `decompose` (verbose=False).

  The products in its left-to-right order: `Z_i^T A A^T Z_i` (`[s, s]`) and
  `A A^T` (`[c, c]`) are formed per sample. `z` `[n, c, s]` (torch layout),
  `a` `[c, r_c]`, `p` `[s, r_s]`. Returns `(a, p)`: the P block, projected, then
  the A block at the new P.
  """
  import torch  # pylint: disable=import-outside-toplevel

  zt = z.transpose(1, 2)
  g = -4 * (zt @ a @ a.T @ z @ p) + 2 * (
    p @ p.T @ zt @ a @ a.T @ a @ a.T @ z @ p + zt @ a @ a.T @ a @ a.T @ z @ p @ p.T @ p
  )
  p = torch.clamp_min(p - lr * g.sum(0), 0)
  g = -4 * (z @ p @ p.T @ zt @ a) + 2 * (
    a @ a.T @ z @ p @ p.T @ p @ p.T @ zt @ a + z @ p @ p.T @ p @ p.T @ zt @ a @ a.T @ a
  )
  return a - lr * g.sum(0), p


def torch_ours_step(z, a, p, lr: float):
  """The same update in our contraction order (`panda_jax/objective.py`, Eqs. 4-5 reordered).

  Every product touching `z` `[n, c, s]` multiplies it by an `[.., r_s]` matrix:
  `M = Z P`, `sum_i Z_i^T D_i` and `Z P+`, each one GEMM over the `[n*c, s]` view,
  written as `[r_s, .] @ [., .]` products (`(P^T Z^T)^T`, `(D^T Z)^T`): with the
  skinny operand on the left they ran 2-10x faster here than `Z @ P` / `Z^T @ D`.
  Returns `(a, p)` as `torch_official_step`.
  """
  import torch  # pylint: disable=import-outside-toplevel

  n, c, s = z.shape
  flat = z.reshape(n * c, s)
  project = lambda parts: (parts.T.contiguous() @ flat.T).T.reshape(n, c, -1)  # Z P [n, c, r_s]
  m = project(p)
  dec = torch.einsum("cr,nrq->ncq", a, torch.einsum("cr,ncq->nrq", a, m))  # B_i = A A^T M_i
  d = torch.einsum("cr,nrq->ncq", a, torch.einsum("cr,ncq->nrq", a, dec)) @ (p.T @ p) - 2 * dec
  ztd = (d.reshape(n * c, -1).T @ flat).T  # sum_i Z_i^T D_i  [s, r_s]
  p = torch.clamp_min(p - lr * 2 * (p @ torch.einsum("ncq,ncu->qu", dec, dec) + ztd), 0)
  m = project(p)
  gram = p.T @ p
  lam = torch.einsum("cr,ncq->nrq", a, m)  # [n, r_c, r_s]
  dec = torch.einsum("cr,nrq->ncq", a, lam)
  back = torch.einsum("cr,ncq->nrq", a, dec)
  grad_a = 2 * (
    torch.einsum("ncq,nrq->cr", dec @ gram, lam)
    + torch.einsum("ncq,nrq->cr", m @ gram, back)
    - 2 * torch.einsum("ncq,nrq->cr", m, lam)
  )
  return a - lr * grad_a, p


def _compile_available() -> str | None:
  """None when `torch.compile` can build CPU kernels here, else why not."""
  if not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
    return "no C++ compiler on PATH (torch.compile's CPU backend needs one)"
  return None


def _torch_worker():
  """The torch process: cases (features, start, lr) and fixed-step runs of each variant."""
  import torch  # pylint: disable=import-outside-toplevel

  torch.set_float32_matmul_precision("highest")
  cases = {}

  def setup(case, data, compile_torch):
    d = np.load(data)
    z, a, p = (torch.from_numpy(np.ascontiguousarray(d[k])) for k in ("z", "a", "p"))
    steps = {"official": torch_official_step, "torch_ours": torch_ours_step}
    out = {}
    if compile_torch:
      reason = _compile_available()
      if reason is None:
        try:
          compiled = torch.compile(torch_ours_step, dynamic=False)
          t0 = time.perf_counter()
          compiled(z, a, p, float(d["lr"]))  # Compiles.
          out["torch_compile_s"] = time.perf_counter() - t0
          steps["torch_compiled"] = compiled
        except Exception as e:  # pylint: disable=broad-except
          reason = f"{type(e).__name__}: {str(e)[:300]}"
      if reason is not None:
        out["torch_compiled_skipped"] = reason
    cases[case] = (z, a, p, float(d["lr"]), steps)
    return out

  def run(case, variant, steps, save=None, threads=None):
    z, a, p, lr, fns = cases[case]
    fn = fns[variant]
    default = torch.get_num_threads()
    torch.set_num_threads(threads or default)
    try:
      t0 = time.perf_counter()
      for _ in range(steps):
        a, p = fn(z, a, p, lr)
      seconds = time.perf_counter() - t0
    finally:
      torch.set_num_threads(default)
    if save:
      np.savez(save, a=a.numpy(), p=p.numpy())
    return {"seconds": seconds}

  def drop(case):
    cases.pop(case, None)
    return {}

  with torch.no_grad():
    serve(
      {"setup": setup, "run": run, "drop": drop},
      announce={
        "matmul_precision": torch.get_float32_matmul_precision(),
        "interop_threads": torch.get_num_interop_threads(),
      },
    )


# ----------------------------------------------------------------- measuring


def _median_seconds(fn, repeats: int) -> float:
  fn()  # warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _parallel_copy(
  src: np.ndarray, dst: np.ndarray, pool: concurrent.futures.Executor, chunks: int
) -> None:
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
  return {
    "gemm_gflops": 2 * 2048**3 / t_gemm / 1e9,
    "copy_gbps": 2 * src.nbytes / t_copy / 1e9,  # read + write
    "copy_threads": threads,
  }


def stats(seconds: list[float]) -> dict:
  """`{"min", "median", "all"}` of repeated timings, in seconds."""
  return {
    "min": float(min(seconds)),
    "median": float(statistics.median(seconds)),
    "all": [float(f"{s:.6g}") for s in seconds],
  }


def _timed(fn) -> float:
  """Seconds of one call of `fn` (which blocks until its result is ready)."""
  time.sleep(SETTLE_S)
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def _step_flops(n, s, c, rank_c, rank_s=RANK_S) -> float:
  """Multiply-adds x 2 of one step in our order: three passes over Z, and the small products."""
  return 2.0 * n * s * c * rank_s * 3 + 2.0 * n * c * rank_c * rank_s * 12


def _official_gb(n, c, s) -> float:
  """Memory of the official order's largest intermediates: `[n, s, s]` and `[n, c, c]`."""
  return 3 * n * s * s * 4 / 1e9 + 2 * n * c * c * 4 / 1e9


def loss64(z, a, p) -> float:
  """Eq. (3) in float64 from the residual: `sum_i ||Z_i - A A^T Z_i P P^T||^2`, `z` `[n, c, s]`."""
  z, a, p = (np.asarray(x, np.float64) for x in (z, a, p))
  recon = a @ (a.T @ (z @ p)) @ p.T
  return float(np.sum((z - recon) ** 2))


def max_rel_diff(ours: dict, ref: dict) -> float:
  """`max |x - y| / max |y|` over the factors `a`, `p` of two runs."""
  return max(
    float(
      np.abs(np.asarray(ours[k]) - np.asarray(ref[k])).max()
      / max(float(np.abs(np.asarray(ref[k])).max()), 1e-30)
    )
    for k in ("a", "p")
  )


class JaxSteps:
  """`steps` iterations of Algorithm 1 from a fixed state, compiled ahead of time.

  `compile_s` and `temp_bytes` (XLA's temporaries beyond the inputs) of the
  program; calling returns the final state, blocking until it is ready.
  """

  def __init__(self, state, z, steps: int, config: pj.FitConfig):
    self.state, self.z = state, z
    start = time.perf_counter()
    self.exe, self.arguments = decomposition.compile_steps(state, pj.Unfolded(z), steps, config)
    self.compile_s = time.perf_counter() - start
    self.temp_bytes = getattr(self.exe.memory_analysis(), "temp_size_in_bytes", None)

  def __call__(self):
    state, losses = self.exe(*self.arguments)
    return jax.block_until_ready(state), losses


def fixed_step_size(adaptive_state) -> float:
  """The fixed `lr` of the per-step rows: the smaller of the adaptive start's two step sizes."""
  return float(min(adaptive_state.step_size_parts, adaptive_state.step_size_appearances))


def _factors(state) -> dict:
  return {"a": np.asarray(state.appearances), "p": np.asarray(state.parts)}


def _start(z, rank_c: int, key) -> tuple:
  """The common start: HOSVD `A` `[c, r_c]` and the official `P ~ U(0, 0.01)` `[s, r_s]`."""
  return pj.hosvd_init(z, rank_c), parts_init.uniform(key, z.shape[1], RANK_S)


def _write_case(path, u, a, p, lr) -> str:
  np.savez(path, z=np.asarray(u.z), a=np.asarray(a), p=np.asarray(p), lr=lr)
  return path


class TorchSide:
  """The torch worker, `torch.set_num_threads` = the cores JAX uses (the protocol).

  Variant names as in the rows; `torch_ours_1thread` (with `one_thread`) runs
  `torch_ours` with the worker switched to one thread for that call: a
  diagnostic of what torch's OpenMP pool costs on a loaded machine.
  """

  ROUTES = {
    "official": ("official", None),
    "torch_ours": ("torch_ours", None),
    "torch_compiled": ("torch_compiled", None),
    "torch_ours_1thread": ("torch_ours", 1),
  }

  def __init__(self, threads: int, one_thread: bool):
    self.proc = TorchProcess(threads, WORKER)
    self.one_thread = one_thread and threads > 1
    self.info = self.proc.info

  def setup(self, case: str, data: str, compile_torch: bool) -> tuple[dict, list]:
    """Loads a case: `(compile time or skip reason, its variants but the official one)`."""
    out = self.proc.call(cmd="setup", case=case, data=data, compile_torch=compile_torch)
    names = ["torch_ours"] + (["torch_compiled"] if "torch_compile_s" in out else [])
    return out, names + (["torch_ours_1thread"] if self.one_thread else [])

  def run(self, case: str, name: str, steps: int, save=None) -> float:
    """Seconds of `steps` steps of variant `name` from the case's start."""
    variant, threads = self.ROUTES[name]
    time.sleep(SETTLE_S)
    return self.proc.call(
      cmd="run", case=case, variant=variant, steps=steps, save=save, threads=threads
    )["seconds"]

  def factors(self, case: str, name: str, steps: int, path: str) -> tuple[dict, float]:
    """`({"a", "p"} after `steps` steps, seconds)`."""
    seconds = self.run(case, name, steps, save=path)
    with np.load(path) as f:
      return {"a": f["a"], "p": f["p"]}, seconds

  def drop(self, case: str) -> None:
    self.proc.call(cmd="drop", case=case)

  def close(self) -> None:
    self.proc.close()


# ----------------------------------------------------------------- seconds per step


def case_start(c: int, hw: int, n: int, rank_c: int) -> tuple:
  """A row's features and common start: `(unfolded [n, c, s], A [c, r_c], P [s, r_s],
  the adaptive default's FitState from them)`; features N(0, 1), seeded by the shape."""
  key = jax.random.PRNGKey(hw * 10 + n)
  z = jax.random.normal(key, (n, hw * hw, c))
  u = jax.block_until_ready(pj.unfolded(z))
  a, p = _start(z, rank_c, jax.random.fold_in(key, 1))
  return u, a, p, pj.init(u, rank_c, RANK_S, key=key, appearances=a, parts=p)


def bench_config(
  torch_side, c, hw, n, rank_c, *, rounds, steps, official_max_gb, compile_torch, workdir
) -> dict:
  """One row: interleaved rounds of every variant, seconds per step, and their agreement."""
  key = jax.random.PRNGKey(hw * 10 + n)
  u, a, p, adaptive = case_start(c, hw, n, rank_c)
  lr = fixed_step_size(adaptive)
  fixed_config = pj.FitConfig(step_size=lr)
  fixed = pj.init(u, rank_c, RANK_S, key=key, config=fixed_config, appearances=a, parts=p)
  jax_runs = {
    "jax_fixed": JaxSteps(fixed, u.z, steps, fixed_config),
    "jax_adaptive": JaxSteps(adaptive, u.z, steps, pj.FitConfig()),
  }
  row = {
    "C": c,
    "H": hw,
    "W": hw,
    "N": n,
    "rank_c": rank_c,
    "rank_s": RANK_S,
    "lr": lr,
    "steps_per_call": {"official": 1, "others": steps},
    "jax_compile_s": {k: v.compile_s for k, v in jax_runs.items()},
    "jax_temp_bytes": {k: v.temp_bytes for k, v in jax_runs.items()},
    "feature_bytes": n * hw * hw * c * 4,
  }
  one_step = _factors(pj.run_steps(fixed, u, 1, fixed_config)[0])
  variants = list(JAX_VARIANTS)
  if torch_side is not None:
    case = f"{c}/{hw}/{n}/{rank_c}"
    setup, torch_variants = torch_side.setup(
      case, _write_case(os.path.join(workdir, "case.npz"), u, a, p, lr), compile_torch
    )
    row.update(setup)
    gb = _official_gb(n, c, hw * hw)
    if gb <= official_max_gb:
      torch_variants.append("official")
    else:
      row["official_skipped"] = f"needs ~{gb:.1f} GB (> {official_max_gb} GB)"
    row["max_rel_diff_one_step_vs_jax_fixed"] = {}
    for name in torch_variants:  # Also the untimed warm-up of each.
      got, _ = torch_side.factors(case, name, 1, os.path.join(workdir, "out.npz"))
      row["max_rel_diff_one_step_vs_jax_fixed"][name] = max_rel_diff(got, one_step)
    variants += torch_variants
  for run in jax_runs.values():
    run()  # Warm-up.
  seconds = {name: [] for name in variants}
  for r in range(rounds):
    for name in variants:
      if name in jax_runs:
        seconds[name].append(_timed(jax_runs[name]) / steps)
      elif name != "official" or r < min(rounds, 3):
        k = 1 if name == "official" else steps
        seconds[name].append(torch_side.run(case, name, k) / k)
  if torch_side is not None:
    torch_side.drop(case)
  row["seconds_per_step"] = {name: stats(t) for name, t in seconds.items()}
  row["ratios"] = ratios({name: s["median"] for name, s in row["seconds_per_step"].items()})
  row["ratios_of_min"] = ratios({name: s["min"] for name, s in row["seconds_per_step"].items()})
  row["loadavg_1min"] = os.getloadavg()[0]
  return row


def ratios(median: dict) -> dict:
  """Where the speed-up comes from, as ratios of seconds per step (> 1: the second is faster).

  `official_over_torch_ours` is the contraction order alone (both torch);
  `best_torch_over_jax_fixed` is JAX against the best torch of the same
  algorithm at the same work; `jax_adaptive_over_jax_fixed` is what the line
  searches cost per step.
  """
  out = {}
  pairs = {
    "official_over_torch_ours": ("official", "torch_ours"),
    "torch_ours_over_jax_fixed": ("torch_ours", "jax_fixed"),
    "torch_compiled_over_jax_fixed": ("torch_compiled", "jax_fixed"),
    "official_over_jax_fixed": ("official", "jax_fixed"),
    "official_over_jax_adaptive": ("official", "jax_adaptive"),
    "jax_adaptive_over_jax_fixed": ("jax_adaptive", "jax_fixed"),
    "torch_ours_1thread_over_jax_fixed": ("torch_ours_1thread", "jax_fixed"),
  }
  for name, (num, den) in pairs.items():
    if num in median and den in median:
      out[name] = median[num] / median[den]
  torch_best = [median[k] for k in ("torch_ours", "torch_compiled") if k in median]
  if torch_best:
    out["best_torch_over_jax_fixed"] = min(torch_best) / median["jax_fixed"]
    out["best_torch_over_jax_adaptive"] = min(torch_best) / median["jax_adaptive"]
  return out


def refine_row(z, rank_c, repeats, k=16) -> dict:
  """Seconds per Eq. (10) step of the paper's refinement (full Gram, mutual kNN), per batch,
  and the default (translation) refinement's total time."""
  a = pj.hosvd_init(z, rank_c)
  p = jax.random.uniform(jax.random.PRNGKey(0), (z.shape[1], RANK_S))
  out = {}
  for name, kk in (("refine_full_s", None), ("refine_knn_s", k)):
    timed = lambda steps: _median_seconds(
      lambda: pj.refine(z, a, p, method="paper", k=kk, steps=steps).block_until_ready(),
      max(1, repeats // 2),
    )
    t_short, t_long = timed(2), timed(12)
    out[name] = max(t_long - t_short, 0.0) / 10
    if kk is not None:
      out["refine_knn_graph_s"] = max(t_short - 2 * out[name], 0.0)
  out["refine_default_s"] = _median_seconds(
    lambda: pj.refine(z, a, p).block_until_ready(), max(1, repeats // 2)
  )
  out["refine_k"] = k
  return out


# ----------------------------------------------------------------- time to solution


def _stable(u, a, p, rank_c, lr) -> bool:
  """The fixed-lr recipe stays finite and non-increasing for 200 steps from the common start."""
  config = pj.FitConfig(step_size=lr)
  state = pj.init(
    u, rank_c, RANK_S, key=jax.random.PRNGKey(1), config=config, appearances=a, parts=p
  )
  losses = np.asarray(pj.run_steps(state, u, 200, config)[1])
  return bool(np.all(np.isfinite(losses)) and np.all(np.diff(losses) <= 1e-6 * abs(losses[0])))


def _steps_to_reach(losses, target: float):
  """1-based index of the first loss <= target, or None."""
  hit = np.nonzero(np.asarray(losses) <= target)[0]
  return int(hit[0]) + 1 if hit.size else None


def planted_features(shape, rank_c: int):
  """`[n, s, c]` features of the time to solution: `shape` = (N, H = W, C), Eq. (1) with
  `rank_c // 2` appearances and `RANK_S` regions, noise 0.5, scaled to entries of order 10
  (as a mid-layer StyleGAN2)."""
  n, hw, c = shape
  data = synthetic.planted(
    jax.random.PRNGKey(0),
    num_samples=n,
    height=hw,
    width=hw,
    channels=c,
    rank_c=max(rank_c // 2, 1),
    rank_s=RANK_S,
    noise=0.5,
  )
  return data.features.reshape(n, hw * hw, c) * 20.0


def time_to_solution(
  torch_side,
  z,
  rank_c,
  *,
  steps,
  rounds,
  compile_torch,
  workdir,
  lr=None,
  default_fit=True,
  start_key=jax.random.PRNGKey(1),
) -> dict:
  """Wall time of the official recipe in every fixed-step variant, and of the adaptive
  default to the recipe's final loss; all measured, rounds interleaved.

  `z`: features `[n, s, c]`; `lr` None: the recipe's (the largest stable power of
  ten); `default_fit`: also time `pj.fit` from nothing; `start_key` draws `P`.
  """
  u = jax.block_until_ready(pj.unfolded(z))
  a, p = _start(z, rank_c, start_key)
  # The official recipe needs a hand-picked lr: the largest power of ten that stays monotone.
  if lr is None:
    lr = next(10.0**e for e in range(0, -14, -1) if _stable(u, a, p, rank_c, 10.0**e))
  key = jax.random.PRNGKey(2)
  fixed_config = pj.FitConfig(step_size=lr)
  fixed = pj.init(u, rank_c, RANK_S, key=key, config=fixed_config, appearances=a, parts=p)
  adaptive = pj.init(u, rank_c, RANK_S, key=key, appearances=a, parts=p)
  jax_fixed = JaxSteps(fixed, u.z, steps, fixed_config)
  out = {
    "features": list(z.shape),
    "rank_c": rank_c,
    "rank_s": RANK_S,
    "official_lr": lr,
    "official_steps": steps,
    "jax_compile_s": {"jax_fixed": jax_fixed.compile_s},
  }
  names = ["jax_fixed"]
  case, path = "tts", os.path.join(workdir, "tts_out.npz")
  if torch_side is not None:
    setup, torch_names = torch_side.setup(
      case, _write_case(os.path.join(workdir, "tts.npz"), u, a, p, lr), compile_torch
    )
    out.update(setup)
    names = ["official"] + torch_names + names
  seconds = {name: [] for name in names}
  final = {}
  for name in names:  # Round 0: every trajectory once, their final losses.
    if name == "jax_fixed":
      seconds[name].append(_timed(jax_fixed))
      final[name] = _factors(jax_fixed()[0])
    else:
      final[name], t = torch_side.factors(case, name, steps, path)
      seconds[name].append(t)
  out["final_loss"] = {name: loss64(u.z, f["a"], f["p"]) for name, f in final.items()}
  reference = "official" if "official" in final else "jax_fixed"
  target = out["final_loss"][reference]
  out.update(
    target_loss=target,
    target_from=reference,
    max_rel_diff_final_vs_official={
      name: max_rel_diff(f, final[reference]) for name, f in final.items() if name != reference
    },
  )
  # The adaptive default from the same start: the first step count that reaches the target.
  losses = np.asarray(pj.run_steps(adaptive, u, steps, pj.FitConfig())[1])
  reach = _steps_to_reach(losses, target)
  adaptive_run = None
  while reach is not None:
    adaptive_run = JaxSteps(adaptive, u.z, reach, pj.FitConfig())
    if loss64(u.z, **_factors(adaptive_run()[0])) <= target or reach >= steps:
      break
    reach = min(steps, reach + max(1, reach // 10))  # The float32 record crossed first.
  out["jax_adaptive_steps_to_reach"] = reach
  if adaptive_run is not None:
    out["jax_compile_s"]["jax_adaptive"] = adaptive_run.compile_s
    out["final_loss"]["jax_adaptive"] = loss64(u.z, **_factors(adaptive_run()[0]))
    out["jax_adaptive_reached"] = out["final_loss"]["jax_adaptive"] <= target
    seconds["jax_adaptive"] = [_timed(adaptive_run)]
  if default_fit:
    default_reach, default_first = _default_fit_to_reach(z, rank_c, target, steps)
    out.update(default_reach)
    if default_first is not None:
      seconds["jax_adaptive_default_fit"] = [default_first]
  for _ in range(1, rounds):
    for name in seconds:
      if name == "jax_fixed":
        seconds[name].append(_timed(jax_fixed))
      elif name == "jax_adaptive":
        seconds[name].append(_timed(adaptive_run))
      elif name == "jax_adaptive_default_fit":
        seconds[name].append(_timed(lambda: _default_fit(z, rank_c, out["default_fit_steps"])))
      else:
        seconds[name].append(torch_side.run(case, name, steps))
  if torch_side is not None:
    torch_side.drop(case)
  out["seconds"] = {name: stats(t) for name, t in seconds.items()}
  med = {name: s["median"] for name, s in out["seconds"].items()}
  out["ratios"] = {
    f"{name}_over_jax_{j}": med[name] / med[f"jax_{j}"]
    for name in ("official", "torch_ours", "torch_compiled", "torch_ours_1thread")
    if name in med
    for j in ("fixed", "adaptive")
    if f"jax_{j}" in med
  }
  out["loadavg_1min"] = os.getloadavg()[0]
  return out


def _default_fit(z, rank_c, steps):
  """`pj.fit` with every default (k-means start, adaptive step), from nothing."""
  return pj.fit(z, rank_c, RANK_S, steps=steps, key=jax.random.PRNGKey(1), progress=False)


def _default_fit_to_reach(z, rank_c, target, max_steps) -> tuple[dict, float | None]:
  """Fresh `pj.fit` runs of growing length until one ends at or below `target`:
  `({"default_fit_steps", "default_fit_final_loss"}, seconds of that run, compile included)`."""
  u = pj.unfolded(z)
  for total in (5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000, 20_000):
    total = min(total, max_steps)
    start = time.perf_counter()
    run = _default_fit(z, rank_c, total)
    seconds = time.perf_counter() - start
    final = loss64(u.z, run.appearances, run.parts)
    if final <= target:
      return {"default_fit_steps": total, "default_fit_final_loss": final}, seconds
    if total == max_steps:
      break
  return {"default_fit_steps": None, "default_fit_final_loss": final}, None


# ----------------------------------------------------------------- the report


def environment(threads: int, torch_info: dict) -> dict:
  """Versions, machine, threads and matmul precision of both sides."""
  return dict(
    torch_worker.environment(threads, torch_info),
    threads={
      "jax_cores": threads,
      "torch": torch_info.get("threads"),
      "torch_interop": torch_info.get("interop_threads"),
    },
    matmul_precision={
      "jax": jax.config.jax_default_matmul_precision,
      "torch": torch_info.get("matmul_precision"),
    },
  )


def _torch_side(threads: int, one_thread: bool):
  try:
    import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return None
  return TorchSide(threads, one_thread)


def run(config, log=print) -> dict:
  """The whole benchmark (the options of `SPEC`) as a JSON-able dict, written to
  `--out` after every row."""
  ints = lambda values: tuple(int(v) for v in values)
  out, quick, rounds, steps = config.out, config.quick, config.rounds, config.steps
  official_max_gb, compile_torch = config.official_max_gb, config.torch_compile
  torch_1thread, refine = config.torch_1thread, config.refine
  sizes, batches, ranks_c = ints(config.sizes), ints(config.batches), ints(config.ranks_c)
  tts_steps, tts_rounds = config.tts_steps, config.tts_rounds
  tts_shape, tts_rank_c = ints(config.tts_shape), config.tts_rank_c
  threads = cores()
  torch_side = _torch_side(threads, torch_1thread)
  grid = (
    [(64, 8, 2, 16)]
    if quick
    else [(512, hw, n, rc) for rc in ranks_c for hw in sizes for n in batches]
  )
  if quick:
    tts_steps, tts_shape, tts_rank_c = min(tts_steps, 200), (4, 4, 32), 8
  try:
    with jax.default_matmul_precision("float32"), tempfile.TemporaryDirectory() as workdir:
      report = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **environment(threads, torch_side.info if torch_side else {}),
        "torch": torch_side is not None,
        "loadavg_start": list(os.getloadavg()),
        "settings": {
          "rounds": rounds,
          "steps": steps,
          "official_max_gb": official_max_gb,
          "torch_compile": compile_torch,
          "torch_1thread": torch_1thread,
          "settle_s": SETTLE_S,
        },
        "machine_peaks": machine_peaks(1 if quick else 5),
        "rows": [],
      }
      for c, hw, n, rank_c in grid:
        row = bench_config(
          torch_side,
          c,
          hw,
          n,
          rank_c,
          rounds=rounds,
          steps=steps,
          official_max_gb=official_max_gb,
          compile_torch=compile_torch,
          workdir=workdir,
        )
        _add_throughput(row, report["machine_peaks"])
        if refine:
          z = jax.random.normal(jax.random.PRNGKey(hw * 10 + n), (n, hw * hw, c))
          row.update(refine_row(z, rank_c, rounds))
        report["rows"].append(row)
        log(table_line(row))
        _write(report, out)
      report["time_to_solution"] = time_to_solution(
        torch_side,
        planted_features(tts_shape, tts_rank_c),
        tts_rank_c,
        steps=tts_steps,
        rounds=tts_rounds,
        compile_torch=compile_torch,
        workdir=workdir,
      )
      report["time_to_solution"]["dataset"] = (
        f"planted {tts_shape[0]} x {tts_shape[1]}x{tts_shape[1]} x {tts_shape[2]} "
        f"({max(tts_rank_c // 2, 1)} appearances, {RANK_S} regions, noise 0.5, x20)"
      )
      log(json.dumps(report["time_to_solution"]["seconds"]))
  finally:
    if torch_side is not None:
      torch_side.close()
  report["loadavg_end"] = list(os.getloadavg())
  _write(report, out)
  return report


def _add_throughput(row: dict, peaks: dict) -> None:
  """GFLOP/s of `jax_fixed` (our order's work) and its fractions of the machine's peaks."""
  n, s, c = row["N"], row["H"] * row["W"], row["C"]
  per_step = row["seconds_per_step"]["jax_fixed"]["median"]
  row["gflops_jax_fixed"] = _step_flops(n, s, c, row["rank_c"]) / per_step / 1e9
  row["fraction_of_gemm_peak"] = row["gflops_jax_fixed"] / peaks["gemm_gflops"]
  streamed = 3 * n * s * c * 4  # bytes: three passes over Z
  row["fraction_of_copy_bandwidth"] = streamed / per_step / 1e9 / peaks["copy_gbps"]


def _write(report: dict, path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(report, f, indent=1)
  os.replace(path + ".tmp", path)


def table_line(row: dict) -> str:
  """One markdown row: medians in ms per step, and the two ratios that split the speed-up."""
  sec = row["seconds_per_step"]
  cell = lambda k: f"{sec[k]['median'] * 1e3:.3g}" if k in sec else "-"
  r = row["ratios"]
  ratio = lambda k: f"{r[k]:.3g}x" if k in r else "-"
  return (
    f"| {row['H']} | {row['N']} | {row['rank_c']} | {cell('official')} | "
    f"{cell('torch_ours')} | {cell('torch_compiled')} | {cell('jax_fixed')} | "
    f"{cell('jax_adaptive')} | {ratio('official_over_torch_ours')} | "
    f"{ratio('best_torch_over_jax_fixed')} |"
  )


if __name__ == "__main__":
  cli.main(run, SPEC, stoppable=False)
