"""Several processes: `jax.distributed` start-up, process 0, barriers, each one's samples.

With `--coordinator_address --num_processes --process_id`, or with no flags
under Slurm or on a TPU pod (`detect_cluster`), `jax.distributed.initialize`
runs before any other JAX call, each process extracts its own contiguous slice
of the samples (`local_indices`), and only process 0 writes (`is_writer`). A
process that dies makes the others abort within `HEARTBEAT_TIMEOUT_S` instead
of hanging in a collective.
"""

from __future__ import annotations

import os
from typing import Optional

import jax
from jax.experimental import multihost_utils
import numpy as np

from experiments.plumbing import options

# A process that sends no heartbeat for this long is declared dead, and every
# other process then aborts with JAX's "another task died" error instead of
# waiting forever in a collective (JAX's default is 100 s).
# `PANDA_HEARTBEAT_TIMEOUT_S` overrides it (tests use a few seconds).
HEARTBEAT_TIMEOUT_S = 30
_SLURM_STEP = (
  "SLURM_JOB_ID",
  "SLURM_STEP_NODELIST",
  "SLURM_NTASKS",
  "SLURM_PROCID",
  "SLURM_LOCALID",
)


def detect_cluster(environ) -> Optional[str]:
  """The multi-process launcher `environ` (a dict of environment variables) shows.

  "slurm" for an `srun` step of several tasks (the variables JAX's own Slurm
  detection reads; each process then uses the GPU `SLURM_LOCALID` of its node),
  "tpu" on a TPU VM pod slice of several hosts (or several slices,
  `MEGASCALE_*`); None otherwise (one machine, a one-task Slurm job, or an
  sbatch script outside `srun`): then no distributed runtime is started.
  """

  def count(name):
    try:
      return int(environ.get(name, "1"))
    except ValueError:
      return 1

  if all(name in environ for name in _SLURM_STEP) and count("SLURM_NTASKS") > 1:
    return "slurm"
  hosts = [h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  if len(hosts) > 1 or count("MEGASCALE_NUM_SLICES") > 1:
    return "tpu"
  return None


def initialize_distributed(config, environ=None) -> Optional[str]:
  """`jax.distributed.initialize`, from the three multi-process flags or auto-detected.

  With the flags, they are used as given. Without them, under Slurm or on a TPU
  pod (`detect_cluster`), JAX finds the coordinator, process count and index
  itself. Returns how the runtime was started ("flags", "slurm", "tpu") or None
  (a single process).
  """
  environ = os.environ if environ is None else environ
  values = [getattr(config, name) for name in options.DISTRIBUTED]
  if all(v is None for v in values):
    cluster = detect_cluster(environ)
    if cluster is not None:
      jax.distributed.initialize(heartbeat_timeout_seconds=_heartbeat_timeout(environ))
    return cluster
  if any(v is None for v in values):
    raise ValueError(
      "--coordinator_address, --num_processes and --process_id must be given "
      f"together, got {dict(zip(options.DISTRIBUTED, values))}"
    )
  address, count, index = values
  if not (count >= 1 and 0 <= index < count):
    raise ValueError(f"--process_id must be in [0, {count - 1}], got {index}")
  jax.distributed.initialize(
    coordinator_address=address,
    num_processes=count,
    process_id=index,
    heartbeat_timeout_seconds=_heartbeat_timeout(environ),
  )
  return "flags"


def _heartbeat_timeout(environ) -> int:
  text = environ.get("PANDA_HEARTBEAT_TIMEOUT_S", str(HEARTBEAT_TIMEOUT_S))
  try:
    seconds = int(text)
  except ValueError:
    seconds = 0
  if seconds < 1:
    raise ValueError(f"PANDA_HEARTBEAT_TIMEOUT_S must be a positive integer, got {text!r}")
  return seconds


def is_writer() -> bool:
  """Only process 0 writes files."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits for every process (a no-op in a single-process run)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def local_indices(num_samples: int) -> np.ndarray:
  """This process's contiguous slice of the samples `0 .. num_samples-1`."""
  count, index = jax.process_count(), jax.process_index()
  if num_samples < 1 or num_samples % count:
    raise ValueError(
      f"--num_samples must be a positive multiple of the number of processes "
      f"({count}), got {num_samples}"
    )
  per = num_samples // count
  return np.arange(index * per, (index + 1) * per)
