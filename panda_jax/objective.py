"""The PandA objective, Eq. (3), and its block gradients, Eqs. (4)-(5).

Internally every feature batch is the paper's mode-3 unfolding, `z` of shape
`[n, c, s]` (`Z_i(3)` for each sample): measured on a 2-core CPU at n=8, c=512,
s=128^2, the products below run as one 2-D GEMM over an `[n*c, s]` view (8 ms)
where the channels-last `[n, s, c]` layout of the public API lowers to a 10x
slower one. `unfold` converts once, at the edge.

Contraction order (paper Section 4.3, applied to Eqs. 3-5). Everything is
expressed through the per-sample projection `M_i = Z_i P` (`[c, r_s]`), the
coefficients `Lambda_i = A^T M_i` (`[r_c, r_s]`) and their decoding
`B_i = A Lambda_i` (`[c, r_s]`), with `G_A = A^T A`, `G_P = P^T P` (`G_A` is
written below for readability; the code uses `B_i` instead, since forming
`G_A` costs `c r_c^2`, more than all the rest when `n r_s < r_c`):

    L   = sum_i ||Z_i||^2 - 2 ||Lambda_i||^2 + tr(Lambda_i^T G_A Lambda_i G_P)
    dP  = 2 [ P sum_i Lambda_i^T G_A Lambda_i + sum_i Z_i^T A (G_A Lambda_i G_P - 2 Lambda_i) ]
    dA  = 2 sum_i [ A Lambda_i G_P Lambda_i^T + M_i (G_P Lambda_i^T G_A - 2 Lambda_i^T) ]

FLOPs per sample (multiply-adds x 2), dominant terms only:

    ============================  ===========================  =================
    quantity                      this order                   official order
    ============================  ===========================  =================
    M_i = Z_i P                   2 s c r_s                    -
    Z_i^T (A ...) in dP           2 s c r_s                    -
    Lambda_i, B_i = A Lambda_i,   O(c r_c r_s) (about 10x)     -
    dA and the other products
    dP as Z^T A A^T Z P ...       -                            2 s^2 c + 4 s c r_c
    dA as A A^T Z P P^T P ...     -                            2 s^2 c + 4 s c r_c
    ============================  ===========================  =================

so a full block-coordinate step costs about 6 s c r_s per sample (three passes
over Z: M, Z^T D, and M at the new parts) against the O(s^2 c) of the official
left-to-right order, which also holds an `[s, s]` matrix per sample. No `[s, s]`
and no per-sample `[c, c]` matrix is ever formed here.

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
  a = jnp.asarray(appearances)
  gram = a.T @ a
  return float(jnp.max(jnp.abs(gram - jnp.eye(gram.shape[0], dtype=gram.dtype))))


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


def squared_norm(z: jax.Array) -> jax.Array:
  """`sum_i ||Z_i||_F^2`, the constant term of the expanded loss."""
  return jnp.vdot(z, z).real


def decode(lam: jax.Array, appearances: jax.Array) -> jax.Array:
  """`B_i = A Lambda_i = A A^T Z_i P`: `[n, r_c, r_s] -> [n, c, r_s]`."""
  return jnp.einsum("cr,nrq->ncq", appearances, lam)


def loss_from_projection(
  sq_norm: jax.typing.ArrayLike, zp: jax.Array, appearances: jax.Array, parts: jax.Array
) -> jax.Array:
  """Eq. (3) in the expanded form above, from `M_i = Z_i P` (`[n, c, r_s]`).

  `tr(Lambda_i^T G_A Lambda_i G_P) = <B_i, B_i G_P>` with `B_i = A Lambda_i`,
  so no `[r_c, r_c]` Gram matrix is formed: O(n c r_c r_s) given `zp`, what
  the line searches evaluate. It subtracts terms of the size of `||Z||^2`, so
  in float32 it resolves the loss to about 1e-7 of `||Z||^2`; `loss` forms the
  residual explicitly instead.
  """
  lam = coefficients(zp, appearances)
  decoded = decode(lam, appearances)
  fit_term = jnp.vdot(decoded, decoded @ (parts.T @ parts))
  return sq_norm - 2.0 * jnp.vdot(lam, lam) + fit_term


def loss_change(
  lam: jax.Array,
  decoded: jax.Array,
  d_lam: jax.Array,
  d_decoded: jax.Array,
  gram_p: jax.Array,
  d_gram_p: jax.Array | None = None,
) -> jax.Array:
  """Exact change of Eq. (3) when `Lambda -> Lambda + dLambda`, `B -> B + dB`, `G_P -> G_P + dG`.

  Every term is a product with a change, so the result is accurate relative to
  the change itself (the difference of two `loss_from_projection` values is
  only accurate to eps ||Z||^2). Shapes: `lam`, `d_lam` `[n, r_c, r_s]`;
  `decoded`, `d_decoded` `[n, c, r_s]`; `gram_p`, `d_gram_p` `[r_s, r_s]`.
  """
  change = (
    -2.0 * (2.0 * jnp.vdot(lam, d_lam) + jnp.vdot(d_lam, d_lam))
    + 2.0 * jnp.vdot(d_decoded, decoded @ gram_p)
    + jnp.vdot(d_decoded, d_decoded @ gram_p)
  )
  if d_gram_p is not None:
    new = decoded + d_decoded
    change = change + jnp.vdot(new, new @ d_gram_p)
  return change


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

  `dP = 2 [P sum_i B_i^T B_i + sum_i Z_i^T D_i]`, `D_i = A (A^T B_i) G_P - 2 B_i`.
  """
  decoded = decode(coefficients(zp, appearances), appearances)  # [n, c, r_s]
  outer = jnp.einsum("ncq,ncu->qu", decoded, decoded)  # [r_s, r_s]
  d = decode(coefficients(decoded, appearances), appearances) @ (parts.T @ parts) - 2.0 * decoded
  # sum_i Z_i^T D_i as a batched [r_s, c] x [c, s] product, then a sum over n.
  ztd = jnp.einsum("ncs,nrc->nrs", z, jnp.swapaxes(d, 1, 2)).sum(0).T
  return 2.0 * (parts @ outer + ztd)


def appearances_gradient(zp: jax.Array, appearances: jax.Array, parts: jax.Array) -> jax.Array:
  """Eq. (5) reordered: `dL/dA`, `[c, r_c]`, from `zp = Z P` only (no pass over Z).

  `dA = 2 sum_i [B_i G_P Lambda_i^T + M_i G_P (A^T B_i)^T - 2 M_i Lambda_i^T]`.
  """
  gram_p = parts.T @ parts
  lam = coefficients(zp, appearances)
  decoded = decode(lam, appearances)
  back = coefficients(decoded, appearances)  # A^T B_i = G_A Lambda_i
  return 2.0 * (
    jnp.einsum("ncq,nrq->cr", decoded @ gram_p, lam)
    + jnp.einsum("ncq,nrq->cr", zp @ gram_p, back)
    - 2.0 * jnp.einsum("ncq,nrq->cr", zp, lam)
  )


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
