"""ROIR (Eq. 13) vs a direct NumPy transcription and its closed forms."""
import jax
import numpy as np
import pytest

from panda_jax import metrics

N, H, W, CH = 6, 8, 10, 3


def _np_roir(x, x_edit, m):
  """Eq. (13) summand per sample, the mask replicated along the channels."""
  ratios = []
  for i in range(len(x)):
    mask = np.repeat(m[i][..., None], x.shape[-1], axis=-1)
    d = x[i] - x_edit[i]
    ratios.append(np.linalg.norm(((1 - mask) * d).ravel())
                  / np.linalg.norm((mask * d).ravel()))
  return np.array(ratios)


def test_roir_matches_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(N, H, W, CH)).astype(np.float32)
  x_edit = x + rng.normal(size=x.shape).astype(np.float32)
  m = rng.uniform(size=(N, H, W)).astype(np.float32)
  expected = _np_roir(x, x_edit, m)
  mean, std = metrics.roir(x, x_edit, m)
  np.testing.assert_allclose(metrics.roir_per_sample(x, x_edit, m), expected,
                             rtol=1e-5)
  np.testing.assert_allclose(mean, expected.mean(), rtol=1e-5)
  np.testing.assert_allclose(std, expected.std(), rtol=1e-4)
  shared = metrics.roir_per_sample(x, x_edit, m[0])
  np.testing.assert_allclose(shared, _np_roir(x, x_edit, np.stack([m[0]] * N)),
                             rtol=1e-5)
  jitted = jax.jit(metrics.roir)(x, x_edit, m)
  np.testing.assert_allclose(jitted[0], expected.mean(), rtol=1e-5)


def test_roir_is_zero_inside_and_grows_as_the_edit_leaks():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(N, H, W, CH)).astype(np.float32)
  m = np.zeros((N, H, W), np.float32)
  m[:, 2:5, 3:7] = 1
  change = rng.normal(size=x.shape).astype(np.float32)
  inside = change * m[..., None]
  outside = change * (1 - m[..., None])
  values = []
  for leak in [0.0, 0.1, 0.5, 1.0]:
    mean, _ = metrics.roir(x, x + inside + leak * outside, m)
    values.append(float(mean))
  assert values[0] == 0.0
  assert all(b > a for a, b in zip(values, values[1:]))
  # Closed form: the per-sample ratio is leak * ||outside_i|| / ||inside_i||.
  per_sample = np.linalg.norm(outside.reshape(N, -1), axis=1) / np.linalg.norm(
      inside.reshape(N, -1), axis=1)
  np.testing.assert_allclose(values[2], 0.5 * per_sample.mean(), rtol=1e-5)


@pytest.mark.parametrize("masks, message", [
    (np.ones((N, H, W + 1), np.float32), "masks must be"),
    (np.ones((N + 1, H, W), np.float32), "masks must be"),
    (np.full((N, H, W), 1.5, np.float32), r"\[0, 1\]"),
    (np.full((N, H, W), np.nan, np.float32), "non-finite"),
])
def test_roir_bad_masks_raise(masks, message):
  x = np.zeros((N, H, W, CH), np.float32)
  with pytest.raises(ValueError, match=message):
    metrics.roir(x, x + 1, masks)


def test_roir_bad_images_raise():
  x = np.zeros((N, H, W, CH), np.float32)
  with pytest.raises(ValueError, match="originals and edits"):
    metrics.roir(x, x[:, :-1], np.ones((N, H, W), np.float32))
