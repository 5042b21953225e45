"""What a launcher writes (process 0): the output directory, progress, table cells, metrics."""

from __future__ import annotations

import os
import sys
import time
from typing import Optional

from tqdm.auto import tqdm

from experiments.plumbing import distributed
from panda_jax import json_io


def output_dir(out: Optional[str]) -> str:
  """`out` as an absolute path, created (by process 0)."""
  if not out:
    raise ValueError("--out is required (the output directory)")
  out = os.path.abspath(out)
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f"--out={out} is a file, not a directory")
  if distributed.is_writer():
    os.makedirs(out, exist_ok=True)
    if not os.access(out, os.W_OK):
      raise ValueError(f"--out={out} is not writable")
  distributed.barrier("output_dir")
  return out


def progress(total: int, desc: str):
  """A tqdm bar on process 0 (silent elsewhere)."""
  return tqdm(total=total, desc=desc, disable=not distributed.is_writer(), leave=False)


def progress_iter(items, desc: str):
  """`items` with a tqdm bar on process 0."""
  return tqdm(items, desc=desc, disable=not distributed.is_writer(), leave=False)


def log(launcher: str, message: str) -> None:
  """A progress line `[launcher HH:MM:SS] message` on stderr (process 0)."""
  if distributed.is_writer():
    print(f"[{launcher} {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def mean_std(entry: dict) -> str:
  """A markdown table cell `mean ± std` of a `{"mean", "std"}` entry ("n/a" without a mean)."""
  return "n/a" if entry.get("mean") is None else f"{entry['mean']:.2f} ± {entry['std']:.2f}"


def write_metrics(out: str, metrics: dict) -> dict:
  """Writes `OUT/metrics.json` (process 0, atomically); returns the JSON-able metrics."""
  metrics = json_io.jsonable(metrics)
  if distributed.is_writer():
    json_io.write_json(os.path.join(out, "metrics.json"), metrics, sort_keys=True)
  return metrics
