"""Quantitative evaluation: part discovery IoU and the locality table (Table 2).

    python -m experiments.evaluate --out=/tmp/eval            # embedded toy faces, full run
    python -m experiments.evaluate --out=/tmp/eval --quick    # reduced protocol, minutes
    python -m experiments.evaluate --generator=CONVERTED_STYLEGAN2 --out=...

The toy-faces generator draws its own ground-truth label map with every sample,
so regions of interest (ROIs) and parts are scored exactly; a generator without
label channels gets fixed boxes as stand-in ROIs (`results.json: labels="boxes"`).

Protocol (`panda_jax.baselines.protocol`): sample indices are split into
disjoint train (fitting), validation and test ranges of the stream
`fold_in(sample_key, i)`. Every method proposes candidate edits (direction or
appearance x signed strength, strengths in standard deviations of the code
they move); per ROI the candidate of smallest validation ROIR (Eq. 13) among
those whose mean RMS change inside the ROI is at least `--threshold` is kept
and its ROIR (mean +- std over test samples whose ROI has at least
`--min_roi_pixels` pixels) is reported. candidates.Methods:

  * panda_global / panda_refined: `pj.edit` at `--layer`, part = the part that
    best matches the ROI on validation (pooled IoU), appearances of `A`,
    strengths in std of the appearance's coefficient `A^T z`; refined parts by
    `pj.refine(method=--refine_method)` per sample.
  * ganspace: PCA of W (`--ganspace_samples` codes), all codes or a 2-code range.
  * sefa: eigenvectors of the style kernels of each range of codes, edited there.
  * stylespace: the `--style_candidates` style channels with the largest share
    of their change inside the ROI (scored on `--score_samples` train samples).

Part discovery: per variant (global, refined_full = Algorithm 2 with the full
Gram matrix, refined_knn_<k>, refined_register = the package default), each
ground-truth part's matched part is its best pooled-IoU part on validation; the
per-sample IoU of that part on the test samples gives mean and std.

Writes `OUT/results.json` (roir, part_iou, part_iou_settings, train_seconds,
selected, sensitivity, config), `OUT/roir_table.md` and figures (`roir.png`,
`part_iou.png`, `edits_<roi>.png` (every method's chosen edit of the ROI on
the first test samples, with the RMS change per pixel on one scale), `sensitivity.png`).
"""

from __future__ import annotations

import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import panda_jax as pj
from experiments.plumbing import cli
from experiments.plumbing import distributed
from experiments.plumbing import options
from experiments.plumbing import outputs
from experiments.plumbing import sampling
from panda_jax import generator_ops
from panda_jax import json_io
from panda_jax import parts_eval
from panda_jax import viz
from panda_jax.baselines import candidates
from panda_jax.baselines import ganspace
from panda_jax.baselines import latent
from panda_jax.baselines import protocol
from panda_jax.baselines import sefa
from panda_jax.baselines import stylespace
from panda_jax.data import toyfaces

ROIS = ("eyes", "mouth", "hair", "background", "nose")
METHODS = ("panda_global", "panda_refined", "ganspace", "sefa", "stylespace")

_F = options.Flag
SPEC = options.spec(
  "generator",
  "out",
  "seed",
  "num_samples",
  "batch_size",
  "truncation_psi",
  "rank_c",
  "steps",
  *options.DISTRIBUTED,
  quick=_F(
    "bool",
    False,
    "Reduced protocol (about 100 test samples, one layer, one rank, no "
    "sensitivity study): minutes on a CPU.",
  ),
  layers=_F(
    "list",
    [],
    "Layers of the part-discovery study; the first is where PandA edits. "
    "Default: the deepest layer of at most 16x16 and the one two layers earlier.",
  ),
  ranks_s=_F("list", ["8", "12"], "Part ranks R_S of the part-discovery study (first: edits)."),
  num_val=_F("integer", 64, "Validation samples (candidate selection)."),
  num_test=_F("integer", 1000, "Test samples (reported ROIR and IoU)."),
  **options.ROIR_PROTOCOL,
  num_directions=_F("integer", 8, "GANSpace / SeFa directions per layer range."),
  ganspace_samples=_F("integer", 10000, "W codes for GANSpace's PCA."),
  score_samples=_F("integer", 32, "Train samples the StyleSpace channels are scored on."),
  style_candidates=_F("integer", 8, "StyleSpace channels per ROI (best scores)."),
  knn=_F("list", ["4", "8", "16"], "k of the mutual-kNN refinement variants."),
  refine_steps=_F("integer", 50, "Steps of Algorithm 2 (refined_full, refined_knn_k)."),
  refine_method=_F("string", "paper", "pj.refine method of panda_refined ('paper' or 'register')."),
  sensitivity=_F("bool", True, "Run the sensitivity study (R_S, R_C, steps, step-size rule)."),
  sensitivity_val=_F("integer", 16, "Validation samples per sensitivity point."),
  sensitivity_test=_F("integer", 200, "Test samples per sensitivity point."),
)

QUICK = dict(
  num_samples=128,
  num_val=32,
  num_test=100,
  steps=100,
  strengths=["4"],
  num_directions=4,
  ganspace_samples=2000,
  score_samples=4,
  style_candidates=4,
  knn=["8"],
  sensitivity=False,
)


class Data(NamedTuple):
  """Samples of one split: latents, originals and ground truth."""

  indices: np.ndarray  # [n]
  latents: jax.Array  # [n, num_ws, w_dim]
  rgb: np.ndarray  # [n, H, W, 3]
  labels: np.ndarray  # [n, H, W] int32, indices into `names`
  names: tuple

  def subset(self, size: int, start: int = 0) -> "Data":
    """Samples `start .. start + size - 1` of the split."""
    take = slice(start, start + size)
    return Data(
      self.indices[take], self.latents[take], self.rgb[take], self.labels[take], self.names
    )

  def masks(self, roi: str) -> np.ndarray:
    return (self.labels == self.names.index(roi)).astype(np.float32)


# ----------------------------------------------------------------------------- data


def log(message: str) -> None:
  """A progress line on stderr (process 0)."""
  outputs.log("evaluate", message)


def settings(config):
  """The configuration with `--quick`'s reductions applied and lists parsed."""
  values = dict(vars(config))
  if values["quick"]:
    values.update(QUICK)
  for name in ("ranks_s", "knn", "layers"):
    values[name] = [int(v) for v in values[name]]
  values["strengths"] = [float(v) for v in values["strengths"]]
  if values["quick"]:
    values["ranks_s"] = values["ranks_s"][:1]
    values["layers"] = values["layers"][:1]
  return type(config)(**values)


def box_labels(size) -> np.ndarray:
  """Stand-in ROIs for generators without labels: `[H, W]` indices into `toyfaces.PARTS`."""
  h, w = size
  y, x = np.mgrid[0:h, 0:w]
  y, x = (y + 0.5) / h, (x + 0.5) / w
  labels = np.zeros((h, w), np.int32)
  boxes = {
    "hair": (0.05, 0.3, 0.2, 0.8),
    "skin": (0.3, 0.9, 0.2, 0.8),
    "eyes": (0.4, 0.52, 0.25, 0.75),
    "nose": (0.52, 0.65, 0.42, 0.58),
    "mouth": (0.7, 0.8, 0.33, 0.67),
  }
  for name, (y0, y1, x0, x1) in boxes.items():
    labels[(y >= y0) & (y < y1) & (x >= x0) & (x < x1)] = toyfaces.PARTS.index(name)
  return labels


def make_data(gen, config, indices) -> Data:
  """Latents, RGB originals and label maps of the samples `indices`."""
  lat = sampling.latents(gen, config, indices)
  images = np.concatenate(
    [
      np.asarray(gen.generate(lat[i : i + config.batch_size]))
      for i in range(0, len(indices), config.batch_size)
    ]
  )
  samples = toyfaces.split_labels(images)
  labels = samples.labels
  names = samples.label_names
  if labels is None:
    labels = np.broadcast_to(box_labels(images.shape[1:3]), images.shape[:3])
    names = toyfaces.PARTS
  return Data(np.asarray(indices), lat, samples.rgb, np.asarray(labels), tuple(names))


def rgb_of(images):
  return images[..., :3] if images.shape[-1] > 3 else images


# ----------------------------------------------------------------------------- protocol


def choose(method: candidates.Method, val: Data, config) -> dict:
  """Per ROI: the selected candidate (threshold rule) and the validation scores
  (`protocol.choose_edits` on the validation split)."""
  apply = method.prepare(val.latents)
  return protocol.choose_edits(
    lambda cand: np.asarray(rgb_of(apply(cand))),
    method.candidates,
    val.rgb,
    {roi: val.masks(roi) for roi in ROIS},
    config.threshold,
    config.min_roi_pixels,
  )


def test_roir(method: candidates.Method, chosen: dict, test: Data, config) -> dict:
  """Per ROI: `{"mean", "std", "n"}` test ROIR of the chosen edit (None if none passed)."""
  out = {}
  for roi in ROIS:
    if chosen[roi] is None:
      out[roi] = dict(mean=None, std=None, n=0, note="no candidate reached the threshold")
      continue
    ratios, changes = [], []
    for i in range(0, len(test.indices), config.batch_size):
      part = test.subset(config.batch_size, start=i)
      edited = np.asarray(rgb_of(method.prepare(part.latents)(chosen[roi]["candidate"])))
      r, c = protocol.roi_statistics(part.rgb, edited, part.masks(roi), config.min_roi_pixels)
      ratios.append(r)
      changes.append(c)
    out[roi] = protocol.summary(np.concatenate(ratios), np.concatenate(changes))
  return out


def evaluate_method(method: candidates.Method, val: Data, test: Data, config):
  chosen = choose(method, val, config)
  return test_roir(method, chosen, test, config), chosen


# ----------------------------------------------------------------------------- parts


def per_sample_iou(assigned, labels, matches, num_labels: int) -> np.ndarray:
  """`[n, L]` IoU of each label with its matched part per sample (NaN where absent).

  Args:
    assigned: `[n or 1, H, W]` argmax part per pixel; labels: `[n, H, W]`;
    matches: `[L]` matched part of each label.
  """
  labels = np.asarray(labels)
  masks = np.broadcast_to(np.asarray(assigned), labels.shape)[..., None] == np.asarray(matches)
  iou = parts_eval.matched_iou(masks, labels, num_labels, per_sample=True)
  present = labels[..., None] == np.arange(num_labels)  # [n, H, W, L]
  return np.where(present.any(axis=(1, 2)), iou, np.nan)


def refiners(factors, config) -> dict:
  """Variant name -> `features [n, h, w, c] -> parts` (None = the global parts)."""
  a, p = factors.appearances, factors.parts
  out = {
    "global": None,
    "refined_full": lambda x: pj.refine(x, a, p, method="paper", steps=config.refine_steps),
  }
  for k in config.knn:
    out[f"refined_knn_{k}"] = lambda x, k=k: pj.refine(
      x, a, p, method="paper", k=k, steps=config.refine_steps
    )
  out["refined_register"] = lambda x: pj.refine(x, a, p, method="register")
  return out


def _parts_of(gen, layer, data: Data, refine, factors, config):
  if refine is None:
    return factors.parts
  return jnp.concatenate(
    [
      refine(gen.split(data.latents[i : i + config.batch_size], layer)[0])
      for i in range(0, len(data.indices), config.batch_size)
    ]
  )


def part_iou(gen, layer, factors, val: Data, test: Data, config, variants=None) -> dict:
  """`{variant: {part: {"mean", "std", "n", "match"}, "mean_over_parts": x}}`."""
  grid = sampling.feature_shape(gen, layer)[:2]
  out = {}
  for name, refine in (variants or refiners(factors, config)).items():
    start = time.time()
    best, match, _ = parts_eval.best_part_iou(
      _parts_of(gen, layer, val, refine, factors, config), val.labels, len(val.names), grid
    )
    parts = _parts_of(gen, layer, test, refine, factors, config)
    assigned = parts_eval.part_label_maps(parts, grid, test.labels.shape[1:])
    ious = per_sample_iou(np.asarray(assigned), test.labels, np.asarray(match), len(test.names))
    entry = {
      part: dict(
        mean=float(np.nanmean(ious[:, l])),
        std=float(np.nanstd(ious[:, l])),
        n=int(np.sum(~np.isnan(ious[:, l]))),
        match=int(match[l]),
        val_pooled=float(best[l]),
      )
      for l, part in enumerate(test.names)
    }
    entry["mean_over_parts"] = float(np.mean([entry[p]["mean"] for p in test.names]))
    entry["seconds"] = time.time() - start
    out[name] = entry
  return out


def fit_panda(gen, layer, rank_s, config, **fit_options):
  """`(factors, seconds)`: features of the train split at `layer`, then `pj.fit`."""
  start = time.time()
  features = sampling.extract_features(gen, config, layer, np.arange(config.num_samples))
  factors = pj.fit(
    features,
    config.rank_c,
    rank_s,
    steps=config.steps,
    key=generator_ops.seed_keys(config.seed)[1],
    progress=False,
    **fit_options,
  )
  jax.block_until_ready(factors.parts)
  coeff = jnp.einsum("nhwc,cr->nhwr", features, factors.appearances)
  return factors, time.time() - start, np.asarray(jnp.std(coeff, axis=(0, 1, 2)))


def roi_matches(gen, layer, parts, val: Data) -> dict:
  """Each ROI's best-matching part (pooled IoU on validation)."""
  grid = sampling.feature_shape(gen, layer)[:2]
  _, match, _ = parts_eval.best_part_iou(parts, val.labels, len(val.names), grid)
  return {roi: int(match[val.names.index(roi)]) for roi in ROIS}


# ----------------------------------------------------------------------------- run


def check_generator(gen) -> None:
  if gen.arch != "stylegan2":
    raise ValueError(
      f"the baselines need a StyleGAN2 generator (W+ codes and style kernels), "
      f"got arch {gen.arch!r}"
    )


def run(config) -> dict:
  """The whole evaluation; returns (and writes) `results.json`'s content."""
  config = settings(config)
  out = outputs.output_dir(config.out)
  gen = sampling.load_generator(config.generator)
  check_generator(gen)
  layers = config.layers or _default_layers(gen, config.quick)
  split = protocol.splits(config.num_samples, config.num_val, config.num_test)
  val, test = make_data(gen, config, split.val), make_data(gen, config, split.test)
  train = make_data(gen, config, split.train[: max(config.score_samples, 1)])
  results = dict(
    config=json_io.jsonable(vars(config)),
    layers=layers,
    labels=("generator" if gen.config.get("img_channels", 3) > 3 else "boxes"),
    splits={k: [int(v[0]), int(v[-1]) + 1] for k, v in split._asdict().items()},
    roir={},
    selected={},
  )

  # Part discovery at every (layer, R_S).
  settings_iou, main = [], None
  for layer in layers:
    for rank_s in config.ranks_s:
      factors, seconds, coeff_std = fit_panda(gen, layer, rank_s, config)
      ious = part_iou(gen, layer, factors, val, test, config)
      log(
        f"layer {layer}, R_S {rank_s}: fit {seconds:.1f} s, part IoU "
        + ", ".join(f"{v} {e['mean_over_parts']:.3f}" for v, e in ious.items())
      )
      settings_iou.append(
        dict(
          layer=layer,
          rank_s=rank_s,
          fit_seconds=seconds,
          final_loss=float(factors.loss_history[-1]),
          part_iou=ious,
        )
      )
      if main is None:
        main = (layer, rank_s, factors, seconds, coeff_std)
  results["part_iou"] = settings_iou[0]["part_iou"]
  results["part_iou_settings"] = settings_iou

  # Locality: every method through the same protocol.
  layer, rank_s, factors, seconds, coeff_std = main
  matches = roi_matches(gen, layer, factors.parts, val)
  methods, results["train_seconds"], results["refine_seconds_per_sample"] = build_methods(
    gen, layer, factors, seconds, coeff_std, matches, train, test, config
  )
  log("train seconds " + str(results["train_seconds"]))
  for name in METHODS:
    start = time.time()
    results["roir"][name], chosen = evaluate_method(methods[name], val, test, config)
    results["selected"][name] = chosen
    log(
      f"{name}: {time.time() - start:.1f} s, "
      + ", ".join(f"{r} {results['roir'][name][r]['mean']}" for r in ROIS)
    )
    results.setdefault("eval_seconds", {})[name] = time.time() - start
  results["edit_layer"], results["edit_rank_s"], results["roi_matches"] = layer, rank_s, matches

  results = json_io.jsonable(results)
  write(out, results)
  figures(out, gen, methods, results, test)
  if config.sensitivity:  # The table is written first: this part is long.
    results["sensitivity"] = json_io.jsonable(
      sensitivity(gen, layer, rank_s, factors, val, test, config)
    )
    write(out, results)
    sensitivity_figure(out, results["sensitivity"])
  return results


def build_methods(
  gen, layer, factors, fit_seconds, coeff_std, matches, train: Data, test: Data, config
):
  """`(methods, train_seconds, refine seconds per sample)` of the five methods.

  Training time (wall clock, JIT compilation included): PandA's feature
  extraction and fit; for panda_refined plus the refinement of the test
  samples; GANSpace's W sampling and PCA; SeFa's eigendecompositions (and the
  spread of the W samples along them); StyleSpace's channel scoring.
  """
  seconds = {"panda_global": fit_seconds}
  methods = {
    "panda_global": candidates.panda(gen, layer, factors, matches, coeff_std, config.strengths)
  }
  refine = _panda_refiner(factors, config)
  start = time.time()
  _parts_of(gen, layer, test, refine, factors, config).block_until_ready()
  per_sample = (time.time() - start) / len(test.indices)
  seconds["panda_refined"] = fit_seconds + per_sample * len(test.indices)
  methods["panda_refined"] = candidates.panda(
    gen, layer, factors, matches, coeff_std, config.strengths, refine
  )

  start = time.time()
  ws = candidates.sample_w(
    gen, jax.random.fold_in(generator_ops.seed_keys(config.seed)[1], 1), config.ganspace_samples
  )
  ranges = latent.layer_ranges(gen.num_ws)
  methods["ganspace"] = candidates.latent_directions(
    gen,
    [(a, b, ganspace.fit(ws, config.num_directions)) for a, b in ranges],
    config.strengths,
    ROIS,
  )
  seconds["ganspace"] = time.time() - start

  start = time.time()
  sefa_ranges = []
  for a, b in ranges:
    codes = [i for i in range(a, b) if i < stylespace.num_convs(gen.params)]
    if codes:
      sefa_ranges.append(
        (a, b, sefa.fit(sefa.style_kernels(gen.params, codes), config.num_directions, ws))
      )
  methods["sefa"] = candidates.latent_directions(gen, sefa_ranges, config.strengths, ROIS)
  seconds["sefa"] = time.time() - start

  start = time.time()
  methods["stylespace"] = candidates.stylespace_channels(
    gen,
    train.latents[: config.score_samples],
    np.stack([train.subset(config.score_samples).masks(roi) for roi in ROIS]),
    ROIS,
    config.strengths,
    config.style_candidates,
    rgb=rgb_of,
  )
  seconds["stylespace"] = time.time() - start
  return methods, seconds, per_sample


def _default_layers(gen, quick: bool) -> list:
  deepest = sampling.resolve_layer(gen, None)
  earlier = [l for l in gen.layers if l <= deepest - 2]
  return [deepest] if quick or not earlier else [deepest, earlier[-1]]


def _panda_refiner(factors, config):
  a, p = factors.appearances, factors.parts
  steps = config.refine_steps if config.refine_method == "paper" else None
  return lambda x: pj.refine(x, a, p, method=config.refine_method, steps=steps)


def sensitivity(gen, layer, rank_s, factors, val: Data, test: Data, config) -> list:
  """ROIR (panda_global) and part IoU (global) versus R_S, R_C, steps and step-size rule.

  One factor varies at a time around the main setting (`layer`, `rank_s`,
  `--rank_c`, `--steps`, adaptive step); "fixed" is the paper's constant step,
  set to the smaller of the main fit's final adaptive step sizes; "adam" is
  `pj.fit(method="adam", learning_rate=1e-2)`.
  """
  val, test = val.subset(config.sensitivity_val), test.subset(config.sensitivity_test)
  fixed = float(min(factors.step_size_parts, factors.step_size_appearances))
  rc, steps = config.rank_c, config.steps
  points = (
    [("rank_s", r, dict(rank_s=r)) for r in (rank_s // 2, rank_s, 2 * rank_s)]
    + [("rank_c", c, dict(rank_c=c)) for c in (rc // 2, rc, 2 * rc)]
    + [("steps", t, dict(steps=t)) for t in (steps // 4, steps, 2 * steps)]
    + [
      ("step_rule", "adaptive", {}),
      ("step_rule", "fixed", dict(step_size=fixed)),
      ("step_rule", "adam", dict(method="adam", learning_rate=1e-2)),
    ]
  )
  rows = []
  for factor, value, fit_options in points:
    cfg = type(config)(
      **{
        **vars(config),
        "rank_c": fit_options.pop("rank_c", rc),
        "steps": fit_options.pop("steps", steps),
      }
    )
    row = dict(factor=factor, value=value)
    log(f"sensitivity {factor} = {value}")
    try:
      f, seconds, coeff_std = fit_panda(
        gen, layer, fit_options.pop("rank_s", rank_s), cfg, **fit_options
      )
    except FloatingPointError as err:
      rows.append({**row, "error": str(err)})
      continue
    ious = part_iou(gen, layer, f, val, test, cfg, variants={"global": None})["global"]
    method = candidates.panda(
      gen, layer, f, roi_matches(gen, layer, f.parts, val), coeff_std, cfg.strengths
    )
    roir, _ = evaluate_method(method, val, test, cfg)
    means = [roir[r]["mean"] for r in ROIS if roir[r]["mean"] is not None]
    rows.append(
      {
        **row,
        "fit_seconds": seconds,
        "final_loss": float(f.loss_history[-1]),
        "part_iou_mean": ious["mean_over_parts"],
        "roir": roir,
        "roir_mean_over_rois": float(np.mean(means)) if means else None,
      }
    )
  return rows


# ----------------------------------------------------------------------------- outputs


def table(results: dict) -> str:
  """Markdown: the ROIR table (Table 2 layout), part IoU, and the sensitivity study."""
  lines = [
    f"ROIR (Eq. 13, lower is better), mean ± std over test samples; PandA at layer "
    f"{results['edit_layer']}, R_S = {results['edit_rank_s']}; train s = wall-clock "
    "training time on this machine (JIT compilation included).",
    "",
    "| method | " + " | ".join(ROIS) + " | train s |",
    "|---" * (len(ROIS) + 2) + "|",
  ]
  for m in METHODS:
    lines.append(
      f"| {m} | "
      + " | ".join(outputs.mean_std(results["roir"][m][r]) for r in ROIS)
      + f" | {results['train_seconds'][m]:.1f} |"
    )
  first = results["part_iou_settings"][0]
  names = [p for p, e in first["part_iou"]["global"].items() if isinstance(e, dict)]
  lines += [
    "",
    f"Part IoU with the matched ground-truth part (layer {first['layer']}, R_S = "
    f"{first['rank_s']}), mean ± std over test samples:",
    "",
    "| variant | " + " | ".join(names) + " | mean |",
    "|---" * (len(names) + 2) + "|",
  ]
  for variant, entry in first["part_iou"].items():
    lines.append(
      f"| {variant} | "
      + " | ".join(outputs.mean_std(entry[p]) for p in names)
      + f" | {entry['mean_over_parts']:.3f} |"
    )
  variants = list(first["part_iou"])
  lines += [
    "",
    "Part IoU, mean over parts, per setting:",
    "",
    "| layer | R_S | " + " | ".join(variants) + " |",
    "|---" * (len(variants) + 2) + "|",
  ]
  for row in results["part_iou_settings"]:
    lines.append(
      f"| {row['layer']} | {row['rank_s']} | "
      + " | ".join(f"{row['part_iou'][v]['mean_over_parts']:.3f}" for v in variants)
      + " |"
    )
  if results.get("sensitivity"):
    lines += [
      "",
      "Sensitivity (panda_global, one factor at a time; ROIR per ROI, mean):",
      "",
      "| factor | value | final loss | part IoU | " + " | ".join(ROIS) + " |",
      "|---" * (len(ROIS) + 4) + "|",
    ]
    for row in results["sensitivity"]:
      if "error" in row:
        lines.append(f"| {row['factor']} | {row['value']} | diverged | | " + " | " * len(ROIS))
        continue
      cells = [
        "n/a" if row["roir"][r]["mean"] is None else f"{row['roir'][r]['mean']:.2f}" for r in ROIS
      ]
      lines.append(
        f"| {row['factor']} | {row['value']} | {row['final_loss']:.4g} | "
        f"{row['part_iou_mean']:.3f} | " + " | ".join(cells) + " |"
      )
  return "\n".join(lines) + "\n"


def write(out: str, results: dict) -> None:
  """`OUT/results.json` (atomically) and `OUT/roir_table.md` (process 0)."""
  if not distributed.is_writer():
    return
  json_io.write_json(os.path.join(out, "results.json"), results)
  with open(os.path.join(out, "roir_table.md"), "w") as f:
    f.write(table(results))


def figures(out: str, gen, methods: dict, results: dict, test: Data, num: int = 8) -> None:
  """roir.png, part_iou.png, edits_<roi>.png (every method's chosen edit of the ROI on the
  first `num` test samples, their RMS change per pixel, and the ROI)."""
  if not distributed.is_writer():
    return
  val = lambda e: np.nan if e["mean"] is None else e["mean"]
  err = lambda e: 0.0 if e["std"] is None else e["std"]
  viz.plot_bars(
    ROIS,
    METHODS,
    [[val(results["roir"][m][r]) for r in ROIS] for m in METHODS],
    [[err(results["roir"][m][r]) for r in ROIS] for m in METHODS],
    "ROIR (lower is better)",
    os.path.join(out, "roir.png"),
  )
  variants = list(results["part_iou"])
  parts = list(test.names)
  viz.plot_bars(
    parts,
    variants,
    [[results["part_iou"][v][p]["mean"] for p in parts] for v in variants],
    [[results["part_iou"][v][p]["std"] for p in parts] for v in variants],
    "IoU",
    os.path.join(out, "part_iou.png"),
  )
  shown = test.subset(num)
  for roi in ("eyes", "mouth"):
    rows = [("original", shown.rgb, False)]
    for m in METHODS:
      chosen = results["selected"][m][roi]
      if chosen is not None:
        edited = rgb_of(np.asarray(methods[m].prepare(shown.latents)(chosen["candidate"])))
        change = np.sqrt(np.mean(np.square(edited - shown.rgb), axis=-1))
        rows += [(m, edited, False), ("|change|", change, True)]
    masks = shown.masks(roi)[..., None]  # ROI pixels kept, the rest dimmed.
    rows.append(("ROI", np.where(masks > 0, shown.rgb, -1 + 0.3 * (shown.rgb + 1)), False))
    viz.plot_strips(rows, os.path.join(out, f"edits_{roi}.png"))


def sensitivity_figure(out: str, rows: list) -> None:
  """sensitivity.png: ROIR (mean over ROIs) and part IoU against each factor."""
  if distributed.is_writer():
    viz.plot_sensitivity(rows, os.path.join(out, "sensitivity.png"))


if __name__ == "__main__":
  cli.main(run, SPEC)
