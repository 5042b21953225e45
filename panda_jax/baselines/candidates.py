"""Each method's candidate edits for the locality protocol (Table 2) on a StyleGAN2.

A `Method` is `prepare(latents) -> (candidate -> images)` and its candidates
`[(candidate dict, rois it may be chosen for)]`; `protocol.choose_edits` and
`report_edits` score them. Strengths are in standard deviations of the code a
candidate moves, both signs (`protocol.signed`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np

from panda_jax import editing
from panda_jax import generator_ops
from panda_jax.baselines import latent
from panda_jax.baselines import protocol
from panda_jax.baselines import stylespace


class Method(NamedTuple):
  """A method's candidate edits and how to render them."""

  prepare: Callable  # latents -> (candidate dict -> images [n, H, W, ch])
  candidates: list  # [(candidate dict, rois it may be chosen for)]


def panda(
  gen,
  layer: int,
  factors,
  matches: dict,
  coeff_std,
  strengths: Sequence[float],
  refine: Optional[Callable] = None,
) -> Method:
  """PandA edits `edit(part = the ROI's matched part, appearance j, t * std_j)` at `layer`.

  Args:
    matches: `{roi: part}`; coeff_std: `[r_c]` std of each appearance's coefficient `A^T z`.
    refine: `features -> parts` per sample (None: the global parts).
  """

  def prepare(latents):
    x, carry = gen.split(latents, layer)
    parts = factors.parts if refine is None else refine(x)

    def apply(cand):
      edited = editing.edit(
        x, factors.appearances, parts, cand["part"], cand["appearance"], cand["alpha"]
      )
      return gen.resume(edited, carry, latents, layer)

    return apply

  candidates = []
  for roi, part in matches.items():
    for j in range(factors.appearances.shape[1]):
      for t in protocol.signed(strengths):
        candidates.append(
          (dict(part=int(part), appearance=j, t=t, alpha=float(t * coeff_std[j])), (roi,))
        )
  return Method(prepare, candidates)


def latent_directions(
  gen, ranges_directions, strengths: Sequence[float], rois: Sequence[str]
) -> Method:
  """W-space edits: `[(start, stop, Directions)]`, every direction x signed strength, any ROI."""
  table = {}

  def prepare(latents):
    def apply(cand):
      v = table[(cand["start"], cand["stop"])].directions[cand["direction"]]
      return gen.generate(latent.shift(latents, v, cand["alpha"], cand["start"], cand["stop"]))

    return apply

  candidates = []
  for start, stop, dirs in ranges_directions:
    table[(start, stop)] = dirs
    for k in range(len(dirs.directions)):
      for t in protocol.signed(strengths):
        candidates.append(
          (
            dict(start=start, stop=stop, direction=k, t=t, alpha=float(t * dirs.scales[k])),
            tuple(rois),
          )
        )
  return Method(prepare, candidates)


def stylespace_channels(
  gen,
  latents,
  masks,
  rois: Sequence[str],
  strengths: Sequence[float],
  per_roi: int,
  rgb: Callable = lambda images: images,
) -> Method:
  """The `per_roi` style channels with the largest share of their change inside each ROI.

  Args:
    latents: the samples the channels are scored on; masks: `[len(rois), n, H, W]`.
    rgb: maps generated images to the channels compared (e.g. drops label channels).
  """
  chans, scores = stylespace.locality_scores(gen, latents, masks, max(strengths), rgb=rgb)
  candidates = []
  for r, roi in enumerate(rois):
    for c in np.argsort(-scores[:, r])[:per_roi]:
      ch = chans[c]
      for t in protocol.signed(strengths):
        candidates.append(
          (
            dict(
              conv=ch.conv,
              channel=ch.channel,
              t=t,
              score=float(scores[c, r]),
              alpha=float(t * ch.std),
            ),
            (roi,),
          )
        )

  def prepare(latents):
    return lambda cand: stylespace.generate(
      gen, latents, cand["conv"], cand["channel"], cand["alpha"]
    )

  return Method(prepare, candidates)


def sample_w(gen, key, num: int, batch: int = 4096) -> np.ndarray:
  """`[num, w_dim]` codes of the mapping network (stream `key`, untruncated)."""
  return np.concatenate(
    [
      np.asarray(generator_ops.sample_latents(gen, key, np.arange(i, min(i + batch, num)))[:, 0])
      for i in range(0, num, batch)
    ]
  )
