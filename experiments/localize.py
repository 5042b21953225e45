"""Saliency maps and unsupervised localisation masks of the concepts (Sec. 5.1.2).

    python -m experiments.localize --factors=/tmp/panda --concepts=0,1,2 --out=...

The saliency map of concept k is `m_ik = a_k^T Z_i` at every position, its mask
`m_ik >= mu_k` with mu_k the mean over `--num_samples` samples (streamed).
Writes `saliency.png` (each sample, then map and mask of every concept shown),
`masks.npy` (bool `[num_show, h, w, r_c]`) and metrics.json: mu, the fraction of
positions in each concept's mask and, with ground-truth labels, the label each
concept's mask overlaps best and their IoU (masks upsampled to the image).
"""

from __future__ import annotations

import os

import numpy as np

import panda_jax as pj
from experiments.plumbing import cli
from experiments.plumbing import decomposition
from experiments.plumbing import distributed
from experiments.plumbing import options
from experiments.plumbing import outputs
from experiments.plumbing import sampling
from panda_jax import generator_ops
from panda_jax import parts_eval
from panda_jax import viz
from panda_jax.data import toyfaces

SPEC = options.spec(
  *options.WITH_FACTORS,
  concepts=options.Flag("list", ["0", "1", "2", "3"], "Concepts (appearance indices) drawn."),
)


def run(config) -> dict:
  """Localises the concepts; returns the metrics written to `OUT/metrics.json`."""
  out = outputs.output_dir(config.out)
  gen = sampling.load_generator(config.generator)
  factors, layer = decomposition.factors_for(config, gen)
  r_c = factors.appearances.shape[1]
  concepts = [int(k) for k in config.concepts]
  if not concepts or not all(0 <= k < r_c for k in concepts):
    raise ValueError(f"--concepts must be indices in [0, {r_c - 1}], got {config.concepts}")
  mu = pj.concept_means(
    sampling.batches(gen, config, np.arange(config.num_samples), layer, "concept means"),
    factors.appearances,
  )
  lat = sampling.latents(gen, config, np.arange(config.num_show))
  images, maps, upsampled = generator_ops.saliency_images(
    gen, lat, layer, factors.appearances, method="nearest"
  )
  samples = toyfaces.split_labels(images)
  h, w, _ = sampling.feature_shape(gen, layer)
  masks = np.asarray(pj.localise(maps, mu))  # [n, s, r_c]
  metrics = dict(
    layer=layer,
    generator=config.generator,
    mu=mu,
    coverage=masks.mean(axis=(0, 1)),
    concepts=concepts,
  )
  if samples.labels is not None:
    iou = np.asarray(
      parts_eval.iou_matrix(pj.localise(upsampled, mu), samples.labels, len(samples.label_names))
    )  # [L, r_c]
    metrics["concept_label_iou"] = {
      str(k): dict(label=samples.label_names[int(np.argmax(iou[:, k]))], iou=float(iou[:, k].max()))
      for k in range(r_c)
    }
  if distributed.is_writer():
    viz.plot_saliency(
      samples.rgb, maps, mu, os.path.join(out, "saliency.png"), concepts=concepts, grid=(h, w)
    )
    np.save(os.path.join(out, "masks.npy"), np.reshape(masks, (-1, h, w, r_c)))
  return outputs.write_metrics(out, metrics)


if __name__ == "__main__":
  cli.main(run, SPEC)
