"""genforce `.pth` checkpoints (ProGAN `pggan`, StyleGAN `stylegan`, StyleGAN2) -> panda-jax.

A genforce checkpoint is `torch.save(dict(generator=state_dict,
generator_smooth=state_dict, ...))` (a torch zip archive, or the legacy format
for older files) or a bare generator state dict. It is read by the allowlisted
reader (`converters.safe_pickle`; nothing from the file is executed), the
averaged `generator_smooth` is preferred over `generator`, and the state dict is
mapped strictly: every tensor must be present with the shape the architecture
implies, and no other may be.

What genforce derives at run time is folded in here: the equalised-learning-rate
scales `gain / sqrt(fan_in)` (ProGAN/StyleGAN: gain sqrt(2) for hidden layers,
1 for ToRGB and the style affines; StyleGAN2: gain 1 everywhere, its leaky
ReLUs multiply by sqrt(2) instead), the mapping learning-rate multiplier
(weights and biases), and the transposed-conv orientation of fused up-convs.
Weights become channels-last: convs `[kh, kw, c_in, c_out]`, dense `[in, out]`.

genforce's StyleGAN2 (`stylegan2_generator.py`, config F: 'skip' or 'origin'
ToRGB architecture, constant input, demodulation) is the network of
`panda_jax.generators.stylegan2`; its names map as
  mapping.dense{i}               -> mapping/fcs_{i}
  truncation.w_avg               -> mapping/w_avg
  synthesis.early_layer.const    -> synthesis/const
  synthesis.layer{i}             -> synthesis/convs_{i}   (our layer i + 1)
  synthesis.output{k}            -> synthesis/torgbs_{k}
with `style` -> `affine` (its constant extra bias 1 added to the bias),
`noise` -> `noise_const` and the up-convs' kernels flipped spatially: genforce
runs `conv_transpose2d` on the flipped kernel (as the TF original), NVIDIA's
code and ours on the kernel as stored.

Not in the state dict, so genforce's defaults are assumed unless given to
`convert_state_dict`: `final_tanh=False`, the StyleGANs' `mapping_lr_mul=0.01`,
`fused_scale="auto"` (fused from 128x128 on), and ProGAN's `fused_scale`
(read from the weight layout where the channel counts tell, else False).
"""

from __future__ import annotations

import math

import numpy as np

from converters.errors import ConversionError
from panda_jax.generators import layers
from panda_jax.generators import progan
from panda_jax.generators import stylegan1
from panda_jax.generators import stylegan2

_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a"  # Pickle protocol 2, then torch's magic number.
_GAIN = math.sqrt(2.0)
_MAX_LAYERS = 2 * progan.num_layers_for(1024)


class _Tensors:
  """Takes float tensors out of a state dict by name, checking shapes; strict."""

  def __init__(self, state: dict):
    self._state = dict(state)

  def has(self, name: str) -> bool:
    return name in self._state

  def take(self, name: str, shape: tuple | None) -> np.ndarray:
    """The tensor `name` as float32; `None` entries of `shape` (or `shape` None)
    match any size."""
    if name not in self._state:
      raise ConversionError(f"missing tensor {name}")
    value = self._state.pop(name)
    if shape is None and isinstance(value, np.ndarray):
      shape = (None,) * value.ndim
    if (
      not isinstance(value, np.ndarray)
      or value.ndim != len(shape)
      or any(s is not None and s != v for s, v in zip(shape, value.shape))
    ):
      got = list(value.shape) if isinstance(value, np.ndarray) else type(value).__name__
      want = ["*" if s is None else s for s in shape]
      raise ConversionError(f"tensor {name} has shape {got}, expected {want}")
    if not np.issubdtype(value.dtype, np.floating):
      raise ConversionError(f"tensor {name} has dtype {value.dtype}, expected float")
    return np.asarray(value, np.float32)

  def count(self, pattern: str) -> int:
    """The number n of consecutive names `pattern.format(0) .. pattern.format(n - 1)`."""
    n = 0
    while n <= _MAX_LAYERS and pattern.format(n) in self._state:
      n += 1
    return n

  def finish(self) -> None:
    if self._state:
      extra = sorted(self._state)
      raise ConversionError(
        f"{len(extra)} unexpected tensor(s) in the genforce state dict, e.g. {extra[:3]}"
      )


def _scaled(weight: np.ndarray, scale: float) -> np.ndarray:
  return (weight.astype(np.float64) * scale).astype(np.float32)


def _conv(weight: np.ndarray, gain: float = _GAIN) -> np.ndarray:
  """torch conv weight `[out, in, k, k]` -> scaled `[k, k, in, out]`."""
  fan_in = weight.shape[1] * weight.shape[2] * weight.shape[3]
  return _scaled(np.transpose(weight, (2, 3, 1, 0)), gain / math.sqrt(fan_in))


def _fused_conv(weight: np.ndarray) -> np.ndarray:
  """A fused up-conv's `[in, out, 3, 3]` transposed-conv weight -> scaled `[3, 3, in, out]`.

  Flipped spatially into cross-correlation orientation, the one
  `layers.fused_upsample_conv3x3` takes.
  """
  fan_in = weight.shape[0] * 9
  flipped = np.transpose(weight[:, :, ::-1, ::-1], (2, 3, 0, 1))
  return _scaled(np.ascontiguousarray(flipped), _GAIN / math.sqrt(fan_in))


def _check_lod(sd: _Tensors, name: str) -> None:
  lod = float(sd.take(name, ()))  # A 0-d buffer.
  if lod != 0.0:
    raise ConversionError(
      f"{name} is {lod}: only trained models (level of detail 0) can be converted"
    )


def _num_layers(sd: _Tensors, pattern: str) -> int:
  n = sd.count(pattern)
  resolution = 2 << (n // 2)
  if n % 2 or resolution not in progan.RESOLUTIONS:
    raise ConversionError(
      f"{n} synthesis layers ({pattern.format('*')}) do not "
      "make a genforce generator of a supported resolution"
    )
  return n


def _to_rgb(sd: _Tensors, prefix: str, num_layers: int, c_last: int) -> dict:
  """The last ToRGB `{weight [c_last, ch], bias [ch]}`; the lower-resolution ones are
  only used while growing (lod > 0) and are checked, then dropped."""
  blocks = num_layers // 2
  if sd.count(prefix + "output{}.weight") != blocks:
    raise ConversionError(f"expected {blocks} ToRGB layers {prefix}output0..{blocks - 1}")
  for k in range(blocks - 1):
    sd.take(f"{prefix}output{k}.weight", (None, None, 1, 1))
    sd.take(f"{prefix}output{k}.bias", (None,))
  weight = sd.take(f"{prefix}output{blocks - 1}.weight", (None, c_last, 1, 1))
  channels = weight.shape[0]
  return {
    "weight": _conv(weight, gain=1.0)[0, 0],
    "bias": sd.take(f"{prefix}output{blocks - 1}.bias", (channels,)),
  }


def _pggan_fused_scale(state: dict, num_layers: int) -> bool:
  """ProGAN's fused_scale from the up-conv weight layouts: fused ones are stored
  `[in, out, 3, 3]` (transposed conv), others `[out, in, 3, 3]`."""
  votes = set()
  for i in range(2, num_layers, 2):
    weight, bias = state.get(f"layer{i}.weight"), state.get(f"layer{i}.bias")
    if not (
      isinstance(weight, np.ndarray)
      and isinstance(bias, np.ndarray)
      and weight.ndim == 4
      and bias.ndim == 1
    ):
      continue  # `take` reports it.
    if weight.shape[0] != weight.shape[1]:
      votes.add(weight.shape[1] == bias.shape[0])
  if len(votes) > 1:
    raise ConversionError("the up-conv weights mix fused and unfused layouts")
  return votes.pop() if votes else False


def _convert_pggan(state: dict, fused_scale: bool | None, final_tanh: bool) -> tuple[dict, dict]:
  sd = _Tensors(state)
  num_layers = _num_layers(sd, "layer{}.weight")
  if fused_scale is None:
    fused_scale = _pggan_fused_scale(state, num_layers)
  _check_lod(sd, "lod")
  weight = sd.take("layer0.weight", (None, None, 4, 4))
  c, z_dim = weight.shape[:2]
  # A 4x4 conv with padding 3 of a 1x1 input: output pixel (i, j) meets the
  # kernel tap (3 - i, 3 - j), so the dense kernel is the flipped conv kernel.
  params = {
    "layer0": {"weight": _conv(weight)[::-1, ::-1].copy(), "bias": sd.take("layer0.bias", (c,))}
  }
  for i in range(1, num_layers):
    bias = sd.take(f"layer{i}.bias", (None,))
    if i % 2 == 0 and fused_scale:
      kernel = _fused_conv(sd.take(f"layer{i}.weight", (c, bias.shape[0], 3, 3)))
    else:
      kernel = _conv(sd.take(f"layer{i}.weight", (bias.shape[0], c, 3, 3)))
    params[f"layer{i}"] = {"weight": kernel, "bias": bias}
    c = bias.shape[0]
  params["torgb"] = _to_rgb(sd, "", num_layers, c)
  sd.finish()
  config = {
    "resolution": 2 << (num_layers // 2),
    "z_dim": int(z_dim),
    "image_channels": int(params["torgb"]["bias"].shape[0]),
    "fused_scale": bool(fused_scale),
    "final_tanh": bool(final_tanh),
  }
  return config, params


def _mapping(
  sd: _Tensors, gain: float, lr_mul: float
) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
  """The mapping's dense layers `[(weight [in, out], bias [out])]` with
  `gain / sqrt(in) * lr_mul` and `lr_mul` folded in, and `w_avg [w_dim]`."""
  if sd.has("mapping.label_weight"):
    raise ConversionError(
      "conditional genforce generators (mapping.label_weight) are not supported"
    )
  n = sd.count("mapping.dense{}.weight")
  if n == 0:
    raise ConversionError("missing tensor mapping.dense0.weight [out, in]")
  dense, c = [], None
  for i in range(n):
    weight = sd.take(f"mapping.dense{i}.weight", (None, c))
    c_out, c_in = weight.shape
    dense.append(
      (
        _scaled(weight.T, gain / math.sqrt(c_in) * lr_mul),
        _scaled(sd.take(f"mapping.dense{i}.bias", (c_out,)), lr_mul),
      )
    )
    c = c_out
  w_avg = sd.take("truncation.w_avg", (None,))
  if w_avg.shape != (c,):
    raise ConversionError(
      f"truncation.w_avg has {w_avg.shape[0]} entries, expected "
      f"w_dim = {c} (repeat_w=False is not supported)"
    )
  return dense, w_avg


def _convert_stylegan(
  state: dict, fused_scale: bool | str, final_tanh: bool, mapping_lr_mul: float
) -> tuple[dict, dict]:
  sd = _Tensors(state)
  if sd.has("synthesis.layer0.weight"):
    raise ConversionError(
      "genforce StyleGAN without a constant input (const_input=False) is not supported"
    )
  dense, w_avg = _mapping(sd, _GAIN, mapping_lr_mul)
  mapping = {f"dense{i}": {"weight": w, "bias": b} for i, (w, b) in enumerate(dense)}
  z_dim, w_dim = dense[0][0].shape[0], w_avg.shape[0]
  _check_lod(sd, "synthesis.lod")
  num_layers = _num_layers(sd, "synthesis.layer{}.bias")
  params = {"mapping": mapping, "w_avg": w_avg}
  c = None  # Layer 0 (the constant) sets it before any conv reads it.
  for i in range(num_layers):
    name, res = f"synthesis.layer{i}", 4 << (i // 2)
    bias = sd.take(f"{name}.bias", (None,))
    c_out = bias.shape[0]
    layer = {"bias": bias}
    if i == 0:
      const = sd.take(f"{name}.const", (1, c_out, 4, 4))
      layer["const"] = np.ascontiguousarray(np.transpose(const, (0, 2, 3, 1)))
    else:
      weight = sd.take(f"{name}.weight", (c_out, c, 3, 3))
      if i % 2 == 0 and stylegan1.uses_fused_scale(fused_scale, res):
        # genforce permutes `[out, in]` to the transposed conv's `[in, out]`.
        layer["weight"] = _fused_conv(np.transpose(weight, (1, 0, 2, 3)))
      else:
        layer["weight"] = _conv(weight)
    if i > 0 and i % 2 == 0:
      blur = sd.take(f"{name}.blur.kernel", (c_out, 1, 3, 3))
      if not np.allclose(blur, stylegan1.BLUR_FILTER[None, None], rtol=0, atol=1e-7):
        raise ConversionError(f"{name}.blur.kernel is not the [1, 2, 1] blur filter")
    noise = sd.take(f"{name}.apply_noise.noise", (1, None, res, res))
    if noise.shape[1] != 1:
      raise ConversionError(
        f"{name}.apply_noise.noise is per channel: only noise_type='spatial' is supported"
      )
    layer["noise"] = np.ascontiguousarray(np.transpose(noise, (0, 2, 3, 1)))
    layer["noise_strength"] = sd.take(f"{name}.apply_noise.weight", (c_out,))
    style = sd.take(f"{name}.style.weight", (2 * c_out, w_dim))
    layer["style"] = {
      "weight": _scaled(style.T, 1.0 / math.sqrt(w_dim)),
      "bias": sd.take(f"{name}.style.bias", (2 * c_out,)),
    }
    params[f"layer{i}"] = layer
    c = c_out
  params["torgb"] = _to_rgb(sd, "synthesis.", num_layers, c)
  sd.finish()
  config = {
    "resolution": 2 << (num_layers // 2),
    "z_dim": int(z_dim),
    "w_dim": int(w_dim),
    "image_channels": int(params["torgb"]["bias"].shape[0]),
    "fused_scale": fused_scale,
    "final_tanh": bool(final_tanh),
  }
  return config, params


_UP_FILTER = 4 * layers.setup_filter([1, 3, 3, 1])  # genforce's kernels (gain 2^2).


def _sg2_filter(sd: _Tensors, name: str) -> None:
  kernel = sd.take(name, (1, 1, 4, 4))
  if not np.allclose(kernel[0, 0], _UP_FILTER, rtol=0, atol=1e-6):
    raise ConversionError(f"{name} is not the [1, 3, 3, 1] upsampling filter")


def _sg2_modconv(
  sd: _Tensors, name: str, c_in: int | None, w_dim: int, k: int, up: bool = False
) -> dict:
  """A ModulateConvBlock -> `stylegan2` params (`affine`, `weight [k, k, i, o]`, `bias`).

  genforce scales the weight by `1 / sqrt(fan_in)`; for the convs we fold it in
  (demodulation divides it out anyway), for ToRGB (k = 1, no demodulation) we
  move it to the styles, where NVIDIA's ToRGB has it, so that both formats give
  the same parameters.
  """
  weight = sd.take(f"{name}.weight", (None, c_in, k, k))
  if up:  # genforce's conv_transpose2d runs on the flipped kernel.
    weight = weight[:, :, ::-1, ::-1]
  c_out, c_in = weight.shape[:2]
  style = sd.take(f"{name}.style.weight", (c_in, w_dim))
  affine = {
    "kernel": _scaled(style.T, 1.0 / math.sqrt(w_dim)),
    "bias": sd.take(f"{name}.style.bias", (c_in,)) + 1.0,
  }
  if k == 1:  # ToRGB.
    gain = 1.0 / math.sqrt(c_in)
    affine = {key: _scaled(value, gain) for key, value in affine.items()}
    weight = np.ascontiguousarray(np.transpose(weight, (2, 3, 1, 0)))  # [1, 1, i, o]
  else:
    weight = _conv(np.ascontiguousarray(weight), gain=1.0)
  return {"affine": affine, "weight": weight, "bias": sd.take(f"{name}.bias", (c_out,))}


def _convert_stylegan2(state: dict, final_tanh: bool, mapping_lr_mul: float) -> tuple[dict, dict]:
  if final_tanh:
    raise ConversionError("genforce StyleGAN2 with final_tanh=True is not supported")
  sd = _Tensors(state)
  if sd.has("synthesis.early_layer.weight"):
    raise ConversionError(
      "genforce StyleGAN2 without a constant input (const_input=False) is not supported"
    )
  dense, w_avg = _mapping(sd, 1.0, mapping_lr_mul)
  z_dim, w_dim = dense[0][0].shape[0], w_avg.shape[0]
  num_convs = sd.count("synthesis.layer{}.weight")
  blocks = (num_convs + 1) // 2
  if num_convs % 2 == 0 or not 1 <= blocks <= 11:
    raise ConversionError(
      f"{num_convs} modulated conv layers (synthesis.layer*) do not make a genforce StyleGAN2"
    )
  const = sd.take("synthesis.early_layer.const", (1, None, 4, 4))
  syn = {"const": np.ascontiguousarray(np.transpose(const[0], (1, 2, 0)))}
  channels, c = [], const.shape[1]
  for i in range(num_convs):
    name, res, up = f"synthesis.layer{i}", 4 << ((i + 1) // 2), i % 2 == 1
    conv = _sg2_modconv(sd, name, c, w_dim, 3, up)
    c = conv["bias"].shape[0]
    if up:
      _sg2_filter(sd, f"{name}.filter.kernel")
    conv["noise_strength"] = sd.take(f"{name}.noise_strength", ())
    conv["noise_const"] = sd.take(f"{name}.noise", (1, 1, res, res))[0, 0]
    syn[f"convs_{i}"] = conv
    if i % 2 == 0:
      channels.append(int(c))
  skip = sd.count("synthesis.output{}.weight") == blocks
  if skip:
    _sg2_filter(sd, "synthesis.upsample.kernel")
  for k in range(blocks) if skip else [blocks - 1]:
    syn[f"torgbs_{k if skip else 0}"] = _sg2_modconv(
      sd, f"synthesis.output{k}", channels[k], w_dim, 1
    )
  sd.finish()
  mapping = {f"fcs_{i}": {"kernel": w, "bias": b} for i, (w, b) in enumerate(dense)}
  config = {
    "z_dim": int(z_dim),
    "c_dim": 0,
    "w_dim": int(w_dim),
    "img_resolution": 4 << (blocks - 1),
    "img_channels": int(syn["torgbs_0"]["bias"].shape[0]),
    "channels": channels,
    "mapping_layers": len(dense),
    "mapping_features": int(dense[0][0].shape[1]) if len(dense) > 1 else None,
    "architecture": "skip" if skip else "orig",
    "source": {"format": "genforce-pth", "mapping_lr_mul": mapping_lr_mul},
  }
  return config, {"mapping": {**mapping, "w_avg": w_avg}, "synthesis": syn}


def state_dict(obj) -> dict | None:
  """The generator state dict of a loaded genforce checkpoint (`generator_smooth`
  preferred), or of a bare state dict; None when `obj` is neither."""
  if isinstance(obj, dict):
    for key in ("generator_smooth", "generator"):
      if isinstance(obj.get(key), dict):
        obj = obj[key]
        break
  if (
    isinstance(obj, dict)
    and obj
    and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items())
  ):
    return obj
  return None


def kind(state: dict) -> str | None:
  """The architecture ("pggan", "stylegan", "stylegan2" or None) from the parameter names."""
  if "lod" in state and "layer0.weight" in state:
    return progan.ProGAN.arch
  if "truncation.w_avg" in state and "synthesis.layer0.apply_noise.noise" in state:
    return stylegan1.StyleGAN.arch
  if "truncation.w_avg" in state and "synthesis.early_layer.const" in state:
    return stylegan2.StyleGAN2.arch
  return None


def convert_state_dict(
  state: dict,
  *,
  fused_scale: bool | str | None = None,
  final_tanh: bool = False,
  mapping_lr_mul: float = 0.01,
) -> tuple[str, dict, dict]:
  """`(arch, config, params)` of a genforce ProGAN, StyleGAN or StyleGAN2 state dict.

  Args:
    state: parameter name -> numpy array, as `torch.save`d by genforce.
    fused_scale: None for genforce's default (ProGAN: from the weight layout,
      else False; StyleGAN: "auto"), or the constructor's value (StyleGAN2
      has none).
    final_tanh: the constructor's `final_tanh`.
    mapping_lr_mul: the StyleGANs' mapping learning-rate multiplier.
  """
  arch = kind(state)
  if arch == progan.ProGAN.arch:
    if fused_scale not in (None, True, False):
      raise ConversionError(f"ProGAN fused_scale must be a bool, got {fused_scale!r}")
    config, params = _convert_pggan(state, fused_scale, final_tanh)
  elif arch == stylegan1.StyleGAN.arch:
    fused_scale = "auto" if fused_scale is None else fused_scale
    if fused_scale not in (True, False, "auto"):
      raise ConversionError(
        f"StyleGAN fused_scale must be True, False or 'auto', got {fused_scale!r}"
      )
    config, params = _convert_stylegan(state, fused_scale, final_tanh, float(mapping_lr_mul))
  elif arch == stylegan2.StyleGAN2.arch:
    if fused_scale is not None:
      raise ConversionError("genforce StyleGAN2 has no fused_scale option")
    config, params = _convert_stylegan2(state, final_tanh, float(mapping_lr_mul))
  else:
    raise ConversionError("not a genforce ProGAN, StyleGAN or StyleGAN2 generator state dict")
  return arch, config, params


def _is_torch_file(path: str) -> bool:
  try:
    with open(path, "rb") as f:
      head = f.read(4)
  except OSError:
    return False
  return head in (_ZIP_MAGIC, _LEGACY_MAGIC)


def sniff(source) -> bool:
  """True for a torch file holding a genforce ProGAN, StyleGAN or StyleGAN2 generator."""
  if source.is_dir or not _is_torch_file(source.path):
    return False
  try:
    state = state_dict(source.read())
  except ConversionError:
    return False
  return state is not None and kind(state) is not None


def convert(source) -> tuple[str, dict, dict]:
  """`(arch, config, params)` of a genforce `.pth` (a `converters.Source`)."""
  state = state_dict(source.read())
  if state is None:
    raise ConversionError(f"{source.path} holds no genforce generator state dict")
  return convert_state_dict(state)
