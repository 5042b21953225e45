"""Edit recipes: a local edit (Sec. 3.3.1) kept as a small, replayable JSON card.

A card names everything an edit depends on, so that `replay` gives the same
pixels again on the same machine, and refuses what does not match:

    {"format": "panda-jax-recipe/3",
     "generator": {"name": "toyfaces", "sha256": <of its converted parameters>},
     "factors": {"path": "/tmp/panda", "sha256": <of A and P>, "layer": 5,
                 "rank_c": 16, "rank_s": 8},
     "edit": {"part": [2] | {"mask": <packed bits>, "shape": [H, W]},
              "appearance": 3, "alpha": 12.5, "normalise": "minmax",
              "refined": false | {"method": "register", "k": null, "steps": 0,
                                  "min_gain": 0.1}},
     "samples": {"seed": 0, "truncation_psi": 1.0, "seeds": [0, 5]}
              | {"image": {"sha256": <of the image file>, "inversion": {"steps": 300,
                 "feature_steps": 100, "structure_weight": 1.0,
                 "feature_structure_weight": 0.0, "tie_layers": false, "seed": 0}}},
     "roir": {"mean": 0.1, "std": 0.02},
     "checksum": <sha256 of everything above>}

`alpha` is absolute (the strength added to the features). A seed `t` names
sample `t` of the stream `fold_in(split(PRNGKey(seed))[0], t)` (`generator_ops.seed_keys`,
`generator_ops.sample_latents`; the launchers' `--seed`). Every sample is
rendered alone (batch of one), so its pixels never depend on which other seeds
are replayed with it. A card made on a real image names the image file's
sha256 and the `inversion.invert` settings instead (`image_sample` inverts it
again: the same features on the same machine). `normalise` is how parts are mapped into [0, 1]
(`editing.normalise_part`); `refined` names the `refinement.refine` options of
the per-sample parts (false: the global parts; `min_gain` null for "paper"). Both
are recorded so that a card replays the same edit when the library's defaults
change. Older cards replay as they were made: format `panda-jax-recipe/2` (before
the translation was gated) with `min_gain=0` for "register"; format
`panda-jax-recipe/1` (before anything was recorded) with `normalise="max"` and,
refined, the ungated translation with no steps. The checksum
catches a card edited by hand (integrity, not authenticity). Masks are binary,
at image resolution.

Everything here but `save`/`load` is pure; the generator is any object with the
`panda_jax.generators` API.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from panda_jax import editing
from panda_jax import generator_ops
from panda_jax import inversion
from panda_jax import json_io
from panda_jax import metrics
from panda_jax import refinement
from panda_jax import viz

FORMAT = "panda-jax-recipe/3"
_FORMAT_2 = "panda-jax-recipe/2"
_FORMAT_1 = "panda-jax-recipe/1"
_FORMATS = (FORMAT, _FORMAT_2, _FORMAT_1)
# What new cards record for refined parts: `refinement.refine`'s defaults, spelled out.
REFINE = {"method": "register", "k": None, "steps": 0, "min_gain": 0.1}
# What cards of format /1 were made with (the library's defaults then).
_FORMAT_1_SETTINGS = ("max", {"method": "register", "k": None, "steps": 0, "min_gain": 0.0})
_MAX_SEEDS = 4096
# The `inversion.invert` settings a card made on a real image records.
INVERSION_KEYS = (
  "steps",
  "feature_steps",
  "structure_weight",
  "feature_structure_weight",
  "tie_layers",
  "seed",
)
_MAX_CARD_BYTES = 1 << 22


# ----------------------------------------------------------------------------- identities


def tree_sha256(tree) -> str:
  """sha256 over the leaves of a pytree: key path, dtype, shape and bytes, sorted by path."""
  digest = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
    array = np.ascontiguousarray(np.asarray(leaf))
    header = f"{jax.tree_util.keystr(path)}|{array.dtype.str}|{array.shape}\n"
    digest.update(header.encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def generator_identity(name: str, gen) -> dict:
  """`{"name", "sha256"}`: the name it was loaded by and the hash of its parameters."""
  return {"name": str(name), "sha256": tree_sha256(gen.params)}


def factors_identity(factors, layer: int, path: Optional[str] = None) -> dict:
  """`{"path", "sha256", "layer", "rank_c", "rank_s"}` of factors (A `[c, r_c]`, P `[s, r_s]`)."""
  appearances, parts = np.asarray(factors.appearances), np.asarray(factors.parts)
  return {
    "path": None if path is None else str(path),
    "sha256": tree_sha256({"appearances": appearances, "parts": parts}),
    "layer": int(layer),
    "rank_c": int(appearances.shape[1]),
    "rank_s": int(parts.shape[1]),
  }


# ----------------------------------------------------------------------------- cards


def _pack_mask(mask) -> dict:
  mask = np.asarray(mask)
  if mask.ndim != 2 or not np.all((mask == 0) | (mask == 1)):
    raise ValueError(f"a recipe mask must be a binary [H, W] array, got shape {mask.shape}")
  bits = np.packbits(mask.astype(bool).ravel())
  return {
    "mask": base64.b64encode(bits.tobytes()).decode("ascii"),
    "shape": [int(d) for d in mask.shape],
  }


def _unpack_mask(spec: dict) -> np.ndarray:
  """`[H, W]` float32 in {0, 1}."""
  shape = spec.get("shape")
  if not (
    isinstance(shape, list)
    and len(shape) == 2
    and all(isinstance(d, int) and 1 <= d <= 8192 for d in shape)
  ):
    raise ValueError(f"recipe mask shape must be [H, W] (positive integers), got {shape!r}")
  try:
    raw = base64.b64decode(spec["mask"], validate=True)
  except (ValueError, TypeError, KeyError):
    raise ValueError("recipe mask is not valid base64") from None
  size = shape[0] * shape[1]
  if len(raw) != (size + 7) // 8:
    raise ValueError(f"recipe mask holds {len(raw)} bytes, a {shape} mask needs {(size + 7) // 8}")
  bits = np.unpackbits(np.frombuffer(raw, np.uint8))[:size]
  return bits.reshape(shape).astype(np.float32)


def _checksum(card: dict) -> str:
  body = {k: v for k, v in card.items() if k != "checksum"}
  text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
  return hashlib.sha256(text.encode()).hexdigest()


def _refine_options(refined, ungated: bool = False) -> Optional[dict]:
  """`refined` (a bool or `refine` options) as the options of the per-sample parts, or None.

  Options without `min_gain` get the library's default for their method (the gate
  of "register"; 0 with `ungated`, what cards of format /2 were made with).
  """
  if isinstance(refined, dict):
    options = dict(refined)
    if "min_gain" not in options:
      register = options.get("method") == "register"
      options["min_gain"] = (0.0 if ungated else REFINE["min_gain"]) if register else None
    return options
  return dict(REFINE) if refined else None


def make_card(
  *,
  generator: dict,
  factors: dict,
  part,
  appearance: int,
  alpha: float,
  refined,
  seed: Optional[int] = None,
  seeds: Optional[Sequence[int]] = None,
  truncation_psi: float = 1.0,
  image: Optional[dict] = None,
  roir: Optional[tuple] = None,
  normalise: str = "minmax",
) -> dict:
  """A validated card (see the module doc), checksum included.

  Args:
    generator: `generator_identity(...)`; factors: `factors_identity(...)`.
    part: a part index, a list of indices (their union) or a binary `[H, W]` mask.
    appearance: j; alpha: the absolute strength.
    refined: False (global parts), True (per-sample parts with `REFINE`) or a
      dict `{method, k, steps[, min_gain]}` of `refinement.refine` options.
    seed: the sample stream; seeds: the samples the edit was made on.
    image: instead of `seed` / `seeds`, a real image: `{"sha256": of its file,
      "inversion": INVERSION_KEYS settings}`.
    roir: `(mean, std)` of Eq. (13) measured on them, or None.
    normalise: how parts are mapped into [0, 1] ("minmax" or "max").
  """
  if isinstance(part, (int, np.integer)):
    part_spec = [int(part)]
  elif isinstance(part, (list, tuple)):
    part_spec = [int(k) for k in part]
  else:
    part_spec = _pack_mask(part)
  card = {
    "format": FORMAT,
    "generator": dict(generator),
    "factors": dict(factors),
    "edit": {
      "part": part_spec,
      "appearance": int(appearance),
      "alpha": float(alpha),
      "normalise": normalise,
      "refined": _refine_options(refined) or False,
    },
    "samples": (
      {"image": {"sha256": image["sha256"], "inversion": dict(image["inversion"])}}
      if image is not None
      else {
        "seed": int(seed),
        "truncation_psi": float(truncation_psi),
        "seeds": [int(t) for t in seeds],
      }
    ),
    "roir": None if roir is None else {"mean": float(roir[0]), "std": float(roir[1])},
  }
  card["checksum"] = _checksum(card)
  return validate(card)


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ValueError(f"invalid recipe card: {message}")


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _is_sha(x) -> bool:
  return isinstance(x, str) and len(x) == 64 and all(ch in "0123456789abcdef" for ch in x)


def validate(card: Any) -> dict:
  """`card` if it is a well-formed, untampered card; otherwise a ValueError naming the problem."""
  _require(isinstance(card, dict), f"expected a JSON object, got {type(card).__name__}")
  _require(
    card.get("format") in _FORMATS, f"format must be one of {_FORMATS}, got {card.get('format')!r}"
  )
  expected = {"format", "generator", "factors", "edit", "samples", "roir", "checksum"}
  _require(set(card) == expected, f"keys must be {sorted(expected)}, got {sorted(card)}")
  _require(
    isinstance(card["checksum"], str) and card["checksum"] == _checksum(card),
    "checksum does not match its content (the card was modified after it was saved)",
  )
  gen, fac, edit, samples = card["generator"], card["factors"], card["edit"], card["samples"]
  _require(
    isinstance(gen, dict) and isinstance(gen.get("name"), str) and _is_sha(gen.get("sha256")),
    "generator must be {name: str, sha256: 64 hex digits}",
  )
  _require(
    isinstance(fac, dict)
    and _is_sha(fac.get("sha256"))
    and all(_is_int(fac.get(k)) and fac[k] >= 0 for k in ("layer", "rank_c", "rank_s"))
    and (fac.get("path") is None or isinstance(fac["path"], str)),
    "factors must be {path, sha256, layer, rank_c, rank_s}",
  )
  keys = {"part", "appearance", "alpha", "refined"}
  if card["format"] != _FORMAT_1:
    keys |= {"normalise"}
  _require(isinstance(edit, dict) and set(edit) == keys, f"edit must be {sorted(keys)}")
  part = edit["part"]
  if isinstance(part, list):
    _require(
      bool(part)
      and all(_is_int(k) and 0 <= k < fac["rank_s"] for k in part)
      and len(set(part)) == len(part),
      f"part must be distinct indices in [0, {fac['rank_s']}), got {part!r}",
    )
  else:
    _require(
      isinstance(part, dict) and set(part) == {"mask", "shape"},
      "part must be a list of indices or {mask, shape}",
    )
    _unpack_mask(part)
  _require(
    _is_int(edit["appearance"]) and 0 <= edit["appearance"] < fac["rank_c"],
    f"appearance must be in [0, {fac['rank_c']}), got {edit['appearance']!r}",
  )
  _require(
    isinstance(edit["alpha"], (int, float))
    and not isinstance(edit["alpha"], bool)
    and math.isfinite(edit["alpha"]),
    f"alpha must be a finite number, got {edit['alpha']!r}",
  )
  if card["format"] == _FORMAT_1:
    _require(isinstance(edit["refined"], bool), "refined must be true or false")
  else:
    _require(
      edit["normalise"] in editing.NORMALISATIONS,
      f"normalise must be one of {editing.NORMALISATIONS}, got {edit['normalise']!r}",
    )
    refined = edit["refined"]
    gated = card["format"] == FORMAT
    keys = {"method", "k", "steps"} | ({"min_gain"} if gated else set())
    _require(
      refined is False
      or (
        isinstance(refined, dict)
        and set(refined) == keys
        and refined["method"] in refinement.METHODS
        and (refined["k"] is None or _is_int(refined["k"]) and refined["k"] >= 1)
        and _is_int(refined["steps"])
        and refined["steps"] >= 0
        and (not gated or _valid_gain(refined["method"], refined["min_gain"]))
      ),
      f"refined must be false or {{{', '.join(sorted(keys))}}}: k null or >= 1, steps "
      ">= 0" + (", min_gain in [0, 1] for 'register', null for 'paper'" if gated else ""),
    )
  if isinstance(samples, dict) and set(samples) == {"image"}:
    _validate_image(samples["image"])
  else:
    _validate_seeds(samples)
  roir = card["roir"]
  _require(
    roir is None or (isinstance(roir, dict) and set(roir) == {"mean", "std"}),
    "roir must be null or {mean, std}",
  )
  return card


def _validate_seeds(samples) -> None:
  _require(
    isinstance(samples, dict) and set(samples) == {"seed", "truncation_psi", "seeds"},
    "samples must be {seed, truncation_psi, seeds} or {image}",
  )
  _require(
    _is_int(samples["seed"])
    and isinstance(samples["truncation_psi"], (int, float))
    and math.isfinite(samples["truncation_psi"]),
    "seed must be an int, truncation_psi a number",
  )
  seeds = samples["seeds"]
  _require(
    isinstance(seeds, list)
    and 1 <= len(seeds) <= _MAX_SEEDS
    and all(_is_int(t) and 0 <= t < 2**31 for t in seeds),
    f"seeds must be 1 to {_MAX_SEEDS} integers in [0, 2^31)",
  )


def _validate_image(image) -> None:
  _require(
    isinstance(image, dict) and set(image) == {"sha256", "inversion"} and _is_sha(image["sha256"]),
    "image must be {sha256: 64 hex digits, inversion}",
  )
  options = image["inversion"]
  _require(
    isinstance(options, dict) and set(options) == set(INVERSION_KEYS),
    f"inversion must be {{{', '.join(INVERSION_KEYS)}}}",
  )
  _require(
    all(_is_int(options[k]) and options[k] >= 0 for k in ("steps", "feature_steps"))
    and _is_int(options["seed"])
    and isinstance(options["tie_layers"], bool)
    and all(
      isinstance(options[k], (int, float))
      and not isinstance(options[k], bool)
      and math.isfinite(options[k])
      and options[k] >= 0
      for k in ("structure_weight", "feature_structure_weight")
    ),
    "inversion: steps, feature_steps >= 0 and seed integers, tie_layers a bool, "
    "the weights finite numbers >= 0",
  )


def save(path: str, card: dict) -> str:
  """Writes a validated card as JSON (atomically); returns the path."""
  return json_io.write_json(path, validate(card), sort_keys=True, newline=True)


def load(path: str) -> dict:
  """Reads and validates a card (plain JSON, read as data only)."""
  if os.path.getsize(path) > _MAX_CARD_BYTES:
    raise ValueError(f"{path} is larger than {_MAX_CARD_BYTES} bytes: not a recipe card")
  with open(path) as f:
    try:
      card = json.load(f)
    except json.JSONDecodeError as err:
      raise ValueError(f"{path} is not JSON: {err}") from None
  try:
    return validate(card)
  except ValueError as err:
    raise ValueError(f"{path}: {err}") from None


def check_matches(card: dict, generator: dict, factors: dict) -> None:
  """Refuses a card made with another generator or other factors (identities as made above)."""
  if card["generator"]["sha256"] != generator["sha256"]:
    raise ValueError(
      f"the recipe was made with generator {card['generator']['name']!r} "
      f"(sha256 {card['generator']['sha256'][:12]}...), but {generator['name']!r} "
      f"(sha256 {generator['sha256'][:12]}...) is loaded"
    )
  theirs, ours = card["factors"], factors
  if theirs["sha256"] != ours["sha256"]:
    raise ValueError(
      f"the recipe was made with other factors (sha256 {theirs['sha256'][:12]}... from "
      f"{theirs['path']!r}) than those loaded (sha256 {ours['sha256'][:12]}... from "
      f"{ours['path']!r})"
    )
  if theirs["layer"] != ours["layer"]:
    raise ValueError(
      f"the recipe edits layer {theirs['layer']}, the factors loaded are at layer {ours['layer']}"
    )


def _valid_gain(method: str, min_gain) -> bool:
  if method != "register":
    return min_gain is None
  return (
    isinstance(min_gain, (int, float)) and not isinstance(min_gain, bool) and 0 <= min_gain <= 1
  )


def settings(card: dict) -> tuple:
  """`(normalise, refine options or None)` of a validated card (module doc)."""
  edit = card["edit"]
  if card["format"] == _FORMAT_1:
    normalise, options = _FORMAT_1_SETTINGS
    return normalise, dict(options) if edit["refined"] else None
  return edit["normalise"], _refine_options(edit["refined"], ungated=card["format"] == _FORMAT_2)


def part_of(card: dict):
  """The card's `part`: an index, a list of indices, or a `[H, W]` float32 mask."""
  part = card["edit"]["part"]
  if isinstance(part, dict):
    return _unpack_mask(part)
  return part[0] if len(part) == 1 else list(part)


# ----------------------------------------------------------------------------- rendering


class Sample(NamedTuple):
  """One sample split at the edited layer (everything an edit of it needs)."""

  latents: Any  # the generator's conditioning, batch of one
  features: jax.Array  # [1, h, w, c]
  carry: Any  # what `gen.resume` needs besides the features
  image: jax.Array  # [1, H, W, ch], `resume` of the unedited features


def sample(gen, layer: int, seed: int, index: int, truncation_psi: float = 1.0) -> Sample:
  """Sample `index` of the stream `seed`, split at `layer`."""
  lat = generator_ops.sample_latents(
    gen, generator_ops.seed_keys(seed)[0], np.asarray([index]), truncation_psi=truncation_psi
  )
  x, carry = gen.split(lat, layer)
  return Sample(lat, x, carry, gen.resume(x, carry, lat, layer))


def image_sample(gen, layer: int, image, settings: dict, progress: bool = False) -> Sample:
  """A real image `[1, H, W, ch]` inverted with a card's `settings` (`INVERSION_KEYS`)."""
  options = dict(settings)
  inv = inversion.invert(
    gen,
    image,
    key=jax.random.PRNGKey(options.pop("seed")),
    layer=layer,
    progress=progress,
    **options,
  )
  return Sample(
    inv.latents, inv.features, inv.carry, gen.resume(inv.features, inv.carry, inv.latents, layer)
  )


def sample_parts(one: Sample, appearances, parts, refined):
  """The parts an edit of `one` uses: global `[s, r_s]` or its refined `[1, s, r_s]`.

  `refined`: False, True (`REFINE`) or a dict of `refinement.refine` options.
  """
  options = _refine_options(refined)
  if options is None:
    return parts
  return refinement.refine(one.features, appearances, parts, **options)


def render(
  gen,
  layer: int,
  one: Sample,
  appearances,
  parts,
  part,
  appearance: int,
  alpha: float,
  normalise: str = "minmax",
):
  """The image `[1, H, W, ch]` of `one` after `editing.edit` (parts from `sample_parts`)."""
  edited = editing.edit(
    one.features, appearances, parts, part, appearance, jnp.float32(alpha), normalise=normalise
  )
  return gen.resume(edited, one.carry, one.latents, layer)


def region(part, parts, features, size, normalise: str = "minmax") -> np.ndarray:
  """Where an edit acts at image `size=(H, W)`, binary `[n, H, W]`.

  A mask is its own region; a part (or union) is where its normalised weights
  (`editing.part_weights`) reach 1/2, upsampled by block replication
  (`viz.upsample_blocks`).
  """
  if isinstance(part, np.ndarray):
    return np.broadcast_to(part >= 0.5, (features.shape[0],) + part.shape).astype(np.float32)
  weights = np.asarray(editing.part_weights(part, parts, features, normalise))  # [(n,) s]
  h, w = features.shape[1:3]
  weights = np.broadcast_to(weights.reshape(-1, h, w), (features.shape[0], h, w))
  return (viz.upsample_blocks(weights, size, axis=1) >= 0.5).astype(np.float32)


def replay(
  card: dict,
  gen,
  factors,
  seeds: Optional[Sequence[int]] = None,
  rgb=lambda images: images,
  samples: Optional[Sequence[Sample]] = None,
):
  """Replays a card on `seeds` (default: the card's), or on `samples`.

  Args:
    card: a validated card; gen: the generator; factors: A and P (`pj.Factors`).
      The caller checks their identities first (`check_matches`).
    seeds: sample indices of the card's stream.
    rgb: maps raw images `[n, H, W, ch]` to the channels the ROIR is measured
      on (e.g. drops label channels).
    samples: instead of seeds, `Sample`s to edit (`image_sample` of the card's
      image for a card made on a real image).

  Returns:
    `(originals, edited, roir)`: raw images `[n, H, W, ch]` and `(mean, std)`
    of Eq. (13) inside the edit's region.
  """
  layer, edit = card["factors"]["layer"], card["edit"]
  if samples is None:
    if "image" in card["samples"]:
      raise ValueError(
        "this card was made on a real image (sha256 "
        f"{card['samples']['image']['sha256'][:12]}...): replay it on "
        "`image_sample` of that image"
      )
    seeds = card["samples"]["seeds"] if seeds is None else [int(t) for t in seeds]
    samples = [
      sample(gen, layer, card["samples"]["seed"], t, card["samples"]["truncation_psi"])
      for t in seeds
    ]
  if not samples:
    raise ValueError("replay: give at least one seed")
  part = part_of(card)
  normalise, refined = settings(card)
  before, after, regions = [], [], []
  for one in samples:
    parts = sample_parts(one, factors.appearances, factors.parts, refined or False)
    image = render(
      gen,
      layer,
      one,
      factors.appearances,
      parts,
      part,
      edit["appearance"],
      edit["alpha"],
      normalise,
    )
    before.append(np.asarray(one.image))
    after.append(np.asarray(image))
    regions.append(region(part, parts, one.features, image.shape[1:3], normalise))
  before, after = np.concatenate(before), np.concatenate(after)
  mean, std = metrics.roir(
    jnp.asarray(rgb(before)), jnp.asarray(rgb(after)), jnp.asarray(np.concatenate(regions))
  )
  return before, after, (float(mean), float(std))
