"""insightface's IJB 1:1 pipeline re-stated for tests (no network, no pandas).

A compact, independent statement of what
`recognition/arcface_torch/eval_ijbc.py` (deepinsight/insightface, read at
commit 1b8d928) computes, step by step, with the libraries upstream uses
where they are installed here:

1. `cv2.imread` each loose crop (BGR, EXIF orientation applied); landmarks
   parsed as float32 [5, 2]; the ArcFace template in float32 (x + 8 on the
   96-wide template); a similarity fitted from the landmarks to the template
   with skimage's `SimilarityTransform.estimate` (Umeyama's method: skimage
   is not installed here, so `umeyama` below re-states it, float32 inputs as
   upstream passes them); `cv2.warpAffine(img, M, (112, 112),
   borderValue=0.0)` (default `INTER_LINEAR`, `BORDER_CONSTANT`);
   BGR->RGB; the horizontal flip with `np.fliplr`.
2. Image and flip in one batch, `(x / 255 - 0.5) / 0.5`, the PyTorch model
   in eval mode; features `[emb, emb_flip]` concatenated, then summed
   (`F2`), times the float32 detector score (`D1`), no per-image norm.
3. `image2template_feature`: per template, media of one image keep it,
   media of several take the mean; the template sums its media (float64
   array); `sklearn.preprocessing.normalize` (zero rows stay zero).
4. `verification`: a template id -> row table; the dot product per pair.
5. `roc_curve(label, score)` (sklearn's when installed, else the same curve
   counted here); `np.flipud` both axes; for each FAR the first index of
   the minimum of `(|fpr - far|, index)`.
"""

import pathlib

import cv2
import numpy as np
import torch

FAR_LABELS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def arcface_template() -> np.ndarray:
  """Upstream's 5-point template: the 96x112 one moved 8 pixels right."""
  src = np.array(
      [
          [30.2946, 51.6963],
          [65.5318, 51.5014],
          [48.0252, 71.7366],
          [33.5493, 92.3655],
          [62.7299, 92.2041],
      ],
      dtype=np.float32,
  )
  src[:, 0] += 8.0
  return src


def umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
  """Least-squares similarity src -> dst (Umeyama 1991, eq. 40-42).

  Args:
    src: [K, 2] points.
    dst: [K, 2] points.

  Returns:
    3x3 homogeneous matrix (float64 container, arithmetic in the inputs'
    dtype, as skimage's `_umeyama`).
  """
  src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
  src_c, dst_c = src - src_mean, dst - dst_mean
  cov = dst_c.T @ src_c / len(src)
  u, s, vt = np.linalg.svd(cov)
  # A reflection is never the answer: flip the weakest axis instead.
  d = np.array([1.0, -1.0 if np.linalg.det(cov) < 0 else 1.0], cov.dtype)
  rotation = u @ np.diag(d) @ vt
  scale = (s @ d) / src_c.var(axis=0).sum()
  out = np.eye(3)
  out[:2, :2] = scale * rotation
  out[:2, 2] = dst_mean - scale * rotation @ src_mean
  return out


def align(bgr: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
  """Upstream `Embedding.get` up to the flip: uint8 RGB [112, 112, 3]."""
  matrix = umeyama(landmarks, arcface_template())[:2]
  face = cv2.warpAffine(bgr, matrix, (112, 112), borderValue=0.0)
  return cv2.cvtColor(face, cv2.COLOR_BGR2RGB)


def image_features(image_dir, lines, model, batch_size):
  """Step 1-2: score-weighted flip-summed features and the faceness scores.

  Args:
    image_dir: folder of the loose crops.
    lines: lines of `NAME_name_5pts_score.txt`.
    model: PyTorch face model in eval mode.
    batch_size: images per forward (with their flips: twice as many rows).

  Returns:
    `(features [N, D] float32, faceness_scores [N] float32)`.
  """
  blobs, scores = [], []
  for line in lines:
    fields = line.strip().split(" ")
    bgr = cv2.imread(str(pathlib.Path(image_dir) / fields[0]))
    lmk = np.array([float(x) for x in fields[1:-1]], np.float32).reshape(5, 2)
    face = align(bgr, lmk)
    blobs += [face.transpose(2, 0, 1), np.fliplr(face).transpose(2, 0, 1)]
    scores.append(fields[-1])
  blobs = np.stack(blobs)
  feats = []
  with torch.no_grad():
    for start in range(0, len(blobs), 2 * batch_size):
      x = torch.Tensor(blobs[start : start + 2 * batch_size].astype(float))
      x.div_(255).sub_(0.5).div_(0.5)
      out = model(x).numpy()
      feats.append(out.reshape(len(out) // 2, 2 * out.shape[1]))
  feats = np.concatenate(feats).astype(np.float32)
  half = feats.shape[1] // 2
  faceness = np.array(scores).astype(np.float32)
  return (feats[:, :half] + feats[:, half:]) * faceness[:, None], faceness


def image2template(feats, templates, medias):
  """Step 3: `(normalised template features [T, D], unique templates)`."""
  unique_templates = np.unique(templates)
  out = np.zeros((len(unique_templates), feats.shape[1]))
  for row, template in enumerate(unique_templates):
    (idx,) = np.where(templates == template)
    t_feats, t_medias = feats[idx], medias[idx]
    per_media = []
    for media, count in zip(*np.unique(t_medias, return_counts=True)):
      (m_idx,) = np.where(t_medias == media)
      if count == 1:
        per_media.append(t_feats[m_idx])
      else:
        per_media.append(np.mean(t_feats[m_idx], axis=0, keepdims=True))
    out[row] = np.sum(np.array(per_media), axis=0)
  norms = np.sqrt(np.sum(out * out, axis=1))
  norms[norms == 0] = 1.0  # sklearn's normalize leaves zero rows alone.
  return out / norms[:, None], unique_templates


def pair_scores(template_feats, unique_templates, p1, p2):
  """Step 4: cosine of each template pair through a dense id table."""
  table = np.zeros((max(unique_templates) + 1, 1), dtype=int)
  for row, template in enumerate(unique_templates):
    table[template] = row
  a, b = template_feats[table[p1]], template_feats[table[p2]]
  return np.sum(a * b, -1).flatten()


def roc_curve(labels, scores):
  """`sklearn.metrics.roc_curve(labels, scores)[:2]`."""
  try:
    from sklearn import metrics  # pylint: disable=g-import-not-at-top

    return metrics.roc_curve(labels, scores)[:2]
  except ImportError:
    pass
  pos = np.sort(scores[labels == 1])
  neg = np.sort(scores[labels == 0])
  thresholds = np.unique(scores)[::-1]
  tps = len(pos) - np.searchsorted(pos, thresholds, side="left")
  fps = len(neg) - np.searchsorted(neg, thresholds, side="left")
  # sklearn keeps the ends and every corner of the staircase.
  corner = np.r_[True, (np.diff(fps, 2) != 0) | (np.diff(tps, 2) != 0), True]
  fps, tps = np.r_[0, fps[corner]], np.r_[0, tps[corner]]
  return fps / len(neg), tps / len(pos)


def tar_at_far(labels, scores) -> dict[float, float]:
  """Step 5: upstream's table row, unrounded."""
  fpr, tpr = roc_curve(labels, scores)
  fpr, tpr = np.flipud(fpr), np.flipud(tpr)
  out = {}
  for far in FAR_LABELS:
    _, index = min(zip(abs(fpr - far), range(len(fpr))))
    out[far] = float(tpr[index])
  return out


def run(meta_dir, image_dir, name, model, batch_size=32):
  """The whole upstream pipeline on one IJB-format set.

  Args:
    meta_dir: folder with `NAME_face_tid_mid.txt` and the other two files.
    image_dir: folder of the loose crops.
    name: the meta prefix ('ijbc' upstream).
    model: PyTorch face model in eval mode (NCHW float32 input).
    batch_size: images per forward.

  Returns:
    `(tar_at_far {far: tar}, scores [P] float64)`.
  """
  meta_dir = pathlib.Path(meta_dir)
  tid = [
      l.split(" ")
      for l in (meta_dir / f"{name}_face_tid_mid.txt").read_text().splitlines()
  ]
  templates = np.array([r[1] for r in tid]).astype(int)
  medias = np.array([r[2] for r in tid]).astype(int)
  pair_path = meta_dir / f"{name}_template_pair_label.txt"
  pairs = np.array([l.split(" ") for l in pair_path.read_text().splitlines()])
  p1, p2, label = (pairs[:, i].astype(int) for i in range(3))
  lines = (meta_dir / f"{name}_name_5pts_score.txt").read_text().splitlines()
  feats, _ = image_features(image_dir, lines, model, batch_size)
  template_feats, unique = image2template(feats, templates, medias)
  scores = pair_scores(template_feats, unique, p1, p2)
  return tar_at_far(label, scores), scores
