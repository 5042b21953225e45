"""ProGAN (Karras et al., ICLR 2018) in Flax, as genforce's `PGGANGenerator` computes it.

The synthesis network is a chain of `2 * (log2(resolution) - 1)` layers, two
per resolution from 4x4: layer 0 maps the latent to a 4x4 map (a dense layer,
stored by genforce as a 4x4 convolution of a 1x1 input), every even layer after
it doubles the resolution (nearest upsampling then a 3x3 conv, or both fused
into a stride-2 transposed conv when `fused_scale`), every odd layer is a 3x3
conv. Each layer starts with a pixel norm and ends with a leaky ReLU (0.2).
Trained models have level of detail 0, so only the last ToRGB (a pixel norm and
a 1x1 conv) makes the image; no final tanh unless `final_tanh`.

Layer numbering (`tests/fixtures/README.md`): `split(latents, l)` returns the
output of the l-th layer (genforce's `layer{l-1}`), l = 1 .. num_layers. The
PandA repo's ProGAN `layer=k` is our layer `2 * (k - 2)`. ProGAN has no carry
(`None`) and no noise inputs.

Parameters (converted by `converters.genforce`, equalised-lr scales applied),
the `params` collection of `ProGANNet`:

    layer0:   weight [4, 4, z_dim, c_0]  (the dense layer as a 4x4 kernel), bias [c_0]
    layer{i}: weight [3, 3, c_{i-1}, c_i], bias [c_i]    (i = 1 .. num_layers - 1)
    torgb:    weight [c_last, image_channels], bias [image_channels]

The widths `c_i` (genforce's `min(fmaps_base // res, fmaps_max)`) are not in
the converted config: `Config.from_dict` reads them from the biases.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from panda_jax.generators import base
from panda_jax.generators import layers

RESOLUTIONS = (8, 16, 32, 64, 128, 256, 512, 1024)  # genforce's allowed ones.
CONFIG_KEYS = ("resolution", "z_dim", "image_channels", "fused_scale", "final_tanh")
_zeros = nn.initializers.zeros


def num_layers_for(resolution: int) -> int:
  """Two layers per resolution from 4x4 up to `resolution`."""
  if isinstance(resolution, bool) or resolution not in RESOLUTIONS:
    raise ValueError(f"resolution must be one of {RESOLUTIONS}, got {resolution!r}")
  return 2 * (int(resolution).bit_length() - 2)


def check_keys(family: str, config: dict, keys: Sequence[str]) -> None:
  """Raises a `ValueError` naming the `keys` that `config` lacks and the keys beyond them."""
  missing = [k for k in keys if k not in config]
  unknown = sorted(set(config) - set(keys))
  if missing or unknown:
    raise ValueError(f"{family} config: missing keys {missing}, unknown keys {unknown}")


def check_fields(family: str, ints: dict[str, Any], bools: dict[str, Any]) -> None:
  """Raises a `ValueError` naming the first of `ints` that is no positive int, or
  of `bools` that is no bool."""
  for name, value in ints.items():
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{family} config: {name} must be a positive int, got {value!r}")
  for name, value in bools.items():
    if not isinstance(value, bool):
      raise ValueError(f"{family} config: {name} must be true or false, got {value!r}")


def bias_widths(params, names: Sequence[str], path: str = "") -> tuple[int, ...]:
  """The lengths of `params[name]["bias"]` for each of `names` (the widths a
  converted config does not store).

  Raises:
    ValueError: naming the first bias that is missing or not a vector.
  """
  widths = []
  for name in names:
    node = params.get(name) if isinstance(params, dict) else None
    bias = node.get("bias") if isinstance(node, dict) else None
    if bias is None:
      raise ValueError(f"parameter {path}/{name}/bias is missing")
    if np.ndim(bias) != 1:
      raise ValueError(
        f"parameter {path}/{name}/bias must be a vector [c], got shape {tuple(np.shape(bias))}"
      )
    widths.append(int(np.shape(bias)[0]))
  return tuple(widths)


@dataclasses.dataclass(frozen=True)
class Config:
  """Static options of a ProGAN generator (hashable: the jit cache key)."""

  resolution: int
  z_dim: int
  image_channels: int
  fused_scale: bool  # How the converter read the up-convs; the network does not depend on it.
  final_tanh: bool
  channels: tuple[int, ...]  # Output widths of layers 0 .. num_layers - 1.

  def __post_init__(self):
    num_layers_for(self.resolution)
    check_fields(
      "ProGAN",
      {
        "z_dim": self.z_dim,
        "image_channels": self.image_channels,
        **{f"channels[{i}]": c for i, c in enumerate(self.channels)},
      },
      {"fused_scale": self.fused_scale, "final_tanh": self.final_tanh},
    )
    if len(self.channels) != self.num_layers:
      raise ValueError(
        f"ProGAN config: channels must list {self.num_layers} layer widths "
        f"(resolution {self.resolution}), got {len(self.channels)}"
      )

  @classmethod
  def from_dict(cls, config: dict, params) -> "Config":
    """From a converted config (`CONFIG_KEYS`) and its params, whose biases give
    the layer widths (the shapes of the other parameters are not checked here:
    `base.check_params(params, param_shapes(cfg))`)."""
    check_keys("ProGAN", config, CONFIG_KEYS)
    names = [f"layer{i}" for i in range(num_layers_for(config["resolution"]))]
    return cls(**config, channels=bias_widths(params, names))

  @property
  def num_layers(self) -> int:
    return num_layers_for(self.resolution)


def pixel_norm(x: jax.Array) -> jax.Array:
  """Pixel norm over the channels (last axis), genforce's `PixelNormLayer`."""
  return layers.normalize_2nd_moment(x)


def lrelu(x: jax.Array, bias: jax.Array | None) -> jax.Array:
  """genforce's bias then `LeakyReLU(0.2)` (the sqrt(2) gain is in the weights)."""
  return layers.bias_act(x, bias, act="lrelu", gain=1.0)


def conv(x: jax.Array, weight: jax.Array, index: int) -> jax.Array:
  """The convolution of layer `index` (0-based) of ProGAN and StyleGAN v1.

  Layer 0 (ProGAN): `x [n, z_dim]`, `weight [4, 4, z_dim, c]` -> `[n, 4, 4, c]`.
  Even layers: 2x upsampling, `[n, h, w, i] -> [n, 2h, 2w, o]`, run as
  `layers.fused_upsample_conv3x3` whatever `fused_scale` says: nearest 2x then a
  3x3 conv (padding 1) equals the fused transposed conv exactly, borders
  included, and its sub-pixel form makes 4 instead of 9 products per output
  pixel (`fused_scale` only decides how the converter reads the stored weight).
  Odd layers: a 3x3 conv, padding 1.
  """
  if index == 0:
    return layers.einsum("nc,hwco->nhwo", x, weight)  # [n, 4, 4, c]
  if index % 2 == 0:
    return layers.fused_upsample_conv3x3(x, weight)  # [n, 2h, 2w, o]
  return layers.conv2d(x, weight, padding=1)


class Dense(nn.Module):
  """`x [..., i] @ weight [i, features] + bias [features]` (genforce's names)."""

  features: int

  @nn.compact
  def __call__(self, x):
    weight = self.param("weight", _zeros, (x.shape[-1], self.features))
    bias = self.param("bias", _zeros, (self.features,))
    return layers.dense(x, weight, bias)


class Layer(nn.Module):
  """genforce's `ConvBlock`: pixel norm, `conv`, bias, leaky ReLU."""

  index: int  # 0-based.
  features: int

  @nn.compact
  def __call__(self, x):
    """`x [n, z_dim]` (layer 0) or `[n, h, w, i]` -> `[n, h', w', features]`."""
    k = 4 if self.index == 0 else 3
    weight = self.param("weight", _zeros, (k, k, x.shape[-1], self.features))
    bias = self.param("bias", _zeros, (self.features,))
    return lrelu(conv(pixel_norm(x), weight, self.index), bias)


class ProGANNet(nn.Module):
  """Latents `[n, z_dim]` -> image `[n, R, R, image_channels]`, runnable from any layer."""

  cfg: Config

  def setup(self):
    # Named explicitly: the converted layout's `layer{i}`, not Flax's `blocks_{i}`.
    self.blocks = [Layer(i, c, name=f"layer{i}") for i, c in enumerate(self.cfg.channels)]
    self.torgb = Dense(self.cfg.image_channels)

  def features(self, x, start: int, stop: int):
    """Layers `start .. stop - 1` (0-based) from `x` (the latents when `start == 0`)."""
    for block in self.blocks[start:stop]:
      x = block(x)
    return x

  def __call__(self, x, start: int = 0):
    """The image from the output `x` of layer `start` (the latents for 0)."""
    x = self.features(x, start, self.cfg.num_layers)
    img = self.torgb(pixel_norm(x))  # [n, R, R, image_channels]
    return jnp.tanh(img) if self.cfg.final_tanh else img


@functools.partial(jax.jit, static_argnames=("cfg", "stop"))
def _features(params, latents, *, cfg: Config, stop: int):
  return ProGANNet(cfg).apply({"params": params}, latents, 0, stop, method=ProGANNet.features)


@functools.partial(jax.jit, static_argnames=("cfg", "start"))
def _image(params, x, *, cfg: Config, start: int):
  return ProGANNet(cfg).apply({"params": params}, x, start)


def param_shapes(cfg: Config) -> Any:
  """The parameter tree a `cfg` needs, as `jax.ShapeDtypeStruct`s."""
  z = jax.ShapeDtypeStruct((1, cfg.z_dim), jnp.float32)
  return jax.eval_shape(ProGANNet(cfg).init, jax.random.key(0), z)["params"]


@base.register
class ProGAN(base.FlaxGenerator):
  """A converted genforce ProGAN; latents are the pixel-normalised `z [n, z_dim]`.

  Config: `CONFIG_KEYS`, as `converters.genforce` writes them.
  """

  arch = "pggan"

  parse_config = staticmethod(Config.from_dict)
  param_shapes = staticmethod(param_shapes)

  @property
  def num_layers(self) -> int:
    return self.cfg.num_layers

  def latents(self, z, c=None, truncation_psi: float = 1.0, truncation_cutoff: int | None = None):
    """`z [n, z_dim]` pixel-normalised, as genforce does before layer 0.

    ProGAN has no truncation: `truncation_psi` must be 1 and the cutoff None.
    """
    if c is not None:
      raise ValueError("this ProGAN is unconditional: c must be None")
    if truncation_psi != 1.0 or truncation_cutoff is not None:
      raise ValueError(
        "ProGAN has no truncation: truncation_psi must be 1.0 and truncation_cutoff None"
      )
    z = jnp.asarray(z, jnp.float32)
    if z.ndim != 2 or z.shape[1] != self.z_dim:
      raise ValueError(f"z must be [n, {self.z_dim}], got shape {z.shape}")
    return pixel_norm(z)

  def split(self, latents, layer: int, noise_key=None):
    """`(x [n, h, w, c], None)`: the output of the first `layer` layers.

    `noise_key` is part of the common interface; ProGAN has no noise inputs.
    """
    layer = self.check_layer(layer)
    if jnp.ndim(latents) != 2 or jnp.shape(latents)[1] != self.z_dim:
      raise ValueError(f"latents must be [n, {self.z_dim}], got shape {jnp.shape(latents)}")
    return _features(self.params, latents, cfg=self.cfg, stop=layer), None

  def resume(self, x, carry, latents, layer: int, noise_key=None):
    """The layers after `layer` and the last ToRGB: image `[n, H, W, channels]`."""
    layer = self.check_layer(layer)
    return _image(self.params, x, cfg=self.cfg, start=layer)
