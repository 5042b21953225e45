"""Figures are written as non-empty PNGs whose panels show different content."""

import numpy as np
import pytest
from matplotlib import image as mimage

from panda_jax import viz

H = W = 4
S, RS = H * W, 4


def _parts():
  parts = np.zeros((S, RS), np.float32)
  for k in range(RS):  # quadrants
    grid = np.zeros((H, W), np.float32)
    grid[(k // 2) * 2 : (k // 2) * 2 + 2, (k % 2) * 2 : (k % 2) * 2 + 2] = 1
    parts[:, k] = grid.ravel()
  return parts


def _read(path):
  img = mimage.imread(path)
  assert img.ndim == 3 and img.shape[0] > 20 and img.shape[1] > 20
  return img[..., :3]


def _runs(dense):
  """(start, stop) of the runs of True in a 1-D boolean array."""
  edges = np.flatnonzero(np.diff(np.concatenate([[0], dense.astype(int), [0]])))
  return list(zip(edges[::2], edges[1::2]))


def _panels(img):
  """The image panels of a figure, `[rows][cols]` crops: the runs of rows and
  columns about as inked as the densest one (titles and margins are not)."""
  ink = np.any(img < 0.98, axis=-1)
  rows, cols = ink.mean(axis=1), ink.mean(axis=0)
  rows, cols = _runs(rows > 0.8 * rows.max()), _runs(cols > 0.8 * cols.max())
  return [[img[r0:r1, c0:c1] for c0, c1 in cols] for r0, r1 in rows]


def _image(value, size=16):
  rng = np.random.default_rng(int(value * 10) + 10)
  return (value + 0.1 * rng.normal(size=(size, size, 3))).astype(np.float32)


def _quadrants(panel):
  halves = np.array_split(panel, 2, axis=0)
  return np.array([q.mean() for h in halves for q in np.array_split(h, 2, axis=1)])


def test_plot_parts(tmp_path):
  panels = _panels(_read(viz.plot_parts(_parts(), str(tmp_path / "p.png"), ncols=2)))
  assert [len(row) for row in panels] == [2, 2]
  for k, panel in enumerate(p for row in panels for p in row):
    # Part k is the k-th quadrant: there its heat map is brightest.
    assert np.argmax(_quadrants(panel)) == k


def test_plot_parts_overlay(tmp_path):
  image = np.zeros((32, 32, 3), np.float32)
  ((plain, overlay),) = _panels(
    _read(viz.plot_parts_overlay(image, _parts(), str(tmp_path / "o.png")))
  )
  assert plain.std() < 0.01  # a flat grey image
  colours = np.array(
    [
      q.reshape(-1, 3).mean(0)
      for h in np.array_split(overlay, 2, 0)
      for q in np.array_split(h, 2, 1)
    ]
  )
  assert (
    np.min(np.linalg.norm(colours[:, None] - colours[None], axis=-1) + np.eye(4)) > 0.05
  )  # four distinct colours
  assert len({tuple(np.round(c, 3)) for c in viz.part_colours(25)}) == 25


def test_plot_saliency(tmp_path):
  images = np.stack([_image(-0.5), _image(0.5)])
  maps = np.zeros((2, S, 2), np.float32)
  maps[:, : S // 2, 0] = 1.0  # concept 0 in the top half, 1 in the bottom half
  maps[:, S // 2 :, 1] = 1.0
  panels = _panels(
    _read(
      viz.plot_saliency(images, maps, maps.mean((0, 1)), str(tmp_path / "s.png"), concepts=(0, 1))
    )
  )
  assert [len(row) for row in panels] == [5, 5]
  assert panels[0][0].mean() + 0.2 < panels[1][0].mean()  # dark vs bright image
  for row in panels:
    for col, k in ((1, 0), (2, 0), (3, 1), (4, 1)):  # map and mask of concept k
      top, bottom = np.array_split(row[col], 2, axis=0)
      assert (top.mean() > bottom.mean() + 0.05) == (k == 0)
      assert (bottom.mean() > top.mean() + 0.05) == (k == 1)
  with pytest.raises(ValueError, match="need 2 images"):
    viz.plot_saliency(images[:1], maps, maps.mean((0, 1)), str(tmp_path / "x.png"))


def test_plot_edit(tmp_path):
  originals = np.stack([_image(-0.8), _image(-0.2), _image(0.3)])
  edits = originals.copy()
  edits[:, 4:10, 4:10] += 1.0
  panels = _panels(_read(viz.plot_edit(originals, edits, str(tmp_path / "e.png"))))
  assert [len(row) for row in panels] == [3, 3, 3]
  for i in range(3):
    before, after, error = (panels[r][i] for r in range(3))
    assert after.mean() > before.mean() + 0.02  # the edit brightened the square
    inner = error[
      error.shape[0] // 3 : error.shape[0] // 2, error.shape[1] // 3 : error.shape[1] // 2
    ]
    assert inner.mean() > error.mean() + 0.2  # the error lies in the square only
  with pytest.raises(ValueError, match="originals and edits"):
    viz.plot_edit(originals, edits[:2], str(tmp_path / "x.png"))


def test_plot_ranking(tmp_path):
  top = np.stack([_image(0.9), _image(0.7), _image(0.5)])
  bottom = np.stack([_image(-0.9), _image(-0.7), _image(-0.5)])
  path = viz.plot_ranking(
    top,
    bottom,
    str(tmp_path / "sub" / "r.png"),
    top_scores=[3.0, 2.0, 1.0],
    bottom_scores=[-3.0, -2.0, -1.0],
  )
  panels = _panels(_read(path))
  means = np.array([[p.mean() for p in row] for row in panels])
  assert means.shape == (2, 3)
  assert np.all(np.diff(means[0]) < 0) and np.all(np.diff(means[1]) > 0)
  assert means[0].min() > means[1].max()


def test_upsample_blocks_pixel_ranges_and_display():
  field = np.arange(6).reshape(2, 3)
  np.testing.assert_array_equal(
    viz.upsample_blocks(field, (4, 6)), np.repeat(np.repeat(field, 2, 0), 2, 1)
  )
  np.testing.assert_array_equal(
    viz.upsample_blocks(field[None], (2, 6), axis=1)[0], np.repeat(field, 2, 1)
  )
  np.testing.assert_array_equal(viz.upsample_blocks(field, (3, 3))[:, 0], [0, 0, 3])  # nearest
  np.testing.assert_array_equal(viz.to_uint8(np.array([-2, -1, 0, 1, 2.0])), [0, 0, 128, 255, 255])
  np.testing.assert_array_equal(viz.to_unit(np.array([-2, 0, 2.0])), [0, 0.5, 1])
  grey = np.zeros((1, 4, 4, 1), np.float32)
  assert viz.display(grey).shape == (4, 4, 3) and viz.display(grey).dtype == np.uint8
  labelled = np.zeros((1, 4, 4, 9), np.float32)  # toy faces: RGB + 6 label channels
  np.testing.assert_array_equal(viz.display(labelled), viz.to_uint8(labelled[0, ..., :3]))


def test_one_palette_and_one_overlay():
  """Each cell shows its part's `part_colours` colour; cells below `min_relative` stay plain."""
  parts = _parts()
  parts[0, 0] = 0.05  # cell 0: part 0 at 5% of its peak
  labels = viz.part_labels(parts)
  np.testing.assert_array_equal(labels.reshape(H, W)[::2, ::2], [[0, 1], [2, 3]])
  assert viz.part_labels(parts, 0.1)[0] == -1 and viz.part_labels(parts)[0] == 0
  image = np.full((8, 8, 3), 0.5)
  tinted = viz.overlay_parts(image, parts, alpha=1.0)
  for k in range(RS):
    y, x = (k // 2) * 4 + 2, (k % 2) * 4 + 2
    np.testing.assert_allclose(tinted[y, x], viz.part_colours(RS)[k])
  plain = viz.overlay_parts(image, parts, alpha=1.0, min_relative=0.1)
  np.testing.assert_array_equal(plain[:2, :2], image[:2, :2])
