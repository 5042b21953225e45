"""The generator contract shared by every architecture, and converted checkpoints.

A converted checkpoint is a directory holding `config.json` (the architecture's
constructor options plus `"arch"` and `"format"`) and `params/`, an orbax
checkpoint of the parameter pytree (nested dicts of float32 arrays). Loading
one needs neither torch nor the converters' pickle reader.

Layers are numbered per architecture (`tests/fixtures/README.md`); `split`
stops after `layer` layers and `resume` runs the rest, so that for every valid
`l`: `resume(*split(lat, l), lat, l) == generate(lat)`.
"""

from __future__ import annotations

import abc
import copy
import json
import os
import shutil
import tempfile
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
FORMAT = "panda_jax.converted/1"

_REGISTRY: dict[str, type["Generator"]] = {}

PACKAGED = {"toyfaces": "assets/toyfaces"}
"""Generators shipped with the package: name -> directory under `panda_jax/`."""


class Generator(abc.ABC):
  """A pretrained generator split into `latents -> split -> resume`.

  Subclasses set the class attribute `arch`, are decorated with `@register`,
  and are built from `(config, params)`: `config` a JSON-serialisable dict of
  the architecture's options, `params` a pytree of arrays. All methods are
  jittable functions of their array arguments; `layer` is static.
  """

  arch: ClassVar[str]

  def __init__(self, config: dict, params: Any):
    self.config = dict(config)
    self.params = params

  @classmethod
  def from_converted(cls, config: dict, params: Any) -> "Generator":
    """Builds the generator from a converted checkpoint's config and params."""
    return cls(config, params)

  def with_params(self, params: Any) -> "Generator":
    """The same generator on `params` (e.g. traced arguments inside `jit`): a shallow copy."""
    other = copy.copy(self)
    other.params = params
    return other

  @property
  def z_dim(self) -> int:
    return int(self.config["z_dim"])

  @property
  def c_dim(self) -> int:
    """Number of classes of the one-hot conditioning (0 when unconditional)."""
    return int(self.config.get("c_dim", 0))

  @property
  @abc.abstractmethod
  def num_layers(self) -> int:
    """Number of layers after which `split` may stop (the largest valid `layer`)."""

  @property
  def layers(self) -> range:
    """Every valid `layer` of `split`/`resume` (1..num_layers unless overridden)."""
    return range(1, self.num_layers + 1)

  def check_layer(self, layer: int) -> int:
    """Returns `layer` as an int, or raises a `ValueError` naming the valid range."""
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
      raise ValueError(f"layer must be a Python int, got {type(layer).__name__}")
    if int(layer) not in self.layers:
      raise ValueError(
        f"layer must be in [{self.layers.start}, {self.layers.stop - 1}] for "
        f"{self.arch}, got {layer}"
      )
    return int(layer)

  @abc.abstractmethod
  def latents(self, z, c=None, truncation_psi: float = 1.0, truncation_cutoff: int | None = None):
    """Per-layer conditioning pytree from `z [n, z_dim]` (and one-hot `c [n, c_dim]`).

    Truncation `w_avg + psi * (w - w_avg)` applies to the first
    `truncation_cutoff` layers only when given.
    """

  @abc.abstractmethod
  def split(self, latents, layer: int, noise_key=None):
    """Runs the first `layer` layers: `(x [n, h, w, c], carry)`."""

  @abc.abstractmethod
  def resume(self, x, carry, latents, layer: int, noise_key=None):
    """Runs the layers after `layer` from `x [n, h, w, c]`: image `[n, H, W, ch]`."""

  def generate(self, latents, noise_key=None):
    """Image `[n, H, W, ch]`; equal to `resume(*split(latents, l), latents, l)`."""
    layer = self.layers.start
    x, carry = self.split(latents, layer, noise_key)
    return self.resume(x, carry, latents, layer, noise_key)


def check_params(params, expected, path: str = "") -> None:
  """Raises a `ValueError` naming every missing, extra or misshapen parameter."""
  if isinstance(expected, dict):
    if not isinstance(params, dict):
      raise ValueError(f"parameter {path or '/'} must be a dict")
    missing = sorted(set(expected) - set(params))
    extra = sorted(set(params) - set(expected))
    if missing or extra:
      raise ValueError(f"parameters under {path or '/'}: missing {missing}, extra {extra}")
    for k in expected:
      check_params(params[k], expected[k], f"{path}/{k}")
  elif tuple(np.shape(params)) != tuple(expected.shape):
    raise ValueError(
      f"parameter {path} has shape {tuple(np.shape(params))}, expected {tuple(expected.shape)}"
    )


class FlaxGenerator(Generator):
  """A generator whose weights are the `params` of its Flax module.

  Subclasses give `parse_config(config, params)` (the architecture's options,
  a frozen dataclass; `params` only for what `config.json` does not record)
  and `param_shapes(cfg)` (the module's `params` tree as
  `jax.ShapeDtypeStruct`s). A checkpoint's params must match that tree
  exactly (`check_params`: a `ValueError` naming the key) and are kept as
  float32 arrays.
  """

  def __init__(self, config: dict, params: Any):
    self.cfg = self.parse_config(config, params)
    check_params(params, self.param_shapes(self.cfg))
    super().__init__(config, jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params))

  @staticmethod
  @abc.abstractmethod
  def parse_config(config: dict, params: Any) -> Any:
    """The architecture's options from `config.json` (and the params' shapes)."""

  @staticmethod
  @abc.abstractmethod
  def param_shapes(cfg: Any) -> Any:
    """The `params` tree the module declares for `cfg`, as `jax.ShapeDtypeStruct`s."""


def register(cls: type[Generator]) -> type[Generator]:
  """Class decorator: makes `cls` loadable by its `arch` name."""
  arch = getattr(cls, "arch", None)
  if not isinstance(arch, str) or not arch:
    raise ValueError(f"{cls.__name__} must set a class attribute `arch`")
  if arch in _REGISTRY and _REGISTRY[arch] is not cls:
    raise ValueError(f"architecture {arch!r} is already registered by {_REGISTRY[arch].__name__}")
  _REGISTRY[arch] = cls
  return cls


def registered() -> dict[str, type[Generator]]:
  """A copy of the `arch -> class` table."""
  return dict(_REGISTRY)


def _checkpointer() -> ocp.Checkpointer:
  # Without OCDBT the array files are deterministic, so a re-conversion is
  # byte-identical except for orbax's own timestamps (`_CHECKPOINT_METADATA`,
  # `commit_success.txt`).
  return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False))


def save_converted(dst: str | os.PathLike, arch: str, config: dict, params: Any) -> str:
  """Writes a converted checkpoint directory atomically; returns its path.

  Everything goes to a temporary sibling directory first, which is renamed to
  `dst` only once complete: a failure leaves no `dst` behind. `dst` must not
  exist or be an empty directory.
  """
  dst = os.path.abspath(os.fspath(dst))
  if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
    raise ValueError(f"destination {dst} already exists and is not empty")
  if "arch" in config or "format" in config:
    raise ValueError("config must not contain the reserved keys 'arch'/'format'")
  text = json.dumps(
    {"format": FORMAT, "arch": arch, **config}, indent=1, sort_keys=True, allow_nan=False
  )
  params = _to_numpy(params)
  parent = os.path.dirname(dst)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=parent)
  try:
    _checkpointer().save(os.path.join(tmp, PARAMS_DIR), args=ocp.args.PyTreeSave(params))
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      f.write(text + "\n")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; give it a normal directory's mode.
    os.replace(tmp, dst)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return dst


def resolve(path: str | os.PathLike) -> str:
  """The directory of a packaged generator's name (`PACKAGED`), else `path` itself.

  Names win over relative paths: write `./toyfaces` for a directory of that name.
  """
  if isinstance(path, str) and path in PACKAGED:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(root, PACKAGED[path])
  return os.path.abspath(os.fspath(path))


def load_converted(path: str | os.PathLike) -> tuple[str, dict, Any]:
  """Reads `(arch, config, params)` from a converted checkpoint directory or packaged name."""
  path = resolve(path)
  cfg_path = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(cfg_path):
    raise ValueError(
      f"{path} is not a converted checkpoint (no {CONFIG_FILE}); "
      "convert it first with `python -m converters`"
    )
  with open(cfg_path) as f:
    config = json.load(f)
  if config.pop("format", None) != FORMAT:
    raise ValueError(f"{cfg_path} is not a {FORMAT} config")
  arch = config.pop("arch")
  params = _checkpointer().restore(os.path.join(path, PARAMS_DIR))
  return arch, config, params


def load(path: str | os.PathLike) -> Generator:
  """Loads a converted checkpoint directory (or a `PACKAGED` name) as its `Generator`."""
  arch, config, params = load_converted(path)
  if arch not in _REGISTRY:
    raise ValueError(f"unknown architecture {arch!r} in {path}; registered: {sorted(_REGISTRY)}")
  return _REGISTRY[arch].from_converted(config, params)


def _to_numpy(tree):
  """Nested dicts of arrays -> nested dicts of numpy arrays (string keys only)."""
  if isinstance(tree, dict):
    for k in tree:
      if not isinstance(k, str) or not k or "." in k or "/" in k:
        raise ValueError(f"parameter names must be non-empty strings without '.' or '/', got {k!r}")
    return {k: _to_numpy(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    raise ValueError("params must be nested dicts of arrays (no lists/tuples)")
  return np.asarray(tree)
