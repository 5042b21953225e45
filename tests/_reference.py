"""Float64 NumPy transcriptions of genforce's ops (NCHW, torch weight layouts) and
the tolerance policy of the fixture tests, shared by the ProGAN and StyleGAN tests.

Tolerance policy (tests/fixtures/README.md): max |ours - reference| <= 1e-4 x
max |reference| per array.
"""

import numpy as np

REL_TOL = 1e-4


def assert_close(actual, expected, rel=REL_TOL):
  """`actual` NHWC (or any layout equal to `expected`'s), `expected` NCHW if 4-D."""
  expected = np.asarray(expected, np.float64)
  if expected.ndim == 4:
    expected = np.transpose(expected, (0, 2, 3, 1))
  actual = np.asarray(actual, np.float64)
  assert actual.shape == expected.shape
  err, scale = np.abs(actual - expected).max(), np.abs(expected).max()
  assert err <= rel * scale, f"max abs error {err:.3g} > {rel} x {scale:.3g}"


def np_pixel_norm(x):
  return x / np.sqrt(np.mean(x**2, axis=1, keepdims=True) + 1e-8)


def np_lrelu(x):
  return np.where(x >= 0, x, 0.2 * x)


def np_upsample(x):
  return x.repeat(2, axis=2).repeat(2, axis=3)


def np_conv(x, w, pad):
  """torch `conv2d`: `x [n, i, h, w]`, `w [o, i, k, k]`, zero padding `pad`."""
  k = w.shape[-1]
  xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  h, wd = xp.shape[2] - k + 1, xp.shape[3] - k + 1
  return sum(
    np.einsum("nihw,oi->nohw", xp[:, :, a : a + h, b : b + wd], w[:, :, a, b])
    for a in range(k)
    for b in range(k)
  )


def np_fused_upconv(x, w):
  """genforce's fused up-conv: `w [i, o, 3, 3]` padded and summed over its four
  shifts to 4x4, then torch `conv_transpose2d(stride=2, padding=1)` by scatter."""
  w = np.pad(w, ((0, 0), (0, 0), (1, 1), (1, 1)))
  w = w[:, :, 1:, 1:] + w[:, :, :-1, 1:] + w[:, :, 1:, :-1] + w[:, :, :-1, :-1]
  n, _, h, wd = x.shape
  out = np.zeros((n, w.shape[1], 2 * h + 2, 2 * wd + 2))
  for a in range(4):
    for b in range(4):
      out[:, :, a : a + 2 * h : 2, b : b + 2 * wd : 2] += np.einsum(
        "nihw,io->nohw", x, w[:, :, a, b]
      )
  return out[:, :, 1 : 1 + 2 * h, 1 : 1 + 2 * wd]


def assert_fixture_outputs(gen, io, latents):
  """Every `features_l`, the `image` and the `edit_image` of a fixture's `io.npz`
  (NCHW) from `latents`, under the tolerance policy above."""
  for layer in gen.layers:
    assert_close(gen.split(latents, layer)[0], io[f"features_{layer}"])
  assert_close(gen.generate(latents), io["image"])
  layer = int(io["edit_layer"])
  x, carry = gen.split(latents, layer)
  delta = np.transpose(io["edit_delta"], (0, 2, 3, 1))
  assert_close(gen.resume(x + delta, carry, latents, layer), io["edit_image"])


def np_upfirdn2d(x, f, up=1, down=1, padding=(0, 0, 0, 0), gain=1.0):
  """`_upfirdn2d_ref`: zero insertion, pad/crop, flipped FIR (1-D: both axes), decimate."""
  n, c, h, w = x.shape
  u = np.zeros((n, c, h * up, w * up))
  u[:, :, ::up, ::up] = x
  px0, px1, py0, py1 = padding
  u = np.pad(u, ((0, 0), (0, 0), (max(py0, 0), max(py1, 0)), (max(px0, 0), max(px1, 0))))
  u = u[:, :, max(-py0, 0) : u.shape[2] - max(-py1, 0), max(-px0, 0) : u.shape[3] - max(-px1, 0)]
  f = np.ones((1, 1)) if f is None else np.asarray(f, np.float64)
  if f.ndim == 1:  # Separable: along w, then along h, gain ** 0.5 each.
    u = np_fir(u, f[None, :] * gain**0.5, (1, down))
    return np_fir(u, f[:, None] * gain**0.5, (down, 1))
  return np_fir(u, f * gain, (down, down))


def np_fir(u, f, strides):
  """Valid convolution of u [n, c, h, w] with f [t_h, t_w] (flipped), strided."""
  f = f[::-1, ::-1]
  out_h, out_w = u.shape[2] - f.shape[0] + 1, u.shape[3] - f.shape[1] + 1
  out = 0
  for a in range(f.shape[0]):
    for b in range(f.shape[1]):
      out = out + u[:, :, a : a + out_h : strides[0], b : b + out_w : strides[1]] * f[a, b]
  return out
