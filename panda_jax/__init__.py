"""panda-jax: PandA (Oldfield et al., TPAMI 2024) in JAX.

Notation (paper symbol <-> code name); features are channels-last, each sample's
`Z_i` of shape [s, c] is the transpose of the paper's mode-3 unfolding Z_i(3) (C x S).

    ==========  ===============  =========
    paper       code             shape
    ==========  ===============  =========
    Z_i(3)^T    features[i]      [s, c]
    A           appearances      [c, r_c]
    P           parts            [s, r_s]
    Lambda_i    coefficients     [r_c, r_s]   (A^T Z_i(3) P)
    P~_i        refined parts    [s, r_s]
    W_i         affinity         [s, s]       (never materialised)
    lambda      step_size
    ==========  ===============  =========

with n samples, s = h * w positions, c channels, r_c appearance and r_s part ranks.

Equation numbers refer to Oldfield et al., "Bilinear Models of Parts and
Appearances in GANs", TPAMI 2024.
"""

# Factorisation (paper Sections 3-4).
from panda_jax.checkpoint import load_factors, save_factors
from panda_jax.decomposition import (
  ORTHOGONALITY_BOUND,
  DeviceSampler,
  appearances_step,
  fit,
  init,
  parts_step,
  run_steps,
  sampled_steps,
  shard_batch,
  update,
)
from panda_jax.state import BlockStep, Factors, FitConfig, FitState
from panda_jax.hosvd import hosvd_init, scatter_finalize, scatter_init, scatter_update
from panda_jax.objective import Unfolded, gradients, loss, orthogonality_error, unfolded
from panda_jax.pgd import LineSearch
from panda_jax.refinement import mutual_knn_graph, refine

# Toolkit (paper Sections 3.3.1, 5).
from panda_jax import generator_ops
from panda_jax.editing import (
  downsample_mask,
  edit,
  edit_many,
  part_weights,
  propose_background,
  remove_object,
  rewrite,
)
from panda_jax.interpret import (
  ConceptMeanState,
  Ranking,
  RankState,
  concept_mean_finalize,
  concept_mean_init,
  concept_mean_update,
  concept_means,
  feature_grid,
  localise,
  rank,
  rank_dataset,
  rank_finalize,
  rank_init,
  rank_update,
  saliency,
  upsample_saliency,
)
from panda_jax.metrics import roir, roir_per_sample

# Inversion of real images (issue 21).
from panda_jax.inversion import Inversion, invert

__all__ = [
  # Factorisation: fit driver, state, functional steps, checkpoints (Sections 3-4).
  "fit",
  "init",
  "update",
  "parts_step",
  "appearances_step",
  "run_steps",
  "sampled_steps",
  "shard_batch",
  "DeviceSampler",
  "Factors",
  "FitConfig",
  "FitState",
  "BlockStep",
  "ORTHOGONALITY_BOUND",
  "LineSearch",
  "load_factors",
  "save_factors",
  # Objective and initialisation (Eqs. 3-5, Section 4.1).
  "loss",
  "gradients",
  "orthogonality_error",
  "Unfolded",
  "unfolded",
  "hosvd_init",
  "scatter_init",
  "scatter_update",
  "scatter_finalize",
  # Refinement (Section 4.2).
  "refine",
  "mutual_knn_graph",
  # Toolkit: editing, interpretation, metrics (Sections 3.3.1, 5; Eqs. 13-18).
  "generator_ops",
  "edit",
  "edit_many",
  "part_weights",
  "downsample_mask",
  "propose_background",
  "remove_object",
  "rewrite",
  "saliency",
  "upsample_saliency",
  "localise",
  "feature_grid",
  "rank",
  "rank_dataset",
  "rank_init",
  "rank_update",
  "rank_finalize",
  "Ranking",
  "RankState",
  "concept_means",
  "concept_mean_init",
  "concept_mean_update",
  "concept_mean_finalize",
  "ConceptMeanState",
  "roir",
  "roir_per_sample",
  # Inversion of real images.
  "invert",
  "Inversion",
]
