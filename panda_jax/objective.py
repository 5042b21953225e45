"""The PandA objective, Eq. (3), and its block gradients, Eqs. (4)-(5).

Internally every feature batch is the paper's mode-3 unfolding, `z` of shape
`[n, c, s]` (`Z_i(3)` for each sample): measured on a 2-core CPU at n=8, c=512,
s=128^2, the products below run as one 2-D GEMM over an `[n*c, s]` view (8 ms)
where the channels-last `[n, s, c]` layout of the public API lowers to a 10x
slower one. `unfold` converts once, at the edge.

Contraction order (paper Section 4.3, applied to Eqs. 3-5). Everything is
expressed through the per-sample projection `M_i = Z_i P` (`[c, r_s]`) and the
coefficients `Lambda_i = A^T M_i` (`[r_c, r_s]`), with the Grams `G_A = A^T A`
(`[r_c, r_c]`) and `G_P = P^T P` (`[r_s, r_s]`) and the residual coefficients
`K_i = G_A Lambda_i G_P - 2 Lambda_i`:

    L   = sum_i ||Z_i||^2 - 2 ||Lambda_i||^2 + <G_A Lambda_i, Lambda_i G_P>
    dP  = 2 [ P sum_i Lambda_i^T G_A Lambda_i + sum_i Z_i^T A K_i ]
    dA  = 2 [ A sum_i Lambda_i G_P Lambda_i^T + sum_i M_i K_i^T ]

Once `M_i` is known, the loss, every exact loss change (`coefficient_change`)
and the whole A block cost one `[n, c, r_s] x [c, r_c]` product per trial and
O(n r_c r_s (r_c + r_s)) work on coefficients: no `[n, c, r_s]` array beyond
`M` (and `A K_i` for dP) is formed. The `[r_c, r_c]` Gram `G_A` (c r_c^2) is
formed once per block; a trial of A needs the change of `G_A` (2 c r_c^2) or,
when that is dearer (`r_c > n r_s`), two decodings (`appearances_change`). FLOPs per sample (multiply-adds
x 2), dominant terms:

    ============================  ===========================  =================
    quantity                      this order                   official order
    ============================  ===========================  =================
    M_i = Z_i P                   2 s c r_s                    -
    Z_i^T (A K_i) in dP           2 s c r_s                    -
    Lambda_i, K_i, dA, changes    O(c r_c r_s)                 -
    dP as Z^T A A^T Z P ...       -                            2 s^2 c + 4 s c r_c
    dA as A A^T Z P P^T P ...     -                            2 s^2 c + 4 s c r_c
    ============================  ===========================  =================

so a block-coordinate step costs one pass over Z for dP and one per trial of
parts (`Z_i (P+ - P)`, usually one or two), about 4-6 s c r_s per sample,
against the O(s^2 c) of the official left-to-right order, which also holds an
`[s, s]` matrix per sample. No `[s, s]` and no per-sample `[c, c]` matrix is
ever formed here. (Running the P block on `X_i = A^T Z_i` instead, one pass
per step and trials on `[r_c, s]`, measured no faster at r_c = r_s = 8 on the
DCGAN's 8x8x256 layer: 11.2 against 10.0 ms per step.)

Sums over samples. `loss` and `gradients` (and the steps of
`panda_jax.decomposition`) take `axis_name=None`; given a name, each sum over
samples is completed by `psum` over that axis (`sum_samples`), so the same
functions run on one shard of the batch per device inside a caller's `pmap` or
`shard_map`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from panda_jax import checks


def unfold(features: jax.typing.ArrayLike) -> jax.Array:
  """`[n, s, c]` or `[n, h, w, c]` features -> `[n, c, s]` mode-3 unfoldings."""
  z, _ = checks.flatten_features(features)
  return jnp.swapaxes(z, 1, 2)


class Unfolded(NamedTuple):
  """A feature batch in the paper's mode-3 unfolding: `z` `[n, c, s]` (`Z_i(3)` per sample).

  Every function of the factorisation accepts it in place of channels-last
  features. Transposing a batch costs a pass over it (about as much as one
  `Z P` product, and XLA does not hoist it out of a loop), so a loop of steps
  over one batch should transpose it once: `batch = unfolded(features)`.
  """

  z: jax.Array


def unfolded(features: jax.typing.ArrayLike) -> Unfolded:
  """`[n, s, c]` or `[n, h, w, c]` features -> `Unfolded` (`[n, c, s]`)."""
  return Unfolded(unfold(features))


def batch_z(features: jax.typing.ArrayLike | Unfolded) -> jax.Array:
  """`[n, c, s]` from channels-last features or an `Unfolded` batch."""
  return features.z if isinstance(features, Unfolded) else unfold(features)


def sum_samples(x: jax.Array, axis_name: str | None = None) -> jax.Array:
  """Completes a sum over samples: `psum` over `axis_name` (each device holds a shard), or `x`."""
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def check_batch(
  z: jax.Array, appearances: jax.typing.ArrayLike, parts: jax.typing.ArrayLike | None = None
) -> None:
  """Shapes of `z` `[n, c, s]` against `A` `[c, r_c]` and `P` `[s, r_s]` (static: works under jit)."""
  checks.check_factors((z.shape[0], z.shape[2], z.shape[1]), appearances, parts)


def orthogonality_error(appearances: jax.typing.ArrayLike) -> float:
  """`max |A^T A - I|` of appearances `[c, r_c]` (an `[r_c, r_c]` product, once).

  `saliency`, `rewrite` and `refine` read `A^T Z_i` as coordinates in an
  orthonormal basis; Algorithm 1 starts `A` orthonormal (HOSVD) but its
  unconstrained gradient steps let it drift.
  """
  a = np.asarray(appearances)  # On the host: small, and no program to compile.
  gram = a.T @ a
  return float(np.max(np.abs(gram - np.eye(gram.shape[0], dtype=gram.dtype))))


def project_parts(z: jax.Array, parts: jax.Array) -> jax.Array:
  """`M_i = Z_i P` for every sample: `[n, c, s] x [s, r_s] -> [n, c, r_s]`.

  One 2-D GEMM over the `[n*c, s]` view; the only product whose cost scales
  with the feature batch, together with `parts_gradient`'s `Z_i^T` product.
  """
  n, c, s = z.shape
  return jnp.reshape(jnp.reshape(z, (n * c, s)) @ parts, (n, c, parts.shape[1]))


def coefficients(zp: jax.Array, appearances: jax.Array) -> jax.Array:
  """`Lambda_i = A^T Z_i P` (Eq. 3): `[n, c, r_s] x [c, r_c] -> [n, r_c, r_s]`."""
  return jnp.einsum("cr,ncq->nrq", appearances, zp)


def positions_product(z: jax.Array, b: jax.Array) -> jax.Array:
  """`sum_i Z_i^T B_i`: `[n, c, s] x [n, c, r] -> [s, r]`, the pass over Z of Eq. (4).

  Per-sample products, then the sum: on XLA's CPU backend 1.3x faster than one
  GEMM over the `[n*c, s]` view and 5x faster than the einsum (n 512, c 256, s 64).
  """
  per_sample = jax.lax.dot_general(b, z, (((1,), (1,)), ((0,), (0,))))  # [n, r, s]
  return per_sample.sum(0).T


def squared_norm(z: jax.Array) -> jax.Array:
  """`sum_i ||Z_i||_F^2`, the constant term of the expanded loss."""
  return jnp.vdot(z, z).real


def decode(lam: jax.Array, appearances: jax.Array) -> jax.Array:
  """`B_i = A Lambda_i = A A^T Z_i P`: `[n, r_c, r_s] -> [n, c, r_s]`."""
  return jnp.einsum("cr,nrq->ncq", appearances, lam)


def _gram_weighted(gram_a: jax.Array, lam: jax.Array) -> jax.Array:
  """`G_A Lambda_i` for every sample: `[r_c, r_c] x [n, r_c, r_s] -> [n, r_c, r_s]`."""
  return jnp.einsum("rt,ntq->nrq", gram_a, lam)


def residual_coefficients(lam: jax.Array, gram_a: jax.Array, gram_p: jax.Array) -> jax.Array:
  """`K_i = G_A Lambda_i G_P - 2 Lambda_i`, `[n, r_c, r_s]`: both block gradients are linear in it."""
  return _gram_weighted(gram_a, lam) @ gram_p - 2.0 * lam


def loss_from_coefficients(
  sq_norm: jax.typing.ArrayLike, lam: jax.Array, gram_a: jax.Array, gram_p: jax.Array
) -> jax.Array:
  """Eq. (3) expanded: `sum_i ||Z_i||^2 - 2 ||Lambda_i||^2 + <G_A Lambda_i, Lambda_i G_P>`.

  It subtracts terms of the size of `||Z||^2`, so in float32 it resolves the
  loss to about 1e-7 of `||Z||^2` (`loss` forms the residual explicitly; the
  steps carry the loss by `coefficient_change`).
  """
  return sq_norm - 2.0 * jnp.vdot(lam, lam) + jnp.vdot(_gram_weighted(gram_a, lam), lam @ gram_p)


def loss_from_projection(
  sq_norm: jax.typing.ArrayLike, zp: jax.Array, appearances: jax.Array, parts: jax.Array
) -> jax.Array:
  """Eq. (3) expanded (`loss_from_coefficients`) from `M_i = Z_i P` (`[n, c, r_s]`)."""
  return loss_from_coefficients(
    sq_norm, coefficients(zp, appearances), appearances.T @ appearances, parts.T @ parts
  )


def coefficient_change(
  lam: jax.Array,
  d_lam: jax.Array,
  gram_a: jax.Array,
  gram_p: jax.Array,
  *,
  d_gram_a: jax.Array | None = None,
  d_gram_p: jax.Array | None = None,
) -> jax.Array:
  """Exact change of Eq. (3) when `Lambda -> Lambda + dLambda`, `G_A -> G_A + dG_A`, `G_P -> G_P + dG_P`.

  With `F(Lambda, G_A, G_P) = <G_A Lambda, Lambda G_P>`, the change is
  `-2 (2 <Lambda, dL> + ||dL||^2) + 2 <G_A Lambda, dL G_P> + <G_A dL, dL G_P>
  + <dG_A Lambda', Lambda' G_P> + <G_A' Lambda', Lambda' dG_P>` (primes: the new
  values). Every term is a product with a change, so the result is accurate
  relative to the change itself (the difference of two expanded losses is only
  accurate to eps ||Z||^2). Shapes: `lam`, `d_lam` `[n, r_c, r_s]`; Grams
  `[r_c, r_c]`, `[r_s, r_s]`. Summed over this shard's samples.
  """
  d_weighted = _gram_weighted(gram_a, d_lam)
  change = (
    -2.0 * (2.0 * jnp.vdot(lam, d_lam) + jnp.vdot(d_lam, d_lam))
    + 2.0 * jnp.vdot(_gram_weighted(gram_a, lam), d_lam @ gram_p)
    + jnp.vdot(d_weighted, d_lam @ gram_p)
  )
  new = lam + d_lam
  if d_gram_a is not None:
    change = change + jnp.vdot(_gram_weighted(d_gram_a, new), new @ gram_p)
    gram_a = gram_a + d_gram_a
  if d_gram_p is not None:
    change = change + jnp.vdot(_gram_weighted(gram_a, new), new @ d_gram_p)
  return change


def appearances_change(
  zp: jax.Array,
  lam: jax.Array,
  appearances: jax.Array,
  delta: jax.Array,
  gram_a: jax.Array,
  gram_p: jax.Array,
) -> jax.Array:
  """Exact change of Eq. (3) when `A -> A + delta` at fixed parts (the A block's trial).

  `zp` `[n, c, r_s]`, `lam = A^T zp`, `delta` `[c, r_c]`. The term of the Gram's
  change, `<dG_A Lambda', Lambda' G_P>`, is formed the cheaper way: with `dG_A`
  (`gram_change`, 2 c r_c^2) when `r_c <= n r_s`, else through the decodings
  `A Lambda'_i` and `delta Lambda'_i` (2 n c r_c r_s each; e.g. n 8, r_c 512).
  """
  d_lam = coefficients(zp, delta)  # (A+ - A)^T M.
  n, rank_c, rank_s = lam.shape
  if rank_c <= n * rank_s:
    return coefficient_change(lam, d_lam, gram_a, gram_p, d_gram_a=gram_change(appearances, delta))
  new = lam + d_lam
  old_basis, moved = decode(new, appearances), decode(new, delta)
  return (
    coefficient_change(lam, d_lam, gram_a, gram_p)
    + 2.0 * jnp.vdot(old_basis, moved @ gram_p)
    + jnp.vdot(moved, moved @ gram_p)
  )


def gram_change(factor: jax.Array, delta: jax.Array) -> jax.Array:
  """`(F + D)^T (F + D) - F^T F = F^T D + D^T F + D^T D`, formed from the change `D`."""
  cross = factor.T @ delta
  return cross + cross.T + delta.T @ delta


def loss(
  features: jax.typing.ArrayLike | Unfolded,
  appearances: jax.typing.ArrayLike,
  parts: jax.typing.ArrayLike,
  *,
  axis_name: str | None = None,
) -> jax.Array:
  """Eq. (3): `sum_i ||Z_i - A (A^T Z_i P) P^T||_F^2`, summed over the batch (jitted).

  Args:
    features: `[n, s, c]` or `[n, h, w, c]`, or an `Unfolded` batch.
    appearances: `A`, `[c, r_c]`.
    parts: `P`, `[s, r_s]`.
    axis_name: with a name, `features` is this device's shard and the sum runs
      over the samples of every device on that axis (`psum`).

  Returns:
    A scalar. The residual is formed explicitly (one `[n, c, s]` temporary),
    ordered as `(A Lambda_i) P^T`, so the value is accurate to float rounding
    of the residual itself.
  """
  z = batch_z(features)
  check_batch(z, appearances, parts)
  return _residual_loss(z, appearances, parts, axis_name=axis_name)


@functools.partial(jax.jit, static_argnames=("axis_name",))
def _residual_loss(
  z: jax.Array, appearances: jax.Array, parts: jax.Array, axis_name: str | None
) -> jax.Array:
  n, c, s = z.shape
  decoded = decode(coefficients(project_parts(z, parts), appearances), appearances)
  recon = jnp.reshape(jnp.reshape(decoded, (n * c, -1)) @ parts.T, (n, c, s))
  residual = z - recon
  return sum_samples(jnp.vdot(residual, residual).real, axis_name)


def parts_gradient(
  z: jax.Array, zp: jax.Array, appearances: jax.Array, parts: jax.Array
) -> jax.Array:
  """Eq. (4) reordered: `dL/dP`, `[s, r_s]`, from `z` `[n, c, s]` and `zp = Z P`.

  `dP = 2 [P sum_i Lambda_i^T G_A Lambda_i + sum_i Z_i^T A K_i]`: one pass over Z.
  """
  gram_a = appearances.T @ appearances
  lam = coefficients(zp, appearances)
  outer = jnp.einsum("nrq,nru->qu", _gram_weighted(gram_a, lam), lam)  # [r_s, r_s]
  k = residual_coefficients(lam, gram_a, parts.T @ parts)
  return 2.0 * (parts @ outer + positions_product(z, decode(k, appearances)))


def appearances_gradient(zp: jax.Array, appearances: jax.Array, parts: jax.Array) -> jax.Array:
  """Eq. (5) reordered: `dL/dA`, `[c, r_c]`, from `zp = Z P` only (no pass over Z).

  `dA = 2 [A sum_i Lambda_i G_P Lambda_i^T + sum_i M_i K_i^T]`.
  """
  gram_p = parts.T @ parts
  lam = coefficients(zp, appearances)
  k = residual_coefficients(lam, appearances.T @ appearances, gram_p)
  inner = jnp.einsum("nrq,ntq->rt", lam @ gram_p, lam)  # [r_c, r_c]
  return 2.0 * (appearances @ inner + jnp.einsum("ncq,nrq->cr", zp, k))


def gradients(
  features: jax.typing.ArrayLike | Unfolded,
  appearances: jax.typing.ArrayLike,
  parts: jax.typing.ArrayLike,
  *,
  axis_name: str | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Both block gradients of Eq. (3) at `(A, P)`: `(dL/dA [c, r_c], dL/dP [s, r_s])` (jitted).

  `features` as in `loss`; with `axis_name`, both are summed over every device's samples.
  """
  z = batch_z(features)
  check_batch(z, appearances, parts)
  return _gradients(z, appearances, parts, axis_name=axis_name)


@functools.partial(jax.jit, static_argnames=("axis_name",))
def _gradients(
  z: jax.Array, appearances: jax.Array, parts: jax.Array, axis_name: str | None
) -> tuple[jax.Array, jax.Array]:
  zp = project_parts(z, parts)
  return (
    sum_samples(appearances_gradient(zp, appearances, parts), axis_name),
    sum_samples(parts_gradient(z, zp, appearances, parts), axis_name),
  )
