"""StyleGAN3 (Karras et al., 2021, "Alias-Free GANs"), configs T and R, in JAX.

Reproduces NVIDIA's `training.networks_stylegan3` (the reference CPU path of
`filtered_lrelu`) from a converted network pickle: the StyleGAN2 mapping
network, the Fourier-feature input with its transform, `num_layers` synthesis
layers (modulated 3x3 convs for T, 1x1 for R, filtered leaky ReLU with the
checkpoint's own up/down filters, separable windowed-sinc or 2-D radial jinc)
and the final ToRGB layer, then `output_scale`.

Layers (`split`/`resume`): layer 0 is the output of the Fourier-feature input,
layer l the output of the first l entries of `layer_names` (L0, L1, ...), up to
the last layer before ToRGB, as the PandA repo's start/stop counts them.
Feature maps include the margins (e.g. 36x36 at a nominal 16x16). The carry is
`None`: the rest of the network needs only `x` and the latents. StyleGAN3 has
no noise inputs, so `noise_key` changes nothing.

fp16: NVIDIA runs the highest-resolution layers in float16 on GPU only; its CPU
reference, and this port, compute every layer in float32. NVIDIA's
pre-normalisation of the styles averages over the whole batch; here it is per
sample, so that no sample depends on its batch-mates (the factor cancels in
demodulation: both agree to float32 rounding).

Parameters (nested dicts; gains folded in by the converter, weights HWIO):
  mapping: StyleGAN2's (`stylegan2.Mapping`): {fcs_i, embed}/{kernel, bias}, w_avg.
  Latents are StyleGAN2's `stylegan2.mapping_latents` (one implementation).
  input: weight [c, c], affine {kernel [w_dim, 4], bias [4]}, transform [3, 3],
    freqs [c, 2], phases [c].
  layers/<name>: weight [k, k, c_in, c_out], bias [c_out], affine {kernel
    [w_dim, c_in], bias [c_in]}, magnitude_ema [], and (not for ToRGB)
    up_filter [t] and down_filter [t] (T; R: a radial [t, t] down_filter in the
    non-critically-sampled layers).
"""
from __future__ import annotations

import functools
import math
import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from panda_jax.generators import base
from panda_jax.generators import layers
from panda_jax.generators import stylegan2

def fourier_input(p, cfg, w):
  """Fourier-feature input layer (SynthesisInput): w [n, w_dim] -> [n, h, w, c].

  The affine map of `w` gives a rotation (r_c, r_s) and translation (t_x, t_y),
  composed with the stored user `transform`; the transformed frequencies are
  sampled on the grid of `torch.nn.functional.affine_grid(align_corners=False)`
  spanning `size / sampling_rate` units, and out-of-band ones are dampened.
  """
  n = w.shape[0]
  t = layers.dense(w, p["affine"]["kernel"], p["affine"]["bias"])  # [n, 4]
  t = t / jnp.linalg.norm(t[:, :2], axis=1, keepdims=True)
  c, s, tx, ty = t[:, 0], t[:, 1], t[:, 2], t[:, 3]
  one, zero = jnp.ones_like(c), jnp.zeros_like(c)
  m_r = jnp.stack([jnp.stack([c, -s, zero], -1), jnp.stack([s, c, zero], -1),
                   jnp.stack([zero, zero, one], -1)], 1)  # [n, 3, 3]
  m_t = jnp.stack([jnp.stack([one, zero, -tx], -1), jnp.stack([zero, one, -ty], -1),
                   jnp.stack([zero, zero, one], -1)], 1)  # [n, 3, 3]
  mat = layers.matmul(layers.matmul(m_r, m_t), p["transform"])  # [n, 3, 3]
  freqs0 = jnp.broadcast_to(p["freqs"], (n,) + p["freqs"].shape)  # [n, c, 2]
  phases = p["phases"][None, :] + layers.matmul(freqs0, mat[:, :2, 2:])[..., 0]  # [n, c]
  freqs = layers.matmul(freqs0, mat[:, :2, :2])  # [n, c, 2]
  bandwidth, rate = cfg.bandwidth, cfg.sampling_rate
  amplitudes = jnp.clip(1 - (jnp.linalg.norm(freqs, axis=2) - bandwidth)
                        / (rate / 2 - bandwidth), 0, 1)  # [n, c]
  size_w, size_h = cfg.size
  gx = ((2 * np.arange(size_w) + 1) / size_w - 1) * (0.5 * size_w / rate)  # [w]
  gy = ((2 * np.arange(size_h) + 1) / size_h - 1) * (0.5 * size_h / rate)  # [h]
  gx, gy = jnp.asarray(gx, jnp.float32), jnp.asarray(gy, jnp.float32)
  x = (gx[None, None, :, None] * freqs[:, None, None, :, 0]
       + gy[None, :, None, None] * freqs[:, None, None, :, 1])  # [n, h, w, c]
  x = x + phases[:, None, None, :]
  x = jnp.sin(x * (2 * np.pi)) * amplitudes[:, None, None, :]
  return layers.matmul(x, p["weight"])  # [n, h, w, c]


def modulated_conv(x, weight, styles, demodulate, input_gain):
  """StyleGAN3's modulated conv: StyleGAN2's (`layers.modulated_conv2d`) with
  'full' padding (k - 1 on each side), the input scaled by `input_gain`
  (1 / sqrt(magnitude_ema)) and, when demodulating, weight and styles first
  normalised to unit mean square (per output channel, per sample).

  x [n, h, w, i], weight [k, k, i, o], styles [n, i] -> [n, h + k - 1, w + k - 1, o].
  """
  k = weight.shape[0]
  if demodulate:
    weight = weight * lax.rsqrt(jnp.mean(jnp.square(weight), axis=(0, 1, 2), keepdims=True))
    styles = styles * lax.rsqrt(jnp.mean(jnp.square(styles), axis=1, keepdims=True))
  extra = k - 1 - k // 2  # modulated_conv2d pads k // 2.
  x = jnp.pad(x * input_gain, [(0, 0), (extra, extra), (extra, extra), (0, 0)])
  return layers.modulated_conv2d(x, weight, styles, demodulate=demodulate)


def upfirdn2d(x, f, up=1, down=1, padding=(0, 0, 0, 0), gain=1.0):
  """NVIDIA's `upfirdn2d` (reference path) on NHWC: upsample, pad, FIR, downsample.

  Unlike `layers.upfirdn2d` (static 2-D filters), `f` is a traced parameter
  (the checkpoint's `up_filter`/`down_filter` buffers). A 1-D filter is applied
  separably, along w then h as NVIDIA's reference does, in polyphase form
  (`layers.upfirdn_axis`: an order of magnitude faster than a depthwise conv over the
  zero-inserted signal on CPU). A 2-D filter (StyleGAN3-R's radial one) runs as
  one strided slice per tap, summed.

  x [n, h, w, c]; f [t] (separable) or [t_h, t_w], or None (identity);
  padding (x0, x1, y0, y1) w.r.t. the upsampled image, negative = crop.
  Zeros are inserted after each pixel, the filter is convolved (flipped) with
  total gain `gain`, and every `down`-th pixel is kept.
  Returns [n, (h*up + y0 + y1 - t_h + 1) // down (ceil), ..., c].
  """
  px0, px1, py0, py1 = padding
  if f is None:
    f = jnp.ones((1,), x.dtype)
  if f.ndim == 1:
    f = f * math.sqrt(gain)
    x = layers.upfirdn_axis(x, f, 2, up, down, px0, px1)
    return layers.upfirdn_axis(x, f, 1, up, down, py0, py1)
  x = lax.pad(x, jnp.zeros((), x.dtype),
              [(0, 0, 0), (py0, py1 + up - 1, up - 1),
               (px0, px1 + up - 1, up - 1), (0, 0, 0)])
  f = jnp.flip(f) * gain  # Correlation taps [t_h, t_w].
  t_h, t_w = f.shape
  out_h, out_w = (x.shape[1] - t_h) // down + 1, (x.shape[2] - t_w) // down + 1
  # One strided slice per tap, summed in one fusion: XLA:CPU's depthwise conv
  # took 2-3x torch's time here (StyleGAN3-R at 256 px, WORKSPACE.md).
  terms = [lax.slice(x, (0, a, b, 0), (x.shape[0], a + down * (out_h - 1) + 1,
                                       b + down * (out_w - 1) + 1, x.shape[3]),
                     (1, down, down, 1)) * f[a, b]
           for a in range(t_h) for b in range(t_w)]
  return functools.reduce(operator.add, terms)


def filtered_lrelu(x, fu, fd, b, up, down, padding, act, gain, clamp):
  """NVIDIA's `filtered_lrelu` (`_filtered_lrelu_ref`): bias, upsample with `fu`,
  `act` ("lrelu" with slope 0.2, or "linear") * gain, clamp to [-clamp, clamp],
  downsample with `fd`.

  x [n, h, w, c], b [c] -> [n, h', w', c]; `padding` (x0, x1, y0, y1).
  """
  x = upfirdn2d(x + b[None, None, None, :], fu, up=up, padding=padding, gain=up ** 2)
  x = layers.bias_act(x, act=act, gain=gain, clamp=clamp)
  return upfirdn2d(x, fd, down=down)


def synthesis_layer(p, cfg, x, w):
  """One SynthesisLayer (or the ToRGB layer): x [n, h, w, c_in], w [n, w_dim]
  -> [n, h', w', c_out] with the sizes of `cfg` (margins included)."""
  styles = layers.dense(w, p["affine"]["kernel"], p["affine"]["bias"])  # [n, c_in]
  torgb = cfg.is_torgb
  if torgb:
    styles = styles * (1 / math.sqrt(cfg.in_channels * cfg.conv_kernel ** 2))
  x = modulated_conv(x, p["weight"], styles, demodulate=not torgb,
                     input_gain=lax.rsqrt(p["magnitude_ema"]))
  return filtered_lrelu(
      x, p.get("up_filter"), p.get("down_filter"), p["bias"],
      up=cfg.up_factor, down=cfg.down_factor, padding=cfg.padding,
      act="linear" if torgb else "lrelu", gain=1.0 if torgb else math.sqrt(2),
      clamp=cfg.conv_clamp)


class InputConfig(NamedTuple):
  """SynthesisInput: `size` is (width, height) in pixels, margins included."""
  channels: int
  size: tuple[int, int]
  sampling_rate: float
  bandwidth: float


class LayerConfig(NamedTuple):
  """One SynthesisLayer; sizes are (width, height), `padding` (x0, x1, y0, y1)."""
  name: str
  is_torgb: bool
  in_channels: int
  out_channels: int
  in_size: tuple[int, int]
  out_size: tuple[int, int]
  conv_kernel: int
  up_factor: int
  down_factor: int
  padding: tuple[int, int, int, int]
  conv_clamp: float | None


class Config(NamedTuple):
  """Hashable configuration (the static argument of the jitted passes)."""
  mapping: stylegan2.MappingConfig
  input: InputConfig
  layers: tuple[LayerConfig, ...]
  output_scale: float

  @property
  def num_ws(self) -> int:
    return len(self.layers) + 1


_KEYS = ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels", "input", "layers",
         "output_scale", "mapping", "source")
_INPUT_KEYS = set(InputConfig._fields)
_LAYER_KEYS = set(LayerConfig._fields)


def _int(d: dict, key: str, where: str, low: int = 1) -> int:
  v = d.get(key)
  if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
    raise ValueError(f"StyleGAN3 config {where}: {key} must be an integer >= {low}, "
                     f"got {v!r}")
  return int(v)


def _num(d: dict, key: str, where: str) -> float:
  v = d.get(key)
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
    raise ValueError(f"StyleGAN3 config {where}: {key} must be a finite number, got {v!r}")
  return float(v)


def _ints(d: dict, key: str, where: str, length: int, low: int | None = 1):
  v = d.get(key)
  if (not isinstance(v, (list, tuple)) or len(v) != length
      or not all(isinstance(e, int) and not isinstance(e, bool) for e in v)
      or (low is not None and min(v) < low)):
    raise ValueError(f"StyleGAN3 config {where}: {key} must be {length} integers"
                     f"{'' if low is None else f' >= {low}'}, got {v!r}")
  return tuple(v)


def _keys(d, expected: set, where: str) -> None:
  if not isinstance(d, dict) or set(d) != expected:
    got = sorted(d) if isinstance(d, dict) else type(d).__name__
    raise ValueError(f"StyleGAN3 config {where}: keys must be {sorted(expected)}, got {got}")


def parse_config(config: dict) -> Config:
  """Validates a converted config dict (`converters.stylegan3`) -> `Config`."""
  unknown = set(config) - set(_KEYS)
  missing = set(_KEYS) - set(config) - {"source"}
  if unknown or missing:
    raise ValueError(f"StyleGAN3 config: missing keys {sorted(missing)}, "
                     f"unknown keys {sorted(unknown)}")
  inp = config["input"]
  _keys(inp, _INPUT_KEYS, "input")
  input_cfg = InputConfig(_int(inp, "channels", "input"), _ints(inp, "size", "input", 2),
                          _num(inp, "sampling_rate", "input"),
                          _num(inp, "bandwidth", "input"))
  if not 0 < input_cfg.bandwidth < input_cfg.sampling_rate / 2:
    raise ValueError("StyleGAN3 config input: need 0 < bandwidth < sampling_rate / 2")
  if not isinstance(config["layers"], (list, tuple)) or not config["layers"]:
    raise ValueError("StyleGAN3 config: layers must be a non-empty list")
  layers_cfg, prev = [], (input_cfg.channels, input_cfg.size)
  for i, d in enumerate(config["layers"]):
    where = f"layers[{i}]"
    _keys(d, _LAYER_KEYS, where)
    if not isinstance(d["name"], str) or not d["name"] or "/" in d["name"] or "." in d["name"]:
      raise ValueError(f"StyleGAN3 config {where}: bad layer name {d['name']!r}")
    layer = LayerConfig(
        d["name"], bool(d["is_torgb"]), _int(d, "in_channels", where),
        _int(d, "out_channels", where), _ints(d, "in_size", where, 2),
        _ints(d, "out_size", where, 2), _int(d, "conv_kernel", where),
        _int(d, "up_factor", where), _int(d, "down_factor", where),
        _ints(d, "padding", where, 4, low=None),
        None if d["conv_clamp"] is None else _num(d, "conv_clamp", where))
    if (layer.in_channels, layer.in_size) != prev:
      raise ValueError(f"StyleGAN3 config {where}: input {layer.in_channels} channels "
                       f"{layer.in_size} does not match the previous output {prev}")
    if layer.is_torgb != (i == len(config["layers"]) - 1):
      raise ValueError("StyleGAN3 config: the last layer, and only it, must be ToRGB")
    prev = (layer.out_channels, layer.out_size)
    layers_cfg.append(layer)
  if len({layer.name for layer in layers_cfg}) != len(layers_cfg):
    raise ValueError("StyleGAN3 config: layer names must be unique")
  if layers_cfg[-1].out_channels != _int(config, "img_channels", ""):
    raise ValueError("StyleGAN3 config: the ToRGB layer must output img_channels")
  if not isinstance(config["mapping"], dict):
    raise ValueError("StyleGAN3 config: mapping must be a dict")
  try:
    mapping = stylegan2.MappingConfig(
        z_dim=_int(config, "z_dim", "", 0), c_dim=_int(config, "c_dim", "", 0),
        w_dim=_int(config, "w_dim", ""), **config["mapping"])
  except TypeError as e:  # An unknown mapping option.
    raise ValueError(f"StyleGAN3 config mapping: {e}") from None
  return Config(mapping, input_cfg, tuple(layers_cfg), _num(config, "output_scale", ""))


def _filter_shape(p, name: str, where: str):
  """Shape of a layer's `[t]` or `[t_h, t_w]` filter, or None when absent."""
  if name not in p:
    return None
  shape = tuple(np.shape(p[name]))
  if len(shape) not in (1, 2) or min(shape) < 1:
    raise ValueError(f"StyleGAN3 params: {where}/{name} must be [t] or [t_h, t_w], "
                     f"got {shape}")
  return shape


def param_shapes(params, cfg: Config) -> dict:
  """The parameter tree `cfg` needs (`jax.ShapeDtypeStruct`s), filters as in `params`.

  Raises a `ValueError` when a layer's filters and padding do not give its
  `out_size` (NVIDIA's `((in + k - 1) * up + pad - (t_up - 1) - (t_down - 1)
  + down - 1) // down`, `in + k - 1` being the conv output).
  """
  def sds(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)

  w_dim, c = cfg.mapping.w_dim, cfg.input.channels
  expected = {"mapping": stylegan2.mapping_param_shapes(cfg.mapping),
              "input": {"weight": sds(c, c), "affine": {"kernel": sds(w_dim, 4),
                                                        "bias": sds(4)},
                        "transform": sds(3, 3), "freqs": sds(c, 2), "phases": sds(c)},
              "layers": {}}
  layer_params = params.get("layers", {}) if isinstance(params, dict) else {}
  for layer in cfg.layers:
    where = f"layers/{layer.name}"
    p = layer_params.get(layer.name, {}) if isinstance(layer_params, dict) else {}
    k, c_in, c_out = layer.conv_kernel, layer.in_channels, layer.out_channels
    e = {"weight": sds(k, k, c_in, c_out), "bias": sds(c_out), "magnitude_ema": sds(),
         "affine": {"kernel": sds(w_dim, c_in), "bias": sds(c_in)}}
    taps = []
    for name in ("up_filter", "down_filter"):
      shape = _filter_shape(p, name, where)
      if shape is not None:
        e[name] = sds(*shape)
      taps.append((1, 1) if shape is None else (shape[-1], shape[0]))
    x0, x1, y0, y1 = layer.padding
    for axis, pad in ((0, x0 + x1), (1, y0 + y1)):
      size = ((layer.in_size[axis] + k - 1) * layer.up_factor + pad - (taps[0][axis] - 1)
              - (taps[1][axis] - 1) + layer.down_factor - 1) // layer.down_factor
      if size != layer.out_size[axis]:
        raise ValueError(f"StyleGAN3 params: {where} filters and padding give size "
                         f"{size}, config says {layer.out_size[axis]}")
    expected["layers"][layer.name] = e
  return expected


# Jitted per layer (the static `cfg` is the cache key): split/resume at any
# layer reuse the same compiled layers, and remain jittable as a whole.
_fourier_input = jax.jit(fourier_input, static_argnames="cfg")
_synthesis_layer = jax.jit(synthesis_layer, static_argnames="cfg")


def _run(params, x, ws, cfg: Config, start: int, stop: int):
  """Layers start..stop-1 of x; ws[:, 1 + i] drives layer i (ws[:, 0] the input)."""
  for i in range(start, stop):
    layer = cfg.layers[i]
    x = _synthesis_layer(params[layer.name], layer, x, ws[:, 1 + i])
  return x


@base.register
class StyleGAN3(base.Generator):
  """A converted StyleGAN3-T/R generator; latents are ws [n, num_ws, w_dim]."""
  arch = "stylegan3"

  def __init__(self, config: dict, params):
    self.cfg = parse_config(config)
    stylegan2.check_params(params, param_shapes(params, self.cfg))
    super().__init__(config, jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params))

  @property
  def num_layers(self) -> int:
    """Largest `layer`: the last synthesis layer before ToRGB."""
    return len(self.cfg.layers) - 1

  @property
  def layers(self) -> range:
    """0 (the Fourier-feature input) .. num_layers."""
    return range(0, self.num_layers + 1)

  @property
  def num_ws(self) -> int:
    return self.cfg.num_ws

  def feature_shape(self, layer: int) -> tuple[int, int, int]:
    """(h, w, c) of the features after `layer` layers (margins included)."""
    layer = self.check_layer(layer)
    if layer == 0:
      return self.cfg.input.size[1], self.cfg.input.size[0], self.cfg.input.channels
    out = self.cfg.layers[layer - 1]
    return out.out_size[1], out.out_size[0], out.out_channels

  def latents(self, z, c=None, truncation_psi: float = 1.0,
              truncation_cutoff: int | None = None):
    """W+ codes [n, num_ws, w_dim] from z [n, z_dim] (and one-hot c [n, c_dim]).

    Truncation `w_avg + psi (w - w_avg)` on all codes, or on the first
    `truncation_cutoff` ones.
    """
    return stylegan2.mapping_latents(self.params["mapping"], self.cfg.mapping, z, c,
                                     truncation_psi, num_ws=self.num_ws,
                                     cutoff=truncation_cutoff)

  def _check_ws(self, latents):
    layers.check_ws(latents, self.num_ws, self.cfg.mapping.w_dim)

  def split(self, latents, layer: int, noise_key=None):
    """Features [n, h, w, c] after `layer` layers (margins included), carry None."""
    layer = self.check_layer(layer)
    self._check_ws(latents)
    ws = jnp.asarray(latents, jnp.float32)
    x = _fourier_input(self.params["input"], self.cfg.input, ws[:, 0])
    return _run(self.params["layers"], x, ws, self.cfg, 0, layer), None

  def resume(self, x, carry, latents, layer: int, noise_key=None):
    """Image [n, H, W, ch] from the features x [n, h, w, c] after `layer` layers."""
    layer = self.check_layer(layer)
    self._check_ws(latents)
    shape = self.feature_shape(layer)
    if x.ndim != 4 or tuple(x.shape[1:]) != shape or x.shape[0] != latents.shape[0]:
      raise ValueError(f"x must be [n={latents.shape[0]}, {shape[0]}, {shape[1]}, "
                       f"{shape[2]}] at layer {layer}, got shape {tuple(x.shape)}")
    x = _run(self.params["layers"], jnp.asarray(x, jnp.float32),
             jnp.asarray(latents, jnp.float32), self.cfg, layer, len(self.cfg.layers))
    return x * self.cfg.output_scale
