"""Samples made unaligned, and the refinement measured on them (issue 12, items 2-3).

Each sample's feature map is rolled by a random offset of up to a quarter of
the side; the carry (e.g. StyleGAN2's skip RGB image of the earlier blocks) is
shifted by the same fraction of its own side (a Fourier phase shift), and
`resume` draws an image whose label channels follow. The oracle is the global
parts rolled by the known offset.

`toyfaces_refinement`: global parts fitted on aligned samples of the embedded
toy-faces GAN at one layer; per ground-truth part, the best-matching part's
pooled IoU of the global parts, the refined parts and the oracle on unaligned
samples, and of the global and refined parts on the aligned ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from panda_jax import decomposition
from panda_jax import generator_ops
from panda_jax import parts_eval
from panda_jax import refinement
from panda_jax.data import toyfaces


def roll_samples(x, offsets):
  """Each sample of `x` (`[n, h, w, c]`) rolled by its integer `offsets[i]` (`[n, 2]`)."""
  return jax.vmap(lambda xi, o: jnp.roll(xi, (o[0], o[1]), axis=(0, 1)))(x, offsets)


def shift_samples(x, shifts):
  """Circular shift of each sample by fractional `shifts` (`[n, 2]`), Fourier phase."""
  h, w = x.shape[1:3]
  fy, fx = jnp.fft.fftfreq(h)[:, None], jnp.fft.fftfreq(w)[None, :]
  phase = jnp.exp(
    -2j * jnp.pi * (fy[None] * shifts[:, 0, None, None] + fx[None] * shifts[:, 1, None, None])
  )  # [n, h, w]
  spectrum = jnp.fft.fft2(x, axes=(1, 2)) * phase[..., None]
  return jnp.real(jnp.fft.ifft2(spectrum, axes=(1, 2))).astype(x.dtype)


def roll_parts(parts, offsets, grid):
  """The global parts `[s, r_s]` rolled per sample: `[n, s, r_s]` (the oracle)."""
  h, w = grid
  tiled = jnp.broadcast_to(parts.reshape(1, h, w, -1), (len(offsets), h, w, parts.shape[1]))
  return roll_samples(tiled, offsets).reshape(len(offsets), h * w, -1)


def random_offsets(key, num_samples: int, grid, fraction: float = 0.25) -> jax.Array:
  """int32 `[n, 2]` offsets, uniform in `[-fraction * side, fraction * side]` per axis."""
  most = np.floor(fraction * np.asarray(grid)).astype(np.int32)
  return jax.random.randint(key, (num_samples, 2), -most, most + 1)


def move(x, carry, offsets):
  """Rolls features `[n, h, w, c]` by `offsets` and shifts the carry to follow.

  Every 4-D leaf of the carry (an image such as StyleGAN2's skip RGB) is shifted
  by the same fraction of its own side (`shift_samples`); other leaves are kept.
  """
  grid = np.asarray(x.shape[1:3])
  follow = lambda leaf: (
    shift_samples(leaf, offsets * (np.asarray(leaf.shape[1:3]) / grid))
    if getattr(leaf, "ndim", 0) == 4
    else leaf
  )
  return roll_samples(x, offsets), jax.tree.map(follow, carry)


def _labels(gen, x, carry, lat, layer):
  _, probs = toyfaces.split_channels(gen.resume(x, carry, lat, layer))
  return np.asarray(jnp.argmax(probs, axis=-1))


def _best(parts, labels, grid):
  best, _, _ = parts_eval.best_part_iou(parts, labels, len(toyfaces.PARTS), grid)
  return np.asarray(best)


def toyfaces_refinement(
  gen,
  layer: int,
  *,
  rank_c: int = 16,
  rank_s: int = 8,
  num_fit: int = 256,
  num_eval: int = 64,
  fit_steps: int = 200,
  seed: int = 0,
  batch_size: int = 64,
  **refine_options,
) -> dict:
  """Issue 12 items 2-3 on one layer of the toy-faces generator.

  Returns:
    a dict of per-part lists (order `toyfaces.PARTS`): `unaligned` with
    `global`, `refined`, `oracle` IoUs and `ratio = refined / oracle`;
    `aligned` with `global` and `refined`; plus the settings.
  """
  fit_key, eval_key, offset_key = jax.random.split(jax.random.PRNGKey(seed), 3)
  feats = jnp.concatenate(
    list(
      generator_ops.sampled_features(
        gen, fit_key, layer, num_samples=num_fit, batch_size=batch_size
      )
    )
  )
  factors = decomposition.fit(feats, rank_c, rank_s, steps=fit_steps, key=fit_key, progress=False)
  lat = generator_ops.sample_latents(gen, eval_key, np.arange(num_eval))
  x, carry = gen.split(lat, layer)
  grid = tuple(x.shape[1:3])
  offsets = random_offsets(offset_key, num_eval, grid)
  moved, moved_carry = move(x, carry, offsets)
  labels_moved = _labels(gen, moved, moved_carry, lat, layer)
  labels = _labels(gen, x, carry, lat, layer)
  a, p = factors.appearances, factors.parts
  unaligned = {
    "global": _best(p, labels_moved, grid),
    "refined": _best(refinement.refine(moved, a, p, **refine_options), labels_moved, grid),
    "oracle": _best(roll_parts(p, offsets, grid), labels_moved, grid),
  }
  unaligned["ratio"] = unaligned["refined"] / np.maximum(unaligned["oracle"], 1e-12)
  aligned = {
    "global": _best(p, labels, grid),
    "refined": _best(refinement.refine(x, a, p, **refine_options), labels, grid),
  }
  tolist = lambda d: {k: np.round(v.astype(np.float64), 4).tolist() for k, v in d.items()}
  return dict(
    layer=layer,
    grid=list(grid),
    rank_c=rank_c,
    rank_s=rank_s,
    num_fit=num_fit,
    num_eval=num_eval,
    fit_steps=fit_steps,
    parts=list(toyfaces.PARTS),
    refine_options={k: str(v) for k, v in refine_options.items()},
    unaligned=tolist(unaligned),
    aligned=tolist(aligned),
  )
