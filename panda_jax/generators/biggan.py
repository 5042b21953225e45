"""BigGAN-deep (Brock et al., 2019) as pytorch-pretrained-biggan defines it, in Flax, NHWC.

The network: `cond = [z, embed(c)]` (`[n, 2 * z_dim]`), `gen_z` (a linear layer
to a 4x4 map of `16 * ch` channels), `generator.layers` (bottleneck GenBlocks,
with one self-attention layer inserted before block `attention_layer_position`),
a final batch norm, ReLU, 3x3 conv to RGB and tanh. Every batch norm normalises
with statistics precomputed for `n_stats` truncations in [0, 1] and picked by
the truncation of the latents (see `stat_weights`); the conditional ones scale
by `1 + cond @ scale` and shift by `cond @ offset`. Spectral norms are folded
into the weights by the converter.

Modules: `BigGANNet` holds the whole parameter tree (`param_shapes`), with one
`GenBlock` or `SelfAttention` per entry of `generator.layers`. `split`/`resume`
apply each entry on its own, jitted per distinct entry (`Layer`), so that
blocks of the same shape, and splits at any layer, share their compilations.

Layer numbering (`split`/`resume`): layer 0 is `gen_z`'s output `[n, 4, 4,
16 * ch]`; layer l is the output after the first l entries of
`generator.layers` (GenBlocks and SelfAttn each count one), as the PandA paper's
BigGAN experiments count them. The carry is `None`: the rest of the network
needs only the latents.

Precision: every conv and matmul runs at `layers.PRECISION` (float32, also
on GPU/TPU); on CPU this matches the package's float32 outputs to ~3e-7 of
their range.

Parameters (nested dicts; `ch` = channel_width, `d` = 2 * z_dim, `k` = n_stats):
  embeddings `[num_classes, z_dim]`; gen_z {kernel `[d, 4 * 4 * 16 * ch]`, bias};
  layer_{i} for a GenBlock: bn_{0..3} {scale `[d, c]`, offset `[d, c]`, means
  `[k, c]`, vars `[k, c]`}, conv_{0..3} {kernel `[kh, kw, c_in, c_out]`, bias};
  layer_{i} for SelfAttn: theta, phi `[c, c // 8]`, g `[c, c // 2]`, o_conv
  `[c // 2, c]`, gamma `[]`; bn {weight, bias `[ch]`, means, vars `[k, ch]`};
  conv_to_rgb {kernel `[3, 3, ch, ch]`, bias `[ch]`}.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from panda_jax import checks
from panda_jax.generators import base
from panda_jax.generators import layers

# pytorch-pretrained-biggan's `BigGANConfig` keys: a config.json holds all of them.
CONFIG_KEYS = (
  "output_dim",
  "z_dim",
  "class_embed_dim",
  "channel_width",
  "num_classes",
  "layers",
  "attention_layer_position",
  "eps",
  "n_stats",
)
REDUCTION = 4  # GenBlock bottleneck: middle channels = in_channels // 4.
_MAX_WIDTH = 1 << 16  # Channels, z_dim, classes, stats: far above any real model.
_zeros = nn.initializers.zeros


@dataclasses.dataclass(frozen=True)
class Layer:
  """One entry of `generator.layers`: a GenBlock or the SelfAttn layer."""

  kind: str  # "block" or "attention".
  in_channels: int
  out_channels: int
  up_sample: bool


@dataclasses.dataclass(frozen=True)
class Config:
  """pytorch-pretrained-biggan's `BigGANConfig` (hashable).

  `layers` lists `(up_sample, in_mult, out_mult)` per GenBlock: channels are
  multiples of `channel_width`.
  """

  output_dim: int
  z_dim: int
  class_embed_dim: int
  channel_width: int
  num_classes: int
  layers: tuple[tuple[bool, int, int], ...]
  attention_layer_position: int
  eps: float
  n_stats: int

  def __post_init__(self):
    """Raises a `ValueError` naming the problem: sizes that are not positive
    integers in range, a `layers` list whose channels do not chain (16 -> ... -> 1
    multiples of `channel_width`, each GenBlock keeping or halving them), or an
    `output_dim` that is not 4 * 2^(number of up-samplings)."""
    for key in ("z_dim", "class_embed_dim", "channel_width", "num_classes", "n_stats"):
      self._check_int(key)
    if self.n_stats < 2:
      raise ValueError(f"BigGAN config: n_stats must be >= 2, got {self.n_stats}")
    self._check_int("output_dim", high=1 << 14)
    eps = self.eps
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
      raise ValueError(f"BigGAN config: eps must be a number in (0, 1), got {eps!r}")
    position = self.attention_layer_position
    if isinstance(position, bool) or not isinstance(position, int):
      raise ValueError(
        f"BigGAN config: attention_layer_position must be an integer, got {position!r}"
      )
    entries = self.layers
    if not isinstance(entries, tuple) or not 1 <= len(entries) <= 64:
      raise ValueError(
        "BigGAN config: layers must be a list of 1 to 64 "
        f"[up_sample, in_mult, out_mult] entries, got {entries!r}"
      )
    ch = self.channel_width
    previous, ups = 16, 0
    for i, entry in enumerate(entries):
      if (
        not isinstance(entry, tuple)
        or len(entry) != 3
        or not isinstance(entry[0], bool)
        or not all(
          isinstance(m, int) and not isinstance(m, bool) and 1 <= m <= 64 for m in entry[1:]
        )
      ):
        raise ValueError(
          f"BigGAN config: layers[{i}] must be [bool, int, int] with "
          f"multipliers in [1, 64], got {entry!r}"
        )
      up, c_in, c_out = entry
      if c_in != previous or c_out not in (c_in, c_in / 2) or c_in * ch < REDUCTION:
        raise ValueError(
          f"BigGAN config: layers[{i}] = {list(entry)} does not chain: its input "
          f"multiplier must be {previous}, its output equal to it or half of it, "
          f"and {c_in} * channel_width >= {REDUCTION}"
        )
      previous, ups = c_out, ups + up
    if previous != 1:
      raise ValueError(
        f"BigGAN config: the last layer must output 1 * channel_width channels, got {previous}"
      )
    if ch < 3:
      raise ValueError(f"BigGAN config: channel_width must be >= 3 (RGB), got {ch}")
    if 0 <= position < len(entries) and ch * entries[position][1] < 8:
      raise ValueError("BigGAN config: self-attention needs >= 8 input channels")
    if self.output_dim != 4 << ups:
      raise ValueError(
        f"BigGAN config: output_dim {self.output_dim} does not match 4 * 2^{ups} up-samplings"
      )

  def _check_int(self, key: str, high: int = _MAX_WIDTH) -> None:
    value = getattr(self, key)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
      raise ValueError(f"BigGAN config: {key} must be an integer in [1, {high}], got {value!r}")

  @classmethod
  def from_dict(cls, config: dict) -> "Config":
    """From a pytorch-pretrained-biggan `BigGANConfig` dict (a converted config).

    Raises a `ValueError` for missing or unknown keys, and as `__post_init__`.
    """
    if not isinstance(config, dict):
      raise ValueError(f"BigGAN config must be a dict, got {type(config).__name__}")
    missing = [k for k in CONFIG_KEYS if k not in config]
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if missing or unknown:
      raise ValueError(f"BigGAN config: missing keys {missing}, unknown keys {unknown}")
    kw = dict(config)
    if isinstance(kw["layers"], (list, tuple)):
      kw["layers"] = tuple(tuple(e) if isinstance(e, (list, tuple)) else e for e in kw["layers"])
    return cls(**kw)

  @property
  def generator_layers(self) -> tuple[Layer, ...]:
    """`generator.layers` as the package builds it.

    SelfAttn over `ch * layers[p][1]` channels goes before GenBlock p, with p =
    `attention_layer_position` (no attention when p is outside the list).
    """
    ch = self.channel_width
    out = []
    for i, (up, c_in, c_out) in enumerate(self.layers):
      if i == self.attention_layer_position:
        out.append(Layer("attention", ch * c_in, ch * c_in, False))
      out.append(Layer("block", ch * c_in, ch * c_out, bool(up)))
    return tuple(out)


def stat_weights(truncation, n_stats: int):
  """Weights `[n_stats]` of the precomputed batch-norm statistics for a truncation.

  The package's arithmetic, kept exactly: `coef, i = modf(truncation / step)`
  with `step = 1 / (n_stats - 1)`; the statistics are `stats[i]` when `coef`
  is 0, else `coef * stats[i] + (1 - coef) * stats[i + 1]`: swapped compared
  with a usual lerp, so the statistics jump at every grid point. Copied as is,
  since the pretrained models are run this way. A concrete truncation is done
  in float64 like Python's floats; a traced one in float32, which can pick the
  neighbouring row at exact multiples of `step`: call `latents` outside `jit`
  for the package's numbers.

  Returns:
    `[n_stats]` float32 weights `w`; the statistics are `sum_k w[k] * stats[k]`.
  """
  concrete = checks.is_concrete(truncation)
  xp = np if concrete else jnp
  truncation = np.float64(truncation) if concrete else truncation
  step = 1.0 / (n_stats - 1)
  coef, index = xp.modf(truncation / step)
  rows = xp.arange(n_stats)
  lerp = xp.where(rows == index, coef, 0.0) + xp.where(rows == index + 1, 1.0 - coef, 0.0)
  return xp.where(coef != 0.0, lerp, rows == index).astype(xp.float32)


def one_hot(classes, num_classes: int = 1000, batch_size: int = 1):
  """One-hot class vectors `[n, num_classes]` from an index or a list of indices.

  Like the package's `one_hot_from_int`: a single index is repeated
  `batch_size` times (ImageNet indices 0..999 for the pretrained models).
  """
  classes = np.atleast_1d(np.asarray(classes))
  if classes.ndim != 1 or not np.issubdtype(classes.dtype, np.integer):
    raise ValueError(f"classes must be an int or a list of ints, got {classes!r}")
  if classes.size == 1:
    classes = np.repeat(classes, batch_size)
  if np.any(classes < 0) or np.any(classes >= num_classes):
    raise ValueError(f"class indices must be in [0, {num_classes}), got {classes}")
  return jax.nn.one_hot(classes, num_classes, dtype=jnp.float32)


def truncated_noise(key, n: int, z_dim: int, truncation: float = 1.0):
  """`truncation * t`, t ~ standard normal truncated to [-2, 2]: `[n, z_dim]`.

  The package's `truncated_noise_sample`, with an explicit PRNG key; its output
  is the `z` that `latents` expects (already scaled by the truncation).
  """
  return truncation * jax.random.truncated_normal(key, -2.0, 2.0, (n, z_dim))


def _normalize(x, means, variances, w_stats, eps):
  """`(x - mean) / sqrt(var + eps)` with the truncation's statistics `[c]`."""
  # Weighted sums, not matmuls: exact float32 whatever the matmul precision.
  mean = jnp.sum(w_stats[:, None] * means, axis=0)  # [c]
  var = jnp.sum(w_stats[:, None] * variances, axis=0)  # [c]
  return (x - mean) / jnp.sqrt(var + eps)


class BatchNorm(nn.Module):
  """The final batch norm: `x [n, h, w, c]`, statistics weights `w_stats [n_stats]`."""

  eps: float

  @nn.compact
  def __call__(self, x, w_stats):
    c, k = x.shape[-1], w_stats.shape[0]
    weight = self.param("weight", _zeros, (c,))
    bias = self.param("bias", _zeros, (c,))
    means = self.param("means", _zeros, (k, c))
    variances = self.param("vars", _zeros, (k, c))
    return _normalize(x, means, variances, w_stats, self.eps) * weight + bias


class ConditionalBatchNorm(nn.Module):
  """Class-conditional batch norm: `x [n, h, w, c]`, `cond [n, d]`, `w_stats [n_stats]`."""

  eps: float

  @nn.compact
  def __call__(self, x, cond, w_stats):
    c, d, k = x.shape[-1], cond.shape[-1], w_stats.shape[0]
    scale = self.param("scale", _zeros, (d, c))
    offset = self.param("offset", _zeros, (d, c))
    means = self.param("means", _zeros, (k, c))
    variances = self.param("vars", _zeros, (k, c))
    gain = 1.0 + layers.matmul(cond, scale)  # [n, c]
    bias = layers.matmul(cond, offset)  # [n, c]
    return (
      _normalize(x, means, variances, w_stats, self.eps) * gain[:, None, None] + bias[:, None, None]
    )


class Conv(nn.Module):
  """Stride-1 'same' convolution `{kernel [k, k, c_in, c_out], bias [c_out]}`:
  `[n, h, w, c_in] -> [n, h, w, c_out]`, or `[n, 2h, 2w, c_out]` after a nearest
  2x upsampling when `up` (3x3 only)."""

  features: int
  kernel_size: int
  up: bool = False

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param("kernel", _zeros, (k, k, x.shape[-1], self.features))
    bias = self.param("bias", _zeros, (self.features,))
    if self.up:
      # Nearest 2x then the 3x3 conv, as one stride-2 transposed conv of the low-
      # resolution input: 16 instead of 36 taps per low-resolution pixel.
      return layers.fused_upsample_conv3x3(x, kernel) + bias
    return layers.conv2d(x, kernel, padding=k // 2) + bias


class GenBlock(nn.Module):
  """Bottleneck GenBlock: bn-relu-1x1 reduce, (up), 2 x bn-relu-3x3, bn-relu-1x1,
  plus the (channel-dropped, upsampled) input."""

  layer: Layer
  eps: float

  @nn.compact
  def __call__(self, x, cond, w_stats):
    """`x [n, h, w, c_in]`, `cond [n, d]`, `w_stats [n_stats]` -> `[n, h', w', c_out]`."""
    layer = self.layer
    mid = layer.in_channels // REDUCTION
    h = x
    for i, (features, size) in enumerate(((mid, 1), (mid, 3), (mid, 3), (layer.out_channels, 1))):
      h = jax.nn.relu(ConditionalBatchNorm(self.eps, name=f"bn_{i}")(h, cond, w_stats))
      h = Conv(features, size, up=i == 1 and layer.up_sample, name=f"conv_{i}")(h)
    skip = x[..., : layer.out_channels]  # Channel drop keeps the first c_in // 2.
    if layer.up_sample:
      skip = layers.upsample_nearest(skip)
    return h + skip


def _maxpool(x):
  """2x2 max pooling, stride 2: `[n, h, w, c] -> [n, h/2, w/2, c]`."""
  n, h, w, c = x.shape
  return jnp.max(jnp.reshape(x, (n, h // 2, 2, w // 2, 2, c)), axis=(2, 4))


class SelfAttention(nn.Module):
  """SAGAN self-attention, keys and values max-pooled 2x2: `[n, h, w, c]`."""

  @nn.compact
  def __call__(self, x):
    n, h, w, c = x.shape
    theta_w = self.param("theta", _zeros, (c, c // 8))
    phi_w = self.param("phi", _zeros, (c, c // 8))
    g_w = self.param("g", _zeros, (c, c // 2))
    o_conv = self.param("o_conv", _zeros, (c // 2, c))
    gamma = self.param("gamma", _zeros, ())
    theta = jnp.reshape(layers.matmul(x, theta_w), (n, h * w, -1))  # [n, s, c/8]
    phi = jnp.reshape(_maxpool(layers.matmul(x, phi_w)), (n, h * w // 4, -1))  # [n, s/4, c/8]
    g = jnp.reshape(_maxpool(layers.matmul(x, g_w)), (n, h * w // 4, -1))  # [n, s/4, c/2]
    attn = jax.nn.softmax(layers.einsum("nsk,ntk->nst", theta, phi), axis=-1)
    out = layers.matmul(layers.einsum("nst,ntk->nsk", attn, g), o_conv)  # [n, s, c]
    return x + gamma * jnp.reshape(out, (n, h, w, c))


def _cond(latents):
  """The package's condition vector `[z, embedding]`: `[n, 2 * z_dim]`."""
  return jnp.concatenate([latents["z"], latents["embedding"]], axis=1)


def _layer_module(layer: Layer, eps: float) -> nn.Module:
  return SelfAttention() if layer.kind == "attention" else GenBlock(layer, eps)


def _run_layer(module: nn.Module, x, latents):
  """An entry of `generator.layers`: attention on `x` alone, a GenBlock conditioned."""
  if isinstance(module, SelfAttention):
    return module(x)
  return module(x, _cond(latents), latents["stat_weights"])


class BigGANNet(nn.Module):
  """Class embedding, `gen_z`, `generator.layers`, final batch norm and ToRGB."""

  cfg: Config

  def setup(self):
    cfg = self.cfg
    self.embeddings = self.param("embeddings", _zeros, (cfg.num_classes, cfg.z_dim))
    self.gen_z = nn.Dense(4 * 4 * 16 * cfg.channel_width, precision=layers.PRECISION)
    # A list attribute: its modules are named layer_0, layer_1, ... (generator.layers.i).
    self.layer = [_layer_module(layer, cfg.eps) for layer in cfg.generator_layers]
    self.bn = BatchNorm(cfg.eps)
    self.conv_to_rgb = Conv(cfg.channel_width, 3)

  def embed(self, c):
    """The class embedding `[n, z_dim]` of one-hot `c [n, num_classes]`."""
    return layers.matmul(c, self.embeddings)

  def input(self, latents):
    """Layer 0: `gen_z(cond)` viewed as `[n, 4, 4, 16 * ch]` (the package's NHWC view)."""
    x = self.gen_z(_cond(latents))
    return jnp.reshape(x, (x.shape[0], 4, 4, -1))

  def to_rgb(self, x, latents):
    """Final batch norm, ReLU, 3x3 conv, first 3 channels, tanh: `[n, H, W, 3]`."""
    x = jax.nn.relu(self.bn(x, latents["stat_weights"]))
    return jnp.tanh(self.conv_to_rgb(x)[..., :3])

  def __call__(self, z, c, w_stats):
    """The image of `z [n, z_dim]`, one-hot `c [n, num_classes]` and statistics
    weights `w_stats [n_stats]`: the initialisation path touching every parameter."""
    latents = {"z": z, "embedding": self.embed(c), "stat_weights": w_stats}
    x = self.input(latents)
    for module in self.layer:
      x = _run_layer(module, x, latents)
    return self.to_rgb(x, latents)


def param_shapes(cfg: Config) -> Any:
  """The parameter tree a `cfg` needs, as `jax.ShapeDtypeStruct`s."""
  z = jax.ShapeDtypeStruct((1, cfg.z_dim), jnp.float32)
  c = jax.ShapeDtypeStruct((1, cfg.num_classes), jnp.float32)
  w_stats = jax.ShapeDtypeStruct((cfg.n_stats,), jnp.float32)
  return jax.eval_shape(BigGANNet(cfg).init, jax.random.key(0), z, c, w_stats)["params"]


@functools.partial(jax.jit, static_argnames=("layer", "eps"))
def _apply_layer(params, x, latents, *, layer: Layer, eps: float):
  """One entry of `generator.layers` (its params `layer_{i}`) on `x [n, h, w, c]`.

  Compiled once per distinct layer: `split`/`resume` at any `l` reuse these.
  """
  return _layer_module(layer, eps).apply({"params": params}, x, latents, method=_run_layer)


@functools.partial(jax.jit, static_argnames="cfg")
def _input(params, latents, *, cfg: Config):
  return BigGANNet(cfg).apply({"params": params}, latents, method=BigGANNet.input)


@functools.partial(jax.jit, static_argnames="cfg")
def _to_rgb(params, x, latents, *, cfg: Config):
  return BigGANNet(cfg).apply({"params": params}, x, latents, method=BigGANNet.to_rgb)


def _run(params, x, latents, cfg: Config, start: int, stop: int):
  """Entries `start..stop-1` of `generator.layers` on `x [n, h, w, c]`."""
  for i, layer in enumerate(cfg.generator_layers[start:stop], start):
    x = _apply_layer(params[f"layer_{i}"], x, latents, layer=layer, eps=cfg.eps)
  return x


@base.register
class BigGAN(base.FlaxGenerator):
  """BigGAN-deep with layer access (`split`/`resume`; the carry is None).

  Latents: a dict of `z [n, z_dim]`, `embedding [n, z_dim]` (the class
  embedding), `truncation []` and `stat_weights [n_stats]` (see `stat_weights`).
  """

  arch = "biggan"

  @staticmethod
  def parse_config(config: dict, params) -> Config:
    """`Config.from_dict(config)` (every option is in `config.json`)."""
    return Config.from_dict(config)

  param_shapes = staticmethod(param_shapes)

  @property
  def c_dim(self) -> int:
    return self.cfg.num_classes

  @property
  def num_layers(self) -> int:
    return len(self.cfg.generator_layers)

  @property
  def layers(self) -> range:
    return range(0, self.num_layers + 1)

  def latents(self, z, c=None, truncation_psi: float = 1.0, truncation_cutoff: int | None = None):
    """Latents from truncated noise `z [n, z_dim]` and classes `c`.

    `c` is one-hot `[n, num_classes]` (or class indices `[n]`). `z` is used
    as given: sample it with `truncated_noise(key, n, z_dim, truncation_psi)`
    as the package does. `truncation_psi` in (0, 1] selects the batch-norm
    statistics. BigGAN has no per-layer truncation: `truncation_cutoff` must
    be None.
    """
    if truncation_cutoff is not None:
      raise ValueError("BigGAN has no per-layer truncation: truncation_cutoff must be None")
    if checks.is_concrete(truncation_psi) and not 0 < float(truncation_psi) <= 1:
      raise ValueError(f"truncation_psi must be in (0, 1], got {truncation_psi}")
    z = jnp.asarray(z, jnp.float32)
    if z.ndim != 2 or z.shape[1] != self.z_dim:
      raise ValueError(f"z must be [n, z_dim={self.z_dim}], got shape {z.shape}")
    if c is None:
      raise ValueError(
        f"BigGAN is class-conditional: pass c, one-hot [n, {self.c_dim}] or class indices [n]"
      )
    c = jnp.asarray(c)
    if c.ndim == 1 and jnp.issubdtype(c.dtype, jnp.integer):
      c = jax.nn.one_hot(c, self.c_dim, dtype=jnp.float32)
    if c.shape != (z.shape[0], self.c_dim):
      raise ValueError(
        f"c must be one-hot [n={z.shape[0]}, {self.c_dim}] or indices [n], got shape {c.shape}"
      )
    embedding = BigGANNet(self.cfg).apply(
      {"params": self.params}, c.astype(jnp.float32), method=BigGANNet.embed
    )
    return {
      "z": z,
      "embedding": embedding,
      "truncation": jnp.asarray(truncation_psi, jnp.float32),
      "stat_weights": jnp.asarray(stat_weights(truncation_psi, self.cfg.n_stats)),
    }

  def split(self, latents, layer: int, noise_key=None):
    """`(x [n, h, w, c], None)` after `layer` layers (0 = `gen_z`'s 4x4 map)."""
    layer = self.check_layer(layer)
    x = _input(self.params, latents, cfg=self.cfg)
    return _run(self.params, x, latents, self.cfg, 0, layer), None

  def resume(self, x, carry, latents, layer: int, noise_key=None):
    """RGB image `[n, H, W, 3]` in [-1, 1] from `x [n, h, w, c]` after `layer` layers."""
    layer = self.check_layer(layer)
    x = _run(self.params, x, latents, self.cfg, layer, self.num_layers)
    return _to_rgb(self.params, x, latents, cfg=self.cfg)
