"""Global parts against per-sample refined parts (Sec. 4.2, Eqs. 10-12, Algorithm 2).

    python -m experiments.refine --factors=/tmp/panda --knn=8 --samples=0,1,2,3 --out=...

Refines the global parts on each chosen sample with the full Gram matrix (the
ICLR refinement) and with the mutual-kNN graph (Algorithm 2). Writes
`refine.png` (per sample: the image, then the argmax part of each variant) and
metrics.json: the mean relative change of the parts and, with ground-truth
labels, each label's best-part IoU for every variant.
"""
from __future__ import annotations

import os

from absl import app
from absl import flags
import numpy as np

import panda_jax as pj
from experiments import common
from experiments import decompose
from experiments import figures
from panda_jax import parts_eval

flags.DEFINE_list("samples", ["0", "1", "2", "3"], "Indices of the samples refined.")
flags.DEFINE_integer("knn", 8, "Neighbours k of the mutual-kNN graph.")
flags.DEFINE_integer("refine_steps", 50, "Projected gradient steps of the refinement.")

NAMES = common.WITH_FACTORS + ("samples", "knn", "refine_steps")


def run(config) -> dict:
  """Refines; returns the metrics written to `OUT/metrics.json`."""
  out = common.output_dir(config.out)
  gen = common.load_generator(config.generator)
  factors, layer = decompose.factors_for(config, gen)
  indices = np.asarray([int(i) for i in config.samples])
  if indices.size == 0 or indices.min() < 0:
    raise ValueError(f"--samples must be non-negative indices, got {config.samples}")
  features = common.extract_features(gen, config, layer, indices)
  grid = features.shape[1:3]
  steps = config.refine_steps
  variants = [("global", factors.parts),
              ("refined, full Gram", pj.refine(features, factors.appearances, factors.parts,
                                               steps=steps)),
              (f"refined, {config.knn}-NN", pj.refine(features, factors.appearances,
                                                      factors.parts, k=config.knn,
                                                      steps=steps))]
  samples = common.images(gen, config, indices)
  scale = float(np.linalg.norm(factors.parts))
  metrics = dict(layer=layer, generator=config.generator, samples=indices, knn=config.knn,
                 steps=steps,
                 relative_change={name: float(np.mean(np.linalg.norm(
                     np.asarray(p) - np.asarray(factors.parts), axis=(-2, -1)))) / scale
                                  for name, p in variants[1:]})
  if samples.labels is not None:
    metrics["part_iou"] = {}
    for name, parts in variants:
      best, _, _ = parts_eval.best_part_iou(parts, samples.labels, len(samples.label_names),
                                            grid)
      metrics["part_iou"][name] = dict(zip(samples.label_names, np.asarray(best).tolist()))
  if common.is_writer():
    figures.parts_grid(samples.rgb, variants, grid, os.path.join(out, "refine.png"))
  return common.write_metrics(out, metrics)


main = common.launch(run, NAMES)

if __name__ == "__main__":
  app.run(main)
