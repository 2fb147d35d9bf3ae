"""IJB-B / IJB-C 1:1 template verification, as insightface's `eval_ijbc.py`.

Layout (the insightface IJB release; `NAME` is `ijbb` or `ijbc`):

  META_DIR/NAME_face_tid_mid.txt        image  template_id  media_id
  META_DIR/NAME_template_pair_label.txt template1  template2  label(0/1)
  META_DIR/NAME_name_5pts_score.txt     image  x1 y1 ... x5 y5  detector_score
  IMAGE_DIR/<image>                     loose crops (unaligned)

Protocol (upstream defaults: flip on, detector score on, no per-image
normalisation): each face is aligned to the ArcFace 112x112 template by a
similarity transform fitted to its 5 landmarks (least squares, the same fit
as `skimage.transform.SimilarityTransform.estimate`), warped as
`cv2.warpAffine` does (bilinear, zero border; `warp_affine` re-states
OpenCV 4's fixed-point kernel bit for bit, or OpenCV 5's float one, in
numpy: no OpenCV needed); its feature is
`emb(img) + emb(flip(img))` times its detector score; features are averaged
per media, summed per template, L2-normalised; a pair's score is the cosine
of its templates. TAR at FAR 1e-6 ... 1e-1 is read off sklearn's
`roc_curve` (re-stated in numpy, intermediate points dropped as sklearn
does) at the point whose FAR is nearest the target, as upstream does.

Already aligned 112x112 images (`aligned=True`) skip the warp.
"""

import dataclasses
import os
import pathlib
from typing import Callable, Iterator

import numpy as np
from PIL import Image
from PIL import ImageOps

from synthdistill_jax import errors
from synthdistill_jax import progress
from synthdistill_jax.evaluation import settings

FAR_TARGETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
# Pairs scored per step: IJB-C's 15.7M pairs at once would need two
# [P, D] float64 gathers (over 100 GB at D=512).
_PAIR_CHUNK = 1 << 16
IMAGE_SIZE = 112

# ArcFace 112x112 landmark template (x, y): eyes, nose, mouth corners.
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)


class IJBFormatError(ValueError):
  """A malformed IJB meta file or image; the message names file and line."""


@dataclasses.dataclass(frozen=True)
class IJBMeta:
  """The three meta files of an IJB set, row-aligned.

  Attributes:
    images: [N] image file names.
    templates: [N] template id of each image.
    medias: [N] media id of each image.
    landmarks: [N, 5, 2] float32 landmarks (x, y) in the loose crop.
    scores: [N] float32 detector (faceness) scores.
    pairs: [P, 2] template ids of each pair.
    labels: [P] 1 for genuine pairs, 0 for impostors.
  """

  images: tuple[str, ...]
  templates: np.ndarray
  medias: np.ndarray
  landmarks: np.ndarray
  scores: np.ndarray
  pairs: np.ndarray
  labels: np.ndarray


def _read_rows(path: pathlib.Path, columns: int) -> list[list[str]]:
  if not path.is_file():
    raise IJBFormatError(f"{path}: file not found")
  rows = []
  for n, line in enumerate(path.read_text().splitlines(), 1):
    fields = line.split()
    if not fields:
      continue
    if len(fields) != columns:
      raise IJBFormatError(
          f"{path}:{n}: expected {columns} columns, got {len(fields)}"
      )
    rows.append(fields)
  if not rows:
    raise IJBFormatError(f"{path}: empty")
  return rows


def _to_numbers(rows, cols, dtype, path: pathlib.Path) -> np.ndarray:
  try:
    return np.array([[dtype(r[c]) for c in cols] for r in rows])
  except ValueError as e:
    for n, r in enumerate(rows, 1):
      for c in cols:
        try:
          dtype(r[c])
        except ValueError:
          raise IJBFormatError(
              f"{path}: data row {n}, column {c + 1}: {r[c]!r} is not a"
              f" valid {dtype.__name__}"
          ) from None
    raise IJBFormatError(f"{path}: {e}") from None


def read_meta(meta_dir: str | os.PathLike, name: str) -> IJBMeta:
  """Reads and cross-checks the three meta files.

  Args:
    meta_dir: folder with `NAME_face_tid_mid.txt` and the other two files.
    name: the set's prefix, `ijbb` or `ijbc` (or any other).

  Returns:
    An `IJBMeta`.

  Raises:
    IJBFormatError: a missing or malformed file (one-line message).
  """
  meta_dir = pathlib.Path(meta_dir)
  tid_path = meta_dir / f"{name}_face_tid_mid.txt"
  pair_path = meta_dir / f"{name}_template_pair_label.txt"
  lmk_path = meta_dir / f"{name}_name_5pts_score.txt"
  tid_rows = _read_rows(tid_path, 3)
  pair_rows = _read_rows(pair_path, 3)
  lmk_rows = _read_rows(lmk_path, 12)
  ids = _to_numbers(tid_rows, (1, 2), int, tid_path)
  pairs = _to_numbers(pair_rows, (0, 1, 2), int, pair_path)
  lmk = _to_numbers(lmk_rows, range(1, 12), float, lmk_path)
  if len(tid_rows) != len(lmk_rows):
    raise IJBFormatError(
        f"{lmk_path}: {len(lmk_rows)} rows but {tid_path.name} has"
        f" {len(tid_rows)}"
    )
  for n, (a, b) in enumerate(zip(tid_rows, lmk_rows), 1):
    if a[0] != b[0]:
      raise IJBFormatError(
          f"{lmk_path}: row {n} is {b[0]!r} but {tid_path.name} row {n} is"
          f" {a[0]!r} (the files must list the same images in order)"
      )
  if not np.isin(pairs[:, 2], (0, 1)).all():
    raise IJBFormatError(f"{pair_path}: labels must be 0 or 1")
  unknown = np.setdiff1d(pairs[:, :2], ids[:, 0])
  if unknown.size:
    raise IJBFormatError(
        f"{pair_path}: template {int(unknown[0])} has no image in"
        f" {tid_path.name}"
    )
  if len(np.unique(pairs[:, 2])) != 2:
    raise IJBFormatError(f"{pair_path}: needs genuine and impostor pairs")
  return IJBMeta(
      images=tuple(r[0] for r in tid_rows),
      templates=ids[:, 0],
      medias=ids[:, 1],
      landmarks=lmk[:, :10].astype(np.float32).reshape(-1, 5, 2),
      scores=lmk[:, 10].astype(np.float32),
      pairs=pairs[:, :2],
      labels=pairs[:, 2],
  )


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
  """Least-squares similarity (scale, rotation, shift) mapping src to dst.

  Solves `[a -b; b a] p + [tx, ty] = q` for all point pairs; this is the
  same optimum as Umeyama's method used by skimage's `SimilarityTransform`.

  Args:
    src: [K, 2] points (x, y).
    dst: [K, 2] points (x, y).

  Returns:
    The 2x3 matrix M with `dst ~= M @ [x, y, 1]`.
  """
  src = np.asarray(src, np.float64)
  dst = np.asarray(dst, np.float64)
  x, y = src[:, 0], src[:, 1]
  ones, zeros = np.ones_like(x), np.zeros_like(x)
  rows_u = np.stack([x, -y, ones, zeros], 1)
  rows_v = np.stack([y, x, zeros, ones], 1)
  design = np.concatenate([rows_u, rows_v])
  target = np.concatenate([dst[:, 0], dst[:, 1]])
  (a, b, tx, ty), *_ = np.linalg.lstsq(design, target, rcond=None)
  return np.array([[a, -b, tx], [b, a, ty]])


def invert_affine(matrix: np.ndarray) -> np.ndarray:
  """Inverse of a 2x3 affine map, as `cv2.invertAffineTransform`.

  A singular map (all landmarks on one point) has no inverse; OpenCV then
  uses the zero matrix, so every output pixel samples the source's (0, 0).

  Args:
    matrix: 2x3 affine map.

  Returns:
    The 2x3 float64 inverse.
  """
  (a, b, c), (d, e, f) = np.asarray(matrix, np.float64)
  det = a * e - b * d
  det = 1.0 / det if det != 0.0 else 0.0
  ia, ib, id_, ie = e * det, -b * det, -d * det, a * det
  return np.array(
      [[ia, ib, -ia * c - ib * f], [id_, ie, -id_ * c - ie * f]], np.float64
  )


def _blend(image, x0, y0, wx, wy):
  """Sum over the 2x2 neighbours of `image[y0 + dy, x0 + dx] * wy * wx`.

  Neighbours outside the image count as 0 (`BORDER_CONSTANT`, value 0).
  `wx`, `wy` are the weights of the dx/dy = 0 and 1 neighbours.
  """
  height, width = image.shape[:2]
  # Far-away corners are outside either way; clipping keeps the ints small.
  x0 = np.clip(x0, -2, width)
  y0 = np.clip(y0, -2, height)
  total = 0
  for dy in (0, 1):
    for dx in (0, 1):
      yy, xx = y0 + dy, x0 + dx
      inside = (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
      pixels = image[np.clip(yy, 0, height - 1), np.clip(xx, 0, width - 1)]
      weight = np.where(inside, wy[dy] * wx[dx], 0)
      total = total + pixels * weight.reshape(
          weight.shape + (1,) * (image.ndim - 2)
      )
  return total


def _blend_opencv4(image, inverse, size):
  # OpenCV 2-4 `warpAffine` + `remap` for 8-bit INTER_LINEAR: source
  # positions in 1/1024 pixel (AB_BITS=10, cvRound of each term), cut to
  # 1/32 pixel with a half-step rounding offset (INTER_BITS=5); weights
  # (32 - f) * f' * 32 in units of 2^-15, summed in integers and rounded
  # half up by `(sum + 2^14) >> 15`.
  grid = np.arange(size, dtype=np.float64)
  a_delta = np.rint(inverse[0, 0] * grid * 1024).astype(np.int64)
  b_delta = np.rint(inverse[1, 0] * grid * 1024).astype(np.int64)
  x_row = np.rint((inverse[0, 1] * grid + inverse[0, 2]) * 1024)
  y_row = np.rint((inverse[1, 1] * grid + inverse[1, 2]) * 1024)
  x = (x_row.astype(np.int64)[:, None] + 16 + a_delta[None, :]) >> 5
  y = (y_row.astype(np.int64)[:, None] + 16 + b_delta[None, :]) >> 5
  fx, fy = x & 31, y & 31
  total = _blend(
      image, x >> 5, y >> 5, (32 - fx, fx), (32 * (32 - fy), 32 * fy)
  )
  return (total + (1 << 14)) >> 15


def _blend_opencv5(image, inverse, size):
  # OpenCV 5: float bilinear weights, rounded to the nearest level (ties
  # to even). Float64 here; OpenCV 5.0's own arithmetic puts 0.001 % of
  # pixels one level apart (see `warp_affine`).
  grid = np.arange(size, dtype=np.float64)
  xs, ys = grid[None, :], grid[:, None]
  src_x = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
  src_y = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
  x0, y0 = np.floor(src_x), np.floor(src_y)
  fx, fy = src_x - x0, src_y - y0
  total = _blend(
      image.astype(np.float64),
      x0.astype(np.int64),
      y0.astype(np.int64),
      (1.0 - fx, fx),
      (1.0 - fy, fy),
  )
  return np.rint(total)


WARPS = {"opencv4": _blend_opencv4, "opencv5": _blend_opencv5}
DEFAULT_WARP = settings.DEFAULT_WARP


def warp_affine(
    image: np.ndarray, matrix: np.ndarray, size: int, warp: str = DEFAULT_WARP
) -> np.ndarray:
  """`cv2.warpAffine(image, matrix, (size, size))`: bilinear, zero border.

  Each output pixel centre (x, y) is mapped back to the source by the
  inverse of `matrix` (pixel centres at integer coordinates, as OpenCV);
  the four neighbouring source pixels are blended with bilinear weights,
  neighbours outside the image counting as 0 (`BORDER_CONSTANT` with
  `borderValue=0`: the face fades into the border over one pixel), and the
  result is rounded to the nearest level and saturated to uint8. Two
  kernels, as OpenCV has had two:

  * `'opencv4'` (default): OpenCV 2.x-4.x's fixed-point kernel (source
    positions rounded to 1/32 pixel, 15-bit integer weights, ties rounded
    up): every OpenCV release before 5.0, hence the published insightface
    IJB numbers. Bit-identical to `cv2.warpAffine` of OpenCV 4.10, 4.12 and 4.14.
  * `'opencv5'`: OpenCV 5's float kernel, in float64 (ties to even); equal
    to OpenCV 5.0 on 99.999 % of pixels, never more than one level apart.

  The two kernels differ by at most one level inside the image (2.6 % of
  the pixels of smooth faces, mean difference 0.015) and a few levels
  where the face meets the border (measured in `tests/test_ijb.py`).

  Args:
    image: uint8 [H, W, C] or [H, W] source image.
    matrix: 2x3 forward map (source -> output), pixel-centre coordinates.
    size: output width and height.
    warp: `'opencv4'` or `'opencv5'`.

  Returns:
    uint8 [size, size, C] (or [size, size] for a 2-D image).
  """
  errors.check_choice(warp, WARPS, "warp")
  image = np.asarray(image, np.uint8)
  inverse = invert_affine(matrix)
  if not np.isfinite(inverse).all():  # NaN landmarks: only the border.
    return np.zeros((size, size) + image.shape[2:], np.uint8)
  total = WARPS[warp](image, inverse, size)
  return np.clip(total, 0, 255).astype(np.uint8)


def read_image(path: pathlib.Path) -> np.ndarray:
  """Decodes an image as `cv2.imread` + BGR->RGB would: uint8 RGB.

  Like OpenCV's `imread`, the EXIF orientation tag is applied (upstream
  reads loose crops with `cv2.imread`; its landmarks refer to the
  upright image); alpha is dropped, grey is replicated.

  Args:
    path: the image file.

  Returns:
    uint8 [H, W, 3].

  Raises:
    IJBFormatError: an unreadable or corrupt file (one line).
  """
  try:
    with Image.open(path) as img:
      img = ImageOps.exif_transpose(img).convert("RGB")
  except Exception as e:  # PIL raises many types for bad files.
    raise IJBFormatError(
        f"{path}: cannot read image ({type(e).__name__}: {e})"
    ) from None
  return np.asarray(img, np.uint8)


def load_face(
    path: pathlib.Path,
    landmarks: np.ndarray | None,
    aligned: bool,
    warp: str = DEFAULT_WARP,
) -> np.ndarray:
  """Reads one face and aligns it to the ArcFace template.

  Args:
    path: the image file.
    landmarks: [5, 2] landmarks in the image (unused when `aligned`).
    aligned: the image is already an aligned 112x112 face.
    warp: the `warp_affine` kernel, `'opencv4'` or `'opencv5'`.

  Returns:
    uint8 [112, 112, 3] RGB.
  """
  img = read_image(path)
  if aligned:
    if img.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
      raise IJBFormatError(
          f"{path}: is {img.shape[1]}x{img.shape[0]}, but aligned=True needs"
          f" {IMAGE_SIZE}x{IMAGE_SIZE}"
      )
    return img
  matrix = estimate_similarity(landmarks, ARCFACE_TEMPLATE)
  return warp_affine(img, matrix, IMAGE_SIZE, warp)


def iterate_faces(
    meta: IJBMeta,
    image_dir: str | os.PathLike,
    batch_size: int,
    aligned: bool = False,
    warp: str = DEFAULT_WARP,
) -> Iterator[np.ndarray]:
  """Streams the aligned faces of every meta row in order.

  Args:
    meta: from `read_meta`.
    image_dir: folder of the images the meta files name.
    batch_size: faces per batch.
    aligned: images are aligned 112x112 faces already.
    warp: the `warp_affine` kernel, `'opencv4'` or `'opencv5'`.

  Yields:
    uint8 NHWC batches [b, 112, 112, 3].
  """
  image_dir = pathlib.Path(image_dir)
  for start in range(0, len(meta.images), batch_size):
    stop = min(start + batch_size, len(meta.images))
    yield np.stack(
        [
            load_face(
                image_dir / meta.images[i], meta.landmarks[i], aligned, warp
            )
            for i in range(start, stop)
        ]
    )


def pool_templates(
    features: np.ndarray,
    templates: np.ndarray,
    medias: np.ndarray,
    progress_bar: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
  """Media-average, template-sum, then L2 normalisation (`image2template`).

  Args:
    features: [N, D] per-image features (already score-weighted).
    templates: [N] template ids.
    medias: [N] media ids.
    progress_bar: show the templates pooled (`synthdistill_jax.progress`).

  Returns:
    `(template_features [T, D] float64 normalised, unique_templates [T])`.
  """
  unique_templates = np.unique(templates)
  pooled = np.zeros((len(unique_templates), features.shape[1]))
  bar = progress.create(
      unique_templates, desc="IJB templates", unit="tpl", enabled=progress_bar
  )
  for t, template in enumerate(bar):
    (rows,) = np.nonzero(templates == template)
    feats, media = features[rows], medias[rows]
    per_media = [np.mean(feats[media == m], axis=0) for m in np.unique(media)]
    pooled[t] = np.sum(per_media, axis=0)
  norms = np.sqrt(np.einsum("ij,ij->i", pooled, pooled))
  norms[norms == 0.0] = 1.0
  return pooled / norms[:, None], unique_templates


def score_pairs(template_features, unique_templates, pairs) -> np.ndarray:
  """Cosine score of each template pair.

  Args:
    template_features: [T, D] L2-normalised template features.
    unique_templates: [T] sorted template ids (rows of the features).
    pairs: [P, 2] template ids.

  Returns:
    [P] float64 scores.
  """
  index = np.searchsorted(unique_templates, pairs)
  return np.sum(
      template_features[index[:, 0]] * template_features[index[:, 1]], -1
  )


def roc_curve(labels: np.ndarray, scores: np.ndarray):
  """`sklearn.metrics.roc_curve(labels, scores)` (drop_intermediate=True).

  Args:
    labels: [P] 1 for genuine pairs, 0 for impostors.
    scores: [P] similarity scores (higher = more similar).

  Returns:
    `(fpr, tpr, thresholds)`.
  """
  labels = np.asarray(labels) == 1
  scores = np.asarray(scores, np.float64)
  order = np.argsort(scores, kind="mergesort")[::-1]
  scores, labels = scores[order], labels[order]
  distinct = np.nonzero(np.diff(scores))[0]
  idx = np.r_[distinct, labels.size - 1]
  tps = np.cumsum(labels, dtype=np.float64)[idx]
  fps = 1 + idx - tps
  thresholds = scores[idx]
  if len(fps) > 2:
    # Points in the middle of two equal steps add nothing to the curve.
    keep = np.nonzero(
        np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True]
    )[0]
    fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
  tps, fps = np.r_[0, tps], np.r_[0, fps]
  thresholds = np.r_[np.inf, thresholds]
  return fps / fps[-1], tps / tps[-1], thresholds


def tar_at_far(fpr, tpr, targets=FAR_TARGETS) -> dict[float, float]:
  """TAR at the ROC point whose FAR is nearest each target (upstream rule).

  Among equally near points the one with the highest TAR wins (upstream
  flips the curve and takes the first minimum).

  Args:
    fpr: ROC false-positive rates, from `roc_curve`.
    tpr: ROC true-positive rates.
    targets: FARs to read.

  Returns:
    `{far_target: tar}`.
  """
  fpr, tpr = np.flipud(fpr), np.flipud(tpr)
  return {t: float(tpr[int(np.argmin(np.abs(fpr - t)))]) for t in targets}


def evaluate(
    meta: IJBMeta,
    image_dir: str | os.PathLike,
    embed: Callable[[Iterator[np.ndarray]], tuple[np.ndarray, np.ndarray]],
    *,
    batch_size: int = 64,
    aligned: bool = False,
    warp: str = DEFAULT_WARP,
    progress_bar: bool = True,
) -> dict:
  """Runs the 1:1 protocol.

  Args:
    meta: from `read_meta`.
    image_dir: folder of the images named in the meta files.
    embed: maps a stream of uint8 batches to `(emb, emb_flip)`, [N, D] each.
    batch_size: images per batch.
    aligned: images are aligned 112x112 faces already.
    warp: the `warp_affine` kernel, `'opencv4'` or `'opencv5'`.
    progress_bar: show images, templates and pairs as they are done.

  Returns:
    `{'tar_at_far': {far: tar}, 'fpr', 'tpr', 'scores', 'auc'}`.
  """
  errors.check_choice(warp, WARPS, "warp")
  faces = progress.count_batches(
      iterate_faces(meta, image_dir, batch_size, aligned, warp),
      total=len(meta.images),
      desc="IJB images",
      enabled=progress_bar,
  )
  emb, emb_flip = embed(faces)
  feats = np.asarray(emb, np.float32) + np.asarray(emb_flip, np.float32)
  feats = feats * meta.scores[:, None]
  template_feats, unique = pool_templates(
      feats, meta.templates, meta.medias, progress_bar
  )
  scores = []
  with progress.create(
      total=len(meta.pairs),
      desc="IJB pairs",
      unit="pair",
      enabled=progress_bar,
  ) as bar:
    for start in range(0, len(meta.pairs), _PAIR_CHUNK):
      chunk = meta.pairs[start : start + _PAIR_CHUNK]
      scores.append(score_pairs(template_feats, unique, chunk))
      bar.update(len(chunk))
  scores = np.concatenate(scores)
  fpr, tpr, _ = roc_curve(meta.labels, scores)
  return {
      "tar_at_far": tar_at_far(fpr, tpr),
      "fpr": fpr,
      "tpr": tpr,
      "scores": scores,
      "auc": float(np.trapezoid(tpr, fpr)),
  }
