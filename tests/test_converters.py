"""The safe checkpoint reader and the `python -m converters` command line."""

import collections
import importlib
import os
import pickle
import pkgutil
import subprocess
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest

import converters
from conftest import FIXTURE_CHECKPOINTS
from panda_jax import generators
from converters import __main__ as cli
from converters import safe_pickle
from converters.errors import ConversionError

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
SG2_PKL = os.path.join(FIXTURES, "stylegan2", "network-snapshot.pkl")
SG3_PKL = os.path.join(FIXTURES, "stylegan3", "network-snapshot.pkl")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_TORCH = {"collections.OrderedDict", "torch.FloatStorage", "torch._utils._rebuild_tensor_v2"}
_NVIDIA = {
  "collections.OrderedDict",
  "numpy._core.multiarray.scalar",
  "numpy.dtype",
  "torch.FloatStorage",
  "torch._utils._rebuild_parameter",
  "torch._utils._rebuild_tensor_v2",
  "torch.storage._load_from_bytes",
  "torch_utils.persistence._reconstruct_persistent_obj",
}
_NUMPY_ARRAYS = {"numpy._core.multiarray._reconstruct", "numpy.ndarray"}


def _arrays(obj):
  if isinstance(obj, np.ndarray):
    yield obj
  elif isinstance(obj, safe_pickle.Record):
    yield from _arrays(obj.state)
  elif isinstance(obj, dict):
    for v in obj.values():
      yield from _arrays(v)


# Reference: torch.load(weights_only=True) of each file, float64 sums (torch 2.13).
@pytest.mark.parametrize(
  "path, n, size, total, total_abs",
  [
    ("biggan/pytorch_model.bin", 362, 124939, 20865.773298151667, 34099.66551844166),
    ("pggan/pggan.pth", 50, 557274, -1419.7389728224998, 444117.5700941336),
    ("stylegan/stylegan.pth", 130, 686298, -69269.88115653466, 10905136.776744561),
  ],
)
def test_torch_zip_fixtures_match_torch_load(path, n, size, total, total_abs):
  log = set()
  arrays = list(_arrays(safe_pickle.load(os.path.join(FIXTURES, path), log=log)))
  assert log == _TORCH
  assert len(arrays) == n and sum(a.size for a in arrays) == size
  assert all(a.dtype == np.float32 and a.flags.c_contiguous for a in arrays)
  np.testing.assert_allclose(sum(a.astype(np.float64).sum() for a in arrays), total, rtol=1e-9)
  np.testing.assert_allclose(
    sum(np.abs(a.astype(np.float64)).sum() for a in arrays), total_abs, rtol=1e-9
  )


@pytest.mark.parametrize("path, extra", [(SG2_PKL, set()), (SG3_PKL, _NUMPY_ARRAYS)])
def test_network_pickles_give_inert_records(path, extra):
  log = set()
  snap = safe_pickle.load(path, log=log)
  assert log == _NVIDIA | extra and log <= safe_pickle.ALLOWED
  assert sorted(snap) == ["D", "G", "G_ema", "augment_pipe", "training_set_kwargs"]
  g = snap["G_ema"]
  assert isinstance(g, safe_pickle.Record) and g.class_name == "Generator"
  assert "module_src" not in g.state
  assert g.state["_init_kwargs"]["z_dim"] == 64
  mapping = g.state["_modules"]["mapping"]
  assert mapping.state["_buffers"]["w_avg"].shape == (64,)
  # Weights differ between G and G_ema, as in real snapshots.
  assert not np.array_equal(
    mapping.state["_modules"]["fc0"].state["_parameters"]["weight"],
    snap["G"].state["_modules"]["mapping"].state["_modules"]["fc0"].state["_parameters"]["weight"],
  )


def test_network_pickle_filters_are_the_binomial_filter():
  """Closed form: StyleGAN2's buffers hold outer([1,3,3,1])^2 / 64."""
  syn = safe_pickle.load(SG2_PKL)["G_ema"].state["_modules"]["synthesis"]
  f = syn.state["_modules"]["b8"].state["_buffers"]["resample_filter"]
  np.testing.assert_array_equal(f, np.outer([1, 3, 3, 1], [1, 3, 3, 1]) / 64)


def _sample_tree(torch_files):
  storage = np.arange(12, dtype=np.float32)
  return collections.OrderedDict(
    f32=np.arange(6, dtype=np.float32).reshape(2, 3),
    i64=np.array([1, -2], np.int64),
    f16=np.full((2, 2), 0.5, np.float16),
    bf16=np.array([1.5, -2], ml_dtypes.bfloat16),
    flag=np.array([True, False]),
    scalar=np.float32(3.0),
    transposed=torch_files.Strided(storage, 0, (4, 3), (1, 4)),
    window=torch_files.Strided(storage, 5, (2, 2), (4, 1)),
    zero_d=torch_files.Strided(storage, 7, (), ()),
  )


_EXPECTED = dict(
  f32=np.arange(6, dtype=np.float32).reshape(2, 3),
  i64=np.array([1, -2]),
  f16=np.full((2, 2), 0.5, np.float16),
  bf16=np.array([1.5, -2], ml_dtypes.bfloat16),
  flag=np.array([True, False]),
  scalar=np.float32(3.0),
  transposed=np.arange(12, dtype=np.float32).reshape(3, 4).T,
  window=np.array([[5, 6], [9, 10]], np.float32),
  zero_d=np.array(7, np.float32),
)


def test_zero_d_tensors_stay_zero_d():
  """0-d tensors and arrays keep shape (): torch scalars (magnitude_ema, noise_strength,
  genforce's lod) and numpy 0-d arrays in pickles."""
  sg3 = safe_pickle.load(SG3_PKL)["G_ema"].state["_modules"]["synthesis"].state["_modules"]
  assert sg3["L0_36_64"].state["_buffers"]["magnitude_ema"].shape == ()
  sg2 = safe_pickle.load(SG2_PKL)["G_ema"].state["_modules"]["synthesis"].state["_modules"]
  assert sg2["b4"].state["_modules"]["conv1"].state["_parameters"]["noise_strength"].shape == ()
  pggan = safe_pickle.load(os.path.join(FIXTURES, "pggan", "pggan.pth"))
  assert pggan["generator_smooth"]["lod"].shape == ()
  out = safe_pickle.loads(pickle.dumps(np.array(2.5, ">f8")))
  assert out.shape == () and out.dtype == np.float64 and out == 2.5


@pytest.mark.parametrize("fmt", ["torch_zip", "torch_legacy", "network_pickle"])
def test_formats_round_trip_dtypes_and_strided_views(fmt, torch_files, tmp_path):
  path = tmp_path / "ckpt.whatever"  # The extension never matters.
  getattr(torch_files, fmt)(_sample_tree(torch_files), path)
  out = safe_pickle.load(path)
  assert list(out) == list(_EXPECTED)
  for k, v in _EXPECTED.items():
    assert np.asarray(out[k]).dtype == np.asarray(v).dtype, k
    assert np.shape(out[k]) == np.shape(v), k
    np.testing.assert_array_equal(out[k], v)


_MARKER = "pwned_marker"


class _Evil:
  def __init__(self, fn, args):
    self.fn, self.args = fn, args

  def __reduce__(self):
    return self.fn, self.args


def _evil_payloads(marker):
  import builtins  # pylint: disable=import-outside-toplevel

  return {
    "os.system": _Evil(os.system, (f"touch {marker}",)),
    "builtins.eval": _Evil(builtins.eval, (f"open({str(marker)!r}, 'w').close()",)),
    "subprocess.Popen": _Evil(subprocess.Popen, (["touch", str(marker)],)),
  }


@pytest.mark.parametrize("name", ["os.system", "builtins.eval", "subprocess.Popen"])
def test_payloads_are_live_under_plain_pickle(name, tmp_path):
  """Control for the test below: an ordinary unpickler runs these payloads."""
  marker = tmp_path / _MARKER
  result = pickle.loads(pickle.dumps(_evil_payloads(marker)[name]))
  if isinstance(result, subprocess.Popen):
    result.wait()
  assert marker.exists()


@pytest.mark.parametrize("name", ["os.system", "builtins.eval", "subprocess.Popen"])
@pytest.mark.parametrize("wrap", ["plain", "in_network_pickle", "in_torch_zip"])
def test_malicious_pickles_are_refused_before_running(name, wrap, torch_files, tmp_path, capsys):
  marker = tmp_path / _MARKER
  evil = _evil_payloads(marker)[name]
  path = tmp_path / "evil.pkl"
  if wrap == "plain":
    path.write_bytes(pickle.dumps({"G_ema": evil}))
  elif wrap == "in_network_pickle":  # A real snapshot with one poisoned attribute.
    snap = safe_pickle.load(SG2_PKL)
    g = snap["G_ema"]
    snap["G_ema"] = safe_pickle.Record(g.module, g.class_name, {**g.state, "hook": evil})
    torch_files.network_pickle(snap, path)
  else:
    data = pickle.dumps(collections.OrderedDict(w=evil), protocol=2)
    with zipfile.ZipFile(path, "w") as zf:
      zf.writestr("archive/data.pkl", data)
  module, attr = name.split(".")
  with pytest.raises(ConversionError, match=rf"forbidden global ({module}|posix)\.{attr}"):
    safe_pickle.load(path)
  code, err = _convert_cli([f"--src={path}", f"--dst={tmp_path / 'out'}"], capsys)
  assert code == 2 and "forbidden global" in err and err.count("\n") == 0
  assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.5, 0.99])
@pytest.mark.parametrize("src", [SG2_PKL, os.path.join(FIXTURES, "pggan", "pggan.pth")])
def test_truncated_files_are_refused(src, fraction, tmp_path):
  data = open(src, "rb").read()
  path = tmp_path / "cut"
  path.write_bytes(data[: int(len(data) * fraction)])
  with pytest.raises(ConversionError) as e:
    safe_pickle.load(path)
  assert "\n" not in str(e.value)


def test_truncated_nested_storage_is_refused(torch_files, tmp_path):
  path = tmp_path / "cut.pt"
  torch_files.torch_legacy({"w": np.ones(100, np.float32)}, path)
  path.write_bytes(path.read_bytes()[:-8])
  with pytest.raises(ConversionError, match="truncated"):
    safe_pickle.load(path)


@pytest.mark.parametrize(
  "content, match",
  [
    (b"", "not a pickle"),
    (b"hello world, not a checkpoint", "not a pickle"),
    (b"PK\x03\x04garbage", "truncated or corrupt"),
  ],
)
def test_unknown_bytes_are_refused(content, match, tmp_path):
  path = tmp_path / "x.pkl"
  path.write_bytes(content)
  with pytest.raises(ConversionError, match=match):
    safe_pickle.load(path)


def test_zip_without_data_pkl_is_refused(tmp_path):
  path = tmp_path / "x.zip"
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("readme.txt", "hello")
  with pytest.raises(ConversionError, match="data.pkl"):
    safe_pickle.load(path)


def test_caps_on_size_nesting_and_views(torch_files, tmp_path):
  with pytest.raises(ConversionError, match="larger than"):
    safe_pickle.load(SG2_PKL, max_bytes=1000)
  nested = []
  for _ in range(safe_pickle.MAX_DEPTH + 5):
    nested = [nested]
  with pytest.raises(ConversionError, match="nests"):
    safe_pickle.loads(pickle.dumps(nested))
  path = tmp_path / "view.pt"
  torch_files.torch_zip(
    {"w": torch_files.Strided(np.arange(4, dtype=np.float32), 2, (3,), (1,))}, path
  )
  with pytest.raises(ConversionError, match="past its storage"):
    safe_pickle.load(path)


def test_object_arrays_and_odd_dtypes_are_refused():
  with pytest.raises(ConversionError, match="dtype"):
    safe_pickle.loads(pickle.dumps(np.array([{"a": 1}], dtype=object)))
  np.testing.assert_array_equal(safe_pickle.loads(pickle.dumps(np.arange(3.0))), np.arange(3.0))


def _convert_cli(args, capsys):
  code = cli.main(args)
  captured = capsys.readouterr()
  return code, captured.err.strip()


def test_cli_converts_and_reconversion_is_byte_identical(tmp_path, capsys):
  dsts = [tmp_path / "a", tmp_path / "b"]
  for dst in dsts:
    assert _convert_cli([f"--src={SG2_PKL}", f"--dst={dst}"], capsys)[0] == 0

  def files(root):
    # orbax's own bookkeeping records wall-clock timestamps and the path.
    skip = {"_CHECKPOINT_METADATA", "commit_success.txt"}
    return {
      os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
      for d, _, fs in os.walk(root)
      for f in fs
      if f not in skip
    }

  a, b = files(dsts[0]), files(dsts[1])
  assert "config.json" in a and len(a) > 10
  assert a == b


def test_cli_failures_exit_2_with_one_line(tmp_path, capsys, torch_files):
  no_ema = tmp_path / "no_ema.pkl"
  snap = safe_pickle.load(SG2_PKL)
  del snap["G_ema"]
  torch_files.network_pickle(snap, no_ema)
  other = tmp_path / "other.pkl"
  other.write_bytes(pickle.dumps({"weights": [1.0, 2.0]}))
  (tmp_path / "existing").mkdir()
  (tmp_path / "existing" / "file").write_text("x")
  cases = [
    (no_ema, tmp_path / "o1", "no G_ema"),
    (other, tmp_path / "o2", "not a checkpoint of a supported kind"),
    (tmp_path / "missing.pkl", tmp_path / "o3", "does not exist"),
    (SG2_PKL, tmp_path / "existing", "not empty"),
  ]
  for src, dst, reason in cases:
    code, err = _convert_cli([f"--src={src}", f"--dst={dst}"], capsys)
    assert code == 2 and reason in err and err.count("\n") == 0, (src, err)
  assert sorted(os.listdir(tmp_path)) == ["existing", "no_ema.pkl", "other.pkl"]
  assert os.listdir(tmp_path / "existing") == ["file"]


def test_cli_process_exit_code(tmp_path):
  bad = tmp_path / "bad.pkl"
  bad.write_bytes(b"\x80\x04garbage")
  proc = subprocess.run(
    [sys.executable, "-m", "converters", f"--src={bad}", f"--dst={tmp_path / 'out'}"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert proc.returncode == 2
  assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1


def test_failed_write_leaves_no_destination(tmp_path, monkeypatch):
  from panda_jax.generators import base  # pylint: disable=import-outside-toplevel

  class Exploding:
    def save(self, path, args):
      os.makedirs(path)
      open(os.path.join(path, "half"), "w").close()
      raise OSError("disk full")

  monkeypatch.setattr(base, "_checkpointer", Exploding)
  with pytest.raises(OSError, match="disk full"):
    converters.convert_file(SG2_PKL, tmp_path / "out")
  assert os.listdir(tmp_path) == []


def test_every_format_module_is_listed():
  """`FORMATS` names exactly the modules defining sniff and convert (importing them
  all here: a module that fails to import fails this test)."""
  defined = set()
  for info in pkgutil.iter_modules(converters.__path__):
    module = importlib.import_module(f"converters.{info.name}")
    if hasattr(module, "sniff") and hasattr(module, "convert"):
      defined.add(info.name)
  assert set(converters.FORMATS) == defined == set(converters.formats())
  assert len(converters.FORMATS) == 5


# The biggan weights file alone must find its folder's config.json.
_CLI_SOURCES = {**FIXTURE_CHECKPOINTS, "biggan-weights": "biggan/pytorch_model.bin"}


@pytest.mark.parametrize("name", sorted(_CLI_SOURCES))
def test_cli_converts_every_fixture_format(name, converted):
  """`python -m converters` in a process of its own: exit 0, one line (the
  destination) on stdout, nothing on stderr; `generators.load` reads the result."""
  run = converted(_CLI_SOURCES[name])
  assert (run.returncode, run.stderr, run.stdout) == (0, "", f"{run.dst}\n")
  family = name.split("-")[0]
  gen = generators.load(run.dst)
  with np.load(os.path.join(FIXTURES, family, "io.npz")) as io:
    assert (gen.arch, gen.z_dim) == (family, io["z"].shape[1])
  # The fixture numbers themselves: test_<family>.py, on these same conversions.


def test_sniffers_are_exclusive_on_the_fixtures():
  for path in (SG2_PKL, SG3_PKL):
    source = converters.Source(path)
    claims = [name for name, m in converters.formats().items() if m.sniff(source)]
    assert len(claims) <= 1, (path, claims)
  assert converters.detect(converters.Source(SG2_PKL)).__name__ == "converters.stylegan2"
