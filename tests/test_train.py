"""`train_and_evaluate` end to end on tiny networks: outputs, NaN stop, SIGTERM."""

import logging
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from synthdistill_jax import metrics_io
from synthdistill_jax import models
from synthdistill_jax import train
from tests import conftest
from tests import tiny

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import demo  # pylint: disable=g-import-not-at-top,wrong-import-position

# Kept while other modules still reach them through this one.
tiny_config = tiny.tiny_config
final_params = tiny.final_params
assert_params_close = tiny.assert_params_close


def test_tiny_run_writes_every_output(tmp_path):
  result = train.train_and_evaluate(tiny_config(), str(tmp_path))
  assert int(result.state.step) == 3 and not result.preempted
  train_records = metrics_io.read_metrics(tmp_path, "train")
  assert [r["step"] for r in train_records] == [1, 2, 3]
  for name in (
      "loss",
      "mse",
      "cosine",
      "grad_norm",
      "param_norm",
      "update_norm",
      "learning_rate",
      "images_per_sec",
  ):
    assert np.isfinite(train_records[-1][name]), name
  vals = metrics_io.read_metrics(tmp_path, "val")
  assert [v["step"] for v in vals] == [0, 3]  # Start, then every epoch.
  assert set(vals[-1]) >= {"mse", "cosine", "r2"}
  assert vals[-1]["r2"] == result.validation[-1]["r2"]
  assert (tmp_path / "faces.png").stat().st_size > 0
  assert list((tmp_path / "tb").iterdir())
  module, variables = models.load(tmp_path / "student")
  np.testing.assert_array_equal(
      jax.tree.leaves(variables["params"])[0], final_params(result)[0]
  )
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir())
  assert steps == [2, 3]
  # A second call resumes at the end and does nothing more.
  again = train.train_and_evaluate(tiny_config(), str(tmp_path))
  assert int(again.state.step) == 3
  for a, b in zip(final_params(result), final_params(again)):
    np.testing.assert_array_equal(a, b)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  config = tiny_config(**{"schedule.steps_per_epoch": 2})
  train.train_and_evaluate(config, str(tmp_path))
  # Resumed with an absurd learning rate, the loss blows up in step 3.
  # A deliberate change of the stored config (WORKDIR/config.json).
  bad = tiny_config(
      **{
          "schedule.steps_per_epoch": 4,
          "optimizer.learning_rate": 1e30,
          "allow_config_change": True,
      }
  )
  with pytest.raises(train.TrainingDiverged, match="non-finite loss"):
    train.train_and_evaluate(bad, str(tmp_path))
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir())
  assert steps == [2]
  assert (
      models.registry.read_config(tmp_path / "student")["metadata"]["step"] == 2
  )


def _run_main(workdir, *flags, **popen_kw):
  env = dict(os.environ, XLA_FLAGS=conftest.xla_flags(1))
  cmd = [
      sys.executable,
      "-m",
      "synthdistill_jax.main",
      f"--config={ROOT / 'configs' / 'demo.py'}:tiny",
      f"--workdir={workdir}",
      *flags,
  ]
  return subprocess.Popen(cmd, cwd=ROOT, env=env, text=True, **popen_kw)


def _start_long_run(workdir):
  """The tiny run with 1,000 iterations, once it has logged its first."""
  proc = _run_main(
      workdir,
      "--config.schedule.steps_per_epoch=1000",
      "--config.checkpoint.every_steps=1000",
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
  )
  jsonl = workdir / "metrics.jsonl"
  deadline = time.time() + 600
  while not (jsonl.exists() and jsonl.read_text().strip()):
    assert proc.poll() is None and time.time() < deadline
    time.sleep(0.5)
  return proc


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  proc = _start_long_run(tmp_path)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out
  assert "SIGTERM: saved iteration" in out
  steps = [int(p.name) for p in (tmp_path / "checkpoints").iterdir()]
  assert len(steps) == 1 and 1 <= steps[0] < 1000


def test_ctrl_c_saves_and_a_second_one_stops_at_once(tmp_path):
  # Ctrl-C sends SIGINT to the process (its group on a terminal).
  proc = _start_long_run(tmp_path / "once")
  proc.send_signal(signal.SIGINT)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out
  assert "Traceback" not in out
  assert "Ctrl-C: saving a checkpoint after this iteration" in out
  assert "SIGINT: saved iteration" in out
  steps = [int(p.name) for p in (tmp_path / "once" / "checkpoints").iterdir()]
  assert len(steps) == 1 and 1 <= steps[0] < 1000
  # Twice in a row: out at once, one line, exit 130.
  proc = _start_long_run(tmp_path / "twice")
  proc.send_signal(signal.SIGINT)
  # Two signals before Python's handler runs count as one.
  time.sleep(2)
  proc.send_signal(signal.SIGINT)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 130, out
  assert "Traceback" not in out
  assert "error: interrupted (Ctrl-C)" in out


def test_static_dataset_tool_and_static_sampler(tmp_path):
  from synthdistill_jax.data import static_dataset  # pylint: disable=g-import-not-at-top

  # The library function: batches of the config's size, the last one short.
  examples = list(
      static_dataset.render_examples(
          tiny_config(**{"mesh.num_devices": 1}), 20, seed=0
      )
  )
  assert [len(b["w"]) for b in examples] == [8, 8, 4]
  assert examples[0]["face"].dtype == np.uint8
  # The command-line tool writes the same examples as a TFDS dataset.
  out = subprocess.run(
      [
          sys.executable,
          str(ROOT / "tools" / "make_static_dataset.py"),
          f"--config={ROOT / 'configs' / 'demo.py'}:tiny",
          f"--output={tmp_path / 'static'}",
          "--num_examples=20",
      ],
      cwd=ROOT,
      env=dict(
          os.environ,
          XLA_FLAGS=conftest.xla_flags(1),
          SYNTHDISTILL_PROGRESS_EVERY_S="0",
      ),
      capture_output=True,
      text=True,
      timeout=600,
      check=False,
  )
  assert out.returncode == 0, out.stderr
  assert "wrote 20 examples" in out.stdout
  # Progress as whole lines in a pipe, TFDS's own bars off.
  assert "static set: 20/20 (100%)" in out.stderr
  assert "\r" not in out.stderr
  # Run again onto the set, for no face, or onto a file: refused before
  # any rendering (the file was a traceback from TFDS's makedirs).
  afile = tmp_path / "afile"
  afile.write_text("x")
  for flag, message in (
      ("--num_examples=20", "already holds a static set"),
      ("--num_examples=0", "--num_examples=0: must be at least 1"),
      (f"--output={afile}", f"--output={afile}: is a file, not a folder"),
  ):
    again = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "make_static_dataset.py"),
            f"--config={ROOT / 'configs' / 'demo.py'}:tiny",
            f"--output={tmp_path / 'static'}",
            flag,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert again.returncode == 1 and message in again.stderr, again.stderr
    assert "Traceback" not in again.stderr
  ds = static_dataset.StaticDataset(tmp_path / "static")
  (stored,) = ds.batches(20, seed=0, epoch=0)
  order = np.argsort(stored["index"])
  # The tool runs at the default matmul precision, the tests at 'highest'.
  for name, atol in (("w", 1e-4), ("face", 1), ("teacher", 1e-2)):
    want = np.concatenate([b[name] for b in examples]).astype(np.float32)
    got = stored[name][order].astype(np.float32)
    np.testing.assert_allclose(got, want, atol=atol, err_msg=name)
  config = tiny_config(
      **{
          "sampler.kind": "static",
          "sampler.static_dataset": str(tmp_path / "static"),
          "schedule.val_batches": 0,
      }
  )
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert int(result.state.step) == 3
  losses = [r["loss"] for r in metrics_io.read_metrics(tmp_path / "run")]
  assert len(losses) == 3 and all(np.isfinite(losses))


def test_no_recompilation_after_the_first_iteration(tmp_path, caplog):
  # Two epochs (validation, a learning-rate step, checkpoints between
  # iterations): the iteration and the validation compile once each.
  config = tiny_config(
      **{
          "schedule.epochs": 2,
          "schedule.steps_per_epoch": 2,
          "optimizer.decay_every_epochs": 1,
          "checkpoint.every_steps": 1,
      }
  )
  with jax.log_compiles(True), caplog.at_level(logging.WARNING):
    result = train.train_and_evaluate(config, str(tmp_path))
  assert int(result.state.step) == 4
  compiled = [
      r.getMessage().split()[1]
      for r in caplog.records
      if r.getMessage().startswith("Compiling ")
  ]
  # On CPU the iteration is five programs (`programs.SplitIteration`).
  pieces = (
      "begin_iteration",
      "render_and_embed",
      "train_step",
      "next_latents",
      "finish_iteration",
  )
  for name in pieces + ("evaluate_batch",):
    # `finish_iteration` does not depend on the spec: an earlier test in the
    # same worker may have compiled it already (jax's in-process cache).
    expected = (0, 1) if name == "finish_iteration" else (1,)
    assert compiled.count(f"jit({name})") in expected, (name, compiled)
  assert "jit(iteration)" not in compiled, compiled


def test_metric_writer_does_not_import_torch(tmp_path):
  """tensorboardX's optional torch/GCS/S3 imports are skipped (5.6 s here).

  In a fresh interpreter, as the trainer starts: scalars still reach the
  event file, torch is not loaded by the writer, and a later `import torch`
  (the converters) still gets the real module.
  """
  pytest.importorskip("torch")
  code = f"""
import pathlib, sys
from synthdistill_jax import metrics_io
w = metrics_io.MetricWriter({str(tmp_path)!r}, enabled=True)
w.write(1, "train", {{"loss": 0.5}})
w.close()
names = metrics_io.TENSORBOARDX_SKIPPED_IMPORTS
hidden = [m for m in names if m in sys.modules]
assert not hidden, hidden
assert "tensorboardX" in sys.modules
import torch
assert torch.zeros(2).sum().item() == 0.0
events = list(pathlib.Path({str(tmp_path / "tb")!r}).glob("events.out.*"))
assert len(events) == 1 and b"train/loss" in events[0].read_bytes(), events
print("ok")
"""
  result = subprocess.run(
      [sys.executable, "-c", code],
      capture_output=True,
      text=True,
      check=False,
      cwd=ROOT,
  )
  assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
