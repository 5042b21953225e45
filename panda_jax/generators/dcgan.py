"""The PyTorch DCGAN-tutorial generator (Radford et al., 2016) in Flax, with layer access.

The family is a chain of `k` blocks ConvTranspose2d (4x4, no bias) / BatchNorm2d
(eval mode: running statistics) / ReLU, then a last ConvTranspose2d (4x4, no
bias) and tanh:

    z [n, z_dim] as a 1x1 map -> block 1 (stride 1, padding 0): 4x4
    -> block l (stride 2, padding 1): 2^(l+1) x 2^(l+1), l = 2 .. k
    -> to_rgb (stride 2, padding 1), tanh: image 2^(k+2) x 2^(k+2) in [-1, 1]

PyTorch's DCGAN tutorial has k = 4, channels ngf * (8, 4, 2, 1), 64x64 images;
any depth and widths of this shape convert (`converters.dcgan`).

Layer numbering (`split`/`resume`): layer l = the output of the l-th block
(after its ReLU), `[n, 2^(l+1), 2^(l+1), channels[l-1]]`, l = 1 .. k. For the
tutorial's 64x64 model: 1 -> 4x4x512, 2 -> 8x8x256, 3 -> 16x16x128,
4 -> 32x32x64. No carry (`None`), no noise inputs (`noise_key` is ignored).

Latents are `z` itself, `[n, z_dim]`. There is no truncation: the truncation
trick pulls codes towards a mean latent (StyleGAN's `w_avg`), which a DCGAN does
not have, and shrinking a Gaussian `z` has no standard meaning, so only
`truncation_psi = 1` is accepted.

Variables (converted by `converters.dcgan`), torch `main.{3j}` / `main.{3j+1}`:

    params/blocks_{l-1}/conv/kernel [4, 4, c_in, c_out]  (torch [c_in, c_out, 4, 4]
                                                          transposed, not flipped)
    params/blocks_{l-1}/bn/{scale, bias} [c_out]         (BatchNorm2d weight, bias)
    batch_stats/blocks_{l-1}/bn/{mean, var} [c_out]      (running_mean, running_var)
    params/to_rgb/kernel [4, 4, c_k, img_channels]
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

KERNEL = 4  # Every ConvTranspose2d of the family is 4x4.
MAX_BLOCKS = 10  # 4096x4096 images.
_zeros = nn.initializers.zeros


def conv_transpose2d(x, kernel, stride: int, padding: int):
  """torch `conv_transpose2d` (no bias, no output padding), channels-last.

  A transposed convolution is the correlation of the input dilated by `stride`
  (`stride - 1` zeros between samples), zero-padded by `k - 1 - padding`, with
  the kernel flipped spatially.

  Args:
    x: `[n, h, w, i]`.
    kernel: `[k, k, i, o]`, torch's `[i, o, k, k]` weight transposed (not flipped).
    stride, padding: as torch's `ConvTranspose2d`; `padding <= k - 1`.

  Returns:
    `[n, (h - 1) stride - 2 padding + k, (w - 1) stride - 2 padding + k, o]`.
  """
  k = kernel.shape[0]
  if x.shape[1:3] == (1, 1) and padding == 0:  # One input pixel (the first block).
    return layers.einsum("ni,yxio->nyxo", x[:, 0, 0], kernel.astype(x.dtype))
  pad = k - 1 - padding
  return layers.upsampling_correlation(x, kernel[::-1, ::-1], stride, ((pad, pad), (pad, pad)))


@dataclasses.dataclass(frozen=True)
class Config:
  """Static options of a DCGAN generator (hashable: the jit cache key)."""

  z_dim: int
  channels: tuple[int, ...]  # Output channels of blocks 1 .. k (tutorial: ngf * (8, 4, 2, 1)).
  img_channels: int
  bn_eps: float = 1e-5  # BatchNorm2d's default; not stored in a state dict.

  def __post_init__(self):
    for name, value in (
      ("z_dim", self.z_dim),
      ("img_channels", self.img_channels),
      *((f"channels[{i}]", c) for i, c in enumerate(self.channels)),
    ):
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"DCGAN config: {name} must be a positive int, got {value!r}")
    if not 1 <= len(self.channels) <= MAX_BLOCKS:
      raise ValueError(
        f"DCGAN config: channels must list 1 to {MAX_BLOCKS} block widths, got {len(self.channels)}"
      )
    if not (isinstance(self.bn_eps, float) and 0 < self.bn_eps < 1):
      raise ValueError(f"DCGAN config: bn_eps must be a float in (0, 1), got {self.bn_eps!r}")

  @classmethod
  def from_dict(cls, config: dict) -> "Config":
    """From a converted config; `img_resolution` (informational) must agree."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(config) - names - {"source", "img_resolution"}
    if unknown:
      raise ValueError(f"unknown DCGAN config keys: {sorted(unknown)}")
    kw = {k: v for k, v in config.items() if k in names}
    kw["channels"] = tuple(kw.get("channels", ()))
    cfg = cls(**kw)
    if config.get("img_resolution", cfg.img_resolution) != cfg.img_resolution:
      raise ValueError(
        f"DCGAN config: img_resolution {config['img_resolution']} does not "
        f"match {len(cfg.channels)} blocks ({cfg.img_resolution})"
      )
    return cfg

  @property
  def num_layers(self) -> int:
    return len(self.channels)

  @property
  def img_resolution(self) -> int:
    return 2 ** (self.num_layers + 2)

  def feature_shape(self, layer: int) -> tuple[int, int, int]:
    """`(h, w, c)` of the output of block `layer` (1-based)."""
    side = 2 ** (layer + 1)
    return side, side, self.channels[layer - 1]


class ConvTranspose(nn.Module):
  """A bias-free 4x4 `ConvTranspose2d`: `[n, h, w, i] -> [n, h', w', features]`."""

  features: int
  stride: int
  padding: int

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", _zeros, (KERNEL, KERNEL, x.shape[-1], self.features))
    return conv_transpose2d(x, kernel, self.stride, self.padding)


class Block(nn.Module):
  """ConvTranspose2d / eval-mode BatchNorm2d / ReLU."""

  features: int
  stride: int
  padding: int
  eps: float

  @nn.compact
  def __call__(self, x):
    x = ConvTranspose(self.features, self.stride, self.padding, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=self.eps, name="bn")(x)
    return nn.relu(x)


class DCGANNet(nn.Module):
  """z `[n, z_dim]` -> image `[n, R, R, img_channels]`, runnable from any block."""

  cfg: Config

  def setup(self):
    cfg = self.cfg
    self.blocks = [
      Block(c, 1 if i == 0 else 2, 0 if i == 0 else 1, cfg.bn_eps)
      for i, c in enumerate(cfg.channels)
    ]
    self.to_rgb = ConvTranspose(cfg.img_channels, 2, 1)

  def features(self, x, start: int, stop: int):
    """Blocks `start+1 .. stop`; `x` is z `[n, z_dim]` when `start == 0`,
    else the output of block `start`. Returns `[n, h, w, channels[stop-1]]`."""
    if start == 0:
      x = x[:, None, None, :]  # [n, 1, 1, z_dim], torch's z.view(n, z_dim, 1, 1).
    for block in self.blocks[start:stop]:
      x = block(x)
    return x

  def __call__(self, x, start: int = 0):
    """The image `[n, R, R, img_channels]` in [-1, 1] from block `start`'s output."""
    x = self.features(x, start, self.cfg.num_layers)
    return jnp.tanh(self.to_rgb(x))


@functools.partial(jax.jit, static_argnames=("cfg", "stop"))
def _features(variables, z, *, cfg: Config, stop: int):
  return DCGANNet(cfg).apply(variables, z, 0, stop, method=DCGANNet.features)


@functools.partial(jax.jit, static_argnames=("cfg", "start"))
def _image(variables, x, *, cfg: Config, start: int):
  return DCGANNet(cfg).apply(variables, x, start)


def variable_shapes(cfg: Config) -> Any:
  """The `{"params", "batch_stats"}` tree a `cfg` needs, as `jax.ShapeDtypeStruct`s."""
  z = jax.ShapeDtypeStruct((1, cfg.z_dim), jnp.float32)
  return jax.eval_shape(DCGANNet(cfg).init, jax.random.key(0), z)


@base.register
class DCGAN(base.FlaxGenerator):
  """A converted DCGAN-tutorial generator (see the module docstring)."""

  arch = "dcgan"

  @staticmethod
  def parse_config(config: dict, params) -> Config:
    """`Config.from_dict(config)` (every option is in `config.json`)."""
    return Config.from_dict(config)

  param_shapes = staticmethod(variable_shapes)

  @property
  def num_layers(self) -> int:
    return self.cfg.num_layers

  def latents(self, z, c=None, truncation_psi: float = 1.0, truncation_cutoff: int | None = None):
    """`z [n, z_dim]` as float32 (no mapping network); only `truncation_psi = 1`.

    Raises:
      ValueError: `z` of the wrong shape, a class `c`, or a truncation.
    """
    if c is not None:
      raise ValueError("this DCGAN is unconditional: pass c=None")
    try:
      psi = float(truncation_psi)
    except TypeError:  # A traced value.
      raise ValueError("truncation_psi must be a Python number for DCGAN") from None
    if psi != 1.0 or truncation_cutoff is not None:
      raise ValueError(
        f"DCGAN has no truncation (no mean latent to truncate towards): pass "
        f"truncation_psi=1 and truncation_cutoff=None, got {truncation_psi!r}, "
        f"{truncation_cutoff!r}"
      )
    return self._check_z(jnp.asarray(z, jnp.float32))

  def _check_z(self, z):
    if jnp.ndim(z) != 2 or jnp.shape(z)[1] != self.cfg.z_dim:
      raise ValueError(f"z must be [n, {self.cfg.z_dim}], got shape {tuple(jnp.shape(z))}")
    return z

  def split(self, latents, layer: int, noise_key=None):
    """`(x [n, h, w, c], None)`: the output of block `layer` (module docstring)."""
    layer = self.check_layer(layer)
    return _features(self.params, self._check_z(latents), cfg=self.cfg, stop=layer), None

  def resume(self, x, carry, latents, layer: int, noise_key=None):
    """The image `[n, R, R, img_channels]` from the output `x` of block `layer`.

    `carry` must be None (`split`'s); `latents` are not needed after `layer`.
    """
    layer = self.check_layer(layer)
    if carry is not None:
      raise ValueError("DCGAN has no carry: pass the None that split returned")
    want = self.cfg.feature_shape(layer)
    if jnp.ndim(x) != 4 or tuple(jnp.shape(x)[1:]) != want:
      raise ValueError(
        f"x must be [n, {', '.join(map(str, want))}] at layer {layer}, "
        f"got shape {tuple(jnp.shape(x))}"
      )
    return _image(self.params, x, cfg=self.cfg, start=layer)

  def generate(self, latents, noise_key=None):
    """The image `[n, R, R, img_channels]` in [-1, 1] of `latents` (= z `[n, z_dim]`)."""
    return _image(self.params, self._check_z(latents), cfg=self.cfg, start=0)
