"""`panda_jax.parts_eval` against a NumPy reference and planted segmentations."""

import numpy as np
import pytest

from panda_jax import parts_eval


def _reference_iou(assigned, labels, num_parts, num_labels):
  """Loop-by-loop pooled IoU: `[L, K]`."""
  out = np.zeros((num_labels, num_parts))
  for l in range(num_labels):
    for k in range(num_parts):
      inter = union = 0
      for a, g in zip(assigned, labels):
        inter += np.sum((a == k) & (g == l))
        union += np.sum((a == k) | (g == l))
      out[l, k] = inter / union if union else 0.0
  return out


@pytest.mark.parametrize("refined", [False, True])
def test_best_part_iou_matches_numpy_reference(refined):
  rng = np.random.default_rng(0)
  n, h, w, r_s, num_labels, up = 3, 4, 4, 5, 4, 2
  parts = rng.random((n, h * w, r_s) if refined else (h * w, r_s)).astype(np.float32)
  labels = rng.integers(0, num_labels, (n, h * up, w * up)).astype(np.int32)
  best, match, iou = parts_eval.best_part_iou(parts, labels, num_labels, (h, w), method="nearest")
  relative = parts / parts.max(axis=-2, keepdims=True)  # Each part / its peak.
  grids = np.argmax(np.reshape(relative, (-1, h, w, r_s)), -1)  # [n or 1, h, w]
  assigned = np.repeat(np.repeat(grids, up, 1), up, 2)
  assigned = np.broadcast_to(assigned, labels.shape)
  expected = _reference_iou(assigned, labels, r_s, num_labels)
  np.testing.assert_allclose(np.asarray(iou), expected, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(best), expected.max(1), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(match), expected.argmax(1))


def test_relative_parts_compare_parts_of_different_sizes():
  """A boundary cell shared by a big and a small part goes to the one it belongs to more.

  Unit-norm parts: a big part (12 cells) is 1/sqrt(12) high, a small one (4
  cells) 1/2. A cell holding 0.8 of the big part's peak and 0.6 of the small
  one's is the big part's, though its raw value is lower (0.23 < 0.3).
  """
  big, small = np.zeros(17, np.float32), np.zeros(17, np.float32)
  big[:12], small[12:16] = 1 / np.sqrt(12), 0.5
  big[16], small[16] = 0.8 / np.sqrt(12), 0.6 * 0.5
  parts = np.stack([big, small], 1)  # [s=17, 2]
  relative = np.asarray(parts_eval.relative_parts(parts))
  np.testing.assert_allclose(relative.max(0), 1, rtol=1e-6)
  np.testing.assert_allclose(relative[16], [0.8, 0.6], rtol=1e-6)
  assert np.argmax(parts[16]) == 1 and np.argmax(relative[16]) == 0
  np.testing.assert_array_equal(
    np.asarray(parts_eval.assign_parts(parts)), [0] * 12 + [1] * 4 + [0]
  )
  # Refined `[n, s, r_s]`: each sample's parts by their own peaks; zero parts stay zero.
  refined = np.stack([parts, 2 * parts, np.zeros_like(parts)])
  np.testing.assert_allclose(
    np.asarray(parts_eval.relative_parts(refined)),
    np.stack([relative, relative, np.zeros_like(parts)]),
    rtol=1e-6,
  )


def test_planted_parts_are_found_exactly():
  """Parts equal to the (permuted) label indicators at feature size: IoU 1, right match."""
  rng = np.random.default_rng(1)
  h = w = 8
  grid_labels = rng.integers(0, 4, (h, w))
  grid_labels[:4] = np.arange(4)[:, None]  # every label present
  perm = np.array([2, 0, 3, 1])  # label l is part perm[l]
  parts = np.zeros((h * w, 4), np.float32)
  parts[np.arange(h * w), perm[grid_labels.ravel()]] = 1.0
  labels = np.repeat(np.repeat(grid_labels, 4, 0), 4, 1)[None].repeat(2, 0)
  best, match, _ = parts_eval.best_part_iou(parts, labels, 4, (h, w), method="nearest")
  np.testing.assert_allclose(np.asarray(best), 1.0)
  np.testing.assert_array_equal(np.asarray(match), perm)


def test_iou_matrix_masks_and_empty_pairs():
  labels = np.zeros((1, 2, 2), np.int32)
  labels[0, 0] = 1  # label 1: the top row; label 2 absent
  masks = np.zeros((1, 2, 2, 2), bool)
  masks[0, :, 0, 0] = True  # left column: IoU with label 1 = 1/3
  iou = np.asarray(parts_eval.iou_matrix(masks, labels, 3))
  np.testing.assert_allclose(iou[:, 0], [1 / 3, 1 / 3, 0.0], rtol=1e-6)
  np.testing.assert_allclose(iou[:, 1], 0.0)  # an empty mask matches nothing


def test_bad_shapes_raise():
  with pytest.raises(ValueError, match="parts must be"):
    parts_eval.best_part_iou(np.ones((10, 2)), np.zeros((1, 4, 4), np.int32), 2, (3, 3))
  with pytest.raises(ValueError, match="labels must be"):
    parts_eval.iou_matrix(np.ones((4, 4, 2), bool), np.zeros((4, 4), np.int32), 2)


def test_fixed_region_bound_is_the_best_fixed_mask():
  """Brute force over every mask of a 2x3 image: the bound is the best pooled IoU."""
  rng = np.random.default_rng(2)
  labels = rng.integers(0, 3, (7, 2, 3)).astype(np.int32)
  bound = np.asarray(parts_eval.fixed_region_bound(labels, 3))
  masks = np.array([[(m >> b) & 1 for b in range(6)] for m in range(1, 64)], bool)
  masks = masks.reshape(-1, 2, 3)
  iou = np.asarray(parts_eval.iou_matrix(np.moveaxis(masks, 0, -1), labels, 3))  # [3, 63]
  np.testing.assert_allclose(bound, iou.max(axis=1), rtol=1e-6)


def test_matched_iou_is_the_diagonal_pooled_or_per_sample():
  rng = np.random.default_rng(3)
  labels = rng.integers(0, 3, size=(4, 5, 6))
  masks = rng.uniform(size=(4, 5, 6, 3)) > 0.5  # mask l stands for label l
  pooled = np.asarray(parts_eval.matched_iou(masks, labels, 3))
  per = np.asarray(parts_eval.matched_iou(masks, labels, 3, per_sample=True))
  for l in range(3):
    truth = labels == l
    union = truth | masks[..., l]
    assert pooled[l] == pytest.approx((truth & masks[..., l]).sum() / union.sum(), rel=1e-6)
    np.testing.assert_allclose(
      per[:, l], (truth & masks[..., l]).sum(axis=(1, 2)) / union.sum(axis=(1, 2)), rtol=1e-6
    )


def test_part_regions_name_the_labels_a_part_matches():
  labels = np.zeros((2, 4, 4), np.int32)
  labels[:, :2] = 1  # label 1: the top half
  parts = np.zeros((4, 3), np.float32)  # grid 2 x 2
  parts[[0, 1], 0] = 1  # part 0: the top row
  parts[[2, 3], 1] = 1  # part 1: the bottom row
  parts[3, 2] = 1  # part 2: one cell, no label's best
  masks, names = parts_eval.part_regions(parts, labels, ("bg", "top"), (2, 2), 0)
  assert names == ["top"]
  np.testing.assert_array_equal(masks, labels == 1)
  masks, names = parts_eval.part_regions(parts, labels, ("bg", "top"), (2, 2), [0, 2])
  assert names == ["bg", "top"] and masks.all()  # part 2 overlaps bg most
