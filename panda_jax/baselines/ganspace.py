"""GANSpace (Harkonen et al., NeurIPS 2020): principal directions of W.

The codes `w = mapping(z)` of many samples are centred and their principal
axes (right singular vectors of the centred data) are the edit directions,
ordered by explained variance; an edit adds `alpha * sigma_k * v_k` to the W+
codes of a layer range (`latent.shift`).
"""

from __future__ import annotations

import numpy as np

from panda_jax.baselines import latent


def fit(ws, num_components: int) -> latent.Directions:
  """The top principal directions of `ws [n, w_dim]`.

  Args:
    ws: W codes of `n >= 2` samples.
    num_components: k, `1 <= k <= min(n, w_dim)`.

  Returns:
    `Directions(directions [k, w_dim], scales [k])`: unit principal axes
    (sign fixed so that each row's largest-magnitude entry is positive) and
    the standard deviation of the codes along each (sqrt of the PCA
    eigenvalues, population normalisation).
  """
  ws = latent.check_codes(ws).astype(np.float64)
  n, w_dim = ws.shape
  if not 1 <= num_components <= min(n, w_dim):
    raise ValueError(
      f"num_components must be in [1, min(n, w_dim) = {min(n, w_dim)}], got {num_components}"
    )
  centred = ws - ws.mean(axis=0)
  _, sv, vt = np.linalg.svd(centred, full_matrices=False)
  v = vt[:num_components]
  v = v * np.sign(v[np.arange(num_components), np.argmax(np.abs(v), axis=1)])[:, None]
  return latent.Directions(
    v.astype(np.float32), (sv[:num_components] / np.sqrt(n)).astype(np.float32)
  )
