"""Object removal: the background concept painted over a part (Sec. 5.1.1).

    python -m experiments.remove --factors=/tmp/panda --part=3 --alpha=4 --out=...

Adds `alpha a_b p_k^T` with b the `--background` concept, or, by default, the
one proposed by `pj.propose_background` (the concept whose localisation mask,
with mu over `--num_samples` samples, covers the border of the feature grid
most). Writes `remove.png` (original / edited / squared error) and
metrics.json: the background concept, the proposal scores, the absolute alpha,
the mean squared change and, with ground-truth labels, the ROIR (Eq. 13)
inside the labelled region(s) that best match the part.
"""

from __future__ import annotations

import os

import numpy as np

import panda_jax as pj
from experiments.plumbing import cli
from experiments.plumbing import decomposition
from experiments.plumbing import distributed
from experiments.plumbing import edits
from experiments.plumbing import options
from experiments.plumbing import outputs
from experiments.plumbing import sampling
from panda_jax import generator_ops
from panda_jax import parts_eval
from panda_jax import viz
from panda_jax.data import toyfaces

SPEC = options.spec(
  *options.WITH_FACTORS,
  "part",
  "alpha",
  "relative_alpha",
  background=options.Flag("integer", None, "The background concept (default: proposed)."),
)


def run(config) -> dict:
  """Removes the part; returns the metrics written to `OUT/metrics.json`."""
  out = outputs.output_dir(config.out)
  gen = sampling.load_generator(config.generator)
  factors, layer = decomposition.factors_for(config, gen)
  part = options.parse_part(config.part)
  indices = np.arange(config.num_show)
  features = sampling.extract_features(gen, config, layer, indices)
  alpha = edits.absolute_alpha(config, features, config.alpha)
  metrics = dict(layer=layer, generator=config.generator, part=part, alpha=alpha)
  background = config.background
  if background is None:
    mu = pj.concept_means(
      sampling.batches(gen, config, np.arange(config.num_samples), layer, "concept means"),
      factors.appearances,
    )
    background, scores = pj.propose_background(features, factors.appearances, mu=mu)
    metrics["background_scores"] = scores
  metrics.update(background=int(background), proposed=config.background is None)
  before, after, _ = generator_ops.remove_object_images(
    gen,
    sampling.latents(gen, config, indices),
    layer,
    factors.appearances,
    factors.parts,
    part,
    alpha,
    background=int(background),
  )
  before, after = toyfaces.split_labels(before), toyfaces.split_labels(after)
  metrics["mean_squared_change"] = float(np.mean(np.square(after.rgb - before.rgb)))
  if before.labels is not None:
    mask, names = parts_eval.part_regions(
      factors.parts, before.labels, before.label_names, features.shape[1:3], part
    )
    metrics.update(edits.roir(before.rgb, after.rgb, mask), region=names)
  if distributed.is_writer():
    viz.plot_edit(before.rgb, after.rgb, os.path.join(out, "remove.png"))
  return outputs.write_metrics(out, metrics)


if __name__ == "__main__":
  cli.main(run, SPEC)
