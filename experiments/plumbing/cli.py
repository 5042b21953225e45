"""The command line of every launcher: `main(run, SPEC)`.

Each launcher is a short module around one `run(config) -> dict` (the metrics
it wrote); `main` builds `config` from the absl flags of its `SPEC`
(`plumbing.options`), tests build it with `options.make_config`.
"""

from __future__ import annotations

import signal
import sys
import threading
import types
from typing import Callable

from absl import app
from absl import flags
from absl import logging

from experiments.plumbing import distributed
from experiments.plumbing import options as options_lib

FLAGS = flags.FLAGS
# The flags `main` defines belong to its caller, the launcher: `--help` lists them.
flags.disclaim_key_flags()
_STOP = threading.Event()  # Set by SIGTERM / SIGINT (installed by `main`).


class Stopped(Exception):
  """A run stopped by SIGTERM/SIGINT after checkpointing: `main` exits 0."""


def stop_requested() -> bool:
  """Whether SIGTERM/SIGINT arrived: `pj.fit(stop=...)` then checkpoints and returns."""
  return _STOP.is_set()


def _request_stop(signum, frame) -> None:
  del frame
  logging.warning("%s received: checkpointing and stopping", signal.Signals(signum).name)
  _STOP.set()


def main(run: Callable, options: dict, *, stoppable: bool = True) -> None:
  """The command line: defines the absl flags of `options`, then `run(config)`.

  Flags are defined here, not at import, so that importing several launchers
  (tests do) never defines a flag twice. `jax.distributed.initialize` runs
  first when the launcher takes the multi-process flags and they are given or
  a cluster is detected. A ValueError or OSError exits with one line `error:
  ...` on stderr and the error's `exit_code` (1 by default; a bad input image
  2). With `stoppable`, SIGTERM / SIGINT set `stop_requested` (the run
  checkpoints and exits 0) instead of killing the process.
  """
  for name, flag in options.items():
    getattr(flags, f"DEFINE_{flag.kind}")(name, flag.default, flag.help)

  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = types.SimpleNamespace(**{name: FLAGS[name].value for name in options})
    if all(name in options for name in options_lib.DISTRIBUTED):
      distributed.initialize_distributed(config)
    if not FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO.
    if stoppable:
      for sig in (signal.SIGTERM, signal.SIGINT):  # Preemption: checkpoint, exit 0.
        signal.signal(sig, _request_stop)
    try:
      run(config)
    except Stopped as e:
      print(f"stopped: {e}", file=sys.stderr)
    except (ValueError, OSError) as e:  # Bad flags or values: one line.
      print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
      sys.exit(getattr(e, "exit_code", 1))

  app.run(_main)
