"""The PyTorch DCGAN-tutorial generator: torch's outputs, the converter, bad input.

Tolerance policy (`_reference.assert_close`): max |ours - torch| <= 1e-4 x max
|torch| per array. Why it holds with margin: every output of a layer is a float32
sum of n <= 4 c_in products (n <= 2048 on the 64x64 tutorial model) that the two
implementations add in different orders; the rounding difference of such sums is
~sqrt(n) 2^-24 relative (<= 3e-6), and the 5 layers (BatchNorm and ReLU add
one rounding each, tanh shrinks errors) stay below ~2e-5 of the largest value.

The golden fixture (`fixtures/dcgan/`, written by `fixtures/make_dcgan.py`) needs
no torch; the other configurations and the real weights compare with torch's
module built by that script, and are skipped without torch. The real weights
are read from `PANDA_DCGAN_WEIGHTS` (gan-face-generate's `weights.tar`, see
WORKSPACE.md), never from the repository.
"""

import importlib.util
import json
import os
import re

import jax
import numpy as np
import pytest

import converters
from _reference import assert_close
from _reference import assert_fixture_outputs
from converters import __main__ as cli
from converters import dcgan as dcgan_converter
from converters import safe_pickle
from panda_jax import generators
from panda_jax.generators import dcgan
from panda_jax.generators import layers as layers_lib
from test_generators_base import _products

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "fixtures", "dcgan")
WEIGHTS = os.path.join(FIXTURE, "weights.tar")
REAL_WEIGHTS = os.environ.get("PANDA_DCGAN_WEIGHTS", "")


def _torch_reference():
  """`fixtures/make_dcgan.py` as a module (it imports torch); skips without torch."""
  torch = pytest.importorskip(
    "torch",
    reason="the torch extra is not installed: "
    "`pip install -e '.[torch]'` to compare with torch itself",
  )
  torch.set_num_threads(1)
  spec = importlib.util.spec_from_file_location(
    "make_dcgan", os.path.join(HERE, "fixtures", "make_dcgan.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return torch, module


def _assert_matches_torch(gen, make, net, z):
  """Every block's output and the image of `gen` equal torch's on `z [n, nz]`."""
  import torch  # pylint: disable=import-outside-toplevel

  features, image = make.forward(net, torch.from_numpy(z))
  lat = gen.latents(z)
  assert list(gen.layers) == sorted(features)
  for layer in gen.layers:
    assert_close(gen.split(lat, layer)[0], features[layer].numpy())
  assert_close(gen.generate(lat), image.numpy())


def _assert_split_resume(gen, z):
  lat = gen.latents(z)
  img = np.asarray(gen.generate(lat))
  assert np.isfinite(img).all() and 0 < np.abs(img).max() <= 1
  for layer in gen.layers:
    x, carry = gen.split(lat, layer)
    assert carry is None and x.shape[1:] == gen.cfg.feature_shape(layer)
    np.testing.assert_allclose(
      gen.resume(x, carry, lat, layer),
      img,
      rtol=0,
      atol=1e-5 * np.abs(img).max(),
      err_msg=f"layer {layer}",
    )


@pytest.fixture(scope="module")
def gen(converted):
  run = converted("dcgan/weights.tar")  # `python -m converters`, in its own process.
  assert (run.returncode, run.stderr, run.stdout) == (0, "", f"{run.dst}\n")
  return generators.load(run.dst)


@pytest.fixture(scope="module")
def io():
  with np.load(os.path.join(FIXTURE, "io.npz")) as f:
    return dict(f)


# --- The golden fixture (no torch needed). ---


def test_fixture_features_image_and_edit(gen, io):
  with open(os.path.join(FIXTURE, "meta.json")) as f:
    meta = json.load(f)
  assert gen.arch == "dcgan" and isinstance(gen, dcgan.DCGAN)
  assert (gen.z_dim, gen.cfg.channels, gen.cfg.img_channels, gen.num_layers) == (
    meta["nz"],
    tuple(meta["channels"]),
    meta["nc"],
    3,
  )
  assert gen.config["img_resolution"] == gen.cfg.img_resolution == 32
  assert {k: float(np.abs(io[k]).max()) for k in meta["max_abs"]} == meta["max_abs"]
  assert_fixture_outputs(gen, io, gen.latents(io["z"]))


def test_resume_of_split_is_generate_at_every_layer(gen):
  z = np.random.default_rng(0).standard_normal((3, gen.z_dim)).astype(np.float32)
  _assert_split_resume(gen, z)


def test_every_product_runs_in_float32_precision(gen):
  jaxpr = jax.make_jaxpr(lambda z: gen.generate(gen.latents(z)))(
    np.zeros((1, gen.z_dim), np.float32)
  )
  products = list(_products(jaxpr.jaxpr))
  # The first transposed conv (stride 1) is one correlation, every stride-2 one
  # four (its sub-pixel phases, `layers.upsampling_correlation`).
  assert len(products) == 1 + 4 * gen.num_layers
  highest = (layers_lib.PRECISION, layers_lib.PRECISION)
  assert all(e.params["precision"] == highest for e in products)


def test_bad_calls_raise(gen, io):
  lat = gen.latents(io["z"])
  for kwargs in (
    dict(truncation_psi=0.7),
    dict(truncation_cutoff=2),
    dict(c=np.ones((2, 1), np.float32)),
  ):
    with pytest.raises(ValueError, match="truncation|unconditional"):
      gen.latents(io["z"], **kwargs)
  np.testing.assert_array_equal(gen.latents(io["z"], truncation_psi=1), lat)
  with pytest.raises(ValueError, match=r"z must be \[n, 16\]"):
    gen.latents(io["z"][:, :10])
  with pytest.raises(ValueError, match=r"layer must be in \[1, 3\]"):
    gen.split(lat, 4)
  x, _ = gen.split(lat, 2)
  with pytest.raises(ValueError, match=r"x must be \[n, 4, 4, 32\] at layer 1"):
    gen.resume(x, None, lat, 1)
  with pytest.raises(ValueError, match="no carry"):
    gen.resume(x, x, lat, 2)
  with pytest.raises(ValueError, match="img_resolution 64 does not match"):
    dcgan.DCGAN({**gen.config, "img_resolution": 64}, gen.params)
  with pytest.raises(ValueError, match="missing"):
    dcgan.DCGAN(gen.config, {"params": gen.params["params"]})


# --- Beyond the fixture: other depths, widths and file layouts, against torch. ---


@pytest.mark.parametrize(
  "nz, channels, nc, layout",
  [
    (7, (20, 12, 6, 4, 2), 1, "netG/data_parallel/legacy"),  # 128x128, 1 channel.
    (5, (3,), 4, "state_dict"),  # One block: 8x8, 4 channels.
    (16, (64, 32, 16, 8), 3, "bare"),  # The tutorial's shape at ngf = 8: 64x64.
  ],
)
def test_other_configurations_match_torch(nz, channels, nc, layout, tmp_path):
  torch, make = _torch_reference()
  net = make.randomize(make.generator(nz, channels, nc), seed=len(channels))
  state = net.state_dict()
  if "data_parallel" in layout:
    state = torch.nn.DataParallel(net).state_dict()  # Keys "module.main...".
    assert next(iter(state)).startswith("module.")
  obj = state if layout == "bare" else {layout.split("/")[0]: state, "epoch": 3}
  path = tmp_path / "g.pth"
  torch.save(obj, path, _use_new_zipfile_serialization="legacy" not in layout)
  arch, config, params = converters.convert(path, nz=nz)
  assert arch == "dcgan"
  assert (config["z_dim"], config["channels"], config["img_channels"]) == (nz, list(channels), nc)
  assert config["img_resolution"] == 2 ** (len(channels) + 2)
  gen = dcgan.DCGAN.from_converted(config, params)
  z = np.random.default_rng(1).standard_normal((3, nz)).astype(np.float32)
  _assert_matches_torch(gen, make, net, z)
  _assert_split_resume(gen, z)


@pytest.mark.skipif(
  not os.path.isfile(REAL_WEIGHTS),
  reason=(
    "set PANDA_DCGAN_WEIGHTS to gan-face-generate's weights.tar (WORKSPACE.md, DCGAN) "
    "to test the real weights"
  ),
)
def test_real_weights_match_torch(tmp_path, capsys):
  torch, make = _torch_reference()
  assert cli.main([f"--src={REAL_WEIGHTS}", f"--dst={tmp_path / 'g'}", "--nz=100"]) == 0, (
    capsys.readouterr().err
  )
  gen = generators.load(tmp_path / "g")
  assert (gen.z_dim, gen.cfg.channels, gen.cfg.img_channels, gen.cfg.img_resolution) == (
    100,
    (512, 256, 128, 64),
    3,
    64,
  )
  state = torch.load(REAL_WEIGHTS, map_location="cpu", weights_only=True)["netG_state_dict"]
  net = make.generator(100, (512, 256, 128, 64), 3)
  net.load_state_dict(state)
  z = np.random.default_rng(2).standard_normal((4, 100)).astype(np.float32)
  _assert_matches_torch(gen, make, net, z)
  _assert_split_resume(gen, z)


# --- The converter: command line and bad input. ---


def test_cli_options(gen, tmp_path, capsys):
  assert cli.main([f"--src={WEIGHTS}", f"--dst={tmp_path / 'a'}", "--nz=16"]) == 0
  assert generators.load(tmp_path / "a").z_dim == 16
  pggan = os.path.join(HERE, "fixtures", "pggan", "pggan.pth")
  capsys.readouterr()
  assert cli.main([f"--src={pggan}", f"--dst={tmp_path / 'b'}", "--nz=64"]) == 2
  assert "--nz does not apply to genforce checkpoints" in capsys.readouterr().err
  assert not (tmp_path / "b").exists()


def test_sniff_claims_only_dcgan_files():
  fixtures = os.path.join(HERE, "fixtures")
  assert converters.detect(converters.Source(WEIGHTS)) is dcgan_converter
  for rel in (
    "pggan/pggan.pth",
    "stylegan/stylegan.pth",
    "stylegan2/network-snapshot.pkl",
    "biggan/pytorch_model.bin",
    "biggan",
  ):
    assert not dcgan_converter.sniff(converters.Source(os.path.join(fixtures, rel))), rel


def _fixture_checkpoint() -> dict:
  return safe_pickle.load(WEIGHTS)


def _edit_state(edit):
  """A writer of the fixture checkpoint with `edit(netG state dict)` applied."""

  def write(path, torch_files):
    ckpt = _fixture_checkpoint()
    state = dict(ckpt["netG_state_dict"])
    edit(state)
    ckpt["netG_state_dict"] = state
    torch_files.torch_zip(ckpt, path)

  return write


def _set(name, value):
  return _edit_state(lambda state: state.__setitem__(name, value))


def _checkpoint(**entries):
  def write(path, torch_files):
    torch_files.torch_zip({**_fixture_checkpoint(), **entries}, path)

  return write


def _pggan_state():
  return safe_pickle.load(os.path.join(HERE, "fixtures", "pggan", "pggan.pth"))["generator"]


def _negative_var(state):
  state["main.1.running_var"] = -state["main.1.running_var"]


def _prefixed_without(name):
  def edit(state):
    moved = {f"module.{k}": v for k, v in state.items() if k != name}
    state.clear()
    state.update(moved)

  return edit


_NAN = np.full((16,), np.nan, np.float32)
BAD = {  # name -> (writer(path, torch_files), extra CLI flags, expected error text).
  "discriminator_as_netG": (
    lambda p, tf: tf.torch_zip({"netG_state_dict": _fixture_checkpoint()["netD_state_dict"]}, p),
    [],
    "missing tensor main.1.weight",
  ),
  "pggan_as_netG": (
    _checkpoint(netG_state_dict=_pggan_state()),
    [],
    "missing tensor main.0.weight",
  ),
  "netG_not_a_state_dict": (
    _checkpoint(netG_state_dict=[1, 2]),
    [],
    "netG_state_dict is not a state dict",
  ),
  "missing_key": (
    _edit_state(lambda s: s.pop("main.4.running_var")),
    [],
    "missing tensor main.4.running_var",
  ),
  "missing_key_data_parallel": (
    _edit_state(_prefixed_without("main.4.running_var")),
    [],
    "missing tensor module.main.4.running_var",
  ),
  "missing_last_conv": (
    _edit_state(lambda s: s.pop("main.9.weight")),
    [],
    "missing tensor main.9.weight",
  ),
  "extra_conv_bias": (
    _set("main.3.bias", np.zeros(16, np.float32)),
    [],
    "unexpected tensor main.3.bias",
  ),
  "extra_unrelated_key": (
    _set("main.99.weight", np.zeros(3, np.float32)),
    [],
    "unexpected tensor main.99.weight",
  ),
  "extra_block": (
    _set("main.12.weight", np.zeros((3, 3, 4, 4), np.float32)),
    [],
    "missing tensor main.10.weight",
  ),
  "conv_in_channels": (
    _set("main.3.weight", np.zeros((31, 16, 4, 4), np.float32)),
    [],
    r"tensor main.3.weight has shape \[31, 16, 4, 4\], "
    r"expected \[32, 16, 4, 4\]",
  ),
  "bn_channels": (
    _set("main.4.weight", np.ones(17, np.float32)),
    [],
    r"tensor main.4.weight has shape \[17\], expected \[16\]",
  ),
  "kernel_3x3": (
    _set("main.9.weight", np.zeros((8, 3, 3, 3), np.float32)),
    [],
    r"tensor main.9.weight has shape \[8, 3, 3, 3\]",
  ),
  "conv_2d_weight": (
    _set("main.0.weight", np.zeros((16, 32), np.float32)),
    [],
    r"tensor main.0.weight has shape \[16, 32\]",
  ),
  "nan": (_set("main.4.bias", _NAN), [], "tensor main.4.bias holds NaN or Inf"),
  "negative_variance": (
    _edit_state(_negative_var),
    [],
    "tensor main.1.running_var has negative entries",
  ),
  "float_counter": (
    _set("main.1.num_batches_tracked", np.array(3.5, np.float32)),
    [],
    "main.1.num_batches_tracked must be a 0-d integer counter",
  ),
  "int_weight": (
    _set("main.1.weight", np.ones(32, np.int64)),
    [],
    "tensor main.1.weight has dtype int64",
  ),
  "wrong_nz": (
    _checkpoint(),
    ["--nz=17"],
    r"--nz=17 but tensor main.0.weight has shape \[16, 32, 4, 4\]",
  ),
  "forbidden_global": (
    lambda p, tf: tf.torch_zip(
      {"netG_state_dict": {"main.0.weight": tf.Global("os", "system")}}, p
    ),
    [],
    "forbidden global os.system",
  ),
  "random_bytes": (
    lambda p, tf: p.write_bytes(np.random.default_rng(0).bytes(300)),
    [],
    "not a pickle, torch zip or legacy torch file",
  ),
  "text_file": (
    lambda p, tf: p.write_text("netG_state_dict main.0.weight\n"),
    [],
    "not a pickle, torch zip or legacy torch file",
  ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_checkpoints_exit_2_naming_the_problem(case, tmp_path, capsys, torch_files):
  write, flags, reason = BAD[case]
  src, dst = tmp_path / "weights.tar", tmp_path / "out"
  write(src, torch_files)
  capsys.readouterr()
  assert cli.main([f"--src={src}", f"--dst={dst}", *flags]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  assert "internal error" not in err, err
  assert re.search(reason, err), (reason, err)
  assert not os.path.lexists(dst) and sorted(os.listdir(tmp_path)) == ["weights.tar"]
