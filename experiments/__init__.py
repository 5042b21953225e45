"""Launchers: `python -m experiments.<name> --out=... ...`, each listed in `LAUNCHERS`.

Every launcher but the three benchmarks is a short module around one
`run(config)` (the metrics it wrote, usually `OUT/metrics.json`) with its options
in `SPEC`: `plumbing.cli.main(run, SPEC)` defines their absl flags when it runs
(never at import), and tests build a config with
`plumbing.options.make_config(SPEC, **overrides)`. The benchmarks
(`benchmark`, `generator_benchmark`, `scaling_benchmark`) define their own absl
flags under `__main__` only, so importing them defines none either.
`plumbing/` holds what the launchers share; `torch_worker` is the benchmarks'
PyTorch process. WORKSPACE.md lists what each launcher writes.
"""

LAUNCHERS = (
  "decompose",
  "edit",
  "localize",
  "remove",
  "rewrite",
  "rank",
  "refine",
  "invert",
  "evaluate",
  "evaluate_real",
  "explore",
  "gallery",
  "train_toy_gan",
  "refine_benchmark",
  "benchmark",
  "generator_benchmark",
  "scaling_benchmark",
)
