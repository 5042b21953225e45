"""pmap data parallelism: a run sharded over 4 simulated CPU devices equals the
single-device run, and its batch stays on its devices (one shard each) across chunks. Runs in a subprocess, since the device count is fixed when
JAX starts.

The tolerance is derived, not observed. Sharding changes only the order of the
sums over samples (per-device partial sums, then `psum`; padded samples are
exact zeros), i.e. the rounding of the same computation. Both runs are made in
float64, so they differ by perturbations of relative size u64 = 2^-53, carried
through the run with some amplification k: about k u64. The bound is the same
run's sensitivity to float32 rounding, |run_f32 - run_f64| (about k u32, from
the same initial state), which is larger by u32 / u64 = 2^29 = 5.4e8 for any k:
the assertion fails only if the 4-device run differs by more than float32
rounding would make it, far below what a sharding bug gives. That a bug is
caught is checked too: a pmap without its psums returns device 0's run on its
own shard, which must miss the bound by a wide margin.
"""

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np

_SCRIPT = textwrap.dedent("""
    import json
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp, numpy as np
    import panda_jax as pj
    from panda_jax.data import synthetic
    assert jax.local_device_count() == 4, jax.local_device_count()
    features = synthetic.planted(jax.random.PRNGKey(0), num_samples=18, channels=16,
                                 noise=0.1).features.astype(jnp.float64)
    f32 = lambda tree: jax.tree.map(
        lambda x: x.astype(jnp.float32) if x.dtype == jnp.float64 else x, tree)
    rel = lambda x, y: float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y)))
    key, steps = jax.random.PRNGKey(1), 40
    init_key, data_key = jax.random.split(key)  # As `fit` splits it.

    def errors(one, four, ref32, shard):
      # Relative differences of the factors and the losses (in units of the first loss).
      out = {}
      for name, x in [("four", four), ("float32", ref32), ("shard", shard)]:
        if x is not None:
          out[name] = dict(parts=rel(x.parts, one.parts),
                           appearances=rel(x.appearances, one.appearances),
                           loss=float(np.max(np.abs(np.asarray(x.loss_history)
                                                    - one.loss_history)) / one.loss_history[0]))
      return out

    out = {}
    # Resident shards: a placed batch is one [1, 5, c, s] shard per device, and the
    # compiled chunks read it in place: the parent asserts that no implicit
    # device-to-device transfer of a [4, 5, 16, 64] batch was logged (the guard's
    # "log" mode; the old path moved it from device 0 at every chunk).
    placed = pj.shard_batch(np.asarray(features), 4)
    out["shards"] = sorted((s.device.id,) + tuple(s.data.shape) for s in placed.z.addressable_shards)
    # The adaptive default and the autograd variant. The paper's fixed step has no sharded
    # code of its own: the same psum'd gradient and loss change as the default's first trial.
    for name, kw in [("bcd", {}), ("adam", dict(method="adam", learning_rate=1e-2))]:
      one = pj.fit(features, 6, 4, steps=steps, key=key, num_devices=1, progress=False, **kw)
      with jax.transfer_guard_device_to_device("log"):
        four = pj.fit(features, 6, 4, steps=steps, key=key, num_devices=4, progress=False, **kw)
      # The float32 run from the float64 run's initial state (init draws its random
      # numbers in the features' dtype, so `fit` in float32 would start elsewhere).
      config = pj.FitConfig(method=kw.get("method", "bcd"), step_size=kw.get("step_size"),
                            learning_rate=kw.get("learning_rate", 1e-3))
      state = pj.init(features, 6, 4, key=init_key, config=config,
                      parts_init=kw.get("parts_init", "kmeans"))
      state32, losses32 = pj.run_steps(f32(state), pj.unfolded(features.astype(jnp.float32)),
                                       steps, config)
      ref32 = pj.Factors(state32.appearances, state32.parts, losses32, 0.0, 0.0, steps, 0.0)
      # What a pmap without psums returns: device 0's run on its shard (5 of 18 samples).
      shard = pj.fit(features[:5], 6, 4, steps=steps, key=key, num_devices=1, progress=False,
                     **kw) if name == "bcd" else None
      out[name] = errors(one, four, ref32, shard)

    sampler = lambda key: features[jax.random.choice(key, 18, (10,), replace=False)]
    one = pj.fit(sampler, 6, 4, steps=10, key=jax.random.PRNGKey(2), num_devices=1,
                 progress=False)
    with jax.transfer_guard_device_to_device("log"):
      four = pj.fit(sampler, 6, 4, steps=10, key=jax.random.PRNGKey(2), num_devices=4,
                    progress=False)
    init_key, data_key = jax.random.split(jax.random.PRNGKey(2))
    state = f32(pj.init(sampler(jax.random.fold_in(data_key, 0)), 6, 4, key=init_key))
    losses32 = []
    for t in range(10):
      state, metrics = pj.update(state, sampler(jax.random.fold_in(data_key, t)).astype(jnp.float32))
      losses32.append(metrics["loss"])
    ref32 = pj.Factors(state.appearances, state.parts, np.asarray(losses32), 0.0, 0.0, 10, 0.0)
    out["stochastic"] = errors(one, four, ref32, None)

    # Features drawn inside the step (`DeviceSampler`, 3 samples per device): the run
    # equals one device fed the same 12 samples per step from the host.
    base = features[:1]
    draw = lambda params, key: params + 0.3 * jax.random.uniform(key, (3, 8, 8, 16), params.dtype)
    data_key = jax.random.split(jax.random.PRNGKey(3))[1]
    host = lambda dtype: iter([jnp.concatenate(
        [draw(base.astype(dtype), jax.random.fold_in(jax.random.fold_in(data_key, d), t))
         for d in range(4)]) for t in range(8)])
    parts0 = jax.random.uniform(jax.random.PRNGKey(5), (64, 4), jnp.float64, maxval=0.01)
    with jax.transfer_guard_device_to_device("log"):
      four = pj.fit(pj.DeviceSampler(draw, base), 6, 4, steps=8, key=jax.random.PRNGKey(3),
                    parts=parts0, chunk_size=3, progress=False)
    one, one32 = [pj.fit(host(dtype), 6, 4, steps=8, key=jax.random.PRNGKey(3), num_devices=1,
                         parts=parts0.astype(dtype), progress=False)
                  for dtype in (jnp.float64, jnp.float32)]
    out["device_sampler"] = errors(one, four, one32, None)
    print(json.dumps(out))
""")


def test_four_devices_equal_one():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=900
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result.pop("shards") == [[d, 1, 5, 16, 64] for d in range(4)]
  moved = re.findall(
    r"device-to-device transfer: aval=ShapedArray\(float\d+\[4,5,16,64\]\)", proc.stderr
  )
  assert not moved, f"the batch left its shards {len(moved)} times"
  for name, runs in result.items():
    for field, bound in runs["float32"].items():
      assert runs["four"][field] <= bound, (name, field, runs)
      if "shard" in runs:  # A sharding bug misses the bound by orders of magnitude.
        assert runs["shard"][field] > 1e3 * bound, (name, field, runs)


_PROCESS_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    role = sys.argv[1]
    jax.config.update("jax_num_cpu_devices", 2 if role == "multi" else 4)
    jax.config.update("jax_enable_x64", True)
    if role == "multi":
      jax.distributed.initialize(f"localhost:{sys.argv[3]}", num_processes=2,
                                 process_id=int(sys.argv[2]))
    import jax.numpy as jnp, numpy as np
    import panda_jax as pj

    seen = []
    def sampler(key, dtype):
      # Samples `[4, 6, 6, 5]` from the key this process is given.
      seen.append(np.asarray(key).tolist())  # fit passes raw uint32 keys.
      base = jax.random.uniform(jax.random.PRNGKey(9), (1, 36, 5), jnp.float64)
      return (base + 0.3 * jax.random.uniform(key, (4, 36, 5), jnp.float64)).astype(dtype)

    def union(key, dtype):  # What the two processes draw at this key, together.
      return jnp.concatenate([sampler(jax.random.fold_in(key, p), dtype) for p in range(2)])

    def record(f):
      return {k: np.asarray(v, np.float64).tolist()
              for k, v in (("parts", f.parts), ("appearances", f.appearances),
                           ("loss", f.loss_history))}

    def run(source, dtype):
      return record(pj.fit(lambda k: source(k, dtype), 3, 2, steps=3,
                           key=jax.random.PRNGKey(2), progress=False))

    def run_in_step(dtype):  # DeviceSampler: 2 samples per device, drawn in the step.
      draw = lambda params, key: (params + 0.3 * jax.random.uniform(
          key, (2, 36, 5), jnp.float64)).astype(params.dtype)
      base = jax.random.uniform(jax.random.PRNGKey(9), (1, 36, 5), jnp.float64).astype(dtype)
      parts0 = jax.random.uniform(jax.random.PRNGKey(5), (36, 2), jnp.float64, maxval=0.01)
      return record(pj.fit(pj.DeviceSampler(draw, base), 3, 2, steps=3, chunk_size=2,
                           key=jax.random.PRNGKey(2), parts=parts0.astype(dtype),
                           progress=False))

    def projector(source, dtype):  # hosvd_init of this process's samples: A A^T.
      a = pj.hosvd_init(source(jax.random.PRNGKey(7), dtype), 3)
      return np.asarray(a @ a.T, np.float64).tolist()

    if role == "multi":
      mine = lambda key, dtype: sampler(jax.random.fold_in(key, jax.process_index()), dtype)
      out = {"run": run(sampler, jnp.float64), "keys": seen,
             "hosvd": projector(mine, jnp.float64), "in_step": run_in_step(jnp.float64)}
    else:
      out = {"run": run(union, jnp.float64), "run32": run(union, jnp.float32),
             "hosvd": projector(union, jnp.float64), "hosvd32": projector(union, jnp.float32),
             "in_step": run_in_step(jnp.float64), "in_step32": run_in_step(jnp.float32)}
    print(json.dumps(out))
""")


def test_two_processes_draw_their_own_samples_and_equal_one_process():
  """A user sampler in 2 processes x 2 devices: each process draws its own batches
  (`fold_in(step key, process_index)`), and the run equals 1 process x 4 devices
  fed both processes' samples (the same sharding; float64 runs, bound = the single
  run's float32 effect, as above); so does a `DeviceSampler` run (each device's
  key from its global index); `hosvd_init` of each process's own samples is
  that of all of them."""
  import socket  # pylint: disable=import-outside-toplevel

  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", _PROCESS_SCRIPT, "multi", str(i), str(port)],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env=env,
    )
    for i in range(2)
  ]
  try:
    single = subprocess.run(
      [sys.executable, "-c", _PROCESS_SCRIPT, "single"],
      capture_output=True,
      text=True,
      env=env,
      timeout=600,
    )
    outputs = [p.communicate(timeout=600) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert single.returncode == 0, single.stderr[-3000:]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  multi = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
  one = json.loads(single.stdout.strip().splitlines()[-1])
  # Disjoint draws: the two processes never see the same key.
  keys = [set(map(tuple, m["keys"])) for m in multi]
  assert keys[0] and not keys[0] & keys[1]
  for run in ("run", "in_step"):  # A host sampler, and features drawn in the step.
    for field in ("parts", "appearances", "loss"):
      one64, one32 = np.asarray(one[run][field]), np.asarray(one[run + "32"][field])
      bound = np.abs(one32 - one64).max()
      for m in multi:
        assert np.abs(np.asarray(m[run][field]) - one64).max() <= bound, (run, field)
  # hosvd_init sums the processes' scatters: the appearances of all the samples.
  one64, one32 = np.asarray(one["hosvd"]), np.asarray(one["hosvd32"])
  for m in multi:
    assert np.abs(np.asarray(m["hosvd"]) - one64).max() <= np.abs(one32 - one64).max()
