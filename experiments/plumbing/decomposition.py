"""Where a launcher's factors come from: `--factors`, or a decomposition it runs itself.

`decompose(config)` is Algorithm 1 on the generator's features as
`experiments.decompose` runs it (checkpointed, resumable, stoppable by SIGTERM),
writing `OUT/factors/`, `OUT/parts.png` and `OUT/metrics.json`; `factors_for`
loads a decomposition given by `--factors` (`panda_jax.runs`) or runs one into
`OUT/decompose`.
"""

from __future__ import annotations

import os
import shutil
import time

import numpy as np

import panda_jax as pj
from experiments.plumbing import cli
from experiments.plumbing import distributed
from experiments.plumbing import options
from experiments.plumbing import outputs
from experiments.plumbing import sampling
from panda_jax import checks
from panda_jax import generator_ops
from panda_jax import parts_eval
from panda_jax import runs
from panda_jax import viz
from panda_jax.data import toyfaces

SPEC = options.spec(
  *options.SAMPLING,
  *options.DECOMPOSITION,
  "num_show",
  num_eval=options.Flag(
    "integer",
    64,
    "Samples the parts are scored on against ground-truth labels (when the generator has them).",
  ),
  features_in_step=options.Flag(
    "integer",
    0,
    "Samples per device that each step of the fit draws from the "
    "generator inside the compiled step (pj.DeviceSampler: a fresh batch every step, "
    "no dataset stored; for features that do not fit in memory). 0: one fixed batch "
    "of --num_samples (the paper's full-batch fit).",
  ),
)


def label_iou(factors, grid, samples: toyfaces.Samples) -> dict:
  """Each ground-truth label's best part and IoU over `samples` (needs labels).

  `part_iou_bound` is the best IoU any fixed region reaches on these samples
  (`parts_eval.fixed_region_bound`): global parts cannot do better.
  """
  num = len(samples.label_names)
  best, match, _ = parts_eval.best_part_iou(factors.parts, samples.labels, num, grid)
  bound = parts_eval.fixed_region_bound(samples.labels, num)
  return {
    name: dict(zip(samples.label_names, np.asarray(values).tolist()))
    for name, values in (("part_iou", best), ("part_match", match), ("part_iou_bound", bound))
  }


def decompose(config):
  """Runs (or resumes) the decomposition of `SPEC`'s config: `(factors, layer, metrics)`."""
  gen = sampling.load_generator(config.generator)
  layer = sampling.resolve_layer(gen, config.layer)
  h, w, c = sampling.feature_shape(gen, layer)
  checks.check_ranks(h * w, c, config.rank_c, config.rank_s)
  out = outputs.output_dir(config.out)  # Only once the flags are known to be good.
  start = time.time()
  if config.features_in_step:
    features = generator_ops.feature_sampler(
      gen, layer, config.features_in_step, truncation_psi=config.truncation_psi
    )
  else:
    features = sampling.extract_features(
      gen, config, layer, distributed.local_indices(config.num_samples)
    ).block_until_ready()
  features_seconds = time.time() - start
  factors = pj.fit(
    features,
    config.rank_c,
    config.rank_s,
    steps=config.steps,
    key=generator_ops.seed_keys(config.seed)[1],
    parts_init=config.parts_init,
    checkpoint_dir=os.path.join(out, "checkpoints"),
    checkpoint_every=config.checkpoint_every,
    stop=cli.stop_requested,
  )
  if factors.steps < config.steps:
    raise cli.Stopped(
      f"at step {factors.steps} of {config.steps}, checkpointed in {out}/checkpoints: "
      "rerun the same command to resume"
    )
  seconds = time.time() - start
  metrics = dict(
    final_loss=float(factors.loss_history[-1]) if config.steps else None,
    steps=factors.steps,
    seconds=seconds,  # features + fit, compilation included
    features_seconds=features_seconds,
    fit_seconds=seconds - features_seconds,
    layer=layer,
    feature_shape=[h, w, c],
    generator=config.generator,
    arch=gen.arch,
    num_samples=config.num_samples,
    rank_c=config.rank_c,
    rank_s=config.rank_s,
    seed=config.seed,
    parts_init=config.parts_init,
    features_in_step=config.features_in_step,
    truncation_psi=config.truncation_psi,
    step_size_parts=factors.step_size_parts,
    step_size_appearances=factors.step_size_appearances,
    orthogonality_error=factors.orthogonality_error,  # max |A^T A - I|
    loss_history=factors.loss_history,
  )
  shown = sampling.images(gen, config, np.arange(min(config.num_show, config.num_samples)))
  if shown.labels is not None:
    evaluated = sampling.images(gen, config, np.arange(config.num_eval))
    metrics.update(label_iou(factors, (h, w), evaluated), num_eval=config.num_eval)
  target = os.path.join(out, "factors")
  if distributed.is_writer():
    shutil.rmtree(target, ignore_errors=True)
  distributed.barrier("factors")
  factors = factors._replace(layer=layer, generator=config.generator)  # Where they apply.
  pj.save_factors(target, factors)  # orbax: every process takes part, process 0 writes.
  if distributed.is_writer():
    viz.plot_parts_grid(
      shown.rgb,
      [("argmax part", factors.parts)],
      (h, w),
      os.path.join(out, "parts.png"),
      heatmaps=np.asarray(factors.parts),
    )
  return factors, layer, outputs.write_metrics(out, metrics)


def factors_for(config, gen):
  """`(factors, layer)`: from `--factors`, or a decomposition into OUT/decompose."""
  if not config.factors:
    sub = options.subconfig(config, SPEC, out=os.path.join(config.out, "decompose"))
    factors, layer, _ = decompose(sub)
    return factors, layer
  factors, record = runs.load_decomposition(config.factors)
  layer = record["layer"] if factors.layer is None else factors.layer  # None: saved before
  if config.layer is not None and config.layer != layer:  # factors kept it.
    raise ValueError(
      f"--layer={config.layer} but the factors in {config.factors} were learnt at layer {layer}"
    )
  h, w, c = sampling.feature_shape(gen, layer)
  if factors.appearances.shape[0] != c or factors.parts.shape[0] != h * w:
    raise ValueError(
      f"the factors in {config.factors} do not fit {config.generator} at "
      f"layer {layer} (features {h}x{w}x{c})"
    )
  return factors, layer
