"""The real-GAN evaluation (issue 17): best-part IoU, landmark regions, MediaPipe plumbing,
k-means and DCGAN baselines, the launcher; and the quality figures on the real DCGAN.

Without MediaPipe everything but the last test runs: the landmark -> mask code
is numpy, and the subprocess path runs a fake worker. The quality test needs
`PANDA_DCGAN_WEIGHTS` (gan-face-generate's `weights.tar`, or a directory it was
converted to) and `PANDA_MEDIAPIPE_PYTHON` (a Python with mediapipe==0.10.14),
and skips saying which is missing.
"""

import ast
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import panda_jax as pj
from experiments import decompose
from experiments import evaluate_real
from experiments.plumbing import options
from experiments.plumbing import sampling
from panda_jax import landmarks
from panda_jax import parts_eval
from panda_jax.baselines import kmeans
from panda_jax.baselines import protocol
from panda_jax.baselines import sefa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------- the metric


def test_threshold_part_masks_by_hand():
  # Grid 1 x 2 -> image 1 x 4, half-pixel centres: output pixel x samples the grid at
  # (x + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25, clamped: [a, .75a + .25b, .25a + .75b, b].
  parts = np.array([[1.0, 0.1, 0.0], [0.0, 0.9, 0.0]])  # [s = 2, r_s = 3]
  masks = np.asarray(parts_eval.threshold_part_masks(parts, (1, 2), (1, 4)))
  # part 0: [1, .75, .25, 0] -> [1, 1, 0, 0]; part 1: [.1, .3, .7, .9] / .9 -> [0, 0, 1, 1];
  # part 2: all zero -> empty.
  np.testing.assert_array_equal(masks[0, 0].T, [[1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]])
  # Per-sample parts: each divided by its own maximum (same shape, scaled per sample).
  both = np.stack([parts, 3 * parts])
  np.testing.assert_array_equal(
    parts_eval.threshold_part_masks(both, (1, 2), (1, 4)), np.concatenate([masks, masks])
  )


def _hand_case():
  parts = np.array([[1.0, 0.1, 0.0], [0.0, 0.9, 0.0]])  # masks A = 1100, B = 0011, C = 0
  regions = np.zeros((2, 1, 4, 2), bool)  # [n, H, W, L]
  regions[0, 0, :, 0] = [1, 1, 0, 0]  # sample 0: r0 = 1100, r1 = 0111
  regions[0, 0, :, 1] = [0, 1, 1, 1]
  regions[1, 0, :, 0] = [1, 0, 0, 0]  # sample 1: r0 = 1000, r1 = 0011
  regions[1, 0, :, 1] = [0, 0, 1, 1]
  return parts, regions


def test_best_region_part_iou_by_hand():
  parts, regions = _hand_case()
  # IoU per sample (rows: r0, r1; columns: A, B, C):
  #   sample 0: r0: A 2/2 = 1, B 0/4 = 0, C 0;   r1: A 1/4, B 2/3, C 0
  #   sample 1: r0: A 1/2, B 0/3 = 0, C 0;       r1: A 0/4 = 0, B 2/2 = 1, C 0
  best, match, ious = parts_eval.best_region_part_iou(parts, regions, (1, 2))
  np.testing.assert_allclose(
    ious, [[[1, 0, 0], [1 / 4, 2 / 3, 0]], [[1 / 2, 0, 0], [0, 1, 0]]], rtol=1e-6
  )
  np.testing.assert_allclose(best, [3 / 4, 5 / 6], rtol=1e-6)  # means (1 + 1/2)/2, (2/3 + 1)/2
  np.testing.assert_array_equal(match, [0, 1])
  # Only sample 1 detected: r0 -> A (1/2), r1 -> B (1).
  best, match, _ = parts_eval.best_region_part_iou(parts, regions, (1, 2), detected=[False, True])
  np.testing.assert_allclose(best, [1 / 2, 1], rtol=1e-6)
  np.testing.assert_array_equal(match, [0, 1])


def test_best_region_part_iou_per_sample_matching():
  parts, regions = _hand_case()
  # Sample 1's parts with the columns swapped: the same index no longer means the same part.
  per = np.stack([parts, parts[:, [1, 0, 2]]])
  best, _, _ = parts_eval.best_region_part_iou(per, regions, (1, 2))
  # global matching: r0: A-column mean (1 + 0)/2, B-column (0 + 1/2)/2 -> 1/2.
  np.testing.assert_allclose(best[0], 1 / 2, rtol=1e-6)
  best, match, _ = parts_eval.best_region_part_iou(per, regions, (1, 2), match="per_sample")
  np.testing.assert_allclose(best, [3 / 4, 5 / 6], rtol=1e-6)  # each sample's own best
  np.testing.assert_array_equal(match, [[0, 1], [1, 0]])
  _, match, _ = parts_eval.best_region_part_iou(
    per, regions, (1, 2), detected=[True, False], match="per_sample"
  )
  np.testing.assert_array_equal(match[1], [-1, -1])
  with pytest.raises(ValueError, match="no detected sample"):
    parts_eval.best_region_part_iou(parts, regions, (1, 2), detected=[False, False])
  with pytest.raises(ValueError, match="match"):
    parts_eval.best_region_part_iou(parts, regions, (1, 2), match="oracle")


# ----------------------------------------------------------------------------- landmarks -> masks


def test_hull_mask_exact_cases():
  square = np.array([[10, 10], [20, 10], [20, 20], [10, 20], [15, 15], [12, 18]], float)
  block = np.zeros((32, 32), bool)
  block[10:20, 10:20] = True  # pixel (i, j) covers [j, j+1) x [i, i+1)
  np.testing.assert_array_equal(landmarks.hull_mask(square, (32, 32)), block)
  # Grown by 1 px: the next ring of pixels is more than half covered (corners: 13 of
  # 16 sub-pixel centres within 1 px of the corner), the one after is not.
  grown = np.zeros((32, 32), bool)
  grown[9:21, 9:21] = True
  np.testing.assert_array_equal(landmarks.hull_mask(square, (32, 32), dilation=1.0), grown)
  # A triangle x + y <= 8 (given clockwise, with an inner point): pixels with i + j <= 7
  # (the diagonal ones are 10/16 covered).
  tri = landmarks.hull_mask(np.array([[0, 8], [8, 0], [0, 0], [2, 2]], float), (8, 8))
  i, j = np.mgrid[0:8, 0:8]
  np.testing.assert_array_equal(tri, i + j <= 7)
  # Degenerate hulls: one point, grown by 1.5 px, covers the 2 x 2 pixels around it.
  dot = landmarks.hull_mask(np.array([[4.0, 4.0]] * 3), (8, 8), dilation=1.5)
  np.testing.assert_array_equal(np.argwhere(dot), [[3, 3], [3, 4], [4, 3], [4, 4]])


def template_points(size: int = 64) -> np.ndarray:
  """`[468, 2]` synthetic landmarks of a face in pixels: each group on a small circle."""
  centre = {
    "left_eye": (0.65, 0.4, 0.06),
    "right_eye": (0.35, 0.4, 0.06),
    "lips": (0.5, 0.75, 0.09),
    "nose": (0.5, 0.57, 0.06),
    "face_oval": (0.5, 0.5, 0.4),
  }
  points = np.full((landmarks.NUM_LANDMARKS, 2), 0.5 * size)
  for group, (cx, cy, r) in centre.items():
    idx = np.array(landmarks.GROUPS[group])
    angle = 2 * np.pi * np.arange(len(idx)) / len(idx)
    points[idx] = size * np.stack([cx + r * np.cos(angle), cy + r * np.sin(angle)], 1)
  return points


def test_region_masks_from_synthetic_landmarks():
  size = 64
  points = np.stack([template_points(size), template_points(size) + [5.0, 0.0]])
  masks = landmarks.region_masks(points, np.array([True, False]), (size, size))
  assert set(masks) == set(landmarks.REGIONS)
  for name, m in masks.items():
    assert m.shape == (2, size, size) and m.dtype == bool
    assert not m[1].any(), f"{name}: an undetected sample must have an empty mask"
  eyes, mouth, nose, background = (masks[k][0] for k in ("eyes", "mouth", "nose", "background"))
  # Circles of radius r px (hull of 16+ points, nearly the disc) grown by the dilation:
  # areas about pi (r + d)^2.
  for m, r, d in ((mouth, 0.09 * size, 1.0), (nose, 0.06 * size, 0.5)):
    assert abs(m.sum() / (np.pi * (r + d) ** 2) - 1) < 0.08
  assert abs(eyes.sum() / (2 * np.pi * (0.06 * size + 1.5) ** 2) - 1) < 0.08
  assert eyes[int(0.4 * size), int(0.35 * size)] and eyes[int(0.4 * size), int(0.65 * size)]
  assert not eyes[int(0.4 * size), int(0.5 * size)]  # two hulls, not one
  # Background: the complement of the oval (no dilation).
  oval = landmarks.hull_mask(
    template_points(size)[list(landmarks.GROUPS["face_oval"])], (size, size)
  )
  np.testing.assert_array_equal(background, ~oval)
  assert not (background & (mouth | nose)).any()
  with pytest.raises(ValueError, match="finite"):
    landmarks.region_masks(np.full((1, 468, 2), np.nan), np.array([True]), (8, 8))


# ----------------------------------------------------------------------------- the subprocess


def fake_worker(tmp_path, *, groups_ok: bool = True, fail: bool = False) -> str:
  """A stand-in for `_mediapipe_worker.py`: the synthetic template (as fractions) for
  every image whose index is not 1 mod 3, with the groups MediaPipe would report."""
  template = tmp_path / f"template_{groups_ok}.npz"
  groups = {f"group_{k}": np.array(v) for k, v in landmarks.GROUPS.items()}
  if not groups_ok:
    groups["group_nose"] = groups["group_nose"][:-1]
  np.savez(template, points=template_points(1), **groups)
  path = tmp_path / ("worker_fail.py" if fail else f"worker_{groups_ok}.py")
  path.write_text(
    textwrap.dedent(f"""
      import sys
      import numpy as np
      if {fail}:
          sys.exit("fake worker: broken on purpose")
      data = np.load(sys.argv[1])
      n = data["images"].shape[0]
      t = np.load({str(template)!r})
      detected = np.arange(n) % 3 != 1
      points = np.where(detected[:, None, None], t["points"][None], np.nan).astype(np.float32)
      groups = {{k: t[k] for k in t.files if k.startswith("group_")}}
      np.savez(sys.argv[2], points=points, detected=detected, version=np.array("fake"),
               **groups)
      """)
  )
  return str(path)


def test_detect_through_a_subprocess_and_the_cache(tmp_path):
  images = np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
  worker = fake_worker(tmp_path)
  cache = tmp_path / "cache"
  marks = landmarks.detect(images, python=sys.executable, worker=worker, cache_dir=str(cache))
  np.testing.assert_array_equal(marks.detected, [True, False, True, True])
  np.testing.assert_allclose(marks.points[0], template_points(32), rtol=1e-5)  # in pixels
  assert np.isnan(marks.points[1]).all()
  assert len(os.listdir(cache)) == 1
  # A second call is answered from the cache: the worker (now failing) is not run.
  again = landmarks.detect(
    images, python=sys.executable, worker=fake_worker(tmp_path, fail=True), cache_dir=str(cache)
  )
  np.testing.assert_array_equal(again.points, marks.points)
  # Other images (or settings) are a different key.
  with pytest.raises(RuntimeError, match="broken on purpose"):
    landmarks.detect(
      images[:2],
      python=sys.executable,
      worker=fake_worker(tmp_path, fail=True),
      cache_dir=str(cache),
    )
  with pytest.raises(RuntimeError, match="landmark group nose"):
    landmarks.detect(images, python=sys.executable, worker=fake_worker(tmp_path, groups_ok=False))
  regions = landmarks.face_regions(images, python=sys.executable, worker=worker)
  assert regions.masks["mouth"][0].any() and not regions.masks["mouth"][1].any()


def test_where_mediapipe_runs(tmp_path, monkeypatch):
  monkeypatch.delenv(landmarks.PYTHON_ENV, raising=False)
  monkeypatch.setenv(landmarks.VENV_ENV, str(tmp_path / "venv"))
  with pytest.raises(landmarks.MediaPipeUnavailable, match="creation is off"):
    landmarks.mediapipe_python(create=False)
  # Creation failing (here: no base interpreter) says which command and what to do.
  with pytest.raises(landmarks.MediaPipeUnavailable, match="PANDA_MEDIAPIPE_PYTHON"):
    landmarks.ensure_venv(str(tmp_path / "venv"), base_python=str(tmp_path / "no-python"))
  # A finished environment (its marker written) is used as it is.
  ready = tmp_path / "venv"
  ready.mkdir(exist_ok=True)
  (ready / landmarks._READY).write_text("mediapipe==0.10.14\n")  # pylint: disable=protected-access
  assert landmarks.mediapipe_python(create=False) == landmarks.venv_python(str(ready))
  monkeypatch.setenv(landmarks.PYTHON_ENV, str(tmp_path / "missing"))
  with pytest.raises(landmarks.MediaPipeUnavailable, match="does not exist"):
    landmarks.mediapipe_python()
  assert landmarks.mediapipe_python(python=sys.executable) == sys.executable


def test_worker_imports_only_numpy_pil_and_mediapipe():
  tree = ast.parse(open(landmarks.WORKER).read())
  names = {
    a.name.split(".")[0]
    for node in ast.walk(tree)
    if isinstance(node, ast.Import)
    for a in node.names
  }
  names |= {
    node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
  }
  assert names <= {"sys", "numpy", "mediapipe", "PIL"}, names


# ----------------------------------------------------------------------------- baselines


def test_kmeans_baselines_on_planted_clusters():
  # Shapes and settings of the launcher test's k-means (8 samples of 8 x 8 x 16 features,
  # k = 3, 1 restart, 2 iterations), so the two share their compilations.
  rng = np.random.default_rng(0)
  centres = 10 * rng.normal(size=(3, 16))
  labels = rng.integers(0, 3, size=(8, 64))
  features = centres[labels] + 0.01 * rng.normal(size=(8, 64, 16))
  options = dict(restarts=1, iterations=2)
  own = np.asarray(kmeans.per_sample(jax.random.PRNGKey(0), features, 3, **options))
  assert own.shape == (8, 64, 3) and (own.sum(-1) == 1).all()
  for i in range(8):  # each sample's clusters are its planted ones, up to relabelling
    found = own[i].argmax(-1)
    assert all(len(set(found[labels[i] == c])) == 1 for c in range(3))
    assert len(set(found)) == 3
  fitted, _ = kmeans.fit_pooled(jax.random.PRNGKey(0), features, 3, **options)
  pooled = np.asarray(kmeans.assign(features, fitted)).argmax(-1)  # consistent labels
  mapping = {int(c): int(pooled[labels == c][0]) for c in range(3)}
  assert len(set(mapping.values())) == 3
  np.testing.assert_array_equal(pooled, np.vectorize(mapping.get)(labels))
  freq = np.asarray(kmeans.frequency_parts(kmeans.assign(features, fitted)))
  np.testing.assert_allclose(freq.sum(-1), 1, rtol=1e-6)
  with pytest.raises(ValueError, match="k must be"):
    kmeans.per_sample(jax.random.PRNGKey(0), features, 65)


def test_sefa_first_layer_kernel_is_the_first_layer(converted):
  run = converted("dcgan/weights.tar")
  gen = sampling.load_generator(str(run.dst))
  w = sefa.first_layer_kernel(gen.params)  # [z_dim, 16 c]
  z = np.random.default_rng(0).normal(size=(3, gen.z_dim)).astype(np.float32)
  # The first transposed conv of z (before BatchNorm) is z W up to a permutation of the
  # outputs (the flipped kernel): compare the sorted outputs.
  from panda_jax.generators import dcgan  # pylint: disable=import-outside-toplevel

  kernel = gen.params["params"]["blocks_0"]["conv"]["kernel"]
  conv = np.asarray(dcgan.conv_transpose2d(z[:, None, None, :], kernel, 1, 0))
  np.testing.assert_allclose(
    np.sort(conv.reshape(3, -1), 1), np.sort(z @ w, 1), rtol=1e-5, atol=1e-5 * np.abs(conv).max()
  )
  dirs = sefa.fit([w], 3)
  assert dirs.directions.shape == (3, gen.z_dim)


def test_protocol_picks_the_local_edit():
  originals = np.zeros((3, 8, 8, 3), np.float32)
  roi = np.zeros((3, 8, 8), np.float32)
  roi[:, 2:5, 2:5] = 1
  local = originals + 0.5 * roi[..., None]
  spread = originals + 0.5
  tiny = originals + 0.01 * roi[..., None]  # perfectly local, but below the threshold
  render = {"local": local, "spread": spread, "tiny": tiny}.get
  cands = [("spread", ("roi",)), ("local", ("roi",)), ("tiny", ("roi",))]
  chosen = protocol.choose_edits(render, cands, originals, {"roi": roi}, threshold=0.1)
  assert chosen["roi"]["candidate"] == "local" and chosen["roi"]["val_roir"] == 0
  report = protocol.report_edits(render, chosen, originals, {"roi": roi})
  assert report["roi"]["mean"] == 0 and report["roi"]["n"] == 3
  none = protocol.choose_edits(render, cands[2:], originals, {"roi": roi}, threshold=0.1)
  assert none["roi"] is None
  assert protocol.report_edits(render, none, originals, {"roi": roi})["roi"]["mean"] is None


# ----------------------------------------------------------------------------- the launcher


def fake_run(generator: str, directory, layer: int, rank_c: int, rank_s: int) -> None:
  """A decompose output directory (factors + metrics.json) without running the fit:
  orthonormal appearances, non-negative parts (the format `experiments.decompose` writes)."""
  h, w, c = sampling.feature_shape(sampling.load_generator(generator), layer)
  rng = np.random.default_rng(0)
  values = dict(
    appearances=np.linalg.qr(rng.normal(size=(c, rank_c)))[0].astype(np.float32),
    parts=rng.uniform(size=(h * w, rank_s)).astype(np.float32),
    loss_history=np.zeros(1),
    steps=1,
    orthogonality_error=0.0,
    step_size_parts=1.0,
    step_size_appearances=1.0,
  )
  factors = pj.Factors(**{name: values[name] for name in pj.Factors._fields if name in values})
  os.makedirs(directory)
  pj.save_factors(os.path.join(directory, "factors"), factors)
  with open(os.path.join(directory, "metrics.json"), "w") as f:
    json.dump(
      dict(
        layer=layer,
        generator=generator,
        seed=0,
        num_samples=8,
        truncation_psi=1.0,
        steps=1,
        feature_shape=[h, w, c],
      ),
      f,
    )


def test_launcher_end_to_end_on_the_fixture(converted, tmp_path, monkeypatch):
  run = converted("dcgan/weights.tar")
  factors = tmp_path / "fit"
  fake_run(str(run.dst), str(factors), layer=2, rank_c=4, rank_s=3)
  monkeypatch.setattr(landmarks, "WORKER", fake_worker(tmp_path))
  out = tmp_path / "eval"
  config = options.make_config(
    evaluate_real.SPEC,
    factors=str(factors),
    out=str(out),
    num_eval=8,
    num_val=8,
    batch_size=8,
    num_show=8,
    roir=True,
    strengths=["3"],
    num_directions=2,
    num_appearances=2,
    min_roi_pixels=1,
    kmeans_restarts=1,
    kmeans_iterations=2,
    mediapipe_python=sys.executable,
    threshold=0.0,
  )
  metrics = evaluate_real.run(config)
  assert metrics["layer"] == 2 and metrics["eval_seed"] == 1 and metrics["detected"] == 5
  assert set(metrics["part_iou"]) == set(evaluate_real.IOU_METHODS)
  for entry in metrics["part_iou"].values():
    assert all(0 <= entry[r]["iou"] <= 1 for r in evaluate_real.REGIONS)
  for method in evaluate_real.ROIR_METHODS:
    for r in evaluate_real.REGIONS:
      assert metrics["roir"][method][r]["n"] == 5, (method, r)  # the detected test samples
  assert {"metrics.json", "tables.md", "parts.png", "regions.png", "landmarks"} <= set(
    os.listdir(out)
  )
  assert json.load(open(out / "metrics.json"))["num_eval"] == 8
  with pytest.raises(ValueError, match="fit's seed"):
    evaluate_real.run(
      options.make_config(evaluate_real.SPEC, factors=str(factors), out=str(out), eval_seed=0)
    )
  with pytest.raises(ValueError, match="layer"):
    evaluate_real.run(
      options.make_config(evaluate_real.SPEC, factors=str(factors), out=str(out), layer=1)
    )


# ----------------------------------------------------------------------------- quality (slow)


def _quality_inputs():
  weights = os.environ.get("PANDA_DCGAN_WEIGHTS", "")
  python = os.environ.get(landmarks.PYTHON_ENV, "")
  missing = []
  if not os.path.exists(weights):
    missing.append(
      "PANDA_DCGAN_WEIGHTS (gan-face-generate 1.1.1's weights.tar, or the "
      "directory `python -m converters` made of it)"
    )
  if not os.path.isfile(python):
    missing.append(f"{landmarks.PYTHON_ENV} (a Python with {landmarks.REQUIREMENT})")
  return weights, python, missing


def test_quality_on_the_real_dcgan(tmp_path):
  """Decompose (the launcher's defaults) at layer 2 on 512 samples, then IoU and ROIR on
  200 eval samples: faces detected, metric sane, PandA the most local on eyes and mouth."""
  weights, python, missing = _quality_inputs()
  if missing:
    pytest.skip("needs " + " and ".join(missing))
  if os.path.isdir(weights):
    generator = weights
  else:
    generator = str(tmp_path / "dcgan")
    subprocess.run(
      [sys.executable, "-m", "converters", f"--src={weights}", f"--dst={generator}"],
      cwd=ROOT,
      check=True,
      capture_output=True,
    )
  fit = tmp_path / "fit"
  decompose.run(
    options.make_config(decompose.SPEC, generator=generator, layer=2, num_samples=512, out=str(fit))
  )
  metrics = evaluate_real.run(
    options.make_config(
      evaluate_real.SPEC,
      factors=str(fit),
      out=str(tmp_path / "eval"),
      roir=True,
      mediapipe_python=python,
    )
  )
  print(evaluate_real.tables(metrics))
  assert metrics["detected_fraction"] >= 0.85
  for entry in metrics["part_iou"].values():
    assert all(0 <= entry[r]["iou"] <= 1 for r in evaluate_real.REGIONS)
  roir = metrics["roir"]
  for region in ("eyes", "mouth"):
    panda = roir["panda_global"][region]["mean"]
    for baseline in ("ganspace", "sefa"):
      other = roir[baseline][region]["mean"]
      assert panda is not None and (other is None or panda < other), (region, baseline, roir)
