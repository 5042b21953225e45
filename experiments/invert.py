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
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from experiments import real_images
from experiments.real_images import BadImage, read_png, write_png  # noqa: F401 (API)
import panda_jax as pj
from panda_jax import inversion
from panda_jax import parts_eval
from panda_jax import viz

SPEC = common.spec(
    "generator", "layer", "out", "seed", "steps", *common.DISTRIBUTED, *common.INVERSION,
    benchmark=common.Flag("bool", False, "Run the issue-21 measurement; --out is then the "
                          "JSON file to write."),
    num_images=common.Flag("integer", 64, "Held-out renders (and generated samples) the "
                           "benchmark scores."),
    dcgan=common.Flag("string", None, "A converted DCGAN directory the benchmark also "
                      "scores (held-out samples, latents discarded)."))

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
  if not config.image:
    raise real_images.BadImage("--image is required (a PNG), or pass --benchmark")
  image = real_images.load_image(config.image, gen)  # Everything checked before --out exists.
  layer = common.resolve_layer(gen, config.layer)
  if config.steps < 0 or config.feature_steps < 0:
    raise ValueError(f"--steps and --feature_steps must be >= 0, got {config.steps}, "
                     f"{config.feature_steps}")
  out = common.output_dir(config.out)
  result, seconds = real_images.timed_invert(gen, image, config, layer, config.steps)
  recon = np.asarray(result.reconstruction)
  history = np.asarray(result.loss_history)
  latent_recon = gen.generate(result.latents)[..., :image.shape[-1]]
  if common.is_writer():
    viz.plot_edit(np.asarray(image), recon, os.path.join(out, "inversion.png"))
    save_latents(os.path.join(out, "latents.npz"), result)
  return common.write_metrics(out, dict(
      image=os.path.abspath(config.image), image_sha256=real_images.file_sha256(config.image),
      generator=config.generator, layer=layer, **real_images.settings(config, config.steps),
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
  inv, timings["invert_batch_s"] = real_images.timed_invert(gen, rgb, config, layer, config.steps)
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
    _, timings[name] = real_images.timed_invert(gen, one, config, layer, config.steps, seed=1, progress=False)
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


def dcgan_benchmark(config, n: int) -> dict:
  """PSNR of held-out DCGAN samples (images only; their latents are discarded)."""
  gen = common.load_generator(config.dcgan)
  layer = common.resolve_layer(gen, None)
  z = jax.random.normal(jax.random.PRNGKey(2100 + config.seed), (n, gen.z_dim))
  images = np.asarray(gen.generate(gen.latents(z)))
  del z
  inv, seconds = real_images.timed_invert(gen, images, config, layer, config.steps)
  return dict(generator=config.dcgan, layer=layer, seconds=seconds,
              psnr_latents=_stats(inversion.psnr(gen.generate(inv.latents), images)),
              psnr=_stats(inversion.psnr(inv.reconstruction, images)))


if __name__ == "__main__":
  common.main(real_images.cli(run), SPEC)
