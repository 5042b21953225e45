"""`experiments.decompose` with the multi-process flags: 2 processes x 2 CPU
devices on localhost (gloo collectives) give the factors of 1 process x 4
devices; killing one of them makes the other exit. Auto-detection of Slurm and
TPU pods. Subprocesses, since the device count is fixed when JAX starts."""

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import panda_jax as pj
from experiments.plumbing import distributed
from experiments.plumbing import options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "stylegan2", "network-snapshot.pkl")
TIMEOUT = 240
KILL_BOUND = 45  # seconds from the kill to the survivor's exit


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _command(generator, out, *extra):
  return [
    sys.executable,
    "-m",
    "experiments.decompose",
    f"--generator={generator}",
    f"--out={out}",
    "--layer=3",
    "--num_samples=16",
    "--batch_size=8",
    "--rank_c=4",
    "--rank_s=3",
    "--steps=5",
    "--num_show=1",
    *extra,
  ]


def _env(devices: int):
  return dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices))


def test_two_processes_equal_one(tmp_path):
  import converters  # pylint: disable=import-outside-toplevel

  generator = str(tmp_path / "gen")
  converters.convert_file(FIXTURE, generator)
  port = _free_port()
  procs = [
    subprocess.Popen(
      _command(
        generator,
        tmp_path / "multi",
        f"--coordinator_address=localhost:{port}",
        "--num_processes=2",
        f"--process_id={i}",
      ),
      cwd=ROOT,
      env=_env(2),
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  try:
    single = subprocess.run(
      _command(generator, tmp_path / "single"),
      cwd=ROOT,
      env=_env(4),
      capture_output=True,
      text=True,
      timeout=TIMEOUT,
    )
    errors = [p.communicate(timeout=TIMEOUT)[1] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  assert single.returncode == 0, single.stderr[-2000:]
  for p, err in zip(procs, errors):
    assert p.returncode == 0, err[-2000:]
  # Only process 0 wrote: one set of outputs, in the shared directory.
  assert sorted(os.listdir(tmp_path / "multi")) == [
    "checkpoints",
    "factors",
    "metrics.json",
    "parts.png",
  ]
  multi = pj.load_factors(str(tmp_path / "multi" / "factors"))
  one = pj.load_factors(str(tmp_path / "single" / "factors"))
  rel = lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y))) / np.max(np.abs(y)))
  assert rel(multi.parts, one.parts) < 1e-5
  assert rel(multi.appearances, one.appearances) < 1e-5
  np.testing.assert_allclose(multi.loss_history, one.loss_history, rtol=1e-5)


def _wait_for(path, text: str, proc, timeout: float) -> None:
  """Waits until the file `path` contains `text` (fails if `proc` exits first)."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if text in path.read_text(errors="replace"):
      return
    assert proc.poll() is None, path.read_text(errors="replace")[-2000:]
    time.sleep(0.2)
  raise AssertionError(f"no {text!r} after {timeout} s: {path.read_text(errors='replace')[-2000:]}")


def test_killed_process_makes_the_other_exit(tmp_path):
  """SIGKILL one of 2 processes while they fit: the survivor exits non-zero with
  JAX's "another task died" error within a bounded time (heartbeat timeout
  `PANDA_HEARTBEAT_TIMEOUT_S`) instead of hanging in a collective."""
  port = _free_port()
  env = dict(_env(2), PANDA_HEARTBEAT_TIMEOUT_S="5")
  logs = [tmp_path / f"err{i}" for i in range(2)]
  procs = []
  for i, log in enumerate(logs):
    with open(log, "w") as err:
      procs.append(
        subprocess.Popen(
          _command(
            "toyfaces",
            tmp_path / "out",
            "--steps=1000000",
            "--checkpoint_every=1000000",
            f"--coordinator_address=localhost:{port}",
            "--num_processes=2",
            f"--process_id={i}",
          ),
          cwd=ROOT,
          env=env,
          stdout=subprocess.DEVNULL,
          stderr=err,
        )
      )
  try:
    _wait_for(logs[0], "PandA", procs[0], TIMEOUT)  # Process 0's progress bar: fitting.
    procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    try:
      procs[0].wait(timeout=KILL_BOUND)
    except subprocess.TimeoutExpired:
      raise AssertionError(f"process 0 still runs {KILL_BOUND} s after process 1 died") from None
    elapsed = time.monotonic() - killed
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  err = logs[0].read_text(errors="replace")
  assert procs[0].returncode != 0
  assert "another task died" in err, err[-2000:]
  assert elapsed < KILL_BOUND


def test_detect_cluster():
  slurm = {
    "SLURM_JOB_ID": "7",
    "SLURM_STEP_NODELIST": "gpu[01-02]",
    "SLURM_NTASKS": "8",
    "SLURM_PROCID": "5",
    "SLURM_LOCALID": "1",
  }
  assert distributed.detect_cluster(slurm) == "slurm"
  assert distributed.detect_cluster(dict(slurm, SLURM_NTASKS="1")) is None  # One task: one process.
  batch_shell = {k: v for k, v in slurm.items() if k != "SLURM_STEP_NODELIST"}
  assert distributed.detect_cluster(batch_shell) is None  # The sbatch script itself, outside srun.
  assert distributed.detect_cluster({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}) == "tpu"
  assert (
    distributed.detect_cluster({"TPU_WORKER_HOSTNAMES": "localhost"}) is None
  )  # One-host TPU VM.
  assert distributed.detect_cluster({"MEGASCALE_NUM_SLICES": "2"}) == "tpu"
  assert distributed.detect_cluster({}) is None
  # Nothing detected and no flags: no distributed runtime, whatever the rest says.
  config = options.make_config(options.spec(*options.DISTRIBUTED))
  assert distributed.initialize_distributed(config, {"SLURM_NTASKS": "4"}) is None
  with pytest.raises(ValueError, match="PANDA_HEARTBEAT_TIMEOUT_S"):
    distributed.initialize_distributed(
      options.make_config(
        options.spec(*options.DISTRIBUTED),
        coordinator_address="localhost:1",
        num_processes=1,
        process_id=0,
      ),
      {"PANDA_HEARTBEAT_TIMEOUT_S": "0"},
    )
