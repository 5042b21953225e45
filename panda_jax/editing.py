"""Editing the feature maps with the factors.

Local editing (paper Section 3.3.1), object removal with a "background" concept
(Section 5.1.1) and concept rewriting (Section 5.5, Eqs. 14-16). Pure functions
of feature arrays (`[n, h, w, c]` or `[n, s, c]`, returned in the same layout)
and factors; an edited image is `gen.resume(edited_features, carry, latents,
layer)` (see `panda_jax.generator_ops`).

Where an edit applies (`part`) is one of:

* an integer k: the global part `p_k`, a column of `parts`;
* a list/tuple of distinct integers: the union of those parts, `sum_k p_k`;
* an array mask `[s]`, `[H, W]` or `[n, H, W]` in [0, 1]: a user's region.

Parts (global `[s, r_s]`, or refined per sample `[n, s, r_s]`) are normalised
as in the official demo: the (summed) part is divided by its maximum over the
positions, per sample, so that its peak is 1 and, `P >= 0` with zeros outside
the part, its range is [0, 1] (the demo's min-max map). A part that is zero
everywhere gives no edit. Masks are not rescaled: they are the weights a user
asked for. A mask at image resolution `[H, W]` is area-averaged onto the
`(h, w)` feature grid: each feature cell takes the mean of the `H/h x W/w`
block of pixels it covers (`H`, `W` must be multiples of `h`, `w`; a mask at the
feature resolution is used as is). A binary mask equal to the support of a
binary part therefore gives exactly the part's edit.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from panda_jax import _checks
from panda_jax import interpret

_HIGHEST = jax.lax.Precision.HIGHEST


def downsample_mask(mask, grid):
  """Area average of `[H, W]` or `[n, H, W]` masks onto `grid=(h, w)`.

  Returns:
    `[s]` or `[n, s]` with `s = h * w`, row-major.
  """
  h, w = grid
  big_h, big_w = mask.shape[-2:]
  if big_h % h or big_w % w:
    raise ValueError(f"mask of size {(big_h, big_w)} does not cover the feature "
                     f"grid {(h, w)} with whole pixel blocks (the size must be a "
                     "multiple of the grid)")
  lead = tuple(mask.shape[:-2])
  blocks = jnp.reshape(mask, lead + (h, big_h // h, w, big_w // w))
  return jnp.reshape(jnp.mean(blocks, axis=(-3, -1)), lead + (h * w,))


def _check_parts(parts, n: int, s: int):
  if parts.ndim == 2 and parts.shape[0] == s:
    return
  if parts.ndim == 3 and parts.shape[:2] == (n, s):
    return
  raise ValueError(f"parts must be [s={s}, r_s] or refined [n={n}, s={s}, r_s], "
                   f"got shape {tuple(parts.shape)}")


def part_weights(part, parts, features):
  """The spatial weights of an edit: `[s]` or `[n, s]` (see the module doc)."""
  z, _ = _checks.flatten_features(features)
  n, s, _ = z.shape
  if isinstance(part, (int, np.integer, list, tuple)):
    _check_parts(parts, n, s)
    indices = [part] if isinstance(part, (int, np.integer)) else list(part)
    if not indices:
      raise ValueError("part: an empty list of parts")
    for k in indices:
      _checks.check_index(k, parts.shape[-1], "part")
    if len(set(int(k) for k in indices)) != len(indices):
      raise ValueError(f"part: repeated indices in {part!r}")
    summed = jnp.sum(parts[..., np.asarray(indices)], axis=-1)  # [(n,) s]
    peak = jnp.max(summed, axis=-1, keepdims=True)
    return jnp.where(peak > 0, summed / jnp.where(peak > 0, peak, 1), 0)
  if not hasattr(part, "shape"):
    raise ValueError("part must be an int, a list of ints, or an array mask, "
                     f"got {type(part).__name__}")
  mask = jnp.asarray(part).astype(z.dtype)
  if mask.ndim == 1:
    if mask.shape[0] != s:
      raise ValueError(f"mask must be [s={s}], got shape {tuple(mask.shape)}")
  elif mask.ndim in (2, 3):
    if mask.ndim == 3 and mask.shape[0] != n:
      raise ValueError(f"per-sample mask must be [n={n}, H, W], got shape "
                       f"{tuple(mask.shape)}")
    mask = downsample_mask(mask, interpret.feature_grid(features))
  else:
    raise ValueError(f"mask must be [s], [H, W] or [n, H, W], got shape "
                     f"{tuple(mask.shape)}")
  if _checks.is_concrete(part):
    _checks.check_finite(part, "mask")
    values = np.asarray(part)
    if values.min() < 0 or values.max() > 1:
      raise ValueError("mask values must lie in [0, 1]")
  return mask


def _alpha(alpha, n: int):
  """A scalar or `[n]` strength as `[n or 1, 1, 1]`."""
  _checks.check_finite(alpha, "alpha")
  alpha = jnp.asarray(alpha)
  if alpha.shape not in ((), (n,)):
    raise ValueError(f"alpha must be a scalar or [n={n}], got shape "
                     f"{tuple(alpha.shape)}")
  return jnp.reshape(alpha, (-1, 1, 1))


def _direction(weights, vector, alpha):
  """`alpha * vector weights^T` in our layout: `[n or 1, s, c]`."""
  s = weights.shape[-1]
  return alpha * jnp.reshape(weights, (-1, s, 1)) * jnp.reshape(vector, (1, 1, -1))


def edit_many(features, appearances, parts, edits: Sequence):
  """Several local edits at once: `Z_i + sum_t alpha_t a_(j_t) p^_(k_t)^T`.

  Args:
    features: `[n, h, w, c]` or `[n, s, c]`.
    appearances: A, `[c, r_c]`.
    parts: P, `[s, r_s]`, or refined per-sample parts `[n, s, r_s]`.
    edits: a sequence of `(part, appearance, alpha)` triples: `part` as in the
      module doc, `appearance` an integer column j of A, `alpha` a scalar or
      `[n]` strength.

  Returns:
    the edited features, in the layout of `features`.
  """
  z, unflatten = _checks.flatten_features(features)
  _checks.check_factors(z.shape, appearances)
  edits = list(edits)
  if not edits:
    raise ValueError("edits: give at least one (part, appearance, alpha) triple")
  n = z.shape[0]
  delta = 0
  for part, appearance, alpha in edits:
    _checks.check_index(appearance, appearances.shape[1], "appearance")
    delta = delta + _direction(part_weights(part, parts, features),
                               appearances[:, appearance], _alpha(alpha, n))
  return unflatten(z + delta.astype(z.dtype))


def edit(features, appearances, parts, part, appearance: int, alpha):
  """Local edit `Z_i + alpha a_j p^_k^T` (Sec. 3.3.1), p^_k normalised to [0, 1].

  Args:
    features: `[n, h, w, c]` or `[n, s, c]`.
    appearances: A, `[c, r_c]`.
    parts: P, `[s, r_s]`, or refined per-sample parts `[n, s, r_s]`.
    part: an index k, a list of indices (their union), or a `[s]`, `[H, W]`
      or `[n, H, W]` mask in [0, 1] (see the module doc).
    appearance: j, a column of A.
    alpha: the strength, a scalar or `[n]`.

  Returns:
    the edited features, in the layout of `features`.

  Example:
    >>> edited = pj.edit(z, factors.appearances, factors.parts, 3, 0, 30.0)
  """
  return edit_many(features, appearances, parts, [(part, appearance, alpha)])


def propose_background(features, appearances, *, mu=None, border: int = 1):
  """Proposes the "background" concept (Sec. 5.1.1): the one on the border.

  Scores each concept k by how much its localisation mask `[m_iks >= mu_k]`
  (Sec. 5.1.2) covers the border of the feature grid (the outermost `border`
  rows and columns) more than its interior: the fraction of border positions
  in the mask minus the fraction of interior positions, averaged over samples.

  Args:
    features: `[n, h, w, c]` (or `[n, s, c]` on a square grid).
    appearances: A, `[c, r_c]`.
    mu: the dataset concept means `[r_c]` (`interpret.concept_means`); by
      default the means over this batch.
    border: the width of the border, in feature cells.

  Returns:
    `(k, scores)`: the proposed column (an int32 scalar array, so it stays
    jittable) and the `[r_c]` scores.
  """
  h, w = interpret.feature_grid(features)
  if not (isinstance(border, (int, np.integer)) and 1 <= 2 * border < min(h, w)):
    raise ValueError(f"border must be an integer in [1, {(min(h, w) - 1) // 2}] "
                     f"for a {(h, w)} grid, got {border!r}")
  maps = interpret.saliency(features, appearances)  # [n, s, r_c]
  if mu is None:
    mu = jnp.mean(maps, axis=(0, 1))
  inside = interpret.localise(maps, jnp.asarray(mu)).astype(jnp.float32)
  ring = np.ones((h, w), bool)
  ring[border:h - border, border:w - border] = False
  n_ring = int(ring.sum())
  ring = jnp.asarray(ring.reshape(1, h * w, 1))
  on_border = jnp.sum(jnp.where(ring, inside, 0), axis=1) / n_ring
  off_border = jnp.sum(jnp.where(ring, 0, inside), axis=1) / (h * w - n_ring)
  scores = jnp.mean(on_border - off_border, axis=0)  # [r_c]
  return jnp.argmax(scores).astype(jnp.int32), scores


def remove_object(features, appearances, parts, part, alpha, *,
                  background=None, mu=None, border: int = 1):
  """Object removal (Sec. 5.1.1): adds the background concept at `part`.

  `Z_i + alpha a_b p^^T` with b = `background`, or, when None, the concept
  proposed by `propose_background(features, appearances, mu=mu,
  border=border)`. `part` and `alpha` are as in `edit`.

  Returns:
    `(edited features, b)`.
  """
  z, unflatten = _checks.flatten_features(features)
  _checks.check_factors(z.shape, appearances)
  if background is None:
    background, _ = propose_background(features, appearances, mu=mu,
                                       border=border)
  else:
    _checks.check_index(background, appearances.shape[1], "background")
  vector = jnp.take(appearances, background, axis=1)  # [c]
  delta = _direction(part_weights(part, parts, features), vector,
                     _alpha(alpha, z.shape[0]))
  return unflatten(z + delta.astype(z.dtype)), background


def rewrite(features, appearances, source: int, target: int, alpha):
  """Concept rewriting (Sec. 5.5): moves concept j's positive mass onto k.

  With the coefficients `Z^_i = A^T Z_i` (rows = concepts), Eqs. (14)-(16):
  `Z^_i(k,:) += alpha [Z^_i(j,:)]_+` and `Z^_i(j,:) := [Z^_i(j,:)]_-`, and the
  features are reconstructed as `Z_i + A (Z^'_i - Z^_i)`, i.e.
  `Z_i + a_k alpha [Z^_i(j,:)]_+ - a_j [Z^_i(j,:)]_+`. With the full
  orthogonal basis of the paper (`r_c = c`, `A A^T = I`) this is exactly the
  paper's `A Z^'_i`; with `r_c < c` it also keeps the part of `Z_i` outside
  the span of A, which `A Z^'_i` would drop.

  Args:
    features: `[n, h, w, c]` or `[n, s, c]`.
    appearances: A, `[c, r_c]`.
    source: j, the concept to replace.
    target: k, the concept written in its place (k != j).
    alpha: the strength, a scalar or `[n]`.

  Returns:
    the rewritten features, in the layout of `features`.
  """
  z, unflatten = _checks.flatten_features(features)
  _checks.check_factors(z.shape, appearances)
  r_c = appearances.shape[1]
  _checks.check_index(source, r_c, "source")
  _checks.check_index(target, r_c, "target")
  if source == target:
    raise ValueError(f"source and target must differ, got {source} twice")
  a_j, a_k = appearances[:, source], appearances[:, target]
  positive = jnp.maximum(
      jnp.einsum("nsc,c->ns", z, a_j, precision=_HIGHEST), 0)  # [n, s] Eq. 14
  alpha = _alpha(alpha, z.shape[0])
  delta = (alpha * jnp.reshape(positive, positive.shape + (1,))
           * jnp.reshape(a_k, (1, 1, -1))
           - jnp.reshape(positive, positive.shape + (1,))
           * jnp.reshape(a_j, (1, 1, -1)))  # [n, s, c] Eqs. 15-16
  return unflatten(z + delta.astype(z.dtype))
