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
factors (orbax arrays) and uploaded PNGs (checked by `plumbing.real_images`):
nothing is unpickled or executed.
"""

import collections
import functools
import os
import signal
import tempfile
import threading
import time
import types

import jax.numpy as jnp
import numpy as np

import panda_jax as pj
from experiments.plumbing import cli
from experiments.plumbing import decomposition
from experiments.plumbing import edits
from experiments.plumbing import options
from experiments.plumbing import real_images
from experiments.plumbing import sampling
from panda_jax import editing
from panda_jax import interpret
from panda_jax import recipes
from panda_jax import viz
from panda_jax.data import toyfaces

SPEC = options.spec(
  *options.WITH_FACTORS,
  *options.INVERSION,
  inversion_steps=options.Flag(
    "integer",
    300,
    "Inversion of an uploaded image: optimiser "
    "steps on the latents (then --feature_steps on the "
    "features).",
  ),
  host=options.Flag("string", "127.0.0.1", "Address to bind (127.0.0.1: this machine only)."),
  port=options.Flag("integer", 7860, "Port of the page."),
  num_grid=options.Flag("integer", 8, "Samples in the sample grid."),
  num_rank=options.Flag("integer", 64, "Samples ranked by the ranking panel."),
  recipes_dir=options.Flag("string", "recipes", "Where 'Save recipe' writes its cards."),
)

_CACHE = 64  # samples kept split at the layer
_TOP = 6  # samples shown by the ranking panel
_SHOWN = 0.1  # a cell shows a part when its relative value exceeds this (`viz.part_labels`)
_CSS = (
  ".pixels img { width: 100% !important; height: 100% !important; object-fit: contain; "
  "image-rendering: pixelated; } img { image-rendering: pixelated; }"
)


def _enlarge(image, size: int = 256):
  """Nearest enlargement by an integer factor to at least `size` pixels."""
  factor = max(1, -(-size // image.shape[0]))
  return viz.upsample_blocks(image, (factor * image.shape[0], factor * image.shape[1]))


class Explorer:
  """The explorer's state (generator, factors, caches) and one method per panel.

  Each method returns numpy images / text for the page (`viz.display`: uint8,
  label channels dropped; the page enlarges them in the browser, pixelated, so
  what is sent stays small); edits go through `recipes.render`, so a saved card
  replays to the same pixels.
  """

  def __init__(
    self,
    gen,
    generator_name: str,
    factors,
    layer: int,
    factors_path,
    *,
    seed: int = 0,
    truncation_psi: float = 1.0,
    num_grid: int = 8,
    num_rank: int = 64,
    recipes_dir: str = "recipes",
    inversion: dict | None = None,
  ):
    self.gen, self.factors, self.layer = gen, factors, layer
    # How uploaded images are inverted (`recipes.INVERSION_KEYS`); index -1 - k: upload k.
    self.inversion = dict(
      inversion
      or dict(
        steps=300,
        feature_steps=100,
        structure_weight=1.0,
        feature_structure_weight=0.0,
        tie_layers=False,
        seed=0,
      )
    )
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
    self.scale = edits.fibre_scale(grid_x)  # alpha unit
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
      self._refined[index] = recipes.sample_parts(
        one, self.factors.appearances, self.factors.parts, True
      )
    return self._refined[index]

  def grid_images(self):
    return [(viz.display(one.image), f"seed {t}") for t, one in enumerate(self.grid)]

  # --------------------------------------------------------------------------- parts

  def part_map(self, index: int, refined: bool) -> np.ndarray:
    """The argmax part of each feature cell `[h, w]` (-1 where no part is active)."""
    parts = np.asarray(self.parts(index, refined)).reshape(-1, self.rank_s)  # [s, r_s]
    return viz.part_labels(parts, _SHOWN).reshape(self.sample(index).features.shape[1:3])

  def overlay(self, index: int, refined: bool) -> np.ndarray:
    """The sample with every part in its colour (`viz.overlay_parts`, as the PNGs)."""
    one = self.sample(index)
    parts = np.asarray(self.parts(index, refined)).reshape(-1, self.rank_s)  # [s, r_s]
    image = viz.display(one.image) / 255
    return (
      255 * viz.overlay_parts(image, parts, one.features.shape[1:3], min_relative=_SHOWN)
    ).astype(np.uint8)

  def legend(self) -> str:
    chips = "".join(
      f"<span style='display:inline-block;margin:2px 6px'><span style='display:inline-block;"
      f"width:12px;height:12px;background:{self.part_colour(k)}'></span> part {k}</span>"
      for k in range(self.rank_s)
    )
    return f"<div>{chips}</div>"

  def part_colour(self, k: int) -> str:
    r, g, b = (int(255 * v) for v in viz.part_colours(self.rank_s)[k])
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
    return [(viz.heat(np.maximum(maps[..., j], 0)), f"appearance {j}") for j in range(self.rank_c)]

  def saliency_view(self, index: int, appearance: int) -> np.ndarray:
    """The sample blended with where appearance j fires above its mean (Sec. 5.1.2)."""
    image = viz.display(self.sample(index).image).astype(np.float32)
    field = np.maximum(self.saliency(index)[..., appearance] - float(self.mu[appearance]), 0)
    tint = viz.upsample_blocks(viz.heat(field), image.shape[:2]).astype(np.float32)
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
    blocks = painted[: size[0] * factor, : size[1] * factor].reshape(
      size[0], factor, size[1], factor
    )
    return (blocks.mean((1, 3)) >= 0.5).astype(np.float32)

  def edit(self, index: int, part, appearance: int, relative_alpha: float, refined: bool):
    """`(original, edited, difference heat map, roir (mean, std))` of one sample."""
    one = self.sample(index)
    parts = self.parts(index, refined)
    alpha = relative_alpha * self.scale
    image = recipes.render(
      self.gen, self.layer, one, self.factors.appearances, parts, part, appearance, alpha
    )
    before, after = viz.display(one.image), viz.display(image)
    region = recipes.region(part, parts, one.features, one.image.shape[1:3])
    rgb = lambda im: toyfaces.split_labels(im).rgb
    mean, std = pj.roir(jnp.asarray(rgb(one.image)), jnp.asarray(rgb(image)), jnp.asarray(region))
    return before, after, viz.difference(before, after), (float(mean), float(std))

  def remove(self, index: int, part, relative_alpha: float, refined: bool):
    """The sample with the background concept added at the part (Sec. 5.1.1)."""
    one = self.sample(index)
    edited, background = editing.remove_object(
      one.features,
      self.factors.appearances,
      self.parts(index, refined),
      part,
      jnp.float32(relative_alpha * self.scale),
      mu=self.mu,
    )
    image = self.gen.resume(edited, one.carry, one.latents, self.layer)
    return viz.display(image), int(background)

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
    return [(viz.display(self._pool[t].image), f"seed {t}: {scores[t]:.3g}") for t in top]

  def card(self, index: int, part, appearance: int, relative_alpha: float, refined: bool):
    """The recipe card of the current edit (ROIR measured on this sample)."""
    roir = self.edit(index, part, appearance, relative_alpha, refined)[3]
    if int(index) < 0:
      samples = dict(image={"sha256": self._uploads[int(index)][1], "inversion": self.inversion})
    else:
      samples = dict(seed=self.seed, seeds=[int(index)], truncation_psi=self.psi)
    return recipes.make_card(
      generator=self.generator_id,
      factors=self.factors_id,
      part=part,
      appearance=appearance,
      alpha=relative_alpha * self.scale,
      refined=refined,
      roir=roir,
      **samples,
    )

  def save(self, card: dict) -> str:
    name = f"recipe-{card['checksum'][:12]}.json"
    return recipes.save(os.path.join(self.recipes_dir, name), card)


# ----------------------------------------------------------------------------- page


def build_page(explorer: Explorer):
  """The Gradio Blocks page over `explorer`: `_layout`'s components, wired to `_Handlers`."""
  import gradio as gr  # pylint: disable=import-outside-toplevel  (the optional `demo` extra)

  with gr.Blocks(title="panda-jax explorer") as page:
    ui = _layout(gr, explorer)
    _wire(page, ui, _Handlers(gr, explorer))
  return page


def _layout(gr, ex: Explorer) -> types.SimpleNamespace:
  """The page's components (inside an open `gr.Blocks`), by name."""

  def image(label, elem_id, **kw):
    return gr.Image(
      label=label,
      elem_id=elem_id,
      type="numpy",
      format="png",
      interactive=False,
      height=256,
      elem_classes=["pixels"],
      **kw,
    )

  ui = types.SimpleNamespace()
  gr.Markdown(
    f"## panda-jax explorer: `{ex.generator_id['name']}` ({ex.gen.arch}), layer "
    f"{ex.layer}, {ex.rank_s} parts, {ex.rank_c} appearances"
  )
  with gr.Row():
    with gr.Column(scale=1):
      ui.seed = gr.Number(
        value=0,
        precision=0,
        label="seed (sample index; -1, -2, ...: your uploaded images)",
        elem_id="seed",
      )
      ui.upload = gr.File(
        label="your image (a PNG of the generator's size: inverted, then edited like a sample)",
        file_types=[".png"],
        type="filepath",
        elem_id="upload",
      )
      ui.grid = gr.Gallery(
        value=ex.grid_images(),
        columns=4,
        height=180,
        label="sample grid",
        elem_id="grid",
        allow_preview=False,
      )
      ui.overlay = image("parts (click one to pick it)", "overlay")
      gr.HTML(ex.legend())
      ui.scope = gr.Radio(["global", "refined"], value="global", label="parts", elem_id="scope")
      ui.mode = gr.Radio(["parts", "mask"], value="parts", label="edit where", elem_id="mode")
      ui.picked = gr.CheckboxGroup(
        _part_names(ex), value=[], label="picked parts (union)", elem_id="parts"
      )
      ui.mask = gr.ImageEditor(
        label="hand-drawn mask (mode: mask)",
        type="numpy",
        format="png",
        sources=(),
        elem_id="mask",
        height=300,
        brush=gr.Brush(colors=["#ff0000"], default_size=16),
      )
    with gr.Column(scale=2):
      with gr.Row():
        ui.appearance = gr.Dropdown(
          [(f"appearance {j}", j) for j in range(ex.rank_c)],
          value=0,
          label="appearance",
          elem_id="appearance",
        )
        ui.alpha = gr.Slider(
          -30, 30, value=0, step=0.5, label="alpha (x mean fibre norm)", elem_id="alpha"
        )
      ui.palette = gr.Gallery(
        columns=8,
        height=160,
        label="appearance palette (saliency)",
        elem_id="palette",
        allow_preview=False,
      )
      with gr.Row():
        ui.original = image("original", "original")
        ui.edited = image("edited", "edited")
        ui.diff = image("|difference|", "difference")
      ui.roir = gr.Textbox(
        label="ROIR of the edit inside the chosen region (Eq. 13)",
        elem_id="roir",
        interactive=False,
      )
      with gr.Row():
        ui.saliency = image("saliency of the appearance (above its mean)", "saliency")
        ui.removed = image("object removed (background concept)", "removed")
      with gr.Row():
        ui.remove_button = gr.Button("Remove object", elem_id="remove")
        ui.rank_scope = gr.Radio(
          ["global", "inside the part"], value="global", label="rank", elem_id="rank_scope"
        )
        ui.rank_button = gr.Button("Rank samples", elem_id="rank")
      ui.ranking = gr.Gallery(
        columns=_TOP, height=180, label="top samples", elem_id="ranking", allow_preview=False
      )
      with gr.Row():
        ui.save_button = gr.Button("Save recipe", variant="primary", elem_id="save")
        ui.recipe_path = gr.Textbox(label="recipe card", elem_id="recipe_path", interactive=False)
  return ui


def _part_names(ex: Explorer) -> list:
  return [f"part {k}" for k in range(ex.rank_s)]


def _serial(lock: threading.Lock, fn):
  """`fn` run under `lock` (the explorer's caches; the slider's events skip the queue)."""

  @functools.wraps(fn)
  def locked(*args, **kwargs):
    with lock:
      return fn(*args, **kwargs)

  return locked


class _Handlers:
  """The page's event handlers over an `Explorer`: page values in, page values out."""

  def __init__(self, gr, explorer: Explorer):
    self.gr, self.ex = gr, explorer
    self.lock = threading.Lock()

  def serial(self, fn):
    return _serial(self.lock, fn)

  def _where(self, mode_v, picked_v, mask_v):
    painted = None
    if mask_v is not None and mask_v.get("layers"):
      painted = np.any([np.asarray(l)[..., -1] > 0 for l in mask_v["layers"]], axis=0)
    return self.ex.target(mode_v, picked_v, painted)

  def _where_or_error(self, mode_v, picked_v, mask_v):
    try:
      return self._where(mode_v, picked_v, mask_v)
    except ValueError as err:
      raise self.gr.Error(str(err))

  def edit(self, seed_v, mode_v, picked_v, mask_v, app_v, alpha_v, scope_v):
    ex, index = self.ex, int(seed_v or 0)
    try:
      part = self._where(mode_v, picked_v, mask_v)
    except ValueError as err:
      before = viz.display(ex.sample(index).image)
      return before, before, viz.heat(np.zeros(before.shape[:2])), str(err)
    before, after, changed, (mean, std) = ex.edit(
      index, part, int(app_v), float(alpha_v), scope_v == "refined"
    )
    if not np.isfinite(mean):
      return before, after, changed, "no change (alpha = 0)"
    return before, after, changed, f"{mean:.4f} (lower is more local)"

  def upload(self, path):
    if not path:
      return self.gr.Number()
    try:
      return self.ex.upload(path)
    except real_images.BadImage as err:
      raise self.gr.Error(str(err))

  def sample(self, seed_v, scope_v, app_v):
    ex, index = self.ex, int(seed_v or 0)
    background = _enlarge(viz.display(ex.sample(index).image))
    return (
      ex.overlay(index, scope_v == "refined"),
      ex.palette(index),
      ex.saliency_view(index, int(app_v)),
      {"background": background, "layers": [], "composite": background},
    )

  def pick(self, seed_v, scope_v, picked_v, evt):
    ex, index = self.ex, int(seed_v or 0)
    size = viz.display(ex.sample(index).image).shape[:2]
    k = ex.part_at(index, scope_v == "refined", evt.index[0], evt.index[1], size)
    chosen = set(picked_v or [])
    if k >= 0:
      chosen ^= {f"part {k}"}
    return [n for n in _part_names(ex) if n in chosen]

  def remove(self, seed_v, mode_v, picked_v, mask_v, alpha_v, scope_v):
    part = self._where_or_error(mode_v, picked_v, mask_v)
    img, b = self.ex.remove(
      int(seed_v or 0), part, abs(float(alpha_v)) or 10.0, scope_v == "refined"
    )
    return self.gr.Image(value=img, label=f"object removed (background concept {b})")

  def rank(self, app_v, rank_v, picked_v, mode_v, mask_v, scope_v):
    part = None if rank_v == "global" else self._where_or_error(mode_v, picked_v, mask_v)
    return self.ex.rank(int(app_v), part, scope_v == "refined")

  def save(self, seed_v, mode_v, picked_v, mask_v, app_v, alpha_v, scope_v):
    part = self._where_or_error(mode_v, picked_v, mask_v)
    return self.ex.save(
      self.ex.card(int(seed_v or 0), part, int(app_v), float(alpha_v), scope_v == "refined")
    )

  def saliency(self, seed_v, app_v):
    return self.ex.saliency_view(int(seed_v or 0), int(app_v))


def _wire(page, ui: types.SimpleNamespace, h: _Handlers) -> None:
  """Connects the components' events to the handlers (each run under the explorer's lock)."""
  gr = h.gr
  serial = h.serial

  def on_pick(seed_v, scope_v, picked_v, evt: gr.SelectData):
    return h.pick(seed_v, scope_v, picked_v, evt)

  def selected(evt: gr.SelectData):  # A gallery's click: the index of the item.
    return evt.index

  edit_inputs = [ui.seed, ui.mode, ui.picked, ui.mask, ui.appearance, ui.alpha, ui.scope]
  edit_outputs = [ui.original, ui.edited, ui.diff, ui.roir]
  sample_inputs = [ui.seed, ui.scope, ui.appearance]
  sample_outputs = [ui.overlay, ui.palette, ui.saliency, ui.mask]
  on_edit, on_sample = serial(h.edit), serial(h.sample)
  for control in (ui.seed, ui.scope):
    control.change(on_sample, sample_inputs, sample_outputs)
  for control in edit_inputs:
    control.change(
      on_edit,
      edit_inputs,
      edit_outputs,
      show_progress="hidden",
      queue=False,
      trigger_mode="always_last",
    )
  ui.appearance.change(serial(h.saliency), [ui.seed, ui.appearance], ui.saliency)
  ui.grid.select(selected, None, ui.seed)
  ui.upload.upload(serial(h.upload), ui.upload, ui.seed)
  ui.palette.select(selected, None, ui.appearance)
  ui.overlay.select(serial(on_pick), [ui.seed, ui.scope, ui.picked], ui.picked)
  ui.remove_button.click(
    serial(h.remove), [ui.seed, ui.mode, ui.picked, ui.mask, ui.alpha, ui.scope], ui.removed
  )
  ui.rank_button.click(
    serial(h.rank),
    [ui.appearance, ui.rank_scope, ui.picked, ui.mode, ui.mask, ui.scope],
    ui.ranking,
  )
  ui.save_button.click(serial(h.save), edit_inputs, ui.recipe_path)
  page.load(on_sample, sample_inputs, sample_outputs)
  page.load(on_edit, edit_inputs, edit_outputs)


def explorer_from(config) -> Explorer:
  """Loads the generator and the factors (decomposing when `--factors` is not given)."""
  gen = sampling.load_generator(config.generator)
  if config.image:
    real_images.load_image(config.image, gen)  # A bad --image: exit 2 before any work.
  if not config.factors and not config.out:
    config.out = tempfile.mkdtemp(prefix="panda_explore_")
  factors, layer = decomposition.factors_for(config, gen)
  path = config.factors or os.path.join(config.out, "decompose")
  explorer = Explorer(
    gen,
    config.generator,
    factors,
    layer,
    os.path.abspath(path),
    seed=config.seed,
    truncation_psi=config.truncation_psi,
    num_grid=config.num_grid,
    num_rank=config.num_rank,
    recipes_dir=os.path.abspath(config.recipes_dir),
    inversion=real_images.settings(config, config.inversion_steps),
  )
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
  print(
    f"explorer ready in {time.time() - start:.1f} s (model side); factors "
    f"{explorer.factors_id['path']} (replay cards with --factors=that); serving on "
    f"http://{config.host}:{config.port}",
    flush=True,
  )
  page.launch(
    server_name=config.host,
    server_port=config.port,
    share=False,
    footer_links=[],
    quiet=False,
    css=_CSS,
    prevent_thread_lock=True,
  )
  stop = threading.Event()
  for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, lambda *_: stop.set())
  stop.wait()
  page.close()


if __name__ == "__main__":
  cli.main(run, SPEC)
