"""Hostile checkpoints (issue 10, part 1): every converter path refuses them safely.

The corpus is written at test time into `tests/hostile/corpus/` (git-ignored;
see `tests/hostile/README.md`): pickles and torch archives that would run code,
resource bombs, truncated and bit-flipped copies of every fixture, wrong magic
numbers, absurd BigGAN configs. Each file goes through `python -m converters`
(`converters.__main__.main`) in one worker process whose address space is
capped (`RLIMIT_AS`), once as `--src=FILE` and, for weights, once as the
`pytorch_model.bin` of a BigGAN folder. The contract, per case: exit code 2,
one line `error: <reason>` matching the case's expected reason, nothing at
`--dst`, no canary file (which every payload would create), a peak resident
memory below 1 GiB and under a minute (`MAX_SECONDS`). A hypothesis fuzz test mutates the
fixture checkpoints and asserts the same contract, or else a successful
conversion that `generators.load` reads (a pickle has no checksum: a flipped
weight byte is a valid checkpoint with other weights).
`PANDA_FUZZ_EXAMPLES=N` runs N fuzz examples instead of the default few.
"""

import json
import os
import pickle
import re
import select
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib

import hypothesis
from hypothesis import strategies as st
import numpy as np
import pytest

from conftest import (
  FIXTURE_CHECKPOINTS,
  FIXTURES,
  ROOT,
  Global,
  Strided,
  legacy_bytes,
  write_network_pickle,
  write_torch_legacy,
  write_torch_zip,
)
from converters import safe_pickle
from panda_jax import generators

CORPUS = os.path.join(ROOT, "tests", "hostile", "corpus")
CANARY = os.path.join(CORPUS, "CANARY")
MAX_RSS = 2**30  # Peak resident memory of the worker, per case.
# Against bombs that are not refused (a decompression or allocation bomb runs for minutes
# or into the memory cap), not a speed target: a refusal takes milliseconds, but the
# worker's first case pays the converters' lazy imports (5.05 s once on a loaded 2-core CI).
MAX_SECONDS = 60.0
_ADDRESS_SPACE = 4 * 2**30  # Hard cap of the worker (XLA needs > 1 GiB of address space).

_WORKER = f"""
import contextlib, io, json, re, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, ({_ADDRESS_SPACE}, {_ADDRESS_SPACE}))
from converters import __main__ as cli

def peak():
  return 1024 * int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read())[1])

for line in sys.stdin:
  src, dst = json.loads(line)
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # Resets the peak resident set size (VmHWM).
  err, start = io.StringIO(), time.perf_counter()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    rc = cli.main(["--src=" + src, "--dst=" + dst])
  print(json.dumps(dict(rc=rc, stderr=err.getvalue(), seconds=time.perf_counter() - start,
                        peak=peak())), flush=True)
"""


class _Worker:
  """One `python -m converters`-equivalent process, fed one case per line."""

  def __init__(self):
    self.proc = subprocess.Popen(
      [sys.executable, "-c", _WORKER],
      cwd=ROOT,
      text=True,
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
    )

  def run(self, src: str, dst: str, timeout: float = 60.0) -> dict:
    self.proc.stdin.write(json.dumps([src, dst]) + "\n")
    self.proc.stdin.flush()
    ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
    if not ready:
      self.proc.kill()
      raise AssertionError(f"converter still running after {timeout} s on {src}")
    line = self.proc.stdout.readline()
    assert line, f"converter process died on {src} (exit {self.proc.wait()})"
    return json.loads(line)

  def close(self):
    self.proc.stdin.close()
    self.proc.wait(timeout=30)


# ---------------------------------------------------------------------------
# Building blocks of the corpus.


class _Call:
  """Pickles as `fn(*args)` (REDUCE), optionally followed by BUILD of `state`."""

  def __init__(self, fn, *args, state=None):
    self.fn, self.args, self.state = fn, args, state

  def __call__(self, *args):  # pickle wants reduce functions callable.
    raise AssertionError("never called")

  def __reduce__(self):
    return (self.fn, self.args) if self.state is None else (self.fn, self.args, self.state)


def _v(value) -> bytes:
  """The opcodes that push `value` (a protocol-2 pickle without header and STOP)."""
  return pickle.dumps(value, protocol=2)[2:-1]


def _g(module: str, name: str) -> bytes:
  return b"c" + f"{module}\n{name}\n".encode()


def _storage_pid(numel: int, key: str = "0") -> bytes:
  """A torch-zip persistent id `('storage', FloatStorage, key, 'cpu', numel)`."""
  return (
    b"(" + _v("storage") + _g("torch", "FloatStorage") + _v(key) + _v("cpu") + _v(numel) + b"tQ"
  )


def _tensor(storage: bytes, size: tuple, stride: tuple) -> bytes:
  """`_rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict())`."""
  return (
    _g("torch._utils", "_rebuild_tensor_v2")
    + b"("
    + storage
    + _v(0)
    + _v(size)
    + _v(stride)
    + b"\x89"
    + _g("collections", "OrderedDict")
    + b")RtR"
  )


def _zip(path, members: dict):
  with zipfile.ZipFile(path, "w") as zf:
    for name, data in members.items():
      zf.writestr(name, data)


def _deflate_bomb(path, bomb: str, gib: float, **stored: bytes):
  """A zip whose member `bomb` inflates to `gib` GiB of zeros (repeated
  full-flush deflate blocks, so writing it is fast; its CRC is wrong), next to
  the `stored` members."""
  comp = zlib.compressobj(9, zlib.DEFLATED, -15)
  chunk = comp.compress(bytes(2**20)) + comp.flush(zlib.Z_FULL_FLUSH)
  n = int(gib * 1024)
  members = [(name, 0, data, len(data), zlib.crc32(data)) for name, data in stored.items()]
  members.append((bomb, 8, chunk * n + comp.flush(), n * 2**20, 0))
  body, central = b"", b""
  for name, method, data, size, crc in members:
    fname = name.encode()
    central += (
      struct.pack(
        "<4s6H3I5H2I",
        b"PK\x01\x02",
        20,
        20,
        0,
        method,
        0,
        0,
        crc,
        len(data),
        size,
        len(fname),
        0,
        0,
        0,
        0,
        0,
        len(body),
      )
      + fname
    )
    body += (
      struct.pack(
        "<4s5H3I2H", b"PK\x03\x04", 20, 0, method, 0, 0, crc, len(data), size, len(fname), 0
      )
      + fname
      + data
    )
  end = struct.pack(
    "<4s4H2IH", b"PK\x05\x06", 0, 0, len(members), len(members), len(central), len(body), 0
  )
  with open(path, "wb") as f:
    f.write(body + central + end)


def _flip(data: bytes, pos: int, bit: int = 0) -> bytes:
  return data[:pos] + bytes([data[pos] ^ (1 << bit)]) + data[pos + 1 :]


def _member_offset(path, name: str) -> int:
  """Where the bytes of zip member `name` start in the file."""
  with zipfile.ZipFile(path) as zf:
    info = zf.getinfo(name)
  with open(path, "rb") as f:
    f.seek(info.header_offset + 26)
    n, m = struct.unpack("<2H", f.read(4))
  return info.header_offset + 30 + n + m


def _read(rel: str) -> bytes:
  with open(os.path.join(FIXTURES, rel), "rb") as f:
    return f.read()


_SG2 = FIXTURE_CHECKPOINTS["stylegan2"]
_WEIGHTS = {  # Fixture weight files: name -> path under fixtures/.
  "stylegan2": _SG2,
  "stylegan3": FIXTURE_CHECKPOINTS["stylegan3"],
  "pggan": FIXTURE_CHECKPOINTS["pggan"],
  "stylegan": FIXTURE_CHECKPOINTS["stylegan"],
  "biggan": "biggan/pytorch_model.bin",
}


def _sg2_with(**state) -> dict:
  """The StyleGAN2 fixture snapshot with attributes of G_ema replaced."""
  snap = safe_pickle.load(os.path.join(FIXTURES, _SG2))
  g = snap["G_ema"]
  snap["G_ema"] = safe_pickle.Record(g.module, g.class_name, {**g.state, **state})
  return snap


def _laughs(depth: int = 40):
  """2**depth leaves in a few hundred bytes of pickle (shared memo references)."""
  x = [0]
  for _ in range(depth):
    x = [x, x]
  return x


# ---------------------------------------------------------------------------
# The corpus: name -> (writer(path), expected reason). Writers get the path of
# the file to write; the payloads create CANARY if anything runs them.

_TOUCH = f"touch {CANARY}"
_OPEN = f"open({CANARY!r}, 'w').close()"
_RUN = f"{_g('os', 'system').decode()}(S'{_TOUCH}'\ntR.".encode()


def _pickle(obj):
  return lambda path: write_network_pickle(obj, path)


def _raw(data: bytes):
  return lambda path: open(path, "wb").write(data)


def _cut(rel: str, start: int, stop: int):
  """Writes `fixture[start:stop]` (negative indices count from the end)."""
  return lambda path: open(path, "wb").write(_read(rel)[start:stop])


def _in_zip(data_pkl: bytes, **storages):
  return lambda path: _zip(
    path, {"archive/data.pkl": data_pkl, **{f"archive/data/{k}": v for k, v in storages.items()}}
  )


def _persistent_src():
  meta = dict(
    type="class",
    version=6,
    class_name="Generator",
    state={},
    module_src=f"import os\nos.system({_TOUCH!r})\n",
  )
  return _Call(Global("torch_utils.persistence", "_reconstruct_persistent_obj"), meta)


def _nested_records(depth: int):
  rec = {}
  for _ in range(depth):
    rec = _Call(
      Global("torch_utils.persistence", "_reconstruct_persistent_obj"),
      dict(type="class", class_name="Generator", state={"_modules": {"x": rec}}),
    )
  return {"G_ema": rec}


def _legacy_with(payload) -> bytes:
  """A legacy torch file whose object is `payload` (after the real headers)."""
  head = b"".join(
    pickle.dumps(h, protocol=2)
    for h in (0x1950A86A20F9469CFC6C, 1001, dict(protocol_version=1001, little_endian=True))
  )
  return head + payload + pickle.dumps([], protocol=2)


_FORBIDDEN = r"forbidden global"
# Readable files that are no BigGAN state dict, as a BigGAN folder's weights.
_NOT_BIGGAN = r"missing tensor embeddings\.weight|is not a state dict"
CASES = {
  # Code execution through globals: refused in find_class, before any call.
  "os_system": (
    _pickle({"G_ema": _Call(Global("os", "system"), _TOUCH)}),
    r"forbidden global os\.system",
  ),
  "posix_system": (_pickle(_Call(Global("posix", "system"), _TOUCH)), _FORBIDDEN),
  "eval": (_pickle(_Call(Global("builtins", "eval"), _OPEN)), r"builtins\.eval"),
  "exec": (_pickle(_Call(Global("builtins", "exec"), _OPEN)), r"builtins\.exec"),
  "subprocess": (
    _pickle(_Call(Global("subprocess", "check_call"), ["touch", CANARY])),
    r"subprocess\.check_call",
  ),
  "getattr_import": (
    _pickle(
      _Call(
        _Call(
          Global("builtins", "getattr"), _Call(Global("builtins", "__import__"), "os"), "system"
        ),
        _TOUCH,
      )
    ),
    r"builtins\.getattr",
  ),
  "importlib": (_pickle(_Call(Global("importlib", "import_module"), "os")), _FORBIDDEN),
  "nested_pickle_loads": (_pickle(_Call(Global("pickle", "loads"), _RUN)), r"pickle\.loads"),
  "numpy_runstring": (
    _pickle(
      _Call(
        Global("numpy.testing._private.utils", "runstring"), f"import os; os.system({_TOUCH!r})", {}
      )
    ),
    _FORBIDDEN,
  ),
  "torch_load": (_pickle(_Call(Global("torch", "load"), CANARY)), r"torch\.load"),
  "protocol0_inst": (
    _raw(b"(S'" + _TOUCH.encode() + b"'\nios\nsystem\n."),
    r"not a pickle",
  ),  # Headerless pickles are never unpickled.
  "in_network_pickle": (
    lambda p: write_network_pickle(_sg2_with(hook=_Call(Global("os", "system"), _TOUCH)), p),
    r"forbidden global os\.system",
  ),
  "in_torch_zip": (_in_zip(b"\x80\x02" + _RUN), r"forbidden global os\.system"),
  "in_legacy_file": (_raw(_legacy_with(b"\x80\x02" + _RUN)), r"forbidden global os\.system"),
  "in_load_from_bytes": (
    _pickle(
      {"w": _Call(Global("torch.storage", "_load_from_bytes"), _legacy_with(b"\x80\x02" + _RUN))}
    ),
    r"forbidden global os\.system",
  ),
  # NVIDIA persistent objects: their module_src is data, never executed.
  "persistent_module_src": (
    _pickle({"G_ema": _persistent_src()}),
    r"not a checkpoint of a supported kind",
    _NOT_BIGGAN,
  ),
  "nested_persistent_objects": (_pickle(_nested_records(40)), r"nests deeper"),
  # persistent_load abuse (torch.load's storage hook).
  "pid_type_os_system": (
    _in_zip(
      b"\x80\x02(" + _v("storage") + _g("os", "system") + _v("0") + _v("cpu") + _v(1) + b"tQ."
    ),
    r"forbidden global os\.system",
  ),
  "pid_evil_key": (
    _in_zip(
      b"\x80\x02("
      + _v("storage")
      + _g("torch", "FloatStorage")
      + _RUN[:-1]
      + _v("cpu")
      + _v(1)
      + b"tQ."
    ),
    _FORBIDDEN,
  ),
  "pid_path_traversal": (
    _in_zip(b"\x80\x02" + _tensor(_storage_pid(1, "../../CANARY"), (1,), (1,)) + b"."),
    r"lacks storage archive/data/\.\./\.\./CANARY",
  ),
  "pid_not_a_storage": (
    _in_zip(b"\x80\x02(" + _v("module") + _v("os") + b"tQ."),
    r"unsupported persistent id",
  ),
  "pid_in_plain_pickle": (_raw(b"\x80\x02" + _v("x") + b"Q."), r"unexpected persistent id"),
  # BUILD (__setstate__) on the reader's stand-ins: refused, never applied.
  "build_global_defaults": (
    _raw(
      b"\x80\x02"
      + _g("_codecs", "encode")
      + b"N}"
      + _v("__defaults__")
      + _v(("latin1",))
      + b"s\x86b."
    ),
    r"set the state of a Global",
  ),
  # (A negative stride set after the checks would read memory outside the storage.)
  "build_restrides_tensor": (
    _in_zip(
      b"\x80\x02"
      + _tensor(_storage_pid(1), (4,), (0,))
      + b"}"
      + _v("stride")
      + _v((-(2**28),))
      + b"sb.",
      **{"0": bytes(4)},
    ),
    r"set the state of a Tensor",
  ),
  "build_replaces_storage": (
    _in_zip(
      b"\x80\x02" + _storage_pid(1) + b"N}" + _v("numel") + _v(10**9) + b"s\x86b.",
      **{"0": bytes(4)},
    ),
    r"set the state of a Storage",
  ),
  "object_array": (_raw(pickle.dumps(np.array([{"a": 1}], dtype=object))), r"dtype"),
  # Resource bombs.
  "billion_laughs": (_pickle({"G_ema": _laughs()}), r"supported kind", _NOT_BIGGAN),
  "billion_laughs_kwargs": (
    lambda p: write_network_pickle(_sg2_with(_init_kwargs=_laughs()), p),
    r"_init_kwargs holds more than",
    _NOT_BIGGAN,
  ),
  "deep_nesting": (_raw(b"\x80\x02" + b"]" * 100_000 + b"a" * 99_999 + b"."), r"nests"),
  "stride0_tensor": (
    lambda p: write_torch_zip({"w": Strided(np.ones(1, np.float32), 0, (10**5, 10**5), (0, 0))}, p),
    r"would expand to 40000000000 bytes",
  ),
  "stride0_nvidia": (
    _pickle({"w": Strided(np.ones(1, np.float32), 0, (10**5, 10**5), (0, 0))}),
    r"would expand",
  ),
  "shared_storage_views": (
    _in_zip(
      b"\x80\x02"
      + _storage_pid(2**20)
      + b"q\x01"
      + b"0]("
      + b"".join(_tensor(b"h\x01", (2**20,), (1,)) for _ in range(1000))
      + b"e.",
      **{"0": bytes(2**22)},
    ),
    r"would expand",
  ),
  "huge_storage_zip": (
    _in_zip(b"\x80\x02" + _tensor(_storage_pid(2**40), (1,), (1,)) + b".", **{"0": bytes(4)}),
    r"has the wrong size",
  ),
  "huge_storage_legacy": (
    _raw(
      _legacy_with(
        b"\x80\x02"
        + _tensor(
          b"("
          + _v("storage")
          + _g("torch", "FloatStorage")
          + _v("0")
          + _v("cpu")
          + _v(2**40)
          + b"NtQ",
          (1,),
          (1,),
        )
        + b"."
      )[: -len(pickle.dumps([], protocol=2))]
      + pickle.dumps(["0"], protocol=2)
      + struct.pack("<q", 2**40)
      + bytes(8)
    ),
    r"truncated or inconsistent storage",
  ),
  "huge_numpy_shape": (
    _raw(
      pickle.dumps(np.zeros(2, np.float32), protocol=2).replace(
        b"K\x01K\x02\x85", b"K\x01" + _v(2**40) + b"\x85", 1
      )
    ),
    r"does not match its shape",
  ),
  "huge_bytes_length": (
    _raw(b"\x80\x04\x8e" + struct.pack("<Q", 2**40) + b"abc."),
    r"larger than memory|truncated",
  ),
  "zip_bomb_data_pkl": (lambda p: _deflate_bomb(p, "archive/data.pkl", 2), r"zip bomb"),
  "zip_bomb_storage": (
    lambda p: _deflate_bomb(
      p,
      "archive/data/0",
      3,
      **{"archive/data.pkl": b"\x80\x02" + _tensor(_storage_pid(3 * 2**28), (1,), (1,)) + b"."},
    ),
    r"zip bomb",
  ),
  # Not a checkpoint at all, or a wrong magic number.
  "empty": (_raw(b""), r"not a pickle"),
  "elf": (_raw(b"\x7fELF\x02\x01\x01" + bytes(100)), r"not a pickle"),
  "gzip": (_raw(b"\x1f\x8b\x08\x00" + bytes(100)), r"not a pickle"),
  "zip_magic_flipped": (
    lambda p: open(p, "wb").write(_flip(_read(_WEIGHTS["pggan"]), 3)),
    r"not a pickle",
  ),
  "legacy_magic_flipped": (
    lambda p: open(p, "wb").write(_flip(legacy_bytes({"w": np.ones(3, np.float32)}), 6)),
    r"supported kind",
    _NOT_BIGGAN,
  ),
  "legacy_protocol_1002": (
    lambda p: open(p, "wb").write(
      legacy_bytes({"w": np.ones(3, np.float32)}).replace(b"M\xe9\x03", b"M\xea\x03", 1)
    ),
    r"unsupported legacy torch protocol",
  ),
  "tar_torch": (_raw(bytes(257) + b"ustar" + bytes(300)), r"tar-format"),
  "random_bytes": (_raw(np.random.default_rng(0).bytes(4096)), r"not a pickle|malformed"),
}


def _flipped(rel: str, pos: int | None, bit: int = 0):
  """Writes the fixture with one bit flipped (`pos=None`: in its largest zip member)."""

  def write(path):
    data = _read(rel)
    if pos is None:
      with zipfile.ZipFile(os.path.join(FIXTURES, rel)) as zf:
        name = max(zf.infolist(), key=lambda i: i.file_size).filename
      at = _member_offset(os.path.join(FIXTURES, rel), name) + 1
    else:
      at = pos % len(data)
    open(path, "wb").write(_flip(data, at, bit))

  return write


def _fixture_mutants():
  """Truncated and bit-flipped copies of every fixture weight file."""
  out = {}
  for family, rel in _WEIGHTS.items():
    size = os.path.getsize(os.path.join(FIXTURES, rel))
    for frac in (0.0, 0.01, 0.5, 0.999):
      out[f"{family}_cut_{frac}"] = (
        _cut(rel, 0, int(size * frac)),
        r"not a pickle|truncated|corrupt|malformed",
      )
    out[f"{family}_cut_last_byte"] = (_cut(rel, 0, -1), r"truncated|corrupt|malformed")
    if rel.endswith(".pkl"):  # No checksum in a pickle: flip its header and STOP opcode.
      out[f"{family}_flip_stop"] = (_flipped(rel, -1), r"malformed")
      out[f"{family}_flip_proto"] = (_flipped(rel, 0, 7), r"not a pickle")
    else:  # A flipped bit inside a zip member: its CRC says so.
      out[f"{family}_flip_member"] = (_flipped(rel, None), r"Bad CRC-32")
  return out


CASES.update(_fixture_mutants())

# BigGAN folders whose config.json is absurd (with the fixture weights).
_BIGGAN_CONFIG = json.loads(_read("biggan/config.json"))
CONFIGS = {
  "huge_z_dim": ({**_BIGGAN_CONFIG, "z_dim": 10**12}, r"z_dim must be an integer in"),
  "big_z_dim": ({**_BIGGAN_CONFIG, "z_dim": 2**16}, r"embeddings\.weight has shape"),
  "huge_channels": ({**_BIGGAN_CONFIG, "channel_width": 2**40}, r"channel_width must"),
  "huge_output_dim": ({**_BIGGAN_CONFIG, "output_dim": 2**60}, r"output_dim"),
  "many_layers": ({**_BIGGAN_CONFIG, "layers": [[True, 1, 1]] * 10**4}, r"layers must"),
  "huge_n_stats": ({**_BIGGAN_CONFIG, "n_stats": 10**15}, r"n_stats must"),
  "negative_classes": ({**_BIGGAN_CONFIG, "num_classes": -1}, r"num_classes"),
  "float_z_dim": ({**_BIGGAN_CONFIG, "z_dim": 1e300}, r"z_dim"),
  "nan_eps": ({**_BIGGAN_CONFIG, "eps": float("nan")}, r"eps"),
  "huge_int_text": ('{"z_dim": ' + "9" * 5000 + "}", r"cannot read|Exceeds"),
  "deep_json": ("[" * 100_000 + "]" * 100_000, r"cannot read"),
  "huge_json": ('{"layers": [' + "0," * 10**6 + "0]}", r"larger than"),
  "not_json": ("\x00\x01garbage", r"cannot read"),
}


def _write_corpus() -> dict:
  """Writes the corpus; returns `case -> (src, expected reason)`."""
  shutil.rmtree(CORPUS, ignore_errors=True)
  os.makedirs(CORPUS)
  out = {}
  for name, (write, reason, *biggan_reason) in CASES.items():
    path = os.path.join(CORPUS, name)
    write(path)
    out[f"file/{name}"] = (path, reason)
    folder = os.path.join(CORPUS, "biggan_" + name)  # The same file as BigGAN weights.
    os.makedirs(folder)
    os.link(path, os.path.join(folder, "pytorch_model.bin"))
    shutil.copy(os.path.join(FIXTURES, "biggan", "config.json"), folder)
    out[f"biggan/{name}"] = (folder, biggan_reason[0] if biggan_reason else reason)
  for name, (config, reason) in CONFIGS.items():
    folder = os.path.join(CORPUS, "config_" + name)
    os.makedirs(folder)
    shutil.copy(os.path.join(FIXTURES, "biggan", "pytorch_model.bin"), folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
      f.write(config if isinstance(config, str) else json.dumps(config))
    out[f"config/{name}"] = (folder, reason)
    # Given the weights file, a config that is not JSON does not make it BigGAN's.
    out[f"config_weights/{name}"] = (
      os.path.join(folder, "pytorch_model.bin"),
      reason + "|supported kind",
    )
  out["special/dev_zero"] = ("/dev/zero", r"not a regular file")
  out["special/folder_without_weights"] = (CORPUS + "/config_not_json/..", r"supported kind")
  return out


@pytest.fixture(scope="module")
def worker():
  w = _Worker()
  yield w
  w.close()


@pytest.fixture(scope="module")
def corpus_results(worker):
  """Every corpus case through the converter: `case -> (result, dst, reason)`."""
  results = {}
  for case, (src, reason) in _write_corpus().items():
    dst = os.path.join(CORPUS, "out", case.replace("/", "_"))
    results[case] = (worker.run(src, dst), dst, reason)
    assert not os.path.exists(CANARY), f"{case} ran its payload"
  return results


def _assert_refused(result: dict, dst: str, reason: str | None = None):
  err = result["stderr"]
  assert result["rc"] == 2, err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  assert "internal error" not in err and "MemoryError" not in err, err
  if reason is not None:
    assert re.search(reason, err), (reason, err)
  assert not os.path.lexists(dst)
  assert not os.path.exists(CANARY)
  assert result["peak"] < MAX_RSS, result
  assert result["seconds"] < MAX_SECONDS, result


_CORPUS_CASES = sorted(
  [f"{c}/{n}" for n in CASES for c in ("file", "biggan")]
  + [f"{c}/{n}" for n in CONFIGS for c in ("config", "config_weights")]
  + ["special/dev_zero", "special/folder_without_weights"]
)


@pytest.mark.parametrize("case", _CORPUS_CASES)
def test_hostile_input_is_refused(case, corpus_results):
  result, dst, reason = corpus_results[case]
  _assert_refused(result, dst, reason)


def test_corpus_payloads_are_live(tmp_path):
  """Control: the code-running payloads do create the canary under plain pickle,
  so the canary's absence above means something (run on copies of the payloads
  that point at a temporary canary)."""
  canary = tmp_path / "canary"
  for fn, arg in (
    (Global("os", "system"), f"touch {canary}"),
    (Global("builtins", "exec"), f"open({str(canary)!r}, 'w').close()"),
  ):
    path = tmp_path / "p.pkl"
    write_network_pickle(_Call(fn, arg), path)
    pickle.loads(path.read_bytes())
    assert canary.exists()
    canary.unlink()


def test_controls_convert(worker, tmp_path):
  """The fixtures themselves convert in the same capped worker (the cap and the
  new limits do not refuse real checkpoints), with their peak memory."""
  for family, rel in FIXTURE_CHECKPOINTS.items():
    result = worker.run(os.path.join(FIXTURES, rel), str(tmp_path / family))
    assert result["rc"] == 0, result["stderr"]
    assert result["peak"] < MAX_RSS
  legacy = tmp_path / "pggan_legacy.pth"  # The pggan fixture as a legacy torch file.
  write_torch_legacy(safe_pickle.load(os.path.join(FIXTURES, _WEIGHTS["pggan"])), legacy)
  assert worker.run(str(legacy), str(tmp_path / "legacy"))["rc"] == 0


# ---------------------------------------------------------------------------
# Fuzzing: random mutations of the fixture weight files.

_FUZZ_EXAMPLES = int(os.environ.get("PANDA_FUZZ_EXAMPLES", "12"))
_FIXTURE_BYTES = {family: _read(rel) for family, rel in _WEIGHTS.items()}


@st.composite
def _mutants(draw):
  family = draw(st.sampled_from(sorted(_FIXTURE_BYTES)))
  data = bytearray(_FIXTURE_BYTES[family])
  for _ in range(draw(st.integers(1, 4))):
    pos = draw(st.integers(0, len(data) - 1))
    kind = draw(st.sampled_from(["flip", "byte", "cut", "delete", "insert"]))
    if kind == "flip":
      data[pos] ^= 1 << draw(st.integers(0, 7))
    elif kind == "byte":
      data[pos] = draw(st.integers(0, 255))
    elif kind == "cut":
      del data[pos:]
    elif kind == "delete":
      del data[pos : pos + draw(st.integers(1, 64))]
    else:
      data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
    if not data:
      break
  return family, bytes(data)


@hypothesis.settings(
  max_examples=_FUZZ_EXAMPLES,
  deadline=None,
  derandomize=True,
  suppress_health_check=list(hypothesis.HealthCheck),
)
@hypothesis.given(mutant=_mutants())
def test_fuzzed_fixtures_are_refused_or_converted(mutant, worker, tmp_path_factory):
  family, data = mutant
  root = tmp_path_factory.mktemp("fuzz")
  src = root / "ckpt"
  if family == "biggan":  # A BigGAN checkpoint is a folder.
    shutil.copy(os.path.join(FIXTURES, "biggan", "config.json"), root)
    src = root / "pytorch_model.bin"
  src.write_bytes(data)
  dst = str(root / "out")
  result = worker.run(str(src), dst)
  hypothesis.event(f"exit {result['rc']}")
  if result["rc"] == 0:  # A flip in weight bytes: another valid checkpoint.
    assert generators.load(dst).arch == family
    assert result["peak"] < MAX_RSS and not os.path.exists(CANARY)
  else:
    _assert_refused(result, dst)
