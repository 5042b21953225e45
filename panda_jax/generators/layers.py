"""Layers shared by the generators, channels-last (`[n, h, w, c]`).

Pure functions with the arithmetic of NVIDIA's reference implementations
(`torch_utils/ops/upfirdn2d.py`, `bias_act.py`, `conv2d_resample.py` of
stylegan2-ada-pytorch/stylegan3): resampling by upsample -> pad -> FIR filter
-> downsample, fused bias + activation + gain + clamp, and (de)modulated
convolutions. Weights are stored with their equalised-learning-rate gains
already applied (done once by the converters).

Precision: every convolution and matrix product of the generators runs at
`PRECISION = jax.lax.Precision.HIGHEST` (true float32), through the functions
of this module (`conv2d`, `dense`, `matmul`, `einsum`, ...) or, for Flax
layers, `precision=PRECISION`. JAX's default on GPU (TF32) and TPU (bfloat16
passes) misses the ports' 1e-4 tolerance (earlier runs on an H200); on CPU both
agree. Callers need no `jax.default_matmul_precision` context, and a test
(`tests/test_generators_base.py`) checks every product of every family.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# name -> (function, default gain), as NVIDIA's `bias_act.activation_funcs`.
ACTIVATIONS = {
    "linear": (lambda x: x, 1.0),
    "relu": (jax.nn.relu, np.sqrt(2)),
    "lrelu": (lambda x: jax.nn.leaky_relu(x, 0.2), np.sqrt(2)),
    "tanh": (jnp.tanh, 1.0),
    "sigmoid": (jax.nn.sigmoid, 1.0),
    "elu": (jax.nn.elu, 1.0),
    "selu": (jax.nn.selu, 1.0),
    "softplus": (jax.nn.softplus, 1.0),
    "swish": (lambda x: jax.nn.sigmoid(x) * x, np.sqrt(2)),
}

_DIMS = ("NHWC", "HWIO", "NHWC")
PRECISION = jax.lax.Precision.HIGHEST  # Exact float32 products (module docstring).


def matmul(a, b):
  """`a @ b` in float32 precision."""
  return jnp.matmul(a, b, precision=PRECISION)


def dense(x, kernel, bias=None):
  """`x @ kernel + bias`: `x [..., i]`, `kernel [i, o]`, `bias [o]` -> `[..., o]`."""
  y = matmul(x, kernel)
  return y if bias is None else y + bias


def einsum(spec: str, *operands):
  """`jnp.einsum` in float32 precision."""
  return jnp.einsum(spec, *operands, precision=PRECISION)


def check_activation(name: str) -> str:
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")
  return name


def bias_act(x, bias=None, act: str = "linear", gain: float | None = None,
             clamp: float | None = None):
  """`clamp(act(x + bias) * gain)`; `x [..., c]`, `bias [c]`; gain defaults per act."""
  fn, def_gain = ACTIVATIONS[check_activation(act)]
  if bias is not None:
    x = x + bias
  x = fn(x)
  gain = def_gain if gain is None else gain
  if gain != 1:
    x = x * gain
  if clamp is not None:
    x = jnp.clip(x, -clamp, clamp)
  return x


def normalize_2nd_moment(x, eps: float = 1e-8):
  """`x / sqrt(mean(x^2) + eps)` over the last axis; `x [n, d]`."""
  return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


def setup_filter(taps: Sequence[float]) -> np.ndarray:
  """Separable 2-D FIR filter `[k, k]` from 1-D taps, normalised to unit sum."""
  f = np.asarray(taps, np.float32)
  f = np.outer(f, f) if f.ndim == 1 else f
  return (f / f.sum()).astype(np.float32)


def upfirdn2d(x, f: np.ndarray, up: int = 1, down: int = 1,
              padding: Sequence[int] = (0, 0, 0, 0), gain: float = 1.0):
  """Upsample (zero insertion), pad, convolve with `f [fh, fw]`, downsample.

  Args:
    x: `[n, h, w, c]`.
    f: a static 2-D filter (true convolution, as NVIDIA's `flip_filter=False`).
    up, down: integer factors.
    padding: `(x0, x1, y0, y1)` as NVIDIA's order; negative values crop.
    gain: the filter is scaled by `gain` (for 2-D filters, `gain ** (ndim / 2)`).

  Returns:
    `[n, (h*up + y0 + y1 - fh + 1) / down, ..., c]`.
  """
  x0, x1, y0, y1 = padding
  c = x.shape[-1]
  kernel = np.asarray(f, np.float32)[::-1, ::-1] * gain  # Correlation kernel.
  kernel = jnp.tile(jnp.asarray(kernel)[:, :, None, None], (1, 1, 1, c))  # [fh, fw, 1, c]
  # lhs_dilation inserts up-1 zeros between samples; NVIDIA also appends up-1.
  return jax.lax.conv_general_dilated(
      x, kernel.astype(x.dtype), window_strides=(down, down),
      padding=((y0, y1 + up - 1), (x0, x1 + up - 1)), lhs_dilation=(up, up),
      dimension_numbers=_DIMS, feature_group_count=c, precision=PRECISION)


def upsample2d(x, f: np.ndarray, up: int = 2):
  """2x (by default) upsampling with filter `f`, as NVIDIA's `upsample2d`: `[n, h*up, w*up, c]`."""
  fh, fw = f.shape
  padding = ((fw + up - 1) // 2, (fw - up) // 2, (fh + up - 1) // 2, (fh - up) // 2)
  return upfirdn2d(x, f, up=up, padding=padding, gain=up * up)


def conv2d(x, weight, padding: int):
  """Plain correlation (`torch.nn.functional.conv2d`); `weight [kh, kw, i, o]`."""
  return jax.lax.conv_general_dilated(
      x, weight.astype(x.dtype), (1, 1), ((padding, padding), (padding, padding)),
      dimension_numbers=_DIMS, precision=PRECISION)


def conv2d_up(x, weight, f: np.ndarray, padding: int, up: int = 2):
  """Upsampling convolution, NVIDIA's `conv2d_resample(up=2)` fast path.

  A stride-`up` transposed convolution with `weight [kh, kw, i, o]` followed by
  the FIR filter `f` (gain `up**2`): `[n, h, w, i] -> [n, h*up, w*up, o]`.
  """
  kh, kw = weight.shape[:2]
  fh, fw = f.shape
  px0 = padding + (fw + up - 1) // 2 - (kw - 1)
  px1 = padding + (fw - up) // 2 - (kw - up)
  py0 = padding + (fh + up - 1) // 2 - (kh - 1)
  py1 = padding + (fh - up) // 2 - (kh - up)
  pxt, pyt = max(min(-px0, -px1), 0), max(min(-py0, -py1), 0)
  # Transposed conv = correlation of the zero-dilated input with the flipped kernel.
  x = jax.lax.conv_general_dilated(
      x, weight[::-1, ::-1].astype(x.dtype), (1, 1),
      ((kh - 1 - pyt, kh - 1 - pyt), (kw - 1 - pxt, kw - 1 - pxt)),
      lhs_dilation=(up, up), dimension_numbers=_DIMS, precision=PRECISION)
  return upfirdn2d(x, f, padding=(px0 + pxt, px1 + pxt, py0 + pyt, py1 + pyt),
                   gain=up * up)


def modulated_conv2d(x, weight, styles, *, demodulate: bool = True, up: int = 1,
                     f: np.ndarray | None = None, noise=None):
  """StyleGAN2's (de)modulated convolution (Karras et al. 2020, Eqs. 1-3).

  Computed as NVIDIA's non-fused path, mathematically equal to the fused one:
  scale the input channels by the styles, convolve with the shared weight,
  scale the output channels by the demodulation coefficients, add noise.

  Args:
    x: `[n, h, w, i]`.
    weight: `[kh, kw, i, o]` (equalised-lr gain applied).
    styles: `[n, i]`.
    demodulate: divide each output channel by the norm of its modulated weight.
    up: 1, or 2 with the resampling filter `f`.
    noise: broadcastable to the output `[n, h*up, w*up, o]`, added last.

  Returns:
    `[n, h*up, w*up, o]`.
  """
  padding = weight.shape[0] // 2
  x = x * styles[:, None, None, :].astype(x.dtype)
  x = conv2d_up(x, weight, f, padding, up) if up > 1 else conv2d(x, weight, padding)
  if demodulate:
    wsq = jnp.sum(jnp.square(weight), axis=(0, 1))  # [i, o]
    dcoefs = jax.lax.rsqrt(matmul(jnp.square(styles), wsq) + 1e-8)  # [n, o]
    x = x * dcoefs[:, None, None, :].astype(x.dtype)
  if noise is not None:
    x = x + noise.astype(x.dtype)
  return x


# ProGAN / StyleGAN v1 (genforce): nearest upsampling, fused up-convs, AdaIN's
# instance norm, and the per-layer truncation shared by the StyleGANs.


def upsample_nearest(x, factor: int = 2):
  """Nearest-neighbour upsampling `[n, h, w, c] -> [n, h * factor, w * factor, c]`."""
  return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def fused_upsample_conv3x3(x, weight):
  """2x nearest upsampling and a 3x3 conv fused into a stride-2 transposed conv.

  genforce's (and the TF originals') `fused_scale`: the 3x3 kernel summed over
  its four one-pixel shifts gives a 4x4 kernel, applied as a transposed conv
  with stride 2 and padding 1: `[n, h, w, i] -> [n, 2h, 2w, o]`. `weight [3, 3,
  i, o]` is in correlation orientation, i.e. the transposed conv's kernel
  flipped spatially (the shift sum commutes with the flip).
  """
  w = jnp.pad(weight, ((1, 1), (1, 1), (0, 0), (0, 0)))
  w = w[1:, 1:] + w[:-1, 1:] + w[1:, :-1] + w[:-1, :-1]  # [4, 4, i, o]
  # Transposed conv = correlation of the zero-dilated input, padded k - 1 - 1.
  return jax.lax.conv_general_dilated(
      x, w.astype(x.dtype), (1, 1), ((2, 2), (2, 2)), lhs_dilation=(2, 2),
      dimension_numbers=_DIMS, precision=PRECISION)


def instance_norm(x, eps: float = 1e-8):
  """Per-sample, per-channel normalisation of `x [n, h, w, c]` over `h, w`."""
  x = x - jnp.mean(x, axis=(1, 2), keepdims=True)
  return x / jnp.sqrt(jnp.mean(jnp.square(x), axis=(1, 2), keepdims=True) + eps)


def check_ws(latents, num_ws: int, w_dim: int) -> None:
  """Raises a `ValueError` unless `latents` are W+ codes `[n, num_ws, w_dim]`."""
  if jnp.ndim(latents) != 3 or tuple(jnp.shape(latents)[1:]) != (num_ws, w_dim):
    raise ValueError(f"latents must be W+ codes [n, {num_ws}, {w_dim}], "
                     f"got shape {tuple(jnp.shape(latents))}")


def truncate(ws, w_avg, psi, cutoff: int | None = None):
  """`w_avg + psi * (w - w_avg)` on the first `cutoff` codes (all when None).

  Args:
    ws: `[n, num_ws, w_dim]`.
    w_avg: `[w_dim]`.
    psi: a scalar (may be traced).
    cutoff: static number of leading codes to truncate, in [0, num_ws].

  Returns:
    `[n, num_ws, w_dim]`.
  """
  num_ws = ws.shape[1]
  cutoff = num_ws if cutoff is None else cutoff
  if (isinstance(cutoff, bool) or not isinstance(cutoff, (int, np.integer))
      or not 0 <= cutoff <= num_ws):
    raise ValueError(f"truncation_cutoff must be None or an int in [0, {num_ws}], "
                     f"got {cutoff!r}")
  coefs = jnp.where(jnp.arange(num_ws) < cutoff, psi, 1.0)[None, :, None]
  return w_avg + (ws - w_avg) * coefs.astype(ws.dtype)
