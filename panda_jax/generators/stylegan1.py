"""StyleGAN v1 (Karras et al., CVPR 2019) in Flax, as genforce's `StyleGANGenerator` computes it.

Mapping: pixel norm of `z`, then `mapping_layers` dense layers, each with a
leaky ReLU (the learning-rate multiplier is folded into the converted weights).
Its `w` is broadcast to one code per synthesis layer (W+) and truncated towards
`w_avg` on the first `truncation_cutoff` layers (genforce's `trunc_layers`).

Synthesis: `2 * (log2(resolution) - 1)` layers, two per resolution from 4x4.
Layer 0 starts from the learned constant; every even layer after it doubles the
resolution (nearest upsampling then a 3x3 conv, or a fused stride-2 transposed
conv; genforce's default `fused_scale="auto"` fuses from 128x128 on) and blurs
with [1, 2, 1]^T [1, 2, 1] / 16; every odd layer is a 3x3 conv. Then every
layer adds noise (the stored constant buffers, genforce's
`randomize_noise=False`, unless a `noise_key` is given), the bias, a leaky ReLU
(0.2), instance norm and the AdaIN style `x * (1 + s_0) + s_1` with
`[s_0, s_1] = A(w_l)`. Level of detail 0: only the last ToRGB (1x1 conv) makes
the image; no final tanh unless `final_tanh`.

Layer numbering (`tests/fixtures/README.md`): `split(latents, l)` returns the
output of the l-th layer (genforce's `layer{l-1}`), l = 1 .. num_layers. The
PandA repo's StyleGAN `layer=k` is our layer `2 * (k - 2)`. The carry is None.

Parameters (converted by `converters.genforce`, equalised-lr scales applied),
the `params` collection of `StyleGANNet`:

    mapping:  dense{j}: weight [in, out], bias [out]
    w_avg:    [w_dim]
    layer0:   const [1, 4, 4, c_0]
    layer{i}: weight [3, 3, c_{i-1}, c_i]                      (i >= 1)
    layer{i}: bias [c_i], noise [1, h, w, 1], noise_strength [c_i],
              style: weight [w_dim, 2 c_i], bias [2 c_i]        (every i)
    torgb:    weight [c_last, image_channels], bias [image_channels]

The widths `c_i` and the mapping's are not in the converted config:
`Config.from_dict` reads them from the biases.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from panda_jax.generators import base
from panda_jax.generators import layers
from panda_jax.generators import progan

BLUR_FILTER = layers.setup_filter([1, 2, 1])  # [3, 3], sums to 1.
AUTO_FUSED_SCALE_MIN_RES = 128  # genforce's `fused_scale="auto"`.
CONFIG_KEYS = progan.CONFIG_KEYS + ("w_dim",)
_zeros = nn.initializers.zeros


def uses_fused_scale(fused_scale: bool | str, res: int) -> bool:
  """Whether the upsampling layer to `res` x `res` is a fused transposed conv."""
  if fused_scale == "auto":
    return res >= AUTO_FUSED_SCALE_MIN_RES
  return bool(fused_scale)


@dataclasses.dataclass(frozen=True)
class Config:
  """Static options of a StyleGAN v1 generator (hashable: the jit cache key)."""

  resolution: int
  z_dim: int
  w_dim: int
  image_channels: int
  fused_scale: bool | str  # True, False or "auto": how the converter read the up-convs.
  final_tanh: bool
  channels: tuple[int, ...]  # Output widths of synthesis layers 0 .. num_layers - 1.
  mapping_channels: tuple[int, ...]  # Output widths of mapping/dense0, ...; the last is w_dim.

  def __post_init__(self):
    progan.num_layers_for(self.resolution)
    progan.check_fields(
      "StyleGAN",
      {
        "z_dim": self.z_dim,
        "w_dim": self.w_dim,
        "image_channels": self.image_channels,
        **{f"channels[{i}]": c for i, c in enumerate(self.channels)},
        **{f"mapping_channels[{j}]": c for j, c in enumerate(self.mapping_channels)},
      },
      {"final_tanh": self.final_tanh},
    )
    if not (isinstance(self.fused_scale, bool) or self.fused_scale == "auto"):
      raise ValueError(
        f"StyleGAN config: fused_scale must be true, false or 'auto', got {self.fused_scale!r}"
      )
    if len(self.channels) != self.num_layers:
      raise ValueError(
        f"StyleGAN config: channels must list {self.num_layers} layer widths "
        f"(resolution {self.resolution}), got {len(self.channels)}"
      )
    if not self.mapping_channels or self.mapping_channels[-1] != self.w_dim:
      raise ValueError(
        f"StyleGAN config: the mapping's last layer must have w_dim = "
        f"{self.w_dim} outputs, got mapping_channels {self.mapping_channels}"
      )

  @classmethod
  def from_dict(cls, config: dict, params) -> "Config":
    """From a converted config (`CONFIG_KEYS`) and its params, whose biases give
    the widths (the shapes of the other parameters are not checked here:
    `base.check_params(params, param_shapes(cfg))`)."""
    progan.check_keys("StyleGAN", config, CONFIG_KEYS)
    names = [f"layer{i}" for i in range(progan.num_layers_for(config["resolution"]))]
    mapping = params.get("mapping") if isinstance(params, dict) else None
    if not isinstance(mapping, dict) or "dense0" not in mapping:
      raise ValueError("parameter /mapping/dense0 is missing (the mapping network's first layer)")
    depth = next(j for j in range(len(mapping) + 1) if f"dense{j}" not in mapping)
    return cls(
      **config,
      channels=progan.bias_widths(params, names),
      mapping_channels=progan.bias_widths(mapping, [f"dense{j}" for j in range(depth)], "/mapping"),
    )

  @property
  def num_layers(self) -> int:
    return progan.num_layers_for(self.resolution)


class Mapping(nn.Module):
  """`z [n, z_dim]` -> `w [n, w_dim]`: pixel norm, then dense layers with leaky ReLUs."""

  widths: tuple[int, ...]

  @nn.compact
  def __call__(self, z):
    x = progan.pixel_norm(z)
    for j, width in enumerate(self.widths):
      x = progan.lrelu(progan.Dense(width, name=f"dense{j}")(x), None)
    return x


class Layer(nn.Module):
  """One synthesis layer (module docstring): `[n, h, w, i] -> [n, r, r, features]`."""

  index: int  # 0-based.
  features: int

  @nn.compact
  def __call__(self, x, w, noise=None):
    """`x` (None for layer 0), `w [n, w_dim]`, `noise [n, r, r, 1]` (None: the stored buffer)."""
    n, c, r = w.shape[0], self.features, 4 << (self.index // 2)
    if self.index == 0:
      const = self.param("const", _zeros, (1, 4, 4, c))
      x = jnp.broadcast_to(const, (n,) + const.shape[1:])
    else:
      weight = self.param("weight", _zeros, (3, 3, x.shape[-1], c))
      x = progan.conv(x, weight, self.index)
      if self.index % 2 == 0:
        x = layers.upfirdn2d(x, BLUR_FILTER, padding=(1, 1, 1, 1))
    bias = self.param("bias", _zeros, (c,))
    stored = self.param("noise", _zeros, (1, r, r, 1))
    strength = self.param("noise_strength", _zeros, (c,))
    noise = stored if noise is None else noise
    x = layers.instance_norm(progan.lrelu(x + noise * strength, bias))
    style = progan.Dense(2 * c, name="style")(w)  # [n, 2c]
    scale, shift = jnp.split(style[:, None, None, :], 2, axis=-1)
    return x * (scale + 1.0) + shift


class StyleGANNet(nn.Module):
  """Mapping, `w_avg` and synthesis under one parameter tree."""

  cfg: Config

  def setup(self):
    cfg = self.cfg
    self.mapping = Mapping(cfg.mapping_channels)
    self.param("w_avg", _zeros, (cfg.w_dim,))  # Used by `StyleGAN.latents` (outside `jit`).
    # Named explicitly: the converted layout's `layer{i}`, not Flax's `blocks_{i}`.
    self.blocks = [Layer(i, c, name=f"layer{i}") for i, c in enumerate(cfg.channels)]
    self.torgb = progan.Dense(cfg.image_channels)

  def map(self, z):
    """`w [n, w_dim]` (no truncation)."""
    return self.mapping(z)

  def features(self, x, wp, noise, start: int, stop: int):
    """Layers `start .. stop - 1` (0-based) from `x` (None for `start == 0`);
    `noise` from `draw_noise`, None for the stored buffers."""
    for i in range(start, stop):
      x = self.blocks[i](x, wp[:, i], None if noise is None else noise[f"layer{i}"])
    return x

  def image(self, x, wp, noise, start: int):
    """The image `[n, R, R, image_channels]` from the output `x` of layer `start`."""
    img = self.torgb(self.features(x, wp, noise, start, self.cfg.num_layers))
    return jnp.tanh(img) if self.cfg.final_tanh else img

  def __call__(self, z):
    """Initialisation path touching every parameter."""
    w = self.map(z)
    wp = jnp.broadcast_to(w[:, None], (w.shape[0], self.cfg.num_layers, w.shape[1]))
    return self.image(None, wp, None, 0)


def draw_noise(noise_key, n: int, start: int, stop: int) -> dict | None:
  """Normal noise `{f"layer{i}": [n, r, r, 1]}` for layers `start .. stop - 1`, layer
  i's from `fold_in(noise_key, i)` (so `resume` with the key continues `split`'s
  sample); None (the stored buffers) for a None key.

  Drawn eagerly, outside the jitted network, which keeps the samples of earlier
  versions to the bit: drawn inside, XLA fuses the sampling into the layers and
  the images move by ~2e-6 of their range.
  """
  if noise_key is None:
    return None
  return {
    f"layer{i}": jax.random.normal(
      jax.random.fold_in(noise_key, i), (n, 4 << (i // 2), 4 << (i // 2), 1)
    )
    for i in range(start, stop)
  }


@functools.partial(jax.jit, static_argnames="cfg")
def _map(params, z, *, cfg: Config):
  return StyleGANNet(cfg).apply({"params": params}, z, method=StyleGANNet.map)


@functools.partial(jax.jit, static_argnames=("cfg", "stop"))
def _features(params, wp, noise, *, cfg: Config, stop: int):
  return StyleGANNet(cfg).apply(
    {"params": params}, None, wp, noise, 0, stop, method=StyleGANNet.features
  )


@functools.partial(jax.jit, static_argnames=("cfg", "start"))
def _image(params, x, wp, noise, *, cfg: Config, start: int):
  return StyleGANNet(cfg).apply({"params": params}, x, wp, noise, start, method=StyleGANNet.image)


def param_shapes(cfg: Config) -> Any:
  """The parameter tree a `cfg` needs, as `jax.ShapeDtypeStruct`s."""
  z = jax.ShapeDtypeStruct((1, cfg.z_dim), jnp.float32)
  return jax.eval_shape(StyleGANNet(cfg).init, jax.random.key(0), z)["params"]


@base.register
class StyleGAN(base.FlaxGenerator):
  """A converted genforce StyleGAN v1; latents are W+ codes `[n, num_layers, w_dim]`.

  Config: `CONFIG_KEYS`, as `converters.genforce` writes them (`fused_scale`
  True, False or "auto").
  """

  arch = "stylegan"

  parse_config = staticmethod(Config.from_dict)
  param_shapes = staticmethod(param_shapes)

  @property
  def num_layers(self) -> int:
    return self.cfg.num_layers

  @property
  def w_dim(self) -> int:
    return self.cfg.w_dim

  def latents(self, z, c=None, truncation_psi: float = 1.0, truncation_cutoff: int | None = None):
    """W+ codes `[n, num_layers, w_dim]` of `z [n, z_dim]`.

    `w_avg + psi * (w - w_avg)` on the first `truncation_cutoff` layers (all
    when None): genforce's `trunc_psi` / `trunc_layers`.
    """
    if c is not None:
      raise ValueError("this StyleGAN is unconditional: c must be None")
    z = jnp.asarray(z, jnp.float32)
    if z.ndim != 2 or z.shape[1] != self.z_dim:
      raise ValueError(f"z must be [n, {self.z_dim}], got shape {z.shape}")
    w = _map(self.params, z, cfg=self.cfg)
    wp = jnp.repeat(w[:, None], self.num_layers, axis=1)  # [n, layers, w_dim]
    # Eager, as in earlier versions: jitted, XLA fuses it and rounds differently (1 ulp).
    return layers.truncate(wp, self.params["w_avg"], truncation_psi, truncation_cutoff)

  def _check_latents(self, wp) -> jax.Array:
    layers.check_ws(wp, self.num_layers, self.w_dim)
    return jnp.asarray(wp)

  def split(self, latents, layer: int, noise_key=None):
    """`(x [n, h, w, c], None)`: the output of the first `layer` layers.

    Noise: the stored constant buffers, or when `noise_key` is given normal
    noise drawn with `fold_in(noise_key, i)` for layer `i` (0-based).
    """
    layer = self.check_layer(layer)
    wp = self._check_latents(latents)
    noise = draw_noise(noise_key, wp.shape[0], 0, layer)
    return _features(self.params, wp, noise, cfg=self.cfg, stop=layer), None

  def resume(self, x, carry, latents, layer: int, noise_key=None):
    """The layers after `layer` and the last ToRGB: image `[n, H, W, channels]`."""
    layer = self.check_layer(layer)
    wp = self._check_latents(latents)
    noise = draw_noise(noise_key, wp.shape[0], layer, self.num_layers)
    return _image(self.params, x, wp, noise, cfg=self.cfg, start=layer)
