"""Generator image -> aligned 112x112 face -> per-network input normalisation.

SynthDistill (https://arxiv.org/abs/2308.14852) never detects faces: FFHQ
StyleGAN2 faces are aligned, so a fixed crop maps the generator's average eye
positions onto the ArcFace 112x112 template (reference `src/Crop.py`). The crop
box is derived here from the eye template for any generator resolution, with
Python `int()` truncation of the corners as the reference does, which gives
rows 21:234 and cols 22:235 at 256x256. The crop is then resized bilinearly
with half-pixel centres and without antialiasing (PyTorch
`interpolate(mode='bilinear', align_corners=False)`), written as two small
interpolation matrices so that it is exact and cheap on any backend.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

FACE_SIZE = 112
# Eye centres (row, col) of an aligned FFHQ face in the 1024x1024 frame.
_EYES_1024 = {"reye": (480, 380), "leye": (480, 650)}
# The ArcFace 112x112 template eyes (row, col).
_EYES_ARCFACE = {"reye": (51.6, 38.2946), "leye": (51.6, 73.5318)}


def compute_crop_box(height: int, width: int | None = None):
  """The face box of a generator image, as the reference computes it.

  Args:
    height: generator image height (its resolution).
    width: generator image width (defaults to `height`).

  Returns:
    `((top, bottom), (left, right))`, Python slice bounds; `(21, 234), (22,
    235)` for a 256x256 image.
  """
  width = height if width is None else width
  # Eye positions scaled to this resolution, truncated like `int()` upstream.
  eye_row = int(_EYES_1024["reye"][0] / 1024 * height)
  reye_col = int(_EYES_1024["reye"][1] / 1024 * width)
  leye_col = int(_EYES_1024["leye"][1] / 1024 * width)
  tmpl_r, tmpl_l = _EYES_ARCFACE["reye"], _EYES_ARCFACE["leye"]
  alpha = (tmpl_l[1] - tmpl_r[1]) / (leye_col - reye_col)
  top = eye_row - tmpl_r[0] / alpha
  left = reye_col - tmpl_r[1] / alpha
  bottom = top + FACE_SIZE / alpha
  right = left + FACE_SIZE / alpha
  box = ((int(top), int(bottom)), (int(left), int(right)))
  inside = box[0][0] >= 0 and box[1][0] >= 0
  inside = inside and box[0][1] <= height and box[1][1] <= width
  if not inside:
    raise ValueError(f"face crop {box} leaves a {height}x{width} image")
  return box


@functools.lru_cache(maxsize=None)
def create_interpolation_matrix(in_size: int, out_size: int) -> np.ndarray:
  """Linear resampling as a matrix, as PyTorch's bilinear with no antialias.

  Output pixel `i` samples the input at `(i + 0.5) * in/out - 0.5` (half-pixel
  centres), clamped below at 0, blending the two neighbouring pixels (the
  upper one clamped to the last pixel); this is `interpolate(...,
  align_corners=False)` along one axis.

  Args:
    in_size: input length along the axis.
    out_size: output length.

  Returns:
    float32 `[out_size, in_size]` matrix `A` with `out = A @ in`.
  """
  # PyTorch's CPU kernel works in float32 with the scale rounded to float32
  # and `scale * (i + 0.5) - 0.5` contracted to one fused multiply-add (one
  # rounding). The source index of a far pixel is ~200, so any other rounding
  # moves outputs by ~1e-5; this one matches the golden crop to 1e-7. The
  # float64 product below is exact, so rounding once to float32 is the FMA.
  f32 = np.float32
  scale = np.float64(f32(in_size) / f32(out_size))
  src = (scale * (np.arange(out_size) + 0.5) - 0.5).astype(f32)
  src = np.maximum(src, f32(0.0))
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = np.clip(src - lo.astype(f32), f32(0.0), f32(1.0))
  matrix = np.zeros((out_size, in_size), f32)
  rows = np.arange(out_size)
  np.add.at(matrix, (rows, lo), f32(1.0) - frac)
  np.add.at(matrix, (rows, hi), frac)
  return matrix


def crop_and_resize(images: jax.Array) -> jax.Array:
  """Crops the face and resizes it to 112x112 (reference `Crop_and_resize`).

  Args:
    images: NHWC float images in [0, 1], any square-ish generator size.

  Returns:
    `[B, 112, 112, C]` float32 faces.
  """
  (top, bottom), (left, right) = compute_crop_box(*images.shape[1:3])
  face = images[:, top:bottom, left:right, :].astype(jnp.float32)
  rows = jnp.asarray(create_interpolation_matrix(bottom - top, FACE_SIZE))
  cols = jnp.asarray(create_interpolation_matrix(right - left, FACE_SIZE))
  hp = jax.lax.Precision.HIGHEST  # Resizing must not lose bits to bf16 passes.
  face = jnp.einsum("oh,bhwc->bowc", rows, face, precision=hp)
  return jnp.einsum("pw,bowc->bopc", cols, face, precision=hp)


def generator_to_faces(images: jax.Array) -> jax.Array:
  """Generator output in about [-1, 1] -> 112x112 faces in [0, 1].

  Args:
    images: `[B, R, R, 3]` NHWC generator output.

  Returns:
    `[B, 112, 112, 3]` float32 faces in [0, 1].
  """
  x = (jnp.clip(images.astype(jnp.float32), -1.0, 1.0) + 1.0) / 2.0
  return crop_and_resize(x)


def normalise_for_teacher(faces: jax.Array) -> jax.Array:
  """ArcFace input: `(255 x - 127.5) / 128` (reference `src/ArcFace.py`)."""
  return (faces * 255.0 - 127.5) / 128.0


def normalise_for_student(faces: jax.Array) -> jax.Array:
  """Student input: `(x - 0.5) / 0.5`, i.e. [-1, 1]."""
  return (faces - 0.5) / 0.5


def quantise_faces(faces: jax.Array) -> jax.Array:
  """[0, 1] faces -> uint8 (round to nearest), as a static data set stores."""
  return jnp.round(jnp.clip(faces, 0.0, 1.0) * 255.0).astype(jnp.uint8)
