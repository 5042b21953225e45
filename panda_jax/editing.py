"""Editing the feature maps with the factors.

Local editing (paper Section 3.3.1), object removal with a "background" concept
(Section 5.1.1) and concept rewriting (Section 5.5, Eqs. 14-16). Pure functions
of feature arrays (`[n, h, w, c]` or `[n, s, c]`, returned in the same layout)
and factors; an edited image is `gen.resume(edited_features, carry, latents,
layer)` (see `panda_jax.generator_ops`).

Where an edit applies (`part`) is one of:

* a part index k: the global part `p_k`, a column of `parts` (a Python int or
  an integer scalar array, which may be traced: `jax.vmap` over parts);
* several indices (a list/tuple of ints or a 1-d integer array): the union of
  those parts, `sum_k p_k`;
* a float or bool array mask `[s]`, `[H, W]` or `[n, H, W]` in [0, 1]: a user's
  region. (Integer arrays are indices, never masks.)

Parts (global `[s, r_s]`, or refined per sample `[n, s, r_s]`) are normalised
to `p^ in [0, 1]` before the edit, per sample for refined parts:

* `normalise="minmax"` (default), as the official code's `mapRange`:
  `p^ = (p - min_s p) / (max_s p - min_s p)`; a part that is constant over the
  positions (zero range) gives no edit.
* `normalise="max"`: `p^ = p / max_s p` (this package's first form; a part that
  is zero everywhere gives no edit). The two agree when the part (or union) is
  zero somewhere, which global parts usually are; they differ for a part with
  no zeros (a union covering the image, many refined parts).

Masks are not rescaled: they are the weights a user asked for. A mask at image
resolution `[H, W]` is area-averaged onto the `(h, w)` feature grid: each
feature cell takes the mean of the `H/h x W/w` block of pixels it covers (`H`,
`W` must be multiples of `h`, `w`; a mask at the feature resolution is used as
is). A binary mask equal to the support of a binary part therefore gives
exactly the part's edit.

Indices (parts, appearances, the background, rewrite's source and target) are
checked when concrete; a traced index out of range gives NaN features
(`interpret.take_index`). So a batch of edits can be one `vmap`:

    jax.vmap(lambda k, j, alpha: edit(z, A, P, k, j, alpha))(ks, js, alphas)

gives `[t, n, h, w, c]`, one edit of every sample per `(k, j, alpha)` triple.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from panda_jax import checks
from panda_jax import interpret

_HIGHEST = jax.lax.Precision.HIGHEST


def downsample_mask(mask: jax.typing.ArrayLike, grid: tuple[int, int]) -> jax.Array:
  """Area average of `[H, W]` or `[n, H, W]` masks onto `grid=(h, w)`.

  Returns:
    `[s]` or `[n, s]` with `s = h * w`, row-major.
  """
  h, w = grid
  big_h, big_w = mask.shape[-2:]
  if big_h % h or big_w % w:
    raise ValueError(
      f"mask of size {(big_h, big_w)} does not cover the feature "
      f"grid {(h, w)} with whole pixel blocks (the size must be a "
      "multiple of the grid)"
    )
  lead = tuple(mask.shape[:-2])
  blocks = jnp.reshape(mask, lead + (h, big_h // h, w, big_w // w))
  return jnp.reshape(jnp.mean(blocks, axis=(-3, -1)), lead + (h * w,))


NORMALISATIONS = ("minmax", "max")


def _check_parts(parts: jax.typing.ArrayLike, n: int, s: int) -> None:
  if parts.ndim == 2 and parts.shape[0] == s:
    return
  if parts.ndim == 3 and parts.shape[:2] == (n, s):
    return
  raise ValueError(
    f"parts must be [s={s}, r_s] or refined [n={n}, s={s}, r_s], got shape {tuple(parts.shape)}"
  )


def _part_indices(part: jax.typing.ArrayLike | Sequence[jax.typing.ArrayLike]) -> jax.Array | None:
  """The part indices of `part`: int32 `[]` (one part) or `[t]` (a union); None for a mask."""
  if isinstance(part, (list, tuple)):
    if not part:
      raise ValueError("part: an empty list of parts")
    for k in part:
      if not (
        isinstance(k, (int, np.integer))
        and not isinstance(k, bool)
        or jnp.issubdtype(getattr(k, "dtype", np.float32), jnp.integer)
        and jnp.ndim(k) == 0
      ):
        raise ValueError(f"part: a list of parts must hold integers, got {part!r}")
    return jnp.stack([jnp.asarray(k, jnp.int32) for k in part])
  if isinstance(part, (bool, np.bool_)):
    raise ValueError(f"part must be an index, a list of indices or a mask, got {part!r}")
  if isinstance(part, (int, np.integer)):
    return jnp.asarray(part, jnp.int32)
  if not hasattr(part, "shape"):
    raise ValueError(
      f"part must be an int, a list of ints, or an array mask, got {type(part).__name__}"
    )
  if not jnp.issubdtype(part.dtype, jnp.integer):
    return None
  if part.ndim > 1:
    raise ValueError(
      f"an integer array part holds part indices (0-d or 1-d), got shape "
      f"{tuple(part.shape)}; pass a mask as a float or bool array"
    )
  return part.astype(jnp.int32)


def normalise_part(summed: jax.Array, normalise: str = "minmax") -> jax.Array:
  """Maps a part `[(n,) s]` (`P >= 0`) into [0, 1] per sample (see the module doc).

  Args:
    summed: a part or a union of parts, `[s]` or `[n, s]`.
    normalise: "minmax" (the official code's `mapRange`) or "max".

  Returns:
    `p^`, the shape of `summed`; zero where the part has no range.
  """
  if normalise not in NORMALISATIONS:
    raise ValueError(f"normalise must be one of {NORMALISATIONS}, got {normalise!r}")
  low = jnp.min(summed, axis=-1, keepdims=True) if normalise == "minmax" else 0
  span = jnp.max(summed, axis=-1, keepdims=True) - low
  # `span == 0`, not `span <= 0`: the NaN of an out-of-range traced index must reach the edit.
  return jnp.where(span == 0, 0, (summed - low) / jnp.where(span == 0, 1, span))


def part_weights(
  part: jax.typing.ArrayLike | Sequence[jax.typing.ArrayLike],
  parts: jax.typing.ArrayLike,
  features: jax.typing.ArrayLike,
  normalise: str = "minmax",
) -> jax.Array:
  """The spatial weights of an edit: `[s]` or `[n, s]` (see the module doc).

  Args:
    part: indices or a mask (module doc); parts: `[s, r_s]` or `[n, s, r_s]`;
    features: `[n, h, w, c]` or `[n, s, c]` (their shape only).
    normalise: how parts are mapped into [0, 1] ("minmax" or "max").
  """
  z, _ = checks.flatten_features(features)
  n, s, _ = z.shape
  indices = _part_indices(part)
  if indices is not None:
    _check_parts(parts, n, s)
    if checks.is_concrete(indices) and indices.ndim == 1:
      values = np.asarray(indices).tolist()
      if len(set(values)) != len(values):
        raise ValueError(f"part: repeated indices in {values!r}")
    chosen = interpret.take_index(parts, indices, "part")  # [(n,) s] or [(n,) s, t]
    summed = chosen if indices.ndim == 0 else jnp.sum(chosen, axis=-1)  # [(n,) s]
    return normalise_part(summed, normalise)
  mask = jnp.asarray(part).astype(z.dtype)
  if mask.ndim == 1:
    if mask.shape[0] != s:
      raise ValueError(f"mask must be [s={s}], got shape {tuple(mask.shape)}")
  elif mask.ndim in (2, 3):
    if mask.ndim == 3 and mask.shape[0] != n:
      raise ValueError(f"per-sample mask must be [n={n}, H, W], got shape {tuple(mask.shape)}")
    mask = downsample_mask(mask, interpret.feature_grid(features))
  else:
    raise ValueError(f"mask must be [s], [H, W] or [n, H, W], got shape {tuple(mask.shape)}")
  if checks.is_concrete(part):
    checks.check_finite(part, "mask")
    values = np.asarray(part)
    if values.min() < 0 or values.max() > 1:
      raise ValueError("mask values must lie in [0, 1]")
  return mask


def _vector(appearances: jax.typing.ArrayLike, index: jax.typing.ArrayLike, name: str) -> jax.Array:
  """One column of A, `[c]`, for an index that may be traced."""
  vector = interpret.take_index(appearances, index, name)
  if vector.ndim != 1:
    raise ValueError(f"{name} must be one index, got shape {tuple(jnp.shape(index))}")
  return vector


def _alpha(alpha: jax.typing.ArrayLike, n: int) -> jax.Array:
  """A scalar or `[n]` strength as `[n or 1, 1, 1]`."""
  checks.check_finite(alpha, "alpha")
  alpha = jnp.asarray(alpha)
  if alpha.shape not in ((), (n,)):
    raise ValueError(f"alpha must be a scalar or [n={n}], got shape {tuple(alpha.shape)}")
  return jnp.reshape(alpha, (-1, 1, 1))


def _direction(weights: jax.Array, vector: jax.Array, alpha: jax.Array) -> jax.Array:
  """`alpha * vector weights^T` in our layout: `[n or 1, s, c]`."""
  s = weights.shape[-1]
  return alpha * jnp.reshape(weights, (-1, s, 1)) * jnp.reshape(vector, (1, 1, -1))


def edit_many(
  features: jax.typing.ArrayLike,
  appearances: jax.typing.ArrayLike,
  parts: jax.typing.ArrayLike,
  edits: Sequence[tuple],
  *,
  normalise: str = "minmax",
) -> jax.Array:
  """Several local edits at once: `Z_i + sum_t alpha_t a_(j_t) p^_(k_t)^T`.

  Args:
    features: `[n, h, w, c]` or `[n, s, c]`.
    appearances: A, `[c, r_c]`.
    parts: P, `[s, r_s]`, or refined per-sample parts `[n, s, r_s]`.
    edits: a sequence of `(part, appearance, alpha)` triples: `part` as in the
      module doc, `appearance` a column j of A (an int or an integer scalar
      array, may be traced), `alpha` a scalar or `[n]` strength.
    normalise: "minmax" (default, the official code) or "max": how parts are
      mapped into [0, 1] (module doc); masks are never rescaled.

  Returns:
    the edited features, in the layout of `features`.

  Example:
    >>> both = pj.edit_many(features, A, P, [(0, 1, 5.0), ([2, 3], 0, -5.0)])
  """
  z, unflatten = checks.flatten_features(features)
  checks.check_factors(z.shape, appearances)
  edits = list(edits)
  if not edits:
    raise ValueError("edits: give at least one (part, appearance, alpha) triple")
  n = z.shape[0]
  delta = 0
  for part, appearance, alpha in edits:
    delta = delta + _direction(
      part_weights(part, parts, features, normalise),
      _vector(appearances, appearance, "appearance"),
      _alpha(alpha, n),
    )
  return unflatten(z + delta.astype(z.dtype))


def edit(
  features: jax.typing.ArrayLike,
  appearances: jax.typing.ArrayLike,
  parts: jax.typing.ArrayLike,
  part: jax.typing.ArrayLike | Sequence[jax.typing.ArrayLike],
  appearance: jax.typing.ArrayLike,
  alpha: jax.typing.ArrayLike,
  *,
  normalise: str = "minmax",
) -> jax.Array:
  """Local edit `Z_i + alpha a_j p^_k^T` (Sec. 3.3.1), `p^_k` the part mapped to [0, 1].

  Args:
    features: `[n, h, w, c]` or `[n, s, c]`.
    appearances: A, `[c, r_c]`.
    parts: P, `[s, r_s]`, or refined per-sample parts `[n, s, r_s]`.
    part: an index k, several indices (their union), or a `[s]`, `[H, W]`
      or `[n, H, W]` float mask in [0, 1] (see the module doc). Indices may be
      traced integer arrays.
    appearance: j, a column of A (an int or an integer scalar array).
    alpha: the strength, a scalar or `[n]`.
    normalise: "minmax" (default, the official code's `mapRange`) or "max".

  Returns:
    the edited features, in the layout of `features`.

  Example:
    >>> edited = pj.edit(features, A, P, part=3, appearance=0, alpha=30.0)
    >>> strip = jax.vmap(lambda k: pj.edit(features, A, P, k, 0, 30.0))(jnp.arange(4))
  """
  return edit_many(features, appearances, parts, [(part, appearance, alpha)], normalise=normalise)


def propose_background(
  features: jax.typing.ArrayLike,
  appearances: jax.typing.ArrayLike,
  *,
  mu: jax.typing.ArrayLike | None = None,
  border: int = 1,
) -> tuple[jax.Array, jax.Array]:
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
    raise ValueError(
      f"border must be an integer in [1, {(min(h, w) - 1) // 2}] "
      f"for a {(h, w)} grid, got {border!r}"
    )
  maps = interpret.saliency(features, appearances)  # [n, s, r_c]
  if mu is None:
    mu = jnp.mean(maps, axis=(0, 1))
  inside = interpret.localise(maps, jnp.asarray(mu)).astype(jnp.float32)
  ring = np.ones((h, w), bool)
  ring[border : h - border, border : w - border] = False
  n_ring = int(ring.sum())
  ring = jnp.asarray(ring.reshape(1, h * w, 1))
  on_border = jnp.sum(jnp.where(ring, inside, 0), axis=1) / n_ring
  off_border = jnp.sum(jnp.where(ring, 0, inside), axis=1) / (h * w - n_ring)
  scores = jnp.mean(on_border - off_border, axis=0)  # [r_c]
  return jnp.argmax(scores).astype(jnp.int32), scores


def remove_object(
  features: jax.typing.ArrayLike,
  appearances: jax.typing.ArrayLike,
  parts: jax.typing.ArrayLike,
  part: jax.typing.ArrayLike | Sequence[jax.typing.ArrayLike],
  alpha: jax.typing.ArrayLike,
  *,
  background: jax.typing.ArrayLike | None = None,
  mu: jax.typing.ArrayLike | None = None,
  border: int = 1,
  normalise: str = "minmax",
) -> tuple[jax.Array, jax.typing.ArrayLike]:
  """Object removal (Sec. 5.1.1): adds the background concept at `part`.

  `Z_i + alpha a_b p^^T` with b = `background` (an int or an integer scalar
  array, may be traced), or, when None, the concept proposed by
  `propose_background(features, appearances, mu=mu, border=border)`. `part`,
  `alpha` and `normalise` are as in `edit`.

  Returns:
    `(edited features, b)`.
  """
  z, unflatten = checks.flatten_features(features)
  checks.check_factors(z.shape, appearances)
  if background is None:
    background, _ = propose_background(features, appearances, mu=mu, border=border)
  delta = _direction(
    part_weights(part, parts, features, normalise),
    _vector(appearances, background, "background"),
    _alpha(alpha, z.shape[0]),
  )
  return unflatten(z + delta.astype(z.dtype)), background


def rewrite(
  features: jax.typing.ArrayLike,
  appearances: jax.typing.ArrayLike,
  source: jax.typing.ArrayLike,
  target: jax.typing.ArrayLike,
  alpha: jax.typing.ArrayLike,
  *,
  keep_residual: bool = True,
) -> jax.Array:
  """Concept rewriting (Sec. 5.5): moves concept j's positive mass onto k.

  With the coefficients `Z^_i = A^T Z_i` (rows = concepts), Eqs. (14)-(16):
  `Z^_i(k,:) += alpha [Z^_i(j,:)]_+` and `Z^_i(j,:) := [Z^_i(j,:)]_-`. The
  paper renders `A Z^'_i`; by default (`keep_residual=True`) the features are
  `Z_i + A (Z^'_i - Z^_i) = Z_i + alpha a_k [Z^_i(j,:)]_+ - a_j [Z^_i(j,:)]_+`,
  which also keeps the part `(I - A A^T) Z_i` of the features outside the span
  of A. With the full orthogonal basis of the paper's figures (`r_c = c`,
  `A A^T = I`) the two are equal; with `r_c < c`, `keep_residual=False` gives
  the paper's `A Z^'_i`, which drops that part (and so changes the image where
  concept j is absent too).

  Args:
    features: `[n, h, w, c]` or `[n, s, c]`.
    appearances: A, `[c, r_c]`; Eqs. (14)-(16) rely on orthonormal columns
      (`A^T` is then the inverse of `A` on its span; `Factors.orthogonality_error`).
    source: j, the concept to replace (an int or an integer scalar array).
    target: k, the concept written in its place (k != j when concrete).
    alpha: the strength, a scalar or `[n]`.
    keep_residual: True: `Z_i + A (Z^'_i - Z^_i)`; False: the paper's `A Z^'_i`.

  Returns:
    the rewritten features, in the layout of `features`.

  Example:
    >>> rewritten = pj.rewrite(features, A, source=0, target=2, alpha=1.0)
  """
  z, unflatten = checks.flatten_features(features)
  checks.check_factors(z.shape, appearances)
  a_j = _vector(appearances, source, "source")  # [c]
  a_k = _vector(appearances, target, "target")  # [c]
  if checks.is_concrete(source) and checks.is_concrete(target) and int(source) == int(target):
    raise ValueError(f"source and target must differ, got {int(source)} twice")
  positive = jnp.maximum(jnp.einsum("nsc,c->ns", z, a_j, precision=_HIGHEST), 0)[
    ..., None
  ]  # [n, s, 1] Eq. 14
  delta = (
    _alpha(alpha, z.shape[0]) * positive * a_k[None, None] - positive * a_j[None, None]
  )  # [n, s, c], A (Z^' - Z^): Eqs. 15-16
  if keep_residual:
    base = z
  else:  # A Z^' = A A^T Z + A (Z^' - Z^), as (Z A) A^T: O(n s c r_c), no [c, c] product.
    coefficients = jnp.einsum("nsc,cr->nsr", z, appearances, precision=_HIGHEST)  # [n, s, r_c]
    base = jnp.einsum("nsr,cr->nsc", coefficients, appearances, precision=_HIGHEST)
  return unflatten(base + delta.astype(z.dtype))
