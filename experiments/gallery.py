"""A static HTML page of every recipe card in a directory (the "edit zoo").

    python -m experiments.gallery --recipes=recipes/ --out=/tmp/zoo   # open /tmp/zoo/index.html

Each card (`panda_jax.recipes`) is replayed on its seeds with the generator it
names (`--use_generator` overrides it) and the factors at its recorded path
(`--use_factors` overrides it); the page shows before, after and their difference
for every seed, the edit, and the ROIR (Eq. 13) recorded in the card next to the
replayed one. A card that fails validation or whose generator or factors do not
match is listed with the reason, not replayed. Also writes `OUT/metrics.json`.
"""

import glob
import html
import os

import numpy as np
from matplotlib import image as mpimg

import panda_jax as pj
from experiments.plumbing import cli
from experiments.plumbing import options
from experiments.plumbing import outputs
from experiments.plumbing import sampling
from panda_jax import recipes
from panda_jax import viz
from panda_jax.data import toyfaces

SPEC = options.spec(
  "out",
  *options.DISTRIBUTED,
  recipes=options.Flag("string", "recipes", "Directory of recipe cards (*.json)."),
  use_generator=options.Flag(
    "string", None, "Generator for every card (default: the one each card names)."
  ),
  use_factors=options.Flag(
    "string", None, "A decompose output for every card (default: each card's recorded path)."
  ),
)


class _Loaded:
  """Generators and factors loaded once per name / path, with their identities."""

  def __init__(self):
    self._gens, self._factors = {}, {}

  def generator(self, name):
    if name not in self._gens:
      gen = sampling.load_generator(name)
      self._gens[name] = gen, recipes.generator_identity(name, gen)
    return self._gens[name]

  def factors(self, path, layer):
    if path not in self._factors:
      self._factors[path] = pj.load_factors(os.path.join(path, "factors"))
    factors = self._factors[path]
    return factors, recipes.factors_identity(factors, layer, path)


def replay_card(path, config, loaded, out):
  """One card's row: `(html, metrics)`; writes its images under OUT."""
  name = os.path.splitext(os.path.basename(path))[0]
  try:
    card = recipes.load(path)
    gen, gen_id = loaded.generator(config.use_generator or card["generator"]["name"])
    factors_path = config.use_factors or card["factors"]["path"]
    if not factors_path:
      raise ValueError("the card records no factors path: pass --use_factors")
    factors, factors_id = loaded.factors(factors_path, card["factors"]["layer"])
    recipes.check_matches(card, gen_id, factors_id)
    before, after, roir = recipes.replay(
      card, gen, factors, rgb=lambda im: toyfaces.split_labels(im).rgb
    )
  except (ValueError, OSError) as err:
    row = (
      f"<tr><td>{html.escape(name)}</td><td colspan=3 class=err>refused: "
      f"{html.escape(str(err))}</td></tr>"
    )
    return row, {"card": name, "error": str(err)}
  cells = []
  for t, b, a in zip(card["samples"]["seeds"], before, after):
    b, a = viz.display(b[None]), viz.display(a[None])
    for kind, image in (("before", b), ("after", a), ("difference", viz.difference(b, a))):
      file = f"{name}_seed{t}_{kind}.png"
      mpimg.imsave(os.path.join(out, file), image)
      cells.append(
        f"<figure><img src='{html.escape(file)}' width=160>"
        f"<figcaption>seed {t} {kind}</figcaption></figure>"
      )
  edit = card["edit"]
  part = recipes.part_of(card)
  where = "hand-drawn mask" if isinstance(part, np.ndarray) else f"part(s) {part}"
  recorded = card["roir"]["mean"] if card["roir"] else float("nan")
  description = (
    f"{where}{' (refined)' if edit['refined'] else ''}, appearance "
    f"{edit['appearance']}, alpha {edit['alpha']:.4g}<br>generator "
    f"{html.escape(card['generator']['name'])}, layer {card['factors']['layer']}"
    f"<br>ROIR recorded {recorded:.4f}, replayed {roir[0]:.4f}"
  )
  row = f"<tr><td>{html.escape(name)}</td><td>{description}</td><td>{''.join(cells)}</td></tr>"
  return row, {
    "card": name,
    "roir_recorded": card["roir"],
    "roir_mean": roir[0],
    "roir_std": roir[1],
    "seeds": card["samples"]["seeds"],
  }


def run(config) -> dict:
  """Writes OUT/index.html; returns the metrics written to OUT/metrics.json."""
  if not os.path.isdir(config.recipes):
    raise ValueError(f"--recipes={config.recipes} is not a directory")
  out = outputs.output_dir(config.out)
  paths = sorted(glob.glob(os.path.join(config.recipes, "*.json")))
  if not paths:
    raise ValueError(f"no recipe cards (*.json) in {config.recipes}")
  loaded = _Loaded()
  rows, results = [], []
  for path in outputs.progress_iter(paths, "recipes"):
    row, result = replay_card(path, config, loaded, out)
    rows.append(row)
    results.append(result)
  page = (
    "<!doctype html><meta charset=utf-8><title>panda-jax edit zoo</title><style>"
    "body{font-family:sans-serif}td{vertical-align:top;padding:6px;border-top:1px solid "
    "#ccc}figure{display:inline-block;margin:2px}.err{color:#b00}</style>"
    f"<h1>panda-jax edit zoo: {len(paths)} recipes</h1><table>{''.join(rows)}</table>"
  )
  with open(os.path.join(out, "index.html"), "w") as f:
    f.write(page)
  return outputs.write_metrics(out, {"recipes": results})


if __name__ == "__main__":
  cli.main(run, SPEC)
