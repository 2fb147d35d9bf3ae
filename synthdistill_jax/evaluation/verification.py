"""Face-verification protocol math: insightface 10-fold accuracy and VAL@FAR.

Re-states `recognition/arcface_torch/eval/verification.py` of
deepinsight/insightface in vectorised numpy, with the same numbers bit for bit:

* embeddings of pair i are rows 2i and 2i+1, L2-normalised (float64);
* distance = squared L2; a pair is predicted "same" iff `dist < threshold`;
* 10 contiguous, unshuffled folds (sklearn `KFold(10, shuffle=False)`, which
  `np.array_split` reproduces); in each, the threshold of `arange(0, 4, 0.01)`
  with the best accuracy on the other 9 folds (first argmax) is applied to the
  test fold; accuracy = mean +- std over the test folds;
* VAL@FAR=1e-3 on `arange(0, 4, 0.001)`: the train-fold FAR curve is inverted
  with SciPy <= 1.8 `interp1d(kind='slinear')` semantics (a degree-1 B-spline
  through points with repeated x; SciPy >= 1.9 refuses those, insightface
  issues #2152 and #2290).

Counts are integers taken with `searchsorted` on sorted distances, so every
rate is the same `float(a) / float(b)` the official loop computes.
"""

import dataclasses

import numpy as np

NUM_FOLDS = 10
FAR_TARGET = 1e-3


@dataclasses.dataclass(frozen=True)
class VerificationResult:
  """What `evaluate` returns; field names follow insightface.

  Attributes:
    tpr: [T] true-positive rate per ROC threshold, mean over test folds.
    fpr: [T] false-positive rate per ROC threshold, mean over test folds.
    thresholds: [T] the ROC thresholds (`arange(0, 4, 0.01)`).
    accuracy: [folds] test accuracy of each fold at its best threshold.
    best_thresholds: [folds] threshold chosen on the other folds.
    val: VAL (true-accept rate) at FAR = 1e-3, mean over folds.
    val_std: standard deviation of VAL over folds.
    far: achieved FAR, mean over folds.
  """

  tpr: np.ndarray
  fpr: np.ndarray
  thresholds: np.ndarray
  accuracy: np.ndarray
  best_thresholds: np.ndarray
  val: float
  val_std: float
  far: float


def roc_thresholds() -> np.ndarray:
  """The accuracy/ROC threshold grid, built exactly as upstream."""
  return np.arange(0, 4, 0.01)


def val_thresholds() -> np.ndarray:
  """The VAL threshold grid, built exactly as upstream."""
  return np.arange(0, 4, 0.001)


def l2_normalize(x: np.ndarray) -> np.ndarray:
  """Row-wise L2 normalisation as `sklearn.preprocessing.normalize` does it.

  Args:
    x: [N, D] array (kept in its float dtype).

  Returns:
    `x / ||x||` per row; an all-zero row stays zero.
  """
  x = np.array(x, copy=True)
  norms = np.sqrt(np.einsum("ij,ij->i", x, x))
  norms[norms == 0.0] = 1.0
  x /= norms[:, np.newaxis]
  return x


def pair_distances(embeddings: np.ndarray) -> np.ndarray:
  """Squared L2 distance of rows 2i and 2i+1, in float64.

  Args:
    embeddings: [2N, D] (already normalised) embeddings.

  Returns:
    [N] float64 distances.
  """
  embeddings = np.asarray(embeddings, np.float64)
  diff = np.subtract(embeddings[0::2], embeddings[1::2])
  return np.sum(np.square(diff), 1)


def split_folds(num_pairs: int, num_folds: int = NUM_FOLDS) -> list[np.ndarray]:
  """Test-fold indices of `KFold(num_folds, shuffle=False)`: contiguous blocks.

  Args:
    num_pairs: number of pairs.
    num_folds: number of folds.

  Returns:
    A list of index arrays, the first `num_pairs % num_folds` one longer.
  """
  if num_pairs < num_folds:
    raise ValueError(
        f"{num_pairs} pairs cannot be split into {num_folds} folds"
    )
  return np.array_split(np.arange(num_pairs), num_folds)


def _count_below(sorted_dist: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
  # Number of distances strictly below each threshold (`dist < thr`).
  return np.searchsorted(sorted_dist, thresholds, side="left")


def _fold_counts(dist, issame, folds, thresholds):
  """Per fold and threshold: accepted same pairs, accepted different pairs.

  Returns:
    `(ta, fa, n_same, n_diff)`: ta/fa [folds, T] int, n_same/n_diff [folds].
  """
  ta = np.zeros((len(folds), len(thresholds)), np.int64)
  fa = np.zeros_like(ta)
  n_same = np.zeros(len(folds), np.int64)
  n_diff = np.zeros(len(folds), np.int64)
  for f, idx in enumerate(folds):
    same = issame[idx]
    ta[f] = _count_below(np.sort(dist[idx][same]), thresholds)
    fa[f] = _count_below(np.sort(dist[idx][~same]), thresholds)
    n_same[f], n_diff[f] = same.sum(), (~same).sum()
  return ta, fa, n_same, n_diff


def _safe_rate(num: np.ndarray, den) -> np.ndarray:
  # Upstream: `0 if den == 0 else float(num) / float(den)`.
  num = np.asarray(num, np.float64)
  den = np.broadcast_to(np.asarray(den, np.float64), num.shape)
  out = np.zeros_like(num)
  np.divide(num, den, out=out, where=den != 0)
  return out


def calculate_roc(dist, issame, num_folds=NUM_FOLDS):
  """10-fold ROC and accuracy (`calculate_roc` of insightface, pca=0).

  Args:
    dist: [N] float64 pair distances.
    issame: [N] bool labels.
    num_folds: number of folds.

  Returns:
    `(tpr, fpr, accuracy, best_thresholds)`.
  """
  thresholds = roc_thresholds()
  folds = split_folds(len(dist), num_folds)
  ta, fa, n_same, n_diff = _fold_counts(dist, issame, folds, thresholds)
  sizes = np.array([len(f) for f in folds])
  # Correct decisions = accepted same + rejected different.
  correct = ta + (n_diff[:, None] - fa)
  tprs = _safe_rate(ta, n_same[:, None])
  fprs = _safe_rate(fa, n_diff[:, None])
  accuracy = np.zeros(num_folds)
  best = np.zeros(num_folds)
  for f in range(num_folds):
    train_correct = correct.sum(0) - correct[f]
    train_size = sizes.sum() - sizes[f]
    acc_train = train_correct.astype(np.float64) / float(train_size)
    i = int(np.argmax(acc_train))
    best[f] = thresholds[i]
    accuracy[f] = float(correct[f, i]) / float(sizes[f])
  return np.mean(tprs, 0), np.mean(fprs, 0), accuracy, best


def invert_far_slinear(far_train, thresholds, far_target):
  """SciPy <= 1.8 `interp1d(far_train, thresholds, kind='slinear')(target)`.

  A degree-1 B-spline with knots `[x0, x0, x1, ..., xn, xn]` evaluated at the
  target uses the interval starting at the *last* knot <= target, so repeated
  FAR values resolve to the highest threshold that still has them.

  Args:
    far_train: [T] non-decreasing FAR per threshold.
    thresholds: [T] thresholds.
    far_target: FAR to invert, within `[far_train[0], far_train[-1]]`.

  Returns:
    The interpolated threshold (float64).
  """
  (below,) = np.nonzero(far_train <= far_target)
  i = int(below[-1])
  if i == len(thresholds) - 1:
    return float(thresholds[-1])
  x0, x1 = far_train[i], far_train[i + 1]
  y0, y1 = thresholds[i], thresholds[i + 1]
  return float(y0 + (y1 - y0) * (far_target - x0) / (x1 - x0))


def calculate_val(dist, issame, far_target=FAR_TARGET, num_folds=NUM_FOLDS):
  """VAL at a FAR target (`calculate_val` of insightface).

  Args:
    dist: [N] float64 pair distances.
    issame: [N] bool labels.
    far_target: the FAR whose threshold is looked up on the train folds.
    num_folds: number of folds.

  Returns:
    `(val_mean, val_std, far_mean)`.
  """
  thresholds = val_thresholds()
  folds = split_folds(len(dist), num_folds)
  ta, fa, n_same, n_diff = _fold_counts(dist, issame, folds, thresholds)
  val = np.zeros(num_folds)
  far = np.zeros(num_folds)
  for f, idx in enumerate(folds):
    # Upstream divides without a zero check here; a fold (or train set) with
    # no pair of one kind would divide by zero there too.
    far_train = (fa.sum(0) - fa[f]).astype(np.float64) / float(
        n_diff.sum() - n_diff[f]
    )
    if np.max(far_train) >= far_target:
      threshold = invert_far_slinear(far_train, thresholds, far_target)
    else:
      threshold = 0.0
    accept = dist[idx] < threshold
    same = issame[idx]
    val[f] = float(np.sum(accept & same)) / float(np.sum(same))
    far[f] = float(np.sum(accept & ~same)) / float(np.sum(~same))
  return float(np.mean(val)), float(np.std(val)), float(np.mean(far))


def check_folds(issame: np.ndarray, num_folds: int = NUM_FOLDS) -> None:
  """Checks that the labels can be scored: every fold has both kinds.

  Args:
    issame: [N] bool labels.
    num_folds: number of folds.

  Raises:
    ValueError: fewer pairs than folds, or a fold of one kind only (upstream
      would divide by zero in `calculate_val_far`).
  """
  issame = np.asarray(issame, bool)
  for f, idx in enumerate(split_folds(len(issame), num_folds)):
    if issame[idx].all() or not issame[idx].any():
      raise ValueError(
          f"fold {f} (pairs {idx[0]}..{idx[-1]}) needs both same and"
          " different pairs"
      )


def evaluate(
    embeddings: np.ndarray, issame: np.ndarray, num_folds: int = NUM_FOLDS
) -> VerificationResult:
  """The insightface `evaluate(embeddings, actual_issame, nrof_folds)`.

  Args:
    embeddings: [2N, D] L2-normalised embeddings; pair i = rows 2i, 2i+1.
    issame: [N] bool, True for same-identity pairs.
    num_folds: number of folds (10 in every benchmark).

  Returns:
    A `VerificationResult`.
  """
  issame = np.asarray(issame, bool)
  if len(embeddings) != 2 * len(issame):
    raise ValueError(
        f"{len(embeddings)} embeddings for {len(issame)} pairs (need 2 per"
        " pair)"
    )
  check_folds(issame, num_folds)
  dist = pair_distances(embeddings)
  tpr, fpr, accuracy, best = calculate_roc(dist, issame, num_folds)
  val, val_std, far = calculate_val(dist, issame, FAR_TARGET, num_folds)
  return VerificationResult(
      tpr=tpr,
      fpr=fpr,
      thresholds=roc_thresholds(),
      accuracy=accuracy,
      best_thresholds=best,
      val=val,
      val_std=val_std,
      far=far,
  )


def combine_flip(emb: np.ndarray, emb_flip: np.ndarray | None) -> np.ndarray:
  """insightface's test-time embedding: `normalize(emb + emb_flip)` in float64.

  Args:
    emb: [2N, D] raw embeddings of the images.
    emb_flip: [2N, D] raw embeddings of the flipped images, or None for the
      accuracy without flip.

  Returns:
    [2N, D] float64 L2-normalised embeddings.
  """
  total = np.asarray(emb, np.float64)
  if emb_flip is not None:
    total = total + np.asarray(emb_flip, np.float64)
  return l2_normalize(total)
