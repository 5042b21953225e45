"""JSON files: values made JSON-able, and written atomically.

`jsonable` turns arrays into lists, numpy scalars into Python numbers and
non-finite floats into None; `write_json` writes a temporary file next to the
target and renames it, so a reader never sees half a file (metrics, recipe
cards, results, configurations).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import numpy as np


def jsonable(value: Any) -> Any:
  """Arrays -> lists, numpy scalars -> Python, non-finite floats -> None (recursively)."""
  if isinstance(value, dict):
    return {str(k): jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [jsonable(v) for v in value]
  if isinstance(value, (np.ndarray, jax.Array, np.generic)):
    return jsonable(np.asarray(value).tolist())
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def write_json(path: str, value: Any, *, sort_keys: bool = False, newline: bool = False) -> str:
  """Writes `value` as JSON (indent 1, no NaN) atomically; creates the directory; returns the path.

  `newline` ends the file with one. NaN or infinity raise ValueError (pass the
  value through `jsonable` first to write them as null).
  """
  text = json.dumps(value, indent=1, sort_keys=sort_keys, allow_nan=False)
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    f.write(text + "\n" if newline else text)
  os.replace(path + ".tmp", path)
  return path
