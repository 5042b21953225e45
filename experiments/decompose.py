"""Learns the parts and appearances of a generator's feature maps (Algorithm 1).

    python -m experiments.decompose --out=/tmp/panda     # the embedded toy faces
    python -m experiments.decompose --generator=CONVERTED_DIR --layer=5 --out=...

Writes `OUT/factors/` (`pj.save_factors`), `OUT/parts.png` (the argmax part over
the first `--num_show` samples, and a heat map of every part) and
`OUT/metrics.json` (final_loss, steps, seconds, layer, feature_shape,
orthogonality_error = max |A^T A - I|, ...). With `--features_in_step=M` each
step draws M fresh samples per device inside the compiled step (nothing
stored; final_loss is then that of the last step's batch). The
running fit is checkpointed in `OUT/checkpoints`: rerunning the same command, or
with more `--steps`, continues from there. When the generator's images carry
ground-truth labels (toy faces), metrics.json also holds every label's best
matching part and its IoU (`panda_jax.parts_eval.best_part_iou`), and the best
IoU any fixed region could reach (`part_iou_bound`).
"""

from __future__ import annotations

from experiments.plumbing import cli
from experiments.plumbing import decomposition

SPEC = decomposition.SPEC


def run(config) -> dict:
  """Decomposes (`plumbing.decomposition.decompose`); returns the metrics it wrote."""
  return decomposition.decompose(config)[2]


if __name__ == "__main__":
  cli.main(run, SPEC)
