"""Edits along directions of W, shared by GANSpace and SeFa.

A direction `v [w_dim]` moves the W+ codes `ws [n, num_ws, w_dim]` of the
layers `start .. stop-1`: `ws[:, l] + alpha * v` (GANSpace's layer-range edits;
SeFa edits the codes of the layers whose kernels it factorised).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np


class Directions(NamedTuple):
  """Unit directions in W with the spread of the codes along each."""

  directions: np.ndarray  # [k, w_dim], unit rows.
  scales: np.ndarray  # [k], standard deviation of `w . v_k` over W samples.


def check_codes(ws, name: str = "ws"):
  """`ws` as a float32 `[n, w_dim]` array (ValueError otherwise)."""
  ws = np.asarray(ws, np.float32)
  if ws.ndim != 2 or ws.shape[0] < 2:
    raise ValueError(f"{name} must be [n >= 2, w_dim] codes, got shape {ws.shape}")
  if not np.isfinite(ws).all():
    raise ValueError(f"{name} contains non-finite values")
  return ws


def projection_scales(ws, directions) -> np.ndarray:
  """`[k]`: the standard deviation of `ws [n, w_dim] @ directions[k]` over the samples."""
  ws = check_codes(ws)
  return np.std(ws.astype(np.float64) @ np.asarray(directions, np.float64).T, axis=0)


def shift(ws, direction, alpha, start: int, stop: int):
  """`ws [n, num_ws, w_dim]` with `alpha * direction` added to codes `start .. stop-1`."""
  ws = jnp.asarray(ws)
  if ws.ndim != 3:
    raise ValueError(f"ws must be W+ codes [n, num_ws, w_dim], got shape {tuple(ws.shape)}")
  num_ws = ws.shape[1]
  if not 0 <= start < stop <= num_ws:
    raise ValueError(f"layer range [{start}, {stop}) must lie in [0, num_ws={num_ws}]")
  direction = jnp.asarray(direction, ws.dtype)
  if direction.shape != ws.shape[2:]:
    raise ValueError(f"direction must be [w_dim={ws.shape[2]}], got shape {tuple(direction.shape)}")
  on = (jnp.arange(num_ws) >= start) & (jnp.arange(num_ws) < stop)  # [num_ws]
  return ws + alpha * on[None, :, None] * direction[None, None, :]


def layer_ranges(num_ws: int, width: int = 2) -> list[tuple[int, int]]:
  """All codes `(0, num_ws)`, then consecutive ranges of `width` codes (GANSpace's choice)."""
  if num_ws < 1 or width < 1:
    raise ValueError(f"need num_ws >= 1 and width >= 1, got {num_ws} and {width}")
  ranges = [(0, num_ws)]
  ranges += [
    (a, min(a + width, num_ws))
    for a in range(0, num_ws, width)
    if (a, min(a + width, num_ws)) != (0, num_ws)
  ]
  return ranges
