"""Refinement on samples that are not aligned: toy-faces IoU and speed (issue 12).

    python -m experiments.refine_benchmark --out=/tmp/refine_benchmark.json

Toy faces: `panda_jax.unaligned.toyfaces_refinement` at each of `--layers`.
Speed (`speed`): seconds of one compiled run and XLA's temporary memory of
`pj.refine` on random features, 64 samples at 32x32 and 8 samples at 128x128
(with and without the mutual-kNN graph).
"""

from __future__ import annotations

import json
import time

import jax

import panda_jax as pj
from experiments.plumbing import cli
from experiments.plumbing import options
from panda_jax import generators
from panda_jax import json_io
from panda_jax import refinement
from panda_jax import unaligned

SPEC = options.replace(
  options.spec(
    "out",
    "generator",
    layers=options.Flag("list", ["3", "5"], "Toy-faces layers measured (8x8 and 16x16)."),
    knn=options.Flag("integer", 8, "k of the mutual-kNN graph in the 128x128 speed run."),
    knn_steps=options.Flag("integer", 10, "Eq. (10) steps after the translation in the kNN run."),
    toyfaces=options.Flag("bool", True, "Measure toy faces (needs the generator)."),
  ),
  out=dict(help="The JSON file written."),
  generator=dict(help="The toy-faces generator (a directory or name)."),
)


def speed(
  num_samples: int,
  side: int,
  *,
  channels: int = 64,
  rank_c: int = 16,
  rank_s: int = 8,
  k=None,
  seed: int = 0,
  **refine_options,
) -> dict:
  """`pj.refine` on random features: seconds of one compiled run, compile
  seconds and XLA's temporary bytes."""
  key_z, key_p = jax.random.split(jax.random.PRNGKey(seed))
  z = jax.random.normal(key_z, (num_samples, side, side, channels))
  a = pj.hosvd_init(z, rank_c)
  p = jax.random.uniform(key_p, (side * side, rank_s))
  start = time.perf_counter()
  compiled, args, static = refinement.compile_refine(z, a, p, k=k, **refine_options)
  compile_seconds = time.perf_counter() - start
  start = time.perf_counter()
  jax.block_until_ready(compiled(*args))
  seconds = time.perf_counter() - start
  return dict(
    num_samples=num_samples,
    side=side,
    channels=channels,
    rank_c=rank_c,
    rank_s=rank_s,
    k=k,
    method=static["method"],
    steps=int(args[3]),
    tol=static["tol"],
    seconds=seconds,
    compile_seconds=compile_seconds,
    temp_bytes=int(compiled.memory_analysis().temp_size_in_bytes),
  )


def run(config) -> dict:
  """Measures; writes the JSON to `--out` and returns it."""
  if not config.out:
    raise ValueError("--out is required (the JSON file written)")
  result = dict(
    device=str(jax.devices()[0]),
    jax=jax.__version__,
    speed=[
      speed(64, 32),
      speed(64, 32, method="paper"),
      speed(8, 128),
      speed(8, 128, k=config.knn, steps=config.knn_steps),
    ],
  )
  if config.toyfaces:
    gen = generators.load(config.generator)
    result["toyfaces"] = [unaligned.toyfaces_refinement(gen, int(l)) for l in config.layers]
  json_io.write_json(config.out, result)
  print(json.dumps(result, indent=1))
  return result


if __name__ == "__main__":
  cli.main(run, SPEC, stoppable=False)
