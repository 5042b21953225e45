"""BigGAN-deep: the converted fixture against pytorch-pretrained-biggan's outputs,
another configuration against a NumPy reference written here, conversion errors.

Tolerance policy (fixtures README): max abs difference <= 1e-4 x max_abs of
the reference array.
"""

import json
import math
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest

import converters
from converters import __main__ as converters_main
from converters import safe_pickle
from converters.errors import ConversionError
from panda_jax import generators
from panda_jax.generators import biggan

FAMILY = "biggan"  # The conftest fixtures `gen` and `io`.
FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "biggan")
# io.npz stores float32(0.4); the package was called with the Python float 0.4
# (float32(0.4) / 0.02 is not an integer and picks other statistics).
TRUNCATION = 0.4


def nhwc(x):
  return np.transpose(x, (0, 2, 3, 1))


def assert_close(got, want, name, factor=1e-4):
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape, (name, got.shape, want.shape)
  err, tol = np.abs(got - want).max(), factor * np.abs(want).max()
  assert err <= tol, f"{name}: max abs error {err:.3g} > {tol:.3g}"


@pytest.fixture(scope="module")
def fixture_state():
  return safe_pickle.load(os.path.join(FIXTURE, "pytorch_model.bin"))


# ----------------------------------------------------------------------------
# The fixture: every array of the official code.


def test_fixture_matches_package(gen, io):
  assert np.float32(TRUNCATION) == io["truncation"]
  assert (gen.arch, gen.z_dim, gen.c_dim, gen.num_layers) == ("biggan", 16, 10, 8)
  lat = gen.latents(io["z"], io["class_vector"], TRUNCATION)
  cond = np.concatenate([lat["z"], lat["embedding"]], axis=1)
  assert_close(cond, io["cond_vector"], "cond_vector")
  for layer in gen.layers:
    x, carry = gen.split(lat, layer)
    assert carry is None
    assert_close(x, nhwc(io[f"features_{layer}"]), f"features_{layer}")
  assert_close(gen.generate(lat), nhwc(io["image"]), "image")
  layer = int(io["edit_layer"])
  x, carry = gen.split(lat, layer)
  edited = gen.resume(x + nhwc(io["edit_delta"]), carry, lat, layer)
  assert_close(edited, nhwc(io["edit_image"]), "edit_image")


def test_class_indices_and_layer_range(gen, io):
  """Class indices give the one-hot latents; `resume(split(l)) == generate` for
  every family and layer: `test_generators_base.py`."""
  lat = gen.latents(io["z"], np.argmax(io["class_vector"], axis=1), TRUNCATION)
  one_hot = gen.latents(io["z"], io["class_vector"], TRUNCATION)
  jax.tree.map(np.testing.assert_array_equal, lat, one_hot)
  with pytest.raises(ValueError, match="layer must be in"):
    gen.split(lat, gen.num_layers + 1)


def test_params_are_checked_against_the_module_tree(gen):
  """The Flax module's parameter tree (`param_shapes`) is the converted layout; a
  missing or misshapen parameter is one `ValueError` naming it."""
  assert [l.kind for l in gen.cfg.generator_layers].index("attention") == 4
  params = jax.tree.map(np.asarray, gen.params)
  shapes = jax.tree.map(lambda s: s.shape, biggan.param_shapes(gen.cfg))
  assert shapes == jax.tree.map(np.shape, params)
  del params["layer_3"]["bn_2"]["means"]
  with pytest.raises(ValueError, match=r"parameters under /layer_3/bn_2: missing \['means'\]"):
    biggan.BigGAN(gen.config, params)
  params = jax.tree.map(np.asarray, gen.params)
  params["layer_4"]["gamma"] = np.ones(1, np.float32)
  with pytest.raises(ValueError, match=r"parameter /layer_4/gamma has shape \(1,\), expected \(\)"):
    biggan.BigGAN(gen.config, params)


def test_stat_weights_copy_the_package_arithmetic():
  # 0.4 / (1 / 50) == 20.0 exactly: coef == 0 selects row 20 alone.
  np.testing.assert_array_equal(biggan.stat_weights(0.4, 51), np.eye(51)[20])
  np.testing.assert_array_equal(biggan.stat_weights(1.0, 51), np.eye(51)[50])
  # 0.53 / 0.1 = 5.300000000000001: coef ~ 0.3 weighs row 5, 1 - coef row 6.
  coef = math.modf(0.53 / 0.1)[0]
  want = np.zeros(11, np.float32)
  want[5], want[6] = coef, 1.0 - coef
  np.testing.assert_array_equal(biggan.stat_weights(0.53, 11), want)
  # Just above a grid point the weight jumps to the next row (the package's
  # discontinuity, reproduced): float32(0.4) is slightly more than 0.4.
  w = biggan.stat_weights(np.float32(0.4), 51)
  assert w[21] > 0.999 and 0 < w[20] < 1e-6
  # A traced truncation (float32) agrees away from the grid points.
  traced = jax.jit(lambda t: biggan.stat_weights(t, 11))(0.53)
  np.testing.assert_allclose(traced, want, atol=1e-6)


def test_class_helpers_and_latent_checks(gen, io):
  np.testing.assert_array_equal(biggan.one_hot(3, 10, batch_size=2), np.eye(10)[[3, 3]])
  np.testing.assert_array_equal(biggan.one_hot([1, 4], 5), np.eye(5)[[1, 4]])
  with pytest.raises(ValueError, match="class indices"):
    biggan.one_hot(1000)
  key = jax.random.key(0)
  z = np.asarray(biggan.truncated_noise(key, 4000, 16, truncation=0.5))
  np.testing.assert_array_equal(z, biggan.truncated_noise(key, 4000, 16, 0.5))
  assert z.shape == (4000, 16) and np.abs(z).max() <= 1.0
  # Standard normal truncated to [-2, 2]: std 0.8796; times 0.5.
  assert abs(z.mean()) < 0.01 and abs(z.std() - 0.5 * 0.8796) < 0.01
  with pytest.raises(ValueError, match="truncation_psi"):
    gen.latents(io["z"], io["class_vector"], 1.5)
  with pytest.raises(ValueError, match="class-conditional"):
    gen.latents(io["z"])
  with pytest.raises(ValueError, match="truncation_cutoff"):
    gen.latents(io["z"], io["class_vector"], 0.5, truncation_cutoff=2)


# ----------------------------------------------------------------------------
# Another configuration, rewritten from the fixture, against NumPy.


def write_torch_zip(path, state):
  """`torch.save(state_dict)` of float32 arrays, written without torch."""
  p = pickle

  def text(s):
    b = s.encode()
    return p.BINUNICODE + struct.pack("<I", len(b)) + b

  def int_(v):
    return p.BININT + struct.pack("<i", v)

  def ints(values):
    return p.MARK + b"".join(int_(v) for v in values) + p.TUPLE

  ordered_dict = p.GLOBAL + b"collections\nOrderedDict\n" + p.EMPTY_TUPLE + p.REDUCE
  out = [p.PROTO, b"\x02", ordered_dict, p.MARK]
  for key, (name, array) in enumerate(state.items()):
    strides = [int(np.prod(array.shape[i + 1 :])) for i in range(array.ndim)]
    storage = (
      p.MARK
      + text("storage")
      + p.GLOBAL
      + b"torch\nFloatStorage\n"
      + text(str(key))
      + text("cpu")
      + int_(array.size)
      + p.TUPLE
      + p.BINPERSID
    )
    out += [
      text(name),
      p.GLOBAL + b"torch._utils\n_rebuild_tensor_v2\n",
      p.MARK,
      storage,
      int_(0),
      ints(array.shape),
      ints(strides),
      p.NEWFALSE,
      ordered_dict,
      p.TUPLE,
      p.REDUCE,
    ]
  out += [p.SETITEMS, p.STOP]
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", b"".join(out))
    zf.writestr("archive/byteorder", "little")
    for key, array in enumerate(state.values()):
      zf.writestr(f"archive/data/{key}", np.asarray(array, "<f4").tobytes())
    zf.writestr("archive/version", "3\n")


OTHER = dict(
  output_dim=32,
  z_dim=16,
  class_embed_dim=16,
  channel_width=4,
  num_classes=3,
  n_stats=11,
  eps=1e-4,
  attention_layer_position=1,
  layers=[[True, 16, 8], [False, 8, 8], [True, 8, 4], [True, 4, 2], [False, 2, 1]],
)


def random_state(config, rng):
  """A random state dict in the package's names and layout for `config`, scaled
  so that activations stay of order 1 (spectral norms with sigma > 0)."""
  state = {"embeddings.weight": rng.normal(size=(config["z_dim"], config["num_classes"]))}
  k, d, ch = config["n_stats"], 2 * config["z_dim"], config["channel_width"]

  def sn(name, shape, scale=1.0):
    w = scale * rng.normal(size=shape) / math.sqrt(np.prod(shape[1:]))
    v = rng.normal(size=int(np.prod(shape[1:])))
    u = np.reshape(w, (shape[0], -1)) @ v  # u ~ W v: sigma = u^T W v > 0.
    state.update(
      {
        f"{name}.weight_orig": w,
        f"{name}.weight_u": u / np.linalg.norm(u),
        f"{name}.weight_v": v / np.linalg.norm(v) * rng.uniform(1, 3),
      }
    )

  def bn(name, c):
    state[f"{name}.running_means"] = 0.3 * rng.normal(size=(k, c))
    state[f"{name}.running_vars"] = rng.uniform(1, 4, size=(k, c))

  sn("generator.gen_z", (4 * 4 * 16 * ch, d))
  state["generator.gen_z.bias"] = 0.1 * rng.normal(size=4 * 4 * 16 * ch)
  i = 0
  for b, (_, c_in, c_out) in enumerate(config["layers"]):
    c_in, c_out = ch * c_in, ch * c_out
    if b == config["attention_layer_position"]:
      name = f"generator.layers.{i}"
      for conv, shape in (
        ("theta", (c_in // 8, c_in)),
        ("phi", (c_in // 8, c_in)),
        ("g", (c_in // 2, c_in)),
        ("o_conv", (c_in, c_in // 2)),
      ):
        sn(f"{name}.snconv1x1_{conv}", shape + (1, 1))
      state[f"{name}.gamma"] = np.array([0.7])
      i += 1
    name, mid = f"generator.layers.{i}", c_in // 4
    for j, (a, o, s) in enumerate([(c_in, mid, 1), (mid, mid, 3), (mid, mid, 3), (mid, c_out, 1)]):
      bn(f"{name}.bn_{j}", a)
      sn(f"{name}.bn_{j}.scale", (a, d), 0.3)
      sn(f"{name}.bn_{j}.offset", (a, d), 0.3)
      sn(f"{name}.conv_{j}", (o, a, s, s))
      state[f"{name}.conv_{j}.bias"] = 0.1 * rng.normal(size=o)
    i += 1
  bn("generator.bn", ch)
  state["generator.bn.weight"] = rng.uniform(0.5, 1.5, ch)
  state["generator.bn.bias"] = 0.1 * rng.normal(size=ch)
  sn("generator.conv_to_rgb", (ch, ch, 3, 3))
  state["generator.conv_to_rgb.bias"] = 0.1 * rng.normal(size=ch)
  return {k: np.asarray(v, np.float32) for k, v in state.items()}


def other_state(fixture_state, rng):
  """A state dict of OTHER; its embeddings (3 of 10 classes) and gen_z are the fixture's."""
  state = random_state(OTHER, rng)
  state["embeddings.weight"] = fixture_state["embeddings.weight"][:, :3]
  for key in ("weight_orig", "weight_u", "weight_v", "bias"):
    state[f"generator.gen_z.{key}"] = fixture_state[f"generator.gen_z.{key}"]
  return state


def reference(state, config, z, classes, truncation):
  """The package's forward pass in float64 NumPy, NCHW: every layer's output and the image."""
  sd = {k: v.astype(np.float64) for k, v in state.items()}
  relu = lambda x: np.maximum(x, 0)
  up = lambda x: x.repeat(2, axis=2).repeat(2, axis=3)

  def sn(name):
    w = sd[f"{name}.weight_orig"]
    return w / (sd[f"{name}.weight_u"] @ np.reshape(w, (len(w), -1)) @ sd[f"{name}.weight_v"])

  def conv(name, x):
    w = sn(name)
    k, (h, wd) = w.shape[-1], x.shape[2:]
    xp = np.pad(x, ((0, 0), (0, 0), (k // 2,) * 2, (k // 2,) * 2))
    out = sum(
      np.einsum("nihw,oi->nohw", xp[:, :, a : a + h, b : b + wd], w[:, :, a, b])
      for a in range(k)
      for b in range(k)
    )
    return out + sd[f"{name}.bias"][:, None, None]

  def bn(name, x, cond):
    coef, i = math.modf(truncation / (1.0 / (config["n_stats"] - 1)))
    i = int(i)
    stats = [sd[f"{name}.running_{s}"] for s in ("means", "vars")]
    mean, var = [s[i] * coef + s[i + 1] * (1 - coef) if coef else s[i] for s in stats]
    x = (x - mean[:, None, None]) / np.sqrt(var + config["eps"])[:, None, None]
    if cond is None:
      return x * sd[f"{name}.weight"][:, None, None] + sd[f"{name}.bias"][:, None, None]
    scale, offset = cond @ sn(f"{name}.scale").T, cond @ sn(f"{name}.offset").T
    return x * (1 + scale)[..., None, None] + offset[..., None, None]

  def pool(x):
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5)).reshape(n, c, -1)

  def attention(name, x):
    n, c, h, w = x.shape
    f = lambda conv_name, y: np.einsum("nchw,oc->nohw", y, sn(conv_name)[:, :, 0, 0])
    theta = f(f"{name}.snconv1x1_theta", x).reshape(n, c // 8, h * w)
    logits = theta.transpose(0, 2, 1) @ pool(f(f"{name}.snconv1x1_phi", x))
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    o = (pool(f(f"{name}.snconv1x1_g", x)) @ attn.transpose(0, 2, 1)).reshape(n, c // 2, h, w)
    return x + sd[f"{name}.gamma"][0] * f(f"{name}.snconv1x1_o_conv", o)

  cond = np.concatenate([z, np.eye(config["num_classes"])[classes] @ sd["embeddings.weight"].T], 1)
  x = cond @ sn("generator.gen_z").T + sd["generator.gen_z.bias"]
  x = x.reshape(len(z), 4, 4, -1).transpose(0, 3, 1, 2)
  features, i = [x], 0
  for b, (up_sample, _, _) in enumerate(config["layers"]):
    if b == config["attention_layer_position"]:
      features.append(attention(f"generator.layers.{i}", features[-1]))
      i += 1
    name, x0 = f"generator.layers.{i}", features[-1]
    h = x0
    for j in range(4):
      h = relu(bn(f"{name}.bn_{j}", h, cond))
      h = conv(f"{name}.conv_{j}", up(h) if j == 1 and up_sample else h)
    skip = x0[:, : x0.shape[1] // 2] if h.shape[1] != x0.shape[1] else x0
    features.append(h + (up(skip) if up_sample else skip))
    i += 1
  x = relu(bn("generator.bn", features[-1], None))
  return features, np.tanh(conv("generator.conv_to_rgb", x)[:, :3])


def test_other_config_converts_and_matches_numpy(tmp_path, fixture_state, io):
  rng = np.random.default_rng(0)
  state = other_state(fixture_state, rng)
  src = tmp_path / "biggan-other"
  src.mkdir()
  write_torch_zip(src / "pytorch_model.bin", state)
  (src / "config.json").write_text(json.dumps(OTHER))
  assert converters_main.main([f"--src={src}", f"--dst={tmp_path / 'out'}"]) == 0
  gen = generators.load(tmp_path / "out")
  assert (gen.c_dim, gen.num_layers) == (3, 6)
  assert [l.kind for l in gen.cfg.generator_layers][:3] == ["block", "attention", "block"]
  classes, truncation = np.array([0, 2, 1, 2]), 0.53  # 0.53 interpolates two rows.
  z = np.asarray(io["z"], np.float64)
  features, image = reference(state, OTHER, z, classes, truncation)
  lat = gen.latents(io["z"], classes, truncation)
  for layer in gen.layers:
    assert_close(gen.split(lat, layer)[0], nhwc(features[layer]), f"features_{layer}")
  assert_close(gen.generate(lat), nhwc(image), "image")
  assert np.abs(features[2] - features[1]).max() > 0.05  # Attention does something.


# ----------------------------------------------------------------------------
# The error contract: exit 2 and one line.


def bad_folder(tmp_path, config=None, state=None):
  folder = tmp_path / "bad"
  folder.mkdir()
  if state is None:
    shutil.copy(os.path.join(FIXTURE, "pytorch_model.bin"), folder / "pytorch_model.bin")
  else:
    write_torch_zip(folder / "pytorch_model.bin", state)
  if config is not None:
    (folder / "config.json").write_text(json.dumps(config))
  return folder


def fixture_config(**changes):
  with open(os.path.join(FIXTURE, "config.json")) as f:
    return {**json.load(f), **changes}


@pytest.mark.parametrize(
  "config, message",
  [
    (None, "missing config.json"),
    ({**fixture_config(), "channels": 4}, "unknown keys \\['channels'\\]"),
    ({k: v for k, v in fixture_config().items() if k != "n_stats"}, "missing keys \\['n_stats'\\]"),
    (fixture_config(channel_width=10**9), "channel_width must be an integer in"),
    (fixture_config(n_stats=-3), "n_stats must be an integer in"),
    (fixture_config(layers=[[False, 16, 16], [True, 4, 2]]), "does not chain"),
    (fixture_config(output_dim=64), "does not match 4 \\* 2\\^3"),
    (fixture_config(eps="1e-4"), "eps must be a number"),
    (fixture_config(num_classes=11), "embeddings.weight has shape \\[16, 10\\]"),
  ],
)
def test_bad_configs_exit_2_with_one_line(tmp_path, capsys, config, message):
  folder = bad_folder(tmp_path, config)
  assert converters_main.main([f"--src={folder}", f"--dst={tmp_path / 'out'}"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: "), err
  assert re.search(message, err), err
  assert not (tmp_path / "out").exists()


def test_state_dict_must_match_exactly(tmp_path, fixture_state):
  extra = {**fixture_state, "generator.extra.weight": np.zeros(3, np.float32)}
  with pytest.raises(ConversionError, match="unexpected tensor"):
    converters.convert(bad_folder(tmp_path, fixture_config(), extra))
  missing = {k: v for k, v in fixture_state.items() if k != "generator.bn.bias"}
  (tmp_path / "bad" / "pytorch_model.bin").unlink()
  write_torch_zip(tmp_path / "bad" / "pytorch_model.bin", missing)
  with pytest.raises(ConversionError, match="missing tensor generator.bn.bias"):
    converters.convert(tmp_path / "bad")


def test_command_line_missing_config(tmp_path):
  folder = bad_folder(tmp_path)
  run = subprocess.run(
    [sys.executable, "-m", "converters", f"--src={folder}", f"--dst={tmp_path / 'out'}"],
    capture_output=True,
    text=True,
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  )
  assert run.returncode == 2
  assert run.stderr.strip().count("\n") == 0 and "missing config.json" in run.stderr


def test_weights_file_converts_like_its_folder():
  arch, config, from_folder = converters.convert(FIXTURE)
  _, _, from_file = converters.convert(os.path.join(FIXTURE, "pytorch_model.bin"))
  assert arch == "biggan" and config == fixture_config()
  jax.tree.map(np.testing.assert_array_equal, from_folder, from_file)
