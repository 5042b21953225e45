"""ROIR (Eq. 13) vs a float64 NumPy transcription and its closed forms.

Tolerances are rounding bounds (tests/_bounds.py). Per sample, `(1 - M) * (X - X')`
rounds each entry three times (the difference, `1 - M`, the product), squaring
doubles that and rounds once more, the sum of N = H W ch non-negative squares
adds gamma(N): the squared norm is off by gamma(N + 7) of itself, the norm by
half that and a square root's rounding, and the ratio of two norms by
`_ratio_error` = gamma(2 N + 15) of itself.
"""

import jax
import numpy as np
import pytest

from _bounds import U32, assert_within, gamma
from panda_jax import metrics

N, H, W, CH = 6, 8, 10, 3
_ratio_error = gamma(2 * H * W * CH + 15)


def _np_roir(x, x_edit, m):
  """Eq. (13) summand per sample, the mask replicated along the channels, float64."""
  x, x_edit, m = (np.asarray(v, np.float64) for v in (x, x_edit, m))
  ratios = []
  for i in range(len(x)):
    mask = np.repeat(m[i][..., None], x.shape[-1], axis=-1)
    d = x[i] - x_edit[i]
    ratios.append(np.linalg.norm(((1 - mask) * d).ravel()) / np.linalg.norm((mask * d).ravel()))
  return np.array(ratios)


def _mean_bound(ratios, per_sample):
  """The mean of n positive ratios each off by `per_sample`: that, plus gamma(n) of the mean
  (the sum of n terms and the division)."""
  return np.mean(per_sample) + gamma(len(ratios)) * np.mean(ratios)


def _std_bound(ratios, per_sample):
  """`std` is 1-Lipschitz in the max norm of its input (max |dr|), and its own float32
  evaluation (a mean, n deviations, their squares, a mean, a square root) perturbs the
  variance by at most gamma(5 n + 6) max(r)^2, the standard deviation by that over std
  (|sqrt(a) - sqrt(b)| <= |a - b| / sqrt(b)) plus the square root's rounding."""
  n, top, std = len(ratios), np.max(ratios), np.std(ratios)
  return np.max(per_sample) + gamma(5 * n + 6) * top**2 / std + U32 * std


def test_roir_matches_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(N, H, W, CH)).astype(np.float32)
  x_edit = x + rng.normal(size=x.shape).astype(np.float32)
  m = rng.uniform(size=(N, H, W)).astype(np.float32)
  expected = _np_roir(x, x_edit, m)
  per_sample = _ratio_error * expected
  mean, std = metrics.roir(x, x_edit, m)
  assert_within(metrics.roir_per_sample(x, x_edit, m), expected, per_sample, "ratios")
  assert_within(mean, expected.mean(), _mean_bound(expected, per_sample), "mean")
  assert_within(std, expected.std(), _std_bound(expected, per_sample), "std")
  shared = _np_roir(x, x_edit, np.stack([m[0]] * N))
  assert_within(
    metrics.roir_per_sample(x, x_edit, m[0]), shared, _ratio_error * shared, "shared mask"
  )
  jitted = jax.jit(metrics.roir)(x, x_edit, m)
  assert_within(jitted[0], expected.mean(), _mean_bound(expected, per_sample), "jitted mean")


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
  # Exact: with no leak, X' = X outside the ROI (adding exact zeros), so the numerator is 0.
  assert values[0] == 0.0
  assert all(b > a for a, b in zip(values, values[1:]))
  # Closed form: the per-sample ratio is leak * ||outside_i|| / ||inside_i||. Building
  # X' = X + inside + leak outside and taking X - X' in float32 rounds three times,
  # an error e <= gamma(3) (|X| + |change|) per entry that moves each norm by at most
  # ||e|| over its region (triangle inequality); then the ratio's own rounding.
  norm = lambda v: np.linalg.norm(np.asarray(v, np.float64).reshape(N, -1), axis=1)
  d_out, d_in = 0.5 * norm(outside), norm(inside)
  e = gamma(3) * (np.abs(x).astype(np.float64) + np.abs(change))
  e_out, e_in = norm(e * (1 - m[..., None])), norm(e * m[..., None])
  ratios = d_out / d_in
  per_sample = ratios * (e_out / d_out + e_in / (d_in - e_in) + _ratio_error)
  assert_within(values[2], ratios.mean(), _mean_bound(ratios, per_sample), "closed form")


@pytest.mark.parametrize(
  "masks, message",
  [
    (np.ones((N, H, W + 1), np.float32), "masks must be"),
    (np.ones((N + 1, H, W), np.float32), "masks must be"),
    (np.full((N, H, W), 1.5, np.float32), r"\[0, 1\]"),
    (np.full((N, H, W), np.nan, np.float32), "non-finite"),
  ],
)
def test_roir_bad_masks_raise(masks, message):
  x = np.zeros((N, H, W, CH), np.float32)
  with pytest.raises(ValueError, match=message):
    metrics.roir(x, x + 1, masks)


def test_roir_bad_images_raise():
  x = np.zeros((N, H, W, CH), np.float32)
  with pytest.raises(ValueError, match="originals and edits"):
    metrics.roir(x, x[:, :-1], np.ones((N, H, W), np.float32))


def test_masked_norms_are_the_squares_of_eq_13s_norms():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(N, H, W, CH)).astype(np.float32)
  x_edit = x + rng.normal(size=x.shape).astype(np.float32)
  m = (rng.uniform(size=(N, H, W)) > 0.5).astype(np.float32)
  inside, outside = (np.asarray(v, np.float64) for v in metrics.masked_norms(x, x_edit, m))
  d = np.asarray(x, np.float64) - x_edit
  np.testing.assert_allclose(inside, np.sum(m[..., None] * d**2, axis=(1, 2, 3)), rtol=1e-5)
  np.testing.assert_allclose(outside, np.sum((1 - m[..., None]) * d**2, axis=(1, 2, 3)), rtol=1e-5)
  np.testing.assert_allclose(
    metrics.roir_per_sample(x, x_edit, m), np.sqrt(outside / inside), rtol=1e-6
  )
