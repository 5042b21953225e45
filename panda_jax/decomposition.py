"""Algorithm 1: block-coordinate projected gradient descent on Eq. (3), as pure functions.

    state = init(batch, r_c, r_s, key=key)        # A^(1) by HOSVD (Section 3.4), a parts start
    state, out = parts_step(state, batch)         # P block: Eq. (4), then the projection P >= 0
    state, out = appearances_step(state, batch, projection=out.projection)  # A block: Eq. (5)
    state, metrics = update(state, batch)         # both blocks: one iteration of Algorithm 1
    state, losses = run_steps(state, batch, T)    # T iterations on one batch, one `lax.scan`

`batch` is channels-last features (`[n, s, c]` / `[n, h, w, c]`) or
`unfolded(features)`, the paper's `[n, c, s]` unfolding transposed once (pass
that when several steps see the same batch). Every function is jitted with its
configuration (`FitConfig`, ranks, names) static, and takes `axis_name=None`:
with a name, `batch` is this device's shard and every sum over samples is a
`psum` over that axis, so the functions run unchanged inside a caller's `pmap`
or `shard_map` (the state, replicated, stays equal on every device). `fit` is
the driver: `run_steps` chunks on a fixed batch or `update` on a new batch per
step, `pmap` over the local devices through the same `axis_name`, orbax
checkpoints, resumption, progress.

Step sizes: `step_size=None` (default) adapts a separate step per block by
backtracking (`panda_jax.pgd`), so the loss is non-increasing on a fixed batch
and no learning rate needs tuning; a float gives the paper's fixed learning rate
`lambda` for both blocks. `method="autograd"` is the variant the paper mentions
(Section 5.4.1): `jax.grad` of the same objective, any optax transformation per
block (default Adam), `P` projected after each update.

Orthogonality: `saliency`, `rewrite` and `refine` read `A^T Z_i` as coordinates
in an orthonormal basis. HOSVD starts `A` orthonormal, but Eq. (3) does not
constrain it and the gradient steps let `A^T A` drift from `I`: `fit` reports
`max |A^T A - I|` (`Factors.orthogonality_error`) and warns above
`ORTHOGONALITY_BOUND`.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from panda_jax import checks, checkpoint, hosvd, objective, parts_init, pgd
from panda_jax.state import BlockStep, Factors, FitConfig, FitState

AXIS = "batch"  # fit's pmap axis.
METHODS = ("bcd", "autograd", "adam")  # "adam": "autograd" (the name older callers use).
# Above this `max |A^T A - I|`, `fit` warns: the coordinates `A^T Z_i` that saliency,
# rewriting and refinement use are then off by more than 10% of a unit basis.
ORTHOGONALITY_BOUND = 0.1


class DeviceSampler(NamedTuple):
  """Features drawn inside the compiled, sharded step: the dataset is never stored.

  `sample(params, key)` -> one device's batch `[m, s, c]` / `[m, h, w, c]`, traced
  into `fit`'s pmapped chunks: step t's batch on device d (its index over every
  process's devices) is `sample(params, fold_in(fold_in(key, d), t))`, so each step
  sums fresh samples of every device and only `[c, r_c]` / `[s, r_s]` factors cross
  devices. `params` (e.g. a generator's weights, `generator_ops.feature_sampler`)
  are arguments of the compiled program, not constants folded into it.
  """

  sample: Callable[[Any, jax.Array], Any]
  params: Any = None


def _is_autograd(config: FitConfig) -> bool:
  return config.method != "bcd"


def _optimizer(config: FitConfig) -> optax.GradientTransformation:
  return config.optimizer if config.optimizer is not None else optax.adam(config.learning_rate)


# ----------------------------------------------------------------------------- init

PARTS_STARTS = ("kmeans", "fibres", "uniform")  # The names `_initial_parts` knows.


def _initial_parts(
  name: str,
  key: jax.Array,
  z: jax.Array,
  appearances: jax.Array,
  rank_s: int,
  reduce: Callable[[jax.Array], jax.Array],
  axis_name: str | None = None,
) -> jax.Array:
  """The parts start `P^(1)`, `[s, r_s]`, from `z` `[n, c, s]` and `A^(1)` `[c, r_c]`.

  "kmeans" (default): k-means++ of the positions in the appearance basis
  (Section 4.1, `parts_init.kmeans`); "fibres": where each kind of channel
  fibre lives (`parts_init.fibres`); "uniform": the paper's `U(0, 0.01)`.
  """
  if name == "kmeans":
    return parts_init.kmeans(key, z, appearances, rank_s, reduce=reduce)
  if name == "fibres":
    gather = (
      (lambda x: x)
      if axis_name is None
      else functools.partial(jax.lax.all_gather, axis_name=axis_name, tiled=True)
    )
    return parts_init.fibres(key, z, rank_s, reduce=reduce, gather=gather)
  return parts_init.uniform(key, z.shape[2], rank_s).astype(z.dtype)


def _largest_eigenvalue(
  matvec: Callable[[jax.Array], jax.Array],
  dim: int,
  key: jax.Array,
  dtype: jax.typing.DTypeLike,
  iterations: int = 10,
) -> jax.Array:
  """Power iteration for the top eigenvalue of a PSD operator on `[dim, 1]` vectors.

  The start is drawn in float32 whatever `dtype`, so runs in float32 and float64
  start alike (the tests compare them).
  """
  v = jax.random.normal(key, (dim, 1), jnp.float32).astype(dtype)

  def body(v: jax.Array, _: None) -> tuple[jax.Array, None]:
    w = matvec(v)
    return w / jnp.maximum(jnp.linalg.norm(w), 1e-30), None

  v, _ = jax.lax.scan(body, v / jnp.linalg.norm(v), None, length=iterations)
  return jnp.vdot(v, matvec(v))


def _initial_step_sizes(
  z: jax.Array,
  zp: jax.Array,
  appearances: jax.Array,
  key: jax.Array,
  reduce: Callable[[jax.Array], jax.Array],
) -> tuple[jax.Array, jax.Array]:
  """`1 / (8 lambda_max)` of each block's dominant curvature term (a safe start)."""
  kp, ka = jax.random.split(key)
  curv_p = _largest_eigenvalue(
    lambda v: parts_init.apply_affinity(z, appearances, v, reduce), z.shape[2], kp, z.dtype
  )
  curv_a = _largest_eigenvalue(
    lambda v: reduce(jnp.einsum("ncq,ndq,dk->ck", zp, zp, v)), z.shape[1], ka, z.dtype
  )
  tiny = jnp.finfo(z.dtype).tiny
  return 1.0 / (8.0 * jnp.maximum(curv_p, tiny)), 1.0 / (8.0 * jnp.maximum(curv_a, tiny))


@functools.partial(
  jax.jit, static_argnames=("rank_c", "rank_s", "parts_init_name", "config", "axis_name")
)
def _init(
  z: jax.Array,
  key: jax.Array,
  appearances: jax.Array | None,
  parts: jax.Array | None,
  *,
  rank_c: int,
  rank_s: int,
  parts_init_name: str,
  config: FitConfig,
  axis_name: str | None,
) -> FitState:
  reduce = functools.partial(objective.sum_samples, axis_name=axis_name)
  _, key_p, key_step, key_run = jax.random.split(key, 4)
  if appearances is None:
    appearances = hosvd.scatter_finalize(reduce(hosvd.unfolded_scatter(z)), rank_c)
  if parts is None:
    parts = _initial_parts(parts_init_name, key_p, z, appearances, rank_s, reduce, axis_name)
  if config.step_size is None:
    step_p, step_a = _initial_step_sizes(
      z, objective.project_parts(z, parts), appearances, key_step, reduce
    )
  else:
    step_p = step_a = jnp.asarray(config.step_size, z.dtype)
  if _is_autograd(config):
    optimizer = _optimizer(config)
    opt_state = (optimizer.init(parts), optimizer.init(appearances))
  else:
    opt_state = ()
  return FitState(appearances, parts, jnp.int32(0), step_p, step_a, key_run, opt_state)


def init(
  features: jax.typing.ArrayLike | objective.Unfolded,
  rank_c: int,
  rank_s: int,
  *,
  key: jax.Array,
  config: FitConfig = FitConfig(),
  parts_init: str = "kmeans",
  appearances: jax.typing.ArrayLike | None = None,
  parts: jax.typing.ArrayLike | None = None,
  axis_name: str | None = None,
) -> FitState:
  """A `FitState` from a batch: HOSVD appearances (Section 3.4) and a parts start.

  Args:
    features: `[n, s, c]` / `[n, h, w, c]` or `unfolded(features)` (`[n, c, s]`).
    rank_c, rank_s: `r_c <= c`, `r_s <= s`.
    key: PRNG key.
    config: `FitConfig`.
    parts_init: "kmeans" (default, Section 4.1) or "uniform" (the paper's U(0, 0.01)).
    appearances, parts: optional starting factors (`[c, r_c]`, `[s, r_s]`).
    axis_name: `features` is this device's shard of a batch split over that axis.
  """
  z = objective.batch_z(features)
  _validate(z, rank_c, rank_s, config, parts_init, appearances, parts)
  checks.check_finite(z, "features")  # No-op on tracers (inside a caller's pmap or jit).
  return _init(
    z,
    _as_raw_key(key),
    appearances,
    parts,
    rank_c=rank_c,
    rank_s=rank_s,
    parts_init_name=parts_init,
    config=config,
    axis_name=axis_name,
  )


# ----------------------------------------------------------------------------- steps


def _projected_step(
  change_to: Callable[[jax.Array], tuple[jax.Array, Any]],
  x: jax.Array,
  aux: Any,
  grad: jax.Array,
  step_size: jax.Array,
  project: Callable[[jax.Array], jax.Array],
  config: FitConfig,
) -> tuple[jax.Array, jax.Array, Any, jax.Array]:
  """`x+ = project(x - t grad)`: adaptive `t` (backtracking) or the paper's fixed `lambda`.

  `change_to(x+) -> (exact change of Eq. 3, aux+)`. Returns `(x+, change, aux+, t)`.
  """
  if config.step_size is None:
    return pgd.backtracking_step(
      change_to, x, jnp.zeros((), grad.dtype), aux, grad, step_size, project, config.search
    )
  new_x = project(x - step_size * grad)
  change, aux = change_to(new_x)
  return new_x, change, aux, step_size


def _optax_step(
  config: FitConfig,
  grad: jax.Array,
  opt_state: Any,
  params: jax.Array,
  project: Callable[[jax.Array], jax.Array],
) -> tuple[jax.Array, Any]:
  """The autograd variant's update of one block: the optax transformation, then `project`."""
  updates, opt_state = _optimizer(config).update(grad, opt_state, params)
  return project(optax.apply_updates(params, updates)), opt_state


def _parts_block(
  state: FitState, z: jax.Array, zp: jax.Array, config: FitConfig, axis_name: str | None
) -> tuple[FitState, BlockStep]:
  """The P block (Eq. 4 and the projection) at `zp = Z P`: `(state, BlockStep)`.

  Trials are scored by their exact loss change (`objective.coefficient_change`),
  so accept/reject decisions do not depend on rounding noise of size eps ||Z||^2:
  runs that differ only in summation order (1 vs 4 devices) take the same
  decisions.
  """
  reduce = functools.partial(objective.sum_samples, axis_name=axis_name)
  appearances, parts = state.appearances, state.parts
  gram_a, gram_p = appearances.T @ appearances, parts.T @ parts
  lam = objective.coefficients(zp, appearances)

  def change_to(new_parts: jax.Array) -> tuple[jax.Array, jax.Array]:
    delta = new_parts - parts
    moved = objective.project_parts(z, delta)  # Z (P+ - P): one pass over Z.
    change = objective.coefficient_change(
      lam,
      objective.coefficients(moved, appearances),
      gram_a,
      gram_p,
      d_gram_p=objective.gram_change(parts, delta),
    )
    return reduce(change), zp + moved

  if _is_autograd(config):
    local = lambda p: objective.loss_from_projection(
      0.0, objective.project_parts(z, p), appearances, p
    )
    opt_p, opt_a = state.opt_state
    new_parts, opt_p = _optax_step(
      config, reduce(jax.grad(local)(parts)), opt_p, parts, pgd.nonnegative
    )
    change, zp = change_to(new_parts)
    state = state._replace(parts=new_parts, opt_state=(opt_p, opt_a))
  else:
    grad = reduce(objective.parts_gradient(z, zp, appearances, parts))
    new_parts, change, zp, step = _projected_step(
      change_to, parts, zp, grad, state.step_size_parts, pgd.nonnegative, config
    )
    state = state._replace(parts=new_parts, step_size_parts=step)
  return state, BlockStep(change, zp)


def _appearances_block(
  state: FitState, zp: jax.Array, config: FitConfig, axis_name: str | None
) -> tuple[FitState, BlockStep]:
  """The A block (Eq. 5) at `zp = Z P` (no pass over Z): `(state, BlockStep)`.

  A trial `A+` costs one `(A+ - A)^T M` product and `[r_c, r_s]`-sized work per
  sample with the change of `G_A` (`objective.appearances_change`).
  """
  reduce = functools.partial(objective.sum_samples, axis_name=axis_name)
  appearances, parts = state.appearances, state.parts
  gram_a, gram_p = appearances.T @ appearances, parts.T @ parts
  lam = objective.coefficients(zp, appearances)

  def change_to(new_appearances: jax.Array) -> tuple[jax.Array, tuple[()]]:
    change = objective.appearances_change(
      zp, lam, appearances, new_appearances - appearances, gram_a, gram_p
    )
    return reduce(change), ()

  if _is_autograd(config):
    local = lambda a: objective.loss_from_projection(0.0, zp, a, parts)
    opt_p, opt_a = state.opt_state
    new_appearances, opt_a = _optax_step(
      config, reduce(jax.grad(local)(appearances)), opt_a, appearances, pgd.identity
    )
    change, _ = change_to(new_appearances)
    state = state._replace(appearances=new_appearances, opt_state=(opt_p, opt_a))
  else:
    grad = reduce(objective.appearances_gradient(zp, appearances, parts))
    new_appearances, change, _, step = _projected_step(
      change_to, appearances, (), grad, state.step_size_appearances, pgd.identity, config
    )
    state = state._replace(appearances=new_appearances, step_size_appearances=step)
  return state, BlockStep(change, zp)


def _start(state: FitState, z: jax.Array, axis_name: str | None) -> tuple[jax.Array, jax.Array]:
  """`(Z P, Eq. 3)` at the state, the loss in the expanded form (accurate to eps ||Z||^2)."""
  zp = objective.project_parts(z, state.parts)
  value = objective.loss_from_projection(
    objective.squared_norm(z), zp, state.appearances, state.parts
  )
  return zp, objective.sum_samples(value, axis_name)


def _iteration(
  state: FitState,
  z: jax.Array,
  zp: jax.Array,
  value: jax.Array,
  config: FitConfig,
  axis_name: str | None,
) -> tuple[FitState, jax.Array, jax.Array]:
  """One iteration of Algorithm 1 from `zp = Z P` and `value` = Eq. (3) at the state.

  The loss is carried by the blocks' exact changes (so on a fixed batch the
  history is non-increasing). Returns `(state, Z P_new, Eq. (3) at the new state)`.
  """
  state, parts_out = _parts_block(state, z, zp, config, axis_name)
  value = value + parts_out.loss_change
  state, appearances_out = _appearances_block(state, parts_out.projection, config, axis_name)
  return (
    state._replace(step=state.step + 1),
    parts_out.projection,
    value + appearances_out.loss_change,
  )


@functools.partial(jax.jit, static_argnames=("config", "axis_name"))
def _parts_step(
  state: FitState,
  z: jax.Array,
  projection: jax.Array | None,
  *,
  config: FitConfig,
  axis_name: str | None,
) -> tuple[FitState, BlockStep]:
  zp = objective.project_parts(z, state.parts) if projection is None else projection
  return _parts_block(state, z, zp, config, axis_name)


@functools.partial(jax.jit, static_argnames=("config", "axis_name"))
def _appearances_step(
  state: FitState,
  z: jax.Array | None,
  projection: jax.Array | None,
  *,
  config: FitConfig,
  axis_name: str | None,
) -> tuple[FitState, BlockStep]:
  zp = objective.project_parts(z, state.parts) if projection is None else projection
  return _appearances_block(state, zp, config, axis_name)


@functools.partial(jax.jit, static_argnames=("config", "axis_name"))
def _update(
  state: FitState, z: jax.Array, *, config: FitConfig, axis_name: str | None
) -> tuple[FitState, dict[str, jax.Array]]:
  zp, value = _start(state, z, axis_name)
  state, _, value = _iteration(state, z, zp, value, config, axis_name)
  return state, {"loss": value}


@functools.partial(jax.jit, static_argnames=("steps", "config", "axis_name"))
def _run_steps(
  state: FitState,
  z: jax.Array,
  loss: jax.Array,
  *,
  steps: int,
  config: FitConfig,
  axis_name: str | None,
) -> tuple[FitState, jax.Array]:
  zp, value = _start(state, z, axis_name)
  # NaN `loss`: start the record from the expanded value; else continue it. A traced
  # choice, so the first chunk and the later ones share one compiled program.
  value = jnp.where(jnp.isnan(loss), value, loss.astype(value.dtype))

  def body(
    carry: tuple[FitState, jax.Array, jax.Array], _: None
  ) -> tuple[tuple[FitState, jax.Array, jax.Array], jax.Array]:
    state, zp, value = carry
    state, zp, value = _iteration(state, z, zp, value, config, axis_name)
    return (state, zp, value), value

  (state, _, _), losses = jax.lax.scan(body, (state, zp, value), None, length=steps)
  return state, losses


def compile_steps(
  state: FitState,
  features: jax.typing.ArrayLike | objective.Unfolded,
  steps: int,
  config: FitConfig = FitConfig(),
  *,
  axis_name: str | None = None,
) -> tuple[jax.stages.Compiled, tuple[FitState, jax.Array, jax.Array]]:
  """`run_steps` compiled ahead of time: `(compiled, arguments)`.

  `compiled(*arguments)` returns what `run_steps(state, features, steps, config)`
  does, `(state, losses [steps])`; `compiled.memory_analysis()` and
  `cost_analysis()` describe the program (what the benchmarks report).
  """
  z = _checked_batch(state, features, config)
  arguments = (state, z, jnp.asarray(jnp.nan, z.dtype))
  lowered = _run_steps.lower(*arguments, steps=int(steps), config=config, axis_name=axis_name)
  return lowered.compile(), arguments


def _device_keys(data_key: jax.Array, num_devices: int) -> jax.Array:
  """`[d, 2]` raw keys of this process's devices: `fold_in(data_key, global device index)`."""
  first = jax.process_index() * num_devices
  return jax.vmap(lambda d: jax.random.fold_in(data_key, d))(first + jnp.arange(num_devices))


def sampled_steps(
  state: FitState,
  sampler: DeviceSampler,
  device_key: jax.Array,
  first: jax.typing.ArrayLike,
  steps: int,
  config: FitConfig = FitConfig(),
  *,
  axis_name: str | None = None,
) -> tuple[FitState, jax.Array]:
  """`steps` iterations of Algorithm 1 from step `first`, step t's batch drawn by
  `sampler` from `fold_in(device_key, t)` on this device, inside the step: the
  `DeviceSampler` counterpart of `run_steps`, for a caller's `pmap` (`fit` runs it
  with `device_key = fold_in(key, global device index)`). Returns `(state,
  losses [steps])`, each loss that of its own batch after the step."""

  def body(state: FitState, t: jax.Array) -> tuple[FitState, jax.Array]:
    z = objective.unfold(sampler.sample(sampler.params, jax.random.fold_in(device_key, t)))
    state, metrics = _update(state, z, config=config, axis_name=axis_name)
    return state, metrics["loss"]

  return jax.lax.scan(body, state, first + jnp.arange(steps))


# ----------------------------------------------------------------------------- public steps


def _checked_batch(
  state: FitState,
  features: jax.typing.ArrayLike | objective.Unfolded | None,
  config: FitConfig,
  projection: jax.Array | None = None,
  *,
  needs_batch: bool = True,
) -> jax.Array | None:
  """`z` `[n, c, s]` with its shapes checked against the state (shapes only: works under
  jit); None when the step does not need the batch and `projection` stands in for it."""
  _validate_config(config)
  c, r_s = state.appearances.shape[0], state.parts.shape[1]
  if projection is not None and tuple(projection.shape[1:]) != (c, r_s):
    raise ValueError(f"projection must be [n, c={c}, r_s={r_s}], got {tuple(projection.shape)}")
  if features is None:
    if needs_batch or projection is None:
      raise ValueError("features: this step needs the batch (the A block: or its projection)")
    return None
  z = objective.batch_z(features)
  objective.check_batch(z, state.appearances, state.parts)
  return z


def parts_step(
  state: FitState,
  features: jax.typing.ArrayLike | objective.Unfolded,
  config: FitConfig = FitConfig(),
  *,
  projection: jax.Array | None = None,
  axis_name: str | None = None,
) -> tuple[FitState, BlockStep]:
  """The P block of Algorithm 1: a gradient step on Eq. (4), then the projection onto `P >= 0`.

  Args:
    state: a `FitState` (from `init`).
    features: the batch, `[n, s, c]` / `[n, h, w, c]` or `unfolded(features)`.
    config: `FitConfig` (static): the adaptive step (default) tries
      `1.25 state.step_size_parts` and halves it until Eq. (3) decreases
      sufficiently; a fixed `step_size` is the paper's `lambda`; "autograd"
      applies the optax transformation to `jax.grad` of Eq. (3).
    projection: `Z P` at `state.parts`, `[n, c, r_s]` (e.g. the last block's
      `BlockStep.projection`); computed when omitted (one pass over Z).
    axis_name: `features` is this device's shard; sums over samples are `psum`s.

  Returns:
    `(state, BlockStep)`: the state with the new parts (and step size or
    optimiser state); the exact loss change and `Z P` at the new parts.
  """
  z = _checked_batch(state, features, config, projection)
  return _parts_step(state, z, projection, config=config, axis_name=axis_name)


def appearances_step(
  state: FitState,
  features: jax.typing.ArrayLike | objective.Unfolded | None,
  config: FitConfig = FitConfig(),
  *,
  projection: jax.Array | None = None,
  axis_name: str | None = None,
) -> tuple[FitState, BlockStep]:
  """The A block of Algorithm 1: a gradient step on Eq. (5) (unconstrained).

  The block sees the data only through `M_i = Z_i P` (`[n, c, r_s]`): with
  `projection` given, `features` may be None and no pass over Z is made.
  Arguments and result as in `parts_step` (the projection is passed through).
  """
  z = _checked_batch(state, features, config, projection, needs_batch=False)
  return _appearances_step(state, z, projection, config=config, axis_name=axis_name)


def update(
  state: FitState,
  features: jax.typing.ArrayLike | objective.Unfolded,
  config: FitConfig = FitConfig(),
  *,
  axis_name: str | None = None,
) -> tuple[FitState, dict[str, jax.Array]]:
  """One iteration of Algorithm 1 on a batch: `parts_step`, then `appearances_step`.

  `features` as in `parts_step`. Returns `(state, {"loss": Eq. (3) after the step})`,
  the loss summed over every sample (of every device on `axis_name`).
  """
  z = _checked_batch(state, features, config)
  return _update(state, z, config=config, axis_name=axis_name)


def run_steps(
  state: FitState,
  features: jax.typing.ArrayLike | objective.Unfolded,
  steps: int,
  config: FitConfig = FitConfig(),
  *,
  loss: jax.typing.ArrayLike | None = None,
  axis_name: str | None = None,
) -> tuple[FitState, jax.Array]:
  """`steps` iterations of Algorithm 1 on one batch as one compiled `lax.scan`.

  Carries `Z P` from one iteration to the next (three passes over Z per
  iteration) and the loss by the exact changes. Returns `(state, losses
  [steps])`; what `fit` runs per chunk.

  Args:
    state, features, config, axis_name: as in `update`.
    steps: iterations (static).
    loss: Eq. (3) at `state` on this batch, when known: the last loss of the
      previous call on the same batch. The losses then continue that record by
      exact changes (with the adaptive step: never increasing, across calls
      too); when omitted, the record starts from Eq. (3) in the expanded form,
      whose rounding is about eps ||Z||^2.
  """
  z = _checked_batch(state, features, config)
  loss = jnp.asarray(jnp.nan if loss is None else loss, z.dtype)
  return _run_steps(state, z, loss, steps=int(steps), config=config, axis_name=axis_name)


def _as_raw_key(key: jax.Array) -> jax.Array:
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(key)
  return key


def _validate_config(config: FitConfig) -> None:
  if config.method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {config.method!r}")
  if config.optimizer is not None and not _is_autograd(config):
    raise ValueError("an optimizer applies to method='autograd' only")
  if config.step_size is not None and not (
    math.isfinite(config.step_size) and config.step_size > 0
  ):
    raise ValueError(f"step_size must be a positive finite float or None, got {config.step_size!r}")


def _validate(
  z: jax.Array | jax.ShapeDtypeStruct,
  rank_c: int,
  rank_s: int,
  config: FitConfig,
  parts_init_name: str,
  appearances: jax.typing.ArrayLike | None,
  parts: jax.typing.ArrayLike | None,
) -> None:
  """Ranks, options and starting factors against `z` `[n, c, s]` (shapes only: works under jit)."""
  _, c, s = z.shape
  checks.check_ranks(s, c, rank_c, rank_s)
  _validate_config(config)
  if parts_init_name not in PARTS_STARTS:
    raise ValueError(f"parts_init must be one of {PARTS_STARTS}, got {parts_init_name!r}")
  if appearances is not None and tuple(appearances.shape) != (c, rank_c):
    raise ValueError(f"appearances must be [c={c}, r_c={rank_c}], got {tuple(appearances.shape)}")
  if parts is not None and tuple(parts.shape) != (s, rank_s):
    raise ValueError(f"parts must be [s={s}, r_s={rank_s}], got {tuple(parts.shape)}")


# ----------------------------------------------------------------------------- fit


class _Batches:
  """Uniform access to a fixed array, a sampler `key -> batch`, or an iterator."""

  def __init__(self, data: Any) -> None:
    if isinstance(data, DeviceSampler):
      self.kind, self.data = "device", data
    elif hasattr(data, "shape"):
      self.kind, self.data = "fixed", data
    elif callable(data):
      self.kind, self.data = "sampler", data
    elif isinstance(data, Iterable):
      self.kind, self.data = "iterator", iter(data)
    else:
      raise ValueError(
        f"features_or_sampler must be an array, a callable or an iterable, "
        f"got {type(data).__name__}"
      )

  def get(self, data_key: jax.Array, t: int) -> Any:
    """Step t's batch (a sampler is called with `_batch_key(data_key, t)`)."""
    if self.kind == "fixed":
      return self.data
    if self.kind == "sampler":
      return self.data(_batch_key(data_key, t))
    try:
      return next(self.data)
    except StopIteration:
      raise ValueError("the sampler is exhausted (no batch left)") from None


def _batch_key(data_key: jax.Array, t: int) -> jax.Array:
  """The key of step t's batch: `fold_in(data_key, t)`, and in a run of several
  processes `fold_in(fold_in(data_key, t), process_index)`, so that each process
  draws its own samples (the documented per-process stream)."""
  key = jax.random.fold_in(data_key, t)
  if jax.process_count() > 1:
    key = jax.random.fold_in(key, jax.process_index())
  return key


@functools.lru_cache(maxsize=None)
def _unfold_in_place(num_devices: int) -> Callable[[jax.Array], jax.Array]:
  """`[d, m, s, c]` (or `[d, m, h, w, c]`) shards -> `[d, m, c, s]`, each on its device."""
  del num_devices  # A cache key only: pmap takes the device count from the input.
  return jax.pmap(objective.unfold, AXIS)


def shard_batch(
  features: jax.typing.ArrayLike, num_devices: int | None = None
) -> objective.Unfolded:
  """Features `[n, s, c]` / `[n, h, w, c]` -> `Unfolded` `[d, ceil(n/d), c, s]`
  resident on the first `d` local devices (default: all), one shard each: the
  batch of a `pmap` over `AXIS` (what `fit` runs on several devices).

  The batch is placed once: a host (NumPy) batch goes to the devices slice by
  slice, never whole to one device; the unfolding transpose runs on each shard
  where it lies; compiled steps then find the sharding `pmap` expects and read
  the shards in place (no copy per call: `tests/test_parallel.py` logs
  device-to-device transfers during `fit`). Zero samples pad `n` to a multiple
  of `d` (they add nothing to any sum).
  """
  num_devices = num_devices or jax.local_device_count()
  xp = jnp if isinstance(features, jax.Array) else np
  features = xp.asarray(features)
  pad = (-features.shape[0]) % num_devices
  if pad:
    features = xp.concatenate([features, xp.zeros((pad,) + features.shape[1:], features.dtype)])
  shards = xp.reshape(features, (num_devices, -1) + features.shape[1:])
  mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()[:num_devices]), (AXIS,))
  placed = jax.device_put(
    shards, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))
  )
  return objective.Unfolded(_unfold_in_place(num_devices)(placed))


@functools.lru_cache(maxsize=None)
def _pmapped(kind: str, static: tuple) -> Callable[..., Any]:
  """`init` / `run_steps` / `update` pmapped over the local devices with `axis_name=AXIS`.

  Cached on the static options, so repeated `fit` calls reuse the compiled programs.
  """
  if kind == "init":
    rank_c, rank_s, name, config = static
    fn = lambda batch, key, a, p: init(
      batch,
      rank_c,
      rank_s,
      key=key,
      config=config,
      parts_init=name,
      appearances=a,
      parts=p,
      axis_name=AXIS,
    )
    return jax.pmap(fn, AXIS, in_axes=(0, None, None, None), out_axes=None)
  if kind == "chunk":
    length, config = static
    fn = lambda state, batch, loss: run_steps(
      state, batch, length, config, loss=loss, axis_name=AXIS
    )
    return jax.pmap(fn, AXIS, in_axes=(None, 0, None), out_axes=None)
  if kind == "sampled_init":  # A DeviceSampler's first batch, drawn on each device.
    rank_c, rank_s, name, config, sample = static
    fn = lambda device_key, params, key, a, p: init(
      objective.Unfolded(objective.unfold(sample(params, jax.random.fold_in(device_key, 0)))),
      rank_c,
      rank_s,
      key=key,
      config=config,
      parts_init=name,
      appearances=a,
      parts=p,
      axis_name=AXIS,
    )
    return jax.pmap(fn, AXIS, in_axes=(0, None, None, None, None), out_axes=None)
  if kind == "sampled_chunk":
    length, config, sample = static
    fn = lambda state, device_key, params, first: sampled_steps(
      state, DeviceSampler(sample, params), device_key, first, length, config, axis_name=AXIS
    )
    return jax.pmap(fn, AXIS, in_axes=(None, 0, None, None), out_axes=None)
  (config,) = static
  fn = lambda state, batch: update(state, batch, config, axis_name=AXIS)
  return jax.pmap(fn, AXIS, in_axes=(None, 0), out_axes=None)


def fit(
  features_or_sampler: jax.typing.ArrayLike
  | Callable[[jax.Array], jax.typing.ArrayLike]
  | Iterable[jax.typing.ArrayLike]
  | DeviceSampler,
  rank_c: int,
  rank_s: int,
  *,
  steps: int,
  key: jax.Array,
  step_size: float | None = None,
  method: str = "bcd",
  learning_rate: float = 1e-3,
  optimizer: optax.GradientTransformation | None = None,
  parts_init: str = "kmeans",
  appearances: jax.typing.ArrayLike | None = None,
  parts: jax.typing.ArrayLike | None = None,
  chunk_size: int = 50,
  checkpoint_dir: str | None = None,
  checkpoint_every: int | None = None,
  num_devices: int | None = None,
  progress: bool = True,
  search: pgd.LineSearch = pgd.LineSearch(),
  stop: Callable[[], bool] | None = None,
) -> Factors:
  """Learns appearances `A` and parts `P >= 0` by Algorithm 1.

  Args:
    features_or_sampler: a fixed batch `[n, s, c]` / `[n, h, w, c]` (full-batch
      descent; several devices: placed once, a shard per device, `shard_batch`),
      a callable `key -> batch` (stochastic: step t draws `fold_in(key, t)`, so
      a resumed run sees the same batches; with several processes, process p
      draws `fold_in(fold_in(key, t), p)`: its own samples, and the step sums
      over every process's), an iterator of batches, or a `DeviceSampler`
      (each device draws its own batch inside the compiled step: features
      that would not fit in memory at all; non-finite features then surface
      as a non-finite loss). Stochastic runs initialise from the first batch
      unless `appearances` / `parts` are given (e.g. `hosvd_init` over many
      batches).
    rank_c, rank_s: `r_c <= c` appearances, `r_s <= s` parts.
    steps: total number of steps T (a resumed run continues up to T).
    key: PRNG key.
    step_size: None (adaptive, default) or the paper's fixed learning rate.
    method: "bcd" (analytic gradients, Eqs. 4-5) or "autograd" (jax.grad +
      optax; "adam" is the same).
    learning_rate: Adam's learning rate, when autograd has no `optimizer`.
    optimizer: any `optax.GradientTransformation` for the autograd variant
      (applied to each block, P projected onto `P >= 0` after each update).
    parts_init: "kmeans" (default) or "uniform" (the paper's `U(0, 0.01)`).
    appearances, parts: optional starting factors.
    chunk_size: steps per compiled `lax.scan` (full-batch runs).
    checkpoint_dir: orbax checkpoints of the full state; an existing one resumes.
    checkpoint_every: steps between checkpoints (default: only at the end).
    num_devices: local devices to shard the batch over (default: all).
    progress: show a progress bar.
    search: backtracking constants of the adaptive step.
    stop: polled between steps (between compiled chunks for a fixed batch or a
      `DeviceSampler`); when it returns True, `fit` checkpoints (with
      `checkpoint_dir`) and returns the factors reached, `Factors.steps <
      steps`: how a launcher honours SIGTERM.

  Returns:
    `Factors(appearances [c, r_c], parts [s, r_s], loss_history [steps], ...,
    orthogonality_error)`; a `UserWarning` when `max |A^T A - I|` exceeds
    `ORTHOGONALITY_BOUND`.

  Raises:
    ValueError: bad ranks or shapes, non-finite features, an empty sampler.
    FloatingPointError: the loss became non-finite (names the step and step size).
  """
  config = FitConfig(
    method=method,
    step_size=step_size,
    learning_rate=learning_rate,
    search=search,
    optimizer=optimizer,
  )
  if not (isinstance(steps, (int, np.integer)) and steps >= 0):
    raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
  if checkpoint_every is not None and checkpoint_every <= 0:
    raise ValueError(f"checkpoint_every must be positive, got {checkpoint_every}")
  key = _as_raw_key(key)
  init_key, data_key = jax.random.split(key)
  batches = _Batches(features_or_sampler)
  devices = num_devices or jax.local_device_count()
  if devices > jax.local_device_count():
    raise ValueError(f"num_devices={devices} but only {jax.local_device_count()} local devices")

  if batches.kind == "device":  # Drawn inside the pmapped programs, never stored.
    sampler = batches.data
    # Shapes only (`eval_shape`): nothing is drawn to validate the sampler.
    _validate(
      jax.eval_shape(lambda p, k: objective.unfold(sampler.sample(p, k)), sampler.params, data_key),
      rank_c,
      rank_s,
      config,
      parts_init,
      appearances,
      parts,
    )
    device_keys = _device_keys(data_key, devices)
    state = _pmapped("sampled_init", (rank_c, rank_s, parts_init, config, sampler.sample))(
      device_keys, sampler.params, init_key, appearances, parts
    )
    run_sampled = lambda state, first, length: _pmapped(
      "sampled_chunk", (length, config, sampler.sample)
    )(state, device_keys, sampler.params, first)
  else:
    first = batches.get(data_key, 0)
    # Shapes only (`eval_shape`): the batch is not transposed, nor moved, to validate it.
    _validate(
      jax.eval_shape(objective.unfold, first),
      rank_c,
      rank_s,
      config,
      parts_init,
      appearances,
      parts,
    )
    # pmap whenever the sums span more than one device: several local devices, or
    # several processes (then pmap's psum runs over the devices of every process).
    # Either way the same public functions run; on several devices with `axis_name`.
    if devices > 1 or jax.process_count() > 1:
      prepare = lambda features: shard_batch(features, devices)
      run_init = _pmapped("init", (rank_c, rank_s, parts_init, config))
      run_chunk = lambda state, batch, length, loss: _pmapped("chunk", (length, config))(
        state, batch, loss
      )
      run_step = _pmapped("step", (config,))
    else:
      prepare = objective.unfolded
      run_init = lambda batch, key, a, p: init(
        batch, rank_c, rank_s, key=key, config=config, parts_init=parts_init, appearances=a, parts=p
      )
      run_chunk = lambda state, batch, length, loss: run_steps(
        state, batch, length, config, loss=loss
      )
      run_step = lambda state, batch: update(state, batch, config)
    batch = prepare(first)
    if batch.z.ndim == 4:  # Placed shards (`init` sees tracers under pmap): checked where they lie.
      checks.check_finite(batch.z, "features")
    state = run_init(batch, init_key, appearances, parts)

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
      if batches.kind == "fixed":  # The loss record continues across chunks (and resumptions).
        state_new, losses = run_chunk(state, batch, length, history[step - 1] if step else np.nan)
      elif batches.kind == "device":
        state_new, losses = run_sampled(state, step, length)
      else:
        losses = []
        state_new = state
        for t in range(step, step + length):
          if t > step and stopping():
            break
          new = batch if t == 0 else prepare(batches.get(data_key, t))
          if t and new.z.shape[-2:] != batch.z.shape[-2:]:
            raise ValueError(
              f"batch at step {t} has shape {tuple(new.z.shape)}, "
              f"expected [..., {batch.z.shape[-2]}, {batch.z.shape[-1]}] (c, s)"
            )
          state_new, metrics = run_step(state_new, new)
          losses.append(metrics["loss"])
        losses = jnp.stack(losses)
        length = len(losses)
      losses = np.asarray(losses, np.float64)
      _check_finite_run(losses, state_new, step)
      state = state_new
      history[step : step + length] = losses
      step += length
      bar.update(length)
      if manager is not None and (
        step == steps or (checkpoint_every and step % checkpoint_every == 0)
      ):
        manager.save(step, state, history[:step])
        last_saved = step
    if manager is not None and step != last_saved:  # Stopped early.
      manager.save(step, state, history[:step])
  finally:
    bar.close()
    if manager is not None:
      manager.close()
  orthogonality = objective.orthogonality_error(state.appearances)
  if orthogonality > ORTHOGONALITY_BOUND:
    warnings.warn(
      f"the appearances drifted from orthonormal: max |A^T A - I| = "
      f"{orthogonality:.3g} > {ORTHOGONALITY_BOUND} (saliency, rewrite and refine "
      "assume orthonormal columns)",
      stacklevel=2,
    )
  return Factors(
    state.appearances,
    state.parts,
    history,
    float(state.step_size_parts),
    float(state.step_size_appearances),
    int(state.step),
    orthogonality,
  )


def _check_finite_run(losses: np.ndarray, state: FitState, first_step: int) -> None:
  bad = np.flatnonzero(~np.isfinite(losses))
  # On the host: the factors are small, and eager jnp ops would each compile a program.
  factors_ok = all(np.isfinite(np.asarray(x)).all() for x in (state.appearances, state.parts))
  if bad.size or not factors_ok:
    at = first_step + (int(bad[0]) if bad.size else len(losses) - 1) + 1
    raise FloatingPointError(
      f"the loss became non-finite at step {at} (step size: parts "
      f"{float(state.step_size_parts):.3g}, appearances {float(state.step_size_appearances):.3g}); "
      "use a smaller step_size or the adaptive default (step_size=None)"
    )


def _progress(total: int, initial: int, enabled: bool) -> Any:
  enabled = enabled and jax.process_index() == 0
  try:
    from tqdm.auto import tqdm
  except ImportError:  # pragma: no cover - tqdm is a dependency
    enabled = False
  if not enabled:

    class _Null:
      def update(self, _: int) -> None:
        pass

      def close(self) -> None:
        pass

    return _Null()
  return tqdm(total=total, initial=initial, desc="PandA", unit="step")
