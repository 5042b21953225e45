"""`experiments/scaling_benchmark.py`: the rows' layouts, and one row of two processes x two
devices through `run(config)` (each row runs in fresh processes: `run_row`)."""

import json

from experiments import scaling_benchmark
from experiments.plumbing import options


def test_quick_rows_cover_every_layout_of_both_data_paths():
  rows = scaling_benchmark.specs(quick=True, per_device=32)
  layouts = [(1, 1), (2, 1), (4, 1), (2, 2)]
  assert [(r["path"], r["devices"], r["processes"]) for r in rows] == [
    (path, d, p) for path in ("resident", "in_step") for d, p in layouts
  ]
  assert all(r["chunk"] == 5 and r["repeats"] == 3 for r in rows)


def test_run_writes_a_two_process_row(tmp_path, monkeypatch):
  """`run(config)` (the command line's path) on the quick resident row of 2 processes x 2
  devices: the row comes from process 0 of a `jax.distributed` run on localhost."""
  (spec,) = [
    s
    for s in scaling_benchmark.specs(quick=True, per_device=32)
    if s["path"] == "resident" and s["processes"] == 2
  ]
  monkeypatch.setattr(scaling_benchmark, "specs", lambda quick, per_device: [spec])
  out = tmp_path / "scaling.json"
  report = scaling_benchmark.run(
    options.make_config(scaling_benchmark.SPEC, out=str(out), quick=True)
  )
  assert json.loads(out.read_text()) == json.loads(json.dumps(report))
  assert report["quick"] is True
  (row,) = report["rows"]
  assert (row["processes"], row["devices_per_process"], row["samples_per_step"]) == (2, 2, 16)
  assert row["shard_bytes"] == 4 * 16 * 16 * 32 * 4  # per_device x s x c float32.
  assert row["memory_per_device"]["argument"] >= row["shard_bytes"]
  assert len(row["seconds_per_chunk"]) == spec["repeats"] and row["seconds_per_step"] > 0
