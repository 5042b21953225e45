r"""Weak scaling of `fit`'s sharded data path (issue 20, item 2): time and memory per device.

    python -m experiments.scaling_benchmark --out=docs/benchmarks/scaling_cpu.json
    python -m experiments.scaling_benchmark --quick --out=/tmp/s.json

Each row runs in its own process(es), since the device count is fixed when JAX
starts: 1, 2 and 4 simulated CPU devices in one process
(`--xla_force_host_platform_device_count`), and 2 processes x 2 devices
(`jax.distributed` on localhost). Weak scaling: every device holds the same
`--per_device` samples, so the batch grows with the devices. Two data paths:
  - "resident": a fixed batch placed once (`pj.shard_batch`), `fit`'s chunks
    read each shard where it lies;
  - "in_step": a `pj.DeviceSampler` of the embedded toy-faces generator
    (`generator_ops.feature_sampler`): latents in, features drawn inside the
    step, the dataset never stored.
Per row: seconds per step per sample (the compiled chunk of `chunk` steps that
`fit` runs, built from the public steps under `pmap`: median of `repeats` calls
after a warm-up, over its steps and the whole batch of every device and
process), and XLA's compiled memory analysis of that chunk per device
(arguments = the shard + factors (+ generator), temporaries, outputs) against
the shard, the factors `(C r_c + S r_s)` and the generator's parameters.
Simulated devices share this machine's cores, so time per sample cannot fall
with more devices here; the memory figures are what a real device would hold.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time

from experiments.plumbing import options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = options.replace(
  options.spec(
    "out",
    quick=options.Flag("bool", False, "Tiny sizes (smoke test)."),
    per_device=options.Flag("integer", 32, "Samples per device (weak scaling)."),
  ),
  out=dict(default="scaling.json", help="Where to write the JSON report."),
)


def _bytes(tree) -> int:
  import jax  # pylint: disable=import-outside-toplevel

  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def _memory(compiled) -> dict:
  m = compiled.memory_analysis()
  out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")}
  out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  return out


def _seconds_per_call(fn, args, repeats: int) -> list[float]:
  import jax  # pylint: disable=import-outside-toplevel

  jax.block_until_ready(fn(*args))  # Compiles.
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return times


def measure(spec: dict) -> dict:
  """One row in this process (JAX already configured for its devices)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import panda_jax as pj  # pylint: disable=import-outside-toplevel
  from panda_jax import generators  # pylint: disable=import-outside-toplevel
  from panda_jax.decomposition import AXIS  # pylint: disable=import-outside-toplevel

  d, chunk, per = jax.local_device_count(), spec["chunk"], spec["per_device"]
  rank_c, rank_s = spec["rank_c"], spec["rank_s"]
  config = pj.FitConfig()
  key = jax.random.PRNGKey(0)
  if spec["path"] == "resident":
    rng = np.random.default_rng(jax.process_index())
    features = rng.random((d * per, spec["side"] * spec["side"], spec["channels"]), np.float32)
    data, params_bytes = features, 0
    batch = pj.shard_batch(features)
    state = jax.pmap(
      lambda b: pj.init(b, rank_c, rank_s, key=key, axis_name=AXIS), AXIS, out_axes=None
    )(batch)
    args = (state, batch)
    program = jax.pmap(
      lambda st, b: pj.run_steps(st, b, chunk, config, axis_name=AXIS),
      AXIS,
      in_axes=(None, 0),
      out_axes=None,
    )
    s, c = features.shape[1:]
    shard_bytes = per * s * c * 4
  else:
    gen = generators.load("toyfaces")
    data = pj.generator_ops.feature_sampler(gen, spec["layer"], per)
    params_bytes = _bytes(gen.params)
    shape = jax.eval_shape(data.sample, data.params, key).shape  # [per, h, w, c]
    s, c = shape[1] * shape[2], shape[3]
    shard_bytes = 0  # Nothing stored: the batch exists only inside the step.
    keys = jax.random.split(key, d)
    state = jax.pmap(
      lambda k, p: pj.init(pj.unfolded(data.sample(p, k)), rank_c, rank_s, key=key, axis_name=AXIS),
      AXIS,
      in_axes=(0, None),
      out_axes=None,
    )(keys, data.params)
    args = (state, keys, data.params)
    program = jax.pmap(
      lambda st, k, p: pj.sampled_steps(
        st, pj.DeviceSampler(data.sample, p), k, 0, chunk, config, axis_name=AXIS
      ),
      AXIS,
      in_axes=(None, 0, None),
      out_axes=None,
    )

  # Timed through pmap itself (several processes: each passes its local shards);
  # the ahead-of-time compilation is only read for its memory analysis.
  times = _seconds_per_call(program, args, spec["repeats"])
  compiled = program.lower(*args).compile()
  per_step = float(np.median(times)) / chunk
  samples = d * per * jax.process_count()
  return dict(
    spec,
    processes=jax.process_count(),
    devices_per_process=d,
    samples_per_step=samples,
    s=int(s),
    c=int(c),
    seconds_per_step=per_step,
    seconds_per_step_per_sample=per_step / samples,
    seconds_per_chunk=times,
    memory_per_device=_memory(compiled),
    shard_bytes=shard_bytes,
    factors_bytes=(c * rank_c + s * rank_s) * 4,
    generator_bytes=params_bytes,
  )


def worker(spec_json: str) -> None:
  """Entry point of a row's process: configure the devices, then `measure`."""
  spec = json.loads(spec_json)
  import jax  # pylint: disable=import-outside-toplevel

  jax.config.update("jax_num_cpu_devices", spec["devices"])
  if spec.get("processes", 1) > 1:
    jax.distributed.initialize(
      f"localhost:{spec['port']}", num_processes=spec["processes"], process_id=spec["process_id"]
    )
  print("ROW " + json.dumps(measure(spec)), flush=True)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run_row(spec: dict) -> dict:
  """Runs one row in fresh process(es); returns process 0's measurement."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  processes = spec.get("processes", 1)
  port = _free_port()
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        "-c",
        "import sys; from experiments.scaling_benchmark import worker; worker(sys.argv[1])",
        json.dumps(dict(spec, process_id=i, port=port)),
      ],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env=env,
      cwd=ROOT,
    )
    for i in range(processes)
  ]
  outputs = [p.communicate() for p in procs]
  for p, (_, err) in zip(procs, outputs):
    if p.returncode:
      raise RuntimeError(f"row {spec} failed:\n{err[-3000:]}")
  rows = [
    json.loads(line[4:])
    for out, _ in outputs
    for line in out.splitlines()
    if line.startswith("ROW ")
  ]
  return rows[0]


def specs(quick: bool, per_device: int) -> list[dict]:
  base = dict(chunk=5 if quick else 10, rank_c=32, rank_s=8, repeats=3 if quick else 7)
  resident = dict(
    base,
    path="resident",
    per_device=4 if quick else per_device,
    side=16 if quick else 32,
    channels=32 if quick else 128,
  )
  in_step = dict(base, path="in_step", per_device=2 if quick else max(per_device // 2, 1), layer=5)
  layouts = [(1, 1), (2, 1), (4, 1), (2, 2)]
  return [dict(row, devices=d, processes=p) for row in (resident, in_step) for d, p in layouts]


def run(config) -> dict:
  """Every row of `specs` (each in fresh processes); writes the report to `--out` and returns it."""
  import jax  # pylint: disable=import-outside-toplevel

  out, quick, per_device = config.out, config.quick, config.per_device
  rows = []
  for spec in specs(quick, per_device):
    row = run_row(spec)
    rows.append(row)
    print(
      f"{row['path']:8s} {row['processes']} x {row['devices_per_process']} devices: "
      f"{1e3 * row['seconds_per_step_per_sample']:.3f} ms/step/sample, peak "
      f"{row['memory_per_device']['peak'] / 2**20:.1f} MiB/device "
      f"(shard {row['shard_bytes'] / 2**20:.1f} MiB)",
      flush=True,
    )
  report = dict(
    machine=dict(platform=platform.platform(), cpus=os.cpu_count(), load_average=os.getloadavg()),
    versions=dict(jax=jax.__version__, python=platform.python_version()),
    quick=quick,
    rows=rows,
  )
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump(report, f, indent=1)
  return report


if __name__ == "__main__":
  # `cli` imports JAX: here only, so that a row's process (which imports this module)
  # configures its devices before anything else touches JAX.
  from experiments.plumbing import cli  # pylint: disable=ungrouped-imports

  cli.main(run, SPEC, stoppable=False)
