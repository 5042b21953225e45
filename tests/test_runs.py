"""`panda_jax.runs` (a decomposition on disk) and `panda_jax.json_io` (atomic JSON)."""

import json
import os

import numpy as np
import pytest

import panda_jax as pj
from panda_jax import json_io
from panda_jax import runs


def test_write_json_is_atomic_and_jsonable_cleans_values(tmp_path):
  value = json_io.jsonable({"a": np.float32(1.5), "b": np.arange(3), 4: (float("nan"), 2)})
  assert value == {"a": 1.5, "b": [0, 1, 2], "4": [None, 2]}
  path = json_io.write_json(str(tmp_path / "sub" / "x.json"), value, sort_keys=True, newline=True)
  text = open(path).read()
  assert text == json.dumps(value, indent=1, sort_keys=True) + "\n"
  assert os.listdir(tmp_path / "sub") == ["x.json"]  # no temporary file left
  with pytest.raises(ValueError):
    json_io.write_json(str(tmp_path / "nan.json"), {"x": float("nan")})


def test_load_decomposition_reads_what_decompose_writes(tmp_path):
  with pytest.raises(ValueError, match="not a decompose output directory"):
    runs.read_record(str(tmp_path))
  factors = pj.Factors(
    appearances=np.eye(4, 2, dtype=np.float32),
    parts=np.ones((9, 3), np.float32),
    loss_history=np.zeros(2),
    steps=2,
    orthogonality_error=0.0,
    step_size_parts=1.0,
    step_size_appearances=1.0,
  )
  pj.save_factors(str(tmp_path / "factors"), factors)
  json_io.write_json(str(tmp_path / "metrics.json"), {"layer": 3, "seed": 1})
  loaded, record = runs.load_decomposition(str(tmp_path))
  assert record == {"layer": 3, "seed": 1}
  np.testing.assert_array_equal(loaded.appearances, factors.appearances)
  np.testing.assert_array_equal(loaded.parts, factors.parts)
