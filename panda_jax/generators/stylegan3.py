"""StyleGAN3 (Karras et al., 2021, "Alias-Free GANs"), configs T and R, in Flax.

Reproduces NVIDIA's `training.networks_stylegan3` (the reference CPU path of
`filtered_lrelu`) from a converted network pickle: the StyleGAN2 mapping
network, the Fourier-feature input with its transform, `num_layers` synthesis
layers (modulated 3x3 convs for T, 1x1 for R, filtered leaky ReLU with the
checkpoint's own up/down filters, separable windowed-sinc or 2-D radial jinc)
and the final ToRGB layer, then `output_scale`.

Modules: StyleGAN2's `stylegan2.Mapping` (params `mapping`), `SynthesisInput`
(`input`) and one `SynthesisLayer` per entry of `layer_names` (`layers/<name>`),
gathered by `StyleGAN3Net`, whose parameter tree (`param_shapes`) is the
converted layout. `split`/`resume` apply the input and each layer on its own
(`synthesis_input`, `synthesis_layer`), jitted per layer with its static config
as the cache key, so that splitting at any layer reuses the compiled layers.

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
config.json does not record the filters' sizes (taps, separable or radial):
`Config.from_dict` takes them from the shapes of the parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from panda_jax.generators import base
from panda_jax.generators import layers
from panda_jax.generators import stylegan2

_zeros = nn.initializers.zeros
_FILTERS = ("up_filter", "down_filter")


def _int(d: dict, key: str, where: str, low: int = 1) -> int:
  v = d.get(key)
  if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
    raise ValueError(f"StyleGAN3 config {where}: {key} must be an integer >= {low}, got {v!r}")
  return int(v)


def _num(d: dict, key: str, where: str) -> float:
  v = d.get(key)
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
    raise ValueError(f"StyleGAN3 config {where}: {key} must be a finite number, got {v!r}")
  return float(v)


def _ints(d: dict, key: str, where: str, length: int, low: int | None = 1):
  v = d.get(key)
  if (
    not isinstance(v, (list, tuple))
    or len(v) != length
    or not all(isinstance(e, int) and not isinstance(e, bool) for e in v)
    or (low is not None and min(v) < low)
  ):
    raise ValueError(
      f"StyleGAN3 config {where}: {key} must be {length} integers"
      f"{'' if low is None else f' >= {low}'}, got {v!r}"
    )
  return tuple(v)


def _keys(d, expected: set, where: str) -> None:
  if not isinstance(d, dict) or set(d) != expected:
    got = sorted(d) if isinstance(d, dict) else type(d).__name__
    raise ValueError(f"StyleGAN3 config {where}: keys must be {sorted(expected)}, got {got}")


def _filter_shapes(params, name: str) -> dict[str, tuple[int, ...]]:
  """Shapes of the filters that `params["layers"][name]` holds (malformed trees: none;
  `param_shapes` reports them)."""
  p = params.get("layers") if isinstance(params, dict) else None
  p = p.get(name) if isinstance(p, dict) else None
  if not isinstance(p, dict):
    return {}
  return {k: tuple(np.shape(p[k])) for k in _FILTERS if k in p}


@dataclasses.dataclass(frozen=True)
class InputConfig:
  """SynthesisInput: `size` is (width, height) in pixels, margins included."""

  channels: int
  size: tuple[int, int]
  sampling_rate: float
  bandwidth: float

  def __post_init__(self):
    if not 0 < self.bandwidth < self.sampling_rate / 2:
      raise ValueError("StyleGAN3 config input: need 0 < bandwidth < sampling_rate / 2")

  @classmethod
  def from_dict(cls, d: dict) -> "InputConfig":
    """From the `input` entry of a converted config."""
    _keys(d, {f.name for f in dataclasses.fields(cls)}, "input")
    return cls(
      _int(d, "channels", "input"),
      _ints(d, "size", "input", 2),
      _num(d, "sampling_rate", "input"),
      _num(d, "bandwidth", "input"),
    )


@dataclasses.dataclass(frozen=True)
class LayerConfig:
  """One SynthesisLayer; sizes are (width, height), `padding` (x0, x1, y0, y1).

  `up_filter`, `down_filter`: the shapes of the layer's filters, `[t]`
  (separable) or `[t_h, t_w]` (radial), None when absent (identity).
  """

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
  up_filter: tuple[int, ...] | None = None
  down_filter: tuple[int, ...] | None = None

  def __post_init__(self):
    """Filters `[t]` or `[t_h, t_w]` that, with the padding, give `out_size`.

    NVIDIA's size: `((in + k - 1) * up + pad - (t_up - 1) - (t_down - 1) + down - 1)
    // down`, `in + k - 1` being the conv output.
    """
    taps = []
    for name in _FILTERS:
      shape = getattr(self, name)
      if shape is not None and (len(shape) not in (1, 2) or min(shape) < 1):
        raise ValueError(
          f"StyleGAN3 params: layers/{self.name}/{name} must be [t] or [t_h, t_w], got {shape}"
        )
      taps.append((1, 1) if shape is None else (shape[-1], shape[0]))
    x0, x1, y0, y1 = self.padding
    k = self.conv_kernel
    for axis, pad in ((0, x0 + x1), (1, y0 + y1)):
      size = (
        (self.in_size[axis] + k - 1) * self.up_factor
        + pad
        - (taps[0][axis] - 1)
        - (taps[1][axis] - 1)
        + self.down_factor
        - 1
      ) // self.down_factor
      if size != self.out_size[axis]:
        raise ValueError(
          f"StyleGAN3 params: layers/{self.name} filters and padding give "
          f"size {size}, config says {self.out_size[axis]}"
        )

  @classmethod
  def from_dict(cls, d: dict, where: str, params) -> "LayerConfig":
    """From an entry `where` of a converted config's `layers`; the filter shapes
    from `params` (see `Config.from_dict`)."""
    _keys(d, {f.name for f in dataclasses.fields(cls)} - set(_FILTERS), where)
    name = d["name"]
    if not isinstance(name, str) or not name or "/" in name or "." in name:
      raise ValueError(f"StyleGAN3 config {where}: bad layer name {name!r}")
    return cls(
      name,
      bool(d["is_torgb"]),
      _int(d, "in_channels", where),
      _int(d, "out_channels", where),
      _ints(d, "in_size", where, 2),
      _ints(d, "out_size", where, 2),
      _int(d, "conv_kernel", where),
      _int(d, "up_factor", where),
      _int(d, "down_factor", where),
      _ints(d, "padding", where, 4, low=None),
      None if d["conv_clamp"] is None else _num(d, "conv_clamp", where),
      **_filter_shapes(params, name),
    )


@dataclasses.dataclass(frozen=True)
class Config:
  """Static options of a StyleGAN3 generator (hashable: the jit cache key)."""

  mapping: stylegan2.MappingConfig
  input: InputConfig
  layers: tuple[LayerConfig, ...]  # The last one is ToRGB.
  output_scale: float
  img_resolution: int
  img_channels: int

  def __post_init__(self):
    if not self.layers:
      raise ValueError("StyleGAN3 config: layers must be a non-empty list")
    prev = (self.input.channels, self.input.size)
    for i, layer in enumerate(self.layers):
      if (layer.in_channels, layer.in_size) != prev:
        raise ValueError(
          f"StyleGAN3 config layers[{i}]: input {layer.in_channels} channels "
          f"{layer.in_size} does not match the previous output {prev}"
        )
      if layer.is_torgb != (i == len(self.layers) - 1):
        raise ValueError("StyleGAN3 config: the last layer, and only it, must be ToRGB")
      prev = (layer.out_channels, layer.out_size)
    if len({layer.name for layer in self.layers}) != len(self.layers):
      raise ValueError("StyleGAN3 config: layer names must be unique")
    if self.layers[-1].out_channels != self.img_channels:
      raise ValueError("StyleGAN3 config: the ToRGB layer must output img_channels")

  @classmethod
  def from_dict(cls, config: dict, params) -> "Config":
    """From a converted config (`converters.stylegan3`) and its parameters.

    config.json does not record the sizes of the filters: they are the shapes
    of `params["layers"][name]["up_filter" / "down_filter"]` (absent: none),
    the only thing read from `params` (`param_shapes` checks the rest).
    """
    keys = {
      "z_dim",
      "c_dim",
      "w_dim",
      "img_resolution",
      "img_channels",
      "input",
      "layers",
      "output_scale",
      "mapping",
    }
    unknown = set(config) - keys - {"source"}
    missing = keys - set(config)
    if unknown or missing:
      raise ValueError(
        f"StyleGAN3 config: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}"
      )
    input_cfg = InputConfig.from_dict(config["input"])
    if not isinstance(config["layers"], (list, tuple)) or not config["layers"]:
      raise ValueError("StyleGAN3 config: layers must be a non-empty list")
    layers_cfg = tuple(
      LayerConfig.from_dict(d, f"layers[{i}]", params) for i, d in enumerate(config["layers"])
    )
    if not isinstance(config["mapping"], dict):
      raise ValueError("StyleGAN3 config: mapping must be a dict")
    try:
      mapping = stylegan2.MappingConfig(
        z_dim=_int(config, "z_dim", "", 0),
        c_dim=_int(config, "c_dim", "", 0),
        w_dim=_int(config, "w_dim", ""),
        **config["mapping"],
      )
    except TypeError as e:  # An unknown mapping option.
      raise ValueError(f"StyleGAN3 config mapping: {e}") from None
    return cls(
      mapping,
      input_cfg,
      layers_cfg,
      _num(config, "output_scale", ""),
      _int(config, "img_resolution", ""),
      _int(config, "img_channels", ""),
    )

  @property
  def num_ws(self) -> int:
    return len(self.layers) + 1


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
  x = lax.pad(
    x,
    jnp.zeros((), x.dtype),
    [(0, 0, 0), (py0, py1 + up - 1, up - 1), (px0, px1 + up - 1, up - 1), (0, 0, 0)],
  )
  f = jnp.flip(f) * gain  # Correlation taps [t_h, t_w].
  t_h, t_w = f.shape
  out_h, out_w = (x.shape[1] - t_h) // down + 1, (x.shape[2] - t_w) // down + 1
  # One strided slice per tap, summed in one fusion: XLA:CPU's depthwise conv
  # took 2-3x torch's time here (StyleGAN3-R at 256 px, WORKSPACE.md).
  terms = [
    lax.slice(
      x,
      (0, a, b, 0),
      (x.shape[0], a + down * (out_h - 1) + 1, b + down * (out_w - 1) + 1, x.shape[3]),
      (1, down, down, 1),
    )
    * f[a, b]
    for a in range(t_h)
    for b in range(t_w)
  ]
  return functools.reduce(operator.add, terms)


def filtered_lrelu(x, fu, fd, b, up, down, padding, act, gain, clamp):
  """NVIDIA's `filtered_lrelu` (`_filtered_lrelu_ref`): bias, upsample with `fu`,
  `act` ("lrelu" with slope 0.2, or "linear") * gain, clamp to [-clamp, clamp],
  downsample with `fd`.

  x [n, h, w, c], b [c] -> [n, h', w', c]; `padding` (x0, x1, y0, y1).
  """
  x = upfirdn2d(x + b[None, None, None, :], fu, up=up, padding=padding, gain=up**2)
  x = layers.bias_act(x, act=act, gain=gain, clamp=clamp)
  return upfirdn2d(x, fd, down=down)


class SynthesisInput(nn.Module):
  """Fourier-feature input layer (SynthesisInput): w [n, w_dim] -> [n, h, w, c].

  The affine map of `w` gives a rotation (r_c, r_s) and translation (t_x, t_y),
  composed with the stored user `transform`; the transformed frequencies are
  sampled on the grid of `torch.nn.functional.affine_grid(align_corners=False)`
  spanning `size / sampling_rate` units, and out-of-band ones are dampened.
  """

  cfg: InputConfig

  @nn.compact
  def __call__(self, w):
    cfg, ch, n = self.cfg, self.cfg.channels, w.shape[0]
    t = nn.Dense(4, name="affine", precision=layers.PRECISION)(w)  # [n, 4]
    weight = self.param("weight", _zeros, (ch, ch))
    transform = self.param("transform", _zeros, (3, 3))
    freqs = self.param("freqs", _zeros, (ch, 2))
    phases = self.param("phases", _zeros, (ch,))
    t = t / jnp.linalg.norm(t[:, :2], axis=1, keepdims=True)
    c, s, tx, ty = t[:, 0], t[:, 1], t[:, 2], t[:, 3]
    one, zero = jnp.ones_like(c), jnp.zeros_like(c)
    m_r = jnp.stack(
      [jnp.stack([c, -s, zero], -1), jnp.stack([s, c, zero], -1), jnp.stack([zero, zero, one], -1)],
      1,
    )  # [n, 3, 3]
    m_t = jnp.stack(
      [
        jnp.stack([one, zero, -tx], -1),
        jnp.stack([zero, one, -ty], -1),
        jnp.stack([zero, zero, one], -1),
      ],
      1,
    )  # [n, 3, 3]
    mat = layers.matmul(layers.matmul(m_r, m_t), transform)  # [n, 3, 3]
    freqs0 = jnp.broadcast_to(freqs, (n,) + freqs.shape)  # [n, c, 2]
    phases = phases[None, :] + layers.matmul(freqs0, mat[:, :2, 2:])[..., 0]  # [n, c]
    freqs = layers.matmul(freqs0, mat[:, :2, :2])  # [n, c, 2]
    bandwidth, rate = cfg.bandwidth, cfg.sampling_rate
    amplitudes = jnp.clip(
      1 - (jnp.linalg.norm(freqs, axis=2) - bandwidth) / (rate / 2 - bandwidth), 0, 1
    )  # [n, c]
    size_w, size_h = cfg.size
    gx = ((2 * np.arange(size_w) + 1) / size_w - 1) * (0.5 * size_w / rate)  # [w]
    gy = ((2 * np.arange(size_h) + 1) / size_h - 1) * (0.5 * size_h / rate)  # [h]
    gx, gy = jnp.asarray(gx, jnp.float32), jnp.asarray(gy, jnp.float32)
    x = (
      gx[None, None, :, None] * freqs[:, None, None, :, 0]
      + gy[None, :, None, None] * freqs[:, None, None, :, 1]
    )  # [n, h, w, c]
    x = x + phases[:, None, None, :]
    x = jnp.sin(x * (2 * np.pi)) * amplitudes[:, None, None, :]
    return layers.matmul(x, weight)  # [n, h, w, c]


class SynthesisLayer(nn.Module):
  """One SynthesisLayer (or the ToRGB layer): x [n, h, w, c_in], w [n, w_dim]
  -> [n, h', w', c_out] with the sizes of `cfg` (margins included)."""

  cfg: LayerConfig

  @nn.compact
  def __call__(self, x, w):
    cfg = self.cfg
    k, c_in, c_out = cfg.conv_kernel, cfg.in_channels, cfg.out_channels
    styles = nn.Dense(c_in, name="affine", precision=layers.PRECISION)(w)  # [n, c_in]
    weight = self.param("weight", _zeros, (k, k, c_in, c_out))
    bias = self.param("bias", _zeros, (c_out,))
    magnitude_ema = self.param("magnitude_ema", _zeros, ())
    up_filter, down_filter = (
      None if getattr(cfg, name) is None else self.param(name, _zeros, getattr(cfg, name))
      for name in _FILTERS
    )
    torgb = cfg.is_torgb
    if torgb:
      styles = styles * (1 / math.sqrt(c_in * k**2))
    x = modulated_conv(x, weight, styles, demodulate=not torgb, input_gain=lax.rsqrt(magnitude_ema))
    return filtered_lrelu(
      x,
      up_filter,
      down_filter,
      bias,
      up=cfg.up_factor,
      down=cfg.down_factor,
      padding=cfg.padding,
      act="linear" if torgb else "lrelu",
      gain=1.0 if torgb else math.sqrt(2),
      clamp=cfg.conv_clamp,
    )


class SynthesisLayers(nn.Module):
  """The synthesis layers in order, each named by its config (params `layers/<name>`)."""

  cfg: tuple[LayerConfig, ...]

  @nn.compact
  def __call__(self, x, w):
    """`x [n, h, w, c]` through every layer, each driven by `w [n, w_dim]`."""
    for layer in self.cfg:
      x = SynthesisLayer(layer, name=layer.name)(x, w)
    return x


class StyleGAN3Net(nn.Module):
  """Mapping, input and synthesis layers under one parameter tree."""

  cfg: Config

  @nn.compact
  def __call__(self, z, c):
    """The image `[n, H, W, ch]` of `z [n, z_dim]`, `c [n, c_dim]`, untruncated: the
    initialisation path touching every parameter."""
    cfg = self.cfg
    w = stylegan2.Mapping(cfg.mapping, name="mapping")(z, c)  # [n, w_dim]
    x = SynthesisInput(cfg.input, name="input")(w)
    return SynthesisLayers(cfg.layers, name="layers")(x, w) * cfg.output_scale


def param_shapes(cfg: Config) -> Any:
  """The parameter tree a `cfg` needs, as `jax.ShapeDtypeStruct`s."""
  z = jax.ShapeDtypeStruct((1, cfg.mapping.z_dim), jnp.float32)
  c = jax.ShapeDtypeStruct((1, cfg.mapping.c_dim), jnp.float32)
  return jax.eval_shape(StyleGAN3Net(cfg).init, jax.random.key(0), z, c)["params"]


@functools.partial(jax.jit, static_argnames="cfg")
def synthesis_input(params, cfg: InputConfig, w):
  """`SynthesisInput(cfg)` on its parameters (`params["input"]`): `w [n, w_dim]` ->
  `[n, h, w, c]`, layer 0 of `split`. Jitted per `cfg`."""
  return SynthesisInput(cfg).apply({"params": params}, w)


@functools.partial(jax.jit, static_argnames="cfg")
def synthesis_layer(params, cfg: LayerConfig, x, w):
  """`SynthesisLayer(cfg)` on its parameters (`params["layers"][cfg.name]`): `x [n, h,
  w, c_in]`, `w [n, w_dim]` -> `[n, h', w', c_out]`.

  Jitted per layer (the static `cfg` is the cache key): `split`/`resume` at any
  layer reuse the same compiled layers, and remain jittable as a whole.
  """
  return SynthesisLayer(cfg).apply({"params": params}, x, w)


def _run(params, x, ws, cfg: Config, start: int, stop: int):
  """Layers start..stop-1 of x; ws[:, 1 + i] drives layer i (ws[:, 0] the input)."""
  for i in range(start, stop):
    layer = cfg.layers[i]
    x = synthesis_layer(params[layer.name], layer, x, ws[:, 1 + i])
  return x


@base.register
class StyleGAN3(base.FlaxGenerator):
  """A converted StyleGAN3-T/R generator; latents are ws [n, num_ws, w_dim]."""

  arch = "stylegan3"

  parse_config = staticmethod(Config.from_dict)
  param_shapes = staticmethod(param_shapes)

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

  def latents(self, z, c=None, truncation_psi: float = 1.0, truncation_cutoff: int | None = None):
    """W+ codes [n, num_ws, w_dim] from z [n, z_dim] (and one-hot c [n, c_dim]).

    Truncation `w_avg + psi (w - w_avg)` on all codes, or on the first
    `truncation_cutoff` ones.
    """
    return stylegan2.mapping_latents(
      self.params["mapping"],
      self.cfg.mapping,
      z,
      c,
      truncation_psi,
      num_ws=self.num_ws,
      cutoff=truncation_cutoff,
    )

  def _check_ws(self, latents):
    layers.check_ws(latents, self.num_ws, self.cfg.mapping.w_dim)

  def split(self, latents, layer: int, noise_key=None):
    """Features [n, h, w, c] after `layer` layers (margins included), carry None."""
    layer = self.check_layer(layer)
    self._check_ws(latents)
    ws = jnp.asarray(latents, jnp.float32)
    x = synthesis_input(self.params["input"], self.cfg.input, ws[:, 0])
    return _run(self.params["layers"], x, ws, self.cfg, 0, layer), None

  def resume(self, x, carry, latents, layer: int, noise_key=None):
    """Image [n, H, W, ch] from the features x [n, h, w, c] after `layer` layers."""
    layer = self.check_layer(layer)
    self._check_ws(latents)
    shape = self.feature_shape(layer)
    if x.ndim != 4 or tuple(x.shape[1:]) != shape or x.shape[0] != latents.shape[0]:
      raise ValueError(
        f"x must be [n={latents.shape[0]}, {shape[0]}, {shape[1]}, "
        f"{shape[2]}] at layer {layer}, got shape {tuple(x.shape)}"
      )
    x = _run(
      self.params["layers"],
      jnp.asarray(x, jnp.float32),
      jnp.asarray(latents, jnp.float32),
      self.cfg,
      layer,
      len(self.cfg.layers),
    )
    return x * self.cfg.output_scale
