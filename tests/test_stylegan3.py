"""StyleGAN3 (T and R) against NVIDIA's official code (`tests/fixtures/stylegan3`).

Config T: the fixture pickle, converted with `python -m converters`, must give
the official `ws`, every `features_l`, `image` and `edit_image` within
1e-4 x max_abs (fixture README), and `resume(split(l)) == generate` for every l.
Config R (1x1 convs, radial jinc down filters) has no official fixture: the
fixture's network records are rewritten into R's shapes (NVIDIA's filter
design and padding formulas), written as an NVIDIA pickle without torch
(`conftest.torch_files`), converted by the same command, and checked against a
float64 NumPy transcription of NVIDIA's reference ops, itself first checked
against the T fixture.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.signal
import scipy.special

from _reference import np_upfirdn2d
from converters import Source
from converters import __main__ as cli
from converters import nvidia, safe_pickle
from converters import stylegan2 as convert_sg2
from converters import stylegan3 as convert_sg3
from panda_jax import generators
from panda_jax.generators import stylegan3

FAMILY = "stylegan3"  # The conftest fixtures `gen` and `io`.
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
PICKLE = os.path.join(FIXTURES, "stylegan3", "network-snapshot.pkl")
TOL = 1e-4  # x max_abs of each array (fixture README).


@pytest.fixture(scope="module")
def meta():
  with open(os.path.join(FIXTURES, "stylegan3", "meta.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def g_ema():
  return safe_pickle.load(PICKLE)["G_ema"]


def nhwc(a):
  return np.transpose(a, (0, 2, 3, 1))


def assert_close(actual, expected, max_abs, tol=TOL, what=""):
  err = float(np.max(np.abs(np.asarray(actual, np.float64) - expected)))
  assert err <= tol * max_abs, f"{what}: max abs error {err:.3g} > {tol} x {max_abs:.3g}"


def test_sniff_claims_only_stylegan3_pickles():
  assert convert_sg3.sniff(Source(PICKLE))
  sg2 = Source(os.path.join(FIXTURES, "stylegan2", "network-snapshot.pkl"))
  assert not convert_sg3.sniff(sg2) and convert_sg2.sniff(sg2)
  assert not convert_sg3.sniff(Source(os.path.join(FIXTURES, "biggan")))


def test_latents_match_official_mapping(gen, io, meta):
  ws = gen.latents(io["z"], truncation_psi=float(io["truncation_psi"]))
  assert ws.shape == (4, meta["num_ws"], 64)
  assert_close(ws, io["ws"], meta["max_abs"]["ws"], what="ws")
  # Truncation on the first 3 codes only; the others are the untruncated w.
  cut = gen.latents(io["z"], truncation_psi=float(io["truncation_psi"]), truncation_cutoff=3)
  full = gen.latents(io["z"])
  np.testing.assert_allclose(cut[:, :3], ws[:, :3], rtol=0, atol=1e-6)
  np.testing.assert_allclose(cut[:, 3:], full[:, 3:], rtol=0, atol=1e-6)
  assert float(jnp.abs(full - ws).max()) > 0.1


def test_fixture_features_images_and_split_resume(gen, io, meta):
  """Every features_l, the image, the edit, and resume(split(l)) == generate."""
  ws = jnp.asarray(io["ws"])
  names = meta["layer_names"]
  assert list(gen.layers) == list(range(len(names)))  # Layer 0 .. before ToRGB.
  image = np.asarray(gen.generate(ws))
  assert_close(image, nhwc(io["image"]), meta["max_abs"]["image"], what="image")
  edit_layer = int(io["edit_layer"])
  for layer in gen.layers:
    x, carry = gen.split(ws, layer)
    expected = nhwc(io[f"features_{layer}"])
    assert x.shape == expected.shape
    assert x.shape[1:] == gen.feature_shape(layer)
    assert_close(x, expected, meta["max_abs"][f"features_{layer}"], what=f"features_{layer}")
    resumed = gen.resume(x, carry, ws, layer)
    assert_close(resumed, image, meta["max_abs"]["image"], tol=1e-6, what=f"resume {layer}")
    if layer == edit_layer:
      edited = gen.resume(x + nhwc(io["edit_delta"]), carry, ws, layer)
      assert_close(edited, nhwc(io["edit_image"]), meta["max_abs"]["edit_image"], what="edit_image")


def test_bad_inputs_raise(gen, io):
  ws = jnp.asarray(io["ws"])
  with pytest.raises(ValueError, match="layer must be in"):
    gen.split(ws, gen.num_layers + 1)
  with pytest.raises(ValueError, match="latents must be"):
    gen.split(ws[:, 1:], 2)
  x, carry = gen.split(ws, 0)
  with pytest.raises(ValueError, match="x must be"):
    gen.resume(x, carry, ws, 3)  # 52x52 expected, 36x36 given.
  config = json.loads(json.dumps(gen.config))
  config["layers"][2]["padding"][0] += 2
  with pytest.raises(ValueError, match="padding"):
    stylegan3.StyleGAN3(config, gen.params)


def test_params_are_checked_against_the_module_tree(gen):
  """The Flax module's parameter tree (`param_shapes`) is the converted layout, the
  filters' shapes taken from the parameters; a bad parameter is one `ValueError`
  naming it."""
  name = gen.cfg.layers[2].name
  assert gen.cfg.layers[2].up_filter == gen.params["layers"][name]["up_filter"].shape
  assert gen.cfg.layers[-1].up_filter is None  # ToRGB has no filters.
  shapes = jax.tree.map(lambda s: s.shape, stylegan3.param_shapes(gen.cfg))
  assert shapes == jax.tree.map(np.shape, gen.params)
  params = jax.tree.map(np.asarray, gen.params)
  del params["layers"][name]["magnitude_ema"]
  with pytest.raises(
    ValueError,
    match=rf"parameters under /layers/{name}: missing "
    r"\['magnitude_ema'\]",
  ):
    stylegan3.StyleGAN3(gen.config, params)
  params = jax.tree.map(np.asarray, gen.params)
  params["layers"][name]["down_filter"] = np.ones((2, 3, 4), np.float32)
  with pytest.raises(ValueError, match=rf"layers/{name}/down_filter must be \[t\]"):
    stylegan3.StyleGAN3(gen.config, params)
  with pytest.raises(ValueError, match=r"unknown keys \['extra'\]"):
    stylegan3.StyleGAN3({**gen.config, "extra": 1}, gen.params)


# --- A float64 NumPy transcription of NVIDIA's reference ops (NCHW). ---


def np_synthesis_layer(rec, x, w):
  """One `SynthesisLayer.forward` (NCHW, float64), batch-wide style normalisation."""
  s = rec.state
  affine = nvidia.child(rec, "affine")
  styles = (
    w @ (nvidia.tensor(affine, "weight").astype(np.float64) * affine.state["weight_gain"]).T
    + nvidia.tensor(affine, "bias") * affine.state["bias_gain"]
  )
  weight = nvidia.tensor(rec, "weight").astype(np.float64)  # [o, i, k, k]
  k = weight.shape[-1]
  if s["is_torgb"]:
    styles = styles / np.sqrt(s["in_channels"] * k * k)
  else:
    weight = weight / np.sqrt(np.mean(weight**2, axis=(1, 2, 3), keepdims=True))
    styles = styles / np.sqrt(np.mean(styles**2))
  wm = weight[None] * styles[:, None, :, None, None]  # [n, o, i, k, k]
  if not s["is_torgb"]:
    wm = wm / np.sqrt(np.sum(wm**2, axis=(2, 3, 4), keepdims=True) + 1e-8)
  wm = wm / np.sqrt(float(nvidia.tensor(rec, "magnitude_ema").reshape(())))
  xp = np.pad(x, ((0, 0), (0, 0), (k - 1, k - 1), (k - 1, k - 1)))
  h, wd = x.shape[2] + k - 1, x.shape[3] + k - 1
  y = sum(
    np.einsum("nihw,noi->nohw", xp[:, :, a : a + h, b : b + wd], wm[:, :, :, a, b])
    for a in range(k)
    for b in range(k)
  )
  bufs = s["_buffers"]
  y = y + nvidia.tensor(rec, "bias")[None, :, None, None]
  up, down = s["up_factor"], s["down_factor"]
  y = np_upfirdn2d(y, bufs["up_filter"], up=up, padding=s["padding"], gain=up**2)
  if not s["is_torgb"]:
    y = np.where(y >= 0, y, 0.2 * y) * np.sqrt(2)
  y = np.clip(y, -s["conv_clamp"], s["conv_clamp"])
  return np_upfirdn2d(y, bufs["down_filter"], down=down)


def test_numpy_reference_matches_fixture(g_ema, io, meta):
  """The NumPy transcription itself reproduces the official layer L2 (up 4) and ToRGB."""
  syn = nvidia.child(g_ema, "synthesis")
  names = meta["layer_names"]
  ws = io["ws"][:2].astype(np.float64)
  y = np_synthesis_layer(nvidia.child(syn, names[2]), io["features_2"][:2], ws[:, 3])
  assert_close(y, io["features_3"][:2], meta["max_abs"]["features_3"], what="L2")
  y = np_synthesis_layer(nvidia.child(syn, names[-1]), io["features_6"][:2], ws[:, -1])
  assert_close(
    y * syn.state["output_scale"], io["image"][:2], meta["max_abs"]["image"], what="ToRGB"
  )


def radial_lowpass(numtaps, cutoff, width, fs):
  """NVIDIA's `design_lowpass_filter(radial=True)`: jinc times a Kaiser window."""
  x = (np.arange(numtaps) - (numtaps - 1) / 2) / fs
  r = np.hypot(*np.meshgrid(x, x))
  f = scipy.special.j1(2 * cutoff * (np.pi * r)) / (np.pi * r)
  beta = scipy.signal.kaiser_beta(scipy.signal.kaiser_atten(numtaps, width / (fs / 2)))
  window = np.kaiser(numtaps, beta)
  f *= np.outer(window, window)
  return (f / np.sum(f)).astype(np.float32)


def to_config_r(g, seed=0):
  """The fixture generator with StyleGAN3-R's layers: 1x1 conv weights (random),
  radial down filters in the non-critically-sampled layers, padding recomputed."""
  rng = np.random.default_rng(seed)
  syn = nvidia.child(g, "synthesis")
  modules = dict(syn.state["_modules"])
  for name in syn.state["layer_names"]:
    s = dict(modules[name].state)
    if not s["is_torgb"]:
      o, i = s["out_channels"], s["in_channels"]
      s["_parameters"] = {
        **s["_parameters"],
        "weight": rng.standard_normal((o, i, 1, 1)).astype(np.float32),
      }
      s["conv_kernel"] = 1
      if not s["is_critically_sampled"]:
        s["down_radial"] = True
        s["_buffers"] = {
          **s["_buffers"],
          "down_filter": radial_lowpass(
            s["down_taps"], s["out_cutoff"], s["out_half_width"] * 2, s["tmp_sampling_rate"]
          ),
        }
      total = (
        (s["out_size"] - 1) * s["down_factor"]
        + 1
        - (s["in_size"] + s["conv_kernel"] - 1) * s["up_factor"]
        + s["up_taps"]
        + s["down_taps"]
        - 2
      )
      lo = (total + s["up_factor"]) // 2
      s["padding"] = [int(lo[0]), int((total - lo)[0]), int(lo[1]), int((total - lo)[1])]
    modules[name] = dataclasses.replace(modules[name], state=s)
  syn = dataclasses.replace(syn, state={**syn.state, "_modules": modules})
  return dataclasses.replace(
    g, state={**g.state, "_modules": {**g.state["_modules"], "synthesis": syn}}
  )


def test_config_r_matches_numpy_reference(g_ema, io, meta, torch_files, tmp_path):
  g = to_config_r(g_ema)
  torch_files.network_pickle({"G": g_ema, "G_ema": g, "D": None}, tmp_path / "r.pkl")
  assert cli.main([f"--src={tmp_path / 'r.pkl'}", f"--dst={tmp_path / 'r'}"]) == 0
  gen = generators.load(tmp_path / "r")
  syn = nvidia.child(g, "synthesis")
  names = syn.state["layer_names"]
  radial = [n for n in names if np.ndim(gen.params["layers"][n].get("down_filter")) == 2]
  assert radial == names[:4]  # The non-critically-sampled layers.
  assert [c["conv_kernel"] for c in gen.config["layers"]] == [1] * len(names)
  ws = jnp.asarray(io["ws"][:2])
  x, _ = gen.split(ws, 0)  # The input layer is the fixture's.
  assert_close(x, nhwc(io["features_0"][:2]), meta["max_abs"]["features_0"], what="R input")
  y = np.asarray(x, np.float64).transpose(0, 3, 1, 2)
  for layer, name in enumerate(names[:-1], start=1):
    y = np_synthesis_layer(nvidia.child(syn, name), y, io["ws"][:2, layer].astype(np.float64))
    if layer in (2, 5):
      x, carry = gen.split(ws, layer)
      assert_close(x, nhwc(y), np.abs(y).max(), what=f"R features_{layer}")
  image = np_synthesis_layer(nvidia.child(syn, names[-1]), y, io["ws"][:2, -1])
  image = nhwc(image) * syn.state["output_scale"]
  generated = gen.generate(ws)
  assert_close(generated, image, np.abs(image).max(), what="R image")
  assert_close(
    gen.resume(x, carry, ws, 5), generated, np.abs(image).max(), tol=1e-6, what="R resume"
  )
