"""StyleGAN2 in Flax against NVIDIA's outputs (tests/fixtures/stylegan2), and its invariants.

Tolerance policy (fixtures README): max |ours - official| <= 1e-4 * max_abs of the array.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import converters
from converters import genforce
from converters import nvidia
from converters import safe_pickle
from converters.errors import ConversionError
from panda_jax import generators
from panda_jax.generators import layers
from panda_jax.generators import stylegan2

FAMILY = "stylegan2"  # The conftest fixture `gen`: converted by `python -m converters`.
FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "stylegan2")
PKL = os.path.join(FIXTURE, "network-snapshot.pkl")
IO = dict(np.load(os.path.join(FIXTURE, "io.npz")))
META = json.load(open(os.path.join(FIXTURE, "meta.json")))


def _nhwc(a):
  return a.transpose(0, 2, 3, 1) if a.ndim == 4 else a


def assert_close(actual, name, expected=None):
  expected = _nhwc(IO[name]) if expected is None else expected
  tol = 1e-4 * META["max_abs"][name]
  actual = np.asarray(actual)
  assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
  err = np.abs(actual - expected).max()
  assert err <= tol, f"{name}: max abs error {err:.3g} > {tol:.3g}"


@pytest.fixture(scope="module")
def ws():
  return jnp.asarray(IO["ws"])


def test_properties(gen):
  assert (gen.arch, gen.z_dim, gen.c_dim, gen.num_layers) == ("stylegan2", 64, 0, 7)
  assert list(gen.layers) == list(range(1, META["num_conv_layers"] + 1))


def test_mapping_with_and_without_truncation(gen):
  assert_close(gen.latents(IO["z"]), "ws_psi1")
  assert_close(gen.latents(IO["z"], truncation_psi=float(IO["truncation_psi"])), "ws")


def test_truncation_cutoff_truncates_the_first_codes_only(gen):
  ws = gen.latents(IO["z"], truncation_psi=float(IO["truncation_psi"]), truncation_cutoff=3)
  assert_close(ws[:, :3], "ws", IO["ws"][:, :3])
  assert_close(ws[:, 3:], "ws_psi1", IO["ws_psi1"][:, 3:])


def test_image(gen, ws):
  assert_close(gen.generate(ws), "image")


@pytest.mark.parametrize("layer", range(1, 8))
def test_features_carry_and_resume(gen, ws, layer):
  x, carry = gen.split(ws, layer)
  assert_close(x, f"features_{layer}")
  if layer == 1:
    assert carry is None
  else:
    assert_close(carry, f"carry_{layer}")
  img = gen.resume(x, carry, ws, layer)
  assert_close(img, "image")
  np.testing.assert_allclose(img, gen.generate(ws), atol=1e-5 * META["max_abs"]["image"])


def test_edit(gen, ws):
  layer = int(IO["edit_layer"])
  x, carry = gen.split(ws, layer)
  assert_close(gen.resume(x + _nhwc(IO["edit_delta"]), carry, ws, layer), "edit_image")


def test_random_noise_is_keyed_and_consistent_across_split(gen, ws):
  key = jax.random.key(3)
  img = np.asarray(gen.generate(ws, noise_key=key))
  np.testing.assert_array_equal(img, gen.generate(ws, noise_key=key))
  assert np.abs(img - _nhwc(IO["image"])).max() > 1e-2  # Not the constant noise.
  assert np.abs(img - gen.generate(ws, noise_key=jax.random.key(4))).max() > 1e-2
  x, carry = gen.split(ws, 4, noise_key=key)
  np.testing.assert_allclose(
    gen.resume(x, carry, ws, 4, noise_key=key), img, atol=1e-5 * np.abs(img).max()
  )


def test_split_and_resume_compile_once_per_layer(gen, ws):
  gen.split(ws, 6)
  gen.resume(*gen.split(ws, 6), ws, 6)
  sizes = stylegan2._split._cache_size(), stylegan2._resume._cache_size()
  for scale in (0.5, 2.0):
    x, carry = gen.split(ws * scale, 6)
    gen.resume(x + scale, carry, ws * scale, 6)
  assert (stylegan2._split._cache_size(), stylegan2._resume._cache_size()) == sizes


def test_jit_and_vmap_of_the_methods(gen, ws):
  f = jax.jit(lambda w: gen.resume(*gen.split(w, 3), w, 3))
  np.testing.assert_allclose(f(ws), gen.generate(ws), atol=1e-5 * META["max_abs"]["image"])


@pytest.mark.parametrize(
  "call, match",
  [
    (lambda g, w: g.split(w, 0), r"layer must be in \[1, 7\]"),
    (lambda g, w: g.split(w, 8), r"layer must be in \[1, 7\]"),
    (lambda g, w: g.resume(w, None, w, 2.0), "layer must be a Python int"),
    (lambda g, w: g.generate(w[:, :3]), r"latents must be W\+ codes \[n, 8, 64\]"),
    (lambda g, w: g.latents(np.zeros((2, 3))), r"z must be \[n, z_dim=64\]"),
    (lambda g, w: g.latents(np.zeros((2, 64)), c=np.ones((2, 5))), "c must be"),
    (lambda g, w: g.latents(np.zeros((2, 64)), truncation_cutoff=9), "truncation_cutoff"),
  ],
)
def test_bad_inputs(gen, ws, call, match):
  with pytest.raises(ValueError, match=match):
    call(gen, ws)


# --- Pickles rewritten from the fixture: the options the official code allows. ---


def _rewrite(obj, fn):
  """Applies `fn(class_name, state) -> state` to every Record of a snapshot."""
  if isinstance(obj, safe_pickle.Record):
    state = {k: _rewrite(v, fn) for k, v in obj.state.items()}
    return safe_pickle.Record(obj.module, obj.class_name, fn(obj.class_name, state))
  if isinstance(obj, dict):
    return {k: _rewrite(v, fn) for k, v in obj.items()}
  return obj


def _convert(snap, tmp_path, torch_files, name="rewritten.pkl", **kw):
  path = tmp_path / name
  torch_files.network_pickle(snap, path, **kw)
  arch, config, params = converters.convert(path)
  return generators.base.registered()[arch](config, params)


# Attributes that only the stylegan3 repo's `training.networks_stylegan2` sets.
_SG3_ONLY = {
  "FullyConnectedLayer": {"in_features", "out_features"},
  "SynthesisLayer": {"in_channels", "out_channels", "w_dim"},
  "ToRGBLayer": {"in_channels", "out_channels", "w_dim"},
  "SynthesisBlock": {"fused_modconv_default"},
}


def test_stylegan2_ada_pickle(tmp_path, torch_files, ws):
  """`training.networks` (stylegan2-ada-pytorch): fewer attributes, older numpy names."""
  snap = _rewrite(
    safe_pickle.load(PKL),
    lambda cls, state: {k: v for k, v in state.items() if k not in _SG3_ONLY.get(cls, ())},
  )
  gen = _convert(snap, tmp_path, torch_files, numpy_module="numpy.core.multiarray")
  assert_close(gen.generate(ws), "image")


def _np_mapping(g, z, c):
  """NVIDIA's MappingNetwork.forward in numpy, from the pickle's own tensors and gains."""
  mods = g.state["_modules"]["mapping"].state["_modules"]

  def fc(rec, x):
    p = rec.state["_parameters"]
    x = x @ (p["weight"] * rec.state["weight_gain"]).T + p["bias"] * rec.state["bias_gain"]
    return np.where(x >= 0, x, 0.2 * x) * np.sqrt(2) if rec.state["activation"] == "lrelu" else x

  norm = lambda v: v / np.sqrt(np.mean(v**2, axis=1, keepdims=True) + 1e-8)
  x = np.concatenate([norm(z), norm(fc(mods["embed"], c))], axis=1)
  for i in range(2):
    x = fc(mods[f"fc{i}"], x)
  return x


def test_conditional_pickle(tmp_path, torch_files):
  c_dim, rng = 5, np.random.default_rng(0)

  def make_conditional(cls, state):
    if cls == "Generator":
      state["c_dim"] = c_dim
    if cls == "MappingNetwork":
      state["c_dim"] = c_dim
      mods = dict(state["_modules"])
      fc0 = mods["fc0"]
      w = fc0.state["_parameters"]["weight"]
      fc0_state = dict(
        fc0.state,
        _parameters=dict(
          fc0.state["_parameters"],
          weight=np.concatenate([w, rng.normal(size=w.shape).astype(np.float32)], axis=1),
        ),
      )
      mods["fc0"] = safe_pickle.Record(fc0.module, fc0.class_name, fc0_state)
      embed_state = dict(
        mods["fc1"].state,
        activation="linear",
        weight_gain=1 / np.sqrt(c_dim),
        bias_gain=1.0,
        _parameters={
          "weight": rng.normal(size=(64, c_dim)).astype(np.float32),
          "bias": rng.normal(size=64).astype(np.float32),
        },
      )
      mods["embed"] = safe_pickle.Record(fc0.module, "FullyConnectedLayer", embed_state)
      state["_modules"] = mods
    return state

  snap = _rewrite(safe_pickle.load(PKL), make_conditional)
  gen = _convert(snap, tmp_path, torch_files)
  assert gen.c_dim == c_dim
  c = np.eye(c_dim, dtype=np.float32)[[0, 1, 4, 4]]
  expected = _np_mapping(snap["G_ema"], IO["z"].astype(np.float64), c)
  ws = np.asarray(gen.latents(IO["z"], c))
  np.testing.assert_allclose(
    ws, np.broadcast_to(expected[:, None], ws.shape), atol=1e-5 * np.abs(expected).max()
  )
  assert np.abs(ws[0] - ws[1]).max() > 1e-2  # The class matters.
  with pytest.raises(ValueError, match="conditional"):
    gen.latents(IO["z"])


def _set_synthesis_attr(name, value):
  return lambda cls, state: (
    {**state, name: value} if cls in ("SynthesisLayer", "ToRGBLayer") else state
  )


def test_conv_clamp(tmp_path, torch_files, ws):
  clamp = 0.5
  gen = _convert(
    _rewrite(safe_pickle.load(PKL), _set_synthesis_attr("conv_clamp", clamp)), tmp_path, torch_files
  )
  assert gen.config["conv_clamp"] == clamp
  x, _ = gen.split(ws, 1)
  assert_close(x, "features_1", np.clip(_nhwc(IO["features_1"]), -clamp, clamp))
  assert np.abs(gen.split(ws, 6)[0]).max() <= clamp
  loose = _convert(
    _rewrite(safe_pickle.load(PKL), _set_synthesis_attr("conv_clamp", 1e4)),
    tmp_path,
    torch_files,
    name="loose.pkl",
  )
  assert_close(loose.generate(ws), "image")


def test_fp16_resolutions_compute_in_float32(tmp_path, torch_files, ws):
  """NVIDIA's code also runs fp16 blocks in float32 off-GPU (`force_fp32`)."""

  def fp16(cls, state):
    if cls == "SynthesisNetwork":
      return {**state, "num_fp16_res": 2}
    return {**state, "use_fp16": True} if cls == "SynthesisBlock" else state

  gen = _convert(_rewrite(safe_pickle.load(PKL), fp16), tmp_path, torch_files)
  assert gen.config["num_fp16_res"] == 2
  assert_close(gen.generate(ws), "image")


def test_orig_architecture(tmp_path, torch_files, ws):
  """'orig' keeps only the last ToRGB: image = skip image - upsampled carry_7."""

  def orig(cls, state):
    if cls != "SynthesisBlock":
      return state
    mods = state["_modules"]
    if state["resolution"] != 32:
      mods = {k: v for k, v in mods.items() if k != "torgb"}
    return {**state, "architecture": "orig", "_modules": mods}

  gen = _convert(_rewrite(safe_pickle.load(PKL), orig), tmp_path, torch_files)
  f = layers.setup_filter([1, 3, 3, 1])
  expected = _nhwc(IO["image"]) - np.asarray(layers.upsample2d(_nhwc(IO["carry_7"]), f))
  assert_close(gen.generate(ws), "image", expected)
  x, carry = gen.split(ws, 5)
  assert carry is None
  assert_close(gen.resume(x, carry, ws, 5), "image", expected)


@pytest.mark.parametrize(
  "rewrite, reason",
  [
    (
      lambda cls, s: {**s, "architecture": "resnet"} if cls == "SynthesisBlock" else s,
      "architecture 'resnet'",
    ),
    (
      lambda cls, s: {**s, "activation": "gelu"} if cls == "SynthesisLayer" else s,
      "activation 'gelu'",
    ),
    (
      lambda cls, s: (
        {**s, "_parameters": {**s["_parameters"], "bias": s["_parameters"]["bias"][:3]}}
        if cls == "SynthesisLayer"
        else s
      ),
      "invalid",
    ),
  ],
)
def test_unknown_options_are_refused(rewrite, reason, tmp_path, torch_files):
  with pytest.raises(ConversionError, match=reason):
    _convert(_rewrite(safe_pickle.load(PKL), rewrite), tmp_path, torch_files)


# --- Random generators of other sizes: structure and split/resume invariants. ---


def random_stylegan2(seed=0, **kw):
  options = dict(
    z_dim=8, c_dim=0, w_dim=8, img_resolution=8, img_channels=3, channels=(16, 8), mapping_layers=2
  )
  options.update(kw)
  cfg = stylegan2.Config(**options)
  shapes = stylegan2.param_shapes(cfg)
  leaves, tree = jax.tree.flatten(shapes)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  params = tree.unflatten([0.5 * jax.random.normal(k, s.shape) for k, s in zip(keys, leaves)])
  return stylegan2.StyleGAN2(
    dict(options, channels=list(cfg.channels)), jax.tree.map(np.asarray, params)
  )


@pytest.mark.parametrize(
  "kw",
  [
    dict(img_resolution=4, channels=(8,)),
    dict(architecture="orig", img_channels=1),
    dict(c_dim=3, conv_clamp=1.0, mapping_features=5, embed_features=6, kernel_size=1),
  ],
)
def test_resume_of_split_is_generate_for_every_layer(kw):
  gen = random_stylegan2(**kw)
  c = np.eye(3, dtype=np.float32)[[0, 2]] if gen.c_dim else None
  lat = gen.latents(np.ones((2, gen.z_dim)), c, truncation_psi=0.5)
  img = np.asarray(gen.generate(lat))
  res, ch = gen.config["img_resolution"], gen.config["img_channels"]
  assert img.shape == (2, res, res, ch) and np.isfinite(img).all()
  for layer in gen.layers:
    x, carry = gen.split(lat, layer)
    assert x.shape[1] == 4 * 2 ** (layer // 2)
    np.testing.assert_allclose(gen.resume(x, carry, lat, layer), img, atol=1e-5 * np.abs(img).max())


@pytest.mark.parametrize(
  "kw, match",
  [
    (dict(img_resolution=6), "power of two"),
    (dict(channels=(8,)), "one width per block"),
    (dict(architecture="resnet"), "architecture"),
    (dict(activation="gelu"), "unknown activation"),
  ],
)
def test_bad_configs(kw, match):
  with pytest.raises(ValueError, match=match):
    random_stylegan2(**kw)


def test_params_are_checked_against_the_config():
  gen = random_stylegan2()
  params = jax.tree.map(np.asarray, gen.params)
  del params["synthesis"]["convs_1"]["noise_const"]
  with pytest.raises(ValueError, match=r"missing \['noise_const'\]"):
    stylegan2.StyleGAN2(gen.config, params)
  params = jax.tree.map(np.asarray, gen.params)
  params["synthesis"]["const"] = params["synthesis"]["const"][:2]
  with pytest.raises(ValueError, match="synthesis/const has shape"):
    stylegan2.StyleGAN2(gen.config, params)


# --- genforce's StyleGAN2 `.pth`: the fixture renamed into genforce's layout. ---

GENFORCE_LR_MUL = 0.01  # genforce's default mapping_lr_mul.


def genforce_state_dict(g):
  """NVIDIA's G_ema as genforce's `StyleGAN2Generator` stores the same network.

  genforce scales weights at run time (dense and conv: `1 / sqrt(fan_in)`,
  mapping also `lr_mul`; biases `lr_mul`), adds 1 to the style biases and runs
  its up-convs' `conv_transpose2d` on the flipped kernel; each stored tensor
  here is NVIDIA's effective one with those undone.
  """
  mods = g.state["_modules"]
  mapping, syn = mods["mapping"], mods["synthesis"]
  t = lambda rec, name: nvidia.tensor(rec, name).astype(np.float64)
  child = nvidia.child
  sd = {"truncation.w_avg": t(mapping, "w_avg")}
  for i in range(mapping.state["num_layers"]):
    fc = child(mapping, f"fc{i}")
    weight = t(fc, "weight") * fc.state["weight_gain"]  # [out, in]
    sd[f"mapping.dense{i}.weight"] = weight * np.sqrt(weight.shape[1]) / GENFORCE_LR_MUL
    sd[f"mapping.dense{i}.bias"] = t(fc, "bias") * fc.state["bias_gain"] / GENFORCE_LR_MUL

  def modconv(name, rec, up=False):
    affine = child(rec, "affine")
    style = t(affine, "weight") * affine.state["weight_gain"]  # [in, w_dim]
    weight = t(rec, "weight")  # [out, in, k, k]
    if name.startswith("synthesis.layer"):  # Undo genforce's 1 / sqrt(fan_in); for
      weight = weight * np.sqrt(weight[0].size)  # ToRGB it is NVIDIA's style gain.
    sd.update(
      {
        f"{name}.weight": weight[:, :, ::-1, ::-1] if up else weight,
        f"{name}.style.weight": style * np.sqrt(style.shape[1]),
        f"{name}.style.bias": t(affine, "bias") * affine.state["bias_gain"] - 1.0,
        f"{name}.bias": t(rec, "bias"),
      }
    )

  up_filter = np.outer([1, 3, 3, 1], [1, 3, 3, 1])[None, None] / 16.0
  blocks = [child(syn, f"b{r}") for r in syn.state["block_resolutions"]]
  sd["synthesis.early_layer.const"] = t(blocks[0], "const")[None]
  sd["synthesis.upsample.kernel"] = up_filter
  convs = [child(blocks[0], "conv1")] + [child(b, f"conv{j}") for b in blocks[1:] for j in (0, 1)]
  for i, rec in enumerate(convs):
    modconv(f"synthesis.layer{i}", rec, up=i % 2 == 1)
    sd[f"synthesis.layer{i}.noise_strength"] = t(rec, "noise_strength")
    sd[f"synthesis.layer{i}.noise"] = t(rec, "noise_const")[None, None]
    if i % 2:
      sd[f"synthesis.layer{i}.filter.kernel"] = up_filter
  for k, block in enumerate(blocks):
    modconv(f"synthesis.output{k}", child(block, "torgb"))
  return {k: np.array(v, np.float32) for k, v in sd.items()}  # C order; 0-d stays 0-d.


def _genforce_orig(sd):
  """genforce's 'origin' architecture: the last ToRGB only, no upsampling of images."""
  last = max(int(k.split(".")[1][len("output") :]) for k in sd if ".output" in k)
  return {
    k: v
    for k, v in sd.items()
    if "upsample" not in k and not (".output" in k and not k.startswith(f"synthesis.output{last}."))
  }


@pytest.mark.parametrize("architecture", ["skip", "orig"])
def test_genforce_pth_is_the_same_network(architecture, tmp_path, torch_files, gen, ws):
  """genforce's names and layouts of the fixture network convert to the NVIDIA
  pickle's parameters (to float32 rounding) and give the fixture's numbers."""
  snap = safe_pickle.load(PKL)
  sd = genforce_state_dict(snap["G_ema"])
  expected = jax.tree.map(np.asarray, gen.params)
  if architecture == "orig":
    sd = _genforce_orig(sd)
    syn = {k: v for k, v in expected["synthesis"].items() if not k.startswith("torgbs")}
    expected["synthesis"] = {**syn, "torgbs_0": expected["synthesis"]["torgbs_3"]}
  path = tmp_path / "stylegan2.pth"
  torch_files.torch_zip({"generator": genforce_state_dict(snap["G"]), "generator_smooth": sd}, path)
  arch, config, params = converters.convert(path)
  assert (arch, config["architecture"]) == ("stylegan2", architecture)
  same = (
    "z_dim",
    "c_dim",
    "w_dim",
    "img_resolution",
    "img_channels",
    "channels",
    "mapping_layers",
    "mapping_features",
  )
  assert {k: config[k] for k in same} == {k: gen.config[k] for k in same}
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params, expected
  )
  converted = generators.base.registered()[arch].from_converted(config, params)
  assert_close(converted.latents(IO["z"], truncation_psi=float(IO["truncation_psi"])), "ws")
  image = _nhwc(IO["image"])
  if architecture == "orig":  # As test_orig_architecture.
    f = layers.setup_filter([1, 3, 3, 1])
    image = image - np.asarray(layers.upsample2d(_nhwc(IO["carry_7"]), f))
  assert_close(converted.generate(ws), "image", image)


@pytest.mark.parametrize(
  "edit, reason",
  [
    (lambda sd: sd.pop("synthesis.layer3.noise"), "missing tensor synthesis.layer3.noise"),
    (lambda sd: sd.update({"mapping.label_weight": np.ones((5, 64), np.float32)}), "conditional"),
    (
      lambda sd: sd.update({"synthesis.layer1.filter.kernel": np.ones((1, 1, 4, 4), np.float32)}),
      r"\[1, 3, 3, 1\] upsampling filter",
    ),
    (
      lambda sd: sd.update({"synthesis.skip_layer0.weight": np.ones((4, 4, 1, 1), np.float32)}),
      "unexpected tensor",
    ),
  ],
)
def test_genforce_pth_conversion_is_strict(edit, reason):
  sd = genforce_state_dict(safe_pickle.load(PKL)["G_ema"])
  edit(sd)
  with pytest.raises(ConversionError, match=reason):
    genforce.convert_state_dict(sd)
