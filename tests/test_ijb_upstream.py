"""IJB end to end against insightface's pipeline, with a converted student.

A tiny IResNet with random weights is built in PyTorch (the network
upstream's `eval_ijbc.py` would load) and converted to Flax with
`convert.face`; test-written IJB meta files and JPEG loose crops, many of
them cut by the crop's edge, go through `tests/insightface_ijb.py` (the
upstream pipeline re-stated: cv2 alignment, PyTorch features, its pooling,
scoring and TAR table) and through `benchmarks.run_evaluators` with the
alignment kernel of the installed OpenCV. Every TAR must be equal and the
saved per-pair scores close.
"""

import json

import numpy as np
from PIL import Image
import pytest

from synthdistill_jax.evaluation import benchmarks
from synthdistill_jax.evaluation import ijb
from synthdistill_jax.evaluation import outcome
from synthdistill_jax.evaluation import settings
from tests import test_evaluate_cli as helpers
from tests import test_ijb

torch = pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")

# pylint: disable=g-import-not-at-top,wrong-import-position
from synthdistill_jax.convert import face as convert_face
from synthdistill_jax.export import torch_nets
from tests import insightface_ijb

# pylint: enable=g-import-not-at-top,wrong-import-position


def _torch_student(seed=0):
  """The tiny IResNet in PyTorch, weights drawn by the CLI tests' recipe.

  (PyTorch's default init makes every face's feature nearly the same.)
  """
  _, variables = helpers.create_tiny_model(seed)
  state_dict = convert_face.state_dict_from_variables(
      "iresnet18", variables, **helpers.TINY_KWARGS
  )
  model = torch_nets.create("iresnet18", **helpers.TINY_KWARGS)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()})
  return model.eval()


def _write_edge_ijb(tmp_path, identities=20, templates_per_identity=3, seed=9):
  """IJB meta files and JPEG loose crops whose faces often leave the frame.

  Returns:
    `(meta_dir, image_dir)`; the meta prefix is 'toy'.
  """
  rng = np.random.default_rng(seed)
  faces, _ = helpers.make_faces(identities // 2, seed=seed, noise=0)
  image_dir, meta_dir = tmp_path / "loose_crop", tmp_path / "meta"
  image_dir.mkdir()
  meta_dir.mkdir()
  tid, lmk_lines, identity_of, n = [], [], {}, 0
  for t in range(1, identities * templates_per_identity + 1):
    identity_of[t] = t % identities
    for media in range(int(rng.integers(1, 3))):
      for _ in range(int(rng.integers(1, 4))):
        face = faces[identity_of[t]].astype(int)
        face = face + rng.integers(-40, 41, face.shape)
        # 160x160 frame; the shift puts part of the face outside it.
        m = test_ijb._similarity(  # pylint: disable=protected-access
            rng.uniform(1.0, 1.5),
            rng.uniform(-20, 20),
            *rng.uniform(-45, 70, 2),
        )
        crop = ijb.warp_affine(np.clip(face, 0, 255).astype(np.uint8), m, 160)
        n += 1
        name = f"{n}.jpg"
        Image.fromarray(crop).save(image_dir / name, quality=92)
        lmk = test_ijb._apply(m, ijb.ARCFACE_TEMPLATE)  # pylint: disable=protected-access
        lmk = lmk + rng.normal(0, 1.0, (5, 2))
        tid.append(f"{name} {t} {100 * t + media}")
        lmk_lines.append(
            " ".join([name] + [f"{v:.3f}" for v in lmk.ravel()])
            + f" {rng.uniform(0.3, 1.0):.6f}"
        )
  count = len(identity_of)
  pairs = [
      f"{a} {b} {int(identity_of[a] == identity_of[b])}"
      for a in range(1, count + 1)
      for b in range(a + 1, count + 1)
  ]
  (meta_dir / "toy_face_tid_mid.txt").write_text("\n".join(tid) + "\n")
  (meta_dir / "toy_name_5pts_score.txt").write_text("\n".join(lmk_lines) + "\n")
  (meta_dir / "toy_template_pair_label.txt").write_text("\n".join(pairs) + "\n")
  return meta_dir, image_dir


def test_tar_at_every_far_equals_upstream_pipeline(tmp_path):
  meta_dir, image_dir = _write_edge_ijb(tmp_path)
  model = _torch_student()
  state_dict = {k: v.numpy() for k, v in model.state_dict().items()}
  module, variables = convert_face.variables_from_state_dict(
      "iresnet18", state_dict, **helpers.TINY_KWARGS
  )
  want, want_scores = insightface_ijb.run(meta_dir, image_dir, "toy", model)

  config = settings.default_evals_config()
  config.batch_size = 16
  config.ijb.meta_dir = str(meta_dir)
  config.ijb.image_dir = str(image_dir)
  config.ijb.name = "toy"
  # The kernel of the OpenCV the upstream side runs with.
  opencv_major = int(cv2.__version__.split(".", 1)[0])
  config.ijb.warp = "opencv5" if opencv_major >= 5 else "opencv4"
  out = tmp_path / "eval"
  metrics = benchmarks.run_evaluators(config, module, variables, output_dir=out)
  got = {f: metrics[f"toy/{outcome.far_key(f)}"] for f in want}
  assert got == want
  report = json.loads((out / "report.json").read_text())
  scores = np.load(out / report["benchmarks"]["toy"]["scores_file"])
  assert report["benchmarks"]["toy"]["warp"] == config.ijb.warp
  # PyTorch vs JAX features, upstream's float32 similarity fit, and the
  # few pixels that this moves (or OpenCV 5's float arithmetic) by a level.
  np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-4)
  # Not trivial: a spread of scores and of TARs.
  assert np.ptp(want_scores) > 0.1 and len(set(want.values())) > 2, want
