"""Launchers: `python -m experiments.<name> --out=... ...`, each listed in `LAUNCHERS`.

Every launcher is a short module around one `run(config)` (the metrics or report
it wrote, usually `OUT/metrics.json`) with its options in `SPEC`:
`plumbing.cli.main(run, SPEC)` defines their absl flags when it runs (never at
import), and tests build a config with
`plumbing.options.make_config(SPEC, **overrides)`.
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
  "time_to_parts",
)
