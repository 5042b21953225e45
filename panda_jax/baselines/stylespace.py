"""A StyleSpace-style baseline (Wu et al., CVPR 2021): single style-channel edits.

StyleGAN2's conv `convs_i` modulates its input channels by the styles
`s_i = ws[:, i] K_i + b_i` (`[n, c_i]`). Moving one channel `s_i[:, j]` by
`delta` for every sample is adding `delta` to the bias `b_i[j]`, so an edit is
a generator with one bias entry changed. Channels are ranked per region of
interest by the mean share of the image change they make inside it
(`protocol.inside_share`), the role of StyleSpace's gradient-map localisation
scores.
"""

from __future__ import annotations

import copy
from typing import Callable, NamedTuple

import jax.numpy as jnp
import numpy as np

from panda_jax.baselines import protocol


class Channel(NamedTuple):
  conv: int  # i: the modulated conv `convs_i` (reads W+ code i).
  channel: int  # j: its input channel.
  std: float  # standard deviation of `s_i[:, j]` over samples.


def num_convs(params) -> int:
  return sum(name.startswith("convs_") for name in params["synthesis"])


def styles(params, ws, conv: int):
  """`[n, c_i]` styles of `convs_{conv}` for W+ codes `ws [n, num_ws, w_dim]`."""
  affine = params["synthesis"][f"convs_{conv}"]["affine"]
  return jnp.asarray(ws)[:, conv] @ affine["kernel"] + affine["bias"]


def channels(params, ws) -> list[Channel]:
  """Every style channel of every modulated conv, with its spread over `ws`."""
  out = []
  for i in range(num_convs(params)):
    std = np.asarray(jnp.std(styles(params, ws, i), axis=0))
    out += [Channel(i, j, float(s)) for j, s in enumerate(std)]
  return out


def shifted_params(params, conv: int, channel: int, delta):
  """`params` with `delta` added to style channel `channel` of `convs_{conv}` (a new tree)."""
  name = f"convs_{conv}"
  if name not in params["synthesis"]:
    raise ValueError(f"no modulated conv {name} (the generator has {num_convs(params)})")
  layer = params["synthesis"][name]
  bias = jnp.asarray(layer["affine"]["bias"])
  if not 0 <= channel < bias.shape[0]:
    raise ValueError(f"channel {channel} out of range [0, {bias.shape[0]}) in {name}")
  affine = {**layer["affine"], "bias": bias.at[channel].add(delta)}
  synthesis = {**params["synthesis"], name: {**layer, "affine": affine}}
  return {**params, "synthesis": synthesis}


def with_params(gen, params):
  """A shallow copy of the generator `gen` running on `params` (same jitted code)."""
  other = copy.copy(gen)
  other.params = params
  return other


def generate(gen, latents, conv: int, channel: int, delta):
  """Images `[n, H, W, ch]` with style channel `(conv, channel)` moved by `delta`."""
  return with_params(gen, shifted_params(gen.params, conv, channel, delta)).generate(latents)


def locality_scores(
  gen,
  latents,
  masks,
  strength: float,
  rgb: Callable = lambda images: images[..., :3],
  candidates=None,
):
  """Mean share of each channel edit's change inside each region: `[k, r]`.

  Args:
    gen: a StyleGAN2 generator; latents: W+ codes `[n, num_ws, w_dim]`.
    masks: `[r, n, H, W]` regions of interest in [0, 1].
    strength: edits move a channel by `strength * std`.
    rgb: the displayed channels of the generator's images.
    candidates: the channels to score (default: `channels(gen.params, latents)`).

  Returns:
    `(channels, scores [k, r])`.
  """
  masks = jnp.asarray(masks)
  if masks.ndim != 4:
    raise ValueError(f"masks must be [r, n, H, W], got shape {tuple(masks.shape)}")
  candidates = channels(gen.params, latents) if candidates is None else candidates
  originals = rgb(gen.generate(latents))
  scores = []
  for ch in candidates:
    edited = rgb(generate(gen, latents, ch.conv, ch.channel, strength * ch.std))
    scores.append([float(jnp.mean(protocol.inside_share(originals, edited, m))) for m in masks])
  return candidates, np.asarray(scores, np.float64).reshape(len(candidates), masks.shape[0])
