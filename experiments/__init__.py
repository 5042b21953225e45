"""Launchers (absl flags): `python -m experiments.<name> --out=DIR ...`.

decompose, edit, localize, remove, rewrite, rank, refine: each is a short `main`
around `run(config) -> metrics`, writing PNGs and `metrics.json` into `--out`.
"""
