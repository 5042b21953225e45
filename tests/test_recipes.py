"""Recipe cards: round trip to identical pixels, refusal of tampered or mismatched cards."""

import json

import jax
import numpy as np
import pytest

import panda_jax as pj
from panda_jax import generator_ops
from panda_jax import recipes
from panda_jax import viz

LAYER = 4  # 16 x 16 x 64 features of the StyleGAN2 fixture.


@pytest.fixture(scope="module")
def setup(fixture_generator):
  gen = fixture_generator("stylegan2")
  key = jax.random.split(jax.random.PRNGKey(0))[0]
  x = next(generator_ops.sampled_features(gen, key, LAYER, num_samples=16, batch_size=16))
  factors = pj.fit(x, 6, 4, steps=20, key=jax.random.PRNGKey(1))
  return gen, factors


def _card(setup, part=(0, 2), refined=False, seeds=(0, 3), alpha=40.0):
  gen, factors = setup
  return recipes.make_card(
    generator=recipes.generator_identity("sg2", gen),
    factors=recipes.factors_identity(factors, LAYER, "/factors"),
    part=part if isinstance(part, np.ndarray) else list(part),
    appearance=1,
    alpha=alpha,
    refined=refined,
    seed=0,
    seeds=seeds,
  )


@pytest.mark.parametrize("refined", [False, True])
def test_round_trip_gives_identical_pixels(setup, tmp_path, refined):
  gen, factors = setup
  card = _card(setup, refined=refined)
  path = recipes.save(str(tmp_path / "card.json"), card)
  loaded = recipes.load(path)
  assert loaded == card
  before, after, roir = recipes.replay(loaded, gen, factors)
  before2, after2, roir2 = recipes.replay(recipes.load(path), gen, factors)
  np.testing.assert_array_equal(after, after2)
  assert roir == roir2
  # Each seed is rendered alone: the same pixels whatever seeds come with it.
  _, alone, _ = recipes.replay(loaded, gen, factors, seeds=[3])
  np.testing.assert_array_equal(alone[0], after[1])
  # Against the library's editing path (generator_ops), each seed as the card renders
  # it, alone: the same functions on the same arrays give the same floats.
  key = jax.random.split(jax.random.PRNGKey(0))[0]
  for i, seed in enumerate((0, 3)):
    lat = generator_ops.sample_latents(gen, key, np.asarray([seed]))
    parts = (
      pj.refine(gen.split(lat, LAYER)[0], factors.appearances, factors.parts)
      if refined
      else factors.parts
    )
    ref_before, ref_after = generator_ops.edit_images(
      gen, lat, LAYER, factors.appearances, parts, [([0, 2], 1, 40.0)]
    )
    np.testing.assert_array_equal(before[i : i + 1], ref_before)
    np.testing.assert_array_equal(after[i : i + 1], ref_after)
  assert np.abs(after - before).max() > 0.05  # the edit does something.


def test_mask_card_round_trip_and_locality(setup, tmp_path):
  gen, factors = setup
  size = gen.generate(generator_ops.sample_latents(gen, jax.random.PRNGKey(0), [0])).shape[1:3]
  mask = np.zeros(size, np.float32)
  mask[: size[0] // 2, : size[1] // 2] = 1
  card = _card(setup, part=mask)
  loaded = recipes.load(recipes.save(str(tmp_path / "mask.json"), card))
  np.testing.assert_array_equal(recipes.part_of(loaded), mask)
  before, after, (roir, _) = recipes.replay(loaded, gen, factors)
  change = np.abs(after - before).mean(-1)
  inside, outside = change[:, mask > 0].mean(), change[:, mask == 0].mean()
  assert inside > 2 * outside, (inside, outside)
  assert 0 <= roir < 1  # Eq. (13): less change outside than inside.


def _tampered(card, **edit):
  card = json.loads(json.dumps(card))
  card["edit"].update(edit)
  return card


def test_tampered_and_malformed_cards_are_refused(setup, tmp_path):
  card = _card(setup)
  with pytest.raises(ValueError, match="checksum"):
    recipes.validate(_tampered(card, alpha=41.0))
  path = tmp_path / "tampered.json"
  path.write_text(json.dumps(_tampered(card, appearance=2)))
  with pytest.raises(ValueError, match="modified after it was saved"):
    recipes.load(str(path))
  # A consistent checksum does not make a malformed card valid.
  bad = _tampered(card, part=[0, 9])
  bad["checksum"] = recipes._checksum(bad)  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="part must be distinct indices"):
    recipes.validate(bad)
  (tmp_path / "junk.json").write_text("not json")
  with pytest.raises(ValueError, match="not JSON"):
    recipes.load(str(tmp_path / "junk.json"))


def test_mismatched_generator_or_factors_are_refused(setup):
  gen, factors = setup
  card = _card(setup)
  same_gen = recipes.generator_identity("other/name", gen)
  same_factors = recipes.factors_identity(factors, LAYER, "/elsewhere")
  recipes.check_matches(card, same_gen, same_factors)  # names and paths are not identity.
  params = jax.tree.map(np.array, gen.params)
  leaf = jax.tree.leaves(params)[0]
  leaf.reshape(-1)[0] = np.nextafter(leaf.reshape(-1)[0], np.inf)  # one ulp
  other_gen = {"name": "sg2", "sha256": recipes.tree_sha256(params)}
  with pytest.raises(ValueError, match="made with generator 'sg2'"):
    recipes.check_matches(card, other_gen, same_factors)
  other = factors._replace(parts=factors.parts.at[0, 0].add(1e-6))
  with pytest.raises(ValueError, match="other factors"):
    recipes.check_matches(card, same_gen, recipes.factors_identity(other, LAYER))
  with pytest.raises(ValueError, match="layer"):
    recipes.check_matches(card, same_gen, recipes.factors_identity(factors, LAYER + 1))


def test_tree_sha256_ignores_key_order_and_sees_dtype():
  a = {"x": np.arange(3, dtype=np.float32), "y": {"z": np.ones(2)}}
  b = {"y": {"z": np.ones(2)}, "x": np.arange(3, dtype=np.float32)}
  assert recipes.tree_sha256(a) == recipes.tree_sha256(b)
  c = {"x": np.arange(3, dtype=np.float64), "y": {"z": np.ones(2)}}
  assert recipes.tree_sha256(a) != recipes.tree_sha256(c)


def test_explorer_edits_replay_and_masks(setup):
  from experiments import explore  # pylint: disable=import-outside-toplevel

  gen, factors = setup
  ex = explore.Explorer(gen, "sg2", factors, LAYER, "/factors", num_grid=2, num_rank=8)
  # The page's edit and the card saved from it replay to the same displayed pixels.
  before, after, _, roir = ex.edit(1, [1, 3], 2, 5.0, True)
  card = ex.card(1, [1, 3], 2, 5.0, True)
  assert card["edit"]["alpha"] == 5.0 * ex.scale and card["samples"]["seeds"] == [1]
  replayed_before, replayed, replayed_roir = recipes.replay(card, gen, factors)
  np.testing.assert_array_equal(viz.display(replayed), after)
  np.testing.assert_array_equal(viz.display(replayed_before), before)
  assert replayed_roir == roir == (card["roir"]["mean"], card["roir"]["std"])
  # A mask painted on the enlarged display is the same region at image size.
  size = ex.sample(0).image.shape[1:3]
  painted = np.zeros(after.shape[:2], bool)
  painted[: after.shape[0] // 4, after.shape[1] // 2 :] = True
  mask = ex.target("mask", None, painted)
  expected = np.zeros(size, np.float32)
  expected[: size[0] // 4, size[1] // 2 :] = 1
  np.testing.assert_array_equal(mask, expected)
  assert ex.target("parts", ["part 3", "part 1"], None) == [1, 3]
  with pytest.raises(ValueError, match="pick at least one part"):
    ex.target("parts", [], None)
  # Ranking: the pool's top samples by Eq. (17), against a batched computation.
  top = [int(caption.split()[1].rstrip(":")) for _, caption in ex.rank(2)]
  lat = generator_ops.sample_latents(gen, jax.random.split(jax.random.PRNGKey(0))[0], np.arange(8))
  scores = np.asarray(pj.rank(gen.split(lat, LAYER)[0], factors.appearances, 2))
  assert top == np.argsort(-scores)[: len(top)].tolist()


@pytest.fixture(scope="module")
def on_disk(setup, converted, tmp_path_factory):
  """`(generator_dir, factors_dir)`: the converted fixture, the factors as `decompose` writes."""
  factors_dir = tmp_path_factory.mktemp("decomposed")
  pj.save_factors(str(factors_dir / "factors"), setup[1])
  (factors_dir / "metrics.json").write_text(json.dumps({"layer": LAYER}))
  return str(converted("stylegan2/network-snapshot.pkl").dst), str(factors_dir)


def test_edit_launcher_replays_and_refuses(setup, on_disk, tmp_path):
  from experiments.plumbing import options  # pylint: disable=import-outside-toplevel
  from experiments import edit  # pylint: disable=import-outside-toplevel

  gen, factors = setup
  generator, factors_dir = on_disk
  card = _card(setup, seeds=(2,))
  path = recipes.save(str(tmp_path / "card.json"), card)

  def run(card_path, out, **kw):
    return edit.run(
      options.make_config(
        edit.SPEC,
        recipe=card_path,
        generator=generator,
        factors=factors_dir,
        out=str(tmp_path / out),
        **kw,
      )
    )

  metrics = run(path, "replay", seeds=["0", "2"])
  _, expected, roir = recipes.replay(card, gen, factors, seeds=[0, 2])
  with np.load(tmp_path / "replay" / "replay.npz") as f:
    np.testing.assert_array_equal(f["edited"], expected)
  assert metrics["seeds"] == [0, 2] and metrics["roir_mean"] == roir[0]
  other = _card((gen, factors._replace(appearances=-factors.appearances)))
  with pytest.raises(ValueError, match="other factors"):
    run(recipes.save(str(tmp_path / "other.json"), other), "refused")
  foreign = dict(card, generator={"name": "x", "sha256": "0" * 64})
  foreign["checksum"] = recipes._checksum(foreign)  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="made with generator 'x'"):
    run(recipes.save(str(tmp_path / "foreign.json"), foreign), "refused")


def test_gallery_renders_cards_and_lists_refused_ones(setup, on_disk, tmp_path):
  from experiments.plumbing import options  # pylint: disable=import-outside-toplevel
  from experiments import gallery  # pylint: disable=import-outside-toplevel

  gen, factors = setup
  generator, factors_dir = on_disk
  card = _card(setup, seeds=(1,))
  recipes.save(str(tmp_path / "cards" / "good.json"), card)
  (tmp_path / "cards" / "bad.json").write_text(json.dumps(_tampered(card, alpha=1.0)))
  metrics = gallery.run(
    options.make_config(
      gallery.SPEC,
      recipes=str(tmp_path / "cards"),
      out=str(tmp_path / "zoo"),
      use_generator=generator,
      use_factors=factors_dir,
    )
  )
  bad, good = metrics["recipes"]
  assert "modified after it was saved" in bad["error"]
  assert good["roir_mean"] == recipes.replay(card, gen, factors)[2][0]
  page = (tmp_path / "zoo" / "index.html").read_text()
  assert "refused" in page and "good_seed1_after.png" in page
  assert (tmp_path / "zoo" / "good_seed1_difference.png").stat().st_size > 0


def test_explorer_uploaded_image_edits_and_its_card_replays(setup, tmp_path):
  """An uploaded PNG becomes sample -1 (its inverted features); its card names the
  file's sha256 and the inversion, and replays on that image to the same pixels."""
  from experiments import explore  # pylint: disable=import-outside-toplevel
  from experiments.plumbing import real_images  # pylint: disable=import-outside-toplevel

  gen, factors = setup
  inversion = dict(
    steps=4,
    feature_steps=2,
    structure_weight=1.0,
    feature_structure_weight=0.0,
    tie_layers=False,
    seed=1,
  )
  ex = explore.Explorer(
    gen, "sg2", factors, LAYER, "/factors", num_grid=1, num_rank=2, inversion=inversion
  )
  path = tmp_path / "mine.png"
  image = np.asarray(gen.generate(gen.latents(np.ones((1, gen.z_dim), np.float32))))[0]
  real_images.write_png(str(path), image[..., :3])
  assert ex.upload(str(path)) == -1
  before, after, _, roir = ex.edit(-1, 2, 1, 5.0, False)
  assert np.abs(after.astype(int) - before).max() > 0
  card = ex.card(-1, 2, 1, 5.0, False)
  assert card["samples"] == {
    "image": {"sha256": real_images.file_sha256(str(path)), "inversion": inversion}
  }
  one = recipes.image_sample(gen, LAYER, real_images.load_image(str(path), gen), inversion)
  replayed_before, replayed, replayed_roir = recipes.replay(card, gen, factors, samples=[one])
  np.testing.assert_array_equal(viz.display(replayed), after)
  np.testing.assert_array_equal(viz.display(replayed_before), before)
  assert replayed_roir == roir
  with pytest.raises(ValueError, match="made on a real image"):
    recipes.replay(card, gen, factors)
  with pytest.raises(ValueError, match="no uploaded image -2"):
    ex.sample(-2)
  bad = tmp_path / "bad.png"
  bad.write_bytes(path.read_bytes()[:100])
  with pytest.raises(real_images.BadImage, match="corrupt PNG"):
    ex.upload(str(bad))
