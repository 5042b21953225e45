"""The functional API of Algorithm 1: `init`, `parts_step`, `appearances_step`,
`update`, `run_steps` and `loss` compose into each other, accept channels-last
or unfolded batches, and run inside a caller's `pmap` or `shard_map` (4 CPU
devices) with the results of one device.

Tolerances: every comparison of two float64 computations that agree in exact
arithmetic is bounded by the effect of float32 rounding on the same computation
(`conftest.assert_float64_runs_agree`, a margin of u32 / u64 = 2^29); where the
two sides are the same compiled function on the same array, equality is exact.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, assert_float64_runs_agree, to_float32
import panda_jax as pj
from panda_jax.data import synthetic


def _setup(dtype=jnp.float64, **init_kw):
  """Features `[16, 8, 8, 16]` and a state from one device."""
  features = synthetic.planted(
    jax.random.PRNGKey(0), num_samples=16, channels=16, noise=0.1
  ).features.astype(dtype)
  return features, pj.init(features, 6, 4, key=jax.random.PRNGKey(1), **init_kw)


def _assert_states_agree(actual, expected, float32, what):
  for field in ("appearances", "parts", "step_size_parts", "step_size_appearances"):
    assert_float64_runs_agree(
      getattr(actual, field), getattr(expected, field), getattr(float32, field), f"{what}: {field}"
    )
  assert int(actual.step) == int(expected.step)


@pytest.mark.parametrize("method", ["bcd", "autograd"])
def test_blocks_compose_to_update(method):
  """`parts_step`, then `appearances_step` on its projection (or on the batch), is
  `update`; the loss changes add up to `update`'s loss."""
  config = pj.FitConfig(method=method, learning_rate=1e-2)
  with jax.enable_x64(True):
    features, state = _setup(config=config)

    def blocks(state, features):
      start = pj.loss(features, state.appearances, state.parts)
      state, parts_out = pj.parts_step(state, features, config)
      with_projection, out = pj.appearances_step(
        state, None, config, projection=parts_out.projection
      )
      with_batch, _ = pj.appearances_step(state, features, config)
      loss = start + parts_out.loss_change + out.loss_change
      return with_projection._replace(step=with_projection.step + 1), with_batch, loss

    (mine, with_batch, loss), (mine32, _, loss32) = [
      blocks(*args) for args in [(state, features), to_float32((state, features))]
    ]
    (theirs, metrics), _ = [
      pj.update(*args, config) for args in [(state, features), to_float32((state, features))]
    ]
  _assert_states_agree(mine, theirs, mine32, "blocks vs update")
  _assert_states_agree(
    with_batch._replace(step=with_batch.step + 1), theirs, mine32, "A step from the batch"
  )
  assert_float64_runs_agree(loss, metrics["loss"], loss32, "loss")
  assert int(mine.step) == 1 and np.min(np.asarray(mine.parts)) >= 0


def test_run_steps_is_repeated_update_and_continues_its_record():
  with jax.enable_x64(True):
    features, state = _setup()
    batch = pj.unfolded(features)
    runs = {}
    for name, (st, b) in {"f64": (state, batch), "f32": to_float32((state, batch))}.items():
      scanned, losses = pj.run_steps(st, b, 6)
      looped, looped_losses = st, []
      for _ in range(6):
        looped, metrics = pj.update(looped, b)
        looped_losses.append(metrics["loss"])
      half, first = pj.run_steps(st, b, 3)
      half, second = pj.run_steps(half, b, 3, loss=first[-1])
      runs[name] = (
        scanned,
        losses,
        looped,
        jnp.stack(looped_losses),
        half,
        jnp.concatenate([first, second]),
      )
  scanned, losses, looped, looped_losses, half, halves = runs["f64"]
  scanned32, losses32 = runs["f32"][:2]
  _assert_states_agree(looped, scanned, scanned32, "update loop vs run_steps")
  _assert_states_agree(half, scanned, scanned32, "two calls vs one")
  assert_float64_runs_agree(looped_losses, losses, losses32, "losses of the loop")
  assert_float64_runs_agree(halves, losses, losses32, "continued record")
  assert np.all(np.diff(np.asarray(halves)) <= 0)  # Exact: test_fit._assert_non_increasing.


def test_layouts_and_unfolded_batches_are_the_same_step():
  """The batch is transposed before the compiled step: the same floats, no tolerance."""
  features, state = _setup(jnp.float32)
  a, _ = pj.update(state, features)
  b, _ = pj.update(state, pj.unfolded(features))
  c, _ = pj.update(state, features.reshape(16, 64, 16))
  for x, y in [(a, b), (a, c)]:
    jax.tree.map(np.testing.assert_array_equal, x, y)


def test_public_steps_under_a_callers_jit():
  """The wrappers check shapes only, so they trace inside a caller's `jit`; the inner
  program is the same."""
  with jax.enable_x64(True):
    features, state = _setup()
    batch = pj.unfolded(features)
    outer = jax.jit(lambda st, b: pj.update(st, b))
    (mine, metrics), (theirs, expected) = outer(state, batch), pj.update(state, batch)
    mine32, metrics32 = outer(*to_float32((state, batch)))
  _assert_states_agree(mine, theirs, mine32, "under jit")
  assert_float64_runs_agree(metrics["loss"], expected["loss"], metrics32["loss"], "loss")


def test_bad_calls_raise():
  features, state = _setup(jnp.float32)
  with pytest.raises(ValueError, match="projection"):
    pj.appearances_step(state, None)
  with pytest.raises(ValueError, match="needs the batch"):
    pj.parts_step(state, None, projection=jnp.zeros((16, 16, 4)))
  with pytest.raises(ValueError, match="projection must be"):
    pj.appearances_step(state, None, projection=jnp.zeros((16, 16, 5)))
  with pytest.raises(ValueError, match="parts must be"):
    pj.update(state, features[:, :4])
  with pytest.raises(ValueError, match="method"):
    pj.update(state, features, pj.FitConfig(method="newton"))
  with pytest.raises(ValueError, match="parts_init"):
    pj.init(features, 6, 4, key=jax.random.PRNGKey(0), parts_init="random")


_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    sys.path.insert(0, "tests")
    from conftest import to_float32
    import panda_jax as pj
    from panda_jax.data import synthetic
    assert jax.local_device_count() == 4
    features = synthetic.planted(jax.random.PRNGKey(3), num_samples=16, height=6, width=6,
                                 channels=12, noise=0.1).features.astype(jnp.float64)
    batch = pj.unfolded(features)
    parts0 = jax.random.uniform(jax.random.PRNGKey(5), (36, 4), jnp.float64, maxval=0.01)

    def program(batch, parts0, axis_name=None):
      # HOSVD and the step sizes are sums over samples; the parts start is given so
      # that a float32 run starts alike (k-means draws in the features' dtype).
      state = pj.init(batch, 6, 4, key=jax.random.PRNGKey(4), parts=parts0,
                      axis_name=axis_name)
      out = {"init": state}
      # One update (traced once; `run_steps` below repeats the iteration in a scan).
      state, metrics = pj.update(state, batch, axis_name=axis_name)
      out["update"] = (state, metrics["loss"])
      state, parts_out = pj.parts_step(state, batch, axis_name=axis_name)
      state, appearances_out = pj.appearances_step(state, None, axis_name=axis_name,
                                                   projection=parts_out.projection)
      out["blocks"] = (state, parts_out.loss_change, appearances_out.loss_change)
      state, losses = pj.run_steps(state, batch, 4, axis_name=axis_name)
      out["run_steps"] = (state, losses)
      out["loss"] = pj.loss(batch, state.appearances, state.parts, axis_name=axis_name)
      return out

    one = jax.jit(program)(batch, parts0)
    one32 = jax.jit(program)(*to_float32((batch, parts0)))
    sharded = pj.Unfolded(batch.z.reshape((4, 4) + batch.z.shape[1:]))
    pmapped = jax.pmap(lambda b, p: program(b, p, "i"), "i", in_axes=(0, None),
                       out_axes=None)(sharded, parts0)
    mesh = jax.make_mesh((4,), ("b",))
    placed = jax.device_put(batch, NamedSharding(mesh, P("b")))
    shard_mapped = jax.jit(jax.shard_map(lambda b, p: program(b, p, "b"), mesh=mesh,
                                         in_specs=(P("b"), P()), out_specs=P()))(placed, parts0)
    # The default start (k-means in the appearance basis) under a caller's pmap: its
    # labels are discrete, so the same labels give the same floats.
    kmeans = lambda b, axis_name=None: pj.init(b, 6, 4, key=jax.random.PRNGKey(6),
                                               axis_name=axis_name).parts
    kmeans_one = kmeans(batch)
    kmeans_pmapped = jax.pmap(lambda b: kmeans(b, "i"), "i", out_axes=None)(sharded)
    leaves = lambda tree: [np.asarray(x, np.float64).tolist()
                           for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    print(json.dumps(dict(one=leaves(one), one32=leaves(one32), pmap=leaves(pmapped),
                          shard_map=leaves(shard_mapped),
                          kmeans_equal=bool(np.array_equal(kmeans_one, kmeans_pmapped)))))
""")


def test_callers_pmap_and_shard_map_equal_one_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT, timeout=900
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["kmeans_equal"]
  for name in ("pmap", "shard_map"):
    assert len(result[name]) == len(result["one"]) == len(result["one32"])
    for i, (mine, one, one32) in enumerate(zip(result[name], result["one"], result["one32"])):
      assert_float64_runs_agree(mine, one, one32, f"{name}, leaf {i}")
