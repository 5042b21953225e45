"""A PyTorch process for the benchmarks: torch on its own cores, driven over a pipe.

The benchmarks time JAX in this process and torch in a child started with
`torch.set_num_threads(threads)` (threads = the cores JAX uses), so neither
side's thread pool runs while the other is timed, and rounds can interleave
one JAX and one torch repetition of the same case (load on a shared machine
then affects both alike). Commands and answers are one JSON object per line.

  proc = TorchProcess(cores(), "experiments.benchmark:_torch_worker")
  proc.call(cmd="time", case="...")   # -> the worker's answer, without "ok"
  proc.close()

The worker function (`entry`, "module:function") reads commands from stdin and
writes one answer per line to stdout, starting with a line that names the torch
version and thread count (`serve` does all of that, given handlers).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THREADS_ENV = "BENCH_TORCH_THREADS"


def cores() -> int:
  """CPU cores this process (hence XLA:CPU) may use."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # Not Linux.
    return os.cpu_count() or 1


def environment(threads: int, torch_info: dict) -> dict:
  """A benchmark JSON's versions and machine: both sides' libraries, the CPU model,
  the cores JAX uses, JAX's devices, `XLA_FLAGS` and the torch worker's threads."""
  import platform  # pylint: disable=import-outside-toplevel
  import flax  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jaxlib  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  cpu = ""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
  except OSError:
    pass
  return {
    "versions": {
      "python": platform.python_version(),
      "jax": jax.__version__,
      "jaxlib": jaxlib.__version__,
      "flax": flax.__version__,
      "numpy": np.__version__,
      "torch": torch_info.get("torch"),
    },
    "machine": {
      "platform": platform.platform(),
      "cpu": cpu,
      "cpu_count": os.cpu_count(),
      "cores_used": threads,
      "jax_devices": [str(d) for d in jax.devices()],
    },
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "torch_threads": torch_info.get("threads"),
  }


def serve(handlers: dict, announce: dict | None = None) -> None:
  """The worker loop: `handlers[cmd["cmd"]](**rest) -> dict` per line of stdin.

  Sets `torch.set_num_threads` from the parent's `threads`, announces
  `{"torch": version, "threads": n, **announce}`, then answers each command
  with `{"ok": True, **result}` or `{"ok": False, "error": ...}`.
  """
  import torch  # pylint: disable=import-outside-toplevel

  torch.set_num_threads(int(os.environ.get(THREADS_ENV, cores())))
  out = sys.stdout
  sys.stdout = sys.stderr  # Stray prints must not corrupt the protocol.
  info = {"torch": torch.__version__, "threads": torch.get_num_threads(), **(announce or {})}
  out.write(json.dumps(info) + "\n")
  out.flush()
  for line in sys.stdin:
    cmd = json.loads(line)
    name = cmd.pop("cmd")
    try:
      if name not in handlers:
        raise KeyError(f"unknown command {name!r}")
      answer = {"ok": True, **handlers[name](**cmd)}
    except Exception as e:  # pylint: disable=broad-except
      answer = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    out.write(json.dumps(answer) + "\n")
    out.flush()


class TorchProcess:
  """A torch worker (`entry` = "module:function"), started with `torch.set_num_threads(threads)`."""

  def __init__(self, threads: int, entry: str):
    module, function = entry.split(":")
    env = dict(os.environ, **{THREADS_ENV: str(threads)})
    self.proc = subprocess.Popen(
      [sys.executable, "-c", f"from {module} import {function}; {function}()"],
      cwd=ROOT,
      env=env,
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      text=True,
    )
    self._info = None  # Read on first use: several workers then start in parallel.

  @property
  def info(self) -> dict:
    """The worker's first line: `{"torch": version, "threads": n, ...}`."""
    if self._info is None:
      self._info = self._read()
    return self._info

  def _read(self):
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"torch worker exited ({self.proc.wait()})")
    return json.loads(line)

  def call(self, **cmd):
    """Sends one command; returns the answer without "ok" (raises on a worker error)."""
    self.info  # pylint: disable=pointless-statement
    self.proc.stdin.write(json.dumps(cmd) + "\n")
    self.proc.stdin.flush()
    answer = self._read()
    if not answer.pop("ok"):
      raise RuntimeError(f"torch worker: {answer['error']}")
    return answer

  def close(self):
    self.proc.stdin.close()
    self.proc.wait(timeout=60)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
