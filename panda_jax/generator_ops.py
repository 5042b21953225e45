"""The editing and interpretation ops wired to a generator.

Thin helpers over any object with the generator API of `panda_jax.generators`
(`z_dim`, `c_dim`, `latents(z, c, truncation_psi, truncation_cutoff)`,
`split(latents, layer, noise_key)`, `resume(x, carry, latents, layer,
noise_key)`): the features at `layer` are edited with the pure ops of
`editing` / `interpret` and the rest of the network renders them. Images are
`[n, H, W, ch]` in the generator's raw range.

Sampling is per sample index: sample i has `z_i ~ N(0, I)` drawn with
`fold_in(key, i)` (and, for a conditional generator, a uniformly drawn class
from the same key), so any sample of a streamed pass (e.g. the top of a
ranking) can be regenerated from its index alone, whatever the batch size.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from panda_jax import decomposition, editing
from panda_jax import interpret

if TYPE_CHECKING:
  from panda_jax.generators.base import Generator


def _renderer(
  gen: Generator, latents: Any, layer: int, noise_key: jax.Array | None
) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
  """`(x, render)`: the features at `layer` and `render(x') -> images`."""
  x, carry = gen.split(latents, layer, noise_key=noise_key)
  return x, lambda y: gen.resume(y, carry, latents, layer, noise_key=noise_key)


def edit_images(
  gen: Generator,
  latents: Any,
  layer: int,
  appearances: jax.typing.ArrayLike,
  parts: jax.typing.ArrayLike,
  edits: Sequence[tuple],
  *,
  normalise: str = "minmax",
  noise_key: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Images before and after `editing.edit_many` at `layer` (Sec. 3.3.1).

  Args:
    gen: a generator; latents: its conditioning for n samples.
    layer: the layer the factors were fitted at (static).
    appearances: A, `[c, r_c]`; parts: P, `[s, r_s]` or refined `[n, s, r_s]`.
    edits: `(part, appearance, alpha)` triples, as in `editing.edit_many`.
    normalise: "minmax" or "max", as in `editing.edit_many`.

  Returns:
    `(originals, edited)`, each `[n, H, W, ch]`.
  """
  x, render = _renderer(gen, latents, layer, noise_key)
  return render(x), render(editing.edit_many(x, appearances, parts, edits, normalise=normalise))


def remove_object_images(
  gen: Generator,
  latents: Any,
  layer: int,
  appearances: jax.typing.ArrayLike,
  parts: jax.typing.ArrayLike,
  part: jax.typing.ArrayLike | Sequence[jax.typing.ArrayLike],
  alpha: jax.typing.ArrayLike,
  *,
  background: jax.typing.ArrayLike | None = None,
  mu: jax.typing.ArrayLike | None = None,
  border: int = 1,
  normalise: str = "minmax",
  noise_key: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.typing.ArrayLike]:
  """Images before and after `editing.remove_object` (Sec. 5.1.1).

  Returns:
    `(originals, edited, background)`: the background concept used (proposed
    from these samples' features when `background` is None).
  """
  x, render = _renderer(gen, latents, layer, noise_key)
  edited, background = editing.remove_object(
    x,
    appearances,
    parts,
    part,
    alpha,
    background=background,
    mu=mu,
    border=border,
    normalise=normalise,
  )
  return render(x), render(edited), background


def rewrite_images(
  gen: Generator,
  latents: Any,
  layer: int,
  appearances: jax.typing.ArrayLike,
  source: jax.typing.ArrayLike,
  target: jax.typing.ArrayLike,
  alpha: jax.typing.ArrayLike,
  *,
  keep_residual: bool = True,
  noise_key: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Images before and after `editing.rewrite` (Sec. 5.5, Eqs. 14-16).

  Returns:
    `(originals, rewritten)`, each `[n, H, W, ch]`.
  """
  x, render = _renderer(gen, latents, layer, noise_key)
  return render(x), render(
    editing.rewrite(x, appearances, source, target, alpha, keep_residual=keep_residual)
  )


def saliency_images(
  gen: Generator,
  latents: Any,
  layer: int,
  appearances: jax.typing.ArrayLike,
  *,
  method: str = "bilinear",
  noise_key: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Images with their saliency maps at image size (Sec. 5.1.2).

  Returns:
    `(images [n, H, W, ch], maps [n, s, r_c], upsampled [n, H, W, r_c])`;
    threshold with `interpret.localise(maps or upsampled, mu)`.
  """
  x, render = _renderer(gen, latents, layer, noise_key)
  images = render(x)
  maps = interpret.saliency(x, appearances)
  upsampled = interpret.upsample_saliency(
    maps, interpret.feature_grid(x), images.shape[1:3], method=method
  )
  return images, maps, upsampled


def seed_keys(seed: int) -> tuple[jax.Array, jax.Array]:
  """`(sample_key, fit_key)` of a seed: the sample stream and the fit's key.

  Sample t of the stream `seed` has the latents `sample_latents(gen,
  sample_key, [t])`: what the launchers' `--seed` and a recipe card's seed name.
  """
  sample_key, fit_key = jax.random.split(jax.random.PRNGKey(seed))
  return sample_key, fit_key


def sample_latents(
  gen: Generator,
  key: jax.Array,
  indices: jax.typing.ArrayLike,
  *,
  truncation_psi: float = 1.0,
  truncation_cutoff: int | None = None,
) -> Any:
  """The latents of the samples `indices` (`[b]` ints) of the stream `key`."""
  z, c = _latent_draws(key, jnp.asarray(indices, jnp.int32), z_dim=gen.z_dim, c_dim=gen.c_dim)
  return gen.latents(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff)


@functools.partial(jax.jit, static_argnames=("z_dim", "c_dim"))
def _latent_draws(
  key: jax.Array, indices: jax.Array, *, z_dim: int, c_dim: int
) -> tuple[jax.Array, jax.Array | None]:
  """`z` `[b, z_dim]` and one-hot classes `[b, c_dim]` (None without classes) of samples `indices`.

  One compiled program per batch size (eagerly, each random op compiles its own).
  """
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)
  z = jax.vmap(lambda k: jax.random.normal(k, (z_dim,)))(keys)
  if not c_dim:
    return z, None
  classes = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 1), (), 0, c_dim))(keys)
  return z, jax.nn.one_hot(classes, c_dim)


def sampled_features(
  gen: Generator,
  key: jax.Array,
  layer: int,
  *,
  num_samples: int,
  batch_size: int,
  truncation_psi: float = 1.0,
  truncation_cutoff: int | None = None,
) -> Iterator[jax.Array]:
  """Yields the features `[b, h, w, c]` at `layer` of samples 0 .. num_samples-1."""
  if not (num_samples >= 1 and batch_size >= 1):
    raise ValueError(
      f"num_samples and batch_size must be positive, got {num_samples} and {batch_size}"
    )
  for start in range(0, num_samples, batch_size):
    indices = np.arange(start, min(start + batch_size, num_samples))
    latents = sample_latents(
      gen, key, indices, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff
    )
    yield gen.split(latents, layer)[0]


def feature_sampler(
  gen: Generator,
  layer: int,
  samples_per_device: int,
  *,
  truncation_psi: float = 1.0,
  truncation_cutoff: int | None = None,
) -> decomposition.DeviceSampler:
  """A `DeviceSampler` of `gen`'s features at `layer` for `pj.fit`: latents in, features out.

  Each device draws `samples_per_device` latents from its step key
  (`sample_latents` of indices 0..m-1) and runs `gen.split` to `layer` inside
  the compiled step, on the generator's parameters passed as arguments.
  """
  layer = gen.check_layer(layer)
  if not samples_per_device >= 1:
    raise ValueError(f"samples_per_device must be positive, got {samples_per_device}")
  indices = np.arange(samples_per_device)

  def sample(params: Any, key: jax.Array) -> jax.Array:
    g = gen.with_params(params)
    latents = sample_latents(
      g, key, indices, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff
    )
    return g.split(latents, layer)[0]

  return decomposition.DeviceSampler(sample, gen.params)


def concept_means_sampled(
  gen: Generator, key: jax.Array, layer: int, appearances: jax.typing.ArrayLike, **sampling: Any
) -> jax.Array:
  """mu_k `[r_c]` (Sec. 5.1.2) streamed over sampled latents.

  `sampling`: the keyword arguments of `sampled_features`.
  """
  return interpret.concept_means(sampled_features(gen, key, layer, **sampling), appearances)


def rank_sampled(
  gen: Generator,
  key: jax.Array,
  layer: int,
  appearances: jax.typing.ArrayLike,
  appearance: jax.typing.ArrayLike,
  part: jax.typing.ArrayLike | None = None,
  *,
  k: int = 10,
  **sampling: Any,
) -> interpret.Ranking:
  """Top/bottom-k samples by Eq. (17) / (18), streamed over sampled latents.

  The indices name samples of `key`: `sample_latents(gen, key, indices)` gives
  their latents back. `sampling`: the keyword arguments of `sampled_features`.
  """
  return interpret.rank_dataset(
    sampled_features(gen, key, layer, **sampling), appearances, appearance, part, k=k
  )
