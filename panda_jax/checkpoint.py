"""orbax checkpoints: learnt factors, and the full state of a running `fit`.

Both write through orbax's atomic commit (temporary directory, then rename), so
a process killed mid-save leaves the previous checkpoint intact and a half
written one is never read back.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from panda_jax import objective
from panda_jax.state import Factors, FitState

_FACTOR_FIELDS = ("appearances", "parts", "loss_history")


def save_factors(directory: str, factors: Factors) -> None:
  """Writes `factors` to `directory` (created; must not exist yet).

  `scalars` holds `[step_size_parts, step_size_appearances, steps,
  orthogonality_error, layer]` (layer -1: unknown); factors saved before the
  last fields existed hold the first three or four (`load_factors` recomputes
  the orthogonality error). `generator`, when known, is stored as its UTF-8
  bytes (orbax stores arrays).
  """
  directory = os.path.abspath(os.fspath(directory))
  tree = {name: np.asarray(getattr(factors, name)) for name in _FACTOR_FIELDS}
  layer = -1 if factors.layer is None else int(factors.layer)
  tree["scalars"] = np.asarray(
    [
      factors.step_size_parts,
      factors.step_size_appearances,
      factors.steps,
      factors.orthogonality_error,
      layer,
    ],
    np.float64,
  )
  if factors.generator is not None:
    tree["generator_utf8"] = np.frombuffer(str(factors.generator).encode(), np.uint8)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory, tree)
    checkpointer.wait_until_finished()


def load_factors(directory: str) -> Factors:
  """Reads what `save_factors` wrote."""
  directory = os.path.abspath(os.fspath(directory))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no factors checkpoint at {directory}")
  with ocp.StandardCheckpointer() as checkpointer:
    tree = checkpointer.restore(directory)
  scalars = np.asarray(tree["scalars"])
  appearances = jnp.asarray(tree["appearances"])
  orthogonality = (
    float(scalars[3]) if scalars.size > 3 else objective.orthogonality_error(appearances)
  )
  layer = int(scalars[4]) if scalars.size > 4 and scalars[4] >= 0 else None
  generator = (
    bytes(np.asarray(tree["generator_utf8"], np.uint8)).decode()
    if "generator_utf8" in tree
    else None
  )
  return Factors(
    appearances,
    jnp.asarray(tree["parts"]),
    np.asarray(tree["loss_history"]),
    float(scalars[0]),
    float(scalars[1]),
    int(scalars[2]),
    orthogonality,
    layer=layer,
    generator=generator,
  )


class FitCheckpoints:
  """Periodic checkpoints of a `FitState` plus the loss history so far.

  The newest checkpoint is the resume point; older ones are pruned (`keep`).
  """

  def __init__(self, directory: str, keep: int = 2) -> None:
    directory = os.path.abspath(os.fspath(directory))
    options = ocp.CheckpointManagerOptions(
      preservation_policy=ocp.checkpoint_managers.LatestN(keep),
      create=True,
      enable_async_checkpointing=False,
    )
    self._manager = ocp.CheckpointManager(directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: FitState, history: np.ndarray) -> None:
    item = {
      "state": jax.tree.map(np.asarray, state._asdict()),
      "history": np.asarray(history, np.float64),
    }
    try:
      self._manager.save(step, args=ocp.args.StandardSave(item))
      self._manager.wait_until_finished()
    except (OSError, ValueError, RuntimeError) as err:  # tensorstore reports as ValueError.
      raise OSError(
        f"could not write the checkpoint of step {step} to "
        f"{self._manager.directory} (the previous one is intact): "
        f"{' '.join(str(err).split())[:300]}"
      ) from err

  def restore(self, template: FitState) -> tuple[FitState, np.ndarray]:
    """`(state, history)` of the newest checkpoint; `template` fixes the structure."""
    step = self._manager.latest_step()
    target = {
      "state": jax.tree.map(np.asarray, template._asdict()),
      "history": np.zeros((step,), np.float64),
    }
    try:
      item = self._manager.restore(step, args=ocp.args.StandardRestore(target))
    except (ValueError, KeyError) as err:
      raise ValueError(
        f"checkpoint at step {step} does not match this run (ranks, shapes or method differ): {err}"
      ) from err
    state = FitState(**jax.tree.map(jnp.asarray, item["state"]))
    return state, np.asarray(item["history"])

  def close(self) -> None:
    self._manager.close()
