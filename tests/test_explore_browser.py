"""The explorer end to end in a real browser (Playwright + Debian's Chromium).

Starts `python -m experiments.explore` on 127.0.0.1, picks a part, moves the
alpha slider, and checks that the displayed edit changes the pixels inside the
part much more than outside; then saves a recipe from the page and replays it
with `python -m experiments.edit --recipe=... --seeds=...`: the same pixels. Then
uploads a PNG (inverted, shown as sample -1), saves its card and replays it with
`--recipe=... --image=...`: the same pixels.
Skips (saying why) without the `demo` extra or without /usr/bin/chromium
(`apt-get install chromium`; `.ci/run` installs both). Set PANDA_SCREENSHOT=PATH
to keep the page's screenshot.
"""

import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = os.environ.get("PANDA_CHROMIUM", "/usr/bin/chromium")
LAYER = 6  # 32 x 32 features of the StyleGAN2 fixture: edits stay local.
ALPHA = 8.0

NO_DEMO = "the `demo` extra is not installed (pip install -e '.[demo]')"
pytest.importorskip("gradio", reason=NO_DEMO)
sync_api = pytest.importorskip("playwright.sync_api", reason=NO_DEMO)
if not os.path.exists(CHROMIUM):
  pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)
# pylint: disable=wrong-import-position
from PIL import Image  # noqa: E402  (a gradio dependency)

from experiments import decompose  # noqa: E402
from experiments.plumbing import options  # noqa: E402
from experiments.plumbing import real_images  # noqa: E402
import panda_jax as pj  # noqa: E402
from panda_jax import generators  # noqa: E402
from panda_jax import recipes  # noqa: E402
from panda_jax import viz  # noqa: E402


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env():
  return {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": ROOT}


@pytest.fixture(scope="module")
def setup(converted, tmp_path_factory):
  run = converted("stylegan2/network-snapshot.pkl")
  assert run.returncode == 0, run.stderr
  out = tmp_path_factory.mktemp("explore")
  config = options.make_config(
    decompose.SPEC,
    generator=str(run.dst),
    layer=LAYER,
    rank_c=8,
    rank_s=6,
    steps=30,
    num_samples=32,
    batch_size=32,
    out=str(out / "decompose"),
    num_show=2,
  )
  decompose.run(config)
  return str(run.dst), str(out / "decompose"), out


@pytest.fixture(scope="module")
def server(setup):
  generator, factors, out = setup
  port = _free_port()
  start = time.time()
  log = open(out / "explore.log", "w")
  proc = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "experiments.explore",
      f"--generator={generator}",
      f"--factors={factors}",
      f"--port={port}",
      f"--recipes_dir={out / 'recipes'}",
      "--num_rank=16",
      "--inversion_steps=10",
      "--feature_steps=5",
    ],
    cwd=ROOT,
    env=_env(),
    stdout=log,
    stderr=subprocess.STDOUT,
  )
  url = f"http://127.0.0.1:{port}/"
  try:
    while True:
      assert proc.poll() is None, (out / "explore.log").read_text()
      assert time.time() - start < 60, "the explorer did not come up in 60 s"
      try:
        with urllib.request.urlopen(url, timeout=2):
          break
      except OSError:
        time.sleep(0.3)
    yield url, start
  finally:
    proc.terminate()
    proc.wait(timeout=20)
    log.close()


def _png(page, locator) -> np.ndarray:
  src = page.locator(locator).get_attribute("src")
  body = page.request.get(src).body()
  return np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))


def _compact_part(gen, factors, layer):
  """The part whose region on seed 0 is smallest but not empty, and that region `[H, W]`."""
  one = recipes.sample(gen, layer, 0, 0)
  regions = [
    recipes.region(k, factors.parts, one.features, one.image.shape[1:3])[0]
    for k in range(factors.parts.shape[1])
  ]
  areas = [r.mean() if r.mean() >= 0.03 else np.inf for r in regions]
  k = int(np.argmin(areas))
  return k, regions[k]


def test_pick_part_move_slider_save_and_replay(setup, server):
  generator, factors_dir, out = setup
  url, start = server
  gen = generators.load(generator)
  factors = pj.load_factors(os.path.join(factors_dir, "factors"))
  k, region = _compact_part(gen, factors, LAYER)

  # JAX runs before the browser starts (never inside Playwright's greenlet-driven context).
  upload_path = out / "mine.png"
  real_images.write_png(
    str(upload_path),
    np.asarray(gen.generate(gen.latents(np.ones((1, gen.z_dim), np.float32))))[0, ..., :3],
  )

  with sync_api.sync_playwright() as p:
    browser = p.chromium.launch(
      executable_path=CHROMIUM,
      headless=True,
      args=[
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
      ],
    )
    try:
      page = browser.new_page(viewport={"width": 1400, "height": 1300})
      page.goto(url)
      page.wait_for_selector("#edited img", timeout=30_000)
      ready = time.time() - start
      page.locator("#parts label", has_text=f"part {k}").click()
      page.wait_for_function("document.querySelector('#roir textarea').value.includes('no change')")
      before_src = page.locator("#edited img").get_attribute("src")
      box = page.locator("#alpha input[type=number]")
      box.fill(str(ALPHA))
      t0 = time.time()
      box.press("Enter")
      page.wait_for_function(
        "src => document.querySelector('#edited img').getAttribute('src') !== src", arg=before_src
      )
      update = time.time() - t0
      original, edited = _png(page, "#original img"), _png(page, "#edited img")
      page.locator("#save").click()
      page.wait_for_function("document.querySelector('#recipe_path textarea').value.length > 0")
      card_path = page.locator("#recipe_path textarea").input_value()
      # Upload a PNG: it is inverted and shown as sample -1; its card names the image.
      sample_src = page.locator("#original img").get_attribute("src")
      page.locator("#upload input[type=file]").set_input_files(str(upload_path))
      page.wait_for_function(
        "document.querySelector('#seed input').value === '-1'", timeout=120_000
      )
      page.wait_for_function(
        "src => document.querySelector('#original img').getAttribute('src') !== src",
        arg=sample_src,
        timeout=60_000,
      )
      page.wait_for_function(
        "src => document.querySelector('#edited img').getAttribute('src') !== "
        "document.querySelector('#original img').getAttribute('src')",
        arg=None,
      )
      uploaded_edit = _png(page, "#edited img")
      previous_card = card_path
      page.locator("#save").click()
      page.wait_for_function(
        "old => { const v = document.querySelector('#recipe_path textarea').value;"
        " return v.length > 0 && v !== old; }",
        arg=previous_card,
      )
      image_card_path = page.locator("#recipe_path textarea").input_value()
      if os.environ.get("PANDA_SCREENSHOT"):
        page.screenshot(path=os.environ["PANDA_SCREENSHOT"], full_page=True)
    finally:
      browser.close()
  print(
    f"first page ready {ready:.1f} s after start; slider update {update * 1000:.0f} ms "
    "in the browser"
  )

  # The displayed edit is local: the part's pixels change much more than the rest.
  factor = edited.shape[0] // region.shape[0]
  inside = np.repeat(np.repeat(region, factor, 0), factor, 1) > 0
  change = np.abs(edited.astype(np.float32) - original).mean(-1)
  assert change[inside].mean() > 4 * change[~inside].mean(), (
    change[inside].mean(),
    change[~inside].mean(),
  )

  # The saved card names this edit, and replays from the command line to the same pixels.
  card = recipes.load(card_path)
  assert card["edit"]["part"] == [k] and card["samples"]["seeds"] == [0]
  replay_out = out / "replay"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.edit",
      f"--recipe={card_path}",
      "--seeds=0",
      f"--generator={generator}",
      f"--factors={factors_dir}",
      f"--out={replay_out}",
    ],
    cwd=ROOT,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  with np.load(replay_out / "replay.npz") as f:
    np.testing.assert_array_equal(viz.display(f["edited"][:1]), edited)
    np.testing.assert_array_equal(viz.display(f["originals"][:1]), original)
  metrics = json.loads((replay_out / "metrics.json").read_text())
  assert metrics["roir_mean"] == card["roir"]["mean"]

  # The uploaded image's card replays on that file only, to the pixels the page showed.
  image_card = recipes.load(image_card_path)
  assert image_card["samples"]["image"]["sha256"] == real_images.file_sha256(str(upload_path))
  assert image_card["samples"]["image"]["inversion"]["steps"] == 10
  image_out = out / "replay_image"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.edit",
      f"--recipe={image_card_path}",
      f"--image={upload_path}",
      f"--generator={generator}",
      f"--factors={factors_dir}",
      f"--out={image_out}",
    ],
    cwd=ROOT,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  with np.load(image_out / "replay.npz") as f:
    np.testing.assert_array_equal(viz.display(f["edited"][:1]), uploaded_edit)
