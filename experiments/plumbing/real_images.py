"""Real images in the launchers: PNG input and output, checks, inversion with the flags.

`experiments.invert` inverts one image; `experiments.edit --image` inverts one and
edits it through the factors; `experiments.explore` inverts uploads. A PNG of
another size or channel count than the generator's images, a file that is not a
PNG or a corrupt PNG raises `BadImage` (the launchers exit 2 with one line,
`cli.main`, before anything is written).
"""

from __future__ import annotations

import hashlib
import time

import jax
import numpy as np

from panda_jax import inversion
from panda_jax import viz

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class BadImage(ValueError):
  """An input image that cannot be inverted (exit code 2)."""

  exit_code = 2


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
    raise BadImage(
      f"--image={path} is a corrupt PNG ({type(e).__name__}: {' '.join(str(e).split())})"
    ) from None
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

  data = viz.to_uint8(np.asarray(image, np.float32))
  Image.fromarray(data[..., 0] if data.shape[-1] == 1 else data).save(path, format="PNG")


def load_image(path: str, gen) -> jax.Array:
  """`path` as a checked `[1, H, W, ch]` batch for `gen`; `BadImage` names what is wrong."""
  if not path:
    raise BadImage("--image is required (a PNG)")
  image = read_png(path)
  try:
    return inversion.check_images(gen, image[None])
  except ValueError as e:
    raise BadImage(f"--image={path}: {e}") from None


def timed_invert(gen, images, config, layer: int, steps: int, *, seed=None, progress=True):
  """`pj.invert` with the launcher's `settings(config, steps)` (`seed` overrides theirs):
  `(Inversion, wall seconds)`."""
  options = settings(config, steps)
  key = jax.random.PRNGKey(options.pop("seed") if seed is None else seed)
  start = time.perf_counter()
  result = inversion.invert(gen, images, key=key, layer=layer, progress=progress, **options)
  jax.block_until_ready(result.reconstruction)
  return result, time.perf_counter() - start


def file_sha256(path: str) -> str:
  """sha256 of a file's bytes (what a recipe records of an image)."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def settings(config, steps: int) -> dict:
  """The inversion settings of a run (`recipes.INVERSION_KEYS`: metrics.json, recipe cards)."""
  return dict(
    steps=steps,
    feature_steps=config.feature_steps,
    structure_weight=config.structure_weight,
    feature_structure_weight=config.feature_structure_weight,
    tie_layers=config.tie_layers,
    seed=config.seed,
  )
