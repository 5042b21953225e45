"""Parts and locality on a real GAN with landmark ground truth (issue 17, items 2 and 5).

    python -m experiments.decompose --generator=DCGAN_DIR --layer=2 --num_samples=512 --out=RUN
    python -m experiments.evaluate_real --factors=RUN --out=EVAL          # best-part IoU
    python -m experiments.evaluate_real --factors=RUN --out=EVAL --roir   # + locality (ROIR)

On the 64 px DCGAN (layer 2, R_C = R_S = 8, 200 eval samples) on 2 shared CPU
cores: 33 s without `--roir`, 2 min with it (landmarks cached; MediaPipe
itself takes about 5 s per 200 images). One process (no multi-host split).

Ground truth (`panda_jax.landmarks`): MediaPipe's face mesh on the samples
upscaled 4x; eyes / mouth / nose = convex hulls of their landmark groups
(dilated 1.5 / 1.0 / 0.5 px), background = outside the face oval. MediaPipe
runs in a virtual environment of its own (created on first use under
`~/.cache/panda_jax/mediapipe-0.10.14`; `--mediapipe_python`, `--mediapipe_venv`
or the variables `PANDA_MEDIAPIPE_PYTHON` / `PANDA_MEDIAPIPE_VENV` point
elsewhere). Landmarks are cached in `OUT/landmarks/` under a digest of the
images and detector settings, so a rerun on the same generator, eval seed and
sample count does not call MediaPipe again.

The generator, layer, sample seed and truncation come from `--factors`'
`metrics.json` (a `--generator` or `--layer` that is given must agree with the
factors). Eval samples are samples `0 .. num_eval-1` of the stream of
`--eval_seed` (default: the fit's seed + 1), disjoint from the fit's stream.

Best-part IoU (`parts_eval.best_region_part_iou`): each part bilinearly
upsampled to the image (half-pixel centres), divided by its maximum (per
sample for per-sample parts), thresholded at `--part_threshold`; per region,
the part of highest IoU averaged over the detected eval samples. Scored:

  * panda_global: the factors' parts; panda_refined: `pj.refine(x, A, P)`
    (the package default) per eval sample.
  * kmeans_pooled: k-means (k = R_S) of the fibres of the fit's samples; every
    eval fibre takes its nearest centre (indices consistent across samples,
    one part per region as for PandA). kmeans_pooled_frequency: the global
    parts made of those clusters' frequency at each position.
  * kmeans_per_sample: each eval sample's fibres clustered alone; indices mean
    nothing across samples, so each sample's best cluster is taken per region
    (`match="per_sample"`): an optimistic score, the ground truth choosing.

Locality (`--roir`; the protocol of `experiments.evaluate` via
`baselines.protocol.choose_edits` / `report_edits`): validation samples are
the next `--num_val` samples of the eval stream, test samples the eval
samples. Per ROI the candidate of smallest validation ROIR among those whose
RMS change inside the ROI is at least `--threshold` is kept; its test ROIR
(Eq. 13) over the detected samples is reported. Methods:

  * panda_global / panda_refined: `pj.edit` at the factors' layer on the part
    that best matches the ROI on validation, for the `--num_appearances`
    appearances of most energy in that part (all when R_C is smaller), at
    signed `--strengths` in std of the appearance's coefficient `A^T z`.
  * ganspace: a DCGAN has no W space and PCA of a Gaussian z is degenerate, so
    PCA of the first layer's output (flattened `4 x 4 x c`, the fit's samples)
    and edits there, `--num_directions` directions x signed strengths in std
    along each.
  * sefa: eigenvectors of `K K^T` for the first ConvTranspose2d kernel as a
    `[z_dim, 4*4*c]` matrix (column-normalised), edits of z.

Writes `OUT/metrics.json`, `OUT/tables.md`, `OUT/parts.png` (the parts of
every method on the first `--num_show` eval samples, then PandA's global parts
as heat maps) and `OUT/regions.png` (the landmark regions).
"""

from __future__ import annotations

import os
import time
import types
from typing import NamedTuple

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
from panda_jax import json_io
from panda_jax import landmarks
from panda_jax import parts_eval
from panda_jax import runs
from panda_jax import viz
from panda_jax.baselines import ganspace
from panda_jax.baselines import kmeans
from panda_jax.baselines import protocol
from panda_jax.baselines import sefa

REGIONS = tuple(landmarks.REGIONS)  # eyes, mouth, nose, background
IOU_METHODS = (
  "panda_global",
  "panda_refined",
  "kmeans_pooled",
  "kmeans_pooled_frequency",
  "kmeans_per_sample",
)
ROIR_METHODS = ("panda_global", "panda_refined", "ganspace", "sefa")

_F = options.Flag
SPEC = options.spec(
  "generator",
  "layer",
  "out",
  "batch_size",
  "factors",
  "num_show",
  *options.DISTRIBUTED,
  num_eval=_F("integer", 200, "Eval samples (best-part IoU; the ROIR test split)."),
  eval_seed=_F(
    "integer",
    None,
    "Seed of the eval stream (default: the fit's seed + 1); must differ from the fit's.",
  ),
  num_train=_F(
    "integer",
    None,
    "Samples of the fit's stream the pooled k-means and "
    "GANSpace's PCA are fitted on (default: the fit's num_samples).",
  ),
  part_threshold=_F("float", 0.5, "A part's mask: upsampled part >= this x its maximum."),
  kmeans_k=_F("integer", None, "Clusters of the k-means baselines (default: R_S)."),
  kmeans_restarts=_F("integer", 4, "k-means++ restarts (lowest inertia kept)."),
  kmeans_iterations=_F("integer", 30, "Lloyd iterations per restart."),
  mediapipe_python=_F(
    "string",
    "",
    "A Python with mediapipe==0.10.14 (default: "
    "$PANDA_MEDIAPIPE_PYTHON, else the venv of --mediapipe_venv).",
  ),
  mediapipe_venv=_F(
    "string",
    "",
    "Where MediaPipe's venv is (created on first use; "
    "default: $PANDA_MEDIAPIPE_VENV or ~/.cache/panda_jax/"
    "mediapipe-0.10.14).",
  ),
  create_venv=_F("bool", True, "Create MediaPipe's venv when missing (needs pip access)."),
  upscale=_F("integer", 4, "Images are upscaled by this factor (bicubic) for MediaPipe."),
  min_detection_confidence=_F("float", 0.3, "MediaPipe's face-detection threshold."),
  roir=_F("bool", False, "Also run the locality (ROIR) comparison."),
  num_val=_F("integer", 64, "Validation samples of the ROIR protocol."),
  **options.ROIR_PROTOCOL,
  num_directions=_F("integer", 8, "GANSpace / SeFa directions."),
  num_appearances=_F("integer", 16, "PandA appearances per ROI (most energy in its part)."),
)
# Not the shared default (toyfaces): the generator recorded with the factors.
SPEC = options.replace(
  SPEC,
  generator=dict(
    default=None,
    help=(
      "A converted checkpoint directory (default: the generator recorded in --factors' "
      "metrics.json)."
    ),
  ),
)


def log(message: str) -> None:
  outputs.log("evaluate_real", message)


class Split(NamedTuple):
  """Samples of one split with their features, images and landmark regions."""

  latents: jax.Array  # [n, z_dim]
  features: jax.Array  # [n, h, w, c] at the factors' layer
  rgb: np.ndarray  # [n, H, W, 3]
  regions: np.ndarray  # [n, H, W, L] bool, L = REGIONS
  detected: np.ndarray  # [n] bool

  def masks(self) -> dict:
    """ROI masks `{region: [n, H, W]}` (empty for undetected samples: left out of ROIR)."""
    return {r: self.regions[..., l].astype(np.float32) for l, r in enumerate(REGIONS)}


# ----------------------------------------------------------------------------- data


def fit_record(config) -> dict:
  """The factors' `metrics.json` (written by `experiments.decompose`)."""
  if not config.factors:
    raise ValueError("--factors is required (a `python -m experiments.decompose` output directory)")
  return runs.read_record(config.factors)


def stream_of(seed: int, config, psi: float):
  """What `sampling.latents` / `sampling.extract_features` read of a stream."""
  return types.SimpleNamespace(seed=seed, batch_size=config.batch_size, truncation_psi=psi)


def make_split(gen, stream, layer: int, indices, config, out: str) -> Split:
  """Latents, features, images and landmark regions of the samples `indices` of `stream`."""
  lat = sampling.latents(gen, stream, indices)
  step = config.batch_size
  features = jnp.concatenate(
    [gen.split(lat[i : i + step], layer)[0] for i in range(0, len(indices), step)]
  )
  rgb = np.concatenate(
    [np.asarray(gen.generate(lat[i : i + step])) for i in range(0, len(indices), step)]
  )
  if rgb.shape[-1] != 3:
    raise ValueError(
      f"landmark regions need RGB images, the generator makes {rgb.shape[-1]} channels"
    )
  regions = landmarks.face_regions(
    rgb,
    python=config.mediapipe_python or None,
    venv=config.mediapipe_venv or None,
    create=config.create_venv,
    upscale=config.upscale,
    min_confidence=config.min_detection_confidence,
    cache_dir=os.path.join(out, "landmarks"),
  )
  return Split(
    lat, features, rgb, np.stack([regions.masks[r] for r in REGIONS], axis=-1), regions.detected
  )


def refine_parts(features, factors, batch: int):
  """`pj.refine(x, A, P)` (the package default) of every sample: `[n, s, r_s]`."""
  return jnp.concatenate(
    [
      pj.refine(features[i : i + batch], factors.appearances, factors.parts)
      for i in range(0, features.shape[0], batch)
    ]
  )


# ----------------------------------------------------------------------------- IoU


def score(parts, split: Split, grid, config, match: str = "global") -> dict:
  """`{region: {"iou", "std", "part"}, "mean_over_regions"}` of `parts` on `split`."""
  best, which, ious = parts_eval.best_region_part_iou(
    parts,
    split.regions,
    grid,
    detected=split.detected,
    threshold=config.part_threshold,
    match=match,
  )
  ious = np.asarray(ious)[split.detected]  # [m, L, r_s]
  which = np.asarray(which)
  out = {}
  for l, region in enumerate(REGIONS):
    per = ious[:, l].max(axis=1) if match == "per_sample" else ious[:, l, which[l]]
    out[region] = dict(
      iou=float(best[l]),
      std=float(np.std(per)),
      part=None if match == "per_sample" else int(which[l]),
    )
  out["mean_over_regions"] = float(np.mean([out[r]["iou"] for r in REGIONS]))
  out["matching"] = match
  return out


def iou_study(gen, factors, layer: int, split: Split, record: dict, config, seconds: dict):
  """Best-part IoU of PandA and the k-means baselines; `(results, parts shown)`."""
  grid = tuple(record["feature_shape"][:2])
  k = config.kmeans_k or factors.parts.shape[1]
  results, shown = {}, {}

  start = time.time()
  results["panda_global"] = score(factors.parts, split, grid, config)
  shown["PandA global"] = np.asarray(factors.parts)
  seconds["iou_panda_global"] = time.time() - start

  start = time.time()
  refined = refine_parts(split.features, factors, config.batch_size)
  results["panda_refined"] = score(refined, split, grid, config)
  shown["PandA refined"] = np.asarray(refined[: config.num_show])
  seconds["refine_and_iou"] = time.time() - start

  start = time.time()
  train = train_features(gen, layer, record, config)
  key = jax.random.PRNGKey(record.get("seed", 0))
  centres, _ = kmeans.fit_pooled(
    key, train, k, restarts=config.kmeans_restarts, iterations=config.kmeans_iterations
  )
  pooled = kmeans.assign(split.features, centres)
  results["kmeans_pooled"] = score(pooled, split, grid, config)
  results["kmeans_pooled_frequency"] = score(
    kmeans.frequency_parts(kmeans.assign(train, centres)), split, grid, config
  )
  shown["k-means pooled"] = np.asarray(pooled[: config.num_show])
  seconds["kmeans_pooled"] = time.time() - start

  start = time.time()
  own = kmeans.per_sample(
    jax.random.fold_in(key, 1),
    split.features,
    k,
    restarts=config.kmeans_restarts,
    iterations=config.kmeans_iterations,
  )
  results["kmeans_per_sample"] = score(own, split, grid, config, match="per_sample")
  shown["k-means per sample"] = np.asarray(own[: config.num_show])
  seconds["kmeans_per_sample"] = time.time() - start
  return results, shown


def train_features(gen, layer: int, record: dict, config):
  """Features of the fit's samples `0 .. num_train-1` (its stream: the factors' training data)."""
  num = config.num_train or int(record.get("num_samples", 512))
  stream = stream_of(int(record.get("seed", 0)), config, float(record.get("truncation_psi", 1)))
  return sampling.extract_features(gen, stream, layer, np.arange(num))


# ----------------------------------------------------------------------------- locality


def panda_roir(gen, layer: int, factors, val: Split, test: Split, grid, config, refined=None):
  """`(render_of(split_name), candidates)` of PandA edits (module docstring)."""
  a, parts = factors.appearances, factors.parts
  splits = {"val": val, "test": test}
  part_of = {name: (parts if refined is None else refined[name]) for name in splits}
  _, match, _ = parts_eval.best_region_part_iou(
    part_of["val"], val.regions, grid, detected=val.detected, threshold=config.part_threshold
  )
  coeff = jnp.einsum("nhwc,cr->nhwr", val.features, a)  # [n, h, w, r_c]
  coeff_std = np.asarray(jnp.std(coeff, axis=(0, 1, 2)))
  candidates = []
  for l, roi in enumerate(REGIONS):
    k = int(match[l])
    # Energy of appearance j in part k: mean_i (a_j^T Z_i p_k)^2 (global parts of the fit).
    energy = np.asarray(
      jnp.mean(jnp.einsum("nhwr,hw->nr", coeff, jnp.reshape(parts[:, k], grid)) ** 2, axis=0)
    )
    for j in np.argsort(-energy)[: config.num_appearances]:
      for t in protocol.signed(config.strengths):
        candidates.append(
          (dict(part=k, appearance=int(j), t=t, alpha=float(t * coeff_std[j])), (roi,))
        )

  def render_of(name):
    split = splits[name]

    def render(cand):
      edited = pj.edit(
        split.features, a, part_of[name], cand["part"], cand["appearance"], cand["alpha"]
      )
      return gen.resume(edited, None, split.latents, layer)

    return render

  return render_of, candidates


def ganspace_roir(gen, record, config, val: Split, test: Split):
  """PCA of the first layer's output, edits there."""
  first = train_features(gen, 1, record, config)  # [m, 4, 4, c]
  dirs = ganspace.fit(np.reshape(np.asarray(first), (first.shape[0], -1)), config.num_directions)
  splits = {"val": val, "test": test}
  cache = {}

  def render_of(name):
    split = splits[name]
    if name not in cache:
      cache[name] = gen.split(split.latents, 1)[0]
    x = cache[name]

    def render(cand):
      v = jnp.reshape(jnp.asarray(dirs.directions[cand["direction"]]), x.shape[1:])
      return gen.resume(x + cand["alpha"] * v, None, split.latents, 1)

    return render

  candidates = [
    (dict(direction=d, t=t, alpha=float(t * dirs.scales[d])), REGIONS)
    for d in range(len(dirs.directions))
    for t in protocol.signed(config.strengths)
  ]
  return render_of, candidates


def sefa_roir(gen, record, config, val: Split, test: Split):
  """SeFa directions of the first ConvTranspose2d, edits of z."""
  stream = stream_of(int(record.get("seed", 0)), config, 1.0)
  z = np.asarray(
    sampling.latents(
      gen, stream, np.arange(config.num_train or int(record.get("num_samples", 512)))
    )
  )
  dirs = sefa.fit([sefa.first_layer_kernel(gen.params)], config.num_directions, ws=z)
  splits = {"val": val, "test": test}

  def render_of(name):
    split = splits[name]

    def render(cand):
      v = jnp.asarray(dirs.directions[cand["direction"]])
      return gen.generate(split.latents + cand["alpha"] * v[None])

    return render

  candidates = [
    (dict(direction=d, t=t, alpha=float(t * dirs.scales[d])), REGIONS)
    for d in range(len(dirs.directions))
    for t in protocol.signed(config.strengths)
  ]
  return render_of, candidates


def roir_study(
  gen, layer, factors, record, val: Split, test: Split, test_refined, config, seconds: dict
):
  """`(roir {method: {roi: stats}}, selected {method: {roi: choice}})`."""
  grid = tuple(record["feature_shape"][:2])
  start = time.time()
  refined = {"val": refine_parts(val.features, factors, config.batch_size), "test": test_refined}
  seconds["roir_refine_val"] = time.time() - start
  builders = {
    "panda_global": lambda: panda_roir(gen, layer, factors, val, test, grid, config),
    "panda_refined": lambda: panda_roir(gen, layer, factors, val, test, grid, config, refined),
    "ganspace": lambda: ganspace_roir(gen, record, config, val, test),
    "sefa": lambda: sefa_roir(gen, record, config, val, test),
  }
  roir, selected = {}, {}
  for name in ROIR_METHODS:
    start = time.time()
    render_of, candidates = builders[name]()
    chosen = protocol.choose_edits(
      render_of("val"), candidates, val.rgb, val.masks(), config.threshold, config.min_roi_pixels
    )
    roir[name] = protocol.report_edits(
      render_of("test"), chosen, test.rgb, test.masks(), config.min_roi_pixels
    )
    selected[name] = chosen
    seconds[f"roir_{name}"] = time.time() - start
    log(
      f"ROIR {name} ({len(candidates)} candidates, {seconds[f'roir_{name}']:.1f} s): "
      + ", ".join(f"{r} {outputs.mean_std(roir[name][r])}" for r in REGIONS)
    )
  return roir, selected


# ----------------------------------------------------------------------------- run


def run(config) -> dict:
  """The evaluation; returns (and writes) `OUT/metrics.json`'s content."""
  record = fit_record(config)
  config = types.SimpleNamespace(
    **{**vars(config), "strengths": [float(s) for s in config.strengths]}
  )
  generator = config.generator or record.get("generator")
  if not generator:
    raise ValueError("no --generator given and none recorded in the factors' metrics.json")
  fit_seed = int(record.get("seed", 0))
  eval_seed = fit_seed + 1 if config.eval_seed is None else config.eval_seed
  if eval_seed == fit_seed:
    raise ValueError(
      f"--eval_seed={eval_seed} is the fit's seed: the eval samples would be the training samples"
    )
  if config.num_eval < 1 or config.num_val < 1 or config.batch_size < 1:
    raise ValueError("--num_eval, --num_val and --batch_size must be positive")
  out = outputs.output_dir(config.out)
  seconds = {}
  start = time.time()
  gen = sampling.load_generator(generator)
  factors, layer = decomposition.factors_for(
    types.SimpleNamespace(factors=config.factors, layer=config.layer, generator=generator), gen
  )
  h, w, c = sampling.feature_shape(gen, layer)
  record = {**record, "feature_shape": [h, w, c]}
  psi = float(record.get("truncation_psi", 1.0))
  stream = stream_of(eval_seed, config, psi)
  seconds["load"] = time.time() - start

  start = time.time()
  # One split at a time, so the test split's landmarks are cached with or without --roir.
  test = make_split(gen, stream, layer, np.arange(config.num_eval), config, out)
  seconds["samples_and_landmarks"] = time.time() - start
  log(
    f"{config.num_eval} eval samples, {int(test.detected.sum())} faces detected "
    f"({seconds['samples_and_landmarks']:.1f} s)"
  )

  iou, shown = iou_study(gen, factors, layer, test, record, config, seconds)
  for name in IOU_METHODS:
    log(f"IoU {name}: " + ", ".join(f"{r} {iou[name][r]['iou']:.3f}" for r in REGIONS))
  metrics = dict(
    generator=generator,
    arch=gen.arch,
    layer=layer,
    feature_shape=[h, w, c],
    rank_c=int(factors.appearances.shape[1]),
    rank_s=int(factors.parts.shape[1]),
    factors=os.path.abspath(config.factors),
    fit_seed=fit_seed,
    fit_num_samples=record.get("num_samples"),
    fit_steps=record.get("steps"),
    eval_seed=eval_seed,
    num_eval=config.num_eval,
    detected=int(test.detected.sum()),
    detected_fraction=float(test.detected.mean()),
    regions=list(REGIONS),
    part_iou=iou,
    seconds=seconds,
    config=json_io.jsonable(vars(config)),
  )

  if config.roir:
    start = time.time()
    val = make_split(
      gen, stream, layer, np.arange(config.num_eval, config.num_eval + config.num_val), config, out
    )
    seconds["val_samples_and_landmarks"] = time.time() - start
    refined_test = jnp.asarray(refine_parts(test.features, factors, config.batch_size))
    metrics["roir"], metrics["selected"] = roir_study(
      gen, layer, factors, record, val, test, refined_test, config, seconds
    )
    metrics["num_val"] = config.num_val
    metrics["val_detected"] = int(val.detected.sum())
  metrics = outputs.write_metrics(out, metrics)
  if distributed.is_writer():
    with open(os.path.join(out, "tables.md"), "w") as f:
      f.write(tables(metrics))
    viz.plot_parts_grid(
      test.rgb[: config.num_show],
      list(shown.items()),
      (h, w),
      os.path.join(out, "parts.png"),
      heatmaps=np.asarray(factors.parts),
    )
    viz.plot_regions(
      test.rgb[: config.num_show],
      test.regions[: config.num_show],
      test.detected[: config.num_show],
      REGIONS,
      os.path.join(out, "regions.png"),
    )
  return metrics


# ----------------------------------------------------------------------------- outputs


def tables(metrics: dict) -> str:
  """Markdown: best-part IoU per method and region, then the ROIR table (with --roir)."""
  lines = [
    f"Best-part IoU ({metrics['arch']}, layer {metrics['layer']}, R_C = "
    f"{metrics['rank_c']}, R_S = {metrics['rank_s']}; mean over "
    f"{metrics['detected']} detected of {metrics['num_eval']} eval samples, seed "
    f"{metrics['eval_seed']}; ± std over samples of the matched part's IoU):",
    "",
    "| method | " + " | ".join(REGIONS) + " | mean |",
    "|---" * (len(REGIONS) + 2) + "|",
  ]
  for name, entry in metrics["part_iou"].items():
    cells = [f"{entry[r]['iou']:.2f} ± {entry[r]['std']:.2f}" for r in REGIONS]
    note = " (per-sample best cluster)" if entry["matching"] == "per_sample" else ""
    lines.append(
      f"| {name}{note} | " + " | ".join(cells) + f" | {entry['mean_over_regions']:.3f} |"
    )
  if metrics.get("roir"):
    lines += [
      "",
      f"ROIR (Eq. 13, lower is better), mean ± std over test samples (n per cell "
      f"in metrics.json); selection on {metrics['val_detected']} detected validation "
      "samples:",
      "",
      "| method | " + " | ".join(REGIONS) + " |",
      "|---" * (len(REGIONS) + 1) + "|",
    ]
    for name, entry in metrics["roir"].items():
      lines.append(f"| {name} | " + " | ".join(outputs.mean_std(entry[r]) for r in REGIONS) + " |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  cli.main(run, SPEC)
