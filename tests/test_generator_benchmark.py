"""`experiments/generator_benchmark.py`: the quick mode runs and writes every field (not speeds)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from experiments import generator_benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                 reason="the benchmark's originals need torch")


def test_import_defines_no_flags():
  from absl import flags  # pylint: disable=import-outside-toplevel
  assert "quick" not in flags.FLAGS and "families" not in flags.FLAGS


@needs_torch
def test_quick_mode_writes_the_json(tmp_path):
  out = tmp_path / "bench.json"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.generator_benchmark", "--quick",
       "--families=dcgan,stylegan2,pggan", "--batches=1,2", f"--out={out}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["versions"]["torch"] and result["versions"]["jax"]
  assert result["machine"]["cores_used"] == generator_benchmark.cores()
  assert result["torch_threads"] == generator_benchmark.cores()
  assert result["settings"]["configs"] == ["fixture"]
  assert [(s["family"], s["config"]) for s in result["skipped"]] == [("pggan", "fixture")]
  rows = {(r["family"], r["batch"], r["op"]): r for r in result["results"]}
  assert set(rows) == {(f, b, op) for f in ("dcgan", "stylegan2") for b in (1, 2)
                       for op in ("generate", "split")}
  for (family, batch, op), row in rows.items():
    assert row["config"] == "fixture" and row["output_shape"][0] == batch
    assert (row["layer"] is None) == (op == "generate")
    for side in ("torch_ms", "jax_ms"):
      assert len(row[side]["all"]) == 3
      assert 0 < row[side]["min"] <= row[side]["median"]
    assert row["ratio_torch_over_jax"] > 0
    assert row["max_rel_diff"] < 1e-4, (family, batch, op)  # Both sides compute one network.
  assert "| dcgan | fixture | 2 | split@2 |" in proc.stdout
