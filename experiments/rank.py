"""Global and part-based ranking of samples by a concept (Sec. 5.6, Eqs. 17-18).

    python -m experiments.rank --factors=/tmp/panda --appearance=3 --part=2 --out=...

Streams `--num_samples` samples once and keeps the `--top_k` highest and lowest
scores of `r_ij = a_j^T Z_i 1` (Eq. 17, global) and of `r_ijk = a_j^T Z_i p_k`
(Eq. 18, at the part; a union 'k+l' sums the parts). Writes `rank_global.png`
and `rank_part.png` (top and bottom strips) and metrics.json (the sample
indices and scores; `plumbing.sampling.latents` regenerates any sample from its index).
"""

from __future__ import annotations

import os

import jax
import numpy as np

import panda_jax as pj
from experiments.plumbing import cli
from experiments.plumbing import decomposition
from experiments.plumbing import distributed
from experiments.plumbing import options
from experiments.plumbing import outputs
from experiments.plumbing import sampling
from panda_jax import viz

SPEC = options.spec(
  *options.WITH_FACTORS,
  "appearance",
  "part",
  top_k=options.Flag("integer", 6, "Samples in each of the top and bottom strips."),
)


def _strip(gen, config, ranking: pj.Ranking, path: str) -> dict:
  if distributed.is_writer():
    top = sampling.images(gen, config, ranking.top_index).rgb
    bottom = sampling.images(gen, config, ranking.bottom_index).rgb
    viz.plot_ranking(
      top, bottom, path, top_scores=ranking.top_scores, bottom_scores=ranking.bottom_scores
    )
  return ranking._asdict()


def run(config) -> dict:
  """Ranks; returns the metrics written to `OUT/metrics.json`."""
  out = outputs.output_dir(config.out)
  gen = sampling.load_generator(config.generator)
  factors, layer = decomposition.factors_for(config, gen)
  part = options.parse_part(config.part)
  columns = [part] if isinstance(part, int) else part
  for k in columns:
    if not 0 <= k < factors.parts.shape[1]:
      raise ValueError(f"--part {k} is not in [0, {factors.parts.shape[1] - 1}]")
  weights = factors.parts[:, np.asarray(columns)].sum(axis=1)  # [s]
  update = jax.jit(pj.rank_update)
  states = [pj.rank_init(config.top_k), pj.rank_init(config.top_k)]
  for batch in sampling.batches(gen, config, np.arange(config.num_samples), layer, "ranking"):
    for t, where in enumerate((None, weights)):
      states[t] = update(states[t], pj.rank(batch, factors.appearances, config.appearance, where))
  glob, local = (pj.rank_finalize(s) for s in states)
  return outputs.write_metrics(
    out,
    dict(
      layer=layer,
      generator=config.generator,
      appearance=config.appearance,
      part=part,
      num_samples=config.num_samples,
      global_ranking=_strip(gen, config, glob, os.path.join(out, "rank_global.png")),
      part_ranking=_strip(gen, config, local, os.path.join(out, "rank_part.png")),
    ),
  )


if __name__ == "__main__":
  cli.main(run, SPEC)
