"""Checkpoint converters: official PyTorch checkpoints -> panda-jax directories.

    python -m converters --src=network-snapshot.pkl --dst=converted/ffhq

Each module named in `FORMATS` is a format: it defines `sniff(source) -> bool`
and `convert(source, **options) -> (arch, config, params)`. Adding a format is
adding a module and its name there; a module that fails to import fails
loudly, and the tests check that every such module is listed. `sniff` must be cheap and
exclusive: it looks at `source.path`/`source.read()` and answers whether its
module converts this checkpoint. `convert` returns the architecture name registered in
`panda_jax.generators`, a JSON-serialisable config and a params pytree; it
raises `ConversionError` (one line) for anything it cannot convert. A module
may take options (command-line flags such as `--nz`) named in its `OPTIONS`;
giving one to a format that does not list it is an error. Nothing
here imports torch or executes anything from a checkpoint: files are read by
`converters.safe_pickle`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import logging
import os
from types import ModuleType
from typing import Any, Iterator

from converters.errors import ConversionError

# The format modules, in the order `detect` asks them.
FORMATS = ("stylegan2", "stylegan3", "biggan", "genforce", "dcgan")
MAX_JSON_BYTES = 2**20  # A config.json (real ones: < 1 kB).
# What reading odd values out of a checkpoint raises: malformed input, not a bug.
_MALFORMED = (
  ValueError,
  TypeError,
  KeyError,
  IndexError,
  AttributeError,
  ArithmeticError,
  RecursionError,
)


class Source:
  """A checkpoint file or folder, read lazily and at most once per file."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.path.abspath(os.fspath(path))
    if not os.path.exists(self.path):
      raise ConversionError(f"{self.path} does not exist")
    self._cache: dict[str, Any] = {}

  @property
  def is_dir(self) -> bool:
    return os.path.isdir(self.path)

  def file(self, name: str | None = None) -> str:
    """The path of the checkpoint file, or of `name` inside a folder."""
    if name is None:
      if self.is_dir:
        raise ConversionError(f"{self.path} is a folder, not a checkpoint file")
      return self.path
    if not self.is_dir:
      raise ConversionError(f"{self.path} is a file, expected a folder with {name}")
    return os.path.join(self.path, name)

  def read(self, name: str | None = None) -> Any:
    """`safe_pickle.load` of the file (or of `name` in a folder); result or error cached."""
    path = self.file(name)
    if path not in self._cache:
      from converters import safe_pickle  # Lazy: only converting needs it.

      try:
        self._cache[path] = safe_pickle.load(path)
      except ConversionError as e:
        self._cache[path] = e
    if isinstance(self._cache[path], ConversionError):
      raise self._cache[path]
    return self._cache[path]

  def json(self, name: str) -> Any:
    """A JSON file inside the folder (e.g. `config.json`)."""
    path = self.file(name)
    try:
      if os.path.getsize(path) > MAX_JSON_BYTES:
        raise ConversionError(f"{path} is larger than {MAX_JSON_BYTES} bytes")
      with open(path, "rb") as f:
        return json.loads(f.read())
    except (OSError, ValueError, RecursionError) as e:
      raise ConversionError(f"cannot read {path}: {type(e).__name__}: {e}") from None


@functools.cache
def formats() -> dict[str, ModuleType]:
  """`name -> module` of the `FORMATS`; an import error propagates."""
  found = {}
  for name in FORMATS:
    module = importlib.import_module(f"{__name__}.{name}")
    if not (
      callable(getattr(module, "sniff", None)) and callable(getattr(module, "convert", None))
    ):
      raise TypeError(f"converter module {module.__name__} must define sniff and convert")
    found[name] = module
  return found


def detect(source: Source) -> ModuleType:
  """The one converter module whose `sniff` accepts `source`."""
  matches = [m for m in formats().values() if m.sniff(source)]
  if not matches:
    if not source.is_dir:
      source.read()  # An unreadable (e.g. malicious) file: say why.
    raise ConversionError(
      f"{source.path} is not a checkpoint of a supported kind ({', '.join(formats())})"
    )
  if len(matches) > 1:
    raise ConversionError(
      f"{source.path} is claimed by several converters: {', '.join(m.__name__ for m in matches)}"
    )
  return matches[0]


def convert(src: str | os.PathLike, **options) -> tuple[str, dict, Any]:
  """Reads a checkpoint: `(arch, config, params)`, checked by building the generator.

  `options` (None values dropped) go to the format's `convert`, which must list
  them in its `OPTIONS`.
  """
  from panda_jax import generators

  source = Source(src)
  options = {k: v for k, v in options.items() if v is not None}
  try:
    module = detect(source)
    unknown = sorted(set(options) - set(getattr(module, "OPTIONS", ())))
    if unknown:
      raise ConversionError(
        f"--{unknown[0]} does not apply to {module.__name__.rsplit('.', 1)[-1]} checkpoints"
      )
    arch, config, params = module.convert(source, **options)
  except _MALFORMED as e:
    raise ConversionError(
      f"{source.path}: malformed checkpoint ({type(e).__name__}: {e})"
    ) from None
  classes = generators.base.registered()
  if arch not in classes:
    raise ConversionError(f"no generator registered for architecture {arch!r}")
  try:
    classes[arch].from_converted(config, params)
  except _MALFORMED as e:
    raise ConversionError(f"converted {arch} checkpoint is invalid: {e}") from None
  return arch, config, params


def convert_file(src: str | os.PathLike, dst: str | os.PathLike, **options) -> str:
  """Converts `src` (with the format's `options`) and writes the directory `dst`
  atomically; returns `dst`."""
  from panda_jax.generators import base

  arch, config, params = convert(src, **options)
  try:
    with _quiet_orbax():
      return base.save_converted(dst, arch, config, params)
  except ValueError as e:
    raise ConversionError(str(e)) from None


class _DropOcdbtMergeNotice(logging.Filter):
  """orbax warns that it skips merging OCDBT files, which a non-OCDBT save never has."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "Skipping merge of OCDBT checkpoints" not in str(record.msg)


@contextlib.contextmanager
def _quiet_orbax() -> Iterator[None]:
  logger, drop = logging.getLogger("absl"), _DropOcdbtMergeNotice()
  logger.addFilter(drop)
  try:
    yield
  finally:
    logger.removeFilter(drop)
