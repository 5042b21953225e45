"""The generator, the sample stream, and features and images in batches.

Sample i of a run has the latents of `fold_in(sample_key, i)` with
`sample_key, fit_key = generator_ops.seed_keys(seed)` (`generator_ops.sample_latents`):
the data never depend on the batch size nor on how many processes share the
work (`distributed.local_indices`).
"""

from __future__ import annotations

import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from experiments.plumbing import outputs
from panda_jax import generator_ops
from panda_jax import generators
from panda_jax.data import toyfaces


def load_generator(name: str):
  """A converted checkpoint directory, or an embedded generator by name."""
  if not name:
    raise ValueError("--generator is empty: give a converted checkpoint directory or a name")
  if os.path.isdir(name):
    return generators.load(name)
  try:
    return generators.load(name)
  except (ValueError, OSError) as err:
    raise ValueError(
      f"unknown generator {name!r}: neither a converted checkpoint directory (convert one "
      f"with `python -m converters --src=CHECKPOINT --dst=DIR`) nor an embedded generator "
      f"({err})"
    ) from None


def latents(gen, config, indices):
  """The latents of the samples `indices` of the run (`config.seed`, `config.truncation_psi`)."""
  return generator_ops.sample_latents(
    gen,
    generator_ops.seed_keys(config.seed)[0],
    np.asarray(indices),
    truncation_psi=config.truncation_psi,
  )


def _sample(gen, key, indices, *, layer: Optional[int], psi: float):
  """The features at `layer` (the images when None) of the samples `indices`.

  Not jitted here: the generators jit their own maths per configuration, so
  every instance of one architecture shares the compiled code.
  """
  lat = generator_ops.sample_latents(gen, key, indices, truncation_psi=psi)
  return gen.generate(lat) if layer is None else gen.split(lat, layer)[0]


def feature_shape(gen, layer: int) -> tuple:
  """`(h, w, c)` of the feature maps at `layer` (traced, nothing computed)."""
  shape = jax.eval_shape(
    lambda k: _sample(gen, k, jnp.arange(1), layer=layer, psi=1.0), jax.random.PRNGKey(0)
  ).shape
  return tuple(int(d) for d in shape[1:])


def resolve_layer(gen, layer: Optional[int]) -> int:
  """`layer`, checked, or the deepest layer whose feature maps are at most 16x16."""
  if layer is not None:
    return gen.check_layer(layer)
  small = [l for l in gen.layers if max(feature_shape(gen, l)[:2]) <= 16]
  if not small:
    raise ValueError(f"no layer of {gen.arch} has feature maps of 16x16 or less: pass --layer")
  return small[-1]


def batches(gen, config, indices, layer: Optional[int], desc: str):
  """Yields the features `[b, h, w, c]` at `layer` (images `[b, H, W, ch]` when None).

  Every call has `batch_size` samples (the last one padded), so the generator
  compiles once.
  """
  if config.batch_size < 1:
    raise ValueError(f"--batch_size must be positive, got {config.batch_size}")
  indices = np.asarray(indices)
  size = min(config.batch_size, len(indices))
  sample_key = generator_ops.seed_keys(config.seed)[0]
  bar = outputs.progress(len(indices), desc)
  try:
    for start in range(0, len(indices), size):
      chunk = indices[start : start + size]
      padded = np.concatenate([chunk, np.full(size - len(chunk), chunk[-1])])
      x = _sample(
        gen, sample_key, jnp.asarray(padded), layer=layer, psi=float(config.truncation_psi)
      )
      bar.update(len(chunk))
      yield x[: len(chunk)]
  finally:
    bar.close()


def extract_features(gen, config, layer: int, indices) -> jax.Array:
  """The features `[len(indices), h, w, c]` of the samples `indices`."""
  return jnp.concatenate(list(batches(gen, config, indices, layer, "features")))


def images(gen, config, indices) -> toyfaces.Samples:
  """The images of the samples `indices`, label channels split off (`toyfaces.split_labels`)."""
  return toyfaces.split_labels(np.concatenate(list(batches(gen, config, indices, None, "images"))))
