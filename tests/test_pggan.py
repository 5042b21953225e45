"""ProGAN (genforce `pggan` .pth): the official outputs, and a config beyond the fixture.

Tolerance policy (`_reference.assert_close`): max |ours - reference| <= 1e-4 *
max |reference| per array. Beyond the fixture, the reference is a float64 NumPy
transcription of genforce's `PGGANGenerator` (NCHW, torch weight layouts,
transposed convs by scattering; ops in `_reference`) run on a synthesised state
dict. `resume(split(l)) == generate`: `test_generators_base.py`.
"""

import os
import shutil
import subprocess
import sys

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
from panda_jax.generators import progan

FAMILY = "pggan"  # The conftest fixtures `gen` and `io`.
HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "fixtures", "pggan")


def np_pggan(sd, z, fused_scale):
  """genforce `PGGANGenerator.forward` at lod 0: (features per layer, image)."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  num_layers = len([k for k in sd if k.startswith("layer") and k.endswith(".weight")])
  x = np_pixel_norm(np.asarray(z, np.float64))[:, :, None, None]
  features = []
  for i in range(num_layers):
    w, b = sd[f"layer{i}.weight"], sd[f"layer{i}.bias"]
    x = np_pixel_norm(x)
    if i % 2 == 0 and i > 0 and fused_scale:  # w: [in, out, 3, 3]
      x = np_fused_upconv(x, w * np.sqrt(2.0) / np.sqrt(w.shape[0] * 9))
    else:
      fan_in = w.shape[1] * w.shape[2] * w.shape[3]
      if i % 2 == 0 and i > 0:
        x = np_upsample(x)
      x = np_conv(x, w * np.sqrt(2.0) / np.sqrt(fan_in), pad=3 if i == 0 else 1)
    x = np_lrelu(x + b[None, :, None, None])
    features.append(x)
  w = sd[f"output{num_layers // 2 - 1}.weight"]
  img = np_conv(np_pixel_norm(x), w / np.sqrt(w.shape[1]), pad=0)
  return features, img + sd[f"output{num_layers // 2 - 1}.bias"][None, :, None, None]


def synth_pggan(rng, resolution, z_dim, fmaps_base, fmaps_max, fused_scale):
  """A random genforce ProGAN state dict (torch layouts)."""
  nf = lambda res: min(fmaps_base // res, fmaps_max)
  sd = {"lod": np.zeros((), np.float32)}
  c_in = z_dim
  for i in range(2 * (resolution.bit_length() - 2)):
    res = 4 << (i // 2)
    c = nf(res)
    if i == 0:
      shape = (c, c_in, 4, 4)
    elif i % 2 == 0 and fused_scale:
      shape = (c_in, c, 3, 3)
    else:
      shape = (c, c_in, 3, 3)
    sd[f"layer{i}.weight"] = rng.standard_normal(shape).astype(np.float32)
    sd[f"layer{i}.bias"] = (0.2 * rng.standard_normal(c)).astype(np.float32)
    if i % 2:
      sd[f"output{i // 2}.weight"] = rng.standard_normal((3, c, 1, 1)).astype(np.float32)
      sd[f"output{i // 2}.bias"] = (0.2 * rng.standard_normal(3)).astype(np.float32)
    c_in = c
  return sd


# --- The official outputs. ---


def test_fixture_features_image_and_edit(gen, io):
  assert gen.arch == "pggan" and gen.num_layers == 8 and gen.z_dim == 64
  assert_fixture_outputs(gen, io, gen.latents(io["z"]))


def test_latents_are_pixel_normalised_z_and_reject_truncation(gen, io):
  lat = np.asarray(gen.latents(io["z"]))
  np.testing.assert_allclose(np.mean(lat**2, axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(
    lat * np.linalg.norm(io["z"], axis=1, keepdims=True), io["z"] * np.sqrt(64), rtol=1e-5
  )
  with pytest.raises(ValueError, match="truncation"):
    gen.latents(io["z"], truncation_psi=0.7)
  with pytest.raises(ValueError, match=r"z must be \[n, 64\]"):
    gen.latents(io["z"][:, :10])
  with pytest.raises(ValueError, match=r"layer must be in \[1, 8\]"):
    gen.split(lat, 9)


# --- The Flax module: the converted layout; bad configs and params name the key. ---


def test_module_params_are_the_converted_layout(gen):
  shapes = progan.param_shapes(gen.cfg)
  assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(np.shape, gen.params)
  assert gen.cfg.channels == (64,) * 6 + (32,) * 2  # Read from the biases.


@pytest.mark.parametrize(
  "edit, message",
  [
    (
      lambda c, p: c.pop("final_tanh"),
      r"^ProGAN config: missing keys \['final_tanh'\], unknown keys \[\]$",
    ),
    (lambda c, p: c.update(channels=[64] * 8), r"unknown keys \['channels'\]"),
    (lambda c, p: c.update(resolution=48), r"resolution must be one of .*, got 48$"),
    (lambda c, p: c.update(fused_scale=1), r"fused_scale must be true or false, got 1$"),
    (lambda c, p: c.update(z_dim=0), r"z_dim must be a positive int, got 0$"),
    (lambda c, p: p.pop("torgb"), r"^parameters under /: missing \['torgb'\], extra \[\]$"),
    (lambda c, p: p["layer5"].pop("bias"), r"^parameter /layer5/bias is missing$"),
    (
      lambda c, p: p["layer5"].update(bias=np.zeros((1, 64))),
      r"^parameter /layer5/bias must be a vector \[c\], got shape \(1, 64\)$",
    ),
    (
      lambda c, p: p["layer3"].update(weight=np.zeros((3, 3, 64, 32))),
      r"^parameter /layer3/weight has shape \(3, 3, 64, 32\), expected \(3, 3, 64, 64\)$",
    ),
    (
      lambda c, p: p["torgb"].update(weight=np.zeros((64, 3))),
      r"^parameter /torgb/weight has shape \(64, 3\), expected \(32, 3\)$",
    ),
    (
      lambda c, p: p["layer2"].update(scale=np.ones(3)),
      r"^parameters under /layer2: missing \[\], extra \['scale'\]$",
    ),
  ],
)
def test_bad_config_or_params_name_the_key(gen, edit, message):
  config, params = dict(gen.config), jax.tree.map(np.asarray, gen.params)
  edit(config, params)
  with pytest.raises(ValueError, match=message):
    progan.ProGAN(config, params)


# --- Beyond the fixture: fused up-convs, other widths, against NumPy. ---


@pytest.mark.parametrize("fused_scale", [False, True])
def test_synthesised_config_matches_numpy_reference(fused_scale):
  rng = np.random.default_rng(3)
  sd = synth_pggan(
    rng, resolution=16, z_dim=8, fmaps_base=64, fmaps_max=16, fused_scale=fused_scale
  )
  arch, config, params = genforce.convert_state_dict(sd)
  assert arch == "pggan"
  assert config == {
    "resolution": 16,
    "z_dim": 8,
    "image_channels": 3,
    "fused_scale": fused_scale,
    "final_tanh": False,
  }
  gen = generators.base.registered()[arch].from_converted(config, params)
  z = rng.standard_normal((3, 8)).astype(np.float32)
  features, img = np_pggan(sd, z, fused_scale)
  lat = gen.latents(z)
  for layer in gen.layers:
    assert_close(gen.split(lat, layer)[0], features[layer - 1])
  assert_close(gen.generate(lat), img)


def test_fused_layout_detection_and_reference_disagree_when_wrong():
  """The fused and unfused readings of one state dict give different images:
  the synthesised test above can tell them apart."""
  rng = np.random.default_rng(4)
  sd = synth_pggan(
    rng, resolution=8, z_dim=8, fmaps_base=64, fmaps_max=8, fused_scale=False
  )  # 8 channels throughout: layout ambiguous.
  z = rng.standard_normal((2, 8)).astype(np.float32)
  images = []
  for fused in (False, True):
    arch, config, params = genforce.convert_state_dict(sd, fused_scale=fused)
    gen = generators.base.registered()[arch].from_converted(config, params)
    images.append(np.asarray(gen.generate(gen.latents(z))))
    assert_close(images[-1], np_pggan(sd, z, fused)[1])
  assert np.abs(images[0] - images[1]).max() > 1e-2 * np.abs(images[0]).max()
  assert genforce.convert_state_dict(sd)[1]["fused_scale"] is False


# --- Conversion: generator_smooth, strictness, the command line. ---


def test_generator_smooth_is_preferred():
  ckpt = safe_pickle.load(os.path.join(FIXTURE, "pggan.pth"))
  assert genforce.state_dict(ckpt) is ckpt["generator_smooth"]
  assert genforce.state_dict({"generator": ckpt["generator"]}) is ckpt["generator"]
  smooth = genforce.convert_state_dict(ckpt["generator_smooth"])[2]
  plain = genforce.convert_state_dict(ckpt["generator"])[2]
  assert np.abs(smooth["layer3"]["bias"] - plain["layer3"]["bias"]).max() > 1e-3


@pytest.mark.parametrize(
  "edit, message",
  [
    (lambda sd: sd.update(lod=np.ones((), np.float32)), "level of detail"),
    (lambda sd: sd.pop("layer3.bias"), "missing tensor layer3.bias"),
    (lambda sd: sd.update({"layer9.scale": np.ones(3, np.float32)}), "unexpected"),
    (
      lambda sd: sd.update({"layer5.weight": np.ones((64, 64, 1, 1), np.float32)}),
      r"layer5.weight has shape \[64, 64, 1, 1\], expected \[64, 64, 3, 3\]",
    ),
  ],
)
def test_conversion_is_strict(edit, message):
  sd = dict(genforce.state_dict(safe_pickle.load(os.path.join(FIXTURE, "pggan.pth"))))
  edit(sd)
  with pytest.raises(ConversionError, match=message):
    genforce.convert_state_dict(sd)


def test_command_line_rejects_a_wrong_kind_of_pth(tmp_path):
  """A BigGAN state dict saved as .pth (no config.json beside it): exit 2, one line."""
  src = tmp_path / "model.pth"
  shutil.copy(os.path.join(HERE, "fixtures", "biggan", "pytorch_model.bin"), src)
  dst = tmp_path / "out"
  proc = subprocess.run(
    [sys.executable, "-m", "converters", f"--src={src}", f"--dst={dst}"],
    cwd=os.path.dirname(HERE),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error:")
  assert str(src) in lines[0]  # e.g. "... is not a checkpoint of a supported kind".
  assert not dst.exists()
