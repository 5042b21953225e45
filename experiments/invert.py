"""Inversion of a real image into a generator, then its features at the edit layer.

    python -m experiments.invert --image=face.png --out=/tmp/inv            # embedded toy faces
    python -m experiments.invert --image=face.png --generator=ckpt/dcgan --layer=2 --out=...
    python -m experiments.invert --benchmark --out=/tmp/invert_benchmark.json

Writes `OUT/inversion.png` (image / reconstruction / squared error),
`OUT/metrics.json` (psnr, loss, seconds, ...) and `OUT/latents.npz` (the
latents pytree's leaves `latent_0..`, and `features` at `--layer` when
`--feature_steps > 0`). A PNG of another size or channel count than the
generator's images, a file that is not a PNG or a corrupt PNG: exit code 2,
one line `error: ...` on stderr, nothing written.

`--benchmark` (item 3 of issue 21) inverts `--num_images` toy-faces renders
the generator never saw (`toyfaces.sample(np.random.default_rng([21, 0]))`;
training drew `default_rng([0, step])`), scores reconstruction PSNR, the part
IoU of the parts on the inverted features and the ROIR of eye / mouth edits
against the renders' own labels beside the same edits on generated samples,
and (with `--dcgan=DIR`) the PSNR of held-out DCGAN samples; times one 32x32
inversion. Writes the JSON to `--out`.
"""
from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
import panda_jax as pj
from panda_jax import inversion
from panda_jax import parts_eval
from panda_jax import viz

SPEC = common.spec(
    "generator", "layer", "out", "seed", "steps", *common.DISTRIBUTED,
    image=common.Flag("string", None, "The PNG to invert (RGB for an RGB generator; its "
                      "size must be the generator's)."),
    feature_steps=common.Flag("integer", 100, "Steps fine-tuning the features at --layer "
                              "after the latents (0: latents only)."),
    structure_weight=common.Flag("float", 1.0, "Weight of the Laplacian-pyramid L1 term "
                                 "beside the pixel MSE in the latent stage (0: pixels only)."),
    feature_structure_weight=common.Flag("float", 0.0, "The same weight in the feature "
                                         "stage."),
    tie_layers=common.Flag("bool", False, "One W code per image for StyleGANs (W) instead "
                           "of one per layer (W+)."),
    benchmark=common.Flag("bool", False, "Run the issue-21 measurement; --out is then the "
                          "JSON file to write."),
    num_images=common.Flag("integer", 64, "Held-out renders (and generated samples) the "
                           "benchmark scores."),
    dcgan=common.Flag("string", None, "A converted DCGAN directory the benchmark also "
                      "scores (held-out samples, latents discarded)."))

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class BadImage(ValueError):
  """An input image that cannot be inverted (exit code 2)."""


# ----------------------------------------------------------------------------- PNG I/O


def read_png(path: str) -> np.ndarray:
  """A PNG as float32 `[H, W, ch]` in [-1, 1] (ch 1 grey, 2 grey+alpha, 3 RGB, 4 RGBA).

  Raises:
    BadImage: a missing file, a file that is not a PNG, a corrupt PNG.
  """
  from PIL import Image  # pylint: disable=import-outside-toplevel (matplotlib's dependency)
  try:
    with open(path, "rb") as f:
      head = f.read(8)
  except OSError as e:
    raise BadImage(f"cannot read --image={path}: {e.strerror or e}") from None
  if head != PNG_MAGIC:
    raise BadImage(f"--image={path} is not a PNG file (starts with {head[:8]!r})")
  try:
    with Image.open(path) as img:
      img.load()
      if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
      data = np.asarray(img)
  except Exception as e:  # pylint: disable=broad-except  (PIL raises many kinds)
    raise BadImage(f"--image={path} is a corrupt PNG ({type(e).__name__}: "
                   f"{' '.join(str(e).split())})") from None
  if data.dtype == np.bool_:
    data = data.astype(np.float32)
  elif np.issubdtype(data.dtype, np.integer):
    data = data.astype(np.float32) / (65535.0 if data.max(initial=0) > 255 else 255.0)
  data = np.asarray(data, np.float32)
  if data.ndim == 2:
    data = data[..., None]
  return data * 2 - 1


def write_png(path: str, image) -> None:
  """Writes `[H, W, 3]` (or `[H, W, 1]`) in [-1, 1] as an 8-bit PNG."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  image = np.asarray(image, np.float32)
  data = np.round((np.clip(image, -1, 1) + 1) * 127.5).astype(np.uint8)
  Image.fromarray(data[..., 0] if data.shape[-1] == 1 else data).save(path, format="PNG")


def load_image(path: str, gen) -> jax.Array:
  """`path` as a checked `[1, H, W, ch]` batch for `gen`; `BadImage` names what is wrong."""
  if not path:
    raise BadImage("--image is required (a PNG), or pass --benchmark")
  image = read_png(path)
  try:
    return inversion.check_images(gen, image[None])
  except ValueError as e:
    raise BadImage(f"--image={path}: {e}") from None


# ----------------------------------------------------------------------------- one image


def save_latents(path: str, result: inversion.Inversion) -> None:
  leaves = jax.tree.leaves(result.latents)
  arrays = {f"latent_{i}": np.asarray(l) for i, l in enumerate(leaves)}
  if result.features is not None:
    arrays["features"] = np.asarray(result.features)
  np.savez(path, **arrays)


def run(config) -> dict:
  """Inverts `--image` (or runs `--benchmark`); returns the metrics written."""
  if config.benchmark:
    return benchmark(config)
  gen = common.load_generator(config.generator)
  image = load_image(config.image, gen)            # Everything checked before --out exists.
  layer = common.resolve_layer(gen, config.layer)
  if config.steps < 0 or config.feature_steps < 0:
    raise ValueError(f"--steps and --feature_steps must be >= 0, got {config.steps}, "
                     f"{config.feature_steps}")
  out = common.output_dir(config.out)
  result, seconds = _timed_invert(gen, image, config, layer)
  recon = np.asarray(result.reconstruction)
  history = np.asarray(result.loss_history)
  latent_recon = gen.generate(result.latents)[..., :image.shape[-1]]
  if common.is_writer():
    viz.plot_edit(np.asarray(image), recon, os.path.join(out, "inversion.png"))
    save_latents(os.path.join(out, "latents.npz"), result)
  return common.write_metrics(out, dict(
      image=os.path.abspath(config.image), generator=config.generator, layer=layer,
      steps=config.steps, feature_steps=config.feature_steps,
      structure_weight=config.structure_weight,
      feature_structure_weight=config.feature_structure_weight, tie_layers=config.tie_layers,
      psnr=float(inversion.psnr(recon, image)[0]),
      psnr_latents_only=float(inversion.psnr(latent_recon, image)[0]),
      loss=float(history[-1]) if history.size else None, loss_history=history,
      seconds=seconds))


# ----------------------------------------------------------------------------- benchmark


def heldout_renders(num: int):
  """`num` toy-faces renders of a stream training never drew from (its batches are
  `default_rng([seed=0, step])`): `(rgb [n, 32, 32, 3], labels [n, 32, 32])`."""
  from panda_jax.data import toyfaces  # pylint: disable=import-outside-toplevel
  batch = toyfaces.sample(np.random.default_rng([21, 0]), num)
  return np.asarray(batch.images, np.float32), np.asarray(batch.labels, np.int32)


def _iou(parts, labels, names, grid):
  best, _, _ = parts_eval.best_part_iou(parts, labels, len(names), grid)
  return dict(zip(names, np.round(np.asarray(best), 4).tolist()))


def _label_iou(pred, labels, names):
  """Per-label IoU of two label maps `[n, H, W]`."""
  out = {}
  for k, name in enumerate(names):
    a, b = pred == k, labels == k
    union = np.sum(a | b)
    out[name] = round(float(np.sum(a & b) / union), 4) if union else None
  return out


def benchmark(config) -> dict:
  """Issue 21 items 3 and 4 on the embedded toy faces (and `--dcgan`)."""
  from panda_jax.data import toyfaces  # pylint: disable=import-outside-toplevel
  if not config.out:
    raise ValueError("--out is required (the benchmark's JSON file)")
  gen = common.load_generator(config.generator)
  layer = common.resolve_layer(gen, config.layer)
  n = config.num_images
  results = dict(generator=config.generator, layer=layer, steps=config.steps,
                 feature_steps=config.feature_steps, structure_weight=config.structure_weight,
                 feature_structure_weight=config.feature_structure_weight,
                 num_images=n, heldout="toyfaces.sample(np.random.default_rng([21, 0]))")
  rgb, labels = heldout_renders(n)
  names = toyfaces.PARTS

  # Factors as `decompose` makes them by default: 256 samples, R_C 8, R_S 8, 200 steps.
  sample_key, fit_key = common.keys(config.seed)
  cfg = common.make_config(common.spec(*common.SAMPLING), generator=config.generator,
                           seed=config.seed)
  features = common.extract_features(gen, cfg, layer, np.arange(256))
  factors = pj.fit(features, 8, 8, steps=200, key=fit_key, progress=False)
  A, P = factors.appearances, factors.parts
  grid = features.shape[1:3]
  alpha = common.absolute_alpha(common.make_config(SPEC_ALPHA), features, 3.0)

  # Generated (test) samples: a stream of its own, the factors never saw them.
  gen_idx = np.arange(10_000, 10_000 + n)
  gen_lat = common.latents(gen, cfg, gen_idx)
  gen_feat, gen_carry = gen.split(gen_lat, layer)
  gen_samples = common.split_labels(gen.generate(gen_lat))

  # Inversion of the renders.
  timings = {}
  inv, timings["invert_batch_s"] = _timed_invert(gen, rgb, config, layer)
  latent_out = gen.generate(inv.latents)
  latent_only = common.split_labels(latent_out)
  full = gen.resume(inv.features, inv.carry, inv.latents, layer)
  full_samples = common.split_labels(full)
  results["toyfaces"] = dict(
      psnr_latents=_stats(inversion.psnr(latent_only.rgb, rgb)),
      psnr=_stats(inversion.psnr(full_samples.rgb, rgb)),
      # Global parts are the same positions on every sample: their IoU with the
      # renders' labels is how well the renders are aligned with the generated faces.
      part_iou_global_vs_renders=_iou(P, labels, names, grid),
      part_iou_global_vs_generated=_iou(P, gen_samples.labels, names, grid),
      # Per-sample parts from the inverted features (the package's refinement).
      part_iou_refined_inverted_vs_renders=_iou(pj.refine(inv.features, A, P), labels, names,
                                                grid),
      part_iou_refined_generated_vs_generated=_iou(pj.refine(gen_feat, A, P),
                                                   gen_samples.labels, names, grid),
      # The generator's own label channels of the inversion vs the renders' labels.
      label_iou_of_reconstruction=_label_iou(full_samples.labels, labels, names),
      label_iou_of_latent_reconstruction=_label_iou(latent_only.labels, labels, names))

  # Eye and mouth edits: the part best matching the label on generated samples, the
  # appearance that changes that region most there (a validation stream), alpha 3
  # mean fibre norms; then ROIR on the real renders (their labels) and on generated.
  _, match, _ = parts_eval.best_part_iou(P, gen_samples.labels, len(names), grid)
  val_lat = common.latents(gen, cfg, np.arange(20_000, 20_000 + 32))
  val_feat, val_carry = gen.split(val_lat, layer)
  val_samples = common.split_labels(gen.generate(val_lat))
  edits = {}
  for roi in ("eyes", "mouth"):
    label = names.index(roi)
    part = int(np.asarray(match)[label])
    val_mask = (val_samples.labels == label).astype(np.float32)

    def change(j, feats=val_feat, carry=val_carry, lat=val_lat, mask=val_mask, part=part):
      after = common.split_labels(gen.resume(pj.edit(feats, A, P, part, j, alpha), carry, lat,
                                             layer)).rgb
      before = common.split_labels(gen.resume(feats, carry, lat, layer)).rgb
      return float(np.sum(np.square(after - before).mean(-1) * mask) / max(mask.sum(), 1))
    j = int(np.argmax([change(j) for j in range(A.shape[1])]))

    def roir(feats, carry, lat, mask):
      before = common.split_labels(gen.resume(feats, carry, lat, layer)).rgb
      after = common.split_labels(gen.resume(pj.edit(feats, A, P, part, j, alpha), carry,
                                             lat, layer)).rgb
      return common.roir(before, after, mask)
    edits[roi] = dict(
        part=part, appearance=j, alpha=alpha,
        real=roir(inv.features, inv.carry, inv.latents, (labels == label).astype(np.float32)),
        generated=roir(gen_feat, gen_carry, gen_lat,
                       (gen_samples.labels == label).astype(np.float32)))
  results["toyfaces"]["edits"] = edits

  # Time of one 32x32 image (item 4): first call (with compilation) and warm.
  one = rgb[:1]
  for name in ("one_image_first_call_s", "one_image_s"):
    _, timings[name] = _timed_invert(gen, one, config, layer, seed=1, progress=False)
  results["timing"] = timings

  if config.dcgan:
    results["dcgan"] = dcgan_benchmark(config, n)
  os.makedirs(os.path.dirname(os.path.abspath(config.out)), exist_ok=True)
  with open(config.out, "w") as f:
    json.dump(common.jsonable(results), f, indent=1, sort_keys=True)
  return results


SPEC_ALPHA = common.spec("relative_alpha")


def _stats(values) -> dict:
  values = np.asarray(values, np.float64)
  return dict(mean=round(float(values.mean()), 3), std=round(float(values.std()), 3),
              min=round(float(values.min()), 3))


def _timed_invert(gen, images, config, layer, *, seed=None, progress=True):
  """`pj.invert` with the launcher's settings: `(Inversion, wall seconds)`."""
  start = time.perf_counter()
  result = inversion.invert(gen, images, key=jax.random.PRNGKey(config.seed if seed is None else seed),
                            steps=config.steps, layer=layer, feature_steps=config.feature_steps,
                            structure_weight=config.structure_weight,
                            feature_structure_weight=config.feature_structure_weight,
                            tie_layers=config.tie_layers, progress=progress)
  jax.block_until_ready(result.reconstruction)
  return result, time.perf_counter() - start


def dcgan_benchmark(config, n: int) -> dict:
  """PSNR of held-out DCGAN samples (images only; their latents are discarded)."""
  gen = common.load_generator(config.dcgan)
  layer = common.resolve_layer(gen, None)
  z = jax.random.normal(jax.random.PRNGKey(2100 + config.seed), (n, gen.z_dim))
  images = np.asarray(gen.generate(gen.latents(z)))
  del z
  inv, seconds = _timed_invert(gen, images, config, layer)
  return dict(generator=config.dcgan, layer=layer, seconds=seconds,
              psnr_latents=_stats(inversion.psnr(gen.generate(inv.latents), images)),
              psnr=_stats(inversion.psnr(inv.reconstruction, images)))


def _cli(config) -> dict:
  try:
    return run(config)
  except BadImage as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  common.main(_cli, SPEC)
