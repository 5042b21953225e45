r"""Time to parts (issue 17, item 6): `experiments.decompose` at its defaults, timed from a cold start.

    python -m experiments.time_to_parts --generator=ckpt/dcgan --layer=2 --num_samples=512 \
        --out=docs/benchmarks/time_to_parts_dcgan.json

Each repeat runs `python -m experiments.decompose` in a fresh process (nothing
compiled or cached beforehand) and records, from its metrics.json,
`fit_seconds` (`pj.fit`: the HOSVD and k-means start, the steps and their
compilation, checkpoints), `seconds` (features + fit) and the process's wall
clock (imports, generator, the parts figure and the saved factors included).
Min and median per figure, the load average around each run, versions and the
CPU in the JSON. A benchmark, not a test: the figures depend on the machine.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from experiments import torch_worker
from experiments.plumbing import cli
from experiments.plumbing import options
from panda_jax import json_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURES = ("fit_seconds", "seconds", "wall_seconds")
SPEC = options.replace(
  options.spec(
    "generator",
    "layer",
    "num_samples",
    "out",
    "steps",
    repeats=options.Flag("integer", 3, "Cold runs of `experiments.decompose`."),
  ),
  out=dict(default="time_to_parts.json", help="Where to write the JSON report."),
  num_samples=dict(default=512),
)


def _load() -> float:
  return os.getloadavg()[0]


def cold_run(config, out: str) -> dict:
  """One `experiments.decompose` in a fresh process: its timings and final loss."""
  command = [sys.executable, "-m", "experiments.decompose", f"--out={out}"]
  command += [f"--num_samples={config.num_samples}"]
  for name in ("generator", "layer", "steps"):
    if getattr(config, name) is not None:
      command.append(f"--{name}={getattr(config, name)}")
  load = _load()
  start = time.perf_counter()
  done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
  wall = time.perf_counter() - start
  if done.returncode:
    raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
  with open(os.path.join(out, "metrics.json"), encoding="utf-8") as f:
    metrics = json.load(f)
  return dict(
    wall_seconds=wall,
    seconds=metrics["seconds"],
    fit_seconds=metrics["fit_seconds"],
    features_seconds=metrics["features_seconds"],
    final_loss=metrics["final_loss"],
    steps=metrics["steps"],
    rank_c=metrics["rank_c"],
    rank_s=metrics["rank_s"],
    feature_shape=metrics["feature_shape"],
    load_before=load,
    load_after=_load(),
  )


def run(config, log=print) -> dict:
  """The cold runs of `SPEC`'s config, summarised and written to `config.out`."""
  if config.repeats < 1:
    raise ValueError(f"--repeats must be positive, got {config.repeats}")
  rows = []
  for i in range(config.repeats):
    with tempfile.TemporaryDirectory() as tmp:
      rows.append(cold_run(config, os.path.join(tmp, "run")))
    log(f"run {i}: " + ", ".join(f"{k} {rows[-1][k]:.2f}" for k in FIGURES))
  summary = {
    name: {
      "min": min(r[name] for r in rows),
      "median": statistics.median(r[name] for r in rows),
    }
    for name in FIGURES
  }
  report = dict(
    generator=config.generator,
    layer=config.layer,
    num_samples=config.num_samples,
    cores=os.cpu_count(),
    summary=summary,
    runs=rows,
    environment=torch_worker.environment(os.cpu_count(), {}),
  )
  if config.out:
    json_io.write_json(config.out, report)
  return report


if __name__ == "__main__":
  cli.main(run, SPEC, stoppable=False)
