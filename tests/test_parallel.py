"""pmap data parallelism: a run sharded over 4 simulated CPU devices equals the
single-device run (1e-5 relative). Runs in a subprocess, since the device count
is fixed when JAX starts."""
import json
import os
import subprocess
import sys
import textwrap

_SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    import panda_jax as pj
    from panda_jax.data import synthetic
    assert jax.local_device_count() == 4, jax.local_device_count()
    data = synthetic.planted(jax.random.PRNGKey(0), num_samples=18, channels=16, noise=0.1)
    out = {}
    for name, kw in [("bcd", {}), ("fixed", dict(step_size=5e-5, parts_init="uniform")),
                     ("adam", dict(method="adam", learning_rate=1e-2))]:
      runs = [pj.fit(data.features, 6, 4, steps=40, key=jax.random.PRNGKey(1), num_devices=d,
                     progress=False, **kw) for d in (1, 4)]
      rel = lambda x, y: float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y)))
      out[name] = dict(parts=rel(runs[1].parts, runs[0].parts),
                       appearances=rel(runs[1].appearances, runs[0].appearances),
                       # In units of the float32 resolution of the loss, eps * ||Z||^2.
                       loss_in_eps=float(np.max(np.abs(runs[1].loss_history
                                                       - runs[0].loss_history))
                                         / (np.finfo(np.float32).eps * float(jnp.sum(data.features ** 2)))))
    sampler = lambda key: data.features[jax.random.choice(key, 18, (10,), replace=False)]
    runs = [pj.fit(sampler, 6, 4, steps=10, key=jax.random.PRNGKey(2), num_devices=d,
                   progress=False) for d in (1, 4)]
    out["stochastic"] = dict(parts=float(jnp.max(jnp.abs(runs[1].parts - runs[0].parts))
                                         / jnp.max(jnp.abs(runs[0].parts))))
    print(json.dumps(out))
""")


def test_four_devices_equal_one():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True,
                        env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  for name, errors in result.items():
    for field, err in errors.items():
      assert err <= (16 if field == "loss_in_eps" else 1e-5), (name, field, err)
