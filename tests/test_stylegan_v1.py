"""StyleGAN v1 (genforce `stylegan` .pth): the official outputs, and a config beyond the fixture.

Tolerance policy (tests/fixtures/README.md): max |ours - reference| <= 1e-4 *
max |reference| per array. Beyond the fixture, the reference is a float64 NumPy
transcription of genforce's `StyleGANGenerator` (NCHW, torch weight layouts)
run on a synthesised 128x128 state dict, where `fused_scale="auto"` fuses the
last up-conv, with other widths, mapping depth and truncation cutoff.
"""

import os

import jax
import numpy as np
import pytest

from _reference import assert_close
from _reference import assert_fixture_outputs
from _reference import np_conv
from _reference import np_fused_upconv
from _reference import np_lrelu
from _reference import np_pixel_norm
from _reference import np_upsample
from converters import genforce
from converters import safe_pickle
from converters.errors import ConversionError
from panda_jax import generators
from panda_jax.generators import stylegan1

FAMILY = "stylegan"  # The conftest fixtures `gen` and `io`.
HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "fixtures", "stylegan")


# --- A float64 NumPy transcription of genforce's StyleGAN (NCHW, torch layouts). ---


def np_mapping(sd, z, lr_mul=0.01):
  x = np_pixel_norm(np.asarray(z, np.float64))
  i = 0
  while f"mapping.dense{i}.weight" in sd:
    w = sd[f"mapping.dense{i}.weight"]
    x = x @ (w * np.sqrt(2.0) / np.sqrt(w.shape[1]) * lr_mul).T
    x = np_lrelu(x + sd[f"mapping.dense{i}.bias"] * lr_mul)
    i += 1
  return x


def np_blur(x, kernel):
  """Depthwise 3x3 conv, padding 1; `kernel [c, 1, 3, 3]` (genforce's buffer)."""
  xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
  h, w = x.shape[2:]
  return sum(
    xp[:, :, a : a + h, b : b + w] * kernel[None, :, 0, a, b, None, None]
    for a in range(3)
    for b in range(3)
  )


def np_synthesis(sd, wp, fused_from=128):
  """genforce `SynthesisModule.forward` at lod 0, const noise: (features, image)."""
  num_layers = wp.shape[1]
  features, x = [], None
  for i in range(num_layers):
    p, res = f"synthesis.layer{i}", 4 << (i // 2)
    if i == 0:
      x = np.repeat(sd[f"{p}.const"], wp.shape[0], axis=0)
    else:
      w = sd[f"{p}.weight"]
      w = w * np.sqrt(2.0) / np.sqrt(w.shape[1] * 9)
      if i % 2 == 0 and res >= fused_from:
        x = np_fused_upconv(x, np.transpose(w, (1, 0, 2, 3)))
      else:
        x = np_conv(np_upsample(x) if i % 2 == 0 else x, w, pad=1)
      if i % 2 == 0:
        x = np_blur(x, sd[f"{p}.blur.kernel"])
    x = x + sd[f"{p}.apply_noise.noise"] * sd[f"{p}.apply_noise.weight"][None, :, None, None]
    x = np_lrelu(x + sd[f"{p}.bias"][None, :, None, None])
    x = x - x.mean(axis=(2, 3), keepdims=True)
    x = x / np.sqrt(np.mean(x**2, axis=(2, 3), keepdims=True) + 1e-8)
    s = sd[f"{p}.style.weight"]
    style = wp[:, i] @ (s / np.sqrt(s.shape[1])).T + sd[f"{p}.style.bias"]
    c = x.shape[1]
    x = x * (style[:, :c, None, None] + 1) + style[:, c:, None, None]
    features.append(x)
  w = sd[f"synthesis.output{num_layers // 2 - 1}.weight"]
  img = np_conv(x, w / np.sqrt(w.shape[1]), pad=0)
  return features, img + sd[f"synthesis.output{num_layers // 2 - 1}.bias"][None, :, None, None]


def synth_stylegan(
  rng, resolution, z_dim, w_dim, mapping_layers, mapping_fmaps, fmaps_base, fmaps_max
):
  """A random genforce StyleGAN state dict (torch layouts, lr_mul 0.01)."""
  f32 = lambda *shape, scale=1.0: (scale * rng.standard_normal(shape)).astype(np.float32)
  nf = lambda res: min(fmaps_base // res, fmaps_max)
  sd, c_in = {}, z_dim
  for i in range(mapping_layers):
    c = w_dim if i == mapping_layers - 1 else mapping_fmaps
    sd[f"mapping.dense{i}.weight"] = f32(c, c_in, scale=100.0)  # randn / lr_mul
    sd[f"mapping.dense{i}.bias"] = f32(c, scale=10.0)
    c_in = c
  sd["truncation.w_avg"] = f32(w_dim)
  sd["synthesis.lod"] = np.zeros((), np.float32)
  blur = np.outer([1, 2, 1], [1, 2, 1]).astype(np.float32) / 16
  c_in = nf(4)
  for i in range(2 * (resolution.bit_length() - 2)):
    p, res = f"synthesis.layer{i}", 4 << (i // 2)
    c = nf(res)
    if i == 0:
      sd[f"{p}.const"] = 1.0 + f32(1, c, 4, 4, scale=0.5)
    else:
      sd[f"{p}.weight"] = f32(c, c_in, 3, 3)
    if i % 2 == 0 and i > 0:
      sd[f"{p}.blur.kernel"] = np.tile(blur[None, None], (c, 1, 1, 1))
    sd[f"{p}.bias"] = f32(c, scale=0.2)
    sd[f"{p}.apply_noise.weight"] = f32(c, scale=0.3)
    sd[f"{p}.apply_noise.noise"] = f32(1, 1, res, res)
    sd[f"{p}.style.weight"] = f32(2 * c, w_dim)
    sd[f"{p}.style.bias"] = f32(2 * c, scale=0.2)
    if i % 2:
      sd[f"synthesis.output{i // 2}.weight"] = f32(3, c, 1, 1)
      sd[f"synthesis.output{i // 2}.bias"] = f32(3, scale=0.2)
    c_in = c
  return sd


# --- The official outputs. ---


@pytest.fixture(scope="module")
def wp(gen, io):
  return gen.latents(
    io["z"], truncation_psi=float(io["trunc_psi"]), truncation_cutoff=int(io["trunc_layers"])
  )


def test_fixture_mapping_and_truncation(gen, io, wp):
  assert gen.arch == "stylegan" and gen.num_layers == 8 and gen.z_dim == 64
  w = gen.latents(io["z"])
  assert w.shape == (4, 8, 64)
  for layer in range(8):
    assert_close(w[:, layer], io["w"])
  assert_close(wp, io["wp"])


def test_fixture_features_image_and_edit(gen, io, wp):
  assert_fixture_outputs(gen, io, wp)


def test_resume_of_split_is_generate_with_random_noise(gen, wp):
  """With a noise key (the constant-noise case: `test_generators_base.py`)."""
  noise_key = jax.random.key(7)
  img = np.asarray(gen.generate(wp, noise_key))
  for layer in (1, 4, 7):
    resumed = gen.resume(*gen.split(wp, layer, noise_key), wp, layer, noise_key)
    np.testing.assert_allclose(resumed, img, rtol=0, atol=1e-5 * np.abs(img).max())


def test_random_noise_differs_from_const_and_is_reproducible(gen, wp):
  const = np.asarray(gen.generate(wp))
  a = np.asarray(gen.generate(wp, jax.random.key(1)))
  b = np.asarray(gen.generate(wp, jax.random.key(1)))
  c = np.asarray(gen.generate(wp, jax.random.key(2)))
  np.testing.assert_array_equal(a, b)
  assert np.abs(a - const).max() > 1e-2 and np.abs(a - c).max() > 1e-2


def test_bad_inputs_raise(gen, io, wp):
  with pytest.raises(ValueError, match=r"latents must be W\+ codes \[n, 8, 64\]"):
    gen.split(wp[:, :4], 2)
  with pytest.raises(ValueError, match=r"layer must be in \[1, 8\]"):
    gen.resume(wp, None, wp, 0)
  with pytest.raises(ValueError, match="truncation_cutoff"):
    gen.latents(io["z"], truncation_psi=0.5, truncation_cutoff=-1)


# --- The Flax module: the converted layout; bad configs and params name the key. ---


def test_module_params_are_the_converted_layout(gen):
  shapes = stylegan1.param_shapes(gen.cfg)
  assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(np.shape, gen.params)
  assert gen.cfg.channels == (64,) * 6 + (32,) * 2  # Read from the biases.
  assert gen.cfg.mapping_channels == (512, 64)


@pytest.mark.parametrize(
  "edit, message",
  [
    (
      lambda c, p: c.pop("w_dim"),
      r"^StyleGAN config: missing keys \['w_dim'\], unknown keys \[\]$",
    ),
    (
      lambda c, p: c.update(fused_scale="yes"),
      r"fused_scale must be true, false or 'auto', got 'yes'$",
    ),
    (lambda c, p: c.update(resolution=4), r"resolution must be one of .*, got 4$"),
    (lambda c, p: p.pop("mapping"), r"^parameter /mapping/dense0 is missing"),
    (
      lambda c, p: p["mapping"]["dense1"].update(bias=np.zeros(32)),
      r"mapping's last layer must have w_dim = 64 outputs, got mapping_channels \(512, 32\)$",
    ),
    (
      lambda c, p: p["mapping"].update(dense3=p["mapping"]["dense1"]),
      r"^parameters under /mapping: missing \[\], extra \['dense3'\]$",
    ),
    (lambda c, p: p.pop("w_avg"), r"^parameters under /: missing \['w_avg'\], extra \[\]$"),
    (
      lambda c, p: p["layer0"].update(weight=np.zeros((3, 3, 64, 64))),
      r"^parameters under /layer0: missing \[\], extra \['weight'\]$",
    ),
    (
      lambda c, p: p["layer3"].update(noise=np.zeros((1, 4, 4, 1))),
      r"^parameter /layer3/noise has shape \(1, 4, 4, 1\), expected \(1, 8, 8, 1\)$",
    ),
    (
      lambda c, p: p["layer6"]["style"].update(weight=np.zeros((64, 128))),
      r"^parameter /layer6/style/weight has shape \(64, 128\), expected \(64, 64\)$",
    ),
  ],
)
def test_bad_config_or_params_name_the_key(gen, edit, message):
  config, params = dict(gen.config), jax.tree.map(np.asarray, gen.params)
  edit(config, params)
  with pytest.raises(ValueError, match=message):
    stylegan1.StyleGAN(config, params)


# --- Beyond the fixture: 128x128 (a fused up-conv), other widths and cutoff. ---


def test_synthesised_config_matches_numpy_reference():
  rng = np.random.default_rng(5)
  sd = synth_stylegan(
    rng,
    resolution=128,
    z_dim=8,
    w_dim=8,
    mapping_layers=3,
    mapping_fmaps=16,
    fmaps_base=256,
    fmaps_max=8,
  )
  arch, config, params = genforce.convert_state_dict(sd)
  assert arch == "stylegan"
  assert config == {
    "resolution": 128,
    "z_dim": 8,
    "w_dim": 8,
    "image_channels": 3,
    "fused_scale": "auto",
    "final_tanh": False,
  }
  gen = generators.base.registered()[arch].from_converted(config, params)
  assert gen.num_layers == 12
  z = rng.standard_normal((2, 8)).astype(np.float32)
  sd64 = {k: v.astype(np.float64) for k, v in sd.items()}
  w = np_mapping(sd64, z)
  psi, cutoff = 0.5, 5
  wp_ref = np.repeat(w[:, None], 12, axis=1)
  avg = sd64["truncation.w_avg"]
  wp_ref[:, :cutoff] = avg + psi * (wp_ref[:, :cutoff] - avg)
  wp = gen.latents(z, truncation_psi=psi, truncation_cutoff=cutoff)
  assert_close(wp, wp_ref)
  features, img = np_synthesis(sd64, wp_ref)
  for layer in gen.layers:
    assert_close(gen.split(wp, layer)[0], features[layer - 1])
  assert_close(gen.generate(wp), img)
  # The unfused reading of the same weights is a different network.
  _, unfused_img = np_synthesis(sd64, wp_ref, fused_from=256)
  assert np.abs(unfused_img - img).max() > 1e-2 * np.abs(img).max()


# --- Conversion: generator_smooth, strictness. ---


def test_generator_smooth_is_preferred():
  ckpt = safe_pickle.load(os.path.join(FIXTURE, "stylegan.pth"))
  assert genforce.state_dict(ckpt) is ckpt["generator_smooth"]


@pytest.mark.parametrize(
  "edit, message",
  [
    (lambda sd: sd.update({"synthesis.lod": np.full((), 2.0, np.float32)}), "level of detail"),
    (lambda sd: sd.update({"mapping.label_weight": np.ones((10, 64), np.float32)}), "conditional"),
    (
      lambda sd: sd.update({"synthesis.layer2.blur.kernel": np.ones((64, 1, 3, 3), np.float32)}),
      r"\[1, 2, 1\] blur",
    ),
    (lambda sd: sd.update({"truncation.w_avg": np.ones(512, np.float32)}), "repeat_w"),
    (
      lambda sd: sd.pop("synthesis.layer5.apply_noise.noise"),
      "missing tensor synthesis.layer5.apply_noise.noise",
    ),
  ],
)
def test_conversion_is_strict(edit, message):
  sd = dict(genforce.state_dict(safe_pickle.load(os.path.join(FIXTURE, "stylegan.pth"))))
  edit(sd)
  with pytest.raises(ConversionError, match=message):
    genforce.convert_state_dict(sd)
