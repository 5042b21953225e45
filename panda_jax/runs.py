"""A decomposition on disk, as `python -m experiments.decompose` writes it.

    DIR/factors/       the factors (`pj.save_factors`: orbax arrays)
    DIR/metrics.json   its record: layer, feature_shape, generator, seed,
                       num_samples, truncation_psi, ranks, losses, ...

`load_decomposition(DIR)` gives both back; `edit`, `localize`, `explore`,
`evaluate_real`, the gallery and the recipe cards all read a decomposition so.
"""

from __future__ import annotations

import json
import os

from panda_jax import checkpoint
from panda_jax.state import Factors


def read_record(path: str) -> dict:
  """`DIR/metrics.json` of the decomposition at `path` (ValueError when there is none)."""
  record = os.path.join(path, "metrics.json")
  if not os.path.isfile(record):
    raise ValueError(f"{path} is not a decompose output directory (no metrics.json)")
  with open(record) as f:
    return json.load(f)


def load_decomposition(path: str) -> tuple[Factors, dict]:
  """`(factors, record)` of the decomposition at `path` (`pj.Factors`, its metrics.json).

  The record's `layer` is the layer the factors were learnt at.
  """
  record = read_record(path)
  return checkpoint.load_factors(os.path.join(path, "factors")), record
