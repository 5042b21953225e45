"""The launchers' options: one table of shared flags, and each launcher's `SPEC`.

A launcher declares `SPEC = options.spec(*shared names, **own Flags)`; `cli.main`
defines those absl flags when the launcher runs (never at import, so any number
of launchers can be imported in one process), and `make_config(SPEC, **overrides)`
builds the same config from the defaults for tests, which call `run(config)`.
"""

from __future__ import annotations

import types
from typing import Any, NamedTuple


class Flag(NamedTuple):
  """One command-line option: absl's `DEFINE_<kind>(name, default, help)`."""

  kind: str  # "string", "integer", "float", "bool", "list" or "multi_string"
  default: Any
  help: str


_SHARED = {
  "generator": Flag(
    "string",
    "toyfaces",
    "A converted checkpoint directory (written by "
    "`python -m converters`) or the name of an embedded generator.",
  ),
  "layer": Flag(
    "integer",
    None,
    "Layer of the feature maps (default: the deepest layer whose feature maps are at most 16x16).",
  ),
  "out": Flag("string", None, "Output directory: PNGs, metrics.json, checkpoints."),
  "seed": Flag("integer", 0, "Seed of the samples and of the decomposition."),
  "num_samples": Flag("integer", 256, "Samples the factors are learnt (or ranked) on."),
  "batch_size": Flag("integer", 64, "Samples per generator call."),
  "truncation_psi": Flag("float", 1.0, "Truncation of the latents."),
  "rank_c": Flag("integer", 8, "Number of appearances R_C."),
  "rank_s": Flag("integer", 8, "Number of parts R_S."),
  "steps": Flag(
    "integer",
    200,
    "Steps of Algorithm 1 in total (a rerun with more steps continues from OUT/checkpoints).",
  ),
  "parts_init": Flag(
    "string",
    "kmeans",
    "Start of the parts: 'kmeans' (positions, "
    "Section 4.1), 'fibres' (where each kind of fibre lives) or 'uniform' "
    "(the paper's U(0, 0.01)).",
  ),
  "checkpoint_every": Flag("integer", 50, "Steps between checkpoints."),
  "factors": Flag(
    "string",
    None,
    "A `decompose` output directory; without it, the "
    "launcher decomposes into OUT/decompose (resumed when already there).",
  ),
  "num_show": Flag("integer", 6, "Samples 0..num_show-1 are the ones shown and edited."),
  "part": Flag("string", "0", "A part index, or indices joined by '+' (their union)."),
  "appearance": Flag("integer", 0, "An appearance (concept) index j."),
  "alpha": Flag("float", 3.0, "Edit strength (see --relative_alpha)."),
  "relative_alpha": Flag(
    "bool",
    True,
    "Alpha in units of the mean norm of a feature "
    "fibre (so one value suits any generator and layer); else absolute.",
  ),
  "image": Flag(
    "string",
    None,
    "A PNG to invert (the generator's image size and channels: RGB for an RGB generator).",
  ),
  "feature_steps": Flag(
    "integer",
    100,
    "Inversion: steps fine-tuning the features at --layer after the latents (0: latents only).",
  ),
  "structure_weight": Flag(
    "float",
    1.0,
    "Inversion: weight of the Laplacian-pyramid L1 "
    "term beside the pixel MSE in the latent stage (0: pixels only).",
  ),
  "feature_structure_weight": Flag(
    "float", 0.0, "Inversion: the same weight in the feature stage."
  ),
  "tie_layers": Flag(
    "bool",
    False,
    "Inversion: one W code per image for StyleGANs (W) instead of one per layer (W+).",
  ),
  "coordinator_address": Flag("string", None, "HOST:PORT of process 0 (multi-process)."),
  "num_processes": Flag("integer", None, "Number of processes (multi-process)."),
  "process_id": Flag("integer", None, "Index of this process (multi-process)."),
}

DISTRIBUTED = ("coordinator_address", "num_processes", "process_id")
SAMPLING = (
  "generator",
  "layer",
  "out",
  "seed",
  "num_samples",
  "batch_size",
  "truncation_psi",
) + DISTRIBUTED
DECOMPOSITION = ("rank_c", "rank_s", "steps", "parts_init", "checkpoint_every")
# The options of every launcher that works from factors (decompose's, plus where
# the factors come from and how many samples to show).
WITH_FACTORS = SAMPLING + DECOMPOSITION + ("factors", "num_show")
# How a real image is inverted (`pj.invert`; `plumbing.real_images`).
INVERSION = ("image", "feature_steps", "structure_weight", "feature_structure_weight", "tie_layers")
# The ROIR protocol's own options (`experiments.evaluate`, `experiments.evaluate_real`).
ROIR_PROTOCOL = dict(
  threshold=Flag(
    "float",
    0.1,
    "Minimum mean RMS change inside the ROI (image range [-1, 1]) "
    "of an edit to be selectable; the same for every method.",
  ),
  min_roi_pixels=Flag("integer", 4, "Samples whose ROI has fewer pixels are left out of its ROIR."),
  strengths=Flag("list", ["2", "5"], "Edit strengths in standard deviations (both signs)."),
)


def spec(*names: str, **own: Flag) -> dict:
  """A launcher's options: shared ones by name, plus its own `Flag`s."""
  clash = sorted(set(own) & set(_SHARED))
  if clash:
    raise ValueError(f"options {clash} are shared ones: name them instead (or `replace` them)")
  return {**{name: _SHARED[name] for name in names}, **own}


def replace(options: dict, **changes: dict) -> dict:
  """`options` with some `Flag`s given another default or help, e.g. a launcher whose
  `--out` is a file: `replace(SPEC, out=dict(help="The JSON file written."))`."""
  unknown = sorted(set(changes) - set(options))
  if unknown:
    raise ValueError(f"options {unknown} are not in this spec")
  return {name: flag._replace(**changes.get(name, {})) for name, flag in options.items()}


def make_config(options: dict, **overrides) -> types.SimpleNamespace:
  """The `options` (a `spec`) at their defaults, with `overrides` (unknown names raise)."""
  unknown = sorted(set(overrides) - set(options))
  if unknown:
    raise ValueError(f"unknown options {unknown}; this launcher takes {sorted(options)}")
  values = {name: flag.default for name, flag in options.items()}
  values.update(overrides)
  return types.SimpleNamespace(**values)


def subconfig(config, options: dict, **overrides) -> types.SimpleNamespace:
  """The `options` taken from `config` where it has them, with `overrides`."""
  values = {n: getattr(config, n) for n in options if hasattr(config, n)}
  values.update(overrides)
  return make_config(options, **values)


def parse_part(text: str):
  """`"3"` -> 3, `"1+2"` -> [1, 2] (a union of parts); anything else raises."""
  try:
    values = [int(t) for t in text.split("+")]
  except ValueError:
    raise ValueError(f"a part must be an integer or integers joined by '+', got {text!r}") from None
  return values[0] if len(values) == 1 else values
