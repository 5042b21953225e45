"""Plumbing shared by the launchers: flags, generator, samples, features, outputs.

Each launcher is a short `main` around one `run(config) -> dict` (the metrics it
wrote to `OUT/metrics.json`). `config` is a namespace of option values:
`main` builds it from the command line, `make_config(SPEC, **overrides)` from
the defaults, so tests call `run` directly.

Sample i of a run has the latents of `fold_in(sample_key, i)` with
`sample_key, fit_key = split(PRNGKey(seed))` (`generator_ops.sample_latents`):
the data never depend on the batch size nor on how many processes share the
work. With `--coordinator_address --num_processes --process_id`, or with no
flags under Slurm or on a TPU pod (`detect_cluster`), `jax.distributed.initialize`
runs before any other JAX call, each process extracts its own contiguous slice
of the samples, and only process 0 writes. A process that dies makes the others
abort within `HEARTBEAT_TIMEOUT_S` instead of hanging in a collective.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import types
from typing import Any, Callable, NamedTuple, Optional

from absl import app
from absl import flags
from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from panda_jax import generator_ops
from panda_jax import generators
from panda_jax import metrics as metrics_lib
from panda_jax import parts_eval

FLAGS = flags.FLAGS
_STOP = threading.Event()  # Set by SIGTERM / SIGINT (installed by `main`).


class Stopped(Exception):
  """A run stopped by SIGTERM/SIGINT after checkpointing: `main` exits 0."""


def stop_requested() -> bool:
  """Whether SIGTERM/SIGINT arrived: `pj.fit(stop=...)` then checkpoints and returns."""
  return _STOP.is_set()


def _request_stop(signum, frame) -> None:
  del frame
  logging.warning("%s received: checkpointing and stopping", signal.Signals(signum).name)
  _STOP.set()


class Flag(NamedTuple):
  """One command-line option: absl's `DEFINE_<kind>(name, default, help)`."""
  kind: str  # "string", "integer", "float", "bool", "list" or "multi_string"
  default: Any
  help: str


_SHARED = {
    "generator": Flag("string", "toyfaces", "A converted checkpoint directory (written by "
                      "`python -m converters`) or the name of an embedded generator."),
    "layer": Flag("integer", None, "Layer of the feature maps (default: the deepest layer "
                  "whose feature maps are at most 16x16)."),
    "out": Flag("string", None, "Output directory: PNGs, metrics.json, checkpoints."),
    "seed": Flag("integer", 0, "Seed of the samples and of the decomposition."),
    "num_samples": Flag("integer", 256, "Samples the factors are learnt (or ranked) on."),
    "batch_size": Flag("integer", 64, "Samples per generator call."),
    "truncation_psi": Flag("float", 1.0, "Truncation of the latents."),
    "rank_c": Flag("integer", 8, "Number of appearances R_C."),
    "rank_s": Flag("integer", 8, "Number of parts R_S."),
    "steps": Flag("integer", 200, "Steps of Algorithm 1 in total (a rerun with more steps "
                  "continues from OUT/checkpoints)."),
    "parts_init": Flag("string", "kmeans", "Start of the parts: 'kmeans' (positions, "
                       "Section 4.1), 'fibres' (where each kind of fibre lives) or 'uniform' "
                       "(the paper's U(0, 0.01))."),
    "checkpoint_every": Flag("integer", 50, "Steps between checkpoints."),
    "factors": Flag("string", None, "A `decompose` output directory; without it, the "
                    "launcher decomposes into OUT/decompose (resumed when already there)."),
    "num_show": Flag("integer", 6, "Samples 0..num_show-1 are the ones shown and edited."),
    "part": Flag("string", "0", "A part index, or indices joined by '+' (their union)."),
    "appearance": Flag("integer", 0, "An appearance (concept) index j."),
    "alpha": Flag("float", 3.0, "Edit strength (see --relative_alpha)."),
    "relative_alpha": Flag("bool", True, "Alpha in units of the mean norm of a feature "
                           "fibre (so one value suits any generator and layer); else absolute."),
    "image": Flag("string", None, "A PNG to invert (the generator's image size and channels: "
                  "RGB for an RGB generator)."),
    "feature_steps": Flag("integer", 100, "Inversion: steps fine-tuning the features at "
                          "--layer after the latents (0: latents only)."),
    "structure_weight": Flag("float", 1.0, "Inversion: weight of the Laplacian-pyramid L1 "
                             "term beside the pixel MSE in the latent stage (0: pixels only)."),
    "feature_structure_weight": Flag("float", 0.0, "Inversion: the same weight in the "
                                     "feature stage."),
    "tie_layers": Flag("bool", False, "Inversion: one W code per image for StyleGANs (W) "
                       "instead of one per layer (W+)."),
    "coordinator_address": Flag("string", None, "HOST:PORT of process 0 (multi-process)."),
    "num_processes": Flag("integer", None, "Number of processes (multi-process)."),
    "process_id": Flag("integer", None, "Index of this process (multi-process)."),
}

DISTRIBUTED = ("coordinator_address", "num_processes", "process_id")
SAMPLING = ("generator", "layer", "out", "seed", "num_samples", "batch_size",
            "truncation_psi") + DISTRIBUTED
DECOMPOSITION = ("rank_c", "rank_s", "steps", "parts_init", "checkpoint_every")
# The options of every launcher that works from factors (decompose's, plus where
# the factors come from and how many samples to show).
WITH_FACTORS = SAMPLING + DECOMPOSITION + ("factors", "num_show")
# How a real image is inverted (`pj.invert`; `experiments.real_images`).
INVERSION = ("image", "feature_steps", "structure_weight", "feature_structure_weight",
             "tie_layers")


# ----------------------------------------------------------------------------- configs


def spec(*names: str, **own: Flag) -> dict:
  """A launcher's options: shared ones by name, plus its own `Flag`s."""
  clash = sorted(set(own) & set(_SHARED))
  if clash:
    raise ValueError(f"options {clash} are shared ones: name them instead")
  return {**{name: _SHARED[name] for name in names}, **own}


def make_config(options: dict, **overrides) -> types.SimpleNamespace:
  """The `options` (a `spec`) at their defaults, with `overrides` (unknown names raise)."""
  unknown = sorted(set(overrides) - set(options))
  if unknown:
    raise ValueError(f"unknown options {unknown}; this launcher takes {sorted(options)}")
  values = {name: flag.default for name, flag in options.items()}
  values.update(overrides)
  return types.SimpleNamespace(**values)


def subconfig(config, options: dict, **overrides) -> types.SimpleNamespace:
  """The `options` taken from `config` where it has them, with `overrides`."""
  values = {n: getattr(config, n) for n in options if hasattr(config, n)}
  values.update(overrides)
  return make_config(options, **values)


def main(run: Callable, options: dict) -> None:
  """The command line: defines the absl flags of `options`, then `run(config)`.

  Flags are defined here, not at import, so that importing several launchers
  (tests do) never defines a flag twice. `jax.distributed.initialize` runs
  first when the multi-process flags are given or a cluster is detected.
  """
  for name, flag in options.items():
    getattr(flags, f"DEFINE_{flag.kind}")(name, flag.default, flag.help)

  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = types.SimpleNamespace(**{name: FLAGS[name].value for name in options})
    initialize_distributed(config)
    if not FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO.
    for sig in (signal.SIGTERM, signal.SIGINT):  # Preemption: checkpoint, exit 0.
      signal.signal(sig, _request_stop)
    try:
      run(config)
    except Stopped as e:
      print(f"stopped: {e}", file=sys.stderr)
    except (ValueError, OSError) as e:  # Bad flags or values: one line, exit 1.
      sys.exit(f"error: {' '.join(str(e).split())}")

  app.run(_main)


# A process that sends no heartbeat for this long is declared dead, and every
# other process then aborts with JAX's "another task died" error instead of
# waiting forever in a collective (JAX's default is 100 s).
# `PANDA_HEARTBEAT_TIMEOUT_S` overrides it (tests use a few seconds).
HEARTBEAT_TIMEOUT_S = 30
_SLURM_STEP = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
               "SLURM_LOCALID")


def detect_cluster(environ) -> Optional[str]:
  """The multi-process launcher `environ` (a dict of environment variables) shows.

  "slurm" for an `srun` step of several tasks (the variables JAX's own Slurm
  detection reads; each process then uses the GPU `SLURM_LOCALID` of its node),
  "tpu" on a TPU VM pod slice of several hosts (or several slices,
  `MEGASCALE_*`); None otherwise (one machine, a one-task Slurm job, or an
  sbatch script outside `srun`): then no distributed runtime is started.
  """
  def count(name):
    try:
      return int(environ.get(name, "1"))
    except ValueError:
      return 1

  if all(name in environ for name in _SLURM_STEP) and count("SLURM_NTASKS") > 1:
    return "slurm"
  hosts = [h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  if len(hosts) > 1 or count("MEGASCALE_NUM_SLICES") > 1:
    return "tpu"
  return None


def initialize_distributed(config, environ=None) -> Optional[str]:
  """`jax.distributed.initialize`, from the three multi-process flags or auto-detected.

  With the flags, they are used as given. Without them, under Slurm or on a TPU
  pod (`detect_cluster`), JAX finds the coordinator, process count and index
  itself. Returns how the runtime was started ("flags", "slurm", "tpu") or None
  (a single process).
  """
  environ = os.environ if environ is None else environ
  values = [getattr(config, name) for name in DISTRIBUTED]
  if all(v is None for v in values):
    cluster = detect_cluster(environ)
    if cluster is not None:
      jax.distributed.initialize(heartbeat_timeout_seconds=_heartbeat_timeout(environ))
    return cluster
  if any(v is None for v in values):
    raise ValueError("--coordinator_address, --num_processes and --process_id must be given "
                     f"together, got {dict(zip(DISTRIBUTED, values))}")
  address, count, index = values
  if not (count >= 1 and 0 <= index < count):
    raise ValueError(f"--process_id must be in [0, {count - 1}], got {index}")
  jax.distributed.initialize(coordinator_address=address, num_processes=count,
                             process_id=index,
                             heartbeat_timeout_seconds=_heartbeat_timeout(environ))
  return "flags"


def _heartbeat_timeout(environ) -> int:
  text = environ.get("PANDA_HEARTBEAT_TIMEOUT_S", str(HEARTBEAT_TIMEOUT_S))
  try:
    seconds = int(text)
  except ValueError:
    seconds = 0
  if seconds < 1:
    raise ValueError(f"PANDA_HEARTBEAT_TIMEOUT_S must be a positive integer, got {text!r}")
  return seconds


# ----------------------------------------------------------------------------- generator


def load_generator(name: str):
  """A converted checkpoint directory, or an embedded generator by name."""
  if not name:
    raise ValueError("--generator is empty: give a converted checkpoint directory or a name")
  if os.path.isdir(name):
    return generators.load(name)
  try:
    return generators.load(name)
  except (ValueError, OSError) as err:
    raise ValueError(
        f"unknown generator {name!r}: neither a converted checkpoint directory (convert one "
        f"with `python -m converters --src=CHECKPOINT --dst=DIR`) nor an embedded generator "
        f"({err})") from None


def keys(seed: int):
  """`(sample_key, fit_key)` of a run."""
  sample_key, fit_key = jax.random.split(jax.random.PRNGKey(seed))
  return sample_key, fit_key


def latents(gen, config, indices):
  """The latents of the samples `indices` of the run."""
  return generator_ops.sample_latents(gen, keys(config.seed)[0], np.asarray(indices),
                                      truncation_psi=config.truncation_psi)


def _sample(gen, key, indices, *, layer: Optional[int], psi: float):
  """The features at `layer` (the images when None) of the samples `indices`.

  Not jitted here: the generators jit their own maths per configuration, so
  every instance of one architecture shares the compiled code.
  """
  lat = generator_ops.sample_latents(gen, key, indices, truncation_psi=psi)
  return gen.generate(lat) if layer is None else gen.split(lat, layer)[0]


def feature_shape(gen, layer: int) -> tuple:
  """`(h, w, c)` of the feature maps at `layer` (traced, nothing computed)."""
  shape = jax.eval_shape(lambda k: _sample(gen, k, jnp.arange(1), layer=layer, psi=1.0),
                         jax.random.PRNGKey(0)).shape
  return tuple(int(d) for d in shape[1:])


def resolve_layer(gen, layer: Optional[int]) -> int:
  """`layer`, checked, or the deepest layer whose feature maps are at most 16x16."""
  if layer is not None:
    return gen.check_layer(layer)
  small = [l for l in gen.layers if max(feature_shape(gen, l)[:2]) <= 16]
  if not small:
    raise ValueError(f"no layer of {gen.arch} has feature maps of 16x16 or less: pass --layer")
  return small[-1]


def local_indices(num_samples: int) -> np.ndarray:
  """This process's contiguous slice of the samples `0 .. num_samples-1`."""
  count, index = jax.process_count(), jax.process_index()
  if num_samples < 1 or num_samples % count:
    raise ValueError(f"--num_samples must be a positive multiple of the number of processes "
                     f"({count}), got {num_samples}")
  per = num_samples // count
  return np.arange(index * per, (index + 1) * per)


def batches(gen, config, indices, layer: Optional[int], desc: str):
  """Yields the features `[b, h, w, c]` at `layer` (images `[b, H, W, ch]` when None).

  Every call has `batch_size` samples (the last one padded), so the generator
  compiles once.
  """
  if config.batch_size < 1:
    raise ValueError(f"--batch_size must be positive, got {config.batch_size}")
  indices = np.asarray(indices)
  size = min(config.batch_size, len(indices))
  sample_key = keys(config.seed)[0]
  bar = progress(len(indices), desc)
  try:
    for start in range(0, len(indices), size):
      chunk = indices[start:start + size]
      padded = np.concatenate([chunk, np.full(size - len(chunk), chunk[-1])])
      x = _sample(gen, sample_key, jnp.asarray(padded), layer=layer,
                  psi=float(config.truncation_psi))
      bar.update(len(chunk))
      yield x[:len(chunk)]
  finally:
    bar.close()


def extract_features(gen, config, layer: int, indices) -> jax.Array:
  """The features `[len(indices), h, w, c]` of the samples `indices`."""
  return jnp.concatenate(list(batches(gen, config, indices, layer, "features")))


class Samples(NamedTuple):
  """Generated images split into what is shown and the ground truth they carry."""
  rgb: np.ndarray                 # [n, H, W, 3] (or 1 channel), raw range
  labels: Optional[np.ndarray]    # [n, H, W] int32 ground-truth labels, or None
  label_names: tuple              # one name per label (empty without labels)


def images(gen, config, indices) -> Samples:
  """The images of the samples `indices`, label channels split off."""
  return split_labels(np.concatenate(list(batches(gen, config, indices, None, "images"))))


def split_labels(images) -> Samples:
  """Splits generated `[n, H, W, ch]` images into RGB and ground-truth labels.

  The embedded toy-faces generator emits RGB followed by one soft label channel
  per part of `toyfaces.PARTS`; the label map is their argmax. Generators with
  1 or 3 channels have no labels.
  """
  images = np.asarray(images, np.float32)
  if images.shape[-1] in (1, 3):
    return Samples(images, None, ())
  from panda_jax.data import toyfaces  # pylint: disable=import-outside-toplevel
  rgb, probs = toyfaces.split_channels(images)
  return Samples(np.asarray(rgb), np.argmax(probs, axis=-1).astype(np.int32), toyfaces.PARTS)


# ----------------------------------------------------------------------------- outputs


def is_writer() -> bool:
  """Only process 0 writes files."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits for every process (a no-op in a single-process run)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def output_dir(out: Optional[str]) -> str:
  """`out` as an absolute path, created (by process 0)."""
  if not out:
    raise ValueError("--out is required (the output directory)")
  out = os.path.abspath(out)
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f"--out={out} is a file, not a directory")
  if is_writer():
    os.makedirs(out, exist_ok=True)
    if not os.access(out, os.W_OK):
      raise ValueError(f"--out={out} is not writable")
  barrier("output_dir")
  return out


def progress(total: int, desc: str):
  """A tqdm bar on process 0 (silent elsewhere)."""
  return tqdm(total=total, desc=desc, disable=not is_writer(), leave=False)


def progress_iter(items, desc: str):
  """`items` with a tqdm bar on process 0."""
  return tqdm(items, desc=desc, disable=not is_writer(), leave=False)


def jsonable(value):
  """Arrays -> lists, numpy scalars -> Python, non-finite floats -> None."""
  if isinstance(value, dict):
    return {str(k): jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [jsonable(v) for v in value]
  if isinstance(value, (np.ndarray, jax.Array, np.generic)):
    return jsonable(np.asarray(value).tolist())
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def write_metrics(out: str, metrics: dict) -> dict:
  """Writes `OUT/metrics.json` (process 0, atomically); returns the JSON-able metrics."""
  metrics = jsonable(metrics)
  if is_writer():
    path = os.path.join(out, "metrics.json")
    with open(path + ".tmp", "w") as f:
      json.dump(metrics, f, indent=1, sort_keys=True, allow_nan=False)
    os.replace(path + ".tmp", path)
  return metrics


def parse_part(text: str):
  """`"3"` -> 3, `"1+2"` -> [1, 2] (a union of parts); anything else raises."""
  try:
    values = [int(t) for t in text.split("+")]
  except ValueError:
    raise ValueError(f"a part must be an integer or integers joined by '+', got {text!r}") \
        from None
  return values[0] if len(values) == 1 else values


# ----------------------------------------------------------------------------- edits


def absolute_alpha(config, features, alpha: float) -> float:
  """`alpha` times the mean channel-fibre norm of `features` under --relative_alpha."""
  if not config.relative_alpha:
    return float(alpha)
  return float(alpha) * float(jnp.mean(jnp.linalg.norm(features, axis=-1)))


def part_regions(samples: Samples, parts, grid, part):
  """The ground-truth regions a part (index or list of indices) stands for.

  A label belongs to part k when k is its best-matching part by IoU
  (`parts_eval.best_part_iou`); a part that is no label's best match stands
  for the label it overlaps most.

  Returns:
    `(masks [n, H, W] float32, label names)`.
  """
  _, match, iou = parts_eval.best_part_iou(parts, samples.labels, len(samples.label_names), grid)
  match, iou = np.asarray(match), np.asarray(iou)
  labels = set()
  for k in ([part] if isinstance(part, (int, np.integer)) else part):
    labels |= set(np.flatnonzero(match == k).tolist()) or {int(np.argmax(iou[:, k]))}
  labels = sorted(labels)
  return (np.isin(samples.labels, labels).astype(np.float32),
          [samples.label_names[l] for l in labels])


def upsample_mask(mask, size):
  """A `[h, w]` mask to `size=(H, W)` by block replication (`H, W` multiples of `h, w`)."""
  mask = np.asarray(mask, np.float32)
  if size[0] % mask.shape[0] or size[1] % mask.shape[1]:
    raise ValueError(f"a mask of size {mask.shape} does not tile images of size {tuple(size)}")
  return np.repeat(np.repeat(mask, size[0] // mask.shape[0], 0), size[1] // mask.shape[1], 1)


def roir(originals, edited, masks) -> dict:
  """ROIR (Eq. 13) of an edit of RGB images inside `masks` `[n, H, W]`."""
  mean, std = metrics_lib.roir(jnp.asarray(originals), jnp.asarray(edited), jnp.asarray(masks))
  return {"roir_mean": float(mean), "roir_std": float(std)}
