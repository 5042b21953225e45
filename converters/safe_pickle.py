"""Reads PyTorch and NVIDIA checkpoints without torch and without executing them.

Three formats, told apart by their first bytes (never by the file extension):

* torch zip archives (torch >= 1.6 `torch.save`): `<root>/data.pkl` whose
  persistent ids `('storage', type, key, location, numel)` name raw storages
  `<root>/data/<key>`;
* legacy torch files (`_use_new_zipfile_serialization=False`): pickles of the
  magic number, protocol version and sys info, then the object (persistent ids
  `('storage', type, key, location, numel, view)`), then the list of storage
  keys, then per key an int64 element count and the raw bytes;
* plain pickles, e.g. NVIDIA network pickles (stylegan2-ada-pytorch,
  stylegan3): persistent classes reduce to
  `torch_utils.persistence._reconstruct_persistent_obj(meta)` and storages to
  `torch.storage._load_from_bytes(<a legacy torch file>)`.

The unpickler's `find_class` resolves only the allowlist `ALLOWED` to inert
stand-ins written here; every other global (`os.system`, `builtins.eval`,
`subprocess.Popen`, the classes of the pickle itself...) raises
`ConversionError` before anything is called. NVIDIA persistent objects become
`Record`s and their embedded source `module_src` is dropped, never executed.
The stand-ins refuse pickle's BUILD (`__setstate__`) unless it is their
format's, so a file cannot re-shape a tensor after its checks nor alter the
reader for later files; a file's tensors may not expand to more than twice
the bytes it stores (`_Budget`), and shared objects stay shared (no
"billion laughs" blow-up); zip members must be stored uncompressed, as torch
writes them (no zip bombs).
Tensors come out as C-contiguous numpy arrays in native byte order (bfloat16 as
`ml_dtypes.bfloat16`); containers as dicts, lists, tuples and sets.
"""

from __future__ import annotations

import _compat_pickle
import dataclasses
import io
import math
import os
import pickle
import re
import struct
import types
import zipfile
from collections import OrderedDict
from typing import Any, Callable

import ml_dtypes
import numpy as np

from converters.errors import ConversionError

MAX_FILE_BYTES = 16 * 2**30  # Larger than any published generator checkpoint.
MAX_DEPTH = 64  # Nesting of containers in a checkpoint (real ones: < 20).
MAX_PICKLE_BYTES = 2**30  # A torch archive's data.pkl (real ones: a few MB).
_SLACK_BYTES = 2**26  # Tensors may hold 2 x the stored bytes plus this.

_TORCH_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PREFIX = b"\x80\x02\x8a\x0a" + _TORCH_MAGIC.to_bytes(10, "little")
_LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES = {
  "DoubleStorage": np.float64,
  "FloatStorage": np.float32,
  "HalfStorage": np.float16,
  "BFloat16Storage": ml_dtypes.bfloat16,
  "LongStorage": np.int64,
  "IntStorage": np.int32,
  "ShortStorage": np.int16,
  "CharStorage": np.int8,
  "ByteStorage": np.uint8,
  "BoolStorage": np.bool_,
  "ComplexFloatStorage": np.complex64,
  "ComplexDoubleStorage": np.complex128,
}
_NUMPY_DTYPE = re.compile(r"^[<>|=]?(\?|b1|[iu][1248]|f[248]|c(8|16))$")


@dataclasses.dataclass(frozen=True)
class Record:
  """An inert stand-in for an object the pickle would have constructed.

  For NVIDIA persistent objects `module` is `"torch_utils.persistence"`,
  `class_name` the class (`"Generator"`, `"SynthesisLayer"`...) and `state`
  the module's `__dict__` (`_parameters`, `_buffers`, `_modules`, plain
  attributes such as `_init_kwargs`), with tensors as numpy arrays.
  """

  module: str
  class_name: str
  state: Any


class _NoBuild:
  """Refuses pickle's BUILD opcode (which would set attributes after the checks)."""

  __slots__ = ()

  def __setstate__(self, state):
    raise ConversionError(f"pickle tries to set the state of a {type(self).__name__.strip('_')}")


class _Global(_NoBuild):
  """An allowlisted function, fresh per load: BUILD cannot change its defaults."""

  __slots__ = ("fn",)

  def __init__(self, fn: Callable):
    self.fn = fn

  def __call__(self, *args, **kwargs):
    return self.fn(*args, **kwargs)


class _StorageType(_NoBuild):
  __slots__ = ("dtype",)

  def __init__(self, dtype):
    self.dtype = np.dtype(dtype)


class _Budget:
  """Bytes that a file's tensors may still materialise (2 x stored + slack)."""

  def __init__(self):
    self.left = _SLACK_BYTES

  def stored(self, nbytes: int) -> None:
    self.left += 2 * nbytes

  def take(self, nbytes: int, what: str) -> None:
    if nbytes > self.left:
      raise ConversionError(
        f"{what} would expand to {nbytes} bytes, more than the file stores "
        "(overlapping views or a decompression bomb?)"
      )
    self.left -= nbytes


class _Storage(_NoBuild):
  """A typed storage: `numel` elements of `dtype`, bytes filled in when read."""

  __slots__ = ("dtype", "numel", "array")

  def __init__(self, dtype, numel: int):
    self.dtype = np.dtype(dtype)
    self.numel = _check_int(numel, "storage size")
    self.array: np.ndarray | None = None

  def fill(self, data: bytes, big_endian: bool = False) -> None:
    if len(data) != self.numel * self.dtype.itemsize:
      raise ConversionError(
        f"storage holds {len(data)} bytes, expected {self.numel} x {self.dtype.itemsize}"
      )
    dtype = self.dtype.newbyteorder(">") if big_endian else self.dtype
    self.array = np.frombuffer(data, dtype).astype(self.dtype)


class _Tensor(_NoBuild):
  """A strided view of a storage, materialised once all storages are read."""

  __slots__ = ("storage", "offset", "size", "stride")

  def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

  def materialise(self, budget: _Budget) -> np.ndarray:
    st = self.storage
    if st.array is None:
      raise ConversionError("a tensor refers to a storage that the file never stores")
    budget.take(math.prod(self.size) * st.dtype.itemsize, f"tensor of size {self.size}")
    if any(n == 0 for n in self.size):
      return np.zeros(self.size, st.dtype)
    last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
    if last >= st.numel:
      raise ConversionError(
        f"tensor of size {self.size} reads past its storage of {st.numel} elements"
      )
    item = st.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
      st.array[self.offset :],
      shape=self.size,
      strides=[s * item for s in self.stride],
      writeable=False,
    )
    return view.copy()  # C order; unlike `np.ascontiguousarray`, keeps 0-d as 0-d.


class _ArrayBuilder:
  """`numpy.core.multiarray._reconstruct` stand-in; `__setstate__` gets the data."""

  __slots__ = ("array",)

  def __init__(self):
    self.array: np.ndarray | None = None

  def __setstate__(self, state):
    if not (isinstance(state, tuple) and len(state) == 5):
      raise ConversionError("malformed numpy array in pickle")
    _, shape, dtype, fortran, data = state
    if not isinstance(dtype, _DType) or not isinstance(data, bytes):
      raise ConversionError("numpy arrays of objects are not allowed")
    dtype = dtype.dtype
    shape = tuple(_check_int(n, "array shape") for n in shape)
    if len(data) != math.prod(shape) * dtype.itemsize:
      raise ConversionError("numpy array data does not match its shape")
    arr = np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C")
    self.array = arr.astype(dtype.newbyteorder("="), order="C")  # A copy; 0-d stays 0-d.


class _EasyDict(dict):
  """`dnnlib.util.EasyDict` stand-in (a plain dict; attributes are ignored)."""

  def __setstate__(self, state):
    if state:
      raise ConversionError("unexpected attribute state on an EasyDict")


_NDARRAY = object()  # `numpy.ndarray`: only usable as `_reconstruct`'s argument.


def _check_int(x, what: str) -> int:
  if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < 0:
    raise ConversionError(f"invalid {what}: {x!r}")
  return int(x)


def _rebuild_tensor(
  storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
) -> _Tensor:
  del requires_grad, backward_hooks, metadata  # Training-time details.
  if not isinstance(storage, _Storage):
    raise ConversionError("a tensor is rebuilt from something that is not a storage")
  size = tuple(_check_int(n, "tensor size") for n in size)
  stride = tuple(_check_int(s, "tensor stride") for s in stride)
  if len(size) != len(stride):
    raise ConversionError("tensor size and stride differ in length")
  return _Tensor(storage, _check_int(offset, "storage offset"), size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  del requires_grad, backward_hooks, state
  if not isinstance(data, _Tensor):
    raise ConversionError("a parameter is rebuilt from something that is not a tensor")
  return data


def _reconstruct_persistent_obj(meta) -> Record:
  if not (
    isinstance(meta, dict)
    and meta.get("type") == "class"
    and isinstance(meta.get("class_name"), str)
  ):
    raise ConversionError("malformed persistent object (expected type='class')")
  state = meta.get("state")
  if not isinstance(state, dict):
    raise ConversionError(f"persistent object {meta['class_name']} has no state dict")
  return Record("torch_utils.persistence", meta["class_name"], state)


class _DType:
  """`numpy.dtype` stand-in; pickle's BUILD passes the byte order to `__setstate__`."""

  def __init__(self, spec, align=False, copy=False):
    del align, copy
    if not (isinstance(spec, str) and _NUMPY_DTYPE.match(spec)):
      raise ConversionError(f"numpy dtype {spec!r} is not allowed (numbers only)")
    self.dtype = np.dtype(spec)

  def __setstate__(self, state):
    # numpy's dtype state: (version, byteorder, subarray, names, fields, ...).
    if not (
      isinstance(state, tuple)
      and len(state) >= 5
      and state[1] in ("<", ">", "=", "|")
      and state[2:5] == (None, None, None)
    ):
      raise ConversionError("numpy dtype state of a structured or odd dtype")
    if state[1] in ("<", ">"):
      self.dtype = self.dtype.newbyteorder(state[1])


def _numpy_scalar(dtype, data=None):
  if (
    not isinstance(dtype, _DType)
    or not isinstance(data, bytes)
    or (len(data) != dtype.dtype.itemsize)
  ):
    raise ConversionError("malformed numpy scalar in pickle")
  return np.frombuffer(data, dtype.dtype)[0].astype(dtype.dtype.newbyteorder("="))


def _codecs_encode(text, encoding="utf-8"):
  """How protocol-2 pickles store bytes: `_codecs.encode(str, "latin1")`."""
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise ConversionError("_codecs.encode is only allowed for latin1 bytes")
  return text.encode("latin1")


def _numpy_reconstruct(cls, shape, dtype_code) -> _ArrayBuilder:
  del shape, dtype_code  # The shape comes with `__setstate__`.
  if cls is not _NDARRAY:
    raise ConversionError("numpy reconstruction of a non-ndarray class")
  return _ArrayBuilder()


def _allowlist(load_from_bytes: Callable | None) -> dict[tuple[str, str], Any]:
  allowed: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("_codecs", "encode"): _codecs_encode,
    ("torch", "Size"): tuple,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("numpy", "dtype"): _DType,
    ("numpy", "ndarray"): _NDARRAY,
  }
  for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    allowed[(mod, "scalar")] = _numpy_scalar
    allowed[(mod, "_reconstruct")] = _numpy_reconstruct
  for name, dtype in _STORAGE_DTYPES.items():
    allowed[("torch", name)] = _StorageType(np.dtype(dtype))
    allowed[("torch.cuda", name)] = _StorageType(np.dtype(dtype))
  if load_from_bytes is not None:
    allowed[("torch.storage", "_load_from_bytes")] = load_from_bytes
  return {
    k: _Global(v) if isinstance(v, types.FunctionType | types.MethodType) else v
    for k, v in allowed.items()
  }


# Every global any supported format may name (frozen by the tests).
ALLOWED = frozenset(f"{m}.{n}" for m, n in _allowlist(lambda b: b))


class _Unpickler(pickle.Unpickler):
  """Resolves globals through the allowlist only; storages through a callback."""

  def __init__(self, data, allowed, persistent: Callable | None, log: set | None):
    super().__init__(data)
    self._allowed = allowed
    self._persistent = persistent
    self._log = log

  def find_class(self, module, name):
    # Python 2 names (protocol < 3), mapped as pickle's own `fix_imports` does.
    if (module, name) in _compat_pickle.NAME_MAPPING:
      module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    key = (module, name)
    if key not in self._allowed:
      raise ConversionError(
        f"forbidden global {module}.{name} in pickle (only tensors and network "
        "records are allowed; nothing was executed)"
      )
    if self._log is not None:
      self._log.add(f"{module}.{name}")
    return self._allowed[key]

  def persistent_load(self, pid):
    if self._persistent is None:
      raise ConversionError("unexpected persistent id in a plain pickle")
    return self._persistent(pid)


def _storage_pid(pid, n_fields: int) -> tuple[_StorageType, str, int, Any]:
  if not (isinstance(pid, tuple) and len(pid) == n_fields and pid[0] in ("storage", b"storage")):
    raise ConversionError(f"unsupported persistent id in torch file: {pid!r:.80}")
  stype, key, _, numel = pid[1:5]
  if not isinstance(stype, _StorageType):
    raise ConversionError("persistent storage id without a storage type")
  return stype, str(key), _check_int(numel, "storage size"), pid[5:]


class _Reader:
  """One load: the allowlist in use, the storages met, a log of the globals."""

  def __init__(self, log: set | None, max_bytes: int = MAX_FILE_BYTES):
    self.log = log
    self.max_bytes = max_bytes
    self.budget = _Budget()

  def unpickle(self, f, persistent=None, nvidia=False):
    allowed = _allowlist(self.load_from_bytes if nvidia else None)
    return _Unpickler(f, allowed, persistent, self.log).load()

  def load_from_bytes(self, data) -> _Storage:
    """`torch.storage._load_from_bytes`: a nested legacy file holding one storage."""
    if not isinstance(data, bytes):
      raise ConversionError("_load_from_bytes of something that is not bytes")
    storage = self.legacy(data)
    if not isinstance(storage, _Storage):
      raise ConversionError("_load_from_bytes did not hold a storage")
    return storage

  def legacy(self, data: bytes):
    f = io.BytesIO(data)
    if self.unpickle(f) != _TORCH_MAGIC:
      raise ConversionError("bad magic number in legacy torch file")
    if self.unpickle(f) != _LEGACY_PROTOCOL:
      raise ConversionError("unsupported legacy torch protocol version")
    sys_info = self.unpickle(f)
    big_endian = isinstance(sys_info, dict) and sys_info.get("little_endian") is False
    storages: dict[str, _Storage] = {}

    def persistent(pid):
      stype, key, numel, (view,) = _storage_pid(pid, 6)
      if view is not None:
        raise ConversionError("storage views in legacy torch files are not supported")
      if key not in storages:
        storages[key] = _Storage(stype.dtype, numel)
      return storages[key]

    result = self.unpickle(f, persistent)
    keys = self.unpickle(f)
    if not isinstance(keys, list):
      raise ConversionError("malformed storage key list in legacy torch file")
    for key in keys:
      st = storages.get(str(key))
      if st is None:
        raise ConversionError(f"legacy torch file stores unknown storage {key!r}")
      header = f.read(8)
      if len(header) != 8:
        raise ConversionError("truncated legacy torch file")
      (numel,) = struct.unpack(">q" if big_endian else "<q", header)
      nbytes = numel * st.dtype.itemsize
      if numel != st.numel or nbytes > len(data) - f.tell():
        raise ConversionError("truncated or inconsistent storage in legacy torch file")
      st.fill(f.read(nbytes), big_endian)
      self.budget.stored(nbytes)
    return result

  def zip(self, path: str):
    with zipfile.ZipFile(path) as zf:
      # torch stores members uncompressed: more bytes than the archive is a bomb.
      declared = sum(info.file_size for info in zf.infolist())
      if declared > os.path.getsize(path):
        raise ConversionError(
          f"zip members declare {declared} bytes, more than the archive holds: "
          "compressed (zip bomb?); torch archives are stored uncompressed"
        )
      roots = [
        n[: -len("data.pkl")] for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1
      ]
      if len(roots) != 1:
        raise ConversionError(
          "zip archive without a single <root>/data.pkl: not a torch checkpoint"
        )
      root = roots[0]
      names = set(zf.namelist())
      big_endian = f"{root}byteorder" in names and zf.read(f"{root}byteorder").strip() == b"big"
      storages: dict[str, _Storage] = {}

      def persistent(pid):
        stype, key, numel, _ = _storage_pid(pid, 5)
        if key not in storages:
          name = f"{root}data/{key}"
          if name not in names:
            raise ConversionError(f"torch archive lacks storage {name}")
          if zf.getinfo(name).file_size != numel * stype.dtype.itemsize:
            raise ConversionError(f"storage {name} has the wrong size")
          st = _Storage(stype.dtype, numel)
          st.fill(zf.read(name), big_endian)
          self.budget.stored(len(st.array) * st.dtype.itemsize)
          storages[key] = st
        return storages[key]

      limit = min(self.max_bytes, MAX_PICKLE_BYTES)
      if zf.getinfo(f"{root}data.pkl").file_size > limit:
        raise ConversionError(f"data.pkl is larger than {limit} bytes")
      with zf.open(f"{root}data.pkl") as f:
        return self.unpickle(io.BytesIO(f.read()), persistent)


def _finish(obj, budget: _Budget, done: dict | None = None, depth: int = 0):
  """Replaces the stand-ins by numpy arrays and plain containers.

  An object the pickle shares (memo references) is finished once and stays
  shared, so the work is linear in the size of the file.
  """
  if done is None:
    done = {}
  if id(obj) not in done:
    done[id(obj)] = (obj, _finish_one(obj, budget, done, depth))
  return done[id(obj)][1]  # The key object is kept alive: ids stay unique.


def _finish_one(obj, budget: _Budget, done: dict, depth: int):
  if depth > MAX_DEPTH:
    raise ConversionError(f"checkpoint nests deeper than {MAX_DEPTH} levels")
  rec = lambda x: _finish(x, budget, done, depth + 1)
  if isinstance(obj, _Tensor):
    return obj.materialise(budget)
  if isinstance(obj, _DType):
    return obj.dtype
  if isinstance(obj, _ArrayBuilder):
    if obj.array is None:
      raise ConversionError("numpy array without data in pickle")
    return obj.array
  if isinstance(obj, Record):
    if not (isinstance(obj.class_name, str) and isinstance(obj.state, dict)):
      raise ConversionError("malformed persistent object (state altered after creation)")
    state = {k: v for k, v in obj.state.items() if k != "module_src"}
    return Record(obj.module, obj.class_name, rec(state))
  if isinstance(obj, dict):
    return {rec(k): rec(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return [rec(v) for v in obj]
  if isinstance(obj, tuple):
    return tuple(rec(v) for v in obj)
  if isinstance(obj, (set, frozenset)):
    return frozenset(rec(v) for v in obj)
  if isinstance(obj, (_Storage, _StorageType)) or obj is _NDARRAY or callable(obj):
    raise ConversionError(f"unexpected {type(obj).__name__} object in checkpoint")
  return obj


def loads(data: bytes, *, log: set | None = None) -> Any:
  """Reads a plain/NVIDIA pickle or a legacy torch file from bytes (see `load`)."""
  return _read(data, None, log)


def load(
  path: str | os.PathLike, *, max_bytes: int = MAX_FILE_BYTES, log: set | None = None
) -> Any:
  """Reads a torch zip, legacy torch file or (NVIDIA) pickle without executing it.

  Args:
    path: the file; its format is told by its first bytes.
    max_bytes: larger files are refused.
    log: when given, receives `"module.name"` of every global the file uses.

  Returns:
    The unpickled object: dicts/lists/tuples/frozensets of numbers, strings,
    numpy arrays and `Record`s.

  Raises:
    ConversionError: unknown format, forbidden global, truncated or malformed file.
  """
  path = os.fspath(path)
  try:
    if not os.path.isfile(path):  # Not /dev/zero, a FIFO, a folder...
      raise ConversionError(f"{path} is not a regular file")
    size = os.path.getsize(path)
    if size > max_bytes:
      raise ConversionError(f"{path} is larger than {max_bytes} bytes")
    with open(path, "rb") as f:
      head = f.read(4)
      if head == b"PK\x03\x04":
        return _read(None, path, log, max_bytes)
      f.seek(0)
      data = f.read()
  except OSError as e:
    raise ConversionError(f"cannot read {path}: {e.strerror or e}") from None
  return _read(data, path, log)


def _read(data: bytes | None, path: str | None, log: set | None, max_bytes: int = MAX_FILE_BYTES):
  where = f"{path}: " if path else ""
  reader = _Reader(log, max_bytes)
  try:
    if data is None:
      obj = reader.zip(path)
    elif data.startswith(_LEGACY_PREFIX):
      obj = reader.legacy(data)
    elif len(data) > 262 and data[257:262] == b"ustar":
      raise ConversionError("tar-format torch file (torch < 0.4) is not supported")
    elif data[:1] == b"\x80":
      obj = reader.unpickle(io.BytesIO(data), nvidia=True)
    else:
      raise ConversionError(
        f"not a pickle, torch zip or legacy torch file (starts with {data[:8]!r})"
      )
    return _finish(obj, reader.budget)
  except ConversionError as e:
    raise ConversionError(f"{where}{e}") from None
  except (EOFError, zipfile.BadZipFile) as e:
    raise ConversionError(f"{where}truncated or corrupt file ({e})") from None
  except RecursionError:
    raise ConversionError(f"{where}pickle nests too deeply") from None
  except MemoryError:  # The C unpickler allocates a declared length before reading it.
    raise ConversionError(
      f"{where}malformed checkpoint: declares an object larger than memory"
    ) from None
  except Exception as e:  # pylint: disable=broad-except
    # Only our stand-ins and the pickle machinery ran: any other failure means
    # a malformed file, reported in one line.
    raise ConversionError(f"{where}malformed checkpoint ({type(e).__name__}: {e})") from None
