"""The baselines against NumPy references of their maths, and the protocol's rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import panda_jax as pj
from panda_jax import generators
from panda_jax.baselines import ganspace
from panda_jax.baselines import latent
from panda_jax.baselines import protocol
from panda_jax.baselines import sefa
from panda_jax.baselines import stylespace


@pytest.fixture(scope="module")
def small_gen():
  """An untrained 16x16 StyleGAN2 with w_dim = 16 = every conv's input width."""
  from panda_jax.data import toyfaces_gan  # pylint: disable=import-outside-toplevel

  cfg = toyfaces_gan.GanConfig(
    resolution=16, z_dim=16, w_dim=16, g_channels=(16, 16, 16), d_channels=(16, 16, 16)
  )
  raw = toyfaces_gan.init_generator(jax.random.PRNGKey(0), cfg)
  params = jax.tree.map(np.asarray, toyfaces_gan.stored_params(raw, jnp.zeros((16,)), cfg))
  return generators.base.registered()["stylegan2"].from_converted(
    toyfaces_gan.generator_config(cfg), params
  )


def _planted_codes(rng, n=4000, w_dim=6):
  """Codes with known principal axes `q` (columns) and standard deviations `sd`."""
  q, _ = np.linalg.qr(rng.normal(size=(w_dim, w_dim)))
  sd = np.array([5.0, 3.0, 2.0, 1.0, 0.5, 0.25])[:w_dim]
  return rng.normal(size=(n, w_dim)) * sd @ q.T + rng.normal(size=w_dim), q, sd


def test_ganspace_matches_the_covariance_eigenvectors():
  ws, q, _ = _planted_codes(np.random.default_rng(0))
  dirs = ganspace.fit(ws, 4)
  cov = np.cov(ws.T, bias=True)
  values, vectors = np.linalg.eigh(cov)
  ref_v, ref_sd = vectors[:, ::-1][:, :4].T, np.sqrt(values[::-1][:4])
  np.testing.assert_allclose(np.abs(np.sum(dirs.directions * ref_v, axis=1)), 1, atol=1e-5)
  np.testing.assert_allclose(dirs.scales, ref_sd, rtol=1e-5)
  # The planted axes are recovered (sampling error only).
  assert np.all(np.abs(np.sum(dirs.directions * q[:, :4].T, axis=1)) > 0.99)
  np.testing.assert_allclose(dirs.scales, latent.projection_scales(ws, dirs.directions), rtol=1e-4)
  with pytest.raises(ValueError, match="num_components"):
    ganspace.fit(ws, 7)
  with pytest.raises(ValueError, match="w_dim"):
    ganspace.fit(ws[0], 1)


def test_sefa_matches_the_sum_of_normalised_outer_products():
  rng = np.random.default_rng(1)
  kernels = [rng.normal(size=(8, 5)) * rng.uniform(0.1, 3, size=5), rng.normal(size=(8, 7))]
  dirs = sefa.fit(kernels, 3)
  # Reference: sum over every style column k of k k^T / |k|^2.
  gram = sum(np.outer(col, col) / col.dot(col) for k in kernels for col in k.T)
  values, vectors = np.linalg.eigh(gram)
  np.testing.assert_allclose(
    np.abs(np.sum(dirs.directions * vectors[:, ::-1][:, :3].T, axis=1)), 1, atol=1e-5
  )
  np.testing.assert_allclose(dirs.scales, 1)
  # The top direction maximises sum_l ||v K_l'||^2 over unit vectors.
  energy = lambda v: sum(np.sum((v @ (k / np.linalg.norm(k, axis=0))) ** 2) for k in kernels)
  np.testing.assert_allclose(energy(dirs.directions[0]), values[-1], rtol=1e-5)
  others = rng.normal(size=(200, 8))
  assert max(energy(v / np.linalg.norm(v)) for v in others) < values[-1]
  with pytest.raises(ValueError, match="all-zero"):
    sefa.fit([np.zeros((8, 2))], 1)


def test_sefa_reads_the_style_kernels_of_the_codes(small_gen):
  kernels = sefa.style_kernels(small_gen.params, [0, 2])
  np.testing.assert_array_equal(
    kernels[1], small_gen.params["synthesis"]["convs_2"]["affine"]["kernel"]
  )
  with pytest.raises(ValueError, match="feeds no modulated conv"):
    sefa.style_kernels(small_gen.params, [small_gen.num_ws - 1])


def test_shift_moves_only_the_layer_range():
  ws = jnp.asarray(np.random.default_rng(2).normal(size=(3, 6, 4)), jnp.float32)
  v = jnp.asarray([1.0, -2.0, 0.5, 0.0])
  moved = latent.shift(ws, v, 2.0, 1, 3)
  np.testing.assert_allclose(
    moved[:, 1:3] - ws[:, 1:3], np.broadcast_to(2 * v, (3, 2, 4)), atol=1e-6
  )
  np.testing.assert_array_equal(moved[:, [0, 3, 4, 5]], ws[:, [0, 3, 4, 5]])
  assert latent.layer_ranges(5) == [(0, 5), (0, 2), (2, 4), (4, 5)]
  with pytest.raises(ValueError, match="layer range"):
    latent.shift(ws, v, 1.0, 4, 7)


def test_style_channel_edit_equals_the_code_move_that_makes_it(small_gen):
  """Code 2 feeds only `convs_2` (w_dim = its width, so K is invertible): moving the
  code by `delta e_j K^-1` is the single style-channel edit of StyleSpace."""
  gen, conv, j, delta = small_gen, 2, 5, 1.5
  lat = gen.latents(jax.random.normal(jax.random.PRNGKey(3), (4, gen.z_dim)))
  kernel = np.asarray(gen.params["synthesis"][f"convs_{conv}"]["affine"]["kernel"], np.float64)
  v = np.linalg.solve(kernel.T, delta * np.eye(kernel.shape[1])[j])  # v K = delta e_j
  by_code = gen.generate(latent.shift(lat, jnp.asarray(v, jnp.float32), 1.0, conv, conv + 1))
  by_style = stylespace.generate(gen, lat, conv, j, delta)
  np.testing.assert_allclose(by_style, by_code, atol=2e-4)
  assert float(jnp.max(jnp.abs(by_style - gen.generate(lat)))) > 1e-2
  # Only that style moves, and the generator's own parameters are untouched.
  shifted = stylespace.shifted_params(gen.params, conv, j, delta)
  diff = stylespace.styles(shifted, lat, conv) - stylespace.styles(gen.params, lat, conv)
  np.testing.assert_allclose(diff, np.broadcast_to(delta * np.eye(16)[j], diff.shape), atol=1e-5)
  np.testing.assert_array_equal(stylespace.generate(gen, lat, conv, j, 0.0), gen.generate(lat))
  chans = stylespace.channels(gen.params, lat)
  assert len(chans) == 16 * stylespace.num_convs(gen.params)
  with pytest.raises(ValueError, match="channel 16 out of range"):
    stylespace.shifted_params(gen.params, conv, 16, 1.0)


def test_locality_scores_rank_a_planted_channel_first(small_gen):
  """The share inside a region made of the pixels one channel moves most is largest."""
  gen = small_gen
  lat = gen.latents(jax.random.normal(jax.random.PRNGKey(4), (2, gen.z_dim)))
  chans = stylespace.channels(gen.params, lat)[16 * 4 : 16 * 4 + 6]
  base = gen.generate(lat)[..., :3]
  moved = stylespace.generate(gen, lat, chans[2].conv, chans[2].channel, 4 * chans[2].std)[..., :3]
  change = jnp.sum(jnp.square(moved - base), axis=-1)
  mask = (change >= jnp.quantile(change, 0.9, axis=(1, 2), keepdims=True)).astype(jnp.float32)
  _, scores = stylespace.locality_scores(gen, lat, mask[None], 4.0, candidates=chans)
  assert scores.shape == (6, 1) and int(np.argmax(scores[:, 0])) == 2
  np.testing.assert_allclose(
    scores[2, 0], np.mean(protocol.inside_share(base, moved, mask)), rtol=1e-5
  )


def test_splits_are_disjoint_consecutive_ranges():
  s = protocol.splits(5, 3, 4)
  every = np.concatenate([s.train, s.val, s.test])
  np.testing.assert_array_equal(every, np.arange(12))
  assert not (set(s.train) & set(s.val) or set(s.val) & set(s.test) or set(s.train) & set(s.test))
  with pytest.raises(ValueError, match="positive integers"):
    protocol.splits(5, 0, 4)


def test_roi_change_inside_share_and_roir_closed_forms():
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(2, 4, 4, 3)), jnp.float32)
  mask = np.zeros((2, 4, 4), np.float32)
  mask[:, 1:3, 1:3] = 1
  inside_only = x + 0.3 * mask[..., None]
  np.testing.assert_allclose(protocol.roi_change(x, inside_only, mask), [0.3, 0.3], rtol=1e-5)
  np.testing.assert_allclose(protocol.inside_share(x, inside_only, mask), [1, 1])
  np.testing.assert_allclose(pj.roir_per_sample(x, inside_only, jnp.asarray(mask)), [0, 0])
  # Uniform change c everywhere: ROIR = sqrt(12 / 4), inside share 4 / 16.
  everywhere = x + 0.5
  np.testing.assert_allclose(
    pj.roir_per_sample(x, everywhere, jnp.asarray(mask)), np.sqrt(3), rtol=1e-5
  )
  np.testing.assert_allclose(protocol.inside_share(x, everywhere, mask), 0.25, rtol=1e-5)
  np.testing.assert_allclose(protocol.roi_change(x, everywhere, mask), 0.5, rtol=1e-5)
  np.testing.assert_array_equal(protocol.roi_change(x, everywhere, np.zeros_like(mask)), [0, 0])


def test_select_applies_the_threshold_rule():
  roirs = [0.1, 0.5, np.nan, 0.3, 2.0]
  changes = [0.01, 0.2, 0.5, 0.3, 0.9]
  assert protocol.select(roirs, changes, 0.1) == 3  # 0.1 is below the threshold
  assert protocol.select(roirs, changes, 0.0) == 0
  assert protocol.select(roirs, changes, 0.6) == 4
  assert protocol.select(roirs, changes, 1.0) is None  # nothing changes the ROI enough
  assert protocol.select([np.nan, np.inf], [1, 1], 0.5) == 0  # still a valid index
  with pytest.raises(ValueError, match="one length"):
    protocol.select([1.0], [1.0, 2.0], 0.0)
