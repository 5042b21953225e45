"""PyTorch DCGAN-tutorial generators (`torch.save`d state dicts) -> "dcgan".

Accepted files (torch zip or legacy, read by `converters.safe_pickle`: nothing
from the file is executed, no torch needed): a training checkpoint dict holding
the generator's state dict under `netG_state_dict` (the tutorial's name, and
gan-face-generate's `weights.tar`), `netG` or `state_dict`, whose other entries
(discriminator, optimiser states, epoch, losses) are ignored; or a bare state
dict. Keys may carry the `module.` prefix of `nn.DataParallel`.

The state dict is the tutorial's `main` Sequential, mapped strictly (every
tensor present with the shape the chain implies, no other; names below without
the prefix), for blocks j = 0 .. k-1:

    main.{3j}.weight    ConvTranspose2d [c_in, c_j, 4, 4]   (c_in = nz for j = 0)
    main.{3j+1}.weight, .bias, .running_mean, .running_var  BatchNorm2d [c_j]
    main.{3j+1}.num_batches_tracked                          [] (optional)
    main.{3k}.weight    ConvTranspose2d [c_{k-1}, nc, 4, 4], then Tanh

so nz, the block widths (the tutorial's ngf * (8, 4, 2, 1)), nc and k come
from the shapes, and the image side is 2^(k+2). What a state dict does not
store is assumed as in the tutorial: stride 1 / padding 0 for the first
ConvTranspose2d, stride 2 / padding 1 for the others, no conv biases,
BatchNorm eps 1e-5.
"""

from __future__ import annotations

import numpy as np

from converters import genforce
from converters.errors import ConversionError
from panda_jax.generators import dcgan

ARCH = dcgan.DCGAN.arch
OPTIONS = ("nz",)  # `python -m converters --nz=N`: the latent size the weights must have.
# Keys under which a training checkpoint keeps the generator's state dict.
CHECKPOINT_KEYS = ("netG_state_dict", "netG", "state_dict")
DATA_PARALLEL = "module."
BN_EPS = 1e-5  # torch's BatchNorm2d default; not stored in a state dict.
_K = dcgan.KERNEL


class _Tensors(genforce._Tensors):  # pylint: disable=protected-access
  """genforce's strict tensor taker, with key prefixes, finiteness and DCGAN messages."""

  def __init__(self, state: dict, prefix: str):
    super().__init__(state)
    self.prefix = prefix

  def name(self, key: str) -> str:
    return self.prefix + key

  def has(self, key: str) -> bool:
    return super().has(self.name(key))

  def take(self, key: str, shape: tuple | None) -> np.ndarray:
    value = super().take(self.name(key), shape)
    if not np.all(np.isfinite(value)):
      raise ConversionError(f"tensor {self.name(key)} holds NaN or Inf")
    return value

  def out_channels(self, key: str) -> int | None:
    """`shape[1]` of a 4-D tensor `key` (a ConvTranspose2d's out-channels), else None."""
    value = self._state.get(self.name(key))
    return value.shape[1] if isinstance(value, np.ndarray) and value.ndim == 4 else None

  def skip_counter(self, key: str) -> None:
    """Drops an optional integer 0-d buffer (BatchNorm's `num_batches_tracked`)."""
    name = self.name(key)
    if not super().has(name):
      return
    value = self._state.pop(name)
    if not (
      isinstance(value, np.ndarray) and value.shape == () and np.issubdtype(value.dtype, np.integer)
    ):
      raise ConversionError(f"tensor {name} must be a 0-d integer counter")

  def finish(self) -> None:
    if self._state:
      extra = sorted(self._state)
      raise ConversionError(
        f"unexpected tensor {extra[0]} in the DCGAN generator state "
        f"dict ({len(extra)} unexpected: {extra[:3]})"
      )


def _is_state_dict(obj) -> bool:
  return (
    isinstance(obj, dict)
    and bool(obj)
    and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items())
  )


def _prefix(state: dict) -> str:
  """`"module."` when every key carries nn.DataParallel's prefix, else `""`."""
  return DATA_PARALLEL if all(k.startswith(DATA_PARALLEL) for k in state) else ""


def generator_state(obj) -> tuple[str, dict] | None:
  """`(where, state dict)` of a loaded checkpoint; None when it holds no candidate.

  `where` names the checkpoint key (`"netG_state_dict"` ...) or is `""` for a
  bare state dict. `netG_state_dict` and `netG` are DCGAN names, so whatever
  they hold is the candidate; `state_dict` and bare dicts only when they hold
  `main.0.weight`.
  """
  if not isinstance(obj, dict):
    return None
  for key in CHECKPOINT_KEYS[:2]:
    if key in obj:
      return key, obj[key]
  for where, state in (("state_dict", obj.get("state_dict")), ("", obj)):
    if _is_state_dict(state) and _prefix(state) + "main.0.weight" in state:
      return where, state
  return None


def _conv(sd: _Tensors, index: int, c_in: int | None) -> np.ndarray:
  """ConvTranspose2d `main.{index}.weight [c_in, c_out, 4, 4]` -> kernel `[4, 4, c_in, c_out]`.

  `c_in` None accepts any; `c_out` is what the tensor has.
  """
  key = f"main.{index}.weight"
  weight = sd.take(key, (c_in, sd.out_channels(key), _K, _K))
  return np.ascontiguousarray(np.transpose(weight, (2, 3, 0, 1)))


def _batch_norm(sd: _Tensors, index: int, c: int) -> tuple[dict, dict]:
  """BatchNorm2d `main.{index}`: `({scale, bias}, {mean, var})`, each `[c]`."""
  name = f"main.{index}"
  params = {"scale": sd.take(f"{name}.weight", (c,)), "bias": sd.take(f"{name}.bias", (c,))}
  stats = {
    "mean": sd.take(f"{name}.running_mean", (c,)),
    "var": sd.take(f"{name}.running_var", (c,)),
  }
  if np.any(stats["var"] < 0):
    raise ConversionError(f"tensor {sd.name(name)}.running_var has negative entries")
  sd.skip_counter(f"{name}.num_batches_tracked")
  return params, stats


def _num_convs(sd: _Tensors) -> int:
  """The number of consecutive `main.{3j}.weight` (ConvTranspose2d candidates)."""
  n = 0
  while n <= dcgan.MAX_BLOCKS + 1 and sd.has(f"main.{3 * n}.weight"):
    n += 1
  if n == 0:
    raise ConversionError(
      f"missing tensor {sd.name('main.0.weight')} (the first ConvTranspose2d of a DCGAN generator)"
    )
  if n == 1:
    raise ConversionError(
      f"missing tensor {sd.name('main.3.weight')}: a DCGAN generator "
      "has at least two ConvTranspose2d layers"
    )
  if n > dcgan.MAX_BLOCKS + 1:
    raise ConversionError(
      f"more than {dcgan.MAX_BLOCKS} blocks (main.0 .. "
      f"{sd.name(f'main.{3 * n}')}): images over 4096x4096"
    )
  return n


def convert_state_dict(state: dict, *, nz: int | None = None, where: str = "") -> tuple[dict, dict]:
  """`(config, variables)` of a DCGAN-tutorial generator state dict.

  Args:
    state: parameter name -> numpy array, as `torch.save`d.
    nz: when given, the latent size the first ConvTranspose2d must take.
    where: the checkpoint key holding `state` (for the config's record).

  Raises:
    ConversionError: one line naming the first offending tensor.
  """
  if not _is_state_dict(state):
    raise ConversionError(
      f"{where or 'the checkpoint'} is not a state dict (parameter name -> tensor)"
    )
  sd = _Tensors(state, _prefix(state))
  num_blocks = _num_convs(sd) - 1
  first = state[sd.name("main.0.weight")]
  if nz is not None and (first.ndim != 4 or first.shape[0] != nz):
    raise ConversionError(
      f"--nz={nz} but tensor {sd.name('main.0.weight')} has shape "
      f"{list(first.shape)} (its first dimension is the latent size)"
    )
  params, stats, channels, c_in = {}, {}, [], nz
  for j in range(num_blocks):
    kernel = _conv(sd, 3 * j, c_in)
    c_in = kernel.shape[3]
    bn, bn_stats = _batch_norm(sd, 3 * j + 1, c_in)
    params[f"blocks_{j}"] = {"conv": {"kernel": kernel}, "bn": bn}
    stats[f"blocks_{j}"] = {"bn": bn_stats}
    channels.append(c_in)
  last = 3 * num_blocks
  if sd.has(f"main.{last + 1}.weight"):  # A BatchNorm2d follows: the chain was cut short.
    raise ConversionError(
      f"missing tensor {sd.name(f'main.{last + 3}.weight')} (the "
      f"ConvTranspose2d after the BatchNorm2d main.{last + 1})"
    )
  params["to_rgb"] = {"kernel": _conv(sd, last, c_in)}
  sd.finish()
  z_dim = params["blocks_0"]["conv"]["kernel"].shape[2]
  config = {
    "z_dim": int(z_dim),
    "channels": channels,
    "img_channels": int(params["to_rgb"]["kernel"].shape[3]),
    "img_resolution": 2 ** (num_blocks + 2),
    "bn_eps": BN_EPS,
    "source": {
      "format": "torch-dcgan",
      "state_dict_key": where,
      "data_parallel": bool(sd.prefix),
      "ngf": channels[-1],
    },
  }
  return config, {"params": params, "batch_stats": stats}


def sniff(source) -> bool:
  """A (non-folder) file holding a DCGAN training checkpoint or generator state dict."""
  if source.is_dir:
    return False
  try:
    return generator_state(source.read()) is not None
  except ConversionError:
    return False


def convert(source, nz: int | None = None) -> tuple[str, dict, dict]:
  """`(arch, config, variables)` of a DCGAN checkpoint file (a `converters.Source`)."""
  found = generator_state(source.read())
  if found is None:
    raise ConversionError(f"{source.path} holds no DCGAN generator state dict")
  where, state = found
  config, variables = convert_state_dict(state, nz=nz, where=where)
  return ARCH, config, variables
