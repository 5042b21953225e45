"""SeFa (Shen & Zhou, CVPR 2021): closed-form directions from the style kernels.

A StyleGAN2 layer turns its code into styles `s = w K + b` (`K [w_dim, c_in]`,
the layer's affine / modulation kernel). Moving `w` along a unit `v` changes the
styles by `||v K||`; SeFa's directions maximise `sum_l ||v K_l'||^2` over the
layers' column-normalised kernels `K_l'`, i.e. they are the top eigenvectors
of `K' K'^T` with `K' = [K_1', K_2', ...]` `[w_dim, sum_l c_l]`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from panda_jax.baselines import latent


def style_kernels(params, codes: Sequence[int]) -> list[np.ndarray]:
  """The affine kernels `[w_dim, c_in]` of the modulated convs that read W+ codes `codes`.

  In our StyleGAN2 layout the conv `convs_i` reads code i (`ws[:, i]`); the last
  code feeds only the final ToRGB and has no conv.
  """
  convs = params["synthesis"]
  kernels = []
  for i in codes:
    name = f"convs_{i}"
    if name not in convs:
      raise ValueError(
        f"W+ code {i} feeds no modulated conv (convs_0 .. convs_"
        f"{sum(k.startswith('convs_') for k in convs) - 1})"
      )
    kernels.append(np.asarray(convs[name]["affine"]["kernel"], np.float32))
  return kernels


def fit(kernels: Sequence, num_components: int, ws=None) -> latent.Directions:
  """SeFa's top eigenvectors of `K' K'^T`.

  Args:
    kernels: the style kernels `[w_dim, c_l]` of the chosen layers.
    num_components: k, `1 <= k <= w_dim`.
    ws: optional W codes `[n, w_dim]`; the scales are the spread of the codes
      along each direction (else 1).

  Returns:
    `Directions(directions [k, w_dim], scales [k])`, rows by decreasing
    eigenvalue, sign fixed so each row's largest-magnitude entry is positive.
  """
  kernels = [np.asarray(k, np.float64) for k in kernels]
  if not kernels or any(k.ndim != 2 or k.shape[0] != kernels[0].shape[0] for k in kernels):
    raise ValueError("kernels must be a non-empty list of [w_dim, c_l] matrices with one w_dim")
  stacked = np.concatenate(kernels, axis=1)  # [w_dim, sum c_l]
  norms = np.linalg.norm(stacked, axis=0, keepdims=True)
  if not (np.isfinite(stacked).all() and (norms > 0).all()):
    raise ValueError("kernels must be finite with no all-zero column")
  w_dim = stacked.shape[0]
  if not 1 <= num_components <= w_dim:
    raise ValueError(f"num_components must be in [1, w_dim = {w_dim}], got {num_components}")
  stacked = stacked / norms
  values, vectors = np.linalg.eigh(stacked @ stacked.T)  # ascending
  v = vectors[:, ::-1][:, :num_components].T  # [k, w_dim]
  v = v * np.sign(v[np.arange(num_components), np.argmax(np.abs(v), axis=1)])[:, None]
  scales = np.ones(num_components) if ws is None else latent.projection_scales(ws, v)
  return latent.Directions(v.astype(np.float32), np.asarray(scales, np.float32))


def first_layer_kernel(params) -> np.ndarray:
  """A DCGAN's first ConvTranspose2d as the matrix of its linear map from z: `[z_dim, k*k*c]`.

  On the `1 x 1` input z the first block's transposed convolution (stride 1,
  padding 0) writes `z_i K[y, x, i, o]` at output `(y, x, o)` (with the kernel
  flipped, a permutation of the columns, which changes neither `K K^T` nor the
  column norms). So the rows of the `[z_dim, 4*4*c]` reshape of the kernel
  (`params["blocks_0"]["conv"]["kernel"]`, `[k, k, z_dim, c]`, of the generator's
  `params` or of its whole variables tree `{"params", "batch_stats"}`,
  `panda_jax.generators.dcgan`) play the role of SeFa's style kernels: `fit`
  of it gives the directions in z that move the first layer's output most
  (SeFa's choice for PGGAN, whose first layer is also dense from z).
  """
  if isinstance(params, dict) and "params" in params:  # the whole variables tree
    params = params["params"]
  try:
    kernel = np.asarray(params["blocks_0"]["conv"]["kernel"], np.float32)
  except (KeyError, TypeError):
    raise ValueError("params have no blocks_0/conv/kernel: not a DCGAN generator") from None
  if kernel.ndim != 4:
    raise ValueError(f"the first kernel must be [k, k, z_dim, c], got shape {kernel.shape}")
  return np.transpose(kernel, (2, 0, 1, 3)).reshape(kernel.shape[2], -1)
