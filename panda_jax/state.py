"""The state types of the factorisation: options, running state, results.

A module of its own so that `decomposition` (which makes them) and `checkpoint`
(which stores them) both import it and neither imports the other in a circle.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from panda_jax import pgd


class FitConfig(NamedTuple):
  """Static options of a run (hashable: part of the compiled program)."""

  method: str = "bcd"  # "bcd" (analytic Eqs. 4-5) or "autograd" (jax.grad + optax).
  step_size: float | None = None  # fixed lambda (paper) or None (adaptive, per block).
  learning_rate: float = 1e-3  # autograd with the default optimizer: Adam's.
  search: pgd.LineSearch = pgd.LineSearch()
  optimizer: optax.GradientTransformation | None = None  # autograd; None: Adam(learning_rate).


class FitState(NamedTuple):
  """Everything a run needs to continue bit-for-bit.

  appearances: `A`, `[c, r_c]`.
  parts: `P`, `[s, r_s]`, non-negative.
  step: int32 scalar, iterations taken (`update` counts; the block steps do not).
  step_size_parts: step size of the P block (the fixed `lambda` or the last accepted one).
  step_size_appearances: same for the A block.
  key: uint32 `[2]` PRNG key; step t of a stochastic run samples with `fold_in(key, t)`.
  opt_state: `(parts_state, appearances_state)` of the optax transformation
    (autograd), or `()` for "bcd".
  """

  appearances: jax.Array
  parts: jax.Array
  step: jax.Array
  step_size_parts: jax.Array
  step_size_appearances: jax.Array
  key: jax.Array
  opt_state: Any


class BlockStep(NamedTuple):
  """What a block step reports, and hands to the next block on the same batch.

  loss_change: the exact change of Eq. (3) the step made, summed over every
    sample (of every device on `axis_name`); not positive with the adaptive step
    (up to rounding far below the loss's own).
  projection: `M_i = Z_i P` at the parts after the step, `[n, c, r_s]` (this
    device's samples); passing it on saves the next block a pass over Z.
  """

  loss_change: jax.Array
  projection: jax.Array


class Factors(NamedTuple):
  """Result of `fit`: the factors and the run's record.

  `layer` and `generator` say where the features came from (None from `fit`;
  `experiments.decompose` records them, `save_factors` keeps them), so code
  that reloads the factors needs no other file to know where they apply.
  """

  appearances: jax.Array  # [c, r_c]
  parts: jax.Array  # [s, r_s]
  loss_history: np.ndarray  # [steps], Eq. (3) after each step
  step_size_parts: float
  step_size_appearances: float
  steps: int
  orthogonality_error: float  # max |A^T A - I| (`decomposition.ORTHOGONALITY_BOUND`)
  layer: int | None = None  # the generator layer of the features
  generator: str | None = None  # the generator (a converted directory or packaged name)
