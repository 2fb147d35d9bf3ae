"""IJB-B/C 1:1 verification on meta files and loose crops the tests write.

The alignment is checked against a direct numpy statement of OpenCV's
`warpAffine`, the ROC against a brute-force threshold sweep, and the whole
protocol against a direct computation (plain loops over templates/medias).
"""

import numpy as np
from PIL import Image
import pytest

from synthdistill_jax import evaluate
from synthdistill_jax import ijb
from tests import test_evaluate_cli as helpers


def _similarity(scale, angle_deg, tx, ty):
  a = np.deg2rad(angle_deg)
  c, s = scale * np.cos(a), scale * np.sin(a)
  return np.array([[c, -s, tx], [s, c, ty]])


def _apply(matrix, points):
  return points @ matrix[:, :2].T + matrix[:, 2]


def test_similarity_fit_recovers_a_known_transform():
  m = _similarity(1.7, 23.0, 14.0, -5.0)
  dst = _apply(m, ijb.ARCFACE_TEMPLATE)
  np.testing.assert_allclose(
      ijb.estimate_similarity(ijb.ARCFACE_TEMPLATE, dst), m, atol=1e-9
  )
  # Noisy points: the fit is the least-squares optimum (zero gradient).
  noisy = dst + np.random.default_rng(0).normal(0, 2.0, dst.shape)
  fit = ijb.estimate_similarity(ijb.ARCFACE_TEMPLATE, noisy)
  base = np.sum((_apply(fit, ijb.ARCFACE_TEMPLATE) - noisy) ** 2)
  for k in range(4):
    delta = np.zeros(4)
    delta[k] = 1e-4
    a, b, tx, ty = np.r_[fit[0, 0], fit[1, 0], fit[0, 2], fit[1, 2]] + delta
    moved = np.array([[a, -b, tx], [b, a, ty]])
    assert np.sum((_apply(moved, ijb.ARCFACE_TEMPLATE) - noisy) ** 2) > base


def _reference_warp(image, matrix, size):
  """cv2.warpAffine(INTER_LINEAR, BORDER_CONSTANT 0) in float numpy."""
  inv = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))[:2]
  ys, xs = np.mgrid[0:size, 0:size]
  src = _apply(inv, np.stack([xs.ravel(), ys.ravel()], 1).astype(float))
  x, y = src[:, 0], src[:, 1]
  x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
  fx, fy = (x - x0)[:, None], (y - y0)[:, None]
  h, w = image.shape[:2]

  def pixel(yy, xx):
    inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
    out = np.zeros((len(yy), 3))
    out[inside] = image[yy[inside], xx[inside]]
    return out

  value = (
      pixel(y0, x0) * (1 - fx) * (1 - fy)
      + pixel(y0, x0 + 1) * fx * (1 - fy)
      + pixel(y0 + 1, x0) * (1 - fx) * fy
      + pixel(y0 + 1, x0 + 1) * fx * fy
  )
  return value.reshape(size, size, 3)


def test_warp_matches_opencv_semantics():
  faces, _ = helpers.make_faces(1, seed=5, noise=30)
  face = faces[0]
  identity = np.array([[1.0, 0, 0], [0, 1.0, 0]])
  same = ijb.warp_affine(Image.fromarray(face), identity, 112)
  np.testing.assert_array_equal(same, face)
  m = _similarity(0.8, 12.0, 20.0, 9.0)
  ours = ijb.warp_affine(Image.fromarray(face), m, 112).astype(float)
  ref = _reference_warp(face, m, 112)
  # Interior pixels (PIL rounds its 8-bit bilinear weights): within 2
  # levels; a half-pixel convention slip would be off by tens.
  inner = (slice(30, 90), slice(30, 90))
  assert np.abs(ours[inner] - ref[inner]).max() <= 2.0


def _brute_force_tar(labels, scores, targets):
  """Every distinct threshold by counting; sklearn's point dropping."""
  pos, neg = scores[labels == 1], scores[labels == 0]
  counts = [
      (np.sum(neg >= t), np.sum(pos >= t)) for t in np.unique(scores)[::-1]
  ]
  kept = [
      c
      for i, c in enumerate(counts)
      if i in (0, len(counts) - 1)
      or np.subtract(c, counts[i - 1]).tolist()
      != np.subtract(counts[i + 1], c).tolist()
  ]
  points = [(0.0, 0.0)] + [(f / len(neg), t / len(pos)) for f, t in kept]
  return {
      far: min(points, key=lambda p: (abs(p[0] - far), -p[1]))[1]
      for far in targets
  }


@pytest.mark.parametrize("seed", range(6))
def test_tar_at_far_matches_brute_force(seed):
  rng = np.random.default_rng(seed)
  n = 300
  labels = (rng.random(n) < 0.3).astype(int)
  scores = rng.normal(labels * 1.5, 1.0)
  if seed % 2:
    scores = np.round(scores * 4) / 4  # Many ties.
  # FARs on the 1/num_negatives grid hit points inside straight runs.
  targets = (1e-3, 1e-2, 0.05, 0.1, 0.3, 0.5)
  fpr, tpr, _ = ijb.roc_curve(labels, scores)
  got = ijb.tar_at_far(fpr, tpr, targets)
  assert got == pytest.approx(_brute_force_tar(labels, scores, targets))


def test_tar_at_far_uses_sklearn_dropped_points():
  # One positive, five negatives, nine positives, five negatives: the FAR
  # 0.3 point (TAR 0.1) lies inside a straight run that sklearn drops, so
  # the nearest kept point is FAR 0.5 at the top of the next run (TAR 1).
  scores = np.arange(20.0, 0.0, -1.0)
  labels = np.array([1] + [0] * 5 + [1] * 9 + [0] * 5)
  fpr, tpr, _ = ijb.roc_curve(labels, scores)
  assert ijb.tar_at_far(fpr, tpr, (0.3,)) == {0.3: 1.0}
  assert _brute_force_tar(labels, scores, (0.3,)) == {0.3: 1.0}


def test_roc_curve_matches_sklearn_when_installed():
  metrics = pytest.importorskip("sklearn.metrics")
  rng = np.random.default_rng(7)
  labels = (rng.random(500) < 0.4).astype(int)
  scores = np.round(rng.normal(labels, 1.0) * 8) / 8
  for ours, theirs in zip(
      ijb.roc_curve(labels, scores), metrics.roc_curve(labels, scores)
  ):
    np.testing.assert_array_equal(ours, theirs)


def _write_ijb(tmp_path, num_templates=12, seed=6):
  """Loose crops of test faces and the three meta files."""
  rng = np.random.default_rng(seed)
  faces, _ = helpers.make_faces(num_templates // 2, seed=seed, noise=40)
  images_dir = tmp_path / "loose_crop"
  images_dir.mkdir()
  meta = tmp_path / "meta"
  meta.mkdir()
  tid_lines, lmk_lines, identity_of = [], [], {}
  n = 0
  for t in range(1, num_templates + 1):
    identity = t % (num_templates // 2)
    identity_of[t] = identity
    for media in range(int(rng.integers(1, 3))):
      for _ in range(int(rng.integers(1, 3))):
        # A loose crop: the aligned face scaled/rotated into a 150x150 frame.
        m = _similarity(rng.uniform(1.1, 1.3), rng.uniform(-15, 15), 10.0, 12.0)
        crop = ijb.warp_affine(Image.fromarray(faces[identity]), m, 150)
        noisy = np.clip(crop + rng.integers(-20, 21, crop.shape), 0, 255)
        n += 1
        name = f"{n}.png"
        Image.fromarray(noisy.astype(np.uint8)).save(images_dir / name)
        lmk = _apply(m, ijb.ARCFACE_TEMPLATE) + rng.normal(0, 0.5, (5, 2))
        score = rng.uniform(0.5, 1.0)
        tid_lines.append(f"{name} {t} {100 * t + media}")
        lmk_lines.append(
            " ".join([name] + [f"{v:.4f}" for v in lmk.ravel()])
            + f" {score:.6f}"
        )
  pairs = [
      (a, b, int(identity_of[a] == identity_of[b]))
      for a in range(1, num_templates + 1)
      for b in range(a + 1, num_templates + 1)
  ]
  (meta / "toy_face_tid_mid.txt").write_text("\n".join(tid_lines) + "\n")
  (meta / "toy_name_5pts_score.txt").write_text("\n".join(lmk_lines) + "\n")
  (meta / "toy_template_pair_label.txt").write_text(
      "\n".join(f"{a} {b} {l}" for a, b, l in pairs) + "\n"
  )
  return meta, images_dir


def _direct_tar(meta, image_dir, module, variables):
  """The protocol with plain loops, from `module.apply` outward."""
  faces = np.stack(
      [
          ijb.load_face(image_dir / name, lmk, aligned=False)
          for name, lmk in zip(meta.images, meta.landmarks)
      ]
  )
  emb, flip = helpers.embed_directly(module, variables, faces)
  feats = (emb + flip) * meta.scores[:, None]
  template_feats = {}
  for t in sorted(set(meta.templates.tolist())):
    medias = {}
    for i in np.nonzero(meta.templates == t)[0]:
      medias.setdefault(int(meta.medias[i]), []).append(feats[i])
    total = sum(np.mean(v, axis=0) for v in medias.values())
    template_feats[t] = total / np.linalg.norm(total)
  scores = np.array(
      [template_feats[a] @ template_feats[b] for a, b in meta.pairs]
  )
  return _brute_force_tar(meta.labels, scores, ijb.FAR_TARGETS), scores


def test_ijb_protocol_matches_direct_computation(tmp_path, capsys):
  meta_dir, image_dir = _write_ijb(tmp_path)
  module, variables = helpers.create_tiny_model()
  config = evaluate.default_evals_config()
  config.batch_size = 16
  config.ijb.meta_dir = str(meta_dir)
  config.ijb.image_dir = str(image_dir)
  config.ijb.name = "toy"
  out = tmp_path / "eval"
  metrics = evaluate.run_evaluators(config, module, variables, output_dir=out)
  # Images, templates and pairs each end with a progress line (not a tty).
  meta = ijb.read_meta(meta_dir, "toy")
  err = capsys.readouterr().err
  for what, count in (
      ("images", len(meta.images)),
      ("templates", len(set(meta.templates.tolist()))),
      ("pairs", len(meta.pairs)),
  ):
    assert f"IJB {what}: {count}/{count} (100%)" in err, err
  want, scores = _direct_tar(meta, image_dir, module, variables)
  for far, tar in want.items():
    assert metrics[f"toy/{evaluate.far_key(far)}"] == pytest.approx(tar)
  assert len(set(want.values())) > 1 and np.ptp(scores) > 0  # Not trivial.
  assert (out / "roc_toy.png").is_file()
  assert "TAR@FAR=1e-04" in (out / "report.md").read_text()


def test_alignment_undoes_the_loose_crop(tmp_path):
  faces, _ = helpers.make_faces(1, seed=8, noise=0)
  m = _similarity(1.25, 10.0, 10.0, 12.0)
  crop = ijb.warp_affine(Image.fromarray(faces[0]), m, 150)
  path = tmp_path / "crop.png"
  Image.fromarray(crop).save(path)
  aligned = ijb.load_face(path, _apply(m, ijb.ARCFACE_TEMPLATE), False)
  inner = (slice(10, 100), slice(10, 100))
  diff = np.abs(aligned[inner].astype(int) - faces[0][inner])
  assert diff.mean() < 3.0  # Two bilinear resamplings of a smooth face.


@pytest.mark.parametrize(
    "edit,message",
    [
        (("tid", "1.png 1\n"), "expected 3 columns"),
        (("tid", "1.png one 100\n"), "'one' is not a valid int"),
        (("pair", "1 999 1\n"), "template 999 has no image"),
        (("pair", "1 2 7\n"), "labels must be 0 or 1"),
        (("lmk", "zzz.png" + " 1" * 11 + "\n"), "must list the same images"),
    ],
)
def test_malformed_meta_files(tmp_path, edit, message):
  meta_dir, _ = _write_ijb(tmp_path, num_templates=4)
  files = {
      "tid": "toy_face_tid_mid.txt",
      "pair": "toy_template_pair_label.txt",
      "lmk": "toy_name_5pts_score.txt",
  }
  path = meta_dir / files[edit[0]]
  lines = path.read_text().splitlines(keepends=True)
  path.write_text(edit[1] + "".join(lines[1:]))
  with pytest.raises(ijb.IJBFormatError, match=message) as err:
    ijb.read_meta(meta_dir, "toy")
  assert files[edit[0]] in str(err.value)
