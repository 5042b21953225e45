"""Global parts against per-sample refined parts (Sec. 4.2, Eqs. 10-12, Algorithm 2).

    python -m experiments.refine --factors=/tmp/panda --knn=8 --samples=0,1,2,3 --out=...

Refines the global parts on each chosen sample by `--refine_steps` steps of
Eq. (10) with the full Gram matrix (the ICLR refinement) and with the
mutual-kNN graph (Algorithm 2), both as published (`method="paper"`), and by
`pj.refine`'s default (the global parts translated onto the sample). With
`--shift > 0` the same samples are also made unaligned: each feature map is
rolled by a random offset of up to `--shift` of the side (the carry follows)
and the image regenerated; the oracle, the global parts rolled by the known
offset, is drawn beside the refinements. Writes `refine.png` (per sample: the
image, then the argmax part of each variant), `refine_shifted.png` and
metrics.json: the mean relative change of the parts and, with ground-truth
labels, each label's best-part IoU for every variant (`shifted`: on the
unaligned samples, with the offsets).
"""
from __future__ import annotations

import os

import jax
import numpy as np

import panda_jax as pj
from experiments import common
from experiments import decompose
from experiments import figures
from experiments import unaligned
from panda_jax import parts_eval

_OFFSETS = 2**31 - 1  # fold_in tag of the offsets' random stream (not a sample index).

SPEC = common.spec(
    *common.WITH_FACTORS,
    samples=common.Flag("list", ["0", "1", "2", "3"], "Indices of the samples refined."),
    knn=common.Flag("integer", 8, "Neighbours k of the mutual-kNN graph."),
    refine_steps=common.Flag("integer", 50, "Projected gradient steps of the refinement."),
    shift=common.Flag("float", 0.25, "Also roll each sample's feature map by a random offset "
                      "of up to this fraction of the side, and draw the oracle (0: off)."))


def _variants(features, factors, config) -> list:
  """`(name, parts)` of the global parts and of every refinement of `features`."""
  a, p = factors.appearances, factors.parts
  steps = config.refine_steps
  return [("global", p),
          ("full Gram", pj.refine(features, a, p, method="paper", steps=steps)),
          (f"{config.knn}-NN", pj.refine(features, a, p, method="paper", k=config.knn,
                                          steps=steps)),
          ("translated", pj.refine(features, a, p))]


def _scores(variants, samples, start, grid) -> dict:
  """Relative change from the global parts and, with labels, best-part IoUs."""
  start = np.asarray(start)
  out = dict(relative_change={
      name: float(np.mean(np.linalg.norm(np.asarray(q) - start, axis=(-2, -1)))
                  / np.linalg.norm(start)) for name, q in variants[1:]})
  if samples.labels is not None:
    out["part_iou"] = {}
    for name, parts in variants:
      best, _, _ = parts_eval.best_part_iou(parts, samples.labels, len(samples.label_names),
                                            grid)
      out["part_iou"][name] = dict(zip(samples.label_names, np.asarray(best).tolist()))
  return out


def run(config) -> dict:
  """Refines; returns the metrics written to `OUT/metrics.json`."""
  out = common.output_dir(config.out)
  gen = common.load_generator(config.generator)
  factors, layer = decompose.factors_for(config, gen)
  indices = np.asarray([int(i) for i in config.samples])
  if indices.size == 0 or indices.min() < 0:
    raise ValueError(f"--samples must be non-negative indices, got {config.samples}")
  if not 0 <= config.shift <= 0.5:
    raise ValueError(f"--shift must be a fraction of the side in [0, 0.5], got {config.shift}")
  features = common.extract_features(gen, config, layer, indices)
  grid = features.shape[1:3]
  variants = _variants(features, factors, config)
  samples = common.images(gen, config, indices)
  metrics = dict(layer=layer, generator=config.generator, samples=indices, knn=config.knn,
                 steps=config.refine_steps, **_scores(variants, samples, factors.parts, grid))
  if common.is_writer():
    figures.parts_grid(samples.rgb, variants, grid, os.path.join(out, "refine.png"))
  if config.shift > 0:
    lat = common.latents(gen, config, indices)
    x, carry = gen.split(lat, layer)
    key = jax.random.fold_in(common.keys(config.seed)[0], _OFFSETS)
    offsets = unaligned.random_offsets(key, len(indices), grid, config.shift)
    moved, moved_carry = unaligned.move(x, carry, offsets)
    shifted = common.split_labels(gen.resume(moved, moved_carry, lat, layer))
    variants = _variants(moved, factors, config) + [
        ("oracle", unaligned.roll_parts(factors.parts, offsets, grid))]
    metrics["shifted"] = dict(shift=config.shift, offsets=np.asarray(offsets),
                              **_scores(variants, shifted, factors.parts, grid))
    if common.is_writer():
      figures.parts_grid(shifted.rgb, variants, grid, os.path.join(out, "refine_shifted.png"))
  return common.write_metrics(out, metrics)


if __name__ == "__main__":
  common.main(run, SPEC)
