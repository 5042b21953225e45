"""Trains the embedded toy-faces StyleGAN2 (RGB + one label channel per part).

    python -m experiments.train_toy_gan --out=/tmp/toyfaces --steps=3500 \
        --sample_every=500 --export=/tmp/toyfaces_generator

(the shipped `panda_jax/assets/toyfaces` is that export: 3500 steps of 32 images,
seed 0, default flags, 40.5 minutes on a 2-core CPU; WORKSPACE.md has the losses.)

Writes `OUT/config.json`, orbax checkpoints of the whole `TrainState` in
`OUT/checkpoints/`, `OUT/metrics.jsonl` (one line per `--log_every` steps) and
`OUT/samples_STEP.png` (EMA generator, fixed latents: RGB and label map side
by side). Rerunning the same command continues from the latest checkpoint;
the batch of step t depends only on `(seed, t)`, so a resumed run sees the same
data. `--max_minutes` stops early (after a checkpoint) to respect a budget.
`--export` writes the EMA generator as a converted checkpoint at the end.
The recipe is in `experiments/toy_gan.py`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from experiments import toy_gan
from panda_jax.data import toyfaces

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

_DEFAULT = toy_gan.GanConfig()

_OUT = flags.DEFINE_string("out", None, "Output directory (checkpoints, metrics, samples).")
_STEPS = flags.DEFINE_integer("steps", 3500, "Total training steps (a rerun continues).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the initialisation, latents and data.")
_MAX_MINUTES = flags.DEFINE_float("max_minutes", None, "Stop (and checkpoint) after this "
                                  "many minutes of this invocation.")
_CHECKPOINT_EVERY = flags.DEFINE_integer("checkpoint_every", 200, "Steps between checkpoints.")
_LOG_EVERY = flags.DEFINE_integer("log_every", 20, "Steps between metrics.jsonl lines.")
_SAMPLE_EVERY = flags.DEFINE_integer("sample_every", 400, "Steps between sample grids.")
_EXPORT = flags.DEFINE_string("export", None, "Write the EMA generator here at the end "
                              "(converted-checkpoint directory; must not exist).")
_RESOLUTION = flags.DEFINE_integer("resolution", _DEFAULT.resolution, "Image size.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", _DEFAULT.batch_size, "Images per step.")
_Z_DIM = flags.DEFINE_integer("z_dim", _DEFAULT.z_dim, "Latent size.")
_W_DIM = flags.DEFINE_integer("w_dim", _DEFAULT.w_dim, "Intermediate latent size.")
_MAPPING_LAYERS = flags.DEFINE_integer("mapping_layers", _DEFAULT.mapping_layers,
                                       "Mapping network depth.")
_G_CHANNELS = flags.DEFINE_list("g_channels", list(map(str, _DEFAULT.g_channels)),
                                "Generator widths of the blocks 4, 8, ..., resolution.")
_D_CHANNELS = flags.DEFINE_list("d_channels", list(map(str, _DEFAULT.d_channels)),
                                "Discriminator widths of the blocks resolution, ..., 4.")
_LR = flags.DEFINE_float("learning_rate", _DEFAULT.learning_rate, "Adam step size (G and D).")
_R1_GAMMA = flags.DEFINE_float("r1_gamma", _DEFAULT.r1_gamma, "R1 weight.")
_R1_INTERVAL = flags.DEFINE_integer("r1_interval", _DEFAULT.r1_interval, "Lazy R1 interval.")
_EMA_KIMG = flags.DEFINE_float("ema_kimg", _DEFAULT.ema_kimg, "EMA half-life (k images).")


def config_from_flags() -> toy_gan.GanConfig:
  return toy_gan.GanConfig(
      resolution=_RESOLUTION.value, batch_size=_BATCH_SIZE.value, z_dim=_Z_DIM.value,
      w_dim=_W_DIM.value, mapping_layers=_MAPPING_LAYERS.value,
      g_channels=tuple(map(int, _G_CHANNELS.value)),
      d_channels=tuple(map(int, _D_CHANNELS.value)), learning_rate=_LR.value,
      r1_gamma=_R1_GAMMA.value, r1_interval=_R1_INTERVAL.value, ema_kimg=_EMA_KIMG.value)


def _check_config(out: str, cfg: toy_gan.GanConfig, seed: int) -> None:
  """Writes `out/config.json`, or checks that a resumed run uses the same one."""
  record = dict(dataclasses.asdict(cfg), seed=seed)
  record = json.loads(json.dumps(record))
  path = os.path.join(out, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old != record:
      diff = sorted(k for k in set(old) | set(record) if old.get(k) != record.get(k))
      raise ValueError(f"{out} holds a run with another configuration (differs in {diff}); "
                       "use a new --out")
  else:
    with open(path, "w") as f:
      json.dump(record, f, indent=1)


def write_grid(path: str, images, cols: int = 4, zoom: int = 1) -> None:
  """Writes generator output `[n, r, r, 3 + P]` as a PNG grid of (RGB, label map) pairs.

  `zoom` enlarges every pixel to `zoom x zoom` (nearest neighbour).
  """
  rgb, probs = toyfaces.split_channels(np.asarray(images))
  pairs = np.concatenate([np.clip((rgb + 1) / 2, 0, 1),
                          toyfaces.colourise(probs.argmax(-1))], axis=2)  # [n, r, 2r, 3]
  rows = -(-len(pairs) // cols)
  pairs = np.concatenate([pairs, np.ones((rows * cols - len(pairs),) + pairs.shape[1:])])
  r, w = pairs.shape[1:3]
  grid = pairs.reshape(rows, cols, r, w, 3).transpose(0, 2, 1, 3, 4)
  grid = grid.reshape(rows * r, cols * w, 3).repeat(zoom, axis=0).repeat(zoom, axis=1)
  plt.imsave(path, grid)


_generate = jax.jit(toy_gan.generate, static_argnames="cfg")


def train(out: str, cfg: toy_gan.GanConfig, *, steps: int, seed: int = 0,
          max_minutes: float | None = None, checkpoint_every: int = 200,
          log_every: int = 20, sample_every: int = 400,
          export: str | None = None) -> toy_gan.TrainState:
  """Trains (or resumes) into `out` until `steps` or `max_minutes`; returns the state."""
  if steps < 1 or checkpoint_every < 1 or log_every < 1 or sample_every < 1:
    raise ValueError("steps and the *_every intervals must be positive")
  os.makedirs(out, exist_ok=True)
  _check_config(out, cfg, seed)
  key = jax.random.key(seed)
  init_key, train_key, sample_key = jax.random.split(key, 3)
  state = toy_gan.init_state(init_key, cfg)
  manager = ocp.CheckpointManager(
      os.path.join(out, "checkpoints"),
      options=ocp.CheckpointManagerOptions(
          preservation_policy=ocp.checkpoint_managers.LatestN(2)))
  if manager.latest_step() is not None:
    state = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(state))
    logging.info("resumed from step %d", int(state.step))
  z_show = jax.random.normal(sample_key, (16, cfg.z_dim))
  start = time.time()
  first = int(state.step)
  metrics = {}
  with open(os.path.join(out, "metrics.jsonl"), "a") as log, \
       tqdm(total=steps, initial=first, desc="train_toy_gan") as bar:
    for step in range(first, steps):
      reals = jnp.asarray(toy_gan.real_batch(seed, step, cfg))
      r1 = step % cfg.r1_interval == 0
      state, m = toy_gan.train_step(state, reals, jax.random.fold_in(train_key, step),
                                    cfg=cfg, r1=r1)
      done = step + 1
      timeout = max_minutes is not None and time.time() - start > 60 * max_minutes
      last = done == steps or timeout
      if r1 or done % log_every == 0 or last:
        m = {k: float(v) for k, v in m.items()}
        if not all(np.isfinite(list(m.values()))):
          raise FloatingPointError(f"non-finite losses at step {done}: {m}")
        if not r1:
          m.pop("r1")
        metrics.update(m)  # The latest value of each, R1 from the latest R1 step.
      if done % log_every == 0 or last:
        record = dict(step=done, seconds=round(time.time() - start, 2), **metrics)
        log.write(json.dumps(record) + "\n")
        log.flush()
        bar.set_postfix(g=f"{metrics['g_loss']:.3f}", d=f"{metrics['d_loss']:.3f}")
      bar.update(1)
      if done % checkpoint_every == 0 or last:
        manager.save(done, args=ocp.args.StandardSave(state))
      if done % sample_every == 0 or last:
        images, _ = _generate(state.g_ema, state.w_avg, z_show, cfg=cfg)
        write_grid(os.path.join(out, f"samples_{done:06d}.png"), images)
      if timeout:
        logging.info("stopping after %.1f minutes at step %d", max_minutes, done)
        break
  manager.wait_until_finished()
  manager.close()
  if export is not None:
    toy_gan.export(state, cfg, export, steps=int(state.step), seed=seed,
                   images=int(state.step) * cfg.batch_size)
  return state


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _OUT.value is None:
    raise app.UsageError("--out is required")
  train(_OUT.value, config_from_flags(), steps=_STEPS.value, seed=_SEED.value,
        max_minutes=_MAX_MINUTES.value, checkpoint_every=_CHECKPOINT_EVERY.value,
        log_every=_LOG_EVERY.value, sample_every=_SAMPLE_EVERY.value, export=_EXPORT.value)


if __name__ == "__main__":
  app.run(main)
