"""Local edits `Z_i + alpha a_j p_k^T` at a part, a union of parts or a mask (Sec. 3.3.1).

    python -m experiments.edit --factors=/tmp/panda --edit=3:5:4 --edit=mask.png:2:3 --out=...
    python -m experiments.edit --recipe=CARD.json --seeds=0,5 --factors=/tmp/panda --out=...
    python -m experiments.edit --image=face.png --factors=/tmp/panda --edit=3:5:4 --out=...

Each `--edit=PART:APPEARANCE:ALPHA` names where (a part index, indices joined
by '+' for their union, or a mask file: `.npy`, or a `.png` whose grey level is
the weight, at the image or the feature resolution), which appearance and how
strongly (`--relative_alpha`); `--normalise` maps a part into [0, 1] by
min-max (default, the official code) or by its maximum. Writes `edit_T.png` (original / edited /
squared error of the first `--num_show` samples) for each edit, `edit_all.png`
(all edits at once) when there are several, and metrics.json: for each edit its
absolute alpha, the mean squared change of the image and its ROIR (Eq. 13, lower
is more local) inside the mask, or, when the generator carries ground-truth
labels, inside the labelled region(s) that best match the part (by IoU).

With `--image`, a real image is edited instead of samples: it is inverted
(`pj.invert`: `--inversion_steps` on the latents, then `--feature_steps` on the
features at the factors' layer), the edits act on the inverted features and the
rest of the generator renders them. `edit_T.png` then shows reconstruction /
edited / squared error, `inversion.png` image / reconstruction / error, and
metrics.json also names the image (path, sha256), the inversion settings and
its PSNR. A bad PNG exits 2 with one line, before anything is written.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
from matplotlib import image as mpimg

from experiments.plumbing import cli
from experiments.plumbing import decomposition
from experiments.plumbing import distributed
from experiments.plumbing import edits as edits_lib
from experiments.plumbing import options
from experiments.plumbing import outputs
from experiments.plumbing import real_images
from experiments.plumbing import sampling
from panda_jax import editing
from panda_jax import generator_ops
from panda_jax import inversion
from panda_jax import parts_eval
from panda_jax import recipes
from panda_jax import viz
from panda_jax.data import toyfaces

SPEC = options.spec(
  *options.WITH_FACTORS,
  "relative_alpha",
  *options.INVERSION,
  edit=options.Flag(
    "multi_string",
    ["0:0:3"],
    "PART:APPEARANCE:ALPHA, PART a part index, "
    "indices joined by '+', or a mask file (.npy or .png); repeatable.",
  ),
  recipe=options.Flag(
    "string",
    None,
    "A recipe card (JSON, `panda_jax.recipes`) to replay "
    "instead of --edit; refused unless --generator and the factors are "
    "the ones it was made with. Its samples come from its own stream.",
  ),
  seeds=options.Flag(
    "list",
    None,
    "With --recipe: the seeds (sample indices of the card's "
    "stream) to replay on; default the card's.",
  ),
  normalise=options.Flag(
    "string",
    "minmax",
    "How a part is mapped into [0, 1] before the "
    "edit: 'minmax' (the official code) or 'max' (panda_jax.editing).",
  ),
  save_recipes=options.Flag(
    "bool",
    False,
    "Also write a recipe card per single edit into OUT/recipes/ (replayable with --recipe).",
  ),
  inversion_steps=options.Flag(
    "integer",
    300,
    "With --image: optimiser steps on the latents (then --feature_steps on the features).",
  ),
)


def load_mask(path: str) -> np.ndarray:
  """A `[H, W]` float32 mask in [0, 1] from `.npy` or `.png` (grey level = weight)."""
  if path.endswith(".npy"):
    mask = np.load(path, allow_pickle=False)
  elif path.endswith(".png"):
    mask = mpimg.imread(path)
    mask = mask[..., :3].mean(-1) if mask.ndim == 3 else mask
  else:
    raise ValueError(f"mask file {path!r} must be a .npy or a .png")
  mask = np.asarray(mask, np.float32)
  if mask.ndim != 2 or not np.all(np.isfinite(mask)) or mask.min() < 0 or mask.max() > 1:
    raise ValueError(
      f"mask {path!r} must be [H, W] with values in [0, 1], got shape "
      f"{mask.shape}, range [{mask.min()}, {mask.max()}]"
    )
  return mask


def parse_edit(text: str):
  """`"PART:APPEARANCE:ALPHA"` -> `(part, appearance, alpha)`; a mask file is loaded."""
  fields = text.rsplit(":", 2)
  if len(fields) != 3:
    raise ValueError(f"--edit must be PART:APPEARANCE:ALPHA, got {text!r}")
  part, appearance, alpha = fields
  try:
    appearance, alpha = int(appearance), float(alpha)
  except ValueError:
    raise ValueError(f"--edit {text!r}: APPEARANCE must be an integer and ALPHA a number") from None
  if part.endswith((".npy", ".png")):
    return load_mask(part), appearance, alpha
  return options.parse_part(part), appearance, alpha


def region(part, samples: toyfaces.Samples, parts, grid):
  """Where an edit should act at image size, `([n, H, W] or [H, W], names)`, or None."""
  size = samples.rgb.shape[1:3]
  if isinstance(part, np.ndarray):
    if part.shape == size:
      return part, ["mask"]
    if size[0] % part.shape[0] or size[1] % part.shape[1]:
      raise ValueError(f"a mask of size {part.shape} does not tile images of size {tuple(size)}")
    return viz.upsample_blocks(np.asarray(part, np.float32), size), ["mask"]
  if samples.labels is None:
    return None
  return parts_eval.part_regions(parts, samples.labels, samples.label_names, grid, part)


def replay(config) -> dict:
  """Replays `--recipe` on `--seeds` (or, for a card made on a real image, on `--image`):
  `OUT/replay.npz` (raw `originals`, `edited`), `OUT/recipe.png` and metrics.json
  with the ROIR inside the edit's region."""
  card = recipes.load(config.recipe)
  gen = sampling.load_generator(config.generator)
  made_on = card["samples"].get("image")
  if made_on is None and config.image:
    raise ValueError("--image: this recipe was made on generated samples (replay it with --seeds)")
  if made_on is not None:
    if not config.image:
      raise ValueError(
        f"this recipe was made on a real image (sha256 "
        f"{made_on['sha256'][:12]}...): pass it as --image"
      )
    image = real_images.load_image(config.image, gen)
    if real_images.file_sha256(config.image) != made_on["sha256"]:
      raise ValueError(
        f"--image={config.image} is not the image the recipe was made on "
        f"(sha256 {made_on['sha256'][:12]}...)"
      )
  out = outputs.output_dir(config.out)
  factors, layer = decomposition.factors_for(config, gen)
  recipes.check_matches(
    card,
    recipes.generator_identity(config.generator, gen),
    recipes.factors_identity(factors, layer, config.factors),
  )
  rgb = lambda im: toyfaces.split_labels(im).rgb
  if made_on is not None:
    seeds = []
    one = recipes.image_sample(gen, layer, image, made_on["inversion"], progress=True)
    before, after, (mean, std) = recipes.replay(card, gen, factors, rgb=rgb, samples=[one])
  else:
    seeds = [int(t) for t in config.seeds] if config.seeds else card["samples"]["seeds"]
    before, after, (mean, std) = recipes.replay(card, gen, factors, seeds, rgb=rgb)
  if distributed.is_writer():
    np.savez(
      os.path.join(out, "replay.npz"),
      originals=before,
      edited=after,
      seeds=np.asarray(seeds, np.int64),
    )
    viz.plot_edit(rgb(before), rgb(after), os.path.join(out, "recipe.png"))
  return outputs.write_metrics(
    out,
    dict(
      recipe=config.recipe,
      checksum=card["checksum"],
      seeds=seeds,
      layer=layer,
      roir_mean=mean,
      roir_std=std,
      generator=config.generator,
      image=config.image or None,
    ),
  )


def _save_recipes(config, gen, factors, layer, edits, results, out, samples: dict) -> list:
  """`--save_recipes`: one card per single edit in `OUT/recipes/edit_T.json`; the paths."""
  if not (config.save_recipes and distributed.is_writer()):
    return []
  generator = recipes.generator_identity(config.generator, gen)
  identity = recipes.factors_identity(factors, layer, config.factors)
  paths = []
  for t, ((part, j, alpha), result) in enumerate(zip(edits, results)):
    roir = (result.get("roir_mean"), result.get("roir_std"))
    # An edit that changes nothing (alpha 0) has no ROIR (0 / 0): the card records null.
    roir = roir if all(v is not None and math.isfinite(v) for v in roir) else None
    card = recipes.make_card(
      generator=generator,
      factors=identity,
      part=part,
      appearance=j,
      alpha=alpha,
      refined=False,
      roir=roir,
      normalise=config.normalise,
      **samples,
    )
    paths.append(recipes.save(os.path.join(out, "recipes", f"edit_{t}.json"), card))
  return paths


def _groups(edits):
  """Each edit alone, then all of them together when there are several."""
  return [[e] for e in edits] + ([edits] if len(edits) > 1 else [])


def _parsed_edits(config):
  edits = [parse_edit(text) for text in config.edit]
  if not edits:
    raise ValueError("give at least one --edit=PART:APPEARANCE:ALPHA")
  return edits


def _group_result(name, group, before, after, factors, grid, out) -> dict:
  """One group's metrics (and figure): mean squared change, ROIR inside its region."""
  result = dict(
    name=name,
    edits=[
      dict(part="mask" if isinstance(p, np.ndarray) else p, appearance=j, alpha=a)
      for p, j, a in group
    ],
    mean_squared_change=float(np.mean(np.square(after.rgb - before.rgb))),
  )
  regions = [region(p, before, factors.parts, grid) for p, _, _ in group]
  if all(r is not None for r in regions):
    mask = np.max([np.broadcast_to(m, before.rgb.shape[:3]) for m, _ in regions], axis=0)
    result.update(
      edits_lib.roir(before.rgb, after.rgb, mask),
      region=list(dict.fromkeys(n for _, names in regions for n in names)),
    )
  if distributed.is_writer():
    viz.plot_edit(before.rgb, after.rgb, os.path.join(out, f"{name}.png"))
  return result


def edit_image(config) -> dict:
  """`--image`: inverts the image, edits its features at the factors' layer."""
  gen = sampling.load_generator(config.generator)
  image = real_images.load_image(config.image, gen)  # Everything checked before --out exists.
  edits = _parsed_edits(config)
  if config.inversion_steps < 0 or config.feature_steps < 0:
    raise ValueError(
      f"--inversion_steps and --feature_steps must be >= 0, got "
      f"{config.inversion_steps}, {config.feature_steps}"
    )
  out = outputs.output_dir(config.out)
  factors, layer = decomposition.factors_for(config, gen)
  settings = real_images.settings(config, config.inversion_steps)
  start = time.perf_counter()
  one = recipes.image_sample(gen, layer, image, settings, progress=True)  # As a recipe replays.
  seconds = time.perf_counter() - start
  channels = image.shape[-1]
  render = lambda x: toyfaces.Samples(
    np.asarray(gen.resume(x, one.carry, one.latents, layer))[..., :channels], None, ()
  )
  reconstruction = toyfaces.Samples(np.asarray(one.image)[..., :channels], None, ())
  if distributed.is_writer():
    viz.plot_edit(np.asarray(image), reconstruction.rgb, os.path.join(out, "inversion.png"))
  edits = [
    (part, j, edits_lib.absolute_alpha(config, one.features, alpha)) for part, j, alpha in edits
  ]
  results = []
  for t, group in enumerate(_groups(edits)):
    edited = editing.edit_many(
      one.features, factors.appearances, factors.parts, group, normalise=config.normalise
    )
    name = f"edit_{t}" if t < len(edits) else "edit_all"
    results.append(
      _group_result(
        name, group, reconstruction, render(edited), factors, one.features.shape[1:3], out
      )
    )
  sha256 = real_images.file_sha256(config.image)
  cards = _save_recipes(
    config,
    gen,
    factors,
    layer,
    edits,
    results,
    out,
    dict(image={"sha256": sha256, "inversion": settings}),
  )
  return outputs.write_metrics(
    out,
    dict(
      layer=layer,
      generator=config.generator,
      normalise=config.normalise,
      edits=results,
      recipes=cards,
      image=os.path.abspath(config.image),
      image_sha256=sha256,
      inversion=settings,
      inversion_seconds=seconds,
      psnr=float(inversion.psnr(reconstruction.rgb, image)[0]),
    ),
  )


def run(config) -> dict:
  """Runs the edits; returns the metrics written to `OUT/metrics.json`."""
  if config.recipe:
    return replay(config)
  if config.image:
    return edit_image(config)
  out = outputs.output_dir(config.out)
  gen = sampling.load_generator(config.generator)
  factors, layer = decomposition.factors_for(config, gen)
  edits = _parsed_edits(config)
  indices = np.arange(config.num_show)
  features = sampling.extract_features(gen, config, layer, indices)
  grid = features.shape[1:3]
  edits = [(part, j, edits_lib.absolute_alpha(config, features, alpha)) for part, j, alpha in edits]
  lat = sampling.latents(gen, config, indices)
  results = []
  for t, group in enumerate(outputs.progress_iter(_groups(edits), "edits")):
    name = f"edit_{t}" if t < len(edits) else "edit_all"
    before, after = generator_ops.edit_images(
      gen, lat, layer, factors.appearances, factors.parts, group, normalise=config.normalise
    )
    results.append(
      _group_result(
        name, group, toyfaces.split_labels(before), toyfaces.split_labels(after), factors, grid, out
      )
    )
  cards = _save_recipes(
    config,
    gen,
    factors,
    layer,
    edits,
    results,
    out,
    dict(
      seed=config.seed, seeds=list(range(config.num_show)), truncation_psi=config.truncation_psi
    ),
  )
  return outputs.write_metrics(
    out,
    dict(
      layer=layer,
      generator=config.generator,
      num_show=config.num_show,
      normalise=config.normalise,
      edits=results,
      recipes=cards,
    ),
  )


if __name__ == "__main__":
  cli.main(run, SPEC)
