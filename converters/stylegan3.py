"""NVIDIA StyleGAN3 network pickles (`training.networks_stylegan3`, configs T and R).

Converts `G_ema` of a training snapshot read by `converters.safe_pickle`; the
module source embedded in the pickle is never used. A pickle names no module,
so the format is recognised by structure: the synthesis network has
`layer_names` (StyleGAN2's has `block_resolutions`). Run-time constants are
precomputed: FullyConnectedLayer gains are folded into the weights (`kernel
[in, out]`), conv weights become HWIO, the input's `weight / sqrt(channels)` is
stored transposed. The `up_filter`/`down_filter` buffers (absent for ToRGB),
`magnitude_ema` and the input's `transform`, `freqs` and `phases` are kept.
The mapping network is StyleGAN2's and converted by `converters.stylegan2.mapping`.
"""

from __future__ import annotations

import math

import numpy as np

from converters import Source, nvidia
from converters import stylegan2
from converters.errors import ConversionError
from converters.safe_pickle import Record

ARCH = "stylegan3"


def sniff(source: Source) -> bool:
  """A network pickle whose generator has a StyleGAN3 synthesis network."""
  state = nvidia.generator_class_state(source)
  return state is not None and "layer_names" in state


def _affine(rec: Record) -> dict:
  """A linear FullyConnectedLayer: `{kernel [in, out], bias [out]}`, gains folded in."""
  if nvidia.attr(rec, "activation") != "linear":
    raise ConversionError(
      f"StyleGAN3 affine layers must be linear, got {nvidia.attr(rec, 'activation')!r}"
    )
  return nvidia.dense(rec)


def _number(rec: Record, name: str) -> float:
  value = nvidia.attr(rec, name)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise ConversionError(f"{rec.class_name}.{name} is not a finite number: {value!r}")
  return value


def _ints(rec: Record, name: str) -> list[int]:
  values = np.asarray(nvidia.attr(rec, name))
  if values.dtype.kind not in "iu" or values.ndim != 1:
    raise ConversionError(f"{rec.class_name}.{name} is not a list of integers")
  return [int(v) for v in values]


def _input(rec: Record) -> tuple[dict, dict]:
  """SynthesisInput -> (config, params)."""
  channels = int(_number(rec, "channels"))
  config = {
    "channels": channels,
    "size": _ints(rec, "size"),
    "sampling_rate": _number(rec, "sampling_rate"),
    "bandwidth": _number(rec, "bandwidth"),
  }
  weight = nvidia.tensor(rec, "weight") / np.float32(math.sqrt(channels))
  params = {"weight": weight.T, "affine": _affine(nvidia.child(rec, "affine"))}
  params.update({k: nvidia.tensor(rec, k) for k in ("transform", "freqs", "phases")})
  return config, params


def _layer(name: str, rec: Record) -> tuple[dict, dict]:
  """SynthesisLayer (or the ToRGB layer) -> (config, params)."""
  clamp = nvidia.attr(rec, "conv_clamp")
  config = {
    "name": name,
    "is_torgb": bool(nvidia.attr(rec, "is_torgb")),
    "conv_clamp": None if clamp is None else _number(rec, "conv_clamp"),
  }
  for key in ("in_channels", "out_channels", "conv_kernel", "up_factor", "down_factor"):
    config[key] = int(_number(rec, key))
  for key in ("in_size", "out_size", "padding"):
    config[key] = _ints(rec, key)
  params = {
    "weight": nvidia.tensor(rec, "weight").transpose(2, 3, 1, 0),
    "bias": nvidia.tensor(rec, "bias"),
    "magnitude_ema": nvidia.tensor(rec, "magnitude_ema"),
    "affine": _affine(nvidia.child(rec, "affine")),
  }
  for key in ("up_filter", "down_filter"):
    if rec.state.get("_buffers", {}).get(key) is not None:  # None = identity.
      params[key] = nvidia.tensor(rec, key)
  return config, params


def convert(source: Source) -> tuple[str, dict, dict]:
  """`G_ema` of a StyleGAN3 snapshot -> `("stylegan3", config, params)`."""
  g = nvidia.g_ema(source)
  syn = nvidia.child(g, "synthesis")
  config = {
    k: int(nvidia.attr(g, k)) for k in ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels")
  }
  input_config, input_params = _input(nvidia.child(syn, "input"))
  names = nvidia.attr(syn, "layer_names")
  if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
    raise ConversionError("StyleGAN3 synthesis.layer_names is not a list of names")
  layers = [_layer(name, nvidia.child(syn, name)) for name in names]
  num_ws = int(nvidia.attr(g, "num_ws"))
  if num_ws != len(names) + 1:
    raise ConversionError(f"unexpected num_ws {num_ws} for {len(names)} layers")
  mapping_config, mapping_params = stylegan2.mapping(nvidia.child(g, "mapping"), config["c_dim"])
  config.update(
    input=input_config,
    layers=[c for c, _ in layers],
    output_scale=_number(syn, "output_scale"),
    mapping=mapping_config,
    source={
      "format": "nvidia-network-pickle",
      "init_kwargs": nvidia.jsonable(nvidia.attr(g, "_init_kwargs", {})),
    },
  )
  params = {
    "mapping": mapping_params,
    "input": input_params,
    "layers": {name: p for name, (_, p) in zip(names, layers)},
  }
  return ARCH, config, params
