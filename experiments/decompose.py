"""Learns the parts and appearances of a generator's feature maps (Algorithm 1).

    python -m experiments.decompose --out=/tmp/panda     # the embedded toy faces
    python -m experiments.decompose --generator=CONVERTED_DIR --layer=5 --out=...

Writes `OUT/factors/` (`pj.save_factors`), `OUT/parts.png` (the argmax part over
the first `--num_show` samples, and a heat map of every part) and
`OUT/metrics.json` (final_loss, steps, seconds, layer, feature_shape,
orthogonality_error = max |A^T A - I|, ...). With `--features_in_step=M` each
step draws M fresh samples per device inside the compiled step (nothing
stored; final_loss is then that of the last step's batch). The
running fit is checkpointed in `OUT/checkpoints`: rerunning the same command, or
with more `--steps`, continues from there. When the generator's images carry
ground-truth labels (toy faces), metrics.json also holds every label's best
matching part and its IoU (`panda_jax.parts_eval.best_part_iou`), and the best
IoU any fixed region could reach (`part_iou_bound`).
"""
from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np

import panda_jax as pj
from experiments import common
from experiments import figures
from panda_jax import _checks
from panda_jax import parts_eval

SPEC = common.spec(*common.SAMPLING, *common.DECOMPOSITION, "num_show", num_eval=common.Flag(
    "integer", 64, "Samples the parts are scored on against ground-truth labels (when the "
    "generator has them)."), features_in_step=common.Flag(
        "integer", 0, "Samples per device that each step of the fit draws from the generator "
        "inside the compiled step (pj.DeviceSampler: a fresh batch every step, no dataset "
        "stored; for features that do not fit in memory). 0: one fixed batch of "
        "--num_samples (the paper's full-batch fit)."))


def label_iou(factors, grid, samples: common.Samples) -> dict:
  """Each ground-truth label's best part and IoU over `samples` (needs labels).

  `part_iou_bound` is the best IoU any fixed region reaches on these samples
  (`parts_eval.fixed_region_bound`): global parts cannot do better.
  """
  num = len(samples.label_names)
  best, match, _ = parts_eval.best_part_iou(factors.parts, samples.labels, num, grid)
  bound = parts_eval.fixed_region_bound(samples.labels, num)
  return {name: dict(zip(samples.label_names, np.asarray(values).tolist()))
          for name, values in (("part_iou", best), ("part_match", match),
                               ("part_iou_bound", bound))}


def decompose(config):
  """Runs (or resumes) the decomposition: `(factors, layer, metrics)`."""
  gen = common.load_generator(config.generator)
  layer = common.resolve_layer(gen, config.layer)
  h, w, c = common.feature_shape(gen, layer)
  _checks.check_ranks(h * w, c, config.rank_c, config.rank_s)
  out = common.output_dir(config.out)  # Only once the flags are known to be good.
  start = time.time()
  if config.features_in_step:
    features = pj.generator_ops.feature_sampler(gen, layer, config.features_in_step,
                                                truncation_psi=config.truncation_psi)
  else:
    features = common.extract_features(gen, config, layer,
                                       common.local_indices(config.num_samples))
  factors = pj.fit(features, config.rank_c, config.rank_s, steps=config.steps,
                   key=common.keys(config.seed)[1], parts_init=config.parts_init,
                   checkpoint_dir=os.path.join(out, "checkpoints"),
                   checkpoint_every=config.checkpoint_every, stop=common.stop_requested)
  if factors.steps < config.steps:
    raise common.Stopped(
        f"at step {factors.steps} of {config.steps}, checkpointed in {out}/checkpoints: "
        "rerun the same command to resume")
  seconds = time.time() - start
  metrics = dict(final_loss=float(factors.loss_history[-1]) if config.steps else None,
                 steps=factors.steps, seconds=seconds, layer=layer, feature_shape=[h, w, c],
                 generator=config.generator, arch=gen.arch, num_samples=config.num_samples,
                 rank_c=config.rank_c, rank_s=config.rank_s, seed=config.seed,
                 parts_init=config.parts_init, features_in_step=config.features_in_step,
                 truncation_psi=config.truncation_psi,
                 step_size_parts=factors.step_size_parts,
                 step_size_appearances=factors.step_size_appearances,
                 orthogonality_error=factors.orthogonality_error,  # max |A^T A - I|
                 loss_history=factors.loss_history)
  shown = common.images(gen, config, np.arange(min(config.num_show, config.num_samples)))
  if shown.labels is not None:
    evaluated = common.images(gen, config, np.arange(config.num_eval))
    metrics.update(label_iou(factors, (h, w), evaluated), num_eval=config.num_eval)
  target = os.path.join(out, "factors")
  if common.is_writer():
    shutil.rmtree(target, ignore_errors=True)
  common.barrier("factors")
  pj.save_factors(target, factors)  # orbax: every process takes part, process 0 writes.
  if common.is_writer():
    figures.parts_grid(shown.rgb, [("argmax part", factors.parts)], (h, w),
                       os.path.join(out, "parts.png"), heatmaps=np.asarray(factors.parts))
  return factors, layer, common.write_metrics(out, metrics)


def run(config) -> dict:
  """Decomposes; returns the metrics written to `OUT/metrics.json`."""
  return decompose(config)[2]


def factors_for(config, gen):
  """`(factors, layer)`: from `--factors`, or a decomposition into OUT/decompose."""
  if not config.factors:
    sub = common.subconfig(config, SPEC, out=os.path.join(config.out, "decompose"))
    factors, layer, _ = decompose(sub)
    return factors, layer
  record = os.path.join(config.factors, "metrics.json")
  if not os.path.isfile(record):
    raise ValueError(f"--factors={config.factors} is not a decompose output directory "
                     "(no metrics.json)")
  with open(record) as f:
    layer = json.load(f)["layer"]
  if config.layer is not None and config.layer != layer:
    raise ValueError(f"--layer={config.layer} but the factors in {config.factors} were "
                     f"learnt at layer {layer}")
  factors = pj.load_factors(os.path.join(config.factors, "factors"))
  h, w, c = common.feature_shape(gen, layer)
  if factors.appearances.shape[0] != c or factors.parts.shape[0] != h * w:
    raise ValueError(f"the factors in {config.factors} do not fit {config.generator} at "
                     f"layer {layer} (features {h}x{w}x{c})")
  return factors, layer


if __name__ == "__main__":
  common.main(run, SPEC)
