"""Baselines for the locality comparison of Table 2 (paper Section 5.2.1).

Re-implemented from their papers' maths, for StyleGAN2-family generators with
W+ latents `[n, num_ws, w_dim]` (`panda_jax.generators.stylegan2`):

  * `ganspace`: PCA of W (Harkonen et al., NeurIPS 2020); edits along the
    principal directions on all or a range of the W+ codes.
  * `sefa`: closed-form factorisation (Shen & Zhou, CVPR 2021): eigenvectors of
    `K K^T` for the column-normalised style (modulation) kernels `K` of some
    layers.
  * `stylespace`: single style-channel edits (Wu et al., CVPR 2021), channels
    ranked by the share of the change they make inside a region of interest.
  * `protocol`: the shared locality protocol (splits, the ROI-change threshold
    rule, the selection by smallest ROIR), and its generator-agnostic
    `choose_edits` / `report_edits`; `candidates`: each method's candidate
    edits for it (PandA, W directions, style channels).

Also, for any generator's feature maps: `kmeans` (k-means of the activations as
parts, per sample or pooled; issue 17), and for DCGAN-style generators without
W space, GANSpace on the first layer's output and SeFa on the first layer's
weight (`ganspace.fit`, `sefa.fit` with `sefa.first_layer_kernel`).
"""

from panda_jax.baselines import candidates
from panda_jax.baselines import ganspace
from panda_jax.baselines import kmeans
from panda_jax.baselines import latent
from panda_jax.baselines import protocol
from panda_jax.baselines import sefa
from panda_jax.baselines import stylespace

__all__ = ["candidates", "ganspace", "kmeans", "latent", "protocol", "sefa", "stylespace"]
