"""Launchers (absl flags): `python -m experiments.<name> --out=DIR ...`.

decompose, edit, localize, remove, rewrite, rank, refine, invert, evaluate,
evaluate_real, explore, gallery, benchmark, generator_benchmark, refine_benchmark,
scaling_benchmark and train_toy_gan: each is a short `main` around
`run(config) -> metrics`, writing PNGs and `metrics.json` (or a JSON report) into
`--out`. Shared plumbing: `common` (flags, distributed start-up, samples,
outputs), `real_images` (PNG input, checks, inversion with the flags) and
`torch_worker` (the benchmarks' PyTorch process). WORKSPACE.md lists what each one
writes.
"""
