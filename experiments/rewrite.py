"""Concept rewriting: concept j's positive mass moved onto concept k (Sec. 5.5).

    python -m experiments.rewrite --factors=/tmp/panda --source=2 --target=5 --out=...

Eqs. (14)-(16) at every position of the first `--num_show` samples. Writes
`rewrite.png` (original / rewritten / squared error) and metrics.json: the mean
squared change of the images, and the mean positive coefficient
`[a^T Z_i]_+` of the source and target concepts before and after (the source's
drops to zero when A is orthonormal).
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

import panda_jax as pj
from experiments.plumbing import cli
from experiments.plumbing import decomposition
from experiments.plumbing import distributed
from experiments.plumbing import options
from experiments.plumbing import outputs
from experiments.plumbing import sampling
from panda_jax import generator_ops
from panda_jax import viz
from panda_jax.data import toyfaces

SPEC = options.spec(
  *options.WITH_FACTORS,
  source=options.Flag("integer", 0, "Concept j whose positive mass is moved."),
  target=options.Flag("integer", 1, "Concept k that receives it."),
  rewrite_alpha=options.Flag("float", 1.0, "Strength alpha of Eq. (15)."),
)


def positive_mass(features, appearances, concepts):
  """Mean of `[a_k^T Z_i]_+` over samples and positions, for each of `concepts`."""
  maps = pj.saliency(features, appearances)[..., np.asarray(concepts)]
  return [float(v) for v in jnp.mean(jnp.maximum(maps, 0), axis=(0, 1))]


def run(config) -> dict:
  """Rewrites; returns the metrics written to `OUT/metrics.json`."""
  out = outputs.output_dir(config.out)
  gen = sampling.load_generator(config.generator)
  factors, layer = decomposition.factors_for(config, gen)
  indices = np.arange(config.num_show)
  features = sampling.extract_features(gen, config, layer, indices)
  pair = (config.source, config.target)
  rewritten = pj.rewrite(features, factors.appearances, *pair, config.rewrite_alpha)
  before, after = generator_ops.rewrite_images(
    gen,
    sampling.latents(gen, config, indices),
    layer,
    factors.appearances,
    *pair,
    config.rewrite_alpha,
  )
  before, after = toyfaces.split_labels(before), toyfaces.split_labels(after)
  metrics = dict(
    layer=layer,
    generator=config.generator,
    source=config.source,
    target=config.target,
    alpha=config.rewrite_alpha,
    mean_squared_change=float(np.mean(np.square(after.rgb - before.rgb))),
    mass_before=positive_mass(features, factors.appearances, pair),
    mass_after=positive_mass(rewritten, factors.appearances, pair),
  )
  if distributed.is_writer():
    viz.plot_edit(before.rgb, after.rgb, os.path.join(out, "rewrite.png"))
  return outputs.write_metrics(out, metrics)


if __name__ == "__main__":
  cli.main(run, SPEC)
