"""Shared test helpers.

`torch_files`: writes checkpoints in PyTorch's and NVIDIA's formats without
torch (pure-Python pickler emitting the globals the real writers emit), so
tests can build modified or malicious checkpoints from the fixtures.

`converted` / `fixture_generator`: each fixture checkpoint converted by
`python -m converters` once per test session, and loaded by `generators.load`;
`gen` and `io`: those of the test module's `FAMILY` (e.g. `FAMILY = "pggan"`).

`assert_float64_runs_agree` / `to_float32`: the tolerance of comparisons between
two float64 runs of one iterated computation, derived from the same run in
float32 (one-shot formulas use the rounding bounds of tests/_bounds.py).
"""

import collections
from io import BytesIO
import os
import pickle
import struct
import subprocess
import sys
import types
import zipfile

import jax
import numpy as np
import pytest

from converters import safe_pickle
from panda_jax import generators

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The files with the longest total run time, longest first (summed from `--durations` of a
# clean CI run, session 7). The two xdist workers take whole files in collection order, so
# these go first and the many short files fill in behind them; a stale list only costs time.
SLOWEST_FILES = (
  "test_parallel.py",
  "test_functional_api.py",
  "test_fit.py",
  "test_explore_browser.py",
  "test_experiments_multiprocess.py",
  "test_generators_base.py",
  "test_experiments.py",
  "test_invert.py",
  "test_stylegan_v1.py",
  "test_toyfaces.py",
  "test_benchmark.py",
  "test_generator_benchmark.py",
  "test_parts_init.py",
  "test_refine_unaligned.py",
  "test_refine.py",
  "test_evaluate.py",
)


def pytest_collection_modifyitems(items: list) -> None:
  """Slowest files first (`SLOWEST_FILES`), the others after them in their own order."""
  rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


FIXTURES = os.path.join(ROOT, "tests", "fixtures")
# Each family's fixture checkpoint, as users download it (fixtures/README.md).
FIXTURE_CHECKPOINTS = {
  "stylegan2": "stylegan2/network-snapshot.pkl",
  "stylegan3": "stylegan3/network-snapshot.pkl",
  "biggan": "biggan",  # The pytorch-pretrained-biggan folder.
  "pggan": "pggan/pggan.pth",
  "stylegan": "stylegan/stylegan.pth",
}


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
  """`converted(src)`: `python -m converters --src=fixtures/src --dst=...`, run
  once per session; a namespace of `dst`, `returncode`, `stdout`, `stderr`."""
  runs = {}

  def run(src: str):
    if src not in runs:
      dst = tmp_path_factory.mktemp("converted") / "out"
      proc = subprocess.run(
        [
          sys.executable,
          "-m",
          "converters",
          f"--src={os.path.join(FIXTURES, src)}",
          f"--dst={dst}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
      )
      runs[src] = types.SimpleNamespace(
        dst=dst, returncode=proc.returncode, stdout=proc.stdout, stderr=proc.stderr
      )
    return runs[src]

  return run


@pytest.fixture(scope="session")
def fixture_generator(converted):
  """`fixture_generator(family)`: the family's fixture checkpoint, converted by
  the command line (`converted`) and loaded once per session."""
  loaded = {}

  def load(family: str):
    if family not in loaded:
      run = converted(FIXTURE_CHECKPOINTS[family])
      assert run.returncode == 0, run.stderr
      loaded[family] = generators.load(run.dst)
    return loaded[family]

  return load


_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_NAMES = {np.dtype(v).name: k for k, v in safe_pickle._STORAGE_DTYPES.items()}


class Global:
  """A reference to `module.name`, pickled as a GLOBAL opcode without importing it."""

  def __init__(self, module, name):
    self.module, self.name = module, name

  def __call__(self, *args):  # pickle requires reduce functions to be callable.
    raise AssertionError("never called")


class Strided:
  """A tensor that is a strided view of `storage` (a 1-D array)."""

  def __init__(self, storage, offset, shape, stride):
    self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride


class _Storage:
  def __init__(self, array):
    self.array = np.ascontiguousarray(array).reshape(-1)


class _Writer(pickle._Pickler):  # pylint: disable=protected-access
  dispatch = dict(pickle._Pickler.dispatch)  # pylint: disable=protected-access

  def __init__(self, f, mode, numpy_module="numpy._core.multiarray"):
    # torch.save uses protocol 2, NVIDIA's training loop pickle's default (4).
    super().__init__(f, protocol=4 if mode == "nvidia" else 2)
    self.mode, self.numpy_module = mode, numpy_module
    self.storages = {}  # id -> (key, _Storage)

  def _global(self, obj):
    self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())

  dispatch[Global] = _global

  def _storage(self, array):
    st = _Storage(array)
    self.storages[id(st)] = (str(len(self.storages)), st)
    return st

  def reducer_override(self, obj):
    if isinstance(obj, safe_pickle.Record):
      meta = dict(
        type="class", version=6, module_src="# omitted", class_name=obj.class_name, state=obj.state
      )
      return Global("torch_utils.persistence", "_reconstruct_persistent_obj"), (meta,)
    if isinstance(obj, np.ndarray):
      obj = Strided(
        obj.reshape(-1),
        0,
        obj.shape,
        tuple(int(s) for s in np.cumprod((obj.shape + (1,))[:0:-1])[::-1]),
      )
    if isinstance(obj, Strided):
      st = self._storage(obj.storage)
      args = (st, obj.offset, tuple(obj.shape), tuple(obj.stride), False, collections.OrderedDict())
      return Global("torch._utils", "_rebuild_tensor_v2"), args
    if isinstance(obj, _Storage) and self.mode == "nvidia":
      return Global("torch.storage", "_load_from_bytes"), (legacy_bytes(obj),)
    if isinstance(obj, np.generic):
      return Global(self.numpy_module, "scalar"), (obj.dtype, obj.tobytes())
    return NotImplemented

  def persistent_id(self, obj):
    if not isinstance(obj, _Storage) or self.mode == "nvidia":
      return None
    key = self.storages[id(obj)][0]
    stype = Global("torch", _STORAGE_NAMES[obj.array.dtype.name])
    pid = ("storage", stype, key, "cpu", obj.array.size)
    return pid + (None,) if self.mode == "legacy" else pid


def _dumps(obj, mode, **kw):
  f = BytesIO()
  w = _Writer(f, mode, **kw)
  w.dump(obj)
  return f.getvalue(), [st for _, st in w.storages.values()]


def legacy_bytes(obj) -> bytes:
  """A legacy `torch.save` file of `obj` (a storage, or a tree of arrays)."""
  f = BytesIO()
  for header in (
    _MAGIC,
    1001,
    dict(protocol_version=1001, little_endian=True, type_sizes=dict(short=2, int=4, long=4)),
  ):
    pickle.dump(header, f, protocol=2)
  w = _Writer(f, "legacy")
  if isinstance(obj, _Storage):
    w.storages[id(obj)] = ("0", obj)
  w.dump(obj)
  storages = [st for _, st in w.storages.values()]
  pickle.dump([k for k, _ in w.storages.values()], f, protocol=2)
  for st in storages:
    f.write(struct.pack("<q", st.array.size) + st.array.tobytes())
  return f.getvalue()


def write_network_pickle(obj, path, numpy_module="numpy._core.multiarray"):
  """An NVIDIA network pickle (Records = persistent objects, tensors via legacy bytes)."""
  data, _ = _dumps(obj, "nvidia", numpy_module=numpy_module)
  with open(path, "wb") as f:
    f.write(data)


def write_torch_zip(obj, path, root="archive"):
  data, storages = _dumps(obj, "zip")
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
    zf.writestr(f"{root}/data.pkl", data)
    zf.writestr(f"{root}/byteorder", "little")
    zf.writestr(f"{root}/version", "3\n")
    for i, st in enumerate(storages):
      zf.writestr(f"{root}/data/{i}", st.array.tobytes())


def write_torch_legacy(obj, path):
  with open(path, "wb") as f:
    f.write(legacy_bytes(obj))


@pytest.fixture(scope="module")
def gen(request, fixture_generator):
  """The converted fixture generator of the test module's `FAMILY`."""
  return fixture_generator(request.module.FAMILY)


@pytest.fixture(scope="module")
def io(request):
  """The fixture arrays (`io.npz`, NCHW) of the test module's `FAMILY`."""
  with np.load(os.path.join(FIXTURES, request.module.FAMILY, "io.npz")) as f:
    return dict(f)


@pytest.fixture
def torch_files():
  """Writers for PyTorch/NVIDIA checkpoint formats (no torch needed)."""
  return types.SimpleNamespace(
    Global=Global,
    Strided=Strided,
    network_pickle=write_network_pickle,
    torch_zip=write_torch_zip,
    torch_legacy=write_torch_legacy,
  )


def assert_float64_runs_agree(actual, expected, float32, what=""):
  """Two float64 runs of one exact computation agree beyond float32 rounding.

  `actual` and `expected` are float64 results that are equal in exact arithmetic
  (they differ in summation order, formula or code path); `float32` is one of
  the two computations run from the same inputs rounded to float32. Each run is the exact
  result plus its rounding errors carried through the computation: about k u for
  an amplification k that depends on the computation, not on the precision, so
  about k 2^-53 for the float64 pair and k 2^-24 for the float32 run, 2^29 = 5.4e8
  times more. The tolerance is therefore max |float32 - expected| (per array):
  exceeded only if `actual` differs from `expected` by more than float32 rounding
  moves it, i.e. if they are not the same computation. This holds for iterations
  whose amplification (line searches, Adam, k-means) has no usable closed form.
  """
  actual, expected, float32 = (np.asarray(x, np.float64) for x in (actual, expected, float32))
  assert actual.shape == expected.shape == float32.shape, (actual.shape, expected.shape)
  error, bound = np.max(np.abs(actual - expected)), np.max(np.abs(float32 - expected))
  assert error <= bound, f"{what}: float64 runs differ by {error:.3g} > float32 effect {bound:.3g}"


def to_float32(tree):
  """The float64 leaves of a pytree rounded to float32 (the inputs of a float32 run)."""
  return jax.tree.map(lambda x: x.astype(np.float32) if x.dtype == np.float64 else x, tree)
