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

The optimisation is `optax` (default `adam`). Both stages and the final
evaluation are ONE compiled program (`_chunk`: `chunk_size` steps of
`lax.scan`, each step told by a traced mode whether it updates the latents,
the features or nothing), called once per chunk, plus a small one for the start
(`_begin`: the mean latent, the optimisers' states): compiling is most of a
first inversion on a CPU (issue 21 item 4), and XLA compiles each program's
kernels anew, so the stages share the generator's. The generator's parameters
are arguments, not constants, so the programs serve every image batch of the
same shape, whatever the step counts. Images in a batch are independent: the
loss is the sum of per-image losses and Adam is elementwise, so batching
changes no image's result.
"""

from __future__ import annotations

import functools
import json
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

if TYPE_CHECKING:
  from panda_jax.generators.base import Generator

# Module-level defaults, so that repeated calls hit the same compiled program
# (`jit` keys on the optimiser's functions).
LATENT_OPTIMIZER = optax.adam(0.05)
FEATURE_OPTIMIZER = optax.adam(0.01)
# XLA options of the inversion's two programs on the CPU backend (read at each
# call). LLVM at -O1 instead of the default -O3: on the 2-core CPU of
# docs/benchmarks/invert_cpu.json the 32x32 toy-faces inversion compiles no
# slower and its steps run about twice as fast (WORKSPACE.md, "Inversion and
# editing of real images"). `{}` restores XLA's defaults.
CPU_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


class Inversion(NamedTuple):
  """The result of `invert`.

  latents: the generator's latents pytree (as `gen.latents` returns) of the images.
  features: `[n, h, w, c]` after `layer` (fine-tuned when `feature_steps > 0`),
    or None without `layer`.
  carry: what `gen.resume` needs besides the features at `layer` (None without).
  reconstruction: `[n, H, W, ch]` the generator's image, on the input's channels.
  loss_history: `[steps + feature_steps]` the summed loss before each step.
  latent_reconstruction: `[n, H, W, ch]` the image of `latents` alone (before the
    feature stage; equal to `reconstruction` without one).
  """

  latents: Any
  features: jax.Array | None
  carry: Any
  reconstruction: jax.Array
  loss_history: jax.Array
  latent_reconstruction: jax.Array | None = None


# ----------------------------------------------------------------------------- losses


_BLUR = np.array([1.0, 4.0, 6.0, 4.0, 1.0], np.float32) / 16.0


def blur(images: jax.typing.ArrayLike) -> jax.Array:
  """Separable 5-tap binomial blur, reflect padding: `[n, H, W, ch]` -> same shape."""
  n, h, w, ch = images.shape
  x = jnp.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect" if min(h, w) > 2 else "edge")
  k = jnp.asarray(_BLUR)
  x = sum(k[i] * x[:, i : i + h] for i in range(5))  # [n, H, W + 4, ch]
  return sum(k[i] * x[:, :, i : i + w] for i in range(5))  # [n, H, W, ch]


def downsample(images: jax.typing.ArrayLike) -> jax.Array:
  """Blur then keep every second pixel: `[n, H, W, ch]` -> `[n, ceil(H/2), ceil(W/2), ch]`."""
  return blur(images)[:, ::2, ::2]


def upsample(images: jax.typing.ArrayLike, size: tuple[int, int]) -> jax.Array:
  """Bilinear resize to `size=(H, W)`: `[n, h, w, ch]` -> `[n, H, W, ch]`."""
  return jax.image.resize(
    images, (images.shape[0],) + tuple(size) + images.shape[3:], method="bilinear"
  )


def laplacian_pyramid(images: jax.typing.ArrayLike, levels: int) -> list[jax.Array]:
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


def pixel_loss(reconstruction: jax.typing.ArrayLike, target: jax.typing.ArrayLike) -> jax.Array:
  """Mean squared error per image: `[n, H, W, ch]` x2 -> `[n]`."""
  return jnp.mean(jnp.square(reconstruction - target), axis=(1, 2, 3))


def pyramid_loss(
  reconstruction: jax.typing.ArrayLike, target: jax.typing.ArrayLike, levels: int = 3
) -> jax.Array:
  """Laplacian-pyramid L1 per image (Lap1): `sum_k 2^-k mean |L_k(x) - L_k(y)|` -> `[n]`.

  Level k weighs `2^-k` (Bojanowski et al. 2018 use `2^(-2k)` on sums; on means
  that is `2^-k` per level up to the pixel count). Linear in the difference,
  so the pyramid of the difference is taken once.
  """
  bands = laplacian_pyramid(reconstruction - target, levels)
  return sum((0.5**k) * jnp.mean(jnp.abs(b), axis=(1, 2, 3)) for k, b in enumerate(bands))


# The pyramid loss as two matrix products, for the compiled inversion: the same
# numbers to float32 rounding, but a handful of kernels for XLA to compile where
# the blurs, strided slices and resizes above make about 70 (forward and
# backward), a fifth of the inversion's compile time on the 32x32 toy faces.
_MATRIX_PYRAMID_MAX_SIZE = 128


def _blur_matrix(m: int, mode: str) -> np.ndarray:
  """`[m, m]` the 5-tap `_BLUR` along one axis with `jnp.pad`'s `mode` padding."""
  out = np.zeros((m, m))
  for i in range(m):
    for t, k in enumerate(_BLUR):
      q = i + t - 2
      if mode == "reflect":
        q = -q if q < 0 else (2 * (m - 1) - q if q >= m else q)
      out[i, min(max(q, 0), m - 1)] += k
  return out


def _resize_matrix(m_in: int, m_out: int) -> np.ndarray:
  """`[m_out, m_in]` `jax.image.resize(method="bilinear")` along one axis (its weights)."""
  inv_scale = m_in / m_out
  sample = (np.arange(m_out) + 0.5) * inv_scale - 0.5
  weights = np.maximum(
    0.0, 1.0 - np.abs(sample[None] - np.arange(m_in)[:, None]) / max(inv_scale, 1.0)
  )
  total = weights.sum(0, keepdims=True)
  weights = np.where(
    np.abs(total) > 1000.0 * np.finfo(np.float32).eps, weights / np.where(total != 0, total, 1), 0
  )
  inside = (sample >= -0.5) & (sample <= m_in - 0.5)
  return np.where(inside[None], weights, 0).T


@functools.lru_cache(maxsize=None)
def _pyramid_matrices(h: int, w: int, levels: int) -> tuple[np.ndarray, np.ndarray, tuple]:
  """`(rows [2, r_h, h], cols [2, r_w, w], sizes)` with every band of `laplacian_pyramid`:
  band k of `d [h, w]` is `A_k d A'_k^T - B_k d B'_k^T`, rows = `[stack A_k, stack B_k]`,
  cols = `[stack A'_k, -stack B'_k]`; `sizes` the `(h_k, w_k)` of the levels."""
  sizes, ops = [(h, w)], []
  for _ in range(levels):
    hk, wk = sizes[-1]
    mode = "reflect" if min(hk, wk) > 2 else "edge"
    down = [_blur_matrix(m, mode)[::2] for m in (hk, wk)]
    sizes.append(tuple(d.shape[0] for d in down))
    ops.append((down, [_resize_matrix(d.shape[0], m) for d, m in zip(down, (hk, wk))]))
  per_axis = []
  for axis, size in enumerate((h, w)):
    reach, a_rows, b_rows = np.eye(size), [], []  # reach: [m_k, size], level k of the input.
    for k in range(levels + 1):
      a_rows.append(reach)
      if k < levels:
        down, up = ops[k]
        reach = down[axis] @ reach
        b_rows.append(up[axis] @ reach)
      else:
        b_rows.append(np.zeros_like(reach))
    per_axis.append(np.stack([np.concatenate(a_rows), np.concatenate(b_rows)]))
  rows, cols = per_axis
  cols = cols * np.array([1.0, -1.0])[:, None, None]
  return rows.astype(np.float32), cols.astype(np.float32), tuple(sizes)


def _matrix_pyramid_loss(diff: jax.Array, levels: int) -> jax.Array:
  """`pyramid_loss` of the difference `diff [n, H, W, ch]` by `_pyramid_matrices`: `[n]`.

  All `(level, level')` blocks `[n, r_h, r_w, ch]` in two contractions; the loss
  weighs the diagonal ones (the bands).
  """
  n, h, w, ch = diff.shape
  rows, cols, sizes = _pyramid_matrices(h, w, levels)
  weight = np.zeros((rows.shape[1], cols.shape[1]), np.float32)
  r = c = 0
  for k, (hk, wk) in enumerate(sizes):
    weight[r : r + hk, c : c + wk] = 0.5**k / (hk * wk * ch)
    r, c = r + hk, c + wk
  precision = jax.lax.Precision.HIGHEST
  x = jnp.einsum(
    "psh,nhwc->npswc", jnp.asarray(rows, diff.dtype), diff, precision=precision
  )  # [n, 2, r_h, w, ch]
  x = jnp.einsum(
    "npswc,ptw->nstc", x, jnp.asarray(cols, diff.dtype), precision=precision
  )  # [n, r_h, r_w, ch]
  return jnp.einsum("nstc,st->n", jnp.abs(x), jnp.asarray(weight, diff.dtype), precision=precision)


def _structure_loss(reconstruction: jax.Array, target: jax.Array, levels: int) -> jax.Array:
  """`pyramid_loss`, by `_matrix_pyramid_loss` for images up to 128 pixels a side."""
  if max(reconstruction.shape[1:3]) <= _MATRIX_PYRAMID_MAX_SIZE:
    return _matrix_pyramid_loss(reconstruction - target, levels)
  return pyramid_loss(reconstruction, target, levels)


def reconstruction_loss(
  reconstruction: jax.typing.ArrayLike,
  target: jax.typing.ArrayLike,
  *,
  structure_weight: float = 1.0,
  levels: int = 3,
) -> jax.Array:
  """`pixel_loss + structure_weight * pyramid_loss` per image: `[n]`."""
  loss = pixel_loss(reconstruction, target)
  if structure_weight:
    loss = loss + structure_weight * pyramid_loss(reconstruction, target, levels)
  return loss


@jax.jit
def psnr(
  reconstruction: jax.typing.ArrayLike, target: jax.typing.ArrayLike, data_range: float = 2.0
) -> jax.Array:
  """Peak signal-to-noise ratio per image in dB (`data_range` 2 for images in [-1, 1]): `[n]`."""
  mse = pixel_loss(jnp.asarray(reconstruction, jnp.float32), jnp.asarray(target, jnp.float32))
  return 10.0 * jnp.log10(data_range**2 / jnp.maximum(mse, 1e-12))


# ----------------------------------------------------------------------------- checks


def image_shape(gen: Generator) -> tuple[int, int, int]:
  """`(H, W, ch)` the images of `gen` have on their compared channels.

  `ch` is `gen.config["source"]["rgb_channels"]` when the generator emits
  extra label channels (the embedded toy faces: 3 of 9), else all of them.
  """
  out = jax.eval_shape(
    lambda k: gen.generate(mean_latents(gen, k, num_draws=2)), jax.random.PRNGKey(0)
  )
  source = gen.config.get("source")
  ch = out.shape[-1]
  if isinstance(source, dict) and "rgb_channels" in source:
    ch = int(source["rgb_channels"])
  return tuple(out.shape[1:3]) + (ch,)


def check_images(gen: Generator, images: jax.typing.ArrayLike) -> jax.Array:
  """`images` as float32 `[n, H, W, ch]` for `gen`, or a `ValueError` naming the problem."""
  images = np.asarray(images)
  want = image_shape(gen)
  if images.ndim == 3:
    raise ValueError(
      f"images must be a batch [n, {want[0]}, {want[1]}, {want[2]}]; got one "
      f"image {images.shape}: add a leading axis"
    )
  if images.ndim != 4 or images.shape[0] < 1:
    raise ValueError(
      f"images must be [n, {want[0]}, {want[1]}, {want[2]}], got shape {images.shape}"
    )
  if images.shape[1:3] != want[:2]:
    raise ValueError(
      f"images are {images.shape[1]}x{images.shape[2]}, the generator makes {want[0]}x{want[1]}"
    )
  if images.shape[3] != want[2]:
    raise ValueError(f"images have {images.shape[3]} channel(s), the generator makes {want[2]}")
  if not np.issubdtype(images.dtype, np.floating) and not np.issubdtype(images.dtype, np.integer):
    raise ValueError(f"images must be numbers, got dtype {images.dtype}")
  images = images.astype(np.float32)
  bad = int(np.size(images) - np.count_nonzero(np.isfinite(images)))
  if bad:
    raise ValueError(f"images contain {bad} non-finite value(s) (NaN or Inf)")
  return jnp.asarray(images)


# ----------------------------------------------------------------------------- optimisation


def mean_latents(gen: Generator, key: jax.Array, num_draws: int = 256) -> Any:
  """The mean latents of `num_draws` random z (classes: the uniform mix), leading axis 1.

  For StyleGANs this is (about) `w_avg` broadcast over the layers, for DCGAN /
  ProGAN about z = 0; leaves without a sample axis (BigGAN's truncation) are
  kept as they are.
  """
  z = jax.random.normal(key, (num_draws, gen.z_dim))
  c = None if gen.c_dim == 0 else jnp.full((num_draws, gen.c_dim), 1.0 / gen.c_dim)
  lat = gen.latents(z, c)

  def mean(leaf: jax.typing.ArrayLike) -> jax.Array:
    leaf = jnp.asarray(leaf)
    return jnp.mean(leaf, 0, keepdims=True) if leaf.ndim and leaf.shape[0] == num_draws else leaf

  return jax.tree.map(mean, lat)


def _per_sample(leaf: Any, n: int) -> bool:
  """Whether a leaf (array, tracer or `jax.ShapeDtypeStruct`) is a per-sample float `[n, ...]`."""
  leaf = leaf if hasattr(leaf, "shape") else np.asarray(leaf)
  return len(leaf.shape) >= 1 and leaf.shape[0] == n and jnp.issubdtype(leaf.dtype, jnp.floating)


def _free_and_fixed(latents: Any, n: int) -> tuple[list, list, tuple]:
  """Splits the latents pytree into the optimised leaves (per-sample float) and the rest."""
  leaves, treedef = jax.tree.flatten(latents)
  mask = [_per_sample(l, n) for l in leaves]
  free = [l for l, m in zip(leaves, mask) if m]
  fixed = [l for l, m in zip(leaves, mask) if not m]
  return free, fixed, (treedef, tuple(mask))


def _merge(free: list, fixed: list, structure: tuple) -> Any:
  treedef, mask = structure
  free, fixed = list(free), list(fixed)
  leaves = [free.pop(0) if m else fixed.pop(0) for m in mask]
  return jax.tree.unflatten(treedef, leaves)


def _gen_key(gen: Generator) -> tuple[type, str]:
  """What fixes a generator's program apart from its parameters (passed as arguments)."""
  return type(gen), json.dumps(gen.config, sort_keys=True, default=str)


class _Plan(NamedTuple):
  """Static description of one inversion (hashable: part of a `jit` static argument)."""

  gen_key: Any
  structure: Any
  tie: tuple  # per free leaf: broadcast [n, d] over axis 1 to this many layers (0: no)
  layer: int | None
  channels: int
  structure_weight: float
  feature_structure_weight: float
  levels: int
  optimizer: Any
  feature_optimizer: Any
  num_starts: int


class _Spec(NamedTuple):
  """The generator and the plan, hashed and compared by the plan only.

  Generators of the same architecture and config share the compiled programs:
  their parameters are arguments, so a reloaded generator reuses them.
  """

  gen: Any
  plan: _Plan

  def __hash__(self) -> int:
    return hash(self.plan)

  def __eq__(self, other: object) -> bool:
    return isinstance(other, _Spec) and self.plan == other.plan


class _State(NamedTuple):
  """What one step of `_chunk` carries (`n` images, features `[n, h, w, c]` at `layer`).

  free: the optimised latent leaves (`[n, ...]`; `[n, d]` for tied layers).
  latent_opt: the latent optimiser's state.
  delta: `[n, h, w, c]` the feature stage's change of the features (`()` without `layer`).
  feature_opt: the feature optimiser's state (`()` without `layer`).
  base: `(x [n, h, w, c], carry)` the features `gen.split` gave for the latents
    the feature stage starts from (`()` without `layer`).
  image: `[n, H, W, ch]` the image of the last evaluated step.
  latent_image: `[n, H, W, ch]` the image of the latents alone at the last step
    that evaluated them without feature changes.
  """

  free: Any
  latent_opt: Any
  delta: Any
  feature_opt: Any
  base: Any
  image: jax.Array
  latent_image: jax.Array


# What a step of `_chunk` does (its `modes [chunk]`); `refresh [chunk]` says whether
# it takes the features from `gen.split` of the current latents (with their gradient)
# or from `_State.base`.
_LATENT, _FEATURE, _EVALUATE, _SKIP = 0, 1, 2, 3


def _expand(free: list, tie: tuple) -> list:
  return [
    jnp.broadcast_to(v[:, None], (v.shape[0], t) + v.shape[1:]) if t else v
    for v, t in zip(free, tie)
  ]


def _image_and_loss(
  free: list,
  delta: Any,
  stored: Any,
  refresh: jax.Array,
  weight: jax.Array,
  fixed: list,
  params: Any,
  target: jax.Array,
  gen: Generator,
  plan: _Plan,
) -> tuple[jax.Array, tuple[jax.Array, Any]]:
  """The summed loss of one evaluation, with `(image [n, H, W, ch], base)` as aux.

  With `layer`, the image is `gen.resume(x + delta, carry, latents, layer)` where
  `(x, carry)` is `gen.split(latents, layer)` when `refresh` (a traced bool: the
  gradient then reaches the latents through both) else `stored`; `resume(split(l))`
  is `generate(l)` (`generators.base`).
  """
  latents = _merge(_expand(free, plan.tie), fixed, plan.structure)
  g = gen.with_params(params)
  base = stored
  if plan.layer is None:
    out = g.generate(latents)
  else:
    base = jax.lax.cond(refresh, lambda l: g.split(l, plan.layer), lambda _: stored, latents)
    x, carry = base
    out = g.resume(x + delta, carry, latents, plan.layer)
  out = out[..., : plan.channels]
  loss = pixel_loss(out, target)
  if plan.structure_weight or plan.feature_structure_weight:
    loss = loss + weight * _structure_loss(out, target, plan.levels)
  return jnp.sum(loss), (out, base)


def _step(
  state: _State,
  xs: tuple[jax.Array, jax.Array],
  fixed: list,
  params: Any,
  target: jax.Array,
  spec: _Spec,
) -> tuple[_State, jax.Array]:
  """One step: evaluate at `state`, then update the latents (`_LATENT`), the features
  (`_FEATURE`) or nothing (`_EVALUATE`); `_SKIP` pads a chunk. Returns `(state, loss)`."""
  mode, refresh = xs
  plan = spec.plan

  def run(state: _State) -> tuple[_State, jax.Array]:
    weight = jnp.where(mode == _FEATURE, plan.feature_structure_weight, plan.structure_weight)
    (loss, (image, base)), (g_free, g_delta) = jax.value_and_grad(
      _image_and_loss, argnums=(0, 1), has_aux=True
    )(state.free, state.delta, state.base, refresh, weight, fixed, params, target, spec.gen, plan)
    keep = lambda on, new, old: jax.tree.map(lambda a, b: jnp.where(on, a, b), new, old)
    updates, latent_opt = plan.optimizer.update(g_free, state.latent_opt, state.free)
    latent = mode == _LATENT
    free = keep(latent, optax.apply_updates(state.free, updates), state.free)
    latent_opt = keep(latent, latent_opt, state.latent_opt)
    delta, feature_opt = state.delta, state.feature_opt
    if plan.layer is not None:
      # Adam on `delta` from 0 is Adam on the features from `x`; the optimiser sees
      # the features as its parameters (weight decay), its `init` their change.
      updates, new_opt = plan.feature_optimizer.update(g_delta, feature_opt, base[0] + delta)
      feature = mode == _FEATURE
      delta = keep(feature, optax.apply_updates(delta, updates), delta)
      feature_opt = keep(feature, new_opt, feature_opt)
      latent_image = keep(refresh, image, state.latent_image)
    else:
      latent_image = image
    return _State(free, latent_opt, delta, feature_opt, base, image, latent_image), loss

  return jax.lax.cond(mode == _SKIP, lambda s: (s, jnp.zeros((), jnp.float32)), run, state)


def _chunk(
  state: _State,
  modes: jax.Array,
  refresh: jax.Array,
  fixed: list,
  params: Any,
  target: jax.Array,
  *,
  spec: _Spec,
) -> tuple[_State, jax.Array, Any, jax.Array | None]:
  """`len(modes)` steps of `_step` in one `lax.scan`: the one program of an inversion.

  modes, refresh: `[chunk]` int32 / bool. Returns `(state, losses [chunk], latents,
  features [n, h, w, c] or None)`: the loss evaluated at each step and the result
  so far (the latents pytree, `base x + delta`).
  """
  step = functools.partial(_step, fixed=fixed, params=params, target=target, spec=spec)
  state, losses = jax.lax.scan(step, state, (modes, refresh))
  plan = spec.plan
  latents = _merge(_expand(state.free, plan.tie), fixed, plan.structure)
  features = None if plan.layer is None else state.base[0] + state.delta
  return state, losses, latents, features


def _begin(
  key: jax.Array, init: Any, params: Any, target: jax.Array, *, spec: _Spec
) -> tuple[_State, list]:
  """The first `_State` and the fixed latent leaves: the starting latents (`init`,
  or `mean_latents` of `split(key)[0]` when None; with `num_starts > 1` the best of
  them and `num_starts - 1` random latents per image), the optimisers' states, zeros."""
  plan, gen = spec.plan, spec.gen.with_params(params)
  n = target.shape[0]
  mean_key, start_key = jax.random.split(key)
  if init is None:
    init = jax.tree.map(
      lambda l: jnp.broadcast_to(l, (n,) + l.shape[1:]) if jnp.ndim(l) and l.shape[0] == 1 else l,
      mean_latents(gen, mean_key),
    )
  free, fixed, _ = _free_and_fixed(init, n)
  free = [v[:, 0] if t else v for v, t in zip(free, plan.tie)]
  if plan.num_starts > 1:
    free = _best_start(gen, free, fixed, target, plan, start_key, plan.num_starts)
  delta = feature_opt = base = ()
  if plan.layer is not None:
    latents = _merge(_expand(free, plan.tie), fixed, plan.structure)
    base = jax.tree.map(
      lambda s: jnp.zeros(s.shape, s.dtype),
      jax.eval_shape(lambda l: gen.split(l, plan.layer), latents),
    )
    delta = jnp.zeros_like(base[0])
    feature_opt = plan.feature_optimizer.init(delta)
  image = jnp.zeros(target.shape, jnp.float32)
  state = _State(free, plan.optimizer.init(free), delta, feature_opt, base, image, image)
  return state, fixed


@functools.lru_cache(maxsize=None)
def _jitted(fn: Callable[..., Any], backend: str, options: tuple) -> Callable[..., Any]:
  """`fn` under `jit` (static `spec`), compiled with `options` on the CPU backend."""
  return jax.jit(
    fn,
    static_argnames=("spec",),
    compiler_options=dict(options) if backend == "cpu" and options else None,
  )


def _compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
  return _jitted(fn, jax.default_backend(), tuple(sorted(CPU_COMPILER_OPTIONS.items())))


def _schedule(
  steps: int, feature_steps: int, features: bool, chunk: int
) -> tuple[np.ndarray, np.ndarray]:
  """`(modes, refresh)` `[k * chunk]`: `steps` latent steps, `feature_steps` feature
  steps (the first takes the features of the final latents), one evaluation of the
  result, then `_SKIP` up to a whole number of chunks."""
  modes = [_LATENT] * steps + [_FEATURE] * feature_steps + [_EVALUATE]
  refresh = [True] * steps + [True] + [False] * feature_steps
  if not features:
    refresh = [True] * len(modes)
  elif feature_steps == 0:
    refresh[-1] = True
  size = -(-len(modes) // chunk) * chunk
  pad = size - len(modes)
  return (
    np.asarray(modes + [_SKIP] * pad, np.int32),
    np.asarray(refresh[: len(modes)] + [False] * pad, bool),
  )


def invert(
  gen: Generator,
  images: jax.typing.ArrayLike,
  *,
  key: jax.Array,
  steps: int = 300,
  optimizer: optax.GradientTransformation | None = None,
  layer: int | None = None,
  feature_steps: int = 0,
  feature_optimizer: optax.GradientTransformation | None = None,
  tie_layers: bool = False,
  structure_weight: float = 1.0,
  feature_structure_weight: float = 0.0,
  levels: int = 3,
  num_starts: int = 1,
  init: Any = None,
  chunk_size: int = 50,
  progress: bool = True,
) -> Inversion:
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
    chunk_size: steps per call of the compiled program (the progress bar's
      granularity); every inversion with the same generator, batch shape and
      settings runs the same program whatever its step counts.
    progress: a tqdm bar.

  Returns:
    `Inversion`.

  Raises:
    ValueError: images of another size or channel count, non-finite values, a
      bad `layer`, negative steps.
  """
  for name, value in (
    ("steps", steps),
    ("feature_steps", feature_steps),
    ("num_starts", num_starts - 1),
    ("chunk_size", chunk_size - 1),
  ):
    if not isinstance(value, (int, np.integer)) or value < 0:
      raise ValueError(
        f"{name} must be an integer >= {0 if name.endswith('steps') else 1}, got {value!r}"
      )
  if feature_steps and layer is None:
    raise ValueError("feature_steps > 0 needs a layer (the features to fine-tune)")
  if layer is not None:
    layer = gen.check_layer(layer)
  target = check_images(gen, images)
  n, channels = target.shape[0], target.shape[-1]
  shapes = jax.eval_shape(lambda k: mean_latents(gen, k) if init is None else init, key)
  if init is None:
    shapes = jax.tree.map(
      lambda s: (
        jax.ShapeDtypeStruct((n,) + s.shape[1:], s.dtype) if s.shape and s.shape[0] == 1 else s
      ),
      shapes,
    )
  free, _, structure = _free_and_fixed(shapes, n)
  if not free:
    raise ValueError(
      f"init must be latents of the {n} image(s) (leaves [{n}, ...]); none of "
      f"its leaves has that leading axis"
    )
  tie = tuple(int(v.shape[1]) if tie_layers and len(v.shape) == 3 else 0 for v in free)
  plan = _Plan(
    _gen_key(gen),
    structure,
    tie,
    layer,
    channels,
    float(structure_weight),
    float(feature_structure_weight),
    int(levels),
    optimizer if optimizer is not None else LATENT_OPTIMIZER,
    feature_optimizer if feature_optimizer is not None else FEATURE_OPTIMIZER,
    int(num_starts),
  )
  spec = _Spec(gen, plan)
  state, fixed = _compiled(_begin)(key, init, gen.params, target, spec=spec)
  modes, refresh = _schedule(steps, feature_steps, layer is not None, chunk_size)
  bar = None
  if progress:
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

    bar = tqdm(total=steps + feature_steps, desc="invert", unit="step", leave=False)
  history = []
  try:
    for start in range(0, len(modes), chunk_size):
      part = slice(start, start + chunk_size)
      state, losses, latents, features = _compiled(_chunk)(
        state, modes[part], refresh[part], fixed, gen.params, target, spec=spec
      )
      done = modes[part] <= _FEATURE
      history.append(np.asarray(losses)[done])
      if bar is not None and done.any():
        bar.update(int(done.sum()))
        bar.set_postfix(loss=float(history[-1][-1]))
  finally:
    if bar is not None:
      bar.close()
  carry = None if layer is None else state.base[1]
  return Inversion(
    latents, features, carry, state.image, jnp.asarray(np.concatenate(history)), state.latent_image
  )


def _best_start(
  gen: Generator,
  free: list,
  fixed: list,
  target: jax.Array,
  plan: _Plan,
  key: jax.Array,
  num_starts: int,
) -> list:
  """Per image, the start (the given one or a random latent) with the lowest loss."""
  n = target.shape[0]

  def loss_of(cand: list) -> jax.Array:
    lat = _merge(_expand(cand, plan.tie), fixed, plan.structure)
    return reconstruction_loss(
      gen.generate(lat)[..., : plan.channels],
      target,
      structure_weight=plan.structure_weight,
      levels=plan.levels,
    )

  best, best_loss = list(free), loss_of(free)
  for k in range(num_starts - 1):
    z = jax.random.normal(jax.random.fold_in(key, k), (n, gen.z_dim))
    c = None if gen.c_dim == 0 else jnp.full((n, gen.c_dim), 1.0 / gen.c_dim)
    cand, _, _ = _free_and_fixed(gen.latents(z, c), n)
    cand = [v[:, 0] if t else v for v, t in zip(cand, plan.tie)]
    loss = loss_of(cand)
    better = loss < best_loss
    best = [
      jnp.where(better.reshape((n,) + (1,) * (b.ndim - 1)), c_, b) for b, c_ in zip(best, cand)
    ]
    best_loss = jnp.minimum(loss, best_loss)
  return best
