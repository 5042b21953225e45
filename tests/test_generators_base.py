"""The generator contract: registry, layer checks, converted-checkpoint directories,
and the invariants every family's converted fixture must satisfy."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from _reference import np_upfirdn2d
from conftest import FIXTURE_CHECKPOINTS
from panda_jax import generators
from panda_jax.generators import base
from panda_jax.generators import layers as layers_lib
from panda_jax.generators import stylegan2

CONFIG = dict(
  z_dim=4, c_dim=0, w_dim=4, img_resolution=8, img_channels=3, channels=[8, 4], mapping_layers=1
)


def _params(seed=0):
  shapes = stylegan2.param_shapes(stylegan2.Config.from_dict(CONFIG))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)


def test_save_then_load_round_trips(tmp_path):
  params = _params()
  dst = base.save_converted(tmp_path / "g", "stylegan2", CONFIG, params)
  gen = generators.load(dst)
  assert isinstance(gen, stylegan2.StyleGAN2) and gen.arch == "stylegan2"
  assert gen.config == CONFIG
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, gen.params), params)
  with open(os.path.join(dst, "config.json")) as f:
    assert json.load(f)["arch"] == "stylegan2"
  lat = gen.latents(np.ones((1, 4)))
  np.testing.assert_array_equal(
    gen.generate(lat), stylegan2.StyleGAN2(CONFIG, params).generate(lat)
  )


def test_loading_needs_neither_converters_nor_torch(tmp_path):
  dst = base.save_converted(tmp_path / "g", "stylegan2", CONFIG, _params())
  code = (
    f"import sys; from panda_jax import generators; generators.load({dst!r}); "
    "bad = [m for m in sys.modules if m.split('.')[0] in ('converters', 'torch')]; "
    "assert not bad, bad"
  )
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=120)


def test_save_is_atomic(tmp_path, monkeypatch):
  class Exploding:
    def save(self, path, args):
      os.makedirs(path)
      raise OSError("disk full")

  monkeypatch.setattr(base, "_checkpointer", Exploding)
  with pytest.raises(OSError, match="disk full"):
    base.save_converted(tmp_path / "g", "stylegan2", CONFIG, _params())
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(config={"arch": "x"}), "reserved keys"),
    (dict(params={"a.b": np.zeros(2)}), "without '.' or '/'"),
    (dict(params={"a": [np.zeros(2)]}), "no lists"),
  ],
)
def test_save_refuses_bad_input(kwargs, match, tmp_path):
  args = dict(dst=tmp_path / "g", arch="stylegan2", config=CONFIG, params=_params())
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    base.save_converted(**args)
  assert not (tmp_path / "g").exists()


def test_save_refuses_a_non_empty_destination(tmp_path):
  (tmp_path / "g").mkdir()
  (tmp_path / "g" / "keep").write_text("x")
  with pytest.raises(ValueError, match="not empty"):
    base.save_converted(tmp_path / "g", "stylegan2", CONFIG, _params())
  assert os.listdir(tmp_path / "g") == ["keep"]


def test_load_errors(tmp_path):
  with pytest.raises(ValueError, match="not a converted checkpoint"):
    generators.load(tmp_path)
  base.save_converted(tmp_path / "g", "no-such-arch", CONFIG, _params())
  with pytest.raises(ValueError, match="unknown architecture 'no-such-arch'"):
    generators.load(tmp_path / "g")


def test_registry():
  assert base.registered()["stylegan2"] is stylegan2.StyleGAN2
  with pytest.raises(ValueError, match="already registered"):
    base.register(type("Impostor", (stylegan2.StyleGAN2,), {}))
  with pytest.raises(ValueError, match="must set a class attribute `arch`"):
    base.register(type("NoArch", (base.Generator,), {}))
  assert base.registered()["stylegan2"] is stylegan2.StyleGAN2


def test_generator_is_abstract():
  with pytest.raises(TypeError):
    base.Generator({}, {})  # pylint: disable=abstract-class-instantiated


@pytest.mark.parametrize("layer", [0, 4, -1, 1.0, True, "2"])
def test_check_layer(layer):
  gen = stylegan2.StyleGAN2(CONFIG, _params())
  assert list(gen.layers) == [1, 2, 3] and gen.check_layer(np.int64(2)) == 2
  with pytest.raises(ValueError, match="layer must"):
    gen.check_layer(layer)


def _latents(gen, n=2, seed=0):
  """Latents of `n` random z (and classes), no truncation."""
  z = np.random.default_rng(seed).standard_normal((n, gen.z_dim)).astype(np.float32)
  c = np.eye(gen.c_dim, dtype=np.float32)[np.arange(n) % gen.c_dim] if gen.c_dim else None
  return gen.latents(z, c)


@pytest.mark.parametrize("family", sorted(FIXTURE_CHECKPOINTS))
def test_resume_of_split_is_generate_for_every_family_and_layer(family, fixture_generator):
  gen = fixture_generator(family)
  assert gen.arch == family and len(gen.layers) >= 6
  lat = _latents(gen)
  img = np.asarray(gen.generate(lat))
  assert np.isfinite(img).all() and np.abs(img).max() > 0
  for layer in gen.layers:
    x, carry = gen.split(lat, layer)
    np.testing.assert_allclose(
      gen.resume(x, carry, lat, layer),
      img,
      rtol=0,
      atol=1e-5 * np.abs(img).max(),
      err_msg=f"layer {layer}",
    )


def _products(jaxpr):
  """Every dot_general and conv_general_dilated equation, in nested jaxprs too."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
      yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else (value,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from _products(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from _products(sub)


@pytest.mark.parametrize("family", sorted(FIXTURE_CHECKPOINTS))
def test_every_product_runs_in_float32_precision(family, fixture_generator):
  """`layers.PRECISION` everywhere: JAX's default (TF32 on GPU) misses the 1e-4
  tolerance of the ports by ~10x, so a product without it is a GPU-only bug."""
  gen = fixture_generator(family)
  c = np.eye(gen.c_dim, dtype=np.float32)[:1] if gen.c_dim else None
  jaxpr = jax.make_jaxpr(lambda z: gen.generate(gen.latents(z, c)))(
    np.zeros((1, gen.z_dim), np.float32)
  )
  products = list(_products(jaxpr.jaxpr))
  assert len(products) >= gen.num_layers
  highest = (layers_lib.PRECISION, layers_lib.PRECISION)
  bad = [e.primitive.name for e in products if e.params["precision"] != highest]
  assert not bad, bad


@pytest.mark.parametrize("taps", [(1, 3, 3, 1), (1, 2, 1), ((0.2, 0.5, 0.1), (0.3, 0.3, 0.9))])
@pytest.mark.parametrize(
  "up,down,padding",
  [
    (1, 1, (1, 1, 1, 1)),
    (2, 1, (2, 1, 2, 1)),
    (1, 2, (1, 1, 1, 1)),
    (2, 2, (1, 2, 0, 3)),
    (1, 1, (-1, 2, 0, -1)),
    (4, 1, (3, 2, 3, 2)),
  ],
)
def test_upfirdn2d_both_paths_equal_float64_reference(taps, up, down, padding):
  """Separable filters take the polyphase path, others the depthwise conv; both equal
  NVIDIA's reference (float64 transcription) to float32 rounding: each output sums
  at most t_h * t_w products of inputs |x| <= 1 and weights of absolute sum
  gain * sum|f|, each operand rounded at most twice (the separable taps too), so the
  error is <= gamma(2 t_h t_w) * gain * sum|f|, gamma(n) = n 2^-24 / (1 - n 2^-24)."""
  if isinstance(taps[0], tuple):  # Not separable: outer product plus a corner.
    f = np.outer(*taps).astype(np.float32)
    f[0, 0] += 0.4
    assert layers_lib.separable_taps(f) is None
  else:
    f = layers_lib.setup_filter(taps)
    assert layers_lib.separable_taps(f) is not None
  x = np.random.default_rng(0).uniform(-1, 1, (2, 7, 6, 3)).astype(np.float32)
  gain = float(up * up)
  out = np.asarray(
    layers_lib.upfirdn2d(jax.numpy.asarray(x), f, up=up, down=down, padding=padding, gain=gain)
  )
  ref = np_upfirdn2d(
    np.transpose(x, (0, 3, 1, 2)).astype(np.float64),
    f.astype(np.float64),
    up=up,
    down=down,
    padding=padding,
    gain=gain,
  )
  ref = np.transpose(ref, (0, 2, 3, 1))
  assert out.shape == ref.shape
  n = 2 * f.size
  bound = n * 2.0**-24 / (1 - n * 2.0**-24) * gain * np.abs(f).sum()
  np.testing.assert_allclose(out, ref, rtol=0, atol=bound)


@pytest.mark.parametrize(
  "up,kernel,padding",
  [
    (2, (4, 4), ((2, 2), (2, 2))),
    (2, (3, 3), ((1, 1), (2, 0))),
    (2, (1, 2), ((0, 3), (1, 1))),
    (3, (4, 3), ((2, 0), (0, 2))),
    (4, (3, 3), ((0, 0), (4, 1))),
  ],
)
def test_upsampling_correlation_equals_the_dilated_convolution(up, kernel, padding):
  """The sub-pixel form against XLA's `lhs_dilation` on float64 inputs: the same
  products summed in another order, so equal to a few float64 ulps."""
  rng = np.random.default_rng(up)
  x = rng.standard_normal((2, 5, 6, 3))
  k = rng.standard_normal(kernel + (3, 4))
  with jax.enable_x64(True):
    ref = jax.lax.conv_general_dilated(
      x, k, (1, 1), padding, lhs_dilation=(up, up), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    got = layers_lib.upsampling_correlation(jax.numpy.asarray(x), jax.numpy.asarray(k), up, padding)
    assert got.dtype == np.float64
  assert got.shape == ref.shape
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=0, atol=1e-12)
