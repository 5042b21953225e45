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
from experiments import common
from experiments import decompose
from panda_jax import generator_ops
from panda_jax import viz

SPEC = common.spec(
    *common.WITH_FACTORS,
    source=common.Flag("integer", 0, "Concept j whose positive mass is moved."),
    target=common.Flag("integer", 1, "Concept k that receives it."),
    rewrite_alpha=common.Flag("float", 1.0, "Strength alpha of Eq. (15)."))


def positive_mass(features, appearances, concepts):
  """Mean of `[a_k^T Z_i]_+` over samples and positions, for each of `concepts`."""
  maps = pj.saliency(features, appearances)[..., np.asarray(concepts)]
  return [float(v) for v in jnp.mean(jnp.maximum(maps, 0), axis=(0, 1))]


def run(config) -> dict:
  """Rewrites; returns the metrics written to `OUT/metrics.json`."""
  out = common.output_dir(config.out)
  gen = common.load_generator(config.generator)
  factors, layer = decompose.factors_for(config, gen)
  indices = np.arange(config.num_show)
  features = common.extract_features(gen, config, layer, indices)
  pair = (config.source, config.target)
  rewritten = pj.rewrite(features, factors.appearances, *pair, config.rewrite_alpha)
  before, after = generator_ops.rewrite_images(gen, common.latents(gen, config, indices), layer,
                                               factors.appearances, *pair, config.rewrite_alpha)
  before, after = common.split_labels(before), common.split_labels(after)
  metrics = dict(layer=layer, generator=config.generator, source=config.source,
                 target=config.target, alpha=config.rewrite_alpha,
                 mean_squared_change=float(np.mean(np.square(after.rgb - before.rgb))),
                 mass_before=positive_mass(features, factors.appearances, pair),
                 mass_after=positive_mass(rewritten, factors.appearances, pair))
  if common.is_writer():
    viz.plot_edit(before.rgb, after.rgb, os.path.join(out, "rewrite.png"))
  return common.write_metrics(out, metrics)


if __name__ == "__main__":
  common.main(run, SPEC)
