"""StyleGAN2 (Karras et al., CVPR 2020) in Flax, with layer access for PandA.

The arithmetic follows NVIDIA's `training/networks_stylegan2.py` (stylegan3
repo; `training/networks.py` of stylegan2-ada-pytorch is the same network):
mapping network with 2nd-moment normalisation, lr-multiplied dense layers, an
optional class embedding and truncation towards `w_avg`; synthesis network of
(de)modulated 3x3 convolutions, [1,3,3,1] resampling, noise inputs and a
skip ("skip") or last-block-only ("orig") ToRGB path. Layers that the
original runs in float16 (`num_fp16_res`) are computed in float32 here; the
fp16 pre-normalisation of the original only rescales terms that demodulation
divides out again, so both compute the same function.

The mapping network alone (`MappingConfig`, `Mapping`, `mapping_latents`,
`mapping_param_shapes`) is public: StyleGAN3 uses the same one.

Layer numbering (`split`/`resume`): layer `l` is the output of the l-th
modulated conv (b4.conv1 = 1, b8.conv0 = 2, b8.conv1 = 3, ...). The carry is
the RGB image of the blocks completed before the block of layer `l` (`None`
for `l = 1`); the block's own ToRGB runs in `resume`, so an edit at the end of
a block reaches that block's RGB output.

Parameters (nested dicts, equalised-lr gains already applied):
`mapping/{embed, fcs_i}/{kernel [in, out], bias}`, `mapping/w_avg [w_dim]`,
`synthesis/const [4, 4, c]`, `synthesis/convs_{l-1}/{affine/{kernel, bias},
weight [k, k, i, o], bias, noise_strength [], noise_const [r, r]}`,
`synthesis/torgbs_j/{affine, weight [1, 1, c, ch], bias}`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from panda_jax.generators import base
from panda_jax.generators import layers

_zeros = nn.initializers.zeros


def _dense(features: int, name: str) -> nn.Dense:
  """A dense layer `{kernel [i, o], bias [o]}` at `layers.PRECISION`."""
  return nn.Dense(features, name=name, precision=layers.PRECISION)


@dataclasses.dataclass(frozen=True)
class MappingConfig:
  """Static options of the mapping network `z (, c) -> w` (hashable).

  StyleGAN2's and StyleGAN3's (NVIDIA's `MappingNetwork`): 2nd-moment
  normalisation of `z` and of the class embedding, `mapping_layers` dense
  layers, and truncation towards `w_avg`.
  """

  z_dim: int
  c_dim: int
  w_dim: int
  mapping_layers: int = 8
  mapping_features: int | None = None  # Hidden width; None = w_dim.
  embed_features: int | None = None  # Class embedding width; None = w_dim.
  mapping_activation: str = "lrelu"

  def __post_init__(self):
    if self.z_dim < 0 or self.c_dim < 0 or self.z_dim + self.c_dim == 0:
      raise ValueError("need z_dim > 0 or c_dim > 0")
    if self.w_dim < 1 or self.mapping_layers < 1:
      raise ValueError("need w_dim >= 1 and mapping_layers >= 1")
    layers.check_activation(self.mapping_activation)


@dataclasses.dataclass(frozen=True)
class Config:
  """Static options of a StyleGAN2 generator (hashable: the jit cache key)."""

  z_dim: int
  c_dim: int
  w_dim: int
  img_resolution: int
  img_channels: int
  channels: tuple[int, ...]  # Output channels of the blocks at 4, 8, ..., img_resolution.
  mapping_layers: int = 8
  mapping_features: int | None = None  # Hidden width; None = w_dim.
  embed_features: int | None = None  # Class embedding width; None = w_dim.
  mapping_activation: str = "lrelu"
  activation: str = "lrelu"
  kernel_size: int = 3
  use_noise: bool = True
  conv_clamp: float | None = None
  architecture: str = "skip"
  resample_filter: tuple[tuple[float, ...], ...] = tuple(
    map(tuple, layers.setup_filter([1, 3, 3, 1]).tolist())
  )
  num_fp16_res: int = 0  # Informational: fp16 layers run in float32 here.

  def __post_init__(self):
    res = self.img_resolution
    if not (isinstance(res, int) and 4 <= res <= 4096 and res & (res - 1) == 0):
      raise ValueError(f"img_resolution must be a power of two >= 4, got {res}")
    if len(self.channels) != int(np.log2(res)) - 1:
      raise ValueError(f"channels must list one width per block 4..{res}, got {len(self.channels)}")
    if self.architecture not in ("skip", "orig"):
      raise ValueError(f"architecture must be 'skip' or 'orig', got {self.architecture!r}")
    if self.kernel_size % 2 != 1:
      raise ValueError("need an odd kernel_size")
    layers.check_activation(self.activation)
    _ = self.mapping  # MappingConfig validates the mapping fields.

  @classmethod
  def from_dict(cls, config: dict) -> "Config":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(config) - names - {"source"}
    if unknown:
      raise ValueError(f"unknown StyleGAN2 config keys: {sorted(unknown)}")
    kw = {k: v for k, v in config.items() if k in names}
    kw["channels"] = tuple(kw["channels"])
    if "resample_filter" in kw:
      kw["resample_filter"] = tuple(tuple(float(v) for v in row) for row in kw["resample_filter"])
    return cls(**kw)

  @property
  def mapping(self) -> MappingConfig:
    """The mapping network's options."""
    return MappingConfig(
      **{f.name: getattr(self, f.name) for f in dataclasses.fields(MappingConfig)}
    )

  @property
  def resolutions(self) -> tuple[int, ...]:
    return tuple(4 * 2**k for k in range(len(self.channels)))

  @property
  def num_layers(self) -> int:
    """Modulated conv layers: 1 at 4x4, then 2 per block."""
    return 2 * len(self.channels) - 1

  @property
  def num_ws(self) -> int:
    return self.num_layers + 1

  def filter(self) -> np.ndarray:
    return np.asarray(self.resample_filter, np.float32)


class SynthesisLayer(nn.Module):
  """Modulated conv (+ 2x upsampling), noise, bias, activation, clamp."""

  cfg: Config
  in_channels: int
  out_channels: int
  resolution: int
  up: int = 1

  @nn.compact
  def __call__(self, x, w, noise_key=None):
    """`x [n, r/up, r/up, i]`, `w [n, w_dim]` -> `[n, r, r, o]`."""
    cfg, k, r = self.cfg, self.cfg.kernel_size, self.resolution
    styles = _dense(self.in_channels, "affine")(w)  # [n, i]
    weight = self.param("weight", _zeros, (k, k, self.in_channels, self.out_channels))
    bias = self.param("bias", _zeros, (self.out_channels,))
    noise = None
    if cfg.use_noise:
      strength = self.param("noise_strength", _zeros, ())
      const = self.param("noise_const", _zeros, (r, r))
      if noise_key is None:
        noise = const[None, :, :, None] * strength
      else:
        noise = jax.random.normal(noise_key, (x.shape[0], r, r, 1)) * strength
    x = layers.modulated_conv2d(x, weight, styles, up=self.up, f=cfg.filter(), noise=noise)
    return layers.bias_act(x, bias, cfg.activation, clamp=cfg.conv_clamp)


class ToRGB(nn.Module):
  """1x1 modulated conv without demodulation, bias, clamp: `[n, r, r, c] -> [n, r, r, ch]`."""

  cfg: Config
  in_channels: int

  @nn.compact
  def __call__(self, x, w):
    styles = _dense(self.in_channels, "affine")(w)  # ToRGB gain folded in.
    weight = self.param("weight", _zeros, (1, 1, self.in_channels, self.cfg.img_channels))
    bias = self.param("bias", _zeros, (self.cfg.img_channels,))
    x = layers.modulated_conv2d(x, weight, styles, demodulate=False)
    return layers.bias_act(x, bias, "linear", clamp=self.cfg.conv_clamp)


class Mapping(nn.Module):
  """z `[n, z_dim]` (and one-hot c `[n, c_dim]`) -> w `[n, w_dim]`; holds `w_avg`."""

  cfg: MappingConfig

  @nn.compact
  def __call__(self, z, c):
    cfg = self.cfg
    parts = []
    if cfg.z_dim > 0:
      parts.append(layers.normalize_2nd_moment(z))
    if cfg.c_dim > 0:
      embed = _dense(cfg.embed_features or cfg.w_dim, "embed")(c)
      parts.append(layers.normalize_2nd_moment(embed))
    x = jnp.concatenate(parts, axis=1)
    hidden = cfg.mapping_features or cfg.w_dim
    for i in range(cfg.mapping_layers):
      width = cfg.w_dim if i == cfg.mapping_layers - 1 else hidden
      x = layers.bias_act(_dense(width, f"fcs_{i}")(x), None, cfg.mapping_activation)
    self.param("w_avg", _zeros, (cfg.w_dim,))
    return x


class Synthesis(nn.Module):
  """W+ codes `[n, num_ws, w_dim]` -> image, runnable between any two layers."""

  cfg: Config

  def setup(self):
    cfg = self.cfg
    self.const = self.param("const", _zeros, (4, 4, cfg.channels[0]))
    convs, torgbs = [], []
    for k, (res, ch) in enumerate(zip(cfg.resolutions, cfg.channels)):
      if k > 0:
        convs.append(SynthesisLayer(cfg, cfg.channels[k - 1], ch, res, up=2))
      convs.append(SynthesisLayer(cfg, ch, ch, res))
      if cfg.architecture == "skip" or res == cfg.img_resolution:
        torgbs.append(ToRGB(cfg, ch))
    self.convs = convs
    self.torgbs = torgbs

  def _to_rgb(self, x, img, ws, layer: int):
    """Adds the ToRGB output of the block ending at `layer` to the upsampled `img`."""
    block = layer // 2
    if self.cfg.architecture == "orig":
      if block != len(self.cfg.channels) - 1:
        return img
      block = 0
    y = self.torgbs[block](x, ws[:, layer])
    return y if img is None else layers.upsample2d(img, self.cfg.filter()) + y

  def __call__(self, x, img, ws, noise_key, start: int, stop: int):
    """Runs layers `start+1 .. stop`; returns `(x, img)`.

    `x` is ignored when `start == 0` (the learned constant is used). The ToRGB
    of the block ending at `stop` does not run (it belongs to `resume`), so
    `img` is the carry; `image` finishes a full pass.
    """
    if start == 0:
      x = jnp.broadcast_to(self.const, (ws.shape[0],) + self.const.shape)
    for layer in range(start + 1, stop + 1):
      if layer % 2 == 0:  # Layer `layer - 1` ended a block: its ToRGB first.
        img = self._to_rgb(x, img, ws, layer - 1)
      key = None if noise_key is None else jax.random.fold_in(noise_key, layer)
      x = self.convs[layer - 1](x, ws[:, layer - 1], key)
    return x, img

  def image(self, x, img, ws, noise_key, start: int):
    """Runs the layers after `start` and the last ToRGB: image `[n, H, W, ch]`."""
    x, img = self(x, img, ws, noise_key, start, self.cfg.num_layers)
    return self._to_rgb(x, img, ws, self.cfg.num_layers)


class StyleGAN2Net(nn.Module):
  """Mapping + synthesis under one parameter tree."""

  cfg: Config

  def setup(self):
    self.mapping = Mapping(self.cfg.mapping)
    self.synthesis = Synthesis(self.cfg)

  def map(self, z, c):
    """w `[n, w_dim]` (no truncation)."""
    return self.mapping(z, c)

  def split(self, ws, noise_key, layer: int):
    return self.synthesis(None, None, ws, noise_key, 0, layer)

  def resume(self, x, img, ws, noise_key, layer: int):
    return self.synthesis.image(x, img, ws, noise_key, layer)

  def __call__(self, z, c):
    """Initialisation path touching every parameter."""
    w = self.map(z, c)
    ws = jnp.broadcast_to(w[:, None], (w.shape[0], self.cfg.num_ws, w.shape[1]))
    return self.resume(None, None, ws, None, 0)


@functools.partial(jax.jit, static_argnames=("cfg", "num_ws", "cutoff"))
def _mapping_latents(params, z, c, psi, *, cfg: MappingConfig, num_ws: int, cutoff: int | None):
  w = Mapping(cfg).apply({"params": params}, z, c)  # [n, w_dim]
  ws = jnp.broadcast_to(w[:, None], (w.shape[0], num_ws, cfg.w_dim))
  return layers.truncate(ws, params["w_avg"], psi, cutoff)


def mapping_latents(
  params, cfg: MappingConfig, z, c=None, psi=1.0, *, num_ws: int, cutoff: int | None = None
):
  """W+ codes `[n, num_ws, w_dim]` of the mapping network, truncated.

  Args:
    params: the mapping's parameters (`Mapping`: `fcs_i`, `embed`, `w_avg`).
    cfg: its options.
    z: `[n, z_dim]`.
    c: one-hot `[n, c_dim]`; None when unconditional.
    psi: the truncation trick `w_avg + psi (w - w_avg)` (`layers.truncate`),
      on every code or on the first `cutoff` ones.
    num_ws: number of codes (one per synthesis layer that takes a style).
    cutoff: static; None truncates all codes.

  Raises:
    ValueError: `z`, `c` or `cutoff` of the wrong shape or range.
  """
  z = jnp.asarray(z, jnp.float32)
  if z.ndim != 2 or z.shape[1] != cfg.z_dim:
    raise ValueError(f"z must be [n, z_dim={cfg.z_dim}], got shape {z.shape}")
  if c is None:
    if cfg.c_dim:
      raise ValueError(f"this generator is conditional: pass c [n, {cfg.c_dim}]")
    c = jnp.zeros((z.shape[0], 0), jnp.float32)
  c = jnp.asarray(c, jnp.float32)
  if c.shape != (z.shape[0], cfg.c_dim):
    raise ValueError(f"c must be [n={z.shape[0]}, c_dim={cfg.c_dim}], got shape {c.shape}")
  return _mapping_latents(params, z, c, jnp.float32(psi), cfg=cfg, num_ws=num_ws, cutoff=cutoff)


def _param_shapes(net: nn.Module, cfg: MappingConfig | Config) -> Any:
  """The parameter tree of `net` (called on `z, c`), as `jax.ShapeDtypeStruct`s."""
  z = jax.ShapeDtypeStruct((1, cfg.z_dim), jnp.float32)
  c = jax.ShapeDtypeStruct((1, cfg.c_dim), jnp.float32)
  return jax.eval_shape(net.init, jax.random.key(0), z, c)["params"]


def mapping_param_shapes(cfg: MappingConfig) -> Any:
  """The mapping's parameter tree, as `jax.ShapeDtypeStruct`s."""
  return _param_shapes(Mapping(cfg), cfg)


@functools.partial(jax.jit, static_argnames=("cfg", "layer"))
def _split(params, ws, noise_key, *, cfg: Config, layer: int):
  return StyleGAN2Net(cfg).apply(
    {"params": params}, ws, noise_key, layer, method=StyleGAN2Net.split
  )


@functools.partial(jax.jit, static_argnames=("cfg", "layer"))
def _resume(params, x, carry, ws, noise_key, *, cfg: Config, layer: int):
  """`layer = 0` runs the whole synthesis network (`x`, `carry` unused)."""
  return StyleGAN2Net(cfg).apply(
    {"params": params}, x, carry, ws, noise_key, layer, method=StyleGAN2Net.resume
  )


def param_shapes(cfg: Config) -> Any:
  """The parameter tree a `cfg` needs, as `jax.ShapeDtypeStruct`s."""
  return _param_shapes(StyleGAN2Net(cfg), cfg)


@base.register
class StyleGAN2(base.FlaxGenerator):
  """A converted StyleGAN2 / StyleGAN2-ADA generator (see the module docstring)."""

  arch = "stylegan2"

  @staticmethod
  def parse_config(config: dict, params) -> Config:
    """`Config.from_dict(config)` (every option is in `config.json`)."""
    return Config.from_dict(config)

  param_shapes = staticmethod(param_shapes)

  @property
  def num_layers(self) -> int:
    return self.cfg.num_layers

  @property
  def num_ws(self) -> int:
    return self.cfg.num_ws

  def latents(self, z, c=None, truncation_psi: float = 1.0, truncation_cutoff: int | None = None):
    """W+ codes `[n, num_ws, w_dim]` from `z [n, z_dim]`, one-hot `c [n, c_dim]`.

    Truncation `w_avg + psi (w - w_avg)` on all codes, or on the first
    `truncation_cutoff` ones (`mapping_latents`).
    """
    return mapping_latents(
      self.params["mapping"],
      self.cfg.mapping,
      z,
      c,
      truncation_psi,
      num_ws=self.num_ws,
      cutoff=truncation_cutoff,
    )

  def _check_ws(self, latents):
    layers.check_ws(latents, self.num_ws, self.cfg.w_dim)

  def split(self, latents, layer: int, noise_key=None):
    """`(x [n, h, w, c], carry)` after `layer` modulated convs; carry `[n, h', w', ch]` or None.

    Noise: the stored constant buffers, or when `noise_key` is given normal
    noise drawn with `fold_in(noise_key, l)` for layer `l` (so `resume` with
    the same key continues the same sample).
    """
    layer = self.check_layer(layer)
    self._check_ws(latents)
    return _split(self.params, latents, noise_key, cfg=self.cfg, layer=layer)

  def resume(self, x, carry, latents, layer: int, noise_key=None):
    """The image `[n, H, W, ch]` from the features `x` of `layer` and its carry."""
    layer = self.check_layer(layer)
    self._check_ws(latents)
    return _resume(self.params, x, carry, latents, noise_key, cfg=self.cfg, layer=layer)

  def generate(self, latents, noise_key=None):
    """The image `[n, H, W, ch]` of W+ codes `latents [n, num_ws, w_dim]`."""
    self._check_ws(latents)
    return _resume(self.params, None, None, latents, noise_key, cfg=self.cfg, layer=0)
