"""An interactive explorer of the parts and appearances, in a local web page.

    pip install -e '.[demo]'
    python -m experiments.explore                      # the embedded generator
    python -m experiments.explore --generator=CONVERTED_DIR --factors=DECOMPOSE_OUT --port=7860

Without `--factors`, a quick decomposition with the defaults runs first (into
`--out`, a temporary directory by default). The page (Gradio) shows a sample
(a seed, or a click on the sample grid), all parts overlaid in colours (pick
some by click or by list: their union is edited, or draw a mask by hand),
global or per-sample refined parts, the appearance palette (each appearance's
saliency thumbnail), the alpha slider (relative to the mean feature-fibre
norm), the edited image beside the original with their difference heat map
and the ROIR (Eq. 13) of the edit inside the chosen region, the saliency map of
the chosen appearance, object removal (Sec. 5.1.1) and ranking (Eqs. 17-18).
"Save recipe" writes a JSON card (`panda_jax.recipes`) that
`python -m experiments.edit --recipe=CARD.json --seeds=...` replays.

"Your image": a PNG of the generator's size (or `--image` at start-up) is
inverted (`pj.invert` with `--inversion_steps`, `--feature_steps`, ...) and
shown under a negative index (-1, -2, ...) in the seed box; every panel then
works on its inverted features, and its saved cards name the image's sha256 and
the inversion settings (`experiments.edit --recipe=CARD --image=FILE` replays).

It binds 127.0.0.1 unless `--host` says otherwise; the only inputs are numbers
and drawn pixels, the files it reads are the converted generator, the
factors (orbax arrays) and uploaded PNGs (checked by `experiments.real_images`):
nothing is unpickled or executed.
"""

import collections
import functools
import os
import signal
import tempfile
import threading
import time

import jax.numpy as jnp
import numpy as np
from matplotlib import colormaps

import panda_jax as pj
from experiments import common
from experiments import decompose
from experiments import real_images
from panda_jax import editing
from panda_jax import interpret
from panda_jax import parts_eval
from panda_jax import recipes

SPEC = common.spec(
    *common.WITH_FACTORS, *common.INVERSION,
    inversion_steps=common.Flag("integer", 300, "Inversion of an uploaded image: optimiser "
                                "steps on the latents (then --feature_steps on the features)."),
    host=common.Flag("string", "127.0.0.1", "Address to bind (127.0.0.1: this machine only)."),
    port=common.Flag("integer", 7860, "Port of the page."),
    num_grid=common.Flag("integer", 8, "Samples in the sample grid."),
    num_rank=common.Flag("integer", 64, "Samples ranked by the ranking panel."),
    recipes_dir=common.Flag("string", "recipes", "Where 'Save recipe' writes its cards."))

_CACHE = 64           # samples kept split at the layer
_TOP = 6              # samples shown by the ranking panel
_PALETTE = colormaps["tab20"]
_CSS = (".pixels img { width: 100% !important; height: 100% !important; object-fit: contain; "
        "image-rendering: pixelated; } img { image-rendering: pixelated; }")


def display(images) -> np.ndarray:
  """Raw generator output `[1, H, W, ch]` -> the uint8 `[H, W, 3]` the page shows.

  Label channels are dropped and grey is repeated; the page enlarges images in
  the browser (pixelated), so what is sent stays small.
  """
  rgb = common.split_labels(images).rgb[0]
  rgb = np.repeat(rgb, 3, -1) if rgb.shape[-1] == 1 else rgb
  return np.round(np.clip((rgb + 1) * 127.5, 0, 255)).astype(np.uint8)


def _enlarge(image, size: int = 256):
  """Nearest enlargement by an integer factor to at least `size` pixels."""
  factor = max(1, -(-size // image.shape[0]))
  return np.repeat(np.repeat(image, factor, 0), factor, 1)


def heat(field, vmax=None, cmap="inferno") -> np.ndarray:
  """A `[h, w]` field as a uint8 colour map in [0, vmax] (its max by default)."""
  field = np.asarray(field, np.float32)
  vmax = float(field.max()) if vmax is None else vmax
  scaled = field / vmax if vmax > 0 else np.zeros_like(field)
  return (colormaps[cmap](np.clip(scaled, 0, 1))[..., :3] * 255).astype(np.uint8)


def difference(before, after) -> np.ndarray:
  """The heat map of `|after - before|` (uint8 `[H, W, 3]` images), full scale at 1/4."""
  diff = np.abs(after.astype(np.float32) - before.astype(np.float32)).mean(-1)
  return heat(diff, 255.0 / 4)


def _cells(field, size):
  """`[h, w, ...]` -> `size=(H, W)` by block replication."""
  return np.repeat(np.repeat(field, size[0] // field.shape[0], 0), size[1] // field.shape[1], 1)


class Explorer:
  """The explorer's state (generator, factors, caches) and one method per panel.

  Each method returns numpy images / text for the page; edits go through
  `recipes.render`, so a saved card replays to the same pixels.
  """

  def __init__(self, gen, generator_name: str, factors, layer: int, factors_path, *,
               seed: int = 0, truncation_psi: float = 1.0, num_grid: int = 8,
               num_rank: int = 64, recipes_dir: str = "recipes",
               inversion: dict | None = None):
    self.gen, self.factors, self.layer = gen, factors, layer
    # How uploaded images are inverted (`recipes.INVERSION_KEYS`); index -1 - k: upload k.
    self.inversion = dict(inversion or dict(steps=300, feature_steps=100, structure_weight=1.0,
                                            feature_structure_weight=0.0, tie_layers=False,
                                            seed=0))
    self._uploads = {}  # index -> (Sample, sha256 of the file)
    self.seed, self.psi = seed, truncation_psi
    self.recipes_dir = recipes_dir
    self.generator_id = recipes.generator_identity(generator_name, gen)
    self.factors_id = recipes.factors_identity(factors, layer, factors_path)
    self.rank_c, self.rank_s = factors.appearances.shape[1], factors.parts.shape[1]
    self._samples = collections.OrderedDict()
    self._refined = {}
    self.grid = [self.sample(t) for t in range(num_grid)]
    grid_x = jnp.concatenate([one.features for one in self.grid])
    self.scale = float(jnp.mean(jnp.linalg.norm(grid_x, axis=-1)))  # alpha unit
    self.mu = interpret.concept_means([grid_x], factors.appearances)  # [r_c]
    self.num_rank = num_rank
    self._pool = None

  # --------------------------------------------------------------------------- samples

  def upload(self, path: str) -> int:
    """Inverts the PNG at `path` (`real_images.BadImage` when it is not one of the
    generator's size); returns the negative index it is shown under."""
    image = real_images.load_image(path, self.gen)
    index = -1 - len(self._uploads)
    one = recipes.image_sample(self.gen, self.layer, image, self.inversion)
    self._uploads[index] = (one, real_images.file_sha256(path))
    return index

  def sample(self, index: int) -> recipes.Sample:
    index = int(index)
    if index < 0:
      if index not in self._uploads:
        raise ValueError(f"no uploaded image {index} (uploads are -1 .. {-len(self._uploads)})")
      return self._uploads[index][0]
    if index in self._samples:
      self._samples.move_to_end(index)
    else:
      self._samples[index] = recipes.sample(self.gen, self.layer, self.seed, index, self.psi)
      while len(self._samples) > _CACHE:
        old = self._samples.popitem(last=False)[0]
        self._refined.pop(old, None)
    return self._samples[index]

  def parts(self, index: int, refined: bool):
    """Global `[s, r_s]` or the sample's refined `[1, s, r_s]` parts (cached)."""
    one = self.sample(index)
    if not refined:
      return self.factors.parts
    if index not in self._refined:
      self._refined[index] = recipes.sample_parts(one, self.factors.appearances,
                                                  self.factors.parts, True)
    return self._refined[index]

  def grid_images(self):
    return [(display(one.image), f"seed {t}") for t, one in enumerate(self.grid)]

  # --------------------------------------------------------------------------- parts

  def part_map(self, index: int, refined: bool) -> np.ndarray:
    """The argmax part of each feature cell `[h, w]` (-1 where no part is active)."""
    one = self.sample(index)
    parts = np.asarray(self.parts(index, refined)).reshape(-1, self.rank_s)  # [s, r_s]
    h, w = one.features.shape[1:3]
    peak = np.asarray(parts_eval.relative_parts(parts))
    labels = np.where(peak.max(-1) > 0.1, peak.argmax(-1), -1)
    return labels.reshape(h, w)

  def overlay(self, index: int, refined: bool) -> np.ndarray:
    """The sample with every part in its colour (`part_colour`)."""
    image = display(self.sample(index).image).astype(np.float32)
    labels = _cells(self.part_map(index, refined), image.shape[:2])
    colours = np.asarray([_PALETTE(k % 20)[:3] for k in range(self.rank_s)]) * 255
    tinted = np.where(labels[..., None] >= 0, 0.45 * image + 0.55 * colours[labels], image)
    return tinted.astype(np.uint8)

  def legend(self) -> str:
    chips = "".join(
        f"<span style='display:inline-block;margin:2px 6px'><span style='display:inline-block;"
        f"width:12px;height:12px;background:{self.part_colour(k)}'></span> part {k}</span>"
        for k in range(self.rank_s))
    return f"<div>{chips}</div>"

  def part_colour(self, k: int) -> str:
    r, g, b = (int(255 * v) for v in _PALETTE(k % 20)[:3])
    return f"#{r:02x}{g:02x}{b:02x}"

  def part_at(self, index: int, refined: bool, x: int, y: int, size) -> int:
    """The part under the displayed pixel `(x, y)` of an image of `size=(H, W)` (-1: none)."""
    labels = self.part_map(index, refined)
    return int(labels[y * labels.shape[0] // size[0], x * labels.shape[1] // size[1]])

  # --------------------------------------------------------------------------- appearances

  def saliency(self, index: int) -> np.ndarray:
    """`[h, w, r_c]` saliency maps `A^T Z_i` of one sample (Sec. 5.1.2)."""
    one = self.sample(index)
    maps = interpret.saliency(one.features, self.factors.appearances)[0]  # [s, r_c]
    return np.asarray(maps).reshape(one.features.shape[1:3] + (self.rank_c,))

  def palette(self, index: int):
    maps = self.saliency(index)
    return [(heat(np.maximum(maps[..., j], 0)), f"appearance {j}")
            for j in range(self.rank_c)]

  def saliency_view(self, index: int, appearance: int) -> np.ndarray:
    """The sample blended with where appearance j fires above its mean (Sec. 5.1.2)."""
    image = display(self.sample(index).image).astype(np.float32)
    field = np.maximum(self.saliency(index)[..., appearance] - float(self.mu[appearance]), 0)
    tint = _cells(heat(field), image.shape[:2]).astype(np.float32)
    return (0.4 * image + 0.6 * tint).astype(np.uint8)

  # --------------------------------------------------------------------------- edits

  def target(self, mode: str, picked, mask_layers):
    """The edit's `part`: picked part indices (their union) or a drawn binary mask."""
    if mode == "mask":
      if mask_layers is None or not np.any(mask_layers):
        raise ValueError("draw a mask on the image first")
      return self._mask(mask_layers)
    picked = sorted(int(p.split()[-1]) for p in picked or [])
    if not picked:
      raise ValueError("pick at least one part")
    return picked[0] if len(picked) == 1 else picked

  def _mask(self, painted) -> np.ndarray:
    """A painted `[H', W']` boolean at display size -> the binary `[H, W]` image mask."""
    size = self.sample(0).image.shape[1:3]
    factor = painted.shape[0] // size[0]
    blocks = painted[:size[0] * factor, :size[1] * factor].reshape(size[0], factor, size[1],
                                                                   factor)
    return (blocks.mean((1, 3)) >= 0.5).astype(np.float32)

  def edit(self, index: int, part, appearance: int, relative_alpha: float, refined: bool):
    """`(original, edited, difference heat map, roir (mean, std))` of one sample."""
    one = self.sample(index)
    parts = self.parts(index, refined)
    alpha = relative_alpha * self.scale
    image = recipes.render(self.gen, self.layer, one, self.factors.appearances, parts, part,
                           appearance, alpha)
    before, after = display(one.image), display(image)
    region = recipes.region(part, parts, one.features, one.image.shape[1:3])
    rgb = lambda im: common.split_labels(im).rgb
    mean, std = pj.roir(jnp.asarray(rgb(one.image)), jnp.asarray(rgb(image)),
                        jnp.asarray(region))
    return before, after, difference(before, after), (float(mean), float(std))

  def remove(self, index: int, part, relative_alpha: float, refined: bool):
    """The sample with the background concept added at the part (Sec. 5.1.1)."""
    one = self.sample(index)
    edited, background = editing.remove_object(
        one.features, self.factors.appearances, self.parts(index, refined), part,
        jnp.float32(relative_alpha * self.scale), mu=self.mu)
    image = self.gen.resume(edited, one.carry, one.latents, self.layer)
    return display(image), int(background)

  def rank(self, appearance: int, part=None, refined: bool = False):
    """The top samples of the pool for appearance j (Eq. 17), or inside a part (Eq. 18)."""
    if self._pool is None:
      self._pool = [self.sample(t) for t in range(self.num_rank)]
    x = jnp.concatenate([one.features for one in self._pool])
    weights = None
    if part is not None:
      parts = self.factors.parts
      if refined:
        parts = pj.refine(x, self.factors.appearances, parts)
      weights = editing.part_weights(part, parts, x)
    scores = np.asarray(pj.rank(x, self.factors.appearances, appearance, weights))
    top = np.argsort(-scores, kind="stable")[:_TOP]
    return [(display(self._pool[t].image), f"seed {t}: {scores[t]:.3g}") for t in top]

  def card(self, index: int, part, appearance: int, relative_alpha: float, refined: bool):
    """The recipe card of the current edit (ROIR measured on this sample)."""
    roir = self.edit(index, part, appearance, relative_alpha, refined)[3]
    if int(index) < 0:
      samples = dict(image={"sha256": self._uploads[int(index)][1], "inversion": self.inversion})
    else:
      samples = dict(seed=self.seed, seeds=[int(index)], truncation_psi=self.psi)
    return recipes.make_card(generator=self.generator_id, factors=self.factors_id, part=part,
                             appearance=appearance, alpha=relative_alpha * self.scale,
                             refined=refined, roir=roir, **samples)

  def save(self, card: dict) -> str:
    name = f"recipe-{card['checksum'][:12]}.json"
    return recipes.save(os.path.join(self.recipes_dir, name), card)


# ----------------------------------------------------------------------------- page


def build_page(explorer: Explorer):
  """The Gradio Blocks page over `explorer`."""
  import gradio as gr  # pylint: disable=import-outside-toplevel  (the optional `demo` extra)

  ex = explorer
  lock = threading.Lock()  # the explorer's caches; the slider's events skip the queue.

  def serial(fn):
    @functools.wraps(fn)
    def locked(*args, **kwargs):
      with lock:
        return fn(*args, **kwargs)
    return locked

  part_names = [f"part {k}" for k in range(ex.rank_s)]
  app_names = [(f"appearance {j}", j) for j in range(ex.rank_c)]

  def image(label, elem_id, **kw):
    return gr.Image(label=label, elem_id=elem_id, type="numpy", format="png",
                    interactive=False, height=256, elem_classes=["pixels"], **kw)

  with gr.Blocks(title="panda-jax explorer") as page:
    gr.Markdown(f"## panda-jax explorer: `{ex.generator_id['name']}` ({ex.gen.arch}), layer "
                f"{ex.layer}, {ex.rank_s} parts, {ex.rank_c} appearances")
    with gr.Row():
      with gr.Column(scale=1):
        seed = gr.Number(value=0, precision=0, label="seed (sample index; -1, -2, ...: "
                         "your uploaded images)", elem_id="seed")
        upload = gr.File(label="your image (a PNG of the generator's size: inverted, then "
                         "edited like a sample)", file_types=[".png"], type="filepath",
                         elem_id="upload")
        grid = gr.Gallery(value=ex.grid_images(), columns=4, height=180, label="sample grid",
                          elem_id="grid", allow_preview=False)
        overlay = image("parts (click one to pick it)", "overlay")
        gr.HTML(ex.legend())
        scope = gr.Radio(["global", "refined"], value="global", label="parts",
                         elem_id="scope")
        mode = gr.Radio(["parts", "mask"], value="parts", label="edit where",
                        elem_id="mode")
        picked = gr.CheckboxGroup(part_names, value=[], label="picked parts (union)",
                                  elem_id="parts")
        mask = gr.ImageEditor(label="hand-drawn mask (mode: mask)", type="numpy",
                              format="png", sources=(), elem_id="mask", height=300,
                              brush=gr.Brush(colors=["#ff0000"], default_size=16))
      with gr.Column(scale=2):
        with gr.Row():
          appearance = gr.Dropdown(app_names, value=0, label="appearance", elem_id="appearance")
          alpha = gr.Slider(-30, 30, value=0, step=0.5, label="alpha (x mean fibre norm)",
                            elem_id="alpha")
        palette = gr.Gallery(columns=8, height=160, label="appearance palette (saliency)",
                             elem_id="palette", allow_preview=False)
        with gr.Row():
          original = image("original", "original")
          edited = image("edited", "edited")
          diff = image("|difference|", "difference")
        roir = gr.Textbox(label="ROIR of the edit inside the chosen region (Eq. 13)",
                          elem_id="roir", interactive=False)
        with gr.Row():
          saliency = image("saliency of the appearance (above its mean)", "saliency")
          removed = image("object removed (background concept)", "removed")
        with gr.Row():
          remove_button = gr.Button("Remove object", elem_id="remove")
          rank_scope = gr.Radio(["global", "inside the part"], value="global",
                                label="rank", elem_id="rank_scope")
          rank_button = gr.Button("Rank samples", elem_id="rank")
        ranking = gr.Gallery(columns=_TOP, height=180, label="top samples", elem_id="ranking",
                             allow_preview=False)
        with gr.Row():
          save_button = gr.Button("Save recipe", variant="primary", elem_id="save")
          recipe_path = gr.Textbox(label="recipe card", elem_id="recipe_path",
                                   interactive=False)

    def selected(evt: gr.SelectData):
      return evt.index

    def where(mode_v, picked_v, mask_v):
      painted = None
      if mask_v is not None and mask_v.get("layers"):
        painted = np.any([np.asarray(l)[..., -1] > 0 for l in mask_v["layers"]], axis=0)
      return ex.target(mode_v, picked_v, painted)

    @serial
    def on_edit(seed_v, mode_v, picked_v, mask_v, app_v, alpha_v, scope_v):
      index = int(seed_v or 0)
      try:
        part = where(mode_v, picked_v, mask_v)
      except ValueError as err:
        before = display(ex.sample(index).image)
        return before, before, heat(np.zeros(before.shape[:2])), str(err)
      before, after, changed, (mean, std) = ex.edit(index, part, int(app_v), float(alpha_v),
                                                 scope_v == "refined")
      if not np.isfinite(mean):
        return before, after, changed, "no change (alpha = 0)"
      return before, after, changed, f"{mean:.4f} (lower is more local)"

    @serial
    def on_upload(path):
      if not path:
        return gr.Number()
      try:
        return ex.upload(path)
      except real_images.BadImage as err:
        raise gr.Error(str(err))

    @serial
    def on_sample(seed_v, scope_v, app_v):
      index = int(seed_v or 0)
      background = _enlarge(display(ex.sample(index).image))
      return (ex.overlay(index, scope_v == "refined"), ex.palette(index),
              ex.saliency_view(index, int(app_v)),
              {"background": background, "layers": [], "composite": background})

    @serial
    def on_pick(seed_v, scope_v, picked_v, evt: gr.SelectData):
      index = int(seed_v or 0)
      size = display(ex.sample(index).image).shape[:2]
      k = ex.part_at(index, scope_v == "refined", evt.index[0], evt.index[1], size)
      chosen = set(picked_v or [])
      if k >= 0:
        chosen ^= {f"part {k}"}
      return [n for n in part_names if n in chosen]

    @serial
    def on_remove(seed_v, mode_v, picked_v, mask_v, alpha_v, scope_v):
      try:
        part = where(mode_v, picked_v, mask_v)
      except ValueError as err:
        raise gr.Error(str(err))
      img, b = ex.remove(int(seed_v or 0), part, abs(float(alpha_v)) or 10.0,
                         scope_v == "refined")
      return gr.Image(value=img, label=f"object removed (background concept {b})")

    @serial
    def on_rank(app_v, rank_v, picked_v, mode_v, mask_v, scope_v):
      part = None
      if rank_v != "global":
        try:
          part = where(mode_v, picked_v, mask_v)
        except ValueError as err:
          raise gr.Error(str(err))
      return ex.rank(int(app_v), part, scope_v == "refined")

    @serial
    def on_save(seed_v, mode_v, picked_v, mask_v, app_v, alpha_v, scope_v):
      try:
        part = where(mode_v, picked_v, mask_v)
      except ValueError as err:
        raise gr.Error(str(err))
      return ex.save(ex.card(int(seed_v or 0), part, int(app_v), float(alpha_v),
                             scope_v == "refined"))

    edit_inputs = [seed, mode, picked, mask, appearance, alpha, scope]
    edit_outputs = [original, edited, diff, roir]
    sample_outputs = [overlay, palette, saliency, mask]
    for control in (seed, scope):
      control.change(on_sample, [seed, scope, appearance], sample_outputs)
    for control in edit_inputs:
      control.change(on_edit, edit_inputs, edit_outputs, show_progress="hidden", queue=False,
                     trigger_mode="always_last")
    appearance.change(serial(lambda s, a: ex.saliency_view(int(s or 0), int(a))),
                      [seed, appearance], saliency)
    grid.select(selected, None, seed)
    upload.upload(on_upload, upload, seed)
    palette.select(selected, None, appearance)
    overlay.select(on_pick, [seed, scope, picked], picked)
    remove_button.click(on_remove, [seed, mode, picked, mask, alpha, scope], removed)
    rank_button.click(on_rank, [appearance, rank_scope, picked, mode, mask, scope], ranking)
    save_button.click(on_save, edit_inputs, recipe_path)
    page.load(on_sample, [seed, scope, appearance], sample_outputs)
    page.load(on_edit, edit_inputs, edit_outputs)
  return page


def explorer_from(config) -> Explorer:
  """Loads the generator and the factors (decomposing when `--factors` is not given)."""
  gen = common.load_generator(config.generator)
  if config.image:
    real_images.load_image(config.image, gen)  # A bad --image: exit 2 before any work.
  if not config.factors and not config.out:
    config.out = tempfile.mkdtemp(prefix="panda_explore_")
  factors, layer = decompose.factors_for(config, gen)
  path = config.factors or os.path.join(config.out, "decompose")
  explorer = Explorer(gen, config.generator, factors, layer, os.path.abspath(path),
                      seed=config.seed, truncation_psi=config.truncation_psi,
                      num_grid=config.num_grid, num_rank=config.num_rank,
                      recipes_dir=os.path.abspath(config.recipes_dir),
                      inversion=real_images.settings(config, config.inversion_steps))
  if config.image:
    explorer.upload(config.image)  # Index -1.
  return explorer


def run(config) -> None:
  """Serves the page until SIGINT (Ctrl-C) or SIGTERM."""
  os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
  start = time.time()
  explorer = explorer_from(config)
  page = build_page(explorer)
  page.queue(default_concurrency_limit=1)
  print(f"explorer ready in {time.time() - start:.1f} s (model side); factors "
        f"{explorer.factors_id['path']} (replay cards with --factors=that); serving on "
        f"http://{config.host}:{config.port}", flush=True)
  page.launch(server_name=config.host, server_port=config.port, share=False,
              footer_links=[], quiet=False, css=_CSS, prevent_thread_lock=True)
  stop = threading.Event()
  for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, lambda *_: stop.set())
  stop.wait()
  page.close()


if __name__ == "__main__":
  common.main(real_images.cli(run), SPEC)
