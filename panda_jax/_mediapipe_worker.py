"""MediaPipe face-mesh landmarks of a batch of images: a script for MediaPipe's own environment.

    python -I _mediapipe_worker.py IN.npz OUT.npz

Run by `panda_jax.landmarks.detect` with the Python of a virtual environment
holding `mediapipe==0.10.14` (which pins protobuf < 5, unlike the project's
own dependencies), so it imports only numpy, PIL and mediapipe, never
panda_jax. `-I` keeps this file's folder (the panda_jax package, whose module
names could shadow others) off `sys.path`.

IN.npz:
  images          uint8 `[n, H, W, 3]` RGB.
  upscale         int: images are resized by this factor (bicubic) before detection.
  min_confidence  float: the face detector's `min_detection_confidence`.

OUT.npz:
  points          float32 `[n, 468, 2]`: (x, y) of the 468 face-mesh landmarks as
                  fractions of the image width and height (NaN where no face was found).
  detected        bool `[n]`.
  group_<name>    int32: the landmark indices of MediaPipe's connection sets
                  (left_eye, right_eye, lips, nose, face_oval), for the caller's check.
  version         the mediapipe version.
"""

import sys

import mediapipe as mp
import numpy as np
from PIL import Image

NUM_LANDMARKS = 468


def _groups(face_mesh):
  sets = {
    "left_eye": face_mesh.FACEMESH_LEFT_EYE,
    "right_eye": face_mesh.FACEMESH_RIGHT_EYE,
    "lips": face_mesh.FACEMESH_LIPS,
    "nose": face_mesh.FACEMESH_NOSE,
    "face_oval": face_mesh.FACEMESH_FACE_OVAL,
  }
  return {
    name: np.array(sorted({v for edge in edges for v in edge}), np.int32)
    for name, edges in sets.items()
  }


def main(src: str, dst: str) -> None:
  with np.load(src) as data:
    images = data["images"]
    upscale = int(data["upscale"])
    confidence = float(data["min_confidence"])
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise SystemExit(f"images must be uint8 [n, H, W, 3], got {images.dtype} {images.shape}")
  n, h, w, _ = images.shape
  points = np.full((n, NUM_LANDMARKS, 2), np.nan, np.float32)
  detected = np.zeros(n, bool)
  face_mesh = mp.solutions.face_mesh
  with face_mesh.FaceMesh(
    static_image_mode=True,
    max_num_faces=1,
    refine_landmarks=False,
    min_detection_confidence=confidence,
  ) as mesh:
    for i in range(n):
      image = Image.fromarray(images[i]).resize((w * upscale, h * upscale), Image.BICUBIC)
      found = mesh.process(np.asarray(image)).multi_face_landmarks
      if not found:
        continue
      marks = found[0].landmark
      if len(marks) != NUM_LANDMARKS:
        raise SystemExit(f"expected {NUM_LANDMARKS} landmarks, got {len(marks)}")
      points[i] = [(p.x, p.y) for p in marks]
      detected[i] = True
  groups = {f"group_{name}": idx for name, idx in _groups(face_mesh).items()}
  np.savez(dst, points=points, detected=detected, version=np.array(mp.__version__), **groups)


if __name__ == "__main__":
  if len(sys.argv) != 3:
    raise SystemExit(__doc__)
  main(sys.argv[1], sys.argv[2])
