"""The toy-faces GAN: a small StyleGAN2 (our Flax port) trained on toy faces.

Pure functions over `TrainState` (`init_state`, `train_step`), and `train`, the
loop that checkpoints, logs and resumes them (`experiments/train_toy_gan.py` is
its command line; the shipped `panda_jax/assets/toyfaces` is its export).

The recipe of Karras et al. (CVPR 2020) reduced to what pays at 32x32:
non-saturating logistic loss, lazy R1 on the reals every `r1_interval` steps,
an exponential moving average (EMA) of the generator, equalised learning rates,
Adam(b1=0, b2=0.99); no path-length regulariser, style mixing or noise inputs.
The generator emits RGB plus one channel per toy-face part (the soft label map
in [-1, 1]) and the discriminator sees all of them.

Equalised learning rate: the generator's converted parameters carry their
gains (`stored = raw * gain`, `generator_gains`); training updates the unit-scale
`raw` parameters, so Adam's step is the same relative size in every layer.
`export_generator` writes the EMA generator as a converted checkpoint that
`panda_jax.generators.load` reads.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
import zlib
from typing import Any, Callable, NamedTuple, Optional

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from panda_jax import json_io
from panda_jax import viz
from panda_jax.data import toyfaces
from panda_jax.generators import base
from panda_jax.generators import layers
from panda_jax.generators import stylegan2


@dataclasses.dataclass(frozen=True)
class GanConfig:
  """Static training options (hashable: part of the jit cache key)."""

  resolution: int = 32
  z_dim: int = 64
  w_dim: int = 64
  mapping_layers: int = 2
  g_channels: tuple[int, ...] = (128, 128, 64, 32)  # Blocks 4, 8, ..., resolution.
  d_channels: tuple[int, ...] = (32, 64, 128, 128)  # Blocks resolution, ..., 4.
  batch_size: int = 32
  learning_rate: float = 0.0025
  mapping_lr_mul: float = 0.01
  r1_gamma: float = 0.05
  r1_interval: int = 16
  ema_kimg: float = 5.0
  ema_rampup: float = 0.05
  w_avg_beta: float = 0.995

  def __post_init__(self):
    blocks = int(np.log2(self.resolution)) - 1
    if self.resolution < 8 or 2 ** (blocks + 1) != self.resolution:
      raise ValueError(f"resolution must be a power of two >= 8, got {self.resolution}")
    if len(self.g_channels) != blocks or len(self.d_channels) != blocks:
      raise ValueError(
        f"g_channels and d_channels need {blocks} widths each for resolution {self.resolution}"
      )
    if self.batch_size < 1 or self.r1_interval < 1:
      raise ValueError("batch_size and r1_interval must be positive")

  @property
  def channels(self) -> int:
    """Image channels: RGB and one soft label channel per part."""
    return toyfaces.RGB_CHANNELS + len(toyfaces.PARTS)

  def generator(self) -> stylegan2.Config:
    return stylegan2.Config(
      z_dim=self.z_dim,
      c_dim=0,
      w_dim=self.w_dim,
      img_resolution=self.resolution,
      img_channels=self.channels,
      channels=self.g_channels,
      mapping_layers=self.mapping_layers,
      use_noise=False,
    )


class TrainState(NamedTuple):
  step: jax.Array  # [] int32, steps done.
  g_params: Any  # Raw (unit-scale) generator parameters, no `w_avg`.
  g_ema: Any  # EMA of `g_params`.
  d_params: Any  # Discriminator parameters.
  g_opt: Any  # optax state of the generator.
  d_opt: Any  # optax state of the discriminator.
  w_avg: jax.Array  # [w_dim] running mean of w (truncation centre).


# --- Generator: equalised-lr parameterisation of the Flax port ---------------


def _gain(path: tuple[str, ...], shape, cfg: GanConfig) -> float:
  """Equalised-lr gain of the generator parameter at `path`: `stored = raw * gain`."""
  name = path[-1]
  if path[0] == "mapping":
    lr = cfg.mapping_lr_mul
    return lr / np.sqrt(shape[0]) if name == "kernel" else lr
  if path[-2] == "affine":  # Styles; ToRGB's weight gain 1 / sqrt(in) is folded in.
    to_rgb = 1 / np.sqrt(shape[-1]) if path[1].startswith("torgbs") else 1.0
    return to_rgb / np.sqrt(shape[0]) if name == "kernel" else to_rgb
  if name == "weight":  # [k, k, i, o]
    return 1 / np.sqrt(np.prod(shape[:3]))
  return 1.0  # Biases and the constant input.


def _init(key, path: tuple[str, ...], shape, cfg: GanConfig):
  """Raw initial value: `N(0, 1) / lr_mul` weights and constant input, style biases 1, biases 0."""
  if path[-1] in ("kernel", "weight", "const"):
    lr = cfg.mapping_lr_mul if path[0] == "mapping" else 1.0
    key = jax.random.fold_in(key, zlib.crc32("/".join(path).encode()))
    return jax.random.normal(key, shape, jnp.float32) / lr
  return jnp.full(shape, 1.0 if path[-2] == "affine" else 0.0, jnp.float32)


def _map_raw(fn, cfg: GanConfig):
  """`fn(path, shape)` over the generator's parameters except `mapping/w_avg`."""
  shapes = stylegan2.param_shapes(cfg.generator())
  shapes = {**shapes, "mapping": {k: v for k, v in shapes["mapping"].items() if k != "w_avg"}}
  return jax.tree_util.tree_map_with_path(
    lambda path, s: fn(tuple(k.key for k in path), s.shape), shapes
  )


def generator_gains(cfg: GanConfig) -> Any:
  """Equalised-lr gains per raw generator parameter (`stored = raw * gain`)."""
  return _map_raw(lambda path, shape: np.float32(_gain(path, shape, cfg)), cfg)


def init_generator(key, cfg: GanConfig) -> Any:
  """Raw (unit-scale) generator parameters, without `w_avg`."""
  return _map_raw(lambda path, shape: _init(key, path, shape, cfg), cfg)


def stored_params(raw, w_avg, cfg: GanConfig) -> Any:
  """The converted-checkpoint parameters (gains applied, `w_avg` added) of `raw`."""
  params = jax.tree.map(lambda r, g: r * g, raw, generator_gains(cfg))
  return {**params, "mapping": {**params["mapping"], "w_avg": w_avg}}


def generate(raw, w_avg, z, cfg: GanConfig):
  """Images `[n, r, r, 3 + P]` and `w [n, w_dim]` from `z [n, z_dim]` (no truncation)."""
  gcfg = cfg.generator()
  net = stylegan2.StyleGAN2Net(gcfg)
  variables = {"params": stored_params(raw, w_avg, cfg)}
  w = net.apply(
    variables, z, jnp.zeros((z.shape[0], 0)), method=stylegan2.StyleGAN2Net.map
  )  # [n, w_dim]
  ws = jnp.broadcast_to(w[:, None], (w.shape[0], gcfg.num_ws, gcfg.w_dim))
  return net.apply(variables, None, None, ws, None, 0, method=stylegan2.StyleGAN2Net.resume), w


# --- Discriminator (residual, as StyleGAN2's config F) ------------------------


class EqDense(nn.Module):
  """Dense layer with equalised learning rate: `x @ (W / sqrt(in)) + b`."""

  features: int
  act: str = "linear"

  @nn.compact
  def __call__(self, x):
    w = self.param("kernel", nn.initializers.normal(1.0), (x.shape[-1], self.features))
    b = self.param("bias", nn.initializers.zeros, (self.features,))
    return layers.bias_act(x @ (w / np.sqrt(x.shape[-1])), b, self.act)


class EqConv(nn.Module):
  """k x k conv with equalised learning rate, optionally followed by 2x2 average pooling."""

  features: int
  kernel: int = 3
  act: str = "lrelu"
  down: bool = False
  bias: bool = True

  @nn.compact
  def __call__(self, x):
    k, cin = self.kernel, x.shape[-1]
    w = self.param("kernel", nn.initializers.normal(1.0), (k, k, cin, self.features))
    x = layers.conv2d(x, w / np.sqrt(k * k * cin), k // 2)
    if self.down:  # A box filter: much cheaper on CPU than NVIDIA's [1, 3, 3, 1] blur.
      n, h, w_, c = x.shape
      x = x.reshape(n, h // 2, 2, w_ // 2, 2, c).mean(axis=(2, 4))
    b = self.param("bias", nn.initializers.zeros, (self.features,)) if self.bias else None
    return layers.bias_act(x, b, self.act)


class Discriminator(nn.Module):
  """Images `[n, r, r, ch]` -> logits `[n]`: residual blocks, minibatch std, dense head."""

  cfg: GanConfig
  mbstd_group: int = 4

  @nn.compact
  def __call__(self, img):
    ch = self.cfg.d_channels
    x = EqConv(ch[0], kernel=1, name="fromrgb")(img)
    for i in range(len(ch) - 1):
      skip = EqConv(ch[i + 1], kernel=1, act="linear", down=True, bias=False, name=f"skip_{i}")(x)
      x = EqConv(ch[i], name=f"conv0_{i}")(x)
      x = EqConv(ch[i + 1], down=True, name=f"conv1_{i}")(x)
      x = (x + skip) * np.sqrt(0.5)
    x = jnp.concatenate([x, _minibatch_std(x, self.mbstd_group)], axis=-1)
    x = EqConv(ch[-1], name="conv")(x)
    x = EqDense(ch[-1], act="lrelu", name="fc")(x.reshape(x.shape[0], -1))
    return EqDense(1, name="out")(x)[:, 0]


def _minibatch_std(x, group: int):
  """One channel: mean std over groups of `group` samples, `[n, h, w, c] -> [n, h, w, 1]`."""
  n, h, w, c = x.shape
  g = min(group, n)
  if n % g:
    raise ValueError(f"batch size {n} must be a multiple of the minibatch-std group {g}")
  y = x.reshape(g, n // g, h, w, c)
  y = jnp.sqrt(jnp.var(y, axis=0) + 1e-8).mean(axis=(1, 2, 3))  # [n / g]
  return jnp.broadcast_to(jnp.tile(y, g)[:, None, None, None], (n, h, w, 1))


# --- Losses and the training step ---------------------------------------------


def optimizer(cfg: GanConfig) -> optax.GradientTransformation:
  return optax.adam(cfg.learning_rate, b1=0.0, b2=0.99, eps=1e-8)


def init_state(key, cfg: GanConfig) -> TrainState:
  """Fresh raw generator, discriminator and optimiser states."""
  g_key, d_key = jax.random.split(key)
  g = init_generator(g_key, cfg)
  d = Discriminator(cfg).init(d_key, jnp.zeros((4, cfg.resolution, cfg.resolution, cfg.channels)))[
    "params"
  ]
  opt = optimizer(cfg)
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    g_params=g,
    g_ema=jax.tree.map(jnp.copy, g),  # Own buffers: train_step donates.
    d_params=d,
    g_opt=opt.init(g),
    d_opt=opt.init(d),
    w_avg=jnp.zeros((cfg.w_dim,), jnp.float32),
  )


def d_loss_fn(d_params, g_params, w_avg, reals, z, cfg: GanConfig, r1: bool):
  """Logistic D loss; with `r1`, plus the lazy R1 term `gamma/2 |grad_x D(x)|^2 * interval`.

  `reals [n, r, r, ch]`, `z [n, z_dim]`; returns `(total, metrics)`.
  """
  disc = lambda x: Discriminator(cfg).apply({"params": d_params}, x)  # [n]
  fakes, _ = generate(g_params, w_avg, z, cfg)
  fake_logits = disc(fakes)
  if r1:
    real_logits, vjp = jax.vjp(disc, reals)
    (grads,) = vjp(jnp.ones_like(real_logits))  # grad of sum(D(x)) w.r.t. x: [n, r, r, ch]
    penalty = jnp.mean(jnp.sum(jnp.square(grads), axis=(1, 2, 3)))
  else:
    real_logits, penalty = disc(reals), jnp.float32(0)
  loss = jnp.mean(jax.nn.softplus(fake_logits)) + jnp.mean(jax.nn.softplus(-real_logits))
  total = loss + cfg.r1_gamma / 2 * cfg.r1_interval * penalty
  return total, dict(
    d_loss=loss, r1=penalty, d_real=jnp.mean(real_logits), d_fake=jnp.mean(fake_logits)
  )


def g_loss_fn(g_params, d_params, w_avg, z, cfg: GanConfig):
  """Non-saturating G loss `mean softplus(-D(G(z)))`; aux: the batch's mean w `[w_dim]`."""
  fakes, w = generate(g_params, w_avg, z, cfg)
  logits = Discriminator(cfg).apply({"params": d_params}, fakes)
  return jnp.mean(jax.nn.softplus(-logits)), jnp.mean(w, axis=0)


def ema_beta(step, cfg: GanConfig):
  """EMA decay per step: half-life `ema_kimg` thousand images, ramped up over the first ones."""
  nimg = (step + 1).astype(jnp.float32) * cfg.batch_size
  half_life = jnp.minimum(cfg.ema_kimg * 1000, nimg * cfg.ema_rampup)
  return 0.5 ** (cfg.batch_size / jnp.maximum(half_life, 1e-8))


@functools.partial(jax.jit, static_argnames=("cfg", "r1"), donate_argnums=0)
def train_step(state: TrainState, reals, key, *, cfg: GanConfig, r1: bool):
  """One D update (with R1 when `r1`) and one G update on `reals [n, r, r, ch]`.

  `key` draws both latent batches; returns `(state, metrics)` (scalars).
  """
  opt = optimizer(cfg)
  d_key, g_key = jax.random.split(key)
  n = reals.shape[0]
  z = jax.random.normal(d_key, (n, cfg.z_dim))
  (_, metrics), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(
    state.d_params, state.g_params, state.w_avg, reals, z, cfg, r1
  )
  d_updates, d_opt = opt.update(d_grads, state.d_opt, state.d_params)
  d_params = optax.apply_updates(state.d_params, d_updates)

  z = jax.random.normal(g_key, (n, cfg.z_dim))
  (g_loss, w_mean), g_grads = jax.value_and_grad(g_loss_fn, has_aux=True)(
    state.g_params, d_params, state.w_avg, z, cfg
  )
  g_updates, g_opt = opt.update(g_grads, state.g_opt, state.g_params)
  g_params = optax.apply_updates(state.g_params, g_updates)

  beta = ema_beta(state.step, cfg)
  g_ema = jax.tree.map(lambda e, p: beta * e + (1 - beta) * p, state.g_ema, g_params)
  w_avg = cfg.w_avg_beta * state.w_avg + (1 - cfg.w_avg_beta) * w_mean
  state = TrainState(
    step=state.step + 1,
    g_params=g_params,
    g_ema=g_ema,
    d_params=d_params,
    g_opt=g_opt,
    d_opt=d_opt,
    w_avg=w_avg,
  )
  return state, dict(metrics, g_loss=g_loss)


def real_batch(seed: int, step: int, cfg: GanConfig) -> np.ndarray:
  """The toy-face batch of `step` `[n, r, r, 3 + P]` (a pure function of seed and step)."""
  rng = np.random.default_rng([seed, step])
  return toyfaces.to_channels(toyfaces.sample(rng, cfg.batch_size, cfg.resolution))


def num_params(tree) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def generator_config(cfg: GanConfig, **source) -> dict:
  """The converted checkpoint's config: StyleGAN2 options plus the toy-face channel layout."""
  gcfg = dataclasses.asdict(cfg.generator())
  gcfg = {k: list(v) if isinstance(v, tuple) else v for k, v in gcfg.items()}
  gcfg["resample_filter"] = [list(row) for row in cfg.generator().resample_filter]
  gcfg["source"] = dict(
    format="panda_jax.toyfaces",
    parts=list(toyfaces.PARTS),
    rgb_channels=toyfaces.RGB_CHANNELS,
    label_channels=len(toyfaces.PARTS),
    label_range=[-1.0, 1.0],
    **source,
  )
  return gcfg


def export_generator(state: TrainState, cfg: GanConfig, dst, **source) -> str:
  """Writes the EMA generator as a converted checkpoint directory (`generators.load`)."""
  params = jax.tree.map(np.asarray, stored_params(state.g_ema, state.w_avg, cfg))
  return base.save_converted(dst, "stylegan2", generator_config(cfg, **source), params)


# --- The training loop ---------------------------------------------------------


def _check_config(out: str, cfg: GanConfig, seed: int) -> None:
  """Writes `out/config.json`, or checks that a resumed run uses the same one."""
  record = dict(dataclasses.asdict(cfg), seed=seed)
  record = json.loads(json.dumps(record))
  path = os.path.join(out, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old != record:
      diff = sorted(k for k in set(old) | set(record) if old.get(k) != record.get(k))
      raise ValueError(
        f"{out} holds a run with another configuration (differs in {diff}); use a new --out"
      )
  else:
    json_io.write_json(path, record)


_generate = jax.jit(generate, static_argnames="cfg")


def train(
  out: str,
  cfg: GanConfig,
  *,
  steps: int,
  seed: int = 0,
  max_minutes: Optional[float] = None,
  checkpoint_every: int = 200,
  log_every: int = 20,
  sample_every: int = 400,
  export: Optional[str] = None,
  stop: Optional[Callable[[], bool]] = None,
) -> TrainState:
  """Trains (or resumes) into `out` until `steps`, `max_minutes` or `stop()`; returns the state.

  Writes `out/config.json`, orbax checkpoints of the whole `TrainState` in
  `out/checkpoints/`, `out/metrics.jsonl` (one line per `log_every` steps) and
  `out/samples_STEP.png` (EMA generator, fixed latents: RGB and label map side
  by side, `viz.save_label_grid`). A rerun continues from the latest
  checkpoint; the batch of step t depends only on `(seed, t)` (`real_batch`),
  so a resumed run sees the same data. Stopping by `max_minutes` or `stop`
  checkpoints first. `export` writes the EMA generator as a converted
  checkpoint at the end (`export_generator`).
  """
  if steps < 1 or checkpoint_every < 1 or log_every < 1 or sample_every < 1:
    raise ValueError("steps and the *_every intervals must be positive")
  os.makedirs(out, exist_ok=True)
  _check_config(out, cfg, seed)
  key = jax.random.key(seed)
  init_key, train_key, sample_key = jax.random.split(key, 3)
  state = init_state(init_key, cfg)
  manager = ocp.CheckpointManager(
    os.path.join(out, "checkpoints"),
    options=ocp.CheckpointManagerOptions(preservation_policy=ocp.checkpoint_managers.LatestN(2)),
  )
  if manager.latest_step() is not None:
    state = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(state))
    logging.info("resumed from step %d", int(state.step))
  z_show = jax.random.normal(sample_key, (16, cfg.z_dim))
  start = time.time()
  first = int(state.step)
  metrics = {}
  with (
    open(os.path.join(out, "metrics.jsonl"), "a") as log,
    tqdm(total=steps, initial=first, desc="train_toy_gan") as bar,
  ):
    for step in range(first, steps):
      reals = jnp.asarray(real_batch(seed, step, cfg))
      r1 = step % cfg.r1_interval == 0
      state, m = train_step(state, reals, jax.random.fold_in(train_key, step), cfg=cfg, r1=r1)
      done = step + 1
      timeout = max_minutes is not None and time.time() - start > 60 * max_minutes
      halt = timeout or (stop is not None and stop())
      last = done == steps or halt
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
        viz.save_label_grid(os.path.join(out, f"samples_{done:06d}.png"), images)
      if halt:
        logging.info(
          "stopping at step %d (%s)",
          done,
          f"after {max_minutes:.1f} minutes" if timeout else "stop requested",
        )
        break
  manager.wait_until_finished()
  manager.close()
  if export is not None:
    export_generator(
      state, cfg, export, steps=int(state.step), seed=seed, images=int(state.step) * cfg.batch_size
    )
  return state
