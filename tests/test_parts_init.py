"""The "fibres" parts start (`parts_init.fibres`): planted kinds of fibre are
recovered, padding samples are ignored, and sharding over 4 devices gives the
same start as one device."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import panda_jax as pj
from panda_jax import parts_init


def _planted_kinds(key, num_samples=40, side=6, channels=12, kinds=3, swap=0.2, noise=0.05):
  """Features `[n, s, c]` whose fibre at x is of kind `layout[x]` (else, with
  probability `swap`, of a random kind), a kind being a mean fibre plus noise.

  Returns `(features, layout [s], kind_means [kinds, c])`.
  """
  s = side * side
  k_mean, k_swap, k_kind, k_noise = jax.random.split(key, 4)
  means = 3.0 * jax.random.normal(k_mean, (kinds, channels))
  layout = jnp.arange(s) * kinds // s  # Bands of positions.
  other = jax.random.randint(k_kind, (num_samples, s), 0, kinds)
  kind = jnp.where(jax.random.uniform(k_swap, (num_samples, s)) < swap, other, layout)
  features = means[kind] + noise * jax.random.normal(k_noise, (num_samples, s, channels))
  return features, layout, means


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fibres_recovers_planted_kinds(seed):
  features, layout, means = _planted_kinds(jax.random.PRNGKey(seed))
  z = jnp.swapaxes(features, 1, 2)  # [n, c, s]
  parts = parts_init.fibres(jax.random.PRNGKey(10 + seed), z, 3)
  assert parts.shape == (36, 3) and bool(jnp.all(parts >= 0))
  np.testing.assert_allclose(jnp.linalg.norm(parts, axis=0), 1.0, rtol=1e-6)  # 3 flops, f32.
  # Each part peaks on its band: the argmax over parts is the layout up to a
  # permutation (the kinds are far apart: 3 sigma means, 0.05 noise, so k-means
  # labels every fibre by its kind and part k at x is the share of samples whose
  # fibre there is of kind k: about 0.8 + 0.2/3 on the band, 0.2/3 off it).
  winner = np.asarray(jnp.argmax(parts, axis=1))
  mapping = {int(w): int(l) for w, l in zip(winner, np.asarray(layout))}
  assert len(mapping) == 3 and all(
    mapping[int(w)] == int(l) for w, l in zip(winner, np.asarray(layout))
  )
  # The shares themselves: exact counts over 40 samples, then a unit norm.
  kinds = np.asarray(jnp.argmin(jnp.sum((features[:, :, None] - means) ** 2, -1), -1))
  share = np.stack([(kinds == k).mean(0) for k in range(3)], 1)
  share /= np.linalg.norm(share, axis=0)
  order = [next(w for w, l in mapping.items() if l == k) for k in range(3)]
  np.testing.assert_allclose(np.asarray(parts)[:, order], share, atol=1e-6)


def test_fibres_ignores_padding_samples():
  features, _, _ = _planted_kinds(jax.random.PRNGKey(3))
  z = jnp.swapaxes(features, 1, 2)
  padded = jnp.concatenate([z, jnp.zeros((5,) + z.shape[1:], z.dtype)])
  key = jax.random.PRNGKey(4)
  # Zero samples carry no weight in k-means++ seeding, Lloyd means or shares; the
  # seed subsample strides over n*s fibres, so keep it the whole set here.
  np.testing.assert_allclose(
    parts_init.fibres(key, padded, 3, seed_points=10**6),
    parts_init.fibres(key, z, 3, seed_points=10**6),
    atol=1e-6,
  )


def test_fit_accepts_fibres_start_and_names_starts():
  features, _, _ = _planted_kinds(jax.random.PRNGKey(5))
  factors = pj.fit(
    features, 4, 3, steps=3, key=jax.random.PRNGKey(0), parts_init="fibres", progress=False
  )
  assert factors.parts.shape == (36, 3) and bool(jnp.all(factors.parts >= 0))
  with pytest.raises(ValueError, match="parts_init must be one of"):
    pj.fit(features, 4, 3, steps=1, key=jax.random.PRNGKey(0), parts_init="fibre", progress=False)


_SHARDED = textwrap.dedent("""
    import json
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp, numpy as np
    import panda_jax as pj
    from test_parts_init import _planted_kinds
    assert jax.local_device_count() == 4
    features = _planted_kinds(jax.random.PRNGKey(6), num_samples=18)[0].astype(jnp.float64)
    one, four = [pj.fit(features, 4, 3, steps=0, key=jax.random.PRNGKey(1), parts_init="fibres",
                        num_devices=d, progress=False) for d in (1, 4)]
    print(json.dumps(float(jnp.max(jnp.abs(one.parts - four.parts)))))
""")


def test_fibres_start_sharded_equals_one_device():
  # 18 samples over 4 devices: 2 padding samples. The labels are discrete and the
  # kinds far apart, so both runs label every fibre alike; the shares are then
  # exact counts divided alike, and only the unit-norm scaling may round: a few
  # float64 ulps.
  env = dict(
    os.environ,
    XLA_FLAGS="--xla_force_host_platform_device_count=4",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]),
  )
  out = subprocess.run(
    [sys.executable, "-c", _SHARDED],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert json.loads(out.stdout.strip().splitlines()[-1]) <= 1e-14
