"""The 10-fold verification protocol against the official golden outputs.

The golden case holds the outputs of insightface's own `evaluate`; the random
cases compare with a plain per-threshold loop written from the protocol, with
SciPy's `BSpline` standing in for SciPy <= 1.8 `interp1d(kind='slinear')`.
"""

import numpy as np
import pytest

from synthdistill_jax.evaluation import verification
from tests import golden


def test_golden_verification_exact():
  arrays = golden.load_arrays("verification")
  result = verification.evaluate(
      arrays["embeddings"], arrays["actual_issame"], num_folds=10
  )
  # Exact: the same integer counts divided as upstream divides them.
  np.testing.assert_array_equal(result.tpr, arrays["tpr"])
  np.testing.assert_array_equal(result.fpr, arrays["fpr"])
  np.testing.assert_array_equal(result.accuracy, arrays["accuracy"])
  np.testing.assert_array_equal(
      result.best_thresholds, arrays["best_thresholds"]
  )
  assert abs(result.val - float(arrays["val"])) <= 1e-12
  assert abs(result.val_std - float(arrays["val_std"])) <= 1e-12
  assert abs(result.far - float(arrays["far"])) <= 1e-12
  assert np.mean(result.accuracy) == pytest.approx(0.8866666666666667, 1e-15)


def _loop_accuracy(threshold, dist, issame):
  predict = dist < threshold
  tp = np.sum(predict & issame)
  fp = np.sum(predict & ~issame)
  tn = np.sum(~predict & ~issame)
  fn = np.sum(~predict & issame)
  tpr = 0 if tp + fn == 0 else float(tp) / float(tp + fn)
  fpr = 0 if fp + tn == 0 else float(fp) / float(fp + tn)
  return tpr, fpr, float(tp + tn) / dist.size


def _slinear(x, y, x_new):
  # SciPy <= 1.8 built exactly this spline for kind='slinear' (no
  # duplicate check); BSpline itself accepts repeated knots.
  interpolate = pytest.importorskip("scipy.interpolate")
  spline = interpolate.BSpline(np.r_[x[0], x, x[-1]], y, 1)
  return float(spline(x_new))


def _reference(embeddings, issame, folds=10):
  """Loop re-statement of the protocol, threshold by threshold."""
  e1, e2 = embeddings[0::2], embeddings[1::2]
  dist = np.sum(np.square(e1 - e2), 1)
  n = len(issame)
  bounds = np.cumsum([0] + [len(a) for a in np.array_split(np.arange(n), 10)])
  fold_sets = []
  for f in range(folds):
    test = np.arange(bounds[f], bounds[f + 1])
    train = np.setdiff1d(np.arange(n), test)
    fold_sets.append((train, test))
  thr = np.arange(0, 4, 0.01)
  tprs = np.zeros((folds, len(thr)))
  fprs = np.zeros((folds, len(thr)))
  acc = np.zeros(folds)
  for f, (train, test) in enumerate(fold_sets):
    acc_train = [_loop_accuracy(t, dist[train], issame[train])[2] for t in thr]
    best = int(np.argmax(acc_train))
    for j, t in enumerate(thr):
      tprs[f, j], fprs[f, j], _ = _loop_accuracy(t, dist[test], issame[test])
    acc[f] = _loop_accuracy(thr[best], dist[test], issame[test])[2]
  thr_val = np.arange(0, 4, 0.001)
  val, far = np.zeros(folds), np.zeros(folds)
  for f, (train, test) in enumerate(fold_sets):
    d, s = dist[train], issame[train]
    far_train = np.array(
        [np.sum((d < t) & ~s) / float(np.sum(~s)) for t in thr_val]
    )
    t = _slinear(far_train, thr_val, 1e-3) if far_train.max() >= 1e-3 else 0.0
    d, s = dist[test], issame[test]
    val[f] = np.sum((d < t) & s) / float(np.sum(s))
    far[f] = np.sum((d < t) & ~s) / float(np.sum(~s))
  return np.mean(tprs, 0), np.mean(fprs, 0), acc, val, far


@pytest.mark.parametrize("seed,pairs,dim", [(0, 600, 32), (1, 437, 16)])
def test_random_embeddings_match_loop_reference(seed, pairs, dim):
  rng = np.random.default_rng(seed)
  issame = np.tile(np.r_[np.ones(5, bool), np.zeros(5, bool)], pairs)[:pairs]
  rng.shuffle(issame)
  base = rng.standard_normal((pairs, dim))
  e1 = base + 1.2 * rng.standard_normal((pairs, dim))
  other = np.where(issame[:, None], base, rng.standard_normal((pairs, dim)))
  e2 = other + 1.2 * rng.standard_normal((pairs, dim))
  raw = np.stack([e1, e2], 1).reshape(2 * pairs, dim)
  emb = verification.combine_flip(raw, None)
  result = verification.evaluate(emb, issame)
  tpr, fpr, acc, val, far = _reference(emb, issame)
  np.testing.assert_array_equal(result.tpr, tpr)
  np.testing.assert_array_equal(result.fpr, fpr)
  np.testing.assert_array_equal(result.accuracy, acc)
  assert abs(result.val - np.mean(val)) <= 1e-12
  assert abs(result.val_std - np.std(val)) <= 1e-12
  assert abs(result.far - np.mean(far)) <= 1e-12
  assert 0.55 < np.mean(result.accuracy) < 0.99  # Not degenerate.


def test_invert_far_matches_bspline_on_repeated_values():
  rng = np.random.default_rng(3)
  thresholds = np.arange(0, 4, 0.001)
  for _ in range(20):
    far = np.sort(rng.integers(0, 6, len(thresholds))) / 3000.0
    target = rng.choice([1e-3, 5e-4, far[len(far) // 2]])
    if far.max() < target:
      continue
    ours = verification.invert_far_slinear(far, thresholds, target)
    assert abs(ours - _slinear(far, thresholds, target)) <= 1e-12


def test_flip_combination_and_normalisation():
  emb = np.array([[3.0, 4.0], [0.0, 0.0]], np.float32)
  flip = np.array([[3.0, 4.0], [0.0, 0.0]], np.float32)
  out = verification.combine_flip(emb, flip)
  assert out.dtype == np.float64
  np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]])


def test_errors_are_clear():
  with pytest.raises(ValueError, match="2 per pair"):
    verification.evaluate(np.zeros((10, 4)), np.ones(4, bool))
  issame = np.r_[np.ones(10, bool), np.zeros(10, bool)]
  with pytest.raises(ValueError, match="fold 0"):
    verification.evaluate(np.ones((40, 4)), issame)
