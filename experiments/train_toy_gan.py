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
data. `--max_minutes` (or SIGTERM) stops early, after a checkpoint, to respect a
budget. `--export` writes the EMA generator as a converted checkpoint at the end.
The model and the loop are `panda_jax.data.toyfaces_gan`.
"""

from __future__ import annotations

from experiments.plumbing import cli
from experiments.plumbing import options
from panda_jax.data import toyfaces_gan

_DEFAULT = toyfaces_gan.GanConfig()
_F = options.Flag

SPEC = options.replace(
  options.spec(
    "out",
    "seed",
    "steps",
    "checkpoint_every",
    "batch_size",
    max_minutes=_F(
      "float", None, "Stop (and checkpoint) after this many minutes of this invocation."
    ),
    log_every=_F("integer", 20, "Steps between metrics.jsonl lines."),
    sample_every=_F("integer", 400, "Steps between sample grids."),
    export=_F(
      "string",
      None,
      "Write the EMA generator here at the end (converted-checkpoint directory; must not exist).",
    ),
    resolution=_F("integer", _DEFAULT.resolution, "Image size."),
    z_dim=_F("integer", _DEFAULT.z_dim, "Latent size."),
    w_dim=_F("integer", _DEFAULT.w_dim, "Intermediate latent size."),
    mapping_layers=_F("integer", _DEFAULT.mapping_layers, "Mapping network depth."),
    g_channels=_F(
      "list",
      list(map(str, _DEFAULT.g_channels)),
      "Generator widths of the blocks 4, 8, ..., resolution.",
    ),
    d_channels=_F(
      "list",
      list(map(str, _DEFAULT.d_channels)),
      "Discriminator widths of the blocks resolution, ..., 4.",
    ),
    learning_rate=_F("float", _DEFAULT.learning_rate, "Adam step size (G and D)."),
    r1_gamma=_F("float", _DEFAULT.r1_gamma, "R1 weight."),
    r1_interval=_F("integer", _DEFAULT.r1_interval, "Lazy R1 interval."),
    ema_kimg=_F("float", _DEFAULT.ema_kimg, "EMA half-life (k images)."),
  ),
  out=dict(help="Output directory (checkpoints, metrics, samples)."),
  seed=dict(help="Seed of the initialisation, latents and data."),
  steps=dict(default=3500, help="Total training steps (a rerun continues)."),
  checkpoint_every=dict(default=200, help="Steps between checkpoints."),
  batch_size=dict(default=_DEFAULT.batch_size, help="Images per step."),
)


def gan_config(config) -> toyfaces_gan.GanConfig:
  """The model and optimiser options of a config (`SPEC`)."""
  return toyfaces_gan.GanConfig(
    resolution=config.resolution,
    batch_size=config.batch_size,
    z_dim=config.z_dim,
    w_dim=config.w_dim,
    mapping_layers=config.mapping_layers,
    g_channels=tuple(map(int, config.g_channels)),
    d_channels=tuple(map(int, config.d_channels)),
    learning_rate=config.learning_rate,
    r1_gamma=config.r1_gamma,
    r1_interval=config.r1_interval,
    ema_kimg=config.ema_kimg,
  )


def run(config) -> toyfaces_gan.TrainState:
  """Trains (or resumes) into `--out`; returns the state."""
  if not config.out:
    raise ValueError("--out is required (the output directory)")
  return toyfaces_gan.train(
    config.out,
    gan_config(config),
    steps=config.steps,
    seed=config.seed,
    max_minutes=config.max_minutes,
    checkpoint_every=config.checkpoint_every,
    log_every=config.log_every,
    sample_every=config.sample_every,
    export=config.export,
    stop=cli.stop_requested,
  )


if __name__ == "__main__":
  cli.main(run, SPEC)
