"""IJB-B/C 1:1 verification on meta files and loose crops the tests write.

The alignment is checked against `cv2.warpAffine` itself (OpenCV is a test
dependency only), the decoding against `cv2.imread`, the ROC against a
brute-force threshold sweep, and the whole protocol against a direct
computation (plain loops over templates/medias).
"""

import io
import json
import pathlib

import numpy as np
from PIL import Image
import pytest

from synthdistill_jax.evaluation import benchmarks
from synthdistill_jax.evaluation import ijb
from synthdistill_jax.evaluation import outcome
from synthdistill_jax.evaluation import settings
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


def _smooth_image(rng, height, width):
  small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
  img = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
  return np.asarray(img)


def _edge_landmarks(rng, height, width):
  """Five landmarks whose aligned crop runs near or past the image edge."""
  m = _similarity(rng.uniform(0.6, 2.5), rng.uniform(-40, 40), 0.0, 0.0)
  points = _apply(m, ijb.ARCFACE_TEMPLATE)
  # The face centre from a tenth outside one edge to a tenth past the other.
  centre = rng.uniform(-0.1, 1.1, 2) * (width, height)
  return points - points.mean(0) + centre + rng.normal(0, 1.5, (5, 2))


def _source_regions(matrix, height, width, size=112):
  """Output pixels whose source lies inside (1 px margin) / far outside."""
  inv = ijb.invert_affine(matrix)
  ys, xs = np.mgrid[0:size, 0:size]
  sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
  sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
  interior = (sx >= 1) & (sx <= width - 2) & (sy >= 1) & (sy <= height - 2)
  outside = (sx < -2) | (sx > width + 1) | (sy < -2) | (sy > height + 1)
  return interior, outside


def _opencv_major() -> int:
  cv2 = pytest.importorskip("cv2")
  return int(cv2.__version__.split(".", 1)[0])


def _installed_warp() -> str:
  """The `ijb.warp_affine` kernel of the installed OpenCV."""
  return "opencv5" if _opencv_major() >= 5 else "opencv4"


def _warp_agreement(warp, reference=None, num_images=40, seed=0):
  """`warp` vs `reference` on edge-cropped smooth images.

  Args:
    warp: an `ijb.warp_affine` kernel.
    reference: another kernel, or None for the installed `cv2.warpAffine`.
    num_images: images to compare.
    seed: picks images and landmarks.

  Returns:
    Fraction of equal pixels, interior / edge-band max |diff|, interior
    mean signed diff, band sizes, the largest value where the source is
    far outside.
  """
  if reference is None:
    cv2 = pytest.importorskip("cv2")
    warp_ref = lambda img, m: cv2.warpAffine(
        img,
        m,
        (112, 112),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
  else:
    warp_ref = lambda img, m: ijb.warp_affine(img, m, 112, reference)
  rng = np.random.default_rng(seed)
  inner, edge, equal, total, outside_max = [], [], 0, 0, 0
  for _ in range(num_images):
    height, width = (int(v) for v in rng.integers(90, 260, 2))
    img = _smooth_image(rng, height, width)
    lmk = _edge_landmarks(rng, height, width).astype(np.float32)
    m = ijb.estimate_similarity(lmk, ijb.ARCFACE_TEMPLATE)
    ours = ijb.warp_affine(img, m, 112, warp).astype(int)
    diff = ours - warp_ref(img, m).astype(int)
    interior, outside = _source_regions(m, height, width)
    inner.append(diff[interior])
    edge.append(diff[~interior & ~outside])
    outside_max = max(outside_max, int(np.abs(ours[outside]).max(initial=0)))
    equal += int(np.sum(diff == 0))
    total += diff.size
  inner, edge = np.concatenate(inner), np.concatenate(edge)
  return {
      "equal": equal / total,
      "inner_max": int(np.abs(inner).max()),
      "inner_mean": float(inner.mean()),
      "edge_max": int(np.abs(edge).max()),
      "edge_pixels": edge.size,
      "inner_pixels": inner.size,
      "outside_max": outside_max,
  }


def test_warp_identity_is_exact():
  faces, _ = helpers.make_faces(1, seed=5, noise=30)
  identity = np.array([[1.0, 0, 0], [0, 1.0, 0]])
  for warp in ijb.WARPS:
    np.testing.assert_array_equal(
        ijb.warp_affine(faces[0], identity, 112, warp), faces[0]
    )
    np.testing.assert_array_equal(
        ijb.warp_affine(faces[0][..., 1], identity, 112, warp), faces[0][..., 1]
    )
  with pytest.raises(ValueError, match="warp must be one of opencv4, opencv5"):
    ijb.warp_affine(faces[0], identity, 112, "pil")


def test_warp_equals_installed_cv2_near_and_past_the_edge():
  warp = _installed_warp()
  got = _warp_agreement(warp)
  assert got["outside_max"] == 0, got
  assert got["edge_pixels"] > 1000 and got["inner_pixels"] > 100000, got
  if warp == "opencv4":
    # Integer arithmetic throughout: bit for bit.
    assert got["equal"] == 1.0, got
  else:
    # OpenCV 5.0's float arithmetic is not float64's: a few pixels differ.
    assert got["inner_max"] <= 1 and got["edge_max"] <= 1, got
    assert got["equal"] > 0.9999, got


def test_warp_kernels_within_the_issue_bounds():
  # The fixed-point and the float kernel: interior at most one level apart
  # without bias (truncating like PIL would shift the mean by about 0.5);
  # the one-pixel band where the face meets the zero border within 8 levels
  # (a 255 step moved by 1/32 pixel; PIL's edge repeat was 163 off).
  got = _warp_agreement("opencv5", reference="opencv4")
  assert got["inner_max"] <= 1 and abs(got["inner_mean"]) <= 0.05, got
  assert got["edge_max"] <= 8 and got["outside_max"] == 0, got
  assert got["equal"] > 0.95, got


def _opencv4_cases():
  """Sources and maps of the recorded OpenCV 4 outputs (edges, ties)."""
  rng = np.random.default_rng(11)
  cases = []
  for k in range(6):
    height, width = (int(v) for v in rng.integers(60, 160, 2))
    # Smooth (the record stays small): 2.6 % of pixels tell the kernels apart.
    img = _smooth_image(rng, height, width)
    if k < 4:
      lmk = _edge_landmarks(rng, height, width).astype(np.float32)
      m = ijb.estimate_similarity(lmk, ijb.ARCFACE_TEMPLATE)
    else:  # Exact ties: a half-pixel shift, a 2x zoom.
      m = (
          [[1.0, 0.0, 0.5], [0.0, 1.0, -0.5]]
          if k == 4
          else [[2, 0, 0], [0, 2, 0]]
      )
    cases.append((img, np.asarray(m, np.float64)))
  return cases


OPENCV4_RECORD = pathlib.Path(__file__).parent / "data" / "ijb_warp_opencv4.npz"


def _png(image: np.ndarray) -> np.ndarray:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG", optimize=True)
  return np.frombuffer(buffer.getvalue(), np.uint8)


def _unpng(data: np.ndarray) -> np.ndarray:
  with Image.open(io.BytesIO(data.tobytes())) as img:
    return np.asarray(img.convert("RGB"))


def write_opencv4_record(path=OPENCV4_RECORD):
  """Records `cv2.warpAffine` outputs (PNG bytes); run with OpenCV 4."""
  import cv2  # pylint: disable=g-import-not-at-top

  assert cv2.__version__.startswith("4."), cv2.__version__
  arrays = {"opencv_version": np.array(cv2.__version__)}
  for k, (img, m) in enumerate(_opencv4_cases()):
    out = cv2.warpAffine(img, m, (112, 112), borderValue=0)
    arrays[f"source_{k}"], arrays[f"output_{k}"] = _png(img), _png(out)
    arrays[f"matrix_{k}"] = m
  np.savez(path, **arrays)


def test_opencv4_warp_equals_recorded_opencv4():
  # Recorded with opencv-python-headless 4.10.0.84 (`write_opencv4_record`);
  # 4.12 and 4.14 give the same pixels.
  record = np.load(OPENCV4_RECORD)
  assert str(record["opencv_version"]).startswith("4.")
  for k in range(6):
    source, want = _unpng(record[f"source_{k}"]), _unpng(record[f"output_{k}"])
    got = ijb.warp_affine(source, record[f"matrix_{k}"], 112)
    np.testing.assert_array_equal(got, want, err_msg=f"case {k}")
    # Not a case the float kernel passes: 1-16 % of pixels differ there.
    assert np.any(
        ijb.warp_affine(source, record[f"matrix_{k}"], 112, "opencv5") != want
    )
  assert np.mean(_unpng(record["output_0"]) == 0) > 0.5  # Past the edge.


def test_opencv5_warp_rounds_ties_like_opencv5():
  if _opencv_major() < 5:
    pytest.skip("the recorded OpenCV 4 test covers ties there")
  cv2 = pytest.importorskip("cv2")
  img = np.random.default_rng(1).integers(0, 256, (120, 120, 3), np.uint8)
  # Half-pixel shifts and a 2x zoom: every blend is an exact tie or none.
  for matrix in (
      [[1, 0, 0.5], [0, 1, 0]],
      [[1, 0, 0.5], [0, 1, -0.5]],
      [[2, 0, 0], [0, 2, 0]],
      [[1, 0, -0.25], [0, 1, 0.75]],
  ):
    matrix = np.array(matrix, np.float64)
    ref = cv2.warpAffine(img, matrix, (112, 112), borderValue=0)
    np.testing.assert_array_equal(
        ijb.warp_affine(img, matrix, 112, "opencv5"), ref
    )


def test_read_image_decodes_like_cv2_imread(tmp_path):
  cv2 = pytest.importorskip("cv2")
  rng = np.random.default_rng(2)
  img = Image.fromarray(_smooth_image(rng, 90, 130))
  exif = Image.Exif()
  exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view.
  img.save(tmp_path / "rotated.jpg", quality=90, exif=exif.tobytes())
  img.convert("L").save(tmp_path / "grey.jpg")
  rgba = np.dstack([np.asarray(img), rng.integers(0, 256, (90, 130))])
  Image.fromarray(rgba.astype(np.uint8)).save(tmp_path / "alpha.png")
  img.convert("P").save(tmp_path / "palette.png")
  for name in ("rotated.jpg", "grey.jpg", "alpha.png", "palette.png"):
    ours = ijb.read_image(tmp_path / name)
    ref = cv2.imread(str(tmp_path / name))[..., ::-1]
    np.testing.assert_array_equal(ours, ref, err_msg=name)
  assert ijb.read_image(tmp_path / "rotated.jpg").shape == (130, 90, 3)
  (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
  with pytest.raises(ijb.IJBFormatError, match="bad.jpg: cannot read image"):
    ijb.read_image(tmp_path / "bad.jpg")


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
        crop = ijb.warp_affine(faces[identity], m, 150)
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


def test_ijb_protocol_matches_direct_computation(tmp_path, capsys, monkeypatch):
  # A log line for every progress update, however quick (not a terminal).
  monkeypatch.setenv("SYNTHDISTILL_PROGRESS_EVERY_S", "0")
  meta_dir, image_dir = _write_ijb(tmp_path)
  module, variables = helpers.create_tiny_model()
  config = settings.default_evals_config()
  config.batch_size = 16
  config.ijb.meta_dir = str(meta_dir)
  config.ijb.image_dir = str(image_dir)
  config.ijb.name = "toy"
  out = tmp_path / "eval"
  metrics = benchmarks.run_evaluators(config, module, variables, output_dir=out)
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
    assert metrics[f"toy/{outcome.far_key(far)}"] == pytest.approx(tar)
  assert len(set(want.values())) > 1 and np.ptp(scores) > 0  # Not trivial.
  assert (out / "roc_toy.png").is_file()
  assert "TAR@FAR=1e-04" in (out / "report.md").read_text()
  # The per-pair scores, in the pair file's order, next to report.json.
  report = json.loads((out / "report.json").read_text())
  assert report["benchmarks"]["toy"]["scores_file"] == "scores_toy.npy"
  assert report["benchmarks"]["toy"]["warp"] == "opencv4"
  saved = np.load(out / "scores_toy.npy")
  assert saved.dtype == np.float64 and saved.shape == (len(meta.pairs),)
  np.testing.assert_allclose(saved, scores, rtol=0, atol=1e-5)


def test_alignment_undoes_the_loose_crop(tmp_path):
  faces, _ = helpers.make_faces(1, seed=8, noise=0)
  m = _similarity(1.25, 10.0, 10.0, 12.0)
  crop = ijb.warp_affine(faces[0], m, 150)
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
