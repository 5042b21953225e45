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

import functools
import operator
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


def bias_act(
  x, bias=None, act: str = "linear", gain: float | None = None, clamp: float | None = None
):
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


def _pad_axis(x, axis: int, lo: int, hi: int):
  """`x` zero-padded along `axis` by `lo` and `hi` (negative values crop)."""
  config = [(0, 0, 0)] * x.ndim
  config[axis] = (lo, hi, 0)
  return jax.lax.pad(x, jnp.zeros((), x.dtype), config)


def upfirdn_axis(x, f, axis: int, up: int, down: int, pad0: int, pad1: int):
  """`upfirdn2d` along one axis with a 1-D filter `f [t]` (static or traced), in polyphase form.

  out[o] = sum_i x[i] flip(f)[i * up + pad0 - o * down]: each output sees at most
  ceil(t / up) inputs, one tap at a time (no zero-inserted signal and no
  decimated outputs are ever computed). With `up == 1` tap j is a strided slice
  of the padded input; with `down == 1` output phase p (o = up m + p) is a
  correlation with the taps `flip(f)[r::up]`, r = (pad0 - p) mod up, each a
  slice, and the phases are interleaved. Slices instead of gathers: 1.0-1.5x
  faster on XLA:CPU (StyleGAN3's filtered leaky ReLU), the same sums in the same
  order. Output length along `axis`: `(length * up + pad0 + pad1 - t) // down + 1`.
  """
  length, taps = x.shape[axis], f.shape[0]
  n_out = (length * up + pad0 + pad1 - taps) // down + 1
  flipped = jnp.flip(jnp.asarray(f, x.dtype))
  if up == 1:  # out[o] = sum_j padded[o * down + j] flipped[j].
    x = _pad_axis(x, axis, pad0, pad1)
    terms = [
      jax.lax.slice_in_dim(x, j, j + down * (n_out - 1) + 1, stride=down, axis=axis) * flipped[j]
      for j in range(taps)
    ]
    return functools.reduce(operator.add, terms)
  if down == 1:  # Phase p, output m: sum_s x[m - q_p + s] flipped[r_p + up s].
    per_phase = -(-n_out // up)
    shifts = [(pad0 - p) // up for p in range(up)]  # q_p
    lo = max(max(shifts), 0)
    x = _pad_axis(
      x, axis, lo, max(per_phase + taps // up + 1 - length, 0) + 1 + max(-min(shifts), 0)
    )
    phases = []
    for p, q in enumerate(shifts):
      terms = [
        jax.lax.slice_in_dim(x, lo - q + s, lo - q + s + per_phase, axis=axis) * flipped[j]
        for s, j in enumerate(range((pad0 - p) % up, taps, up))
      ]
      phases.append(
        functools.reduce(operator.add, terms)
        if terms
        else jnp.zeros_like(jax.lax.slice_in_dim(x, 0, per_phase, axis=axis))
      )
    shape = list(x.shape)
    shape[axis] = per_phase * up
    y = jnp.stack(phases, axis=axis + 1).reshape(shape)  # Interleaved.
    return jax.lax.slice_in_dim(y, 0, n_out, axis=axis)
  out = np.arange(n_out)  # Both factors: gather the inputs of each tap.
  first = -((pad0 - out * down) // up)  # ceil((o * down - pad0) / up)
  shape = [1] * x.ndim
  shape[axis] = out.size
  y = jnp.zeros(x.shape[:axis] + (out.size,) + x.shape[axis + 1 :], x.dtype)
  for k in range(-(-taps // up)):
    i = first + k
    tap = i * up + pad0 - out * down
    valid = (tap < taps) & (i >= 0) & (i < length)
    weight = jnp.where(valid, flipped[np.clip(tap, 0, taps - 1)], 0)  # [out]
    y = y + jnp.take(x, np.clip(i, 0, length - 1), axis=axis) * weight.reshape(shape)
  return y


def separable_taps(f) -> tuple[np.ndarray, np.ndarray] | None:
  """`(taps_h, taps_w)` with `f = outer(taps_h, taps_w)` for a static 2-D filter, else None."""
  if not isinstance(f, np.ndarray) or f.ndim != 2 or f.sum() == 0:
    return None
  taps_h, taps_w = f.sum(axis=1), f.sum(axis=0) / f.sum()
  if not np.allclose(np.outer(taps_h, taps_w), f, rtol=0, atol=1e-7 * np.abs(f).max()):
    return None
  return taps_h.astype(np.float32), taps_w.astype(np.float32)


def upfirdn2d(
  x,
  f: np.ndarray,
  up: int = 1,
  down: int = 1,
  padding: Sequence[int] = (0, 0, 0, 0),
  gain: float = 1.0,
):
  """Upsample (zero insertion), pad, convolve with `f [fh, fw]`, downsample.

  A separable filter (all of NVIDIA's, `setup_filter` of 1-D taps) runs as two
  1-D polyphase passes (`upfirdn_axis`, along w then h as NVIDIA's reference):
  XLA's CPU depthwise convolution over the zero-inserted signal was 25-75x
  slower (WORKSPACE.md, "Generator speed"). Other filters run as a depthwise
  convolution.

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
  taps = separable_taps(np.asarray(f, np.float32))
  if taps is not None:
    taps_h, taps_w = taps
    x = upfirdn_axis(x, taps_w, 2, up, down, x0, x1)
    return upfirdn_axis(x, taps_h * np.float32(gain), 1, up, down, y0, y1)
  c = x.shape[-1]
  kernel = np.asarray(f, np.float32)[::-1, ::-1] * gain  # Correlation kernel.
  kernel = jnp.tile(jnp.asarray(kernel)[:, :, None, None], (1, 1, 1, c))  # [fh, fw, 1, c]
  # lhs_dilation inserts up-1 zeros between samples; NVIDIA also appends up-1.
  return jax.lax.conv_general_dilated(
    x,
    kernel.astype(x.dtype),
    window_strides=(down, down),
    padding=((y0, y1 + up - 1), (x0, x1 + up - 1)),
    lhs_dilation=(up, up),
    dimension_numbers=_DIMS,
    feature_group_count=c,
    precision=PRECISION,
  )


def upsample2d(x, f: np.ndarray, up: int = 2):
  """2x (by default) upsampling with filter `f`, as NVIDIA's `upsample2d`: `[n, h*up, w*up, c]`."""
  fh, fw = f.shape
  padding = ((fw + up - 1) // 2, (fw - up) // 2, (fh + up - 1) // 2, (fh - up) // 2)
  return upfirdn2d(x, f, up=up, padding=padding, gain=up * up)


def conv2d(x, weight, padding: int):
  """Plain correlation (`torch.nn.functional.conv2d`); `weight [kh, kw, i, o]`."""
  return jax.lax.conv_general_dilated(
    x,
    weight.astype(x.dtype),
    (1, 1),
    ((padding, padding), (padding, padding)),
    dimension_numbers=_DIMS,
    precision=PRECISION,
  )


def _phase(length: int, taps: int, lo: int, out_len: int, p: int, up: int):
  """One output phase `p` of `upsampling_correlation` along one axis.

  Output `o = up * m + p` sees the taps `k = k0 + up * t` with `k0 = (lo - p) mod up`
  and the inputs `m + t + d`, `d = (p + k0 - lo) / up` (an integer). Returns the
  tap slice, their number, the phase's output count and the input padding that
  makes it a VALID correlation.
  """
  k0 = (lo - p) % up
  num_taps = len(range(k0, taps, up))
  count = max(-(-(out_len - p) // up), 0)
  pad_lo = -((p + k0 - lo) // up)
  return slice(k0, None, up), num_taps, count, (pad_lo, count - 1 + num_taps - length - pad_lo)


def upsampling_correlation(x, kernel, up: int, padding):
  """The correlation of `x` zero-inserted by `up` with `kernel`, without the zeros.

  Equals `lax.conv_general_dilated(x, kernel, (1, 1), padding, lhs_dilation=(up,
  up))` (a transposed convolution with the kernel flipped), computed in sub-pixel
  form: output phase `(p_h, p_w)` only meets every `up`-th kernel tap, so the
  result is `up**2` plain correlations of `x` with sub-kernels, interleaved.
  `up**2` times fewer products than correlating the inserted zeros (at 128 -> 256
  px, 64 channels, batch 8 on XLA:CPU: 425 ms -> about 60 ms).

  Args:
    x: `[n, h, w, i]`.
    kernel: `[kh, kw, i, o]` (correlation orientation).
    up: the dilation (stride of the transposed convolution).
    padding: `((lo_h, hi_h), (lo_w, hi_w))` of the dilated input, >= 0.

  Returns:
    `[n, (h - 1) up + 1 + lo_h + hi_h - kh + 1, (same for w), o]`.
  """
  n, h, w, _ = x.shape
  kh, kw, _, out_ch = kernel.shape
  (lo_h, hi_h), (lo_w, hi_w) = padding
  out_h, out_w = (h - 1) * up + 2 + lo_h + hi_h - kh, (w - 1) * up + 2 + lo_w + hi_w - kw
  rows_per_phase, cols_per_phase = -(-out_h // up), -(-out_w // up)
  phases = []
  for p_h in range(up):
    row = []
    for p_w in range(up):
      taps_h, num_h, count_h, pad_h = _phase(h, kh, lo_h, out_h, p_h, up)
      taps_w, num_w, count_w, pad_w = _phase(w, kw, lo_w, out_w, p_w, up)
      if num_h and num_w and count_h and count_w:
        xp = jax.lax.pad(
          x, jnp.zeros((), x.dtype), [(0, 0, 0), pad_h + (0,), pad_w + (0,), (0, 0, 0)]
        )
        y = jax.lax.conv_general_dilated(
          xp,
          kernel[taps_h, taps_w].astype(x.dtype),
          (1, 1),
          "VALID",
          dimension_numbers=_DIMS,
          precision=PRECISION,
        )
      else:  # No tap reaches this phase.
        y = jnp.zeros((n, count_h, count_w, out_ch), x.dtype)
      row.append(
        jnp.pad(y, ((0, 0), (0, rows_per_phase - count_h), (0, cols_per_phase - count_w), (0, 0)))
      )
    phases.append(jnp.stack(row, axis=3))  # [n, rows, cols, up, o]
  y = jnp.stack(phases, axis=2)  # [n, rows, up, cols, up, o]
  y = y.reshape(n, rows_per_phase * up, cols_per_phase * up, out_ch)
  return y[:, :out_h, :out_w]


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
  x = upsampling_correlation(
    x, weight[::-1, ::-1], up, ((kh - 1 - pyt, kh - 1 - pyt), (kw - 1 - pxt, kw - 1 - pxt))
  )
  return upfirdn2d(x, f, padding=(px0 + pxt, px1 + pxt, py0 + pyt, py1 + pyt), gain=up * up)


def modulated_conv2d(
  x,
  weight,
  styles,
  *,
  demodulate: bool = True,
  up: int = 1,
  f: np.ndarray | None = None,
  noise=None,
):
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
  if weight.shape[:2] == (1, 1) and up == 1:
    # A 1x1 conv (ToRGB): the styles folded into a per-sample [i, o] weight, one
    # batched matmul instead of scaling the input then convolving (167 -> 9 ms at
    # 8 x 256 x 256 x 64 -> 3 on XLA:CPU).
    x = einsum("nhwi,nio->nhwo", x, styles[:, :, None].astype(x.dtype) * weight[0, 0][None])
  else:
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
  return upsampling_correlation(x, w, 2, ((2, 2), (2, 2)))


def instance_norm(x, eps: float = 1e-8):
  """Per-sample, per-channel normalisation of `x [n, h, w, c]` over `h, w`."""
  x = x - jnp.mean(x, axis=(1, 2), keepdims=True)
  return x / jnp.sqrt(jnp.mean(jnp.square(x), axis=(1, 2), keepdims=True) + eps)


def check_ws(latents, num_ws: int, w_dim: int) -> None:
  """Raises a `ValueError` unless `latents` are W+ codes `[n, num_ws, w_dim]`."""
  if jnp.ndim(latents) != 3 or tuple(jnp.shape(latents)[1:]) != (num_ws, w_dim):
    raise ValueError(
      f"latents must be W+ codes [n, {num_ws}, {w_dim}], got shape {tuple(jnp.shape(latents))}"
    )


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
  if (
    isinstance(cutoff, bool)
    or not isinstance(cutoff, (int, np.integer))
    or not 0 <= cutoff <= num_ws
  ):
    raise ValueError(f"truncation_cutoff must be None or an int in [0, {num_ws}], got {cutoff!r}")
  coefs = jnp.where(jnp.arange(num_ws) < cutoff, psi, 1.0)[None, :, None]
  return w_avg + (ws - w_avg) * coefs.astype(ws.dtype)
