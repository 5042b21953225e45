"""Algorithm 1: block-coordinate projected gradient descent on Eq. (3).

State is an explicit pytree (`FitState`); `init_state` builds it, `update` runs one
block-coordinate step (a P step with projection onto `P >= 0`, then an A step at
the new parts), and `fit` is a thin driver that runs `update` in `lax.scan`
chunks, shards the batch over local devices with `pmap` (gradient sums combined
with `psum`), checkpoints, resumes and reports progress.

Step sizes: `step_size=None` (default) adapts a separate step per block by
backtracking (`panda_jax.pgd`), so the loss is non-increasing on a fixed batch
and no learning rate needs tuning; a float gives the paper's fixed learning rate
`lambda` for both blocks. `method="adam"` is the autograd variant the paper
mentions (Section 5.4.1): `jax.grad` of the same objective, Adam per block,
projection of `P` after each update.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Iterable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from panda_jax import _checks, hosvd, objective, parts_init, pgd

AXIS = "batch"


class FitConfig(NamedTuple):
  """Static options of a run (hashable: part of the compiled program)."""
  method: str = "bcd"                 # "bcd" (analytic Eqs. 4-5) or "adam" (jax.grad + optax).
  step_size: Optional[float] = None   # fixed lambda (paper) or None (adaptive, per block).
  learning_rate: float = 1e-3         # Adam only.
  search: pgd.LineSearch = pgd.LineSearch()


class FitState(NamedTuple):
  """Everything a run needs to continue bit-for-bit.

  appearances: `A`, `[c, r_c]`.
  parts: `P`, `[s, r_s]`, non-negative.
  step: int32 scalar, steps taken.
  step_size_parts: step size of the P block (the fixed `lambda` or the last accepted one).
  step_size_appearances: same for the A block.
  key: uint32 `[2]` PRNG key; step t of a stochastic run samples with `fold_in(key, t)`.
  opt_state: `(parts_state, appearances_state)` of optax Adam, or `()` for "bcd".
  """
  appearances: jax.Array
  parts: jax.Array
  step: jax.Array
  step_size_parts: jax.Array
  step_size_appearances: jax.Array
  key: jax.Array
  opt_state: Any


class Factors(NamedTuple):
  """Result of `fit`: the factors and the run's record."""
  appearances: jax.Array     # [c, r_c]
  parts: jax.Array           # [s, r_s]
  loss_history: np.ndarray   # [steps], Eq. (3) after each step
  step_size_parts: float
  step_size_appearances: float
  steps: int


def _identity(x):
  return x


def _psum(x):
  return jax.lax.psum(x, AXIS)


# ----------------------------------------------------------------------------- init


def _largest_eigenvalue(matvec, dim: int, key, dtype, iterations: int = 10):
  """Power iteration for the top eigenvalue of a PSD operator on `[dim, 1]` vectors."""
  v = jax.random.normal(key, (dim, 1), dtype)

  def body(v, _):
    w = matvec(v)
    return w / jnp.maximum(jnp.linalg.norm(w), 1e-30), None

  v, _ = jax.lax.scan(body, v / jnp.linalg.norm(v), None, length=iterations)
  return jnp.vdot(v, matvec(v))


def _initial_step_sizes(z, zp, appearances, key, reduce):
  """`1 / (8 lambda_max)` of each block's dominant curvature term (a safe start)."""
  kp, ka = jax.random.split(key)
  curv_p = _largest_eigenvalue(
      lambda v: parts_init.apply_affinity(z, appearances, v, reduce), z.shape[2], kp, z.dtype)
  curv_a = _largest_eigenvalue(
      lambda v: reduce(jnp.einsum("ncq,ndq,dk->ck", zp, zp, v)), z.shape[1], ka, z.dtype)
  tiny = jnp.finfo(z.dtype).tiny
  return 1.0 / (8.0 * jnp.maximum(curv_p, tiny)), 1.0 / (8.0 * jnp.maximum(curv_a, tiny))


def _init_state(z, key, appearances, parts, *, rank_c, rank_s, parts_init_name, config,
                reduce=_identity):
  """Builds a `FitState` from a batch `z` (`[n, c, s]`, or this device's shard)."""
  key_a, key_p, key_step, key_run = jax.random.split(key, 4)
  if appearances is None:
    appearances = hosvd.scatter_finalize(reduce(hosvd.unfolded_scatter(z)), rank_c)
  if parts is None:
    if parts_init_name == "kmeans":
      parts = parts_init.kmeans(key_p, z, appearances, rank_s, reduce=reduce)
    else:
      parts = parts_init.uniform(key_p, z.shape[2], rank_s).astype(z.dtype)
  if config.step_size is None:
    step_p, step_a = _initial_step_sizes(z, objective.project_parts(z, parts), appearances,
                                         key_step, reduce)
  else:
    step_p = step_a = jnp.asarray(config.step_size, z.dtype)
  if config.method == "adam":
    opt = optax.adam(config.learning_rate)
    opt_state = (opt.init(parts), opt.init(appearances))
  else:
    opt_state = ()
  return FitState(appearances, parts, jnp.int32(0), step_p, step_a, key_run, opt_state)


# ----------------------------------------------------------------------------- steps


def _bcd_step(state: FitState, z, zp, value, sq_norm, config: FitConfig, reduce):
  """Algorithm 1, one iteration, from `zp = Z P` and `value` = Eq. (3) at the state.

  Trials are scored by their exact loss change (`objective.loss_change`), so
  accept/reject decisions do not depend on rounding noise of size eps ||Z||^2:
  runs that differ only in summation order (1 vs 4 devices) take the same
  decisions. Returns `(state, Z P_new, Eq. (3) at the new state)`.
  """
  del sq_norm  # The loss is carried and updated by exact changes.
  appearances, parts = state.appearances, state.parts
  lam = objective.coefficients(zp, appearances)
  decoded = objective.decode(lam, appearances)
  gram_p = parts.T @ parts

  def parts_change(new_parts):
    delta = new_parts - parts
    d_zp = objective.project_parts(z, delta)                    # Z (P+ - P): one pass over Z.
    d_lam = objective.coefficients(d_zp, appearances)
    d_gram = parts.T @ delta + delta.T @ parts + delta.T @ delta
    change = objective.loss_change(lam, decoded, d_lam, objective.decode(d_lam, appearances),
                                   gram_p, d_gram)
    return reduce(change), zp + d_zp

  grad_p = reduce(objective.parts_gradient(z, zp, appearances, parts))
  if config.step_size is None:
    new_parts, change, zp, step_p = pgd.backtracking_step(
        parts_change, parts, jnp.zeros_like(value), zp, grad_p, state.step_size_parts,
        pgd.nonnegative, config.search)
  else:
    step_p = state.step_size_parts
    new_parts = pgd.nonnegative(parts - step_p * grad_p)
    change, zp = parts_change(new_parts)
  value = value + change
  parts = new_parts
  lam = objective.coefficients(zp, appearances)
  decoded = objective.decode(lam, appearances)
  gram_p = parts.T @ parts

  def appearances_change(new_appearances):
    delta = new_appearances - appearances
    d_lam = objective.coefficients(zp, delta)                    # (A+ - A)^T M.
    d_decoded = (objective.decode(lam + d_lam, delta)            # A+ Lambda+ - A Lambda.
                 + objective.decode(d_lam, appearances))
    return reduce(objective.loss_change(lam, decoded, d_lam, d_decoded, gram_p)), ()

  grad_a = reduce(objective.appearances_gradient(zp, appearances, parts))
  if config.step_size is None:
    appearances, change, _, step_a = pgd.backtracking_step(
        appearances_change, appearances, jnp.zeros_like(value), (), grad_a,
        state.step_size_appearances, pgd.identity, config.search)
  else:
    step_a = state.step_size_appearances
    appearances = appearances - step_a * grad_a
    change, _ = appearances_change(appearances)
  new_state = state._replace(appearances=appearances, parts=parts, step=state.step + 1,
                             step_size_parts=step_p, step_size_appearances=step_a)
  return new_state, zp, value + change


def _adam_step(state: FitState, z, zp, value, sq_norm, config: FitConfig, reduce):
  """The autograd variant: `jax.grad` of Eq. (3), Adam on each block in turn."""
  del zp, value
  opt = optax.adam(config.learning_rate)
  local_loss = lambda a, p: objective.loss_from_projection(
      sq_norm, objective.project_parts(z, p), a, p)
  opt_p, opt_a = state.opt_state
  grad_p = reduce(jax.grad(local_loss, argnums=1)(state.appearances, state.parts))
  updates, opt_p = opt.update(grad_p, opt_p)
  parts = pgd.nonnegative(state.parts + updates)
  grad_a = reduce(jax.grad(local_loss, argnums=0)(state.appearances, parts))
  updates, opt_a = opt.update(grad_a, opt_a)
  appearances = state.appearances + updates
  zp = objective.project_parts(z, parts)
  value = reduce(objective.loss_from_projection(sq_norm, zp, appearances, parts))
  return (state._replace(appearances=appearances, parts=parts, step=state.step + 1,
                         opt_state=(opt_p, opt_a)), zp, value)


def _step(state, z, zp, value, sq_norm, config, reduce):
  step_fn = _adam_step if config.method == "adam" else _bcd_step
  return step_fn(state, z, zp, value, sq_norm, config, reduce)


def _run_chunk(state, z, length: int, config: FitConfig, reduce=_identity):
  """`length` steps on a fixed batch as one `lax.scan`: `(state, losses [length])`."""
  sq_norm = objective.squared_norm(z)
  zp = objective.project_parts(z, state.parts)
  value = reduce(objective.loss_from_projection(sq_norm, zp, state.appearances, state.parts))

  def body(carry, _):
    state, zp, value = carry
    state, zp, value = _step(state, z, zp, value, sq_norm, config, reduce)
    return (state, zp, value), value

  (state, _, _), losses = jax.lax.scan(body, (state, zp, value), None, length=length)
  return state, losses


def _one_step(state, z, config: FitConfig, reduce=_identity):
  """One step on a new batch (stochastic runs): `(state, loss)`."""
  sq_norm = objective.squared_norm(z)
  zp = objective.project_parts(z, state.parts)
  value = reduce(objective.loss_from_projection(sq_norm, zp, state.appearances, state.parts))
  state, _, value = _step(state, z, zp, value, sq_norm, config, reduce)
  return state, value


_jit_init = jax.jit(_init_state, static_argnames=("rank_c", "rank_s", "parts_init_name", "config"))
_jit_chunk = jax.jit(_run_chunk, static_argnames=("length", "config"))
_jit_one_step = jax.jit(_one_step, static_argnames=("config",))


@functools.lru_cache(maxsize=None)
def _pmapped(kind: str, static: tuple):
  """pmap'ed init / chunk / step over the local devices, summing with `psum`."""
  if kind == "init":
    rank_c, rank_s, name, config = static
    fn = functools.partial(_init_state, rank_c=rank_c, rank_s=rank_s, parts_init_name=name,
                           config=config, reduce=_psum)
    return jax.pmap(fn, AXIS, in_axes=(0, None, None, None), out_axes=None)
  if kind == "chunk":
    length, config = static
    fn = functools.partial(_run_chunk, length=length, config=config, reduce=_psum)
  else:
    (config,) = static
    fn = functools.partial(_one_step, config=config, reduce=_psum)
  return jax.pmap(fn, AXIS, in_axes=(None, 0), out_axes=None)


# ----------------------------------------------------------------------------- public


def update(state: FitState, features, config: FitConfig = FitConfig()):
  """One step of Algorithm 1 on a batch: `(state, {"loss": Eq. (3) after the step})`.

  `features` is `[n, s, c]` or `[n, h, w, c]`; jitted, compiled once per shape.
  """
  z = objective.unfold(features)
  state, value = _jit_one_step(state, z, config=config)
  return state, {"loss": value}


def run_steps(state: FitState, features, steps: int, config: FitConfig = FitConfig()):
  """`steps` iterations of Algorithm 1 on a fixed batch as one compiled `lax.scan`.

  Returns `(state, losses [steps])`; what `fit` runs per chunk on one device.
  """
  return _jit_chunk(state, objective.unfold(features), length=int(steps), config=config)


def init_state(features, rank_c: int, rank_s: int, *, key, config: FitConfig = FitConfig(),
               parts_init: str = "kmeans", appearances=None, parts=None) -> FitState:
  """A `FitState` from a batch: HOSVD appearances (Section 3.4) and a parts start.

  Args:
    features: `[n, s, c]` or `[n, h, w, c]`.
    rank_c, rank_s: `r_c <= c`, `r_s <= s`.
    key: PRNG key.
    config: `FitConfig`.
    parts_init: "kmeans" (default, Section 4.1) or "uniform" (the paper's U(0, 0.01)).
    appearances, parts: optional starting factors (`[c, r_c]`, `[s, r_s]`).
  """
  z = objective.unfold(features)
  _validate(z, rank_c, rank_s, config, parts_init, appearances, parts)
  return _jit_init(z, _as_raw_key(key), appearances, parts, rank_c=rank_c, rank_s=rank_s,
                   parts_init_name=parts_init, config=config)


def _as_raw_key(key):
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(key)
  return key


def _validate(z, rank_c, rank_s, config, parts_init_name, appearances, parts):
  _, c, s = z.shape
  _checks.check_ranks(s, c, rank_c, rank_s)
  if config.method not in ("bcd", "adam"):
    raise ValueError(f"method must be 'bcd' or 'adam', got {config.method!r}")
  if parts_init_name not in ("kmeans", "uniform"):
    raise ValueError(f"parts_init must be 'kmeans' or 'uniform', got {parts_init_name!r}")
  if config.step_size is not None and not (math.isfinite(config.step_size) and config.step_size > 0):
    raise ValueError(f"step_size must be a positive finite float or None, got {config.step_size!r}")
  if appearances is not None and tuple(appearances.shape) != (c, rank_c):
    raise ValueError(f"appearances must be [c={c}, r_c={rank_c}], got {tuple(appearances.shape)}")
  if parts is not None and tuple(parts.shape) != (s, rank_s):
    raise ValueError(f"parts must be [s={s}, r_s={rank_s}], got {tuple(parts.shape)}")
  _checks.check_finite(z, "features")


class _Batches:
  """Uniform access to a fixed array, a sampler `key -> batch`, or an iterator."""

  def __init__(self, data):
    if hasattr(data, "shape"):
      self.kind, self.data = "fixed", data
    elif callable(data):
      self.kind, self.data = "sampler", data
    elif isinstance(data, Iterable):
      self.kind, self.data = "iterator", iter(data)
    else:
      raise ValueError(f"features_or_sampler must be an array, a callable or an iterable, "
                       f"got {type(data).__name__}")

  def get(self, key):
    if self.kind == "fixed":
      return self.data
    if self.kind == "sampler":
      return self.data(key)
    try:
      return next(self.data)
    except StopIteration:
      raise ValueError("the sampler is exhausted (no batch left)") from None


def _shard(z, num_devices: int):
  """`[n, c, s]` -> `[d, ceil(n/d), c, s]`, zero-padded (zero samples add nothing to any sum)."""
  n = z.shape[0]
  pad = (-n) % num_devices
  if pad:
    z = jnp.concatenate([z, jnp.zeros((pad,) + z.shape[1:], z.dtype)])
  return jnp.reshape(z, (num_devices, -1) + z.shape[1:])


def fit(features_or_sampler, rank_c: int, rank_s: int, *, steps: int, key,
        step_size: Optional[float] = None, method: str = "bcd", learning_rate: float = 1e-3,
        parts_init: str = "kmeans", appearances=None, parts=None, chunk_size: int = 50,
        checkpoint_dir: Optional[str] = None, checkpoint_every: Optional[int] = None,
        num_devices: Optional[int] = None, progress: bool = True,
        search: pgd.LineSearch = pgd.LineSearch(),
        stop: Optional[Callable[[], bool]] = None) -> Factors:
  """Learns appearances `A` and parts `P >= 0` by Algorithm 1.

  Args:
    features_or_sampler: a fixed batch `[n, s, c]` / `[n, h, w, c]` (full-batch
      descent), a callable `key -> batch` (stochastic: step t draws
      `fold_in(key, t)`, so a resumed run sees the same batches), or an iterator
      of batches. Stochastic runs initialise from the first batch unless
      `appearances` / `parts` are given (e.g. `hosvd_init` over many batches).
    rank_c, rank_s: `r_c <= c` appearances, `r_s <= s` parts.
    steps: total number of steps T (a resumed run continues up to T).
    key: PRNG key.
    step_size: None (adaptive, default) or the paper's fixed learning rate.
    method: "bcd" (analytic gradients, Eqs. 4-5) or "adam" (jax.grad + optax).
    learning_rate: Adam's learning rate.
    parts_init: "kmeans" (default) or "uniform" (the paper's `U(0, 0.01)`).
    appearances, parts: optional starting factors.
    chunk_size: steps per compiled `lax.scan` (full-batch runs).
    checkpoint_dir: orbax checkpoints of the full state; an existing one resumes.
    checkpoint_every: steps between checkpoints (default: only at the end).
    num_devices: local devices to shard the batch over (default: all).
    progress: show a progress bar.
    search: backtracking constants of the adaptive step.
    stop: polled between steps (between compiled chunks for a fixed batch); when
      it returns True, `fit` checkpoints (with `checkpoint_dir`) and returns the
      factors reached, `Factors.steps < steps`: how a launcher honours SIGTERM.

  Returns:
    `Factors(appearances [c, r_c], parts [s, r_s], loss_history [steps], ...)`.

  Raises:
    ValueError: bad ranks or shapes, non-finite features, an empty sampler.
    FloatingPointError: the loss became non-finite (names the step and step size).
  """
  from panda_jax import checkpoint  # Deferred: checkpoint imports this module.

  config = FitConfig(method=method, step_size=step_size, learning_rate=learning_rate,
                     search=search)
  if not (isinstance(steps, (int, np.integer)) and steps >= 0):
    raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
  if checkpoint_every is not None and checkpoint_every <= 0:
    raise ValueError(f"checkpoint_every must be positive, got {checkpoint_every}")
  key = _as_raw_key(key)
  init_key, data_key = jax.random.split(key)
  batches = _Batches(features_or_sampler)
  first = objective.unfold(batches.get(jax.random.fold_in(data_key, 0)))
  _validate(first, rank_c, rank_s, config, parts_init, appearances, parts)
  devices = num_devices or jax.local_device_count()
  if devices > jax.local_device_count():
    raise ValueError(f"num_devices={devices} but only {jax.local_device_count()} local devices")

  # pmap whenever the sums span more than one device: several local devices, or
  # several processes (then pmap's psum runs over the devices of every process).
  parallel = devices > 1 or jax.process_count() > 1
  prepare = (lambda z: _shard(z, devices)) if parallel else (lambda z: z)
  if parallel:
    run_init = _pmapped("init", (rank_c, rank_s, parts_init, config))
    run_chunk = lambda state, z, length: _pmapped("chunk", (length, config))(state, z)
    run_step = _pmapped("step", (config,))
  else:
    run_init = functools.partial(_jit_init, rank_c=rank_c, rank_s=rank_s,
                                 parts_init_name=parts_init, config=config)
    run_chunk = lambda state, z, length: _jit_chunk(state, z, length=length, config=config)
    run_step = lambda state, batch: _jit_one_step(state, batch, config=config)
  z = prepare(first)
  state = run_init(z, init_key, appearances, parts)

  history = np.full((steps,), np.nan, np.float64)
  manager = checkpoint.FitCheckpoints(checkpoint_dir) if checkpoint_dir else None
  if manager is not None and manager.latest_step() is not None:
    state, saved = manager.restore(state)
    done = min(len(saved), steps)
    history[:done] = saved[:done]
  start = int(state.step)
  chunk = min(chunk_size, checkpoint_every) if checkpoint_every else chunk_size
  chunk = max(1, chunk)

  bar = _progress(steps, start, progress)
  step = last_saved = start
  stopping = stop if stop is not None else (lambda: False)
  try:
    while step < steps and not stopping():
      length = min(chunk - step % chunk, steps - step)
      if batches.kind == "fixed":
        state_new, losses = run_chunk(state, z, length)
      else:
        losses = []
        state_new = state
        for t in range(step, step + length):
          if t > step and stopping():
            break
          batch = z if t == 0 else prepare(
              objective.unfold(batches.get(jax.random.fold_in(data_key, t))))
          if t and batch.shape[-2:] != z.shape[-2:]:
            raise ValueError(f"batch at step {t} has shape {tuple(batch.shape)}, "
                             f"expected [..., {z.shape[-2]}, {z.shape[-1]}] (c, s)")
          state_new, value = run_step(state_new, batch)
          losses.append(value)
        losses = jnp.stack(losses)
        length = len(losses)
      losses = np.asarray(losses, np.float64)
      _check_finite_run(losses, state_new, step)
      state = state_new
      history[step:step + length] = losses
      step += length
      bar.update(length)
      if manager is not None and (step == steps or (checkpoint_every and step % checkpoint_every == 0)):
        manager.save(step, state, history[:step])
        last_saved = step
    if manager is not None and step != last_saved:  # Stopped early.
      manager.save(step, state, history[:step])
  finally:
    bar.close()
    if manager is not None:
      manager.close()
  return Factors(state.appearances, state.parts, history, float(state.step_size_parts),
                 float(state.step_size_appearances), int(state.step))


def _check_finite_run(losses, state, first_step: int) -> None:
  bad = np.flatnonzero(~np.isfinite(losses))
  factors_ok = bool(jnp.all(jnp.isfinite(state.appearances)) & jnp.all(jnp.isfinite(state.parts)))
  if bad.size or not factors_ok:
    at = first_step + (int(bad[0]) if bad.size else len(losses) - 1) + 1
    raise FloatingPointError(
        f"the loss became non-finite at step {at} (step size: parts "
        f"{float(state.step_size_parts):.3g}, appearances {float(state.step_size_appearances):.3g}); "
        "use a smaller step_size or the adaptive default (step_size=None)")


def _progress(total: int, initial: int, enabled: bool):
  enabled = enabled and jax.process_index() == 0
  try:
    from tqdm.auto import tqdm
  except ImportError:  # pragma: no cover - tqdm is a dependency
    enabled = False
  if not enabled:
    class _Null:
      def update(self, _):
        pass

      def close(self):
        pass

    return _Null()
  return tqdm(total=total, initial=initial, desc="PandA", unit="step")
