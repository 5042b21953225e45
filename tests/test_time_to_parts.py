"""`experiments/time_to_parts.py`: one cold `experiments.decompose` on the embedded toy faces,
timed and read back (the figures themselves live in the benchmark's JSON)."""

import json

import numpy as np
import pytest

from experiments import time_to_parts
from experiments.plumbing import options


def test_one_cold_run_is_timed_and_reported(tmp_path):
  out = tmp_path / "ttp.json"
  config = options.make_config(time_to_parts.SPEC, out=str(out), num_samples=8, steps=3, repeats=1)
  report = time_to_parts.run(config, log=lambda _: None)
  assert json.loads(out.read_text()) == json.loads(json.dumps(report))
  (row,) = report["runs"]
  assert (row["steps"], row["rank_c"], row["rank_s"]) == (3, 8, 8)
  assert np.isfinite(row["final_loss"]) and row["final_loss"] > 0
  # The fit is part of decompose's `seconds`, which is part of the process's wall clock.
  assert 0 < row["fit_seconds"] < row["seconds"] < row["wall_seconds"]
  assert row["features_seconds"] == pytest.approx(row["seconds"] - row["fit_seconds"])
  for name in time_to_parts.FIGURES:
    assert report["summary"][name] == {"min": row[name], "median": row[name]}


def test_repeats_must_be_positive():
  config = options.make_config(time_to_parts.SPEC, out=None, repeats=0)
  with pytest.raises(ValueError, match="--repeats must be positive"):
    time_to_parts.run(config)
