"""Evaluation end to end: the embedder, the trainer hook and the CLI.

A tiny IResNet with random weights embeds test-written faces: same pairs are
noisy copies of one smooth random pattern, so even a random network tells
them apart from different pairs; the CLI's numbers are checked against a
direct computation with `module.apply`.
"""

import functools
import json
import os
import pathlib
import pickle
import re
import subprocess
import sys

import jax
import ml_collections
import numpy as np
from PIL import Image
import pytest

from synthdistill_jax import models
from synthdistill_jax.data import verification_bin
from synthdistill_jax.evaluation import benchmarks
from synthdistill_jax.evaluation import cli
from synthdistill_jax.evaluation import embedding
from synthdistill_jax.evaluation import settings
from synthdistill_jax.evaluation import verification

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _subprocess_env():
  # A log line for every progress update, however quick (not a terminal).
  return dict(
      os.environ, PYTHONPATH=str(ROOT), SYNTHDISTILL_PROGRESS_EVERY_S="0"
  )


TINY_KWARGS = {"layers": [1, 1, 1, 1], "widths": [4, 8, 8, 8]}
TINY_KWARGS["embedding_size"] = 32


def _random_leaf(path, leaf, rng):
  # Deterministic numpy values in the spirit of the golden recipe; compiling
  # `module.init` (threefry) costs far more than the network itself here.
  name = str(getattr(path[-1], "key", path[-1]))
  normal = rng.standard_normal(leaf.shape)
  if name == "kernel":
    value = normal / np.sqrt(np.prod(leaf.shape[:-1]))
  elif name == "scale":
    value = 1.0 + 0.1 * normal
  elif name == "var":
    value = 1.0 + 0.1 * np.abs(normal)
  elif name == "alpha":
    value = 0.25 + 0.05 * normal
  else:  # bias, mean
    value = 0.1 * normal
  return value.astype(leaf.dtype)


def create_tiny_model(seed: int = 0):
  """A small IResNet with random weights and BN statistics."""
  module = models.create_model("iresnet18", **TINY_KWARGS)
  shapes = jax.eval_shape(
      module.init, jax.random.key(0), np.zeros((1, 112, 112, 3), np.float32)
  )
  rng = np.random.default_rng(seed)
  variables = jax.tree_util.tree_map_with_path(
      lambda p, x: _random_leaf(p, x, rng), shapes
  )
  return module, variables


def save_tiny_model(directory, seed: int = 0):
  module, variables = create_tiny_model(seed)
  models.save(directory, "iresnet18", TINY_KWARGS, variables)
  return module, variables


def make_faces(num_pairs: int, seed: int = 0, noise: int = 60):
  """2N uint8 faces and N labels; same pairs share a smooth pattern."""
  rng = np.random.default_rng(seed)

  def pattern():
    small = rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((112, 112), Image.Resampling.BICUBIC)
    return np.asarray(img).astype(np.int16)

  images, issame = [], []
  for i in range(num_pairs):
    same = i % 2 == 0
    a = pattern()
    b = a if same else pattern()
    for face in (a, b):
      noisy = face + rng.integers(-noise, noise + 1, face.shape)
      images.append(np.clip(noisy, 0, 255).astype(np.uint8))
    issame.append(same)
  return np.stack(images), np.array(issame)


@functools.partial(jax.jit, static_argnums=0)
def _apply(module, variables, x):
  return module.apply(variables, x, train=False)


def embed_directly(module, variables, images, chunk=40):
  """Reference embeddings: plain `module.apply`, flip with numpy.

  Fixed-size chunks, so every test in a process shares one compilation.
  """
  x = (images.astype(np.float32) / 255.0 - 0.5) / 0.5
  outs = []
  for batch in (x, x[:, :, ::-1]):
    rows = []
    for start in range(0, len(batch), chunk):
      part = batch[start : start + chunk]
      padded = np.zeros((chunk,) + part.shape[1:], np.float32)
      padded[: len(part)] = part
      rows.append(np.asarray(_apply(module, variables, padded))[: len(part)])
    outs.append(np.concatenate(rows))
  return outs[0], outs[1]


def test_embedder_pads_flips_and_shards():
  module, variables = create_tiny_model()
  images, _ = make_faces(10, seed=1)
  embed = embedding.create_embedder(module, variables, batch_size=12)
  emb, flip = embed([images[:7], images[7:]])  # Two uneven batches.
  ref, ref_flip = embed_directly(module, variables, images)
  assert emb.shape == (20, 32) and emb.dtype == np.float32
  scale = np.abs(ref).max()
  np.testing.assert_allclose(emb, ref, atol=1e-5 * scale, rtol=0)
  np.testing.assert_allclose(flip, ref_flip, atol=1e-5 * scale, rtol=0)
  assert np.abs(flip - emb).max() > 1e-3 * scale  # The flip is not a no-op.


def test_run_evaluators_trainer_hook(tmp_path, capsys, monkeypatch):
  # A log line for every progress update, however quick (not a terminal).
  monkeypatch.setenv("SYNTHDISTILL_PROGRESS_EVERY_S", "0")
  module, variables = create_tiny_model()
  config = settings.default_evals_config()
  assert benchmarks.run_evaluators(config, module, variables) == {}
  images, issame = make_faces(40, seed=2)
  verification_bin.write_bin(tmp_path / "mini.bin", images, issame)
  config.bins = [str(tmp_path / "mini.bin")]
  config.batch_size = 16
  metrics = benchmarks.run_evaluators(config, module, variables)
  assert "mini: embedding: 80/80 (100%)" in capsys.readouterr().err
  assert benchmarks.run_evaluators(
      config, module, variables, progress_bar=False
  ) == pytest.approx(metrics)
  assert not capsys.readouterr().err  # The trainer's progress_bar=False.
  assert set(metrics) == {
      f"mini/{k}"
      for k in (
          "accuracy",
          "accuracy_std",
          "accuracy_noflip",
          "accuracy_noflip_std",
          "val",
          "val_std",
          "far",
          "xnorm",
      )
  }
  emb, flip = embed_directly(module, variables, images)
  want = verification.evaluate(verification.combine_flip(emb, flip), issame)
  assert metrics["mini/accuracy"] == pytest.approx(np.mean(want.accuracy))
  assert isinstance(config, ml_collections.ConfigDict)


def test_config_variants_and_pth_models(tmp_path):
  images, issame = make_faces(10, seed=5)
  verification_bin.write_bin(tmp_path / "a.bin", images, issame)
  # A config written by hand: bins as a comma-separated string, no IJB.
  config = ml_collections.ConfigDict(
      {"bins": f"{tmp_path / 'a.bin'},", "batch_size": 8, "ijb": ""}
  )
  inputs = benchmarks.read_inputs(config)
  assert [b.name for b in inputs.bins] == ["a"] and inputs.ijb_meta is None
  config = ml_collections.ConfigDict({"bins": [], "ijb": "ijbc"})
  with pytest.raises(ValueError, match="evals.ijb must be a ConfigDict"):
    benchmarks.read_inputs(config)
  config = settings.default_evals_config()
  config.ijb.update(meta_dir=str(tmp_path), name="ijbc", warp="pil")
  with pytest.raises(ValueError, match="evals.ijb.warp must be one of"):
    benchmarks.read_inputs(config)
  # A PyTorch checkpoint given to --model is converted on the fly.
  torch = pytest.importorskip("torch")
  from tests import golden  # pylint: disable=g-import-not-at-top

  state_dict = golden.torch_state_dict("mobilefacenet")
  torch.save(state_dict, tmp_path / "mbf.pth")
  with pytest.raises(ValueError, match="needs --arch"):
    cli.load_model(tmp_path / "mbf.pth", None)
  module, variables = cli.load_model(tmp_path / "mbf.pth", "mobilefacenet")
  assert module.num_features == 512
  fc = variables["params"]["features"]["layers_2"]["kernel"]
  np.testing.assert_array_equal(
      fc, state_dict["features.layers.2.weight"].numpy().T
  )


def _run_cli(*args):
  return subprocess.run(
      [sys.executable, "-m", "synthdistill_jax.evaluate", *args],
      capture_output=True,
      text=True,
      cwd=ROOT,
      env=_subprocess_env(),
      timeout=300,
      check=False,
  )


def test_cli_workdir_report_matches_direct_computation(tmp_path):
  module, variables = save_tiny_model(tmp_path / "run" / "student")
  images, issame = make_faces(200, seed=3)
  verification_bin.write_bin(tmp_path / "toy.bin", images, issame)
  result = _run_cli(
      f"--workdir={tmp_path / 'run'}",
      f"--bins={tmp_path / 'toy.bin'}",
      "--batch_size=64",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  for step in ("checking images", "embedding"):
    assert re.search(
        rf"^toy: {step}: 400/400 \(100%\) \[\d\d:\d\d<00:00, .*img/s\]$",
        result.stderr,
        re.M,
    ), result.stderr
  assert "\r" not in result.stderr
  out = tmp_path / "run" / "eval"
  report = json.loads((out / "report.json").read_text())
  got = report["benchmarks"]["toy"]
  emb, flip = embed_directly(module, variables, images)
  want = verification.evaluate(verification.combine_flip(emb, flip), issame)
  plain = verification.evaluate(verification.combine_flip(emb, None), issame)
  assert got["pairs"] == 200
  # Float32 rounding differs between batchings; a decision could move by
  # at most a pair, and usually none does.
  assert abs(got["accuracy"] - np.mean(want.accuracy)) <= 1 / 200
  assert abs(got["accuracy_noflip"] - np.mean(plain.accuracy)) <= 1 / 200
  assert abs(got["val"] - want.val) <= 1 / 100
  assert 0.6 < got["accuracy"] < 1.0  # Informative, not saturated.
  assert "| toy | 200 |" in (out / "report.md").read_text()
  with Image.open(out / "roc_toy.png") as png:
    assert png.format == "PNG" and png.size[0] >= 300


def test_cli_hostile_bin_runs_nothing(tmp_path):
  save_tiny_model(tmp_path / "model")
  images, issame = make_faces(10, seed=4)
  verification_bin.write_bin(tmp_path / "good.bin", images, issame)
  marker = tmp_path / "pwned"
  # A pickle that would run os.mkdir if it were unpickled naively.
  payload = pickle.dumps((_Evil(str(marker)), [True]))
  (tmp_path / "evil.bin").write_bytes(payload)
  result = _run_cli(
      f"--model={tmp_path / 'model'}",
      f"--bins={tmp_path / 'good.bin'},{tmp_path / 'evil.bin'}",
  )
  assert result.returncode == 2
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "evil.bin" in last
  assert "refused global" in last and "Traceback" not in result.stderr
  assert not marker.exists()
  assert not (tmp_path / "model" / "eval").exists()


def test_cli_usage_errors(tmp_path):
  result = _run_cli(f"--model={tmp_path / 'absent'}", "--bins=x.bin")
  assert result.returncode == 2
  assert "absent: no such model" in result.stderr.strip().splitlines()[-1]
  # A model folder given as --workdir: the flag to use instead.
  save_tiny_model(tmp_path / "student")
  result = _run_cli(f"--workdir={tmp_path / 'student'}", "--bins=x.bin")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      f"error: --workdir={tmp_path / 'student'} is a model folder, not a"
      f" training workdir: give --model={tmp_path / 'student'}"
  )
  (tmp_path / "toy.bin").write_bytes(pickle.dumps(([b"\x89PNG"] * 3, [True])))
  result = _run_cli(f"--model={tmp_path}", f"--bins={tmp_path / 'toy.bin'}")
  assert result.returncode == 2
  assert "3 images for 1 pairs" in result.stderr


class _Evil:

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.mkdir, (self.marker,))
