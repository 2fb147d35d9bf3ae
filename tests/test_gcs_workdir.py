"""A `gs://` workdir works end to end, against a local GCS emulator.

epath's `gs://` backend (fsspec + gcsfs, no TensorFlow) and orbax's
CheckpointManager (metadata through epath, arrays through tensorstore's `gcs`
kvstore) talk HTTP to `tests/gcs_emulator.py`; each test also lists the bucket
through the emulator's own API, and checks that nothing landed in a local
folder named `gs:` (what `pathlib.Path("gs://b/r")` would write to).
"""

import json
import os
import subprocess
import sys
import textwrap

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from tests import gcs_emulator as gcs_emulator_lib

# The session-wide emulator fixture, for the tests of this module.
gcs_emulator = gcs_emulator_lib.gcs_emulator


def test_epath_file_operations_reach_the_bucket(
    gcs_emulator, tmp_path, monkeypatch
):
  monkeypatch.chdir(tmp_path)
  run = epath.Path(gcs_emulator.root) / "epath_ops"
  (run / "eval" / "ijb").mkdir(parents=True, exist_ok=True)
  (run / "eval" / "ijb" / "report.json").write_text('{"tar": 0.5}')
  (run / "eval" / "metrics.txt").write_text("step 1")

  assert (run / "eval" / "ijb" / "report.json").read_text() == '{"tar": 0.5}'
  assert sorted(p.name for p in run.glob("eval/*/*.json")) == ["report.json"]
  assert gcs_emulator.object_names("epath_ops/") == [
      "epath_ops/eval/ijb/report.json",
      "epath_ops/eval/metrics.txt",
  ]

  (run / "eval" / "metrics.txt").rename(run / "eval" / "metrics_1.txt")
  assert not (run / "eval" / "metrics.txt").exists()
  assert (run / "eval" / "metrics_1.txt").read_text() == "step 1"

  (run / "eval").rmtree()
  assert not (run / "eval").exists()
  assert gcs_emulator.object_names("epath_ops/") == []
  assert not (tmp_path / "gs:").exists()


def test_orbax_checkpoint_manager_saves_and_restores_in_the_bucket(
    gcs_emulator, tmp_path, monkeypatch
):
  monkeypatch.chdir(tmp_path)
  directory = epath.Path(gcs_emulator.root) / "orbax_run" / "checkpoints"
  tree = {"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3), "b": jnp.ones(3)}
  # max_to_keep=2 makes orbax delete step 1 from the bucket at step 3.
  options = ocp.CheckpointManagerOptions(max_to_keep=2)
  with ocp.CheckpointManager(directory, options=options) as manager:
    for step in (1, 2, 3):
      scaled = jax.tree.map(lambda x, s=step: x * s, tree)
      manager.save(step, args=ocp.args.StandardSave(scaled))
    manager.wait_until_finished()  # Saves are asynchronous by default.
    assert manager.all_steps() == [2, 3]

  # A fresh manager, as after a restart, finds the steps in the bucket.
  with ocp.CheckpointManager(directory, options=options) as manager:
    assert manager.all_steps() == [2, 3]
    latest = manager.latest_step()
    restored = manager.restore(latest, args=ocp.args.StandardRestore(tree))
  assert latest == 3
  np.testing.assert_array_equal(restored["w"], np.asarray(tree["w"]) * 3)
  np.testing.assert_array_equal(restored["b"], np.asarray(tree["b"]) * 3)

  names = gcs_emulator.object_names("orbax_run/checkpoints/")
  assert not [n for n in names if n.startswith("orbax_run/checkpoints/1/")]
  for step in (2, 3):
    # On GCS orbax marks a finished step with a commit file (no rename).
    assert f"orbax_run/checkpoints/{step}/commit_success.txt" in names
    # Array chunks, written by tensorstore, not by epath.
    assert any(
        n.startswith(f"orbax_run/checkpoints/{step}/default/") and "/d/" in n
        for n in names
    ), names
  assert not (tmp_path / "gs:").exists()


def test_tensorstore_writes_on_the_generation_it_read(gcs_emulator):
  # OCDBT (orbax's array format) rewrites its manifest on the generation it
  # last read; that generation comes from the `x-goog-generation` header.
  spec = {"driver": "gcs", "bucket": gcs_emulator.bucket, "path": "ts/"}
  store = ts.KvStore.open(spec).result()
  store.write("manifest", b"v1").result()
  read = store.read("manifest").result()
  assert read.value == b"v1"
  store.write("manifest", b"v2", if_equal=read.stamp.generation).result()
  assert store.read("manifest").result().value == b"v2"
  assert gcs_emulator.object_names("ts/") == ["ts/manifest"]


def test_subprocess_inherits_the_emulator(gcs_emulator, tmp_path):
  path = f"{gcs_emulator.root}/subprocess/hello.txt"
  script = textwrap.dedent(f"""
      from etils import epath
      epath.Path({path!r}).write_text("from the child")
      """)
  subprocess.run(
      [sys.executable, "-c", script], check=True, cwd=tmp_path, timeout=120
  )
  assert epath.Path(path).read_text() == "from the child"
  assert gcs_emulator.object_names("subprocess/") == ["subprocess/hello.txt"]
  assert not os.path.exists(tmp_path / "gs:")


def _train(workdir: str, cwd, *flags) -> subprocess.CompletedProcess:
  """`python -m synthdistill_jax.main` on the tiny config (emulator env)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return subprocess.run(
      [
          sys.executable,
          "-m",
          "synthdistill_jax.main",
          f"--config={root}/configs/demo.py:tiny",
          f"--workdir={workdir}",
          *flags,
      ],
      cwd=cwd,
      env=dict(os.environ, PYTHONPATH=root),
      capture_output=True,
      text=True,
      timeout=900,
      check=False,
  )


def test_tiny_run_trains_and_resumes_in_the_bucket(gcs_emulator, tmp_path):
  workdir = f"{gcs_emulator.root}/tiny_run"
  first = _train(workdir, tmp_path)
  assert first.returncode == 0, first.stderr[-3000:]
  # Two more iterations: the rerun resumes from iteration 3 in the bucket.
  second = _train(workdir, tmp_path, "--config.schedule.epochs=2")
  assert second.returncode == 0, second.stderr[-3000:]
  assert f"resumed from {workdir}/checkpoints at iteration 3" in (
      second.stdout + second.stderr
  )
  names = gcs_emulator.object_names("tiny_run/")
  for expected in (
      "tiny_run/metrics.jsonl",
      "tiny_run/faces.png",
      "tiny_run/report.md",
      "tiny_run/curves.png",
      "tiny_run/student/model.json",
  ):
    assert expected in names, names
  steps = {n.split("/")[2] for n in names if n.startswith("tiny_run/checkp")}
  assert {"4", "6"} <= steps, steps
  assert any(n.startswith("tiny_run/tb/events.") for n in names), names
  assert not any("tmp" in n for n in names), names
  records = [
      json.loads(line)
      for line in (epath.Path(workdir) / "metrics.jsonl")
      .read_text()
      .splitlines()
  ]
  train_steps = [r["step"] for r in records if r["split"] == "train"]
  assert train_steps == [1, 2, 3, 4, 5, 6]
  # Nothing was written to a local folder named after the URI.
  assert not (tmp_path / "gs:").exists()
