"""Face regions from MediaPipe's face mesh: ground truth for a real face GAN (issue 17).

    regions = landmarks.face_regions(images)            # images [n, 64, 64, 3] in [-1, 1]
    regions.masks["eyes"]                                 # [n, 64, 64] bool
    regions.detected                                      # [n] bool

Two halves, so that the second is testable without MediaPipe:

* `detect`: MediaPipe's face mesh (468 landmarks) on the images upscaled 4x
  (bicubic; on 64 px DCGAN faces about 95% are detected at
  `min_detection_confidence=0.3`). `mediapipe==0.10.14` (whose wheel carries
  the face-mesh model) pins protobuf < 5, which the project's own
  dependencies do not accept, so it never runs in the project's environment:
  `mediapipe_python` finds or creates a virtual environment of its own
  (`python -m venv` + `pip install mediapipe==0.10.14`), and the worker
  script `_mediapipe_worker.py` (shipped in this package, run as a file with
  `python -I`) runs there in a subprocess, with numpy arrays in and out
  through temporary .npz files.
* `region_masks`: numpy only. Each region is the union of convex hulls of
  landmark groups, dilated by a distance in pixels of the image, rasterised
  by coverage: a pixel belongs to a region when at least half of its
  `supersample x supersample` sub-pixel centres lie within the dilation
  distance of one of the hulls. Pixel `(row i, column j)` covers
  `[j, j + 1) x [i, i + 1)` in image coordinates (landmark x times the width).

Regions (`REGIONS`): eyes = both eyes' hulls dilated 1.5 px, mouth = the lips'
hull dilated 1.0 px, nose = the nose hull dilated 0.5 px, background = the
pixels outside the face oval's hull. Undetected samples get empty masks.

Where MediaPipe's Python comes from (first found): the `python` argument, the
environment variable `PANDA_MEDIAPIPE_PYTHON`, else the virtual environment
`venv` argument / `PANDA_MEDIAPIPE_VENV` / `~/.cache/panda_jax/mediapipe-0.10.14`,
created on first use when `create=True`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import tempfile
from typing import NamedTuple, Optional, Sequence

import numpy as np

from panda_jax import viz

MEDIAPIPE_VERSION = "0.10.14"
REQUIREMENT = f"mediapipe=={MEDIAPIPE_VERSION}"
NUM_LANDMARKS = 468
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_mediapipe_worker.py")
PYTHON_ENV = "PANDA_MEDIAPIPE_PYTHON"
VENV_ENV = "PANDA_MEDIAPIPE_VENV"
DEFAULT_VENV = os.path.join("~", ".cache", "panda_jax", f"mediapipe-{MEDIAPIPE_VERSION}")
_READY = "panda_jax_ready"  # Written into a venv once mediapipe imports there.

# The landmark indices of MediaPipe's face-mesh connection sets (the vertices of
# `mediapipe.solutions.face_mesh.FACEMESH_*`, mediapipe 0.10.14); the worker
# reports its own and `detect` checks that they agree.
GROUPS = {
  "left_eye": (249, 263, 362, 373, 374, 380, 381, 382, 384, 385, 386, 387, 388, 390, 398, 466),
  "right_eye": (7, 33, 133, 144, 145, 153, 154, 155, 157, 158, 159, 160, 161, 163, 173, 246),
  "lips": (
    0,
    13,
    14,
    17,
    37,
    39,
    40,
    61,
    78,
    80,
    81,
    82,
    84,
    87,
    88,
    91,
    95,
    146,
    178,
    181,
    185,
    191,
    267,
    269,
    270,
    291,
    308,
    310,
    311,
    312,
    314,
    317,
    318,
    321,
    324,
    375,
    402,
    405,
    409,
    415,
  ),
  "nose": (
    1,
    2,
    4,
    5,
    6,
    19,
    45,
    48,
    64,
    94,
    97,
    98,
    115,
    168,
    195,
    197,
    220,
    275,
    278,
    294,
    326,
    327,
    344,
    440,
  ),
  "face_oval": (
    10,
    21,
    54,
    58,
    67,
    93,
    103,
    109,
    127,
    132,
    136,
    148,
    149,
    150,
    152,
    162,
    172,
    176,
    234,
    251,
    284,
    288,
    297,
    323,
    332,
    338,
    356,
    361,
    365,
    377,
    378,
    379,
    389,
    397,
    400,
    454,
  ),
}


class Region(NamedTuple):
  """A region: the union of the convex hulls of `hulls` (one hull per group), dilated."""

  hulls: tuple  # group names of GROUPS, one convex hull each
  dilation: float  # in pixels of the image
  outside: bool = False  # the region is the complement of the hulls (background)


REGIONS = {
  "eyes": Region(("left_eye", "right_eye"), 1.5),
  "mouth": Region(("lips",), 1.0),
  "nose": Region(("nose",), 0.5),
  "background": Region(("face_oval",), 0.0, outside=True),
}


class MediaPipeUnavailable(RuntimeError):
  """No Python with mediapipe could be found or made."""


class Landmarks(NamedTuple):
  points: np.ndarray  # [n, 468, 2] float32 (x, y) in pixels of the images; NaN if undetected
  detected: np.ndarray  # [n] bool


class Regions(NamedTuple):
  masks: dict  # region name -> [n, H, W] bool (empty where undetected)
  detected: np.ndarray  # [n] bool


# ----------------------------------------------------------------------------- masks


def _cross(u, v) -> float:
  return u[0] * v[1] - u[1] * v[0]


def convex_hull(points) -> np.ndarray:
  """The convex hull of `points [m, 2]`: `[k, 2]` vertices in positive (x, y) orientation.

  Andrew's monotone chain; collinear and repeated points are dropped, so a
  degenerate set gives 1 or 2 vertices.
  """
  pts = np.unique(np.asarray(points, np.float64), axis=0)  # sorted by x, then y
  if len(pts) <= 2:
    return pts

  def half(seq):
    chain = []
    for p in seq:
      while len(chain) >= 2 and _cross(chain[-1] - chain[-2], p - chain[-2]) <= 0:
        chain.pop()
      chain.append(p)
    return chain[:-1]

  return np.array(half(pts) + half(pts[::-1]))


def _inside(xs, ys, hull) -> np.ndarray:
  """`[len(ys), len(xs)]` bool: the grid points in the filled convex polygon `hull [k >= 3, 2]`.

  Row by row: the half-plane of each edge (the inside lies to its left, the
  hull being positively oriented) bounds x on that row, so each row's inside
  is one interval, O(rows x edges) work.
  """
  start = hull
  edge = np.roll(hull, -1, axis=0) - start  # [k, 2]
  ex, ey = edge[:, 0], edge[:, 1]
  dy = ys[:, None] - start[None, :, 1]  # [rows, k]
  # Inside: ex * dy - ey * (x - sx) >= 0, i.e. x <= bound for ey > 0, x >= bound for ey < 0.
  bound = start[None, :, 0] + ex * dy / np.where(ey != 0, ey, 1)
  hi = np.min(np.where(ey > 0, bound, np.inf), axis=1)
  lo = np.max(np.where(ey < 0, bound, -np.inf), axis=1)
  flat_ok = np.all((ey != 0) | (ex * dy >= 0), axis=1)  # horizontal edges
  return flat_ok[:, None] & (xs[None, :] >= lo[:, None]) & (xs[None, :] <= hi[:, None])


def _near(query, hull, dilation: float) -> np.ndarray:
  """`[m]` bool: the points `query [m, 2]` within `dilation` of the boundary of `hull`."""
  start = hull
  edge = (np.roll(hull, -1, axis=0) if len(hull) > 1 else hull) - start  # [k, 2]
  rel_x = query[:, 0:1] - start[None, :, 0]  # [m, k]
  rel_y = query[:, 1:2] - start[None, :, 1]
  length2 = np.sum(edge**2, axis=1)  # [k]
  t = np.clip((rel_x * edge[:, 0] + rel_y * edge[:, 1]) / np.where(length2 > 0, length2, 1), 0, 1)
  dist2 = np.min((rel_x - t * edge[:, 0]) ** 2 + (rel_y - t * edge[:, 1]) ** 2, axis=1)
  return dist2 <= dilation**2


def hull_mask(points, size, dilation: float = 0.0, supersample: int = 4) -> np.ndarray:
  """`[H, W]` bool: the pixels at least half covered by the hull of `points` grown by `dilation`.

  Args:
    points: `[m, 2]` (x, y) in pixels, x along the width.
    size: `(H, W)`.
    dilation: in pixels (a disc, so corners round off).
    supersample: sub-pixel centres per pixel along each axis.
  """
  big_h, big_w = size
  hull = convex_hull(points)
  covered = np.zeros((big_h * supersample, big_w * supersample), bool)
  # Only the sub-pixels of the bounding box can be inside.
  lo = np.floor((hull.min(axis=0) - dilation) * supersample).astype(int)
  hi = np.ceil((hull.max(axis=0) + dilation) * supersample).astype(int) + 1
  x0, y0 = max(lo[0], 0), max(lo[1], 0)
  x1, y1 = min(hi[0], big_w * supersample), min(hi[1], big_h * supersample)
  if x1 > x0 and y1 > y0:
    xs = (np.arange(x0, x1) + 0.5) / supersample  # sub-pixel centres
    ys = (np.arange(y0, y1) + 0.5) / supersample
    inside = _inside(xs, ys, hull) if len(hull) >= 3 else np.zeros((len(ys), len(xs)), bool)
    if dilation > 0:
      rows, cols = np.nonzero(~inside)
      inside[rows, cols] = _near(np.stack([xs[cols], ys[rows]], axis=1), hull, dilation)
    covered[y0:y1, x0:x1] = inside
  fraction = covered.reshape(big_h, supersample, big_w, supersample).mean(axis=(1, 3))
  return fraction >= 0.5


def region_masks(
  points, detected, size, *, regions: Optional[dict] = None, supersample: int = 4
) -> dict:
  """Region masks from landmarks: `{name: [n, H, W] bool}` (module docstring).

  Args:
    points: `[n, 468, 2]` landmarks (x, y) in pixels of the images (`Landmarks.points`).
    detected: `[n]` bool; undetected samples get empty masks (background too).
    size: the image size `(H, W)`.
    regions: name -> `Region` (default `REGIONS`).
    supersample: sub-pixel centres per pixel along each axis.
  """
  points = np.asarray(points, np.float64)
  detected = np.asarray(detected, bool)
  regions = REGIONS if regions is None else regions
  if points.ndim != 3 or points.shape[1:] != (NUM_LANDMARKS, 2):
    raise ValueError(f"points must be [n, {NUM_LANDMARKS}, 2], got shape {points.shape}")
  if detected.shape != points.shape[:1]:
    raise ValueError(f"detected must be [n={points.shape[0]}], got shape {detected.shape}")
  if not np.isfinite(points[detected]).all():
    raise ValueError("points of detected samples must be finite")
  n = points.shape[0]
  out = {}
  for name, region in regions.items():
    masks = np.zeros((n,) + tuple(size), bool)
    for i in np.flatnonzero(detected):
      for group in region.hulls:
        masks[i] |= hull_mask(points[i, list(GROUPS[group])], size, region.dilation, supersample)
      if region.outside:
        masks[i] = ~masks[i]
    out[name] = masks
  return out


# ----------------------------------------------------------------------------- environment


def venv_python(venv: str) -> str:
  """The interpreter of the virtual environment `venv`."""
  sub = ("Scripts", "python.exe") if os.name == "nt" else ("bin", "python")
  return os.path.join(venv, *sub)


def _clean_env() -> dict:
  """The environment of the subprocesses: none of the project venv's Python settings."""
  env = {
    k: v
    for k, v in os.environ.items()
    if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
  }
  env.setdefault("GLOG_minloglevel", "2")  # MediaPipe's C++ logging
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  return env


def _run(cmd: Sequence[str], timeout: Optional[float] = None) -> subprocess.CompletedProcess:
  return subprocess.run(
    list(cmd),
    stdin=subprocess.DEVNULL,
    capture_output=True,
    text=True,
    env=_clean_env(),
    timeout=timeout,
    check=False,
  )


def _tail(text: str, lines: int = 15) -> str:
  return "\n".join(text.strip().splitlines()[-lines:])


@contextlib.contextmanager
def _lock(path: str):
  """An exclusive lock file (two processes must not build one venv together)."""
  with open(path, "w") as handle:
    try:
      import fcntl  # pylint: disable=import-outside-toplevel

      fcntl.flock(handle, fcntl.LOCK_EX)
    except ImportError:  # Not POSIX: no locking.
      pass
    yield


def ensure_venv(
  venv: str,
  *,
  requirement: str = REQUIREMENT,
  base_python: Optional[str] = None,
  pip_args: Sequence[str] = (),
  timeout: Optional[float] = 1800,
) -> str:
  """Creates (once) a virtual environment with `requirement`; returns its Python.

  `base_python -m venv VENV`, then `VENV/bin/python -m pip install
  [pip_args] requirement`, then a check that `import mediapipe` works there;
  a marker file records success, so an interrupted creation is redone.

  Raises:
    MediaPipeUnavailable: a step failed (its command and the end of its output).
  """
  venv = os.path.abspath(os.path.expanduser(venv))
  python = venv_python(venv)
  marker = os.path.join(venv, _READY)
  if os.path.isfile(marker):
    return python
  os.makedirs(os.path.dirname(venv), exist_ok=True)
  base_python = base_python or sys.executable
  module = requirement.split("==")[0].split(">")[0].split("<")[0].strip().replace("-", "_")
  with _lock(venv + ".lock"):
    if os.path.isfile(marker):  # Made by another process while we waited.
      return python
    steps = [
      [base_python, "-m", "venv", venv],
      [python, "-m", "pip", "install", "--disable-pip-version-check", *pip_args, requirement],
      [python, "-I", "-c", f"import {module}"],
    ]
    for cmd in steps:
      if cmd[0] == python and not os.path.exists(python):
        break
      try:
        result = _run(cmd, timeout)
      except (OSError, subprocess.TimeoutExpired) as err:
        result = subprocess.CompletedProcess(cmd, -1, "", str(err))
      if result.returncode != 0:
        raise MediaPipeUnavailable(
          f"could not make the MediaPipe environment {venv}: `{' '.join(cmd)}` failed "
          f"(exit {result.returncode}):\n{_tail(result.stdout + result.stderr)}\n"
          f"mediapipe {MEDIAPIPE_VERSION} has wheels for CPython 3.8-3.12 on Linux, macOS "
          f"and Windows; point {PYTHON_ENV} at a Python that has it, or {VENV_ENV} at "
          "another place for the environment"
        )
    with open(marker, "w") as f:
      f.write(requirement + "\n")
  return python


def mediapipe_python(
  python: Optional[str] = None, venv: Optional[str] = None, *, create: bool = True
) -> str:
  """The Python that runs the worker (module docstring: the order of the sources).

  Raises:
    MediaPipeUnavailable: nothing found and `create=False`, or the creation failed.
  """
  python = python or os.environ.get(PYTHON_ENV)
  if python:
    if not os.path.isfile(python):
      raise MediaPipeUnavailable(f"MediaPipe Python {python} does not exist")
    return python
  venv = os.path.expanduser(venv or os.environ.get(VENV_ENV) or DEFAULT_VENV)
  if os.path.isfile(os.path.join(venv, _READY)):
    return venv_python(venv)
  if not create:
    raise MediaPipeUnavailable(
      f"no MediaPipe environment at {venv} (and creation is off): set {PYTHON_ENV} to a "
      f"Python with {REQUIREMENT}, or allow the creation (`create=True`)"
    )
  return ensure_venv(venv)


# ----------------------------------------------------------------------------- detection


def cache_key(images_u8, upscale: int, min_confidence: float) -> str:
  """A digest of everything the landmarks depend on."""
  digest = hashlib.sha256()
  digest.update(repr((images_u8.shape, int(upscale), float(min_confidence), REQUIREMENT)).encode())
  digest.update(np.ascontiguousarray(images_u8).tobytes())
  return digest.hexdigest()[:20]


def detect(
  images,
  *,
  python: Optional[str] = None,
  venv: Optional[str] = None,
  create: bool = True,
  worker: Optional[str] = None,
  upscale: int = 4,
  min_confidence: float = 0.3,
  cache_dir: Optional[str] = None,
  timeout: Optional[float] = None,
) -> Landmarks:
  """MediaPipe's face-mesh landmarks of `images`, in a subprocess.

  Args:
    images: `[n, H, W, 3]` RGB, float in [-1, 1] or uint8.
    python, venv, create: where MediaPipe runs (`mediapipe_python`).
    worker: the script run there (`python -I worker IN.npz OUT.npz`; default
      `WORKER`, the one shipped here; tests pass a fake).
    upscale: resize factor (bicubic) before detection.
    min_confidence: the detector's `min_detection_confidence`.
    cache_dir: when given, landmarks are kept there in
      `landmarks-<digest of the images and settings>.npz` and reused.
    timeout: seconds for the worker.

  Returns:
    `Landmarks(points [n, 468, 2] in pixels, detected [n])`.

  Raises:
    MediaPipeUnavailable (no MediaPipe), RuntimeError (the worker failed or
    answered something else than landmarks of MediaPipe's mesh).
  """
  images = viz.to_uint8(images)
  if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] < 1:
    raise ValueError(f"images must be [n >= 1, H, W, 3], got shape {images.shape}")
  if not (isinstance(upscale, (int, np.integer)) and upscale >= 1):
    raise ValueError(f"upscale must be a positive integer, got {upscale!r}")
  n, big_h, big_w, _ = images.shape
  cached = None
  if cache_dir:
    cached = os.path.join(cache_dir, f"landmarks-{cache_key(images, upscale, min_confidence)}.npz")
    if os.path.isfile(cached):
      with np.load(cached) as data:
        return Landmarks(data["points"], data["detected"])
  python = mediapipe_python(python, venv, create=create)
  worker = worker or WORKER
  with tempfile.TemporaryDirectory(prefix="panda_mediapipe_") as tmp:
    src, dst = os.path.join(tmp, "in.npz"), os.path.join(tmp, "out.npz")
    np.savez(
      src, images=images, upscale=np.int64(upscale), min_confidence=np.float64(min_confidence)
    )
    try:
      result = _run([python, "-I", worker, src, dst], timeout)
    except subprocess.TimeoutExpired:
      raise RuntimeError(f"the MediaPipe worker ran past {timeout} s") from None
    if result.returncode != 0 or not os.path.isfile(dst):
      raise RuntimeError(
        f"the MediaPipe worker `{python} {worker}` failed (exit "
        f"{result.returncode}):\n{_tail(result.stderr + result.stdout)}"
      )
    with np.load(dst) as data:
      answer = {k: data[k] for k in data.files}
  points, detected = _check_answer(answer, n)
  points = points * np.array([big_w, big_h], np.float32)  # fractions -> pixels
  if cached:
    os.makedirs(cache_dir, exist_ok=True)
    np.savez(cached + ".tmp.npz", points=points, detected=detected)
    os.replace(cached + ".tmp.npz", cached)
  return Landmarks(points, detected)


def _check_answer(answer: dict, n: int):
  for name in ("points", "detected"):
    if name not in answer:
      raise RuntimeError(f"the MediaPipe worker wrote no {name!r}")
  points = np.asarray(answer["points"], np.float32)
  detected = np.asarray(answer["detected"], bool)
  if points.shape != (n, NUM_LANDMARKS, 2) or detected.shape != (n,):
    raise RuntimeError(
      f"the MediaPipe worker answered points {points.shape} and detected "
      f"{detected.shape} for {n} images"
    )
  for group, indices in GROUPS.items():
    theirs = answer.get(f"group_{group}")
    if theirs is not None and tuple(np.asarray(theirs).tolist()) != indices:
      raise RuntimeError(
        f"MediaPipe's landmark group {group} differs from the one the masks "
        f"assume (mediapipe {answer.get('version')}; expected "
        f"{MEDIAPIPE_VERSION})"
      )
  if not np.isfinite(points[detected]).all():
    raise RuntimeError("the MediaPipe worker returned non-finite landmarks for a detected face")
  return points, detected


def face_regions(
  images, *, size: Optional[Sequence[int]] = None, supersample: int = 4, **detect_options
) -> Regions:
  """`detect` then `region_masks` at the images' size (or `size`)."""
  marks = detect(images, **detect_options)
  size = tuple(np.shape(images)[1:3]) if size is None else tuple(size)
  scale = np.array([size[1] / np.shape(images)[2], size[0] / np.shape(images)[1]])
  points = np.where(marks.detected[:, None, None], marks.points * scale, 0.0)
  return Regions(
    region_masks(points, marks.detected, size, supersample=supersample), marks.detected
  )
