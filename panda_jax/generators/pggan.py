"""ProGAN (Karras et al., 2018) as genforce's `PGGANGenerator` computes it, NHWC.

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

Parameters (converted by `converters.genforce`, equalised-lr scales applied):

    layer0:   weight [4, 4, z_dim, c]  (the dense layer as a 4x4 kernel), bias [c]
    layer{i}: weight [3, 3, c_in, c_out], bias [c_out]     (i = 1 .. num_layers - 1)
    torgb:    weight [c_last, channels], bias [channels]
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from panda_jax.generators import base
from panda_jax.generators import layers

RESOLUTIONS = (8, 16, 32, 64, 128, 256, 512, 1024)  # genforce's allowed ones.
CONFIG_KEYS = ("resolution", "z_dim", "image_channels", "fused_scale", "final_tanh")


class Config(NamedTuple):
  """The static (hashable) part of a converted ProGAN's config."""
  resolution: int
  fused_scale: bool
  final_tanh: bool


def check_config(config: dict, keys: tuple[str, ...]) -> None:
  """Raises a `ValueError` naming the keys of `keys` that `config` lacks."""
  missing = [k for k in keys if k not in config]
  if missing:
    raise ValueError(f"generator config lacks {missing}")


def num_layers_for(resolution: int) -> int:
  """Two layers per resolution from 4x4 up to `resolution`."""
  if resolution not in RESOLUTIONS:
    raise ValueError(f"resolution must be one of {RESOLUTIONS}, got {resolution}")
  return 2 * (resolution.bit_length() - 2)


def to_rgb(params: dict, x: jax.Array, final_tanh: bool) -> jax.Array:
  """The last ToRGB, a 1x1 conv `[n, h, w, c] -> [n, h, w, channels]`."""
  img = layers.dense(x, params["weight"], params["bias"])  # [n, h, w, channels]
  return jnp.tanh(img) if final_tanh else img


def pixel_norm(x: jax.Array) -> jax.Array:
  """Pixel norm over the channels (last axis), genforce's `PixelNormLayer`."""
  return layers.normalize_2nd_moment(x)


def lrelu(x: jax.Array, bias: jax.Array) -> jax.Array:
  """genforce's bias then `LeakyReLU(0.2)` (the sqrt(2) gain is in the weights)."""
  return layers.bias_act(x, bias, act="lrelu", gain=1.0)


def _layer(params: dict, x: jax.Array, index: int) -> jax.Array:
  """Layer `index` (0-based) of `x` (`[n, z_dim]` for layer 0, else `[n, h, w, c]`).

  An upsampling layer runs as `layers.fused_upsample_conv3x3` whatever
  `fused_scale` says: nearest 2x then a 3x3 conv (padding 1) equals the fused
  transposed conv exactly, borders included, and its sub-pixel form makes 4
  instead of 9 products per output pixel (`fused_scale` only decides how the
  converter reads the stored weight).
  """
  x = pixel_norm(x)
  weight = params["weight"]
  if index == 0:
    x = layers.einsum("nc,hwco->nhwo", x, weight)  # [n, 4, 4, c]
  elif index % 2 == 0:
    x = layers.fused_upsample_conv3x3(x, weight)  # [n, 2h, 2w, c_out]
  else:
    x = layers.conv2d(x, weight, padding=1)
  return lrelu(x, params["bias"])


@functools.partial(jax.jit, static_argnames=("cfg", "start", "stop"))
def run_layers(params: dict, x: jax.Array, *, cfg: Config, start: int,
               stop: int) -> jax.Array:
  """Layers `start .. stop - 1` (0-based) from `x`; `x` is the latents for start 0."""
  del cfg  # Static: part of the cache key (the up-convs do not depend on fused_scale).
  for i in range(start, stop):
    x = _layer(params[f"layer{i}"], x, i)
  return x


@functools.partial(jax.jit, static_argnames=("cfg", "layer"))
def resume_image(params: dict, x: jax.Array, *, cfg: Config, layer: int) -> jax.Array:
  """Image `[n, H, W, channels]` from the output `x [n, h, w, c]` of layer `layer`."""
  x = run_layers(params, x, cfg=cfg, start=layer,
                 stop=num_layers_for(cfg.resolution))
  return to_rgb(params["torgb"], pixel_norm(x), cfg.final_tanh)


@base.register
class PGGANGenerator(base.Generator):
  """ProGAN generator; latents are the pixel-normalised `z [n, z_dim]`.

  Config: `resolution`, `z_dim`, `image_channels`, `fused_scale`, `final_tanh`
  (genforce's defaults for the last two: False, False).
  """
  arch = "pggan"

  def __init__(self, config: dict, params):
    check_config(config, CONFIG_KEYS)
    super().__init__(config, params)
    self.cfg = Config(int(config["resolution"]), bool(config["fused_scale"]),
                      bool(config["final_tanh"]))
    self._num_layers = num_layers_for(self.cfg.resolution)

  @classmethod
  def from_converted(cls, config: dict, params) -> "PGGANGenerator":
    """Builds the generator, checking every parameter shape against `config`."""
    gen = cls(config, params)
    check_params(params, gen.num_layers, gen.z_dim, int(config["image_channels"]))
    return gen

  @property
  def num_layers(self) -> int:
    return self._num_layers

  def latents(self, z, c=None, truncation_psi: float = 1.0,
              truncation_cutoff: int | None = None):
    """`z [n, z_dim]` pixel-normalised, as genforce does before layer 0.

    ProGAN has no truncation: `truncation_psi` must be 1 and the cutoff None.
    """
    if c is not None:
      raise ValueError("this ProGAN is unconditional: c must be None")
    if truncation_psi != 1.0 or truncation_cutoff is not None:
      raise ValueError("ProGAN has no truncation: truncation_psi must be 1.0 "
                       "and truncation_cutoff None")
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
      raise ValueError(f"latents must be [n, {self.z_dim}], got shape "
                       f"{jnp.shape(latents)}")
    return run_layers(self.params, latents, cfg=self.cfg, start=0,
                      stop=layer), None

  def resume(self, x, carry, latents, layer: int, noise_key=None):
    """The layers after `layer` and the last ToRGB: image `[n, H, W, channels]`."""
    layer = self.check_layer(layer)
    return resume_image(self.params, x, cfg=self.cfg, layer=layer)


def check_params(params: dict, num_layers: int, c_in: int,
                 image_channels: int, first_kernel: int | None = 4) -> None:
  """Raises a `ValueError` unless `params` holds layers 0 .. num_layers - 1 and
  `torgb` whose conv shapes chain from `c_in` channels to `image_channels`.

  `first_kernel`: layer 0's kernel size (None: layer 0 has no conv weight).
  """
  expected = {f"layer{i}" for i in range(num_layers)} | {"torgb"}
  if not isinstance(params, dict) or not expected <= set(params):
    got = sorted(params) if isinstance(params, dict) else type(params).__name__
    raise ValueError(f"params must hold {sorted(expected)}, got {got}")
  for i in range(num_layers):
    p = params[f"layer{i}"]
    k = first_kernel if i == 0 else 3
    if k is not None:
      shape = tuple(p["weight"].shape)
      if shape[:3] != (k, k, c_in) or len(shape) != 4:
        raise ValueError(f"layer{i}.weight must be [{k}, {k}, {c_in}, c_out], "
                         f"got {list(shape)}")
      c_in = shape[3]
    if tuple(p["bias"].shape) != (c_in,):
      raise ValueError(f"layer{i}.bias must be [{c_in}], got {list(p['bias'].shape)}")
  rgb = params["torgb"]
  if (tuple(rgb["weight"].shape) != (c_in, image_channels)
      or tuple(rgb["bias"].shape) != (image_channels,)):
    raise ValueError(f"torgb must be weight [{c_in}, {image_channels}] and bias "
                     f"[{image_channels}], got {list(rgb['weight'].shape)} and "
                     f"{list(rgb['bias'].shape)}")
