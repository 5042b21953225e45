"""Helpers for NVIDIA network pickles (stylegan2-ada-pytorch, stylegan3).

A snapshot is `dict(G, D, G_ema, augment_pipe, training_set_kwargs)` whose
networks `safe_pickle` reads as `Record`s: `state["_parameters"]`,
`state["_buffers"]` (numpy arrays), `state["_modules"]` (child Records) and
plain attributes (`z_dim`, `_init_kwargs`, ...).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from converters import Source
from converters.errors import ConversionError
from converters.safe_pickle import Record


def generator_class_state(source: Source, key: str = "synthesis") -> dict | None:
  """For `sniff`: the state of the first Generator's `key` child, or None.

  None when `source` is not a network pickle; a snapshot lacking `G_ema` still
  answers (from `G`), so that `convert` can say what is missing.
  """
  if source.is_dir:
    return None
  try:
    obj = source.read()
  except ConversionError:
    return None
  if not isinstance(obj, dict):
    return None
  for name in ("G_ema", "G"):
    g = obj.get(name)
    if isinstance(g, Record) and g.class_name == "Generator":
      child = g.state.get("_modules", {}).get(key)
      return child.state if isinstance(child, Record) else None
  return None


def g_ema(source: Source) -> Record:
  """The `G_ema` network of a snapshot (the one to convert)."""
  obj = source.read()
  g = obj.get("G_ema") if isinstance(obj, dict) else None
  if not isinstance(g, Record) or g.class_name != "Generator":
    raise ConversionError(f"{source.path}: network pickle has no G_ema generator")
  return g


def child(rec: Record, name: str) -> Record:
  mod = rec.state.get("_modules", {}).get(name)
  if not isinstance(mod, Record):
    raise ConversionError(f"{rec.class_name} has no submodule {name!r}")
  return mod


def has_child(rec: Record, name: str) -> bool:
  return isinstance(rec.state.get("_modules", {}).get(name), Record)


def tensor(rec: Record, name: str) -> np.ndarray:
  """A parameter or buffer of a module, as float32 numpy."""
  for group in ("_parameters", "_buffers"):
    value = rec.state.get(group, {}).get(name)
    if isinstance(value, np.ndarray):
      return value.astype(np.float32)
  raise ConversionError(f"{rec.class_name} has no tensor {name!r}")


def attr(rec: Record, name: str, default: Any = ConversionError) -> Any:
  """A plain attribute of a module (numpy scalars as Python numbers)."""
  if name not in rec.state:
    if default is ConversionError:
      raise ConversionError(f"{rec.class_name} has no attribute {name!r}")
    return default
  value = rec.state[name]
  return value.item() if isinstance(value, np.generic) else value


def dense(rec: Record, extra_gain: float = 1.0) -> dict:
  """FullyConnectedLayer -> `{kernel [in, out], bias [out]}`, gains folded in.

  NVIDIA computes `x @ (weight * weight_gain).T + bias * bias_gain`; `extra_gain`
  scales both (e.g. ToRGB's `weight_gain` on its styles).
  """
  weight = tensor(rec, "weight") * np.float32(attr(rec, "weight_gain"))
  bias = tensor(rec, "bias") * np.float32(attr(rec, "bias_gain"))
  return {"kernel": weight.T * np.float32(extra_gain), "bias": bias * np.float32(extra_gain)}


def jsonable(x: Any, limit: int = 10_000) -> Any:
  """Constructor kwargs as JSON data (for provenance in the converted config).

  At most `limit` values: a pickle may share one container many times over
  (memo references), which JSON would write out in full.
  """
  left = [limit]

  def walk(x):
    left[0] -= 1
    if left[0] < 0:
      raise ConversionError(f"_init_kwargs holds more than {limit} values")
    if isinstance(x, np.generic):
      return x.item()
    if isinstance(x, dict):
      return {str(k): walk(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, frozenset)):
      return [walk(v) for v in x]
    if x is None or isinstance(x, (str, int, bool)):
      return x
    if isinstance(x, float):
      return x if np.isfinite(x) else str(x)
    return repr(x)[:200]

  return walk(x)
