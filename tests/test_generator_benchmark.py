"""`experiments/generator_benchmark.py`: the quick mode runs and writes every field (not speeds),
every torch original computes the JAX port's network, and StyleGAN3's schedule is NVIDIA's."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import generator_benchmark
from experiments.plumbing import options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_torch = pytest.mark.skipif(
  importlib.util.find_spec("torch") is None, reason="the benchmark's originals need torch"
)


def test_import_defines_no_flags():
  from absl import flags  # pylint: disable=import-outside-toplevel

  assert "quick" not in flags.FLAGS and "families" not in flags.FLAGS


def test_unknown_family_is_an_error_before_torch_starts(monkeypatch):
  """`run(config)` checks `--families` first (the command line prints `error: ...`, exit 1)."""
  monkeypatch.setattr(generator_benchmark, "TorchProcess", None)  # Never reached.
  config = options.make_config(generator_benchmark.SPEC, families="dcgan,nope", quick=True)
  with pytest.raises(ValueError, match=r"unknown families \['nope'\]"):
    generator_benchmark.run(config)


@needs_torch
def test_quick_mode_writes_the_json(tmp_path):
  out = tmp_path / "bench.json"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.generator_benchmark",
      "--quick",
      "--families=dcgan,stylegan2,biggan",
      "--batches=1,2",
      f"--out={out}",
      f"--biggan_package={tmp_path / 'absent'}",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["versions"]["torch"] and result["versions"]["jax"]
  assert result["machine"]["cores_used"] == generator_benchmark.cores()
  assert result["torch_threads"] == generator_benchmark.cores()
  assert result["settings"]["configs"] == ["fixture"]
  assert [(s["family"], s["config"]) for s in result["skipped"]] == [("biggan", "fixture")]
  rows = {(r["family"], r["batch"], r["op"]): r for r in result["results"]}
  assert set(rows) == {
    (f, b, op) for f in ("dcgan", "stylegan2") for b in (1, 2) for op in ("generate", "split")
  }
  for (family, batch, op), row in rows.items():
    assert row["config"] == "fixture" and row["output_shape"][0] == batch
    assert (row["layer"] is None) == (op == "generate")
    for side in ("torch_ms", "jax_ms"):
      assert len(row[side]["all"]) == 3
      assert 0 < row[side]["min"] <= row[side]["median"]
    assert row["ratio_torch_over_jax"] > 0
    assert row["max_rel_diff"] < 1e-4, (family, batch, op)  # Both sides compute one network.
  assert "| dcgan | fixture | 2 | split@2 |" in proc.stdout


@needs_torch
def test_new_torch_originals_agree_with_the_ports(tmp_path):
  """StyleGAN v1, ProGAN, StyleGAN3-T and -R: fixture configs, batch 1, one round of
  `generate` (the whole network; `split` runs the same layers)."""
  torch_proc = generator_benchmark.TorchProcess(1, generator_benchmark.WORKER)
  try:
    for family in ("stylegan", "pggan", "stylegan3-t", "stylegan3-r"):
      gen, spec = generator_benchmark.build_case(family, "fixture", str(tmp_path), None)
      row = generator_benchmark.bench_case(
        torch_proc, gen, spec, family, "fixture", 1, "generate", 1, str(tmp_path)
      )
      assert row["output_shape"] == [1, 32, 32, 3]
      # StyleGAN v1's instance norms of 4x4 maps amplify rounding: the port and the
      # official code themselves differ by 3e-5 (fixture); float32 rounding elsewhere.
      assert row["max_rel_diff"] < (1e-4 if family == "stylegan" else 1e-5), family
  finally:
    torch_proc.close()


def test_stylegan3_schedule_reproduces_the_fixture_pickle():
  """`stylegan3_config` with the fixture's init kwargs gives its converted config and filters."""
  import converters  # pylint: disable=import-outside-toplevel

  _, config, params = converters.convert(
    os.path.join(ROOT, "tests", "fixtures", "stylegan3", "network-snapshot.pkl")
  )
  kwargs = config["source"]["init_kwargs"]
  ours, filters = generator_benchmark.stylegan3_config(
    config["img_resolution"],
    kwargs["channel_base"],
    kwargs["channel_max"],
    radial=False,
    num_layers=kwargs["num_layers"],
    z_dim=config["z_dim"],
    w_dim=config["w_dim"],
    mapping_layers=kwargs["mapping_kwargs"]["num_layers"],
  )
  assert ours == {k: v for k, v in config.items() if k != "source"}
  for layer in config["layers"]:
    p = params["layers"][layer["name"]]
    for name, f in zip(("up_filter", "down_filter"), filters[layer["name"]]):
      assert (f is None) == (name not in p), (layer["name"], name)
      if f is not None:
        np.testing.assert_allclose(f, p[name], rtol=0, atol=1e-7)
