"""Refinement on samples that are not aligned: toy-faces IoU and speed (issue 12).

    python -m experiments.refine_benchmark --out=/tmp/refine_benchmark.json

Toy faces: `unaligned.toyfaces_refinement` at each of `--layers`. Speed
(`speed`): seconds of one compiled run and XLA's temporary memory of
`pj.refine` on random features, 64 samples at 32x32 and 8 samples at 128x128
(with and without the mutual-kNN graph).
"""
from __future__ import annotations

import json
import os
import time

from absl import app
from absl import flags
import jax

import panda_jax as pj
from experiments import unaligned
from panda_jax import generators
from panda_jax import refinement


def speed(num_samples: int, side: int, *, channels: int = 64, rank_c: int = 16, rank_s: int = 8,
          k=None, seed: int = 0, **refine_options) -> dict:
  """`pj.refine` on random features: seconds of one compiled run, compile
  seconds and XLA's temporary bytes."""
  key_z, key_p = jax.random.split(jax.random.PRNGKey(seed))
  z = jax.random.normal(key_z, (num_samples, side, side, channels))
  a = pj.hosvd_init(z, rank_c)
  p = jax.random.uniform(key_p, (side * side, rank_s))
  args, options, _ = refinement.arguments(z, a, p, k=k, **refine_options)
  start = time.perf_counter()
  compiled = refinement._jit_refine.lower(*args, **options).compile()
  compile_seconds = time.perf_counter() - start
  start = time.perf_counter()
  jax.block_until_ready(compiled(*args))
  seconds = time.perf_counter() - start
  return dict(num_samples=num_samples, side=side, channels=channels, rank_c=rank_c,
              rank_s=rank_s, k=k, method=options["method"], steps=int(args[3]),
              tol=options["tol"], seconds=seconds, compile_seconds=compile_seconds,
              temp_bytes=int(compiled.memory_analysis().temp_size_in_bytes))


FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "The JSON file written.", required=False)
flags.DEFINE_string("generator", "toyfaces", "The toy-faces generator (a directory or name).")
flags.DEFINE_list("layers", ["3", "5"], "Toy-faces layers measured (8x8 and 16x16).")
flags.DEFINE_integer("knn", 8, "k of the mutual-kNN graph in the 128x128 speed run.")
flags.DEFINE_integer("knn_steps", 10, "Eq. (10) steps after the translation in the kNN run.")
flags.DEFINE_bool("toyfaces", True, "Measure toy faces (needs the generator).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.out:
    raise app.UsageError("--out is required")
  result = dict(device=str(jax.devices()[0]), jax=jax.__version__,
                speed=[speed(64, 32), speed(64, 32, method="paper"), speed(8, 128),
                       speed(8, 128, k=FLAGS.knn, steps=FLAGS.knn_steps)])
  if FLAGS.toyfaces:
    gen = generators.load(FLAGS.generator)
    result["toyfaces"] = [unaligned.toyfaces_refinement(gen, int(l)) for l in FLAGS.layers]
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  with open(FLAGS.out, "w") as f:
    json.dump(result, f, indent=1)
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  app.run(main)
