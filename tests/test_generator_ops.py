"""The generator helpers on a tiny fake generator with the generator API.

The helpers compose, eagerly, the very functions the tests call on the same
arrays: the same floats, compared without tolerance. A streamed statistic is
compared with float64 under its rounding bound (tests/_bounds.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _bounds import assert_within, gamma
from panda_jax import editing
from panda_jax import generator_ops
from panda_jax import interpret
from panda_jax import metrics

H = W = 4
C, UP, RC, RS = 6, 3, 4, 3
S = H * W


class FakeGenerator:
  """`split` maps z to `[n, H, W, C]` features; `resume` colours each feature
  cell independently and upsamples it to a `UP x UP` pixel block, so an edit of
  one cell changes exactly its block of pixels."""

  num_layers = 2

  def __init__(self, key, z_dim=5, c_dim=0):
    self.z_dim, self.c_dim = z_dim, c_dim
    k1, k2 = jax.random.split(key)
    self.w_in = jax.random.normal(k1, (z_dim + c_dim, S * C)) / np.sqrt(z_dim)
    self.w_out = jax.random.normal(k2, (C, 3)) / np.sqrt(C)

  @property
  def params(self):
    return {"w_in": self.w_in, "w_out": self.w_out}

  def with_params(self, params):
    other = object.__new__(FakeGenerator)
    other.z_dim, other.c_dim = self.z_dim, self.c_dim
    other.w_in, other.w_out = params["w_in"], params["w_out"]
    return other

  def check_layer(self, layer):
    if layer != 1:
      raise ValueError(f"layer must be 1, got {layer}")
    return layer

  def latents(self, z, c=None, truncation_psi=1.0, truncation_cutoff=None):
    del truncation_cutoff
    z = truncation_psi * z
    return z if c is None else jnp.concatenate([z, c], axis=1)

  def split(self, latents, layer, noise_key=None):
    assert layer == 1 and noise_key is None
    x = jnp.reshape(jnp.tanh(latents @ self.w_in), (-1, H, W, C))
    return x, jnp.mean(latents, axis=1)

  def resume(self, x, carry, latents, layer, noise_key=None):
    del latents
    assert layer == 1 and noise_key is None
    img = jnp.tanh(x @ self.w_out + jnp.reshape(carry, (-1, 1, 1, 1)))
    return jnp.repeat(jnp.repeat(img, UP, axis=1), UP, axis=2)

  def generate(self, latents, noise_key=None):
    return self.resume(*self.split(latents, 1, noise_key), latents, 1, noise_key)


def _setup(seed=0, n=3, **kwargs):
  gen = FakeGenerator(jax.random.PRNGKey(seed), **kwargs)
  latents = gen.latents(jax.random.normal(jax.random.PRNGKey(seed + 1), (n, gen.z_dim)))
  rng = np.random.default_rng(seed)
  a = np.linalg.qr(rng.normal(size=(C, RC)))[0].astype(np.float32)
  p = np.maximum(rng.normal(size=(S, RS)), 0).astype(np.float32)
  return gen, latents, a, p


def test_edit_images_renders_the_edited_features():
  gen, latents, a, p = _setup()
  edits = [(1, 0, 4.0), ([0, 2], 3, -2.0)]
  originals, edited = generator_ops.edit_images(gen, latents, 1, a, p, edits)
  np.testing.assert_array_equal(originals, gen.generate(latents))
  x, carry = gen.split(latents, 1)
  expected = gen.resume(editing.edit_many(x, a, p, edits), carry, latents, 1)
  np.testing.assert_array_equal(edited, expected)
  assert np.abs(np.asarray(edited - originals)).max() > 0.1


def test_masked_edit_is_local_in_the_image():
  gen, latents, a, p = _setup(1)
  cells = np.zeros((H, W), np.float32)
  cells[1:3, 0:2] = 1
  roi = np.kron(cells, np.ones((UP, UP), np.float32))  # the mask at image size
  originals, edited = generator_ops.edit_images(gen, latents, 1, a, p, [(roi, 2, 3.0)])
  mean, std = metrics.roir(originals, edited, np.stack([roi] * 3))
  assert float(mean) == 0.0 and float(std) == 0.0
  leaky = np.clip(roi + np.kron(np.eye(H, W), np.ones((UP, UP))), 0, 1)
  originals, edited = generator_ops.edit_images(
    gen, latents, 1, a, p, [(leaky.astype(np.float32), 2, 3.0)]
  )
  assert float(metrics.roir(originals, edited, roi)[0]) > 0.1


def test_rewrite_and_remove_images():
  gen, latents, a, p = _setup(2)
  x, carry = gen.split(latents, 1)
  originals, rewritten = generator_ops.rewrite_images(gen, latents, 1, a, 0, 2, 1.0)
  np.testing.assert_array_equal(
    rewritten, gen.resume(editing.rewrite(x, a, 0, 2, 1.0), carry, latents, 1)
  )
  np.testing.assert_array_equal(originals, gen.generate(latents))
  originals, removed, b = generator_ops.remove_object_images(gen, latents, 1, a, p, [0, 1], 5.0)
  k, _ = editing.propose_background(x, a)
  assert int(b) == int(k)
  np.testing.assert_array_equal(
    removed, gen.resume(editing.edit(x, a, p, [0, 1], int(k), 5.0), carry, latents, 1)
  )
  _, _, b = generator_ops.remove_object_images(gen, latents, 1, a, p, 0, 5.0, background=1)
  assert b == 1


def test_saliency_images():
  gen, latents, a, _ = _setup(3)
  images, maps, upsampled = generator_ops.saliency_images(gen, latents, 1, a, method="nearest")
  x, _ = gen.split(latents, 1)
  np.testing.assert_array_equal(maps, interpret.saliency(x, a))
  assert images.shape == (3, UP * H, UP * W, 3)
  assert upsampled.shape == (3, UP * H, UP * W, RC)
  np.testing.assert_array_equal(upsampled[:, ::UP, ::UP], np.reshape(maps, (3, H, W, RC)))


def test_sampling_is_per_index_and_streams_agree():
  gen, _, a, _ = _setup(4)
  key = jax.random.PRNGKey(7)
  all_latents = generator_ops.sample_latents(gen, key, np.arange(10))
  np.testing.assert_array_equal(
    generator_ops.sample_latents(gen, key, [7, 3]), all_latents[np.array([7, 3])]
  )
  x, _ = gen.split(all_latents, 1)
  mu = generator_ops.concept_means_sampled(gen, key, 1, a, num_samples=10, batch_size=4)
  # Against float64: the saliency entries are dots of length c, each batch mean sums
  # 4 S of them, and each of the 3 running-mean updates rounds 4 times (about |m|):
  # gamma(c + 4 S + 1 + 3 * 8) of the largest |x| . |a_k|.
  x64, a64 = np.asarray(x, np.float64).reshape(10, S, C), np.asarray(a, np.float64)
  assert_within(
    mu,
    (x64 @ a64).mean((0, 1)),
    gamma(C + 4 * S + 1 + 3 * 8) * (np.abs(x64) @ np.abs(a64)).max((0, 1)),
    "concept means",
  )
  part = np.ones(S, np.float32)
  ranking = generator_ops.rank_sampled(gen, key, 1, a, 1, part, k=3, num_samples=10, batch_size=3)
  scores = np.asarray(interpret.rank(x, a, 1, part))
  np.testing.assert_array_equal(ranking.top_index, np.argsort(-scores)[:3])
  np.testing.assert_array_equal(ranking.bottom_index, np.argsort(scores)[:3])
  with pytest.raises(ValueError, match="must be positive"):
    next(generator_ops.sampled_features(gen, key, 1, num_samples=0, batch_size=2))


def test_feature_sampler_draws_the_stream_from_its_params():
  """`feature_sampler`: samples 0..m-1 of the key's stream, through the generator
  rebuilt on the params it is given (arguments of `fit`'s compiled step)."""
  gen, other = FakeGenerator(jax.random.PRNGKey(5)), FakeGenerator(jax.random.PRNGKey(6))
  sampler = generator_ops.feature_sampler(gen, 1, 4)
  key = jax.random.PRNGKey(3)
  for g in (gen, other):
    expected, _ = g.split(generator_ops.sample_latents(g, key, np.arange(4)), 1)
    np.testing.assert_array_equal(sampler.sample(g.params, key), expected)  # Same ops, eagerly.
  with pytest.raises(ValueError, match="samples_per_device"):
    generator_ops.feature_sampler(gen, 1, 0)
  with pytest.raises(ValueError, match="layer"):
    generator_ops.feature_sampler(gen, 2, 4)


def test_conditional_sampling_draws_one_hot_classes():
  gen, _, _, _ = _setup(5, c_dim=4)
  latents = generator_ops.sample_latents(gen, jax.random.PRNGKey(0), np.arange(12))
  classes = np.asarray(latents[:, gen.z_dim :])
  np.testing.assert_array_equal(classes.sum(1), np.ones(12))
  assert len(set(classes.argmax(1).tolist())) > 1
