"""The evaluator's answers to careless and hostile input: one line, status 2.

Every user mistake (a flag, a file, a model) ends with exactly one line on
stderr and exit status 2, no traceback, and nothing from a given file runs.
NaN/Inf embeddings are an error rather than a 50 % accuracy; `xnorm` is
insightface's mean row norm.
"""

import json
import os
import pathlib
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest

from synthdistill_jax import models
from synthdistill_jax.data import verification_bin
from synthdistill_jax.evaluation import benchmarks
from synthdistill_jax.evaluation import verification
from tests import test_evaluate_cli as helpers

ROOT = pathlib.Path(__file__).resolve().parents[1]


class _Payload:
  """Unpickling this would create `marker` (if anything ran it)."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (os.mkdir, (self.marker,))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  """A tiny model folder, a good bin and a few bad files."""
  root = tmp_path_factory.mktemp("inputs")
  helpers.save_tiny_model(root / "model")
  images, issame = helpers.make_faces(20, seed=4)
  verification_bin.write_bin(root / "good.bin", images, issame)
  encoded = [verification_bin.encode_image(x) for x in images]
  floats = [np.float64(x) for x in issame]
  (root / "floats.bin").write_bytes(pickle.dumps((encoded, floats), 2))
  verification_bin.write_bin(root / "few.bin", images[:20], issame[:10])
  (root / "a_file").write_text("not a folder")
  (root / "empty").mkdir()
  (root / "meta").mkdir()
  mismatched = root / "mismatched"
  shutil.copytree(root / "model", mismatched)
  config = json.loads((mismatched / "model.json").read_text())
  config["kwargs"]["embedding_size"] = 16
  (mismatched / "model.json").write_text(json.dumps(config))
  generator = root / "generator"
  shutil.copytree(root / "model", generator)
  config["arch"], config["kwargs"] = "stylegan2", {}
  (generator / "model.json").write_text(json.dumps(config))
  (root / "garbage.pth").write_bytes(b"PK\x03\x04 not really a zip")
  return root


def run_cli(*args):
  """The evaluator CLI in a subprocess: `(returncode, stderr)`."""
  result = subprocess.run(
      [sys.executable, "-m", "synthdistill_jax.evaluate", *map(str, args)],
      capture_output=True,
      text=True,
      cwd=ROOT,
      # The default progress interval: quick checks print nothing, so an
      # error is the only line on stderr.
      env=dict(os.environ, PYTHONPATH=str(ROOT)),
      timeout=300,
      check=False,
  )
  return result.returncode, result.stderr


# (case, arguments with {root} for the inputs folder, expected fragment).
CASES = [
    ("unknown_flag", ["--model={root}/model", "--bogus=1"], "bogus"),
    (
        "positional",
        ["--model={root}/model", "--bins={root}/good.bin", "x"],
        "unexpected arguments: x",
    ),
    (
        "batch_size",
        ["--model={root}/model", "--bins={root}/good.bin", "--batch_size=0"],
        "--batch_size=0: must be at least 1",
    ),
    (
        "model_and_workdir",
        ["--model={root}/model", "--workdir={root}", "--bins={root}/good.bin"],
        "exactly one of",
    ),
    (
        "no_model",
        ["--model={root}/absent", "--bins={root}/good.bin"],
        "absent: no such model",
    ),
    (
        "empty_folder",
        ["--model={root}/empty", "--bins={root}/good.bin"],
        "not a model folder",
    ),
    (
        "mismatched",
        ["--model={root}/mismatched", "--bins={root}/good.bin"],
        "model.json implies (16,)",
    ),
    (
        "generator",
        ["--model={root}/generator", "--bins={root}/good.bin"],
        "StyleGAN2 generator, not a face",
    ),
    (
        "pth_without_arch",
        ["--model={root}/garbage.pth", "--bins={root}/good.bin"],
        "needs --arch",
    ),
    (
        "pth_unknown_arch",
        [
            "--model={root}/garbage.pth",
            "--arch=resnet9",
            "--bins={root}/good.bin",
        ],
        "'resnet9'",
    ),
    (
        "pth_garbage",
        [
            "--model={root}/garbage.pth",
            "--arch=iresnet18",
            "--bins={root}/good.bin",
        ],
        "truncated or corrupt",
    ),
    (
        "output_is_a_file",
        [
            "--model={root}/model",
            "--bins={root}/good.bin",
            "--output={root}/a_file",
        ],
        "is not a folder",
    ),
    ("no_bins", ["--model={root}/model"], "nothing to evaluate"),
    (
        "bin_absent",
        ["--model={root}/model", "--bins={root}/absent.bin"],
        "absent.bin: cannot read",
    ),
    (
        "bin_one_fold_kind",
        ["--model={root}/model", "--bins={root}/few.bin"],
        "cannot be scored in 10 folds",
    ),
    (
        "bin_float_labels",
        ["--model={root}/model", "--bins={root}/floats.bin"],
        "refused numpy.dtype('f8')",
    ),
    (
        "ijb_meta_absent",
        ["--model={root}/model", "--ijb_meta_dir={root}/no"],
        "--ijb_meta_dir=",
    ),
    (
        "ijb_images_absent",
        [
            "--model={root}/model",
            "--ijb_meta_dir={root}/meta",
            "--ijb_image_dir={root}/no",
        ],
        "--ijb_image_dir=",
    ),
]


@pytest.mark.parametrize("case,args,fragment", CASES, ids=[c[0] for c in CASES])
def test_user_errors_are_one_line_and_status_2(inputs, case, args, fragment):
  del case
  code, stderr = run_cli(*[a.format(root=inputs) for a in args])
  assert code == 2, stderr
  assert stderr.count("\n") == 1 and stderr.startswith("error: "), stderr
  assert fragment in stderr, stderr
  assert not (inputs / "model" / "eval").exists()


def test_hostile_pth_model_runs_nothing(inputs, tmp_path):
  torch = pytest.importorskip("torch")
  marker = tmp_path / "pwned"
  evil = tmp_path / "evil.pth"
  torch.save({"conv1.weight": _Payload(marker)}, evil)
  code, stderr = run_cli(
      f"--model={evil}", "--arch=iresnet18", f"--bins={inputs / 'good.bin'}"
  )
  assert code == 2 and stderr.count("\n") == 1, stderr
  assert "refused global posix.mkdir" in stderr and "weights_only" not in stderr
  assert not marker.exists() and not (tmp_path / "eval").exists()
  # The same bytes run code under an unrestricted load: the test is live.
  torch.load(evil, weights_only=False)
  assert marker.exists()


def _fixed_embed(emb, flip):
  def embed(batches):
    for _ in batches:  # Decode as the real embedder would.
      pass
    return emb, flip

  return embed


def test_nonfinite_embeddings_are_an_error(inputs):
  vbin = verification_bin.read_bin(inputs / "good.bin")
  rng = np.random.default_rng(0)
  emb = rng.standard_normal((40, 8)).astype(np.float32)
  flip = emb + 0.1
  emb[3, 1] = np.nan
  with pytest.raises(benchmarks.NonFiniteEmbeddingError) as e:
    benchmarks.evaluate_bin(vbin, _fixed_embed(emb, flip), 8)
  assert "good: 1 of 80 embeddings" in str(e.value)


def test_cli_nonfinite_embeddings_exit_2(inputs, tmp_path):
  # Finite weights whose activations overflow float32: the embeddings are
  # NaN, which insightface's protocol would score as 50 % accuracy.
  module, variables = helpers.create_tiny_model()
  variables["params"]["bn1"]["scale"] = (
      variables["params"]["bn1"]["scale"] * 1e38
  )
  models.save(
      tmp_path / "overflow", "iresnet18", helpers.TINY_KWARGS, variables
  )
  del module
  code, stderr = run_cli(
      f"--model={tmp_path / 'overflow'}", f"--bins={inputs / 'good.bin'}"
  )
  assert code == 2 and stderr.count("\n") == 1, stderr
  assert "are not finite (NaN/Inf)" in stderr
  assert not (tmp_path / "eval").exists()


def test_xnorm_is_the_mean_row_norm_with_flips(inputs):
  vbin = verification_bin.read_bin(inputs / "good.bin")
  rng = np.random.default_rng(1)
  emb = rng.standard_normal((40, 8)).astype(np.float32) * 3
  flip = rng.standard_normal((40, 8)).astype(np.float32)
  result = benchmarks.evaluate_bin(vbin, _fixed_embed(emb, flip), 8)
  # insightface: sum of np.linalg.norm(row) over both lists / row count.
  rows = [r.astype(np.float64) for r in list(emb) + list(flip)]
  want = sum(np.linalg.norm(r) for r in rows) / len(rows)
  assert result.metrics["xnorm"] == pytest.approx(want, rel=1e-12)
  want_acc = verification.evaluate(
      verification.combine_flip(emb, flip), vbin.issame
  )
  assert result.metrics["accuracy"] == np.mean(want_acc.accuracy)
