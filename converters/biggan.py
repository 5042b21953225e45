"""pytorch-pretrained-biggan folders (`pytorch_model.bin` + `config.json`) -> BigGAN.

The state dict is read by the allowlisted reader (`converters.safe_pickle` via
`Source.read`: nothing from the file is executed), then mapped strictly: every
tensor the config implies must be present with its exact shape, and no other.
Spectral norms are folded as torch computes them in eval mode: `W = W_orig /
(u^T W_orig v)` with the stored `weight_u`, `weight_v` (no power iteration),
`W_orig` viewed as `[out, -1]`.
"""

from __future__ import annotations

import os

import numpy as np

import converters
from converters.errors import ConversionError
from panda_jax.generators import biggan

ARCH = biggan.BigGAN.arch
WEIGHTS_NAME = "pytorch_model.bin"
CONFIG_NAME = "config.json"


def _folder(source) -> "converters.Source":
  """The pytorch-pretrained-biggan folder: `source` itself or the weights' folder."""
  return source if source.is_dir else converters.Source(os.path.dirname(source.path))


def sniff(source) -> bool:
  """A folder holding pytorch_model.bin, or a file next to a BigGAN config.json."""
  try:
    if source.is_dir:
      return os.path.isfile(source.file(WEIGHTS_NAME))
    config = _folder(source).json(CONFIG_NAME)
  except ConversionError:
    return False
  return isinstance(config, dict) and {"layers", "n_stats", "channel_width"} <= set(config)


def read_config(folder) -> dict:
  """The `BigGANConfig` dict of the folder's config.json, validated (`biggan.Config`)."""
  if not os.path.isfile(folder.file(CONFIG_NAME)):
    raise ConversionError(f"missing {CONFIG_NAME} in {folder.path}")
  config = folder.json(CONFIG_NAME)
  try:
    biggan.Config.from_dict(config)
  except ValueError as e:
    raise ConversionError(f"{folder.file(CONFIG_NAME)}: {e}") from None
  return config


def spectral_normalize(w_orig: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Eval-mode torch spectral norm: `w_orig / (u^T W v)`, `W = w_orig` as `[out, -1]`."""
  mat = np.reshape(w_orig, (w_orig.shape[0], -1)).astype(np.float64)
  sigma = float(np.dot(u.astype(np.float64), mat @ v.astype(np.float64)))
  if not np.isfinite(sigma) or sigma == 0.0:
    raise ConversionError(f"spectral norm sigma is {sigma}: bad weight_u/weight_v")
  return (w_orig / sigma).astype(np.float32)


class _StateDict:
  """Takes tensors out of a state dict by name, checking shapes; strict."""

  def __init__(self, state: dict):
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
      raise ConversionError("pytorch_model.bin is not a state dict (name -> tensor)")
    self._state = dict(state)

  def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in self._state:
      raise ConversionError(f"missing tensor {name} (expected shape {list(shape)})")
    value = self._state.pop(name)
    if not isinstance(value, np.ndarray) or value.shape != tuple(shape):
      got = list(value.shape) if isinstance(value, np.ndarray) else type(value).__name__
      raise ConversionError(f"tensor {name} has shape {got}, expected {list(shape)}")
    if not np.issubdtype(value.dtype, np.floating):
      raise ConversionError(f"tensor {name} has dtype {value.dtype}, expected float")
    if not np.all(np.isfinite(value)):
      raise ConversionError(f"tensor {name} holds NaN or Inf")
    return np.asarray(value, np.float32)

  def sn(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The spectral-normalised weight `[out, ...]` of module `name`."""
    return spectral_normalize(
      self.take(f"{name}.weight_orig", shape),
      self.take(f"{name}.weight_u", shape[:1]),
      self.take(f"{name}.weight_v", (int(np.prod(shape[1:])),)),
    )

  def conv(self, name: str, c_in: int, c_out: int, size: int):
    """`{kernel [size, size, c_in, c_out], bias [c_out]}` (HWIO)."""
    kernel = np.transpose(self.sn(name, (c_out, c_in, size, size)), (2, 3, 1, 0))
    return {"kernel": kernel, "bias": self.take(f"{name}.bias", (c_out,))}

  def stats(self, name: str, c: int, n_stats: int):
    return {
      "means": self.take(f"{name}.running_means", (n_stats, c)),
      "vars": self.take(f"{name}.running_vars", (n_stats, c)),
    }

  def finish(self):
    if self._state:
      extra = sorted(self._state)
      raise ConversionError(f"{len(extra)} unexpected tensor(s) for this config, e.g. {extra[:3]}")


def params_from_state_dict(state: dict, config: dict) -> dict:
  """Maps a pytorch-pretrained-biggan state dict (numpy arrays) to BigGAN params."""
  sd = _StateDict(state)
  cfg = biggan.Config.from_dict(config)
  ch, z_dim, k = cfg.channel_width, cfg.z_dim, cfg.n_stats
  d = 2 * z_dim
  params = {
    "embeddings": sd.take("embeddings.weight", (z_dim, cfg.num_classes)).T,
    "gen_z": {
      "kernel": sd.sn("generator.gen_z", (4 * 4 * 16 * ch, d)).T,
      "bias": sd.take("generator.gen_z.bias", (4 * 4 * 16 * ch,)),
    },
  }
  for i, layer in enumerate(cfg.generator_layers):
    name, c = f"generator.layers.{i}", layer.in_channels
    if layer.kind == "attention":
      params[f"layer_{i}"] = {
        "theta": sd.sn(f"{name}.snconv1x1_theta", (c // 8, c, 1, 1))[:, :, 0, 0].T,
        "phi": sd.sn(f"{name}.snconv1x1_phi", (c // 8, c, 1, 1))[:, :, 0, 0].T,
        "g": sd.sn(f"{name}.snconv1x1_g", (c // 2, c, 1, 1))[:, :, 0, 0].T,
        "o_conv": sd.sn(f"{name}.snconv1x1_o_conv", (c, c // 2, 1, 1))[:, :, 0, 0].T,
        "gamma": np.reshape(sd.take(f"{name}.gamma", (1,)), ()),
      }
      continue
    mid = c // biggan.REDUCTION
    widths = [(c, mid, 1), (mid, mid, 3), (mid, mid, 3), (mid, layer.out_channels, 1)]
    block = {}
    for j, (c_in, c_out, size) in enumerate(widths):
      bn = f"{name}.bn_{j}"
      block[f"bn_{j}"] = {
        "scale": sd.sn(f"{bn}.scale", (c_in, d)).T,
        "offset": sd.sn(f"{bn}.offset", (c_in, d)).T,
        **sd.stats(bn, c_in, k),
      }
      block[f"conv_{j}"] = sd.conv(f"{name}.conv_{j}", c_in, c_out, size)
    params[f"layer_{i}"] = block
  params["bn"] = {
    "weight": sd.take("generator.bn.weight", (ch,)),
    "bias": sd.take("generator.bn.bias", (ch,)),
    **sd.stats("generator.bn", ch, k),
  }
  params["conv_to_rgb"] = sd.conv("generator.conv_to_rgb", ch, ch, 3)
  sd.finish()
  return params


def convert(source) -> tuple[str, dict, dict]:
  """`(arch, config, params)` from a pytorch-pretrained-biggan folder or its weights."""
  folder = _folder(source)
  config = read_config(folder)
  name = WEIGHTS_NAME if source.is_dir else None
  if not os.path.isfile(source.file(name)):
    raise ConversionError(f"missing BigGAN weights file {source.file(name)}")
  return ARCH, config, params_from_state_dict(source.read(name), config)
