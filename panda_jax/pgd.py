"""Projected gradient steps with a step size that adapts to the problem's scale.

The official code needs a hand-picked learning rate per layer (1e-6 to 1e-8 in
its demos) because the curvature of Eq. (3) scales with `||Z||^2`. Here each
block keeps its own step size: every step first tries it enlarged by `grow`,
then halves it until the sufficient-decrease condition of projected gradient
descent (Beck & Teboulle 2009, Lemma 2.3) holds,

    f(x+) <= f(x) + <g, x+ - x> + ||x+ - x||^2 / (2 t),

which makes the objective non-increasing. `f` is known only to its rounding
error (`slack`, e.g. a few float eps times `||Z||^2` for the expanded form of
Eq. 3). A trial that misses the condition by less than that is at the noise
floor: the step stops there without moving `x` and without shrinking `t`, so a
converged run neither shrinks its step to nothing chasing rounding noise nor
random-walks on it (which would make runs that differ only in summation order,
e.g. on 1 and 4 devices, drift apart). A step that finds no such `t` within
`max_tries` leaves `x` unchanged (and the loss with it).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax


class LineSearch(NamedTuple):
  """Backtracking constants (static)."""

  grow: float = 1.25
  shrink: float = 0.5
  max_tries: int = 30


def backtracking_step(
  objective: Callable[[jax.Array], tuple[jax.Array, Any]],
  x: jax.Array,
  value: jax.Array,
  aux: Any,
  grad: jax.Array,
  step_size: jax.Array,
  project: Callable[[jax.Array], jax.Array],
  search: LineSearch = LineSearch(),
  slack: jax.typing.ArrayLike = 0.0,
) -> tuple[jax.Array, jax.Array, Any, jax.Array]:
  """One projected gradient step `x+ = project(x - t g)` with backtracking on `t`.

  Args:
    objective: `x -> (f(x), aux)`; `aux` is whatever the caller reuses (e.g. `Z P`).
    x, value, aux: the current point, `f(x)` and its `aux`.
    grad: `df/dx` at `x`.
    step_size: the previous accepted step size `t`.
    project: the projection onto the feasible set (identity when unconstrained).
    search: grow / shrink factors and the number of trials.
    slack: the absolute rounding error of `objective`'s values.

  Returns:
    `(x+, f(x+), aux+, t)`; `(x, value, aux, t)` with a shrunk `t` if no trial
    decreased `f` sufficiently.
  """

  def trial(t: jax.Array) -> tuple[jax.Array, jax.Array, Any, jax.Array, jax.Array]:
    candidate = project(x - t * grad)
    delta = candidate - x
    new_value, new_aux = objective(candidate)
    bound = value + jnp.vdot(grad, delta) + jnp.vdot(delta, delta) / (2.0 * t)
    return candidate, new_value, new_aux, new_value <= bound, new_value <= bound + slack

  def cond(carry: tuple) -> jax.Array:
    _, _, _, _, _, at_floor, tries = carry
    return jnp.logical_and(jnp.logical_not(at_floor), tries < search.max_tries)

  def body(carry: tuple) -> tuple:
    t, _, _, _, _, _, tries = carry
    t = t * search.shrink
    return (t, *trial(t), tries + 1)

  t0 = step_size * search.grow
  t, candidate, new_value, new_aux, accepted, _, _ = jax.lax.while_loop(
    cond, body, (t0, *trial(t0), jnp.int32(1))
  )
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(accepted, a, b), new, old)
  return keep(candidate, x), keep(new_value, value), keep(new_aux, aux), t


def nonnegative(x: jax.Array) -> jax.Array:
  """Projection onto the non-negative orthant, `max{0, x}` (Algorithm 1): optax's."""
  return optax.projections.projection_non_negative(x)


def identity(x: jax.Array) -> jax.Array:
  return x
