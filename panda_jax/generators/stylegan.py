"""StyleGAN v1 (Karras et al., 2019) as genforce's `StyleGANGenerator` computes it, NHWC.

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

Parameters (converted by `converters.genforce`, equalised-lr scales applied):

    mapping:  dense{i}: weight [in, out], bias [out]
    w_avg:    [w_dim]
    layer0:   const [1, 4, 4, c]
    layer{i}: weight [3, 3, c_in, c]                         (i >= 1)
    layer{i}: bias [c], noise [1, h, w, 1], noise_strength [c],
              style: weight [w_dim, 2 c], bias [2 c]         (every i)
    torgb:    weight [c_last, channels], bias [channels]
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from panda_jax.generators import base
from panda_jax.generators import layers
from panda_jax.generators import pggan

BLUR_FILTER = layers.setup_filter([1, 2, 1])  # [3, 3], sums to 1.
AUTO_FUSED_SCALE_MIN_RES = 128  # genforce's `fused_scale="auto"`.
CONFIG_KEYS = pggan.CONFIG_KEYS + ("w_dim",)


class Config(NamedTuple):
  """The static (hashable) part of a converted StyleGAN's config."""
  resolution: int
  fused_scale: bool | str  # True, False or "auto".
  final_tanh: bool


def uses_fused_scale(fused_scale: bool | str, res: int) -> bool:
  """Whether the upsampling layer to `res` x `res` is a fused transposed conv."""
  if fused_scale == "auto":
    return res >= AUTO_FUSED_SCALE_MIN_RES
  return bool(fused_scale)


@jax.jit
def mapping(params: dict, z: jax.Array) -> jax.Array:
  """Mapping network `z [n, z_dim] -> w [n, w_dim]`."""
  x = pggan.pixel_norm(z)
  for i in range(len(params)):
    x = pggan.lrelu(layers.dense(x, params[f"dense{i}"]["weight"]), params[f"dense{i}"]["bias"])
  return x


def draw_noise(noise_key, n: int, start: int, stop: int) -> dict | None:
  """Random noise `{f"layer{i}": [n, h, w, 1]}` for layers `start .. stop - 1`,
  layer i's from `fold_in(noise_key, i)`; None (the stored buffers) for a None key."""
  if noise_key is None:
    return None
  return {f"layer{i}": jax.random.normal(jax.random.fold_in(noise_key, i),
                                         (n, 4 << (i // 2), 4 << (i // 2), 1))
          for i in range(start, stop)}


def _layer(params: dict, x, w: jax.Array, index: int, noise):
  """Layer `index` (0-based): `x [n, h, w, c_in]` (None for 0), `w [n, w_dim]`,
  `noise [n, h, w, 1]` or None for the stored `[1, h, w, 1]` buffer.

  Upsampling layers, fused or not, run as `layers.fused_upsample_conv3x3`
  (equal to nearest 2x then the 3x3 conv; see `pggan._layer`).
  """
  n = w.shape[0]
  if index == 0:
    x = jnp.broadcast_to(params["const"], (n,) + params["const"].shape[1:])
  elif index % 2 == 0:
    x = layers.fused_upsample_conv3x3(x, params["weight"])
    x = layers.upfirdn2d(x, BLUR_FILTER, padding=(1, 1, 1, 1))
  else:
    x = layers.conv2d(x, params["weight"], padding=1)
  noise = params["noise"] if noise is None else noise
  x = layers.instance_norm(pggan.lrelu(x + noise * params["noise_strength"],
                                       params["bias"]))
  style = layers.dense(w, params["style"]["weight"], params["style"]["bias"])  # [n, 2c]
  scale, shift = jnp.split(style[:, None, None, :], 2, axis=-1)
  return x * (scale + 1.0) + shift


@functools.partial(jax.jit, static_argnames=("cfg", "start", "stop"))
def run_layers(params: dict, x, wp: jax.Array, noise: dict | None = None, *,
               cfg: Config, start: int, stop: int) -> jax.Array:
  """Layers `start .. stop - 1` (0-based) from `x` (None for start 0).

  `wp [n, num_layers, w_dim]`; `noise` from `draw_noise`, None for the stored
  noise buffers (genforce's `randomize_noise=False`).
  """
  del cfg  # Static: part of the cache key (the up-convs do not depend on fused_scale).
  for i in range(start, stop):
    x = _layer(params[f"layer{i}"], x, wp[:, i], i,
               None if noise is None else noise[f"layer{i}"])
  return x


@functools.partial(jax.jit, static_argnames=("cfg", "layer"))
def resume_image(params: dict, x: jax.Array, wp: jax.Array, noise: dict | None = None,
                 *, cfg: Config, layer: int) -> jax.Array:
  """Image `[n, H, W, channels]` from the output `x [n, h, w, c]` of layer `layer`."""
  x = run_layers(params, x, wp, noise, cfg=cfg, start=layer,
                 stop=pggan.num_layers_for(cfg.resolution))
  return pggan.to_rgb(params["torgb"], x, cfg.final_tanh)


@base.register
class StyleGANGenerator(base.Generator):
  """StyleGAN v1 generator; latents are W+ codes `[n, num_layers, w_dim]`.

  Config: `resolution`, `z_dim`, `w_dim`, `image_channels`, `fused_scale`
  (True, False or "auto"), `final_tanh`.
  """
  arch = "stylegan"

  def __init__(self, config: dict, params):
    pggan.check_config(config, CONFIG_KEYS)
    super().__init__(config, params)
    fused_scale = config["fused_scale"]
    if fused_scale not in (True, False, "auto"):
      raise ValueError(f"fused_scale must be True, False or 'auto', got {fused_scale!r}")
    self.cfg = Config(int(config["resolution"]), fused_scale,
                      bool(config["final_tanh"]))
    self._num_layers = pggan.num_layers_for(self.cfg.resolution)

  @classmethod
  def from_converted(cls, config: dict, params) -> "StyleGANGenerator":
    """Builds the generator, checking every parameter shape against `config`."""
    gen = cls(config, params)
    check_params(params, gen.num_layers, gen.z_dim, int(config["w_dim"]),
                 int(config["image_channels"]))
    return gen

  @property
  def num_layers(self) -> int:
    return self._num_layers

  @property
  def w_dim(self) -> int:
    return int(self.config["w_dim"])

  def latents(self, z, c=None, truncation_psi: float = 1.0,
              truncation_cutoff: int | None = None):
    """W+ codes `[n, num_layers, w_dim]` of `z [n, z_dim]`.

    `w_avg + psi * (w - w_avg)` on the first `truncation_cutoff` layers (all
    when None): genforce's `trunc_psi` / `trunc_layers`.
    """
    if c is not None:
      raise ValueError("this StyleGAN is unconditional: c must be None")
    z = jnp.asarray(z, jnp.float32)
    if z.ndim != 2 or z.shape[1] != self.z_dim:
      raise ValueError(f"z must be [n, {self.z_dim}], got shape {z.shape}")
    w = mapping(self.params["mapping"], z)
    wp = jnp.repeat(w[:, None], self.num_layers, axis=1)  # [n, layers, w_dim]
    return layers.truncate(wp, self.params["w_avg"], truncation_psi,
                           truncation_cutoff)

  def _check_latents(self, wp) -> jax.Array:
    layers.check_ws(wp, self.num_layers, self.w_dim)
    return jnp.asarray(wp)

  def split(self, latents, layer: int, noise_key=None):
    """`(x [n, h, w, c], None)`: the output of the first `layer` layers."""
    layer = self.check_layer(layer)
    wp = self._check_latents(latents)
    noise = draw_noise(noise_key, wp.shape[0], 0, layer)
    return run_layers(self.params, None, wp, noise, cfg=self.cfg, start=0,
                      stop=layer), None

  def resume(self, x, carry, latents, layer: int, noise_key=None):
    """The layers after `layer` and the last ToRGB: image `[n, H, W, channels]`."""
    layer = self.check_layer(layer)
    wp = self._check_latents(latents)
    noise = draw_noise(noise_key, wp.shape[0], layer, self.num_layers)
    return resume_image(self.params, x, wp, noise, cfg=self.cfg, layer=layer)


def check_params(params: dict, num_layers: int, z_dim: int, w_dim: int,
                 image_channels: int) -> None:
  """Raises a `ValueError` unless every parameter has the shape the config implies."""
  if not isinstance(params, dict) or not {"mapping", "w_avg", "layer0"} <= set(params):
    raise ValueError("params must hold mapping, w_avg, layer0 .. and torgb")
  c_in = z_dim
  for i in range(len(params["mapping"])):
    shape = tuple(params["mapping"][f"dense{i}"]["weight"].shape)
    if len(shape) != 2 or shape[0] != c_in:
      raise ValueError(f"mapping.dense{i}.weight must be [{c_in}, out], got {list(shape)}")
    c_in = shape[1]
  if c_in != w_dim or tuple(params["w_avg"].shape) != (w_dim,):
    raise ValueError(f"mapping output and w_avg must have w_dim = {w_dim} channels")
  const = tuple(params["layer0"]["const"].shape)
  if len(const) != 4 or const[:3] != (1, 4, 4):
    raise ValueError(f"layer0.const must be [1, 4, 4, c], got {list(const)}")
  pggan.check_params(params, num_layers, const[3], image_channels, first_kernel=None)
  for i in range(num_layers):
    p, res = params[f"layer{i}"], 4 << (i // 2)
    c = p["bias"].shape[0]
    want = {"noise": (1, res, res, 1), "noise_strength": (c,)}
    got = {k: tuple(p[k].shape) for k in want}
    style = (tuple(p["style"]["weight"].shape), tuple(p["style"]["bias"].shape))
    if got != want or style != ((w_dim, 2 * c), (2 * c,)):
      raise ValueError(f"layer{i}: noise, noise_strength and style must be "
                       f"{want} and ({(w_dim, 2 * c)}, {(2 * c,)}), got {got}, {style}")
