"""The evaluation launcher: protocol on a small setting, outputs, determinism."""

import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import evaluate
from experiments.plumbing import options
from experiments.plumbing import sampling
from panda_jax import generators
from panda_jax.baselines import candidates
from panda_jax.data import toyfaces
from panda_jax.data import toyfaces_gan


@pytest.fixture(scope="module")
def labelled_dir(tmp_path_factory):
  """An untrained toy-faces-layout StyleGAN2 (RGB + one label channel per part), 16x16."""
  cfg = toyfaces_gan.GanConfig(
    resolution=16, z_dim=16, w_dim=16, g_channels=(16, 16, 16), d_channels=(16, 16, 16)
  )
  raw = toyfaces_gan.init_generator(jax.random.PRNGKey(0), cfg)
  params = jax.tree.map(np.asarray, toyfaces_gan.stored_params(raw, jnp.zeros((16,)), cfg))
  return generators.save_converted(
    str(tmp_path_factory.mktemp("labelled") / "gen"),
    "stylegan2",
    toyfaces_gan.generator_config(cfg),
    params,
  )


def _config(generator, out, **overrides):
  small = dict(
    generator=generator,
    out=str(out),
    num_samples=16,
    batch_size=8,
    num_val=8,
    num_test=8,
    steps=5,
    rank_c=4,
    ranks_s=["4"],
    layers=["3"],
    strengths=["4"],
    num_directions=2,
    ganspace_samples=64,
    score_samples=8,
    style_candidates=1,
    knn=["4"],
    refine_steps=3,
    threshold=0.0,
    sensitivity=False,
  )
  small.update(overrides)
  return options.make_config(evaluate.SPEC, **small)


@pytest.fixture(scope="module")
def small_run(labelled_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp("eval")
  return evaluate.run(_config(labelled_dir, out)), out


def test_results_hold_every_method_roi_and_variant(small_run):
  results, out = small_run
  with open(os.path.join(out, "results.json")) as f:
    assert json.load(f) == results
  assert set(results["roir"]) == set(evaluate.METHODS)
  for method in evaluate.METHODS:
    assert set(results["roir"][method]) == set(evaluate.ROIS)
    for roi in evaluate.ROIS:
      entry = results["roir"][method][roi]
      assert entry["n"] >= 1 and entry["mean"] >= 0 and entry["std"] >= 0
    assert results["train_seconds"][method] > 0
  assert set(results["part_iou"]) == {"global", "refined_full", "refined_knn_4", "refined_register"}
  for entry in results["part_iou"].values():
    means = [entry[p]["mean"] for p in toyfaces.PARTS]
    assert all(0 <= m <= 1 for m in means)
    assert entry["mean_over_parts"] == pytest.approx(np.mean(means))
  train, val, test = (results["splits"][k] for k in ("train", "val", "test"))
  assert train == [0, 16] and val == [16, 24] and test == [24, 32]  # disjoint ranges
  table = open(os.path.join(out, "roir_table.md")).read()
  assert all(m in table for m in evaluate.METHODS)
  for name in ("roir.png", "part_iou.png", "edits_eyes.png", "edits_mouth.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0


def _untimed(part_iou):
  return {v: {k: x for k, x in e.items() if k != "seconds"} for v, e in part_iou.items()}


def test_same_seed_same_numbers_other_seed_other_numbers(small_run, labelled_dir, tmp_path):
  results, _ = small_run
  again = evaluate.run(_config(labelled_dir, tmp_path / "a"))
  assert again["roir"] == results["roir"] and again["selected"] == results["selected"]
  assert _untimed(again["part_iou"]) == _untimed(results["part_iou"])
  # Another seed draws other samples for the same indices.
  gen = sampling.load_generator(labelled_dir)
  config = evaluate.settings(_config(labelled_dir, tmp_path))
  first = evaluate.make_data(gen, config, np.arange(24, 28))
  np.testing.assert_array_equal(first.rgb, evaluate.make_data(gen, config, np.arange(24, 28)).rgb)
  config.seed = 1
  assert np.max(np.abs(first.rgb - evaluate.make_data(gen, config, np.arange(24, 28)).rgb)) > 1e-3


def _stub(images, masks, deltas):
  """A method whose candidate c adds `deltas[c]` (inside, outside) to the images."""

  def prepare(latents):
    idx = np.asarray(latents)
    return lambda cand: (
      images[idx]
      + deltas[cand["c"]][0] * masks[idx][..., None]
      + deltas[cand["c"]][1] * (1 - masks[idx][..., None])
    )

  return candidates.Method(prepare, [(dict(c=c), evaluate.ROIS) for c in range(len(deltas))])


def test_choose_keeps_the_most_local_edit_above_the_threshold():
  rng = np.random.default_rng(0)
  n = 10
  labels = np.zeros((n, 8, 8), np.int32)
  labels[:, 2:4, 2:6] = toyfaces.PARTS.index("eyes")
  labels[:, 5:7, 3:5] = toyfaces.PARTS.index("mouth")
  labels[:, 0:2] = toyfaces.PARTS.index("hair")
  labels[:, 4, 0] = toyfaces.PARTS.index("nose")
  rgb = rng.normal(size=(n, 8, 8, 3)).astype(np.float32)
  data = evaluate.Data(np.arange(n), np.arange(n), rgb, labels, toyfaces.PARTS)
  eyes = data.masks("eyes")
  # 0: perfectly local but tiny, 1: local-ish and large, 2: large and global.
  deltas = [(0.01, 0.0), (0.5, 0.05), (0.5, 0.5)]
  config = types.SimpleNamespace(threshold=0.1, min_roi_pixels=2, batch_size=4)
  method = _stub(rgb, eyes, deltas)
  chosen = evaluate.choose(method, data.subset(5), config)
  assert chosen["eyes"]["candidate"] == dict(c=1)
  assert chosen["eyes"]["val_change"] == pytest.approx(0.5, rel=1e-5)
  # The test ROIR is Eq. (13) in closed form: sqrt(56 px * 0.05^2 / (8 px * 0.5^2)).
  roir = evaluate.test_roir(method, chosen, data.subset(5, start=5), config)
  assert roir["eyes"]["mean"] == pytest.approx(np.sqrt(56 * 0.0025 / (8 * 0.25)), rel=1e-4)
  assert roir["eyes"]["std"] == pytest.approx(0, abs=1e-5) and roir["eyes"]["n"] == 5
  # The nose (1 px) is below min_roi_pixels in every sample: nothing to choose from.
  assert chosen["nose"] is None and roir["nose"]["mean"] is None
  config.threshold = 10.0
  assert all(v is None for v in evaluate.choose(method, data.subset(5), config).values())


def test_per_sample_iou_of_the_matched_part():
  labels = np.array([[[0, 0, 1, 1]], [[0, 0, 0, 0]]])  # [2, 1, 4]; label 1 absent in sample 2
  assigned = np.array([[[0, 1, 1, 1]], [[0, 0, 1, 1]]])
  iou = evaluate.per_sample_iou(assigned, labels, np.array([0, 1]), 2)
  np.testing.assert_allclose(iou, [[0.5, 2 / 3], [0.5, np.nan]])


def test_quick_settings_and_box_labels():
  config = options.make_config(evaluate.SPEC, quick=True, layers=["5", "3"])
  quick = evaluate.settings(config)
  assert quick.layers == [5] and quick.ranks_s == [8] and quick.num_test == 100
  assert quick.sensitivity is False and quick.strengths == [4.0]
  boxes = evaluate.box_labels((32, 32))
  assert set(np.unique(boxes)) == set(range(len(toyfaces.PARTS)))
