"""GAN inversion: the latents (and optionally the features at one layer) of a real image.

`invert(gen, images, key=...)` finds latents whose image is close to `images`
for any `generators.Generator` (W+ codes `[n, num_ws, w_dim]` for the StyleGAN
family, or one W code per image broadcast over the layers with `tie_layers=True`;
z for ProGAN / DCGAN; z and the class embedding for BigGAN), then, with
`layer` and `feature_steps > 0`, fine-tunes the feature map `x [n, h, w, c]`
after `layer` (the one PandA's parts and appearances act on) so that
`gen.resume(x, carry, latents, layer)` reconstructs the image more closely.
Local edits of a real image are then `pj.edit` on `Inversion.features`.

Losses (all `[n]`, one value per image, on the image's channels only: a
generator with extra label channels, like the embedded toy faces, is compared
on its first `images.shape[-1]` channels):
  * `pixel_loss`: mean squared error;
  * `pyramid_loss`: mean absolute difference of the Laplacian pyramids (the
    multi-scale structure term of Bojanowski et al. 2018, "Lap1"), which
    weighs edges and coarse layout at every scale; it needs no downloaded
    network (LPIPS / VGG perceptual losses do).

The optimisation is `optax` (default `adam`) in chunks of `lax.scan` under
`jit`; the generator's parameters are arguments, not constants, so one
compiled program serves every image batch of the same shape. Images in a batch
are independent: the loss is the sum of per-image losses and Adam is
elementwise, so batching changes no image's result.
"""
from __future__ import annotations

import copy
import functools
import json
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

# Module-level defaults, so that repeated calls hit the same compiled program
# (`jit` keys on the optimiser's functions).
LATENT_OPTIMIZER = optax.adam(0.05)
FEATURE_OPTIMIZER = optax.adam(0.01)


class Inversion(NamedTuple):
  """The result of `invert`.

  latents: the generator's latents pytree (as `gen.latents` returns) of the images.
  features: `[n, h, w, c]` after `layer` (fine-tuned when `feature_steps > 0`),
    or None without `layer`.
  carry: what `gen.resume` needs besides the features at `layer` (None without).
  reconstruction: `[n, H, W, ch]` the generator's image, on the input's channels.
  loss_history: `[steps + feature_steps]` the summed loss before each step.
  """
  latents: Any
  features: Optional[jax.Array]
  carry: Any
  reconstruction: jax.Array
  loss_history: jax.Array


# ----------------------------------------------------------------------------- losses


_BLUR = np.array([1.0, 4.0, 6.0, 4.0, 1.0], np.float32) / 16.0


def blur(images):
  """Separable 5-tap binomial blur, reflect padding: `[n, H, W, ch]` -> same shape."""
  n, h, w, ch = images.shape
  x = jnp.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect" if min(h, w) > 2
              else "edge")
  k = jnp.asarray(_BLUR)
  x = sum(k[i] * x[:, i:i + h] for i in range(5))            # [n, H, W + 4, ch]
  return sum(k[i] * x[:, :, i:i + w] for i in range(5))      # [n, H, W, ch]


def downsample(images):
  """Blur then keep every second pixel: `[n, H, W, ch]` -> `[n, ceil(H/2), ceil(W/2), ch]`."""
  return blur(images)[:, ::2, ::2]


def upsample(images, size):
  """Bilinear resize to `size=(H, W)`: `[n, h, w, ch]` -> `[n, H, W, ch]`."""
  return jax.image.resize(images, (images.shape[0],) + tuple(size) + images.shape[3:],
                          method="bilinear")


def laplacian_pyramid(images, levels: int):
  """`levels` band-pass images (finest first) and the low-pass residual.

  Returns a list of `levels + 1` arrays, level k of shape `[n, H/2^k, W/2^k, ch]`;
  summing the upsampled levels gives back `images` exactly.
  """
  pyramid, x = [], images
  for _ in range(levels):
    low = downsample(x)
    pyramid.append(x - upsample(low, x.shape[1:3]))
    x = low
  return pyramid + [x]


def pixel_loss(reconstruction, target):
  """Mean squared error per image: `[n, H, W, ch]` x2 -> `[n]`."""
  return jnp.mean(jnp.square(reconstruction - target), axis=(1, 2, 3))


def pyramid_loss(reconstruction, target, levels: int = 3):
  """Laplacian-pyramid L1 per image (Lap1): `sum_k 2^-k mean |L_k(x) - L_k(y)|` -> `[n]`.

  Level k weighs `2^-k` (Bojanowski et al. 2018 use `2^(-2k)` on sums; on means
  that is `2^-k` per level up to the pixel count). Linear in the difference,
  so the pyramid of the difference is taken once.
  """
  bands = laplacian_pyramid(reconstruction - target, levels)
  return sum((0.5 ** k) * jnp.mean(jnp.abs(b), axis=(1, 2, 3)) for k, b in enumerate(bands))


def reconstruction_loss(reconstruction, target, *, structure_weight: float = 1.0,
                        levels: int = 3):
  """`pixel_loss + structure_weight * pyramid_loss` per image: `[n]`."""
  loss = pixel_loss(reconstruction, target)
  if structure_weight:
    loss = loss + structure_weight * pyramid_loss(reconstruction, target, levels)
  return loss


def psnr(reconstruction, target, data_range: float = 2.0):
  """Peak signal-to-noise ratio per image in dB (`data_range` 2 for images in [-1, 1]): `[n]`."""
  mse = pixel_loss(jnp.asarray(reconstruction, jnp.float32), jnp.asarray(target, jnp.float32))
  return 10.0 * jnp.log10(data_range ** 2 / jnp.maximum(mse, 1e-12))


# ----------------------------------------------------------------------------- checks


def image_shape(gen) -> tuple:
  """`(H, W, ch)` the images of `gen` have on their compared channels.

  `ch` is `gen.config["source"]["rgb_channels"]` when the generator emits
  extra label channels (the embedded toy faces: 3 of 9), else all of them.
  """
  lat = mean_latents(gen, jax.random.PRNGKey(0), num_draws=2)
  out = jax.eval_shape(gen.generate, lat)
  source = gen.config.get("source")
  ch = out.shape[-1]
  if isinstance(source, dict) and "rgb_channels" in source:
    ch = int(source["rgb_channels"])
  return tuple(out.shape[1:3]) + (ch,)


def check_images(gen, images) -> jax.Array:
  """`images` as float32 `[n, H, W, ch]` for `gen`, or a `ValueError` naming the problem."""
  images = np.asarray(images)
  want = image_shape(gen)
  if images.ndim == 3:
    raise ValueError(f"images must be a batch [n, {want[0]}, {want[1]}, {want[2]}]; got one "
                     f"image {images.shape}: add a leading axis")
  if images.ndim != 4 or images.shape[0] < 1:
    raise ValueError(f"images must be [n, {want[0]}, {want[1]}, {want[2]}], got shape "
                     f"{images.shape}")
  if images.shape[1:3] != want[:2]:
    raise ValueError(f"images are {images.shape[1]}x{images.shape[2]}, the generator makes "
                     f"{want[0]}x{want[1]}")
  if images.shape[3] != want[2]:
    raise ValueError(f"images have {images.shape[3]} channel(s), the generator makes "
                     f"{want[2]}")
  if not np.issubdtype(images.dtype, np.floating) and not np.issubdtype(images.dtype,
                                                                         np.integer):
    raise ValueError(f"images must be numbers, got dtype {images.dtype}")
  images = images.astype(np.float32)
  bad = int(np.size(images) - np.count_nonzero(np.isfinite(images)))
  if bad:
    raise ValueError(f"images contain {bad} non-finite value(s) (NaN or Inf)")
  return jnp.asarray(images)


# ----------------------------------------------------------------------------- optimisation


def mean_latents(gen, key, num_draws: int = 256):
  """The mean latents of `num_draws` random z (classes: the uniform mix), leading axis 1.

  For StyleGANs this is (about) `w_avg` broadcast over the layers, for DCGAN /
  ProGAN about z = 0; leaves without a sample axis (BigGAN's truncation) are
  kept as they are.
  """
  z = jax.random.normal(key, (num_draws, gen.z_dim))
  c = None if gen.c_dim == 0 else jnp.full((num_draws, gen.c_dim), 1.0 / gen.c_dim)
  lat = gen.latents(z, c)

  def mean(leaf):
    leaf = jnp.asarray(leaf)
    return jnp.mean(leaf, 0, keepdims=True) if leaf.ndim and leaf.shape[0] == num_draws \
        else leaf
  return jax.tree.map(mean, lat)


def _per_sample(leaf, n: int) -> bool:
  return (jnp.ndim(leaf) >= 1 and jnp.shape(leaf)[0] == n
          and jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating))


def _with_params(gen, params):
  """A shallow copy of `gen` whose parameters are `params` (traced inside jit)."""
  g = copy.copy(gen)
  g.params = params
  return g


def _free_and_fixed(latents, n: int):
  """Splits the latents pytree into the optimised leaves (per-sample float) and the rest."""
  leaves, treedef = jax.tree.flatten(latents)
  mask = [_per_sample(l, n) for l in leaves]
  free = [l for l, m in zip(leaves, mask) if m]
  fixed = [l for l, m in zip(leaves, mask) if not m]
  return free, fixed, (treedef, tuple(mask))


def _merge(free, fixed, structure):
  treedef, mask = structure
  free, fixed = list(free), list(fixed)
  leaves = [free.pop(0) if m else fixed.pop(0) for m in mask]
  return jax.tree.unflatten(treedef, leaves)


def _gen_key(gen):
  """What fixes a generator's program apart from its parameters (passed as arguments)."""
  return type(gen), json.dumps(gen.config, sort_keys=True, default=str)


class _Problem(NamedTuple):
  """Static description of one optimisation (hashable: a `jit` static argument)."""
  gen_key: Any
  structure: Any
  tie: tuple               # per free leaf: broadcast [n, d] over axis 1 to this many layers (0: no)
  layer: Optional[int]
  channels: int
  structure_weight: float
  levels: int


def _expand(free, tie):
  return [jnp.broadcast_to(v[:, None], (v.shape[0], t) + v.shape[1:]) if t else v
          for v, t in zip(free, tie)]


def _latent_loss(free, fixed, params, target, gen, problem: _Problem):
  latents = _merge(_expand(free, problem.tie), fixed, problem.structure)
  out = _with_params(gen, params).generate(latents)[..., :problem.channels]
  return jnp.sum(reconstruction_loss(out, target, structure_weight=problem.structure_weight,
                                     levels=problem.levels))


def _feature_loss(x, carry, latents, params, target, gen, problem: _Problem):
  out = _with_params(gen, params).resume(x, carry, latents, problem.layer)
  return jnp.sum(reconstruction_loss(out[..., :problem.channels], target,
                                     structure_weight=problem.structure_weight,
                                     levels=problem.levels))


@functools.partial(jax.jit, static_argnames=("loss_fn", "optimizer", "steps"))
def _descend(variables, opt_state, args, *, loss_fn, optimizer, steps: int):
  """`steps` optimiser steps of `loss_fn(variables, *args)` in one `lax.scan`.

  Returns `(variables, opt_state, losses [steps])` (the loss before each step).
  """
  def step(carry, _):
    v, s = carry
    loss, grad = jax.value_and_grad(loss_fn)(v, *args)
    updates, s = optimizer.update(grad, s, v)
    return (optax.apply_updates(v, updates), s), loss
  (variables, opt_state), losses = jax.lax.scan(step, (variables, opt_state), None, length=steps)
  return variables, opt_state, losses


class _Bound(NamedTuple):
  """A hashable loss function with the generator and problem bound (jit-cache friendly)."""
  fn: Any
  gen: Any
  problem: _Problem

  def __call__(self, variables, *args):
    return self.fn(variables, *args, self.gen, self.problem)

  # Equal for generators of the same architecture and config: the parameters are
  # arguments of the compiled program, so a reloaded generator reuses it.
  def __hash__(self):
    return hash((self.fn, self.problem))

  def __eq__(self, other):
    return (isinstance(other, _Bound) and self.fn is other.fn
            and self.problem == other.problem)


def _optimise(variables, args, loss_fn, optimizer, steps: int, chunk: int, bar):
  opt_state = optimizer.init(variables)
  history, done = [], 0
  while done < steps:
    todo = min(chunk, steps - done)
    variables, opt_state, losses = _descend(variables, opt_state, args, loss_fn=loss_fn,
                                            optimizer=optimizer, steps=todo)
    history.append(losses)
    done += todo
    if bar is not None:
      bar.update(todo)
      bar.set_postfix(loss=float(losses[-1]))
  return variables, (jnp.concatenate(history) if history else jnp.zeros((0,)))


def invert(gen, images, *, key, steps: int = 300, optimizer=None, layer: Optional[int] = None,
           feature_steps: int = 0, feature_optimizer=None, tie_layers: bool = False,
           structure_weight: float = 1.0, feature_structure_weight: float = 0.0,
           levels: int = 3, num_starts: int = 1,
           init=None, chunk_size: int = 50, progress: bool = True) -> Inversion:
  """Latents (and features at `layer`) of `images` under `gen`.

  Args:
    gen: any `generators.Generator`.
    images: `[n, H, W, ch]` in the generator's range (about [-1, 1]); `ch` the
      generator's image channels (`image_shape(gen)`; 3 for the toy faces).
    key: PRNG key (random starts; the mean latent's draws).
    steps: optimiser steps on the latents.
    optimizer: an `optax.GradientTransformation` for the latents (default
      `optax.adam(0.05)`).
    layer: with it, `Inversion.features` holds the features after `layer`.
    feature_steps: steps fine-tuning those features (needs `layer`).
    feature_optimizer: default `optax.adam(0.01)`.
    tie_layers: optimise one code per image broadcast over the layers (W for
      StyleGANs) instead of the full per-layer pytree (W+).
    structure_weight, levels: the `pyramid_loss` weight and depth (0: pixels only)
      of the latent stage.
    feature_structure_weight: the same weight in the feature stage (default 0:
      pixels only; measured on held-out toy-faces renders, the pyramid term
      costs 3-5 dB of PSNR there, while it adds 0.7 dB in the latent stage).
    num_starts: > 1 also tries `num_starts - 1` random latents and starts each
      image from the one whose image is closest (`reconstruction_loss`).
    init: latents to start from (default: `mean_latents`).
    chunk_size: steps per compiled `lax.scan` (the progress bar's granularity).
    progress: a tqdm bar.

  Returns:
    `Inversion`.

  Raises:
    ValueError: images of another size or channel count, non-finite values, a
      bad `layer`, negative steps.
  """
  for name, value in (("steps", steps), ("feature_steps", feature_steps),
                      ("num_starts", num_starts - 1), ("chunk_size", chunk_size - 1)):
    if not isinstance(value, (int, np.integer)) or value < 0:
      raise ValueError(f"{name} must be an integer >= {0 if name.endswith('steps') else 1}, "
                       f"got {value!r}")
  if feature_steps and layer is None:
    raise ValueError("feature_steps > 0 needs a layer (the features to fine-tune)")
  if layer is not None:
    layer = gen.check_layer(layer)
  target = check_images(gen, images)
  n, channels = target.shape[0], target.shape[-1]
  mean_key, start_key = jax.random.split(key)
  if init is None:
    init = jax.tree.map(lambda l: jnp.broadcast_to(l, (n,) + l.shape[1:])
                        if jnp.ndim(l) and l.shape[0] == 1 else l, mean_latents(gen, mean_key))
  free, fixed, structure = _free_and_fixed(init, n)
  if not free:
    raise ValueError(f"init must be latents of the {n} image(s) (leaves [{n}, ...]); none of "
                     f"its leaves has that leading axis")
  tie = tuple(int(v.shape[1]) if tie_layers and v.ndim == 3 else 0 for v in free)
  free = [v[:, 0] if t else v for v, t in zip(free, tie)]
  problem = _Problem(_gen_key(gen), structure, tie, layer, channels, float(structure_weight),
                     int(levels))
  latent_loss = _Bound(_latent_loss, gen, problem)
  if num_starts > 1:
    free = _best_start(gen, free, fixed, target, problem, start_key, num_starts)
  optimizer = optimizer if optimizer is not None else LATENT_OPTIMIZER
  bar = None
  if progress:
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
    bar = tqdm(total=steps + feature_steps, desc="invert", unit="step", leave=False)
  try:
    free, history = _optimise(free, (fixed, gen.params, target), latent_loss, optimizer,
                              steps, chunk_size, bar)
    latents = _merge(_expand(free, tie), fixed, structure)
    features = carry = None
    if layer is not None:
      features, carry = gen.split(latents, layer)
      if feature_steps:
        feature_loss = _Bound(_feature_loss, gen, problem._replace(
            structure_weight=float(feature_structure_weight)))
        features, more = _optimise(features, (carry, latents, gen.params, target),
                                   feature_loss,
                                   feature_optimizer if feature_optimizer is not None
                                   else FEATURE_OPTIMIZER, feature_steps, chunk_size, bar)
        history = jnp.concatenate([history, more])
      reconstruction = gen.resume(features, carry, latents, layer)
    else:
      reconstruction = gen.generate(latents)
  finally:
    if bar is not None:
      bar.close()
  return Inversion(latents, features, carry, reconstruction[..., :channels], history)


def _best_start(gen, free, fixed, target, problem, key, num_starts):
  """Per image, the start (the given one or a random latent) with the lowest loss."""
  n = target.shape[0]
  best = list(free)
  lat0 = _merge(_expand(free, problem.tie), fixed, problem.structure)
  best_loss = reconstruction_loss(gen.generate(lat0)[..., :problem.channels], target,
                                  structure_weight=problem.structure_weight,
                                  levels=problem.levels)
  for k in range(num_starts - 1):
    z = jax.random.normal(jax.random.fold_in(key, k), (n, gen.z_dim))
    c = None if gen.c_dim == 0 else jnp.full((n, gen.c_dim), 1.0 / gen.c_dim)
    cand, _, _ = _free_and_fixed(gen.latents(z, c), n)
    cand = [v[:, 0] if t else v for v, t in zip(cand, problem.tie)]
    lat = _merge(_expand(cand, problem.tie), fixed, problem.structure)
    loss = reconstruction_loss(gen.generate(lat)[..., :problem.channels], target,
                               structure_weight=problem.structure_weight, levels=problem.levels)
    better = loss < best_loss
    best = [jnp.where(better.reshape((n,) + (1,) * (b.ndim - 1)), c_, b)
            for b, c_ in zip(best, cand)]
    best_loss = jnp.minimum(loss, best_loss)
  return best
