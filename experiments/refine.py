"""Global parts against per-sample refined parts (Sec. 4.2, Eqs. 10-12, Algorithm 2).

    python -m experiments.refine --factors=/tmp/panda --knn=8 --samples=0,1,2,3 --out=...
    python -m experiments.refine --compare --out=...     # the study behind pj.refine's default

Refines the global parts on each chosen sample by `--refine_steps` steps of
Eq. (10) with the full Gram matrix (the ICLR refinement, `pj.refine`'s
default) and with the mutual-kNN graph (Algorithm 2), and by the translation
of the global parts onto the sample (`method="register"`). With
`--shift > 0` the same samples are also made unaligned: each feature map is
rolled by a random offset of up to `--shift` of the side (the carry follows)
and the image regenerated; the oracle, the global parts rolled by the known
offset, is drawn beside the refinements. Writes `refine.png` (per sample: the
image, then the argmax part of each variant), `refine_shifted.png` and
metrics.json: the mean relative change of the parts and, with ground-truth
labels, each label's best-part IoU for every variant (`shifted`: on the
unaligned samples, with the offsets).

`--compare` (needs a generator with ground-truth labels, e.g. the embedded toy
faces) runs `compare` instead: for each of `--compare_layers` and 3 seeds it
fits the factors (`--rank_c`, `--rank_s`, `--steps`, `--num_samples`) and scores
every method on `--compare_samples` samples as generated and rolled by up to a
quarter of the side (`compare.json`).
"""

from __future__ import annotations

import os

import jax
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
from panda_jax import parts_eval
from panda_jax import unaligned
from panda_jax import viz
from panda_jax.data import toyfaces

_OFFSETS = 2**31 - 1  # fold_in tag of the offsets' random stream (not a sample index).

SPEC = options.spec(
  *options.WITH_FACTORS,
  samples=options.Flag("list", ["0", "1", "2", "3"], "Indices of the samples refined."),
  knn=options.Flag("integer", 8, "Neighbours k of the mutual-kNN graph."),
  refine_steps=options.Flag("integer", 50, "Projected gradient steps of the refinement."),
  shift=options.Flag(
    "float",
    0.25,
    "Also roll each sample's feature map by a random offset "
    "of up to this fraction of the side, and draw the oracle (0: off).",
  ),
  compare=options.Flag(
    "bool",
    False,
    "Run the study of the refinement methods (`compare`) instead; --factors is not used.",
  ),
  compare_layers=options.Flag("list", ["5", "3"], "Layers of the --compare study."),
  compare_samples=options.Flag("integer", 128, "Evaluation samples per fit in --compare."),
)

# The methods of the --compare study: `pj.refine` options (None: the global parts).
COMPARED = {
  "global": None,
  "translation, 10% gate (default)": {},
  "translation, ungated": dict(method="register", min_gain=0.0),
  "full Gram, 50 steps (ICLR)": dict(steps=50),
  "16-NN": dict(k=16),
  "8-NN": dict(k=8),
}


def _variants(features, factors, config) -> list:
  """`(name, parts)` of the global parts and of every refinement of `features`."""
  a, p = factors.appearances, factors.parts
  steps = config.refine_steps
  return [
    ("global", p),
    ("full Gram", pj.refine(features, a, p, steps=steps)),
    (f"{config.knn}-NN", pj.refine(features, a, p, k=config.knn, steps=steps)),
    ("translated", pj.refine(features, a, p)),
  ]


def _scores(variants, samples, start, grid) -> dict:
  """Relative change from the global parts and, with labels, best-part IoUs."""
  start = np.asarray(start)
  out = dict(
    relative_change={
      name: float(
        np.mean(np.linalg.norm(np.asarray(q) - start, axis=(-2, -1))) / np.linalg.norm(start)
      )
      for name, q in variants[1:]
    }
  )
  if samples.labels is not None:
    out["part_iou"] = {}
    for name, parts in variants:
      best, _, _ = parts_eval.best_part_iou(parts, samples.labels, len(samples.label_names), grid)
      out["part_iou"][name] = dict(zip(samples.label_names, np.asarray(best).tolist()))
  return out


def compare(
  gen,
  layers,
  *,
  seeds=(0, 1, 2),
  rank_c: int = 8,
  rank_s: int = 8,
  fit_steps: int = 200,
  num_fit: int = 256,
  num_eval: int = 128,
  batch_size: int = 64,
) -> list:
  """Every method of `COMPARED` on samples as generated and rolled (issue 18, item 2).

  Per layer and seed: factors fitted on `num_fit` samples (stream `fold_in(100 +
  seed)`), then per ground-truth part the best part's pooled IoU on `num_eval`
  other samples as generated (`natural`) and rolled by up to a quarter of the
  side with the carry following (`rolled`; `unaligned.move`), and the oracle
  (the global parts rolled by the known offsets).

  Returns:
    one dict per (layer, seed): `{layer, seed, oracle_rolled, methods: {name:
    {natural, rolled (per-part lists), natural_mean, rolled_mean}}}`.
  """
  rows = []
  for layer in layers:
    for seed in seeds:
      fit_key, eval_key, offset_key = jax.random.split(jax.random.PRNGKey(100 + seed), 3)
      feats = jnp.concatenate(
        list(
          generator_ops.sampled_features(
            gen, fit_key, layer, num_samples=num_fit, batch_size=batch_size
          )
        )
      )
      factors = pj.fit(feats, rank_c, rank_s, steps=fit_steps, key=fit_key, progress=False)
      a, p = factors.appearances, factors.parts
      lat = generator_ops.sample_latents(gen, eval_key, np.arange(num_eval))
      x, carry = gen.split(lat, layer)
      grid = tuple(x.shape[1:3])
      offsets = unaligned.random_offsets(offset_key, num_eval, grid)
      moved, moved_carry = unaligned.move(x, carry, offsets)
      cases = {
        "natural": (x, toyfaces.split_labels(gen.resume(x, carry, lat, layer))),
        "rolled": (moved, toyfaces.split_labels(gen.resume(moved, moved_carry, lat, layer))),
      }
      if cases["natural"][1].labels is None:
        raise ValueError(
          "--compare needs a generator whose samples carry ground-truth labels "
          "(e.g. the embedded toyfaces)"
        )
      best = lambda parts, samples: np.asarray(
        parts_eval.best_part_iou(parts, samples.labels, len(samples.label_names), grid)[0]
      )
      methods = {}
      for name, refine_options in COMPARED.items():
        scores = {
          case: best(p if refine_options is None else pj.refine(z, a, p, **refine_options), samples)
          for case, (z, samples) in cases.items()
        }
        methods[name] = {
          **{case: np.round(v, 4).tolist() for case, v in scores.items()},
          **{f"{case}_mean": float(np.mean(v)) for case, v in scores.items()},
        }
      oracle = best(unaligned.roll_parts(p, offsets, grid), cases["rolled"][1])
      rows.append(
        dict(
          layer=int(layer),
          seed=int(seed),
          oracle_rolled=np.round(oracle, 4).tolist(),
          methods=methods,
        )
      )
  return rows


def run(config) -> dict:
  """Refines; returns the metrics written to `OUT/metrics.json`."""
  if config.compare:
    out = outputs.output_dir(config.out)
    gen = sampling.load_generator(config.generator)
    rows = compare(
      gen,
      [int(l) for l in config.compare_layers],
      rank_c=config.rank_c,
      rank_s=config.rank_s,
      fit_steps=config.steps,
      num_fit=config.num_samples,
      num_eval=config.compare_samples,
      batch_size=config.batch_size,
    )
    return outputs.write_metrics(out, dict(generator=config.generator, compare=rows))
  out = outputs.output_dir(config.out)
  gen = sampling.load_generator(config.generator)
  factors, layer = decomposition.factors_for(config, gen)
  indices = np.asarray([int(i) for i in config.samples])
  if indices.size == 0 or indices.min() < 0:
    raise ValueError(f"--samples must be non-negative indices, got {config.samples}")
  if not 0 <= config.shift <= 0.5:
    raise ValueError(f"--shift must be a fraction of the side in [0, 0.5], got {config.shift}")
  features = sampling.extract_features(gen, config, layer, indices)
  grid = features.shape[1:3]
  variants = _variants(features, factors, config)
  samples = sampling.images(gen, config, indices)
  metrics = dict(
    layer=layer,
    generator=config.generator,
    samples=indices,
    knn=config.knn,
    steps=config.refine_steps,
    **_scores(variants, samples, factors.parts, grid),
  )
  if distributed.is_writer():
    viz.plot_parts_grid(samples.rgb, variants, grid, os.path.join(out, "refine.png"))
  if config.shift > 0:
    lat = sampling.latents(gen, config, indices)
    x, carry = gen.split(lat, layer)
    key = jax.random.fold_in(generator_ops.seed_keys(config.seed)[0], _OFFSETS)
    offsets = unaligned.random_offsets(key, len(indices), grid, config.shift)
    moved, moved_carry = unaligned.move(x, carry, offsets)
    shifted = toyfaces.split_labels(gen.resume(moved, moved_carry, lat, layer))
    variants = _variants(moved, factors, config) + [
      ("oracle", unaligned.roll_parts(factors.parts, offsets, grid))
    ]
    metrics["shifted"] = dict(
      shift=config.shift,
      offsets=np.asarray(offsets),
      **_scores(variants, shifted, factors.parts, grid),
    )
    if distributed.is_writer():
      viz.plot_parts_grid(shifted.rgb, variants, grid, os.path.join(out, "refine_shifted.png"))
  return outputs.write_metrics(out, metrics)


if __name__ == "__main__":
  cli.main(run, SPEC)
