"""Nothing lost, one line for every mistake: the trainer's guarantees.

Each test fails on a trainer without the guarantee (see docs/reliability.md,
"Training runs and checkpoints"): settings that cannot train, config-file
mistakes, a second trainer on one workdir, stale locks, damaged
checkpoints, config changes on resume, checkpoints of the other optimiser
layout, duplicate metrics after a resume, stale temporaries, and a
static-sampler resume that re-reads the set.
"""

import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from synthdistill_jax import checkpoints
from synthdistill_jax import errors
from synthdistill_jax import experiment
from synthdistill_jax import metrics_io
from synthdistill_jax import report
from synthdistill_jax import train
from synthdistill_jax import validation
from synthdistill_jax import workdir as workdir_lib
from synthdistill_jax.data import static_dataset
from tests import conftest
from tests import tiny

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = f"--config={ROOT / 'configs' / 'demo.py'}:tiny"


def _main(*args, **kw) -> subprocess.Popen:
  return subprocess.Popen(
      [sys.executable, "-m", "synthdistill_jax.main", *args],
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      **kw,
  )


def _one_line_error(message: str) -> str:
  lines = [l for l in message.splitlines() if l.strip()]
  assert len(lines) == 1, message
  assert "Traceback" not in message
  return lines[0]


@pytest.mark.parametrize(
    "field,value,expected",
    [
        ("checkpoint.keep", 0, "checkpoint.keep=0: must be an integer >= 1"),
        ("optimizer.learning_rate", -1.0, "optimizer.learning_rate=-1.0"),
        ("optimizer.learning_rate", 0.0, "must be > 0"),
        ("schedule.epochs", 0, "schedule.epochs=0"),
        ("schedule.steps_per_epoch", 0, "schedule.steps_per_epoch=0"),
        ("log_every_steps", 0, "log_every_steps=0"),
        ("checkpoint.every_steps", 0, "checkpoint.every_steps=0"),
        ("mesh.num_devices", 64, "mesh.num_devices=64: only"),
        ("optimizer.b1", 1.0, "optimizer.b1=1.0"),
        ("optimizer.decay_factor", 0.0, "optimizer.decay_factor=0.0"),
        ("sampler.resampling_coef", float("nan"), "sampler.resampling_coef"),
        ("schedule.batch_size", 0, "schedule.batch_size=0"),
        # The kwargs dicts take new keys from the command line, typed as
        # written: 'yes' ran as a true remat, dropout ended in Flax's
        # missing-rng traceback after the first validation.
        (
            "student.kwargs.remat",
            "yes",
            "student.kwargs.remat='yes': must be True or False",
        ),
        (
            "student.kwargs.layers",
            (1, "x", 1, 1),
            "student.kwargs.layers=(1, 'x', 1, 1): must be a list of integers",
        ),
        (
            "generator.random.fused_modconv",
            1,
            "generator.random.fused_modconv=1: must be True or False",
        ),
        (
            "generator.random.conv_clamp",
            "256",
            "generator.random.conv_clamp='256': must be a number",
        ),
        (
            "student.kwargs.dropout",
            0.5,
            "student.kwargs.dropout=0.5: the trainer does not use dropout",
        ),
    ],
)
def test_settings_that_cannot_train_are_one_line(
    tmp_path, field, value, expected
):
  config = tiny.tiny_config(**{field: value})
  start = time.perf_counter()
  with pytest.raises(errors.ConfigError) as info:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  # Refused before any network is built or compiled.
  assert time.perf_counter() - start < 5.0
  assert expected in _one_line_error(str(info.value))
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_workdir_that_is_a_file_or_unwritable(tmp_path):
  afile = tmp_path / "afile"
  afile.write_text("x")
  for workdir, expected in (
      (afile, "is a file, not a folder"),
      (afile / "sub", "cannot create or write it"),
  ):
    with pytest.raises(errors.ConfigError, match=expected):
      validation.check_workdir(str(workdir))
  # A file written at the end of a long command (benchmark, aot --output).
  for output, expected in (
      (tmp_path, "is a folder; give a file in it"),
      (afile / "out.json", "cannot write in"),
      ("", "--output is empty"),
  ):
    with pytest.raises(errors.ConfigError, match=expected):
      validation.check_output_file(str(output), "--output")
  validation.check_output_file(str(tmp_path / "new" / "out.json"), "--output")
  assert [p.name for p in (tmp_path / "new").iterdir()] == []


def test_fewer_epochs_than_done_are_refused_a_finished_run_says_so(
    tmp_path, capsys
):
  workdir = tmp_path / "run"
  train.train_and_evaluate(
      tiny.tiny_config(**{"schedule.epochs": 2}), str(workdir)
  )
  stored = (workdir / "config.json").read_text()
  records = metrics_io.read_metrics(workdir)
  capsys.readouterr()
  # It resumed at iteration 6, trained nothing and stored epochs=1 as the
  # run's schedule, without a word.
  with pytest.raises(errors.ConfigError) as info:
    train.train_and_evaluate(tiny.tiny_config(), str(workdir))
  assert str(info.value) == (
      f"schedule.epochs=1 ends at iteration 3, but the run in {workdir} is"
      " at iteration 6: give at least --config.schedule.epochs=2 (more to"
      " train on), or use another --workdir"
  )
  assert (workdir / "config.json").read_text() == stored
  # The same schedule again: nothing to train, and it says so.
  result = train.train_and_evaluate(
      tiny.tiny_config(**{"schedule.epochs": 2}), str(workdir)
  )
  assert int(result.state.step) == 6
  assert (
      "nothing left to train: the run is at iteration 6 of 6; give a larger"
      " --config.schedule.epochs to continue it"
  ) in capsys.readouterr().out
  assert metrics_io.read_metrics(workdir) == records


def test_a_compilation_cache_dir_that_is_a_file(tmp_path):
  # JAX warned once per program ("Error reading persistent compilation
  # cache entry ... File exists") and ran uncached.
  afile = tmp_path / "afile"
  afile.write_text("x")
  config = tiny.tiny_config(compilation_cache_dir=str(afile))
  with pytest.raises(errors.ConfigError) as info:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert str(info.value) == (
      f"compilation_cache_dir={afile}: is a file, not a folder; choose"
      " another path"
  )


def test_a_workdir_uri_that_cannot_be_opened_or_reached(monkeypatch):
  # An unknown scheme was a KeyError traceback from epath, s3:// without
  # s3fs an ImportError one.
  with pytest.raises(errors.ConfigError) as info:
    validation.check_workdir("nosuchfs://bucket/run")
  assert str(info.value) == (
      "--workdir=nosuchfs://bucket/run: cannot open such a path here (no file"
      " system for 'nosuchfs://'); local folders and gs:// work (gs:// with"
      " pip install -e '.[gcs]')"
  )

  class Unreachable:
    """A bucket whose host does not resolve (gcsfs, after its retries)."""

    def __init__(self, path):
      del path

    def exists(self):
      raise OSError(-2, "Name or service not known")

  monkeypatch.setattr(validation.epath, "Path", Unreachable)
  with pytest.raises(errors.ConfigError) as info:
    validation.check_workdir("gs://bucket/run")
  assert str(info.value) == (
      "--workdir=gs://bucket/run: cannot reach it (Name or service not"
      " known); check the path, the network and the credentials"
  )


def test_an_empty_workdir_is_refused_not_the_current_folder(
    tmp_path, monkeypatch
):
  monkeypatch.chdir(tmp_path)

  def create(*args, **kwargs):
    raise AssertionError("built an experiment for an empty --workdir")

  monkeypatch.setattr(train.experiment, "create", create)
  for workdir in ("", " "):
    with pytest.raises(errors.ConfigError, match="--workdir is empty"):
      train.train_and_evaluate(tiny.tiny_config(), workdir)
  assert not list(tmp_path.iterdir())  # Nothing written where we stand.


def test_command_line_mistakes_are_one_line(tmp_path):
  cases = [
      (["--config=configs/nope.py"], "--config=configs/nope.py: no such"),
      (
          [TINY, "--config.schedule.batchsize=4"],
          "--config.schedule.batchsize: no such config field (did you mean"
          " batch_size?)",
      ),
      (
          [f"--config={ROOT / 'configs' / 'demo.py'}:bogus"],
          "unknown argument 'bogus'",
      ),
      ([TINY, "--config.checkpoint.keep=0"], "checkpoint.keep=0"),
      (
          [TINY, "--config.schedule.batch_size=3.5"],
          "--config.schedule.batch_size=3.5: invalid literal for int() with"
          " base 10: '3.5'",
      ),
  ]
  # Config files that return something else than a full config.
  number = tmp_path / "number.py"
  number.write_text("def get_config():\n  return 5\n")
  partial = tmp_path / "partial.py"
  partial.write_text(
      "import ml_collections\n"
      "def get_config():\n"
      "  return ml_collections.ConfigDict({'seed': 1})\n"
  )
  cases += [
      ([f"--config={number}"], "returned a int, not an"),
      ([f"--config={partial}"], "the config has no field"),
  ]
  env = dict(os.environ, XLA_FLAGS=conftest.xla_flags(1))
  for args, expected in cases:
    start = time.perf_counter()
    proc = _main(*args, f"--workdir={tmp_path / 'w'}", env=env)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert expected in _one_line_error(err), err
    # Imports included; nothing was built.
    assert time.perf_counter() - start < 60


def test_tool_usage_mistakes_are_one_line():
  # argparse printed its 3-4 line usage block above the message.
  cases = [
      ("convert_face_model.py", [], "required: --arch, --input"),
      ("convert_stylegan2.py", ["--input=x"], "required: --output"),
      (
          "export_student.py",
          ["--checkpoint=x", "--format=tflite", "--output=y"],
          "invalid choice: 'tflite'",
      ),
  ]
  for tool, args, expected in cases:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / tool), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"{tool}: error: ") and expected in line, line
    assert line.endswith("(see --help)")


def test_a_live_lock_refuses_and_a_dead_one_is_taken_over(tmp_path):
  messages = []
  first = workdir_lib.RunLock(tmp_path, messages.append).acquire()
  # Same host, live pid (this process): a second trainer is refused.
  with pytest.raises(workdir_lib.WorkdirBusyError) as info:
    workdir_lib.RunLock(tmp_path).acquire()
  assert f"in use by pid {os.getpid()}" in _one_line_error(str(info.value))
  first.release()
  assert not (tmp_path / "LOCK").exists()
  # A lock left by a killed process (its pid is gone) is taken over.
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  holder = json.loads(json.dumps({}))
  holder.update(
      host=os.uname().nodename, pid=dead.pid, started=0.0, heartbeat=0.0
  )
  (tmp_path / "LOCK").write_text(json.dumps(holder))
  lock = workdir_lib.RunLock(tmp_path, messages.append).acquire()
  assert any("taking over the lock" in m for m in messages), messages
  assert json.loads((tmp_path / "LOCK").read_text())["pid"] == os.getpid()
  lock.release()


def _write_lock(workdir, **fields):
  holder = dict(host=os.uname().nodename, started=0.0, heartbeat=0.0)
  holder.update(fields)
  (workdir / "LOCK").write_text(json.dumps(holder))


def test_a_lock_whose_pid_was_reused_is_taken_over(tmp_path):
  # A restarted container has the same hostname and often the same small
  # pid: the earlier incarnation's lock names a pid that is alive (us).
  messages = []
  _write_lock(tmp_path, pid=os.getpid(), token="an-earlier-process")
  lock = workdir_lib.RunLock(tmp_path, messages.append).acquire()
  assert any("taking over the lock" in m for m in messages), messages
  lock.release()
  if workdir_lib._boot_id() is None:  # pylint: disable=protected-access
    pytest.skip("no /proc: pid reuse beyond this process is not detectable")
  live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    start = workdir_lib._process_start(live.pid)  # pylint: disable=protected-access
    boot = workdir_lib._boot_id()  # pylint: disable=protected-access
    # The same live process: refused.
    _write_lock(tmp_path, pid=live.pid, process_start=start, boot_id=boot)
    with pytest.raises(workdir_lib.WorkdirBusyError):
      workdir_lib.RunLock(tmp_path).acquire()
    # A live pid that is another process than the one that wrote the lock
    # (other start time), or a lock from before a reboot: taken over.
    for fields in (
        dict(process_start="1", boot_id=boot),
        dict(process_start=start, boot_id="another-boot"),
    ):
      messages.clear()
      _write_lock(tmp_path, pid=live.pid, **fields)
      workdir_lib.RunLock(tmp_path, messages.append).acquire().release()
      assert any("taking over the lock" in m for m in messages), fields
  finally:
    live.kill()
    live.wait()


def test_heartbeat_never_overwrites_a_new_holder(tmp_path, monkeypatch):
  monkeypatch.setattr(workdir_lib, "HEARTBEAT_S", 0.01)
  messages = []
  lock = workdir_lib.RunLock(tmp_path, messages.append).acquire()
  # Another trainer took the lock over while this one looked dead.
  _write_lock(tmp_path, pid=1, token="the-new-holder", heartbeat=1e12)
  lock._thread.join(timeout=30)  # pylint: disable=protected-access
  assert json.loads((tmp_path / "LOCK").read_text())["token"] == (
      "the-new-holder"
  )
  assert any("lost the lock" in m for m in messages), messages
  lock.release()
  assert (tmp_path / "LOCK").exists()  # Not ours to remove.


@pytest.mark.slow
def test_second_trainer_on_one_workdir_is_refused(tmp_path):
  env = dict(os.environ, XLA_FLAGS=conftest.xla_flags(1))
  workdir = tmp_path / "run"
  first = _main(
      TINY, f"--workdir={workdir}", "--config.schedule.epochs=2", env=env
  )
  deadline = time.time() + 300
  while not (workdir / "LOCK").exists():
    assert first.poll() is None, first.communicate()[1][-3000:]
    assert time.time() < deadline
    time.sleep(0.2)
  start = time.perf_counter()
  second = _main(TINY, f"--workdir={workdir}", env=env)
  _, err = second.communicate(timeout=60)
  refused_after = time.perf_counter() - start
  assert second.returncode == 1
  assert "in use by pid" in _one_line_error(err)
  assert refused_after < 30
  _, err = first.communicate(timeout=900)
  assert first.returncode == 0, err[-3000:]
  assert not (workdir / "LOCK").exists()
  steps = [r["step"] for r in metrics_io.read_metrics(workdir, "train")]
  assert steps == list(range(1, 7))


def _tiny_state(value: float):
  return {"w": jnp.full((4, 3), value), "b": jnp.full((3,), value)}


def _manager(directory):
  return checkpoints.create_manager(directory, keep=3, use_async=False)


def _restore_fresh(directory, like):
  """`restore_latest` by a new manager (a resumed run's), and its lines."""
  messages = []
  manager = _manager(directory)
  try:
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like
    )
    restored = checkpoints.restore_latest(manager, target, messages.append)
  finally:
    manager.close()
  return restored, messages


def test_damaged_checkpoints_are_set_aside_never_trusted(tmp_path):
  directory = tmp_path / "checkpoints"
  manager = _manager(directory)
  for step in (1, 2, 3):
    checkpoints.save(manager, _tiny_state(step), step=step)
  manager.wait_until_finished()
  manager.close()
  # A fresh manager, as a resumed run has. Step 3: metadata gone; step 2: every array file truncated.
  (directory / "3" / "default" / "_METADATA").unlink()
  for f in (directory / "2" / "default").rglob("*"):
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(f.read_bytes()[:7])
  target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _tiny_state(0.0)
  )
  messages = []
  manager = _manager(directory)
  restored = checkpoints.restore_latest(manager, target, messages.append)
  manager.close()
  np.testing.assert_array_equal(restored["w"], np.full((4, 3), 1.0))
  aside = sorted(p.name for p in (tmp_path / "checkpoints.corrupt").iterdir())
  assert [a.split("-")[0] for a in aside] == ["2", "3"]
  assert len(messages) == 2 and all("moved to" in m for m in messages)
  # Nothing restorable at all: one line, never a silent fresh start.
  manager = _manager(directory)
  (directory / "1" / "default" / "_METADATA").unlink()
  with pytest.raises(checkpoints.CheckpointError) as info:
    checkpoints.restore_latest(manager, target, messages.append)
  manager.close()
  assert "no restorable checkpoint" in _one_line_error(str(info.value))
  # Running again is refused again: never a fresh start over the run.
  manager = _manager(directory)
  with pytest.raises(checkpoints.CheckpointError) as info:
    checkpoints.restore_latest(manager, target, messages.append)
  manager.close()
  assert "checkpoints.corrupt" in _one_line_error(str(info.value))
  # A checkpoint of other shapes is a config mistake: nothing moved.
  manager = _manager(tmp_path / "other")
  checkpoints.save(manager, _tiny_state(1.0), step=1)
  manager.wait_until_finished()
  manager.close()
  manager = _manager(tmp_path / "other")
  wrong = dict(target, w=jax.ShapeDtypeStruct((5, 3), jnp.float32))
  with pytest.raises(errors.ConfigError, match="other shapes"):
    checkpoints.restore_latest(manager, wrong)
  manager.close()
  assert (tmp_path / "other" / "1").exists()


def flip_bytes_in_largest_array_file(folder: pathlib.Path) -> pathlib.Path:
  """XORs 8 bytes in the middle of the largest data file under `folder`.

  orbax's zstd chunks carry no checksum: on incompressible numbers this
  changes values and the restore itself succeeds.
  """
  files = [f for f in folder.rglob("*") if f.is_file() and f.parent.name == "d"]
  target = max(files, key=lambda f: f.stat().st_size)
  data = bytearray(target.read_bytes())
  middle = len(data) // 2
  data[middle : middle + 8] = bytes(b ^ 0x55 for b in data[middle : middle + 8])
  target.write_bytes(bytes(data))
  return target


def test_checkpoint_with_changed_bytes_is_set_aside(tmp_path):
  directory = tmp_path / "checkpoints"
  rng = np.random.default_rng(0)
  states = {
      step: {
          "w": jnp.asarray(rng.standard_normal((64, 64)), jnp.float32),
          "step": jnp.int32(step),
      }
      for step in (1, 2)
  }
  manager = _manager(directory)
  for step, state in states.items():
    checkpoints.save(manager, state, step=step)
  manager.wait_until_finished()
  manager.close()
  flip_bytes_in_largest_array_file(directory / "2")
  restored, messages = _restore_fresh(directory, states[1])
  np.testing.assert_array_equal(restored["w"], states[1]["w"])
  assert len(messages) == 1, messages
  assert "checkpoint 2 cannot be restored (w differs from" in messages[0]
  assert "changed after they were written" in messages[0]
  assert [
      p.name.split("-")[0] for p in (tmp_path / "checkpoints.corrupt").iterdir()
  ] == ["2"]
  # Its metadata file unreadable: the checksums are gone with it, so the
  # checkpoint is damaged, not one written before checksums.
  manager = _manager(directory)
  checkpoints.save(manager, states[2], step=3)
  manager.wait_until_finished()
  manager.close()
  (directory / "3" / checkpoints.STEP_METADATA).write_text("garbage")
  restored, messages = _restore_fresh(directory, states[1])
  np.testing.assert_array_equal(restored["w"], states[1]["w"])
  assert len(messages) == 1, messages
  assert "_CHECKPOINT_METADATA is not valid JSON" in messages[0]
  assert messages[0].startswith("checkpoint 3 cannot be restored")


def test_checkpoint_without_checksums_is_restored_with_a_line(tmp_path):
  # Written by a version before checksums: trusted as before, and said so.
  directory = tmp_path / "checkpoints"
  manager = _manager(directory)
  manager.save(4, args=ocp.args.StandardSave(_tiny_state(4.0)))
  manager.wait_until_finished()
  manager.close()
  restored, messages = _restore_fresh(directory, _tiny_state(0.0))
  np.testing.assert_array_equal(restored["w"], np.full((4, 3), 4.0))
  assert messages == [
      "checkpoint 4 restored unverified: it has no checksums (written before"
      " 2026-12-07)"
  ]


def test_a_fresh_manager_restores_intact_checkpoints(tmp_path):
  # What a resumed process does: a new manager that has not saved or
  # restored anything yet. Intact checkpoints must be restored, never taken
  # for damage (orbax answers `item_metadata` with None until it knows the
  # item's handler), and other shapes are still a config mistake.
  directory = tmp_path / "checkpoints"
  manager = _manager(directory)
  for step in (1, 2):
    checkpoints.save(manager, _tiny_state(step), step=step)
  manager.wait_until_finished()
  manager.close()
  target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _tiny_state(0.0)
  )
  messages = []
  manager = _manager(directory)
  restored = checkpoints.restore_latest(manager, target, messages.append)
  manager.close()
  np.testing.assert_array_equal(restored["w"], np.full((4, 3), 2.0))
  assert not messages
  assert not (tmp_path / "checkpoints.corrupt").exists()
  manager = _manager(directory)
  wrong = dict(target, w=jax.ShapeDtypeStruct((5, 3), jnp.float32))
  with pytest.raises(errors.ConfigError, match="other shapes"):
    checkpoints.restore_latest(manager, wrong, messages.append)
  manager.close()
  assert sorted(p.name for p in directory.iterdir()) == ["1", "2"]


def test_checkpoints_gone_after_a_save_are_not_a_fresh_start(tmp_path):
  like = _tiny_state(0)
  restored, _ = _restore_fresh(tmp_path / "checkpoints", like)
  assert restored is None  # A new workdir: a fresh start.
  # The student is exported with every checkpoint: one saved at iteration
  # 5 means the run's checkpoints were removed (or are on another disk).
  (tmp_path / "student").mkdir()
  (tmp_path / "student" / "model.json").write_text(
      json.dumps({"metadata": {"step": 5}})
  )
  with pytest.raises(checkpoints.CheckpointError) as info:
    _restore_fresh(tmp_path / "checkpoints", like)
  assert str(info.value) == (
      f"no checkpoint in {tmp_path / 'checkpoints'}, but"
      f" {tmp_path / 'student'} was saved at iteration 5: the run's"
      " checkpoints were removed or are on another disk; restore them, or"
      " start a new --workdir"
  )


@pytest.mark.slow
def test_corrupt_newest_checkpoint_resumes_from_the_previous(tmp_path):
  workdir = tmp_path / "run"
  train.train_and_evaluate(tiny.tiny_config(), str(workdir))
  # Checkpoints at iterations 2 and 3 (every 2 and at the end).
  arrays = [
      f
      for f in (workdir / "checkpoints" / "3").rglob("*")
      if f.is_file() and f.parent.name == "d"
  ]
  assert arrays
  for f in arrays:
    f.write_bytes(b"garbage")
  result = train.train_and_evaluate(
      tiny.tiny_config(**{"schedule.epochs": 2}), str(workdir)
  )
  assert int(result.state.step) == 6
  aside = list((workdir / "checkpoints.corrupt").iterdir())
  assert [p.name.split("-")[0] for p in aside] == ["3"]
  steps = [r["step"] for r in metrics_io.read_metrics(workdir, "train")]
  # Iteration 3 was redone from checkpoint 2: logged once, not twice.
  assert steps == list(range(1, 7))


def test_resume_with_changed_settings_names_the_fields(tmp_path):
  config = tiny.tiny_config()
  workdir_lib.check_or_store_config(config, tmp_path, has_checkpoints=False)
  stored = json.loads((tmp_path / "config.json").read_text())
  assert stored["schedule"]["batch_size"] == 8
  # More epochs: how a finished run is continued.
  workdir_lib.check_or_store_config(
      tiny.tiny_config(**{"schedule.epochs": 5}), tmp_path, True
  )
  changed = tiny.tiny_config(
      **{"schedule.batch_size": 16, "student.arch": "mobilefacenet"}
  )
  with pytest.raises(errors.ConfigError) as info:
    workdir_lib.check_or_store_config(changed, tmp_path, True)
  message = _one_line_error(str(info.value))
  assert "schedule.batch_size 8 -> 16" in message
  assert "student.arch 'iresnet18' -> 'mobilefacenet'" in message
  assert "allow_config_change" in message
  changed.allow_config_change = True
  workdir_lib.check_or_store_config(changed, tmp_path, True)
  stored = json.loads((tmp_path / "config.json").read_text())
  assert stored["schedule"]["batch_size"] == 16
  # An unreadable stored config: set aside with one line, never trusted.
  for text in ('{"schedule": {"batch_size"', "[1, 2]"):
    (tmp_path / "config.json").write_text(text)
    messages = []
    workdir_lib.check_or_store_config(config, tmp_path, True, messages.append)
    assert len(messages) == 1 and "moved to" in messages[0], messages
    aside = sorted(tmp_path.glob("config.json.corrupt-*"))
    assert aside and aside[-1].read_text() == text
    aside[-1].unlink()
    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored["schedule"]["batch_size"] == 8


def test_metrics_after_a_resume_have_no_duplicate_steps(tmp_path):
  writer = metrics_io.MetricWriter(tmp_path, enabled=True)
  for step in range(1, 6):
    writer.write(step, "train", {"loss": float(step)})
  writer.close()
  # Killed after logging 5 but resumed from the checkpoint at 3.
  writer = metrics_io.MetricWriter(tmp_path, enabled=True, resume_step=3)
  for step in range(4, 7):
    writer.write(step, "train", {"loss": 10.0 + step})
  writer.close()
  records = metrics_io.read_metrics(tmp_path, "train")
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
  assert [r["loss"] for r in records][3:] == [14.0, 15.0, 16.0]
  # A damaged file (cut by a full disk, edited): its unreadable lines are
  # dropped with a note, in the trainer and in the report.
  path = tmp_path / "metrics.jsonl"
  path.write_text(path.read_text() + '{"step": 7, "split": "tr\n[1, 2]\n')
  assert len(report.read_records(tmp_path)) == 6
  notes = []
  writer = metrics_io.MetricWriter(
      tmp_path, enabled=True, resume_step=6, log=notes.append
  )
  writer.close()
  assert notes == [
      f"{path}: dropped 2 unreadable line(s) (not a JSON record with a step)"
  ]


def test_stale_temporaries_are_removed(tmp_path):
  for name in (
      "student.tmp-7",
      "student.old",
      "checkpoints/8.orbax-checkpoint-tmp-123",
  ):
    (tmp_path / name).mkdir(parents=True)
  (tmp_path / ".metrics.jsonl.tmp-99").write_text("half")
  (tmp_path / "checkpoints" / "4").mkdir()
  removed = workdir_lib.remove_stale_temporaries(tmp_path, lambda _: None)
  assert len(removed) == 4
  assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]
  assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["4"]


def test_static_sampler_resume_seeks_without_reading(tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  stream = (
      {
          "w": rng.standard_normal((10, 4)).astype(np.float32),
          "face": rng.integers(0, 256, (10, 112, 112, 3), dtype=np.uint8),
          "teacher": rng.standard_normal((10, 16)).astype(np.float32),
      }
      for _ in range(4)
  )
  static_dataset.write_static_dataset(
      tmp_path / "static", stream, num_examples=40, w_dim=4, emb_dim=16
  )
  config = tiny.tiny_config(
      **{
          "sampler.kind": "static",
          "sampler.static_dataset": str(tmp_path / "static"),
          "mesh.num_devices": 1,
      }
  )
  mesh = jax.make_mesh((1,), ("data",))
  reads = []
  original = static_dataset.StaticDataset.batches

  def counting(self, *args, **kw):
    for batch in original(self, *args, **kw):
      reads.append(1)
      yield batch

  monkeypatch.setattr(static_dataset.StaticDataset, "batches", counting)
  # 5 batches of 8 per epoch, 2 per iteration: iteration 7 starts in epoch 2.
  straight = train.static_batches(config, mesh, 0)
  want = [next(straight) for _ in range(9)][7:]
  reads.clear()
  resumed = train.static_batches(config, mesh, 7)
  got = [next(resumed) for _ in range(2)]
  assert len(reads) == 4  # Only the batches used, none of the 14 skipped.
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _static_set(directory, emb_dim, nan_example=None):
  """A 16-example static set; `nan_example` gets a NaN target."""
  rng = np.random.default_rng(0)
  teacher = rng.standard_normal((16, emb_dim)).astype(np.float32)
  if nan_example is not None:
    teacher[nan_example, 0] = np.nan
  batch = {
      "w": rng.standard_normal((16, 4)).astype(np.float32),
      "face": rng.integers(0, 256, (16, 112, 112, 3), dtype=np.uint8),
      "teacher": teacher,
  }
  static_dataset.write_static_dataset(
      directory, [batch], num_examples=16, w_dim=4, emb_dim=emb_dim
  )
  return str(directory)


def test_a_static_set_the_student_cannot_use_is_one_line(tmp_path, monkeypatch):
  # Targets of another teacher: refused before anything is built (it was a
  # broadcasting error inside the compiled step).
  config = tiny.tiny_config(
      **{
          "sampler.kind": "static",
          "sampler.static_dataset": _static_set(tmp_path / "other", 24),
          "mesh.num_devices": 1,
      }
  )
  with pytest.raises(experiment.ConfigError) as info:
    experiment.create(config, abstract=True)
  assert str(info.value).startswith(
      f"sampler.static_dataset={str(tmp_path / 'other')!r}: its 'teacher'"
      " feature is float32 [24], the trainer needs float32 [16]"
  )
  config.sampler.static_dataset = str(tmp_path)  # No dataset in it.
  with pytest.raises(experiment.ConfigError, match="no static dataset here"):
    experiment.create(config, abstract=True)
  # A damaged set (the writer refuses NaN now; an old or altered one may
  # hold it) is named, not taken for a diverged run.
  monkeypatch.setattr(
      static_dataset.StaticSyntheticFaces,
      "_check_batch",
      lambda self, b, batch: batch,
  )
  config.sampler.static_dataset = _static_set(tmp_path / "nan", 16, 5)
  batches = train.static_batches(config, jax.make_mesh((1,), ("data",)), 0)
  with pytest.raises(experiment.ConfigError) as info:
    next(batches)
  assert "example 5 has a non-finite teacher embedding" in str(info.value)
  # In a run the batch goes on, so that every host stops at the same
  # iteration when the loss turns NaN; the host that read it says why.
  config.schedule.val_batches = 0
  with pytest.raises(train.TrainingDiverged) as info:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert str(info.value).startswith(
      f"sampler.static_dataset={config.sampler.static_dataset!r}: example 5"
      " has a non-finite teacher embedding (1 in its batch): the set is"
      " damaged; write it again with tools/make_static_dataset.py"
      " (non-finite loss at iteration 1"
  )
  assert not list((tmp_path / "run" / "checkpoints").iterdir())


def _adam_states(ravel: bool, steps: int):
  """Params and Adam's state after `steps` updates on fixed gradients."""
  tx = optax.adam(1e-2)
  if ravel:
    tx = optax.flatten(tx)
  params = {"w": jnp.ones((4, 3)), "b": jnp.zeros((3,)), "s": jnp.ones(())}
  opt_state = tx.init(params)
  for i in range(steps):
    grads = jax.tree.map(lambda x, i=i: jnp.full_like(x, 0.5 - i) * x, params)
    grads["b"] = grads["b"] + jnp.arange(3.0)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  return {"params": params, "opt_state": opt_state}


def _abstract(tree):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(
          x.shape,
          x.dtype,
          sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]),
      ),
      tree,
  )


def _assert_same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_regroup_converts_optimiser_states_both_ways():
  per_leaf = _adam_states(False, 3)
  raveled = checkpoints.regroup(per_leaf, _abstract(_adam_states(True, 0)))
  mu = per_leaf["opt_state"][0].mu
  # One vector of 4*3+3+1 in tree order, the parameters as they were.
  np.testing.assert_array_equal(
      raveled["opt_state"][0].mu,
      np.concatenate([np.ravel(x) for x in jax.tree.leaves(mu)]),
  )
  _assert_same(raveled["params"], per_leaf["params"])
  _assert_same(checkpoints.regroup(raveled, _abstract(per_leaf)), per_leaf)
  other = dict(raveled, params={"w": jnp.ones((5, 3)), "b": jnp.zeros((3,))})
  with pytest.raises(ValueError, match="cannot be regrouped"):
    checkpoints.regroup(per_leaf, _abstract(other))


def test_checkpoint_of_the_other_optimiser_layout_resumes_converted(tmp_path):
  # A run checkpointed with per-parameter Adam state (earlier versions, or
  # a sharded student) resumes with the raveled one, and back.
  for saved, wanted in ((False, True), (True, False)):
    directory = tmp_path / f"from-{saved}"
    manager = _manager(directory)
    checkpoints.save(manager, _adam_states(saved, 3), step=3)
    manager.wait_until_finished()
    manager.close()
    target = _abstract(_adam_states(wanted, 0))
    messages = []
    manager = _manager(directory)
    with pytest.raises(errors.ConfigError, match="other shapes"):
      checkpoints.restore_latest(manager, target, messages.append)
    restored = checkpoints.restore_latest(
        manager,
        target,
        messages.append,
        alternatives=[_abstract(_adam_states(saved, 0))],
    )
    manager.close()
    _assert_same(restored, checkpoints.regroup(_adam_states(saved, 3), target))
    assert len(messages) == 1 and "converted" in messages[0]
    assert sorted(p.name for p in directory.iterdir()) == ["3"]


@pytest.mark.slow
def test_run_resumes_across_optimiser_layouts(tmp_path, capsys):
  # Checkpoints of a sharded student (per-parameter Adam state, as every
  # run before the raveled state) resume under a replicated one: converted,
  # never set aside nor refused.
  workdir = tmp_path / "run"
  train.train_and_evaluate(
      tiny.tiny_config(**{"mesh.student_sharding": "sharded"}), str(workdir)
  )
  result = train.train_and_evaluate(
      tiny.tiny_config(**{"schedule.epochs": 2}), str(workdir)
  )
  assert int(result.state.step) == 6
  assert "converted" in capsys.readouterr().out
  # Adam's moments as one vector each, as a fresh replicated CPU run has.
  tx, _ = experiment.create_optimizer(tiny.tiny_config(), ravel=True)
  raveled = jax.eval_shape(tx.init, result.state.params)
  assert jax.tree.structure(result.state.opt_state) == jax.tree.structure(
      raveled
  )
  for a, b in zip(
      jax.tree.leaves(result.state.opt_state), jax.tree.leaves(raveled)
  ):
    assert a.shape == b.shape
  assert not (workdir / "checkpoints.corrupt").exists()
  steps = [r["step"] for r in metrics_io.read_metrics(workdir, "train")]
  assert steps == list(range(1, 7))


def test_preemption_flag_takes_sigterm_and_leaves_an_ignored_ctrl_c():
  previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
  try:
    with checkpoints.PreemptionFlag() as flag:
      # A job started with `&` by a script ignores Ctrl-C: it still does.
      assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
      assert not flag.is_set()
      os.kill(os.getpid(), signal.SIGTERM)
      deadline = time.time() + 10
      while not flag.is_set() and time.time() < deadline:
        time.sleep(0.01)
      assert flag.is_set() and flag.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
  finally:
    signal.signal(signal.SIGINT, previous)


# A Ctrl-C that Python raises inside a finaliser (here: `__del__`, as the
# garbage collector or a weakref callback may run at any moment).
_CTRL_C_IN_A_FINALISER = """
import signal, time
from synthdistill_jax import errors

class Finalised:
  def __del__(self):
    signal.default_int_handler(signal.SIGINT, None)

@errors.exit_on_ctrl_c
def main():
  Finalised()
  for _ in range(500):
    time.sleep(0.01)
  print("went on as if no key was pressed")

main()
"""


def test_a_ctrl_c_raised_in_a_finaliser_still_stops_the_command():
  # Unhandled, Python prints "Exception ignored in" with a traceback and
  # the command goes on (seen as a second Ctrl-C that did not stop a run).
  proc = subprocess.run(
      [sys.executable, "-c", _CTRL_C_IN_A_FINALISER],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert proc.returncode == errors.INTERRUPTED_STATUS, proc.stderr
  assert "went on" not in proc.stdout
  assert proc.stderr.strip() == "interrupted (Ctrl-C)"


def test_a_ctrl_c_caught_in_code_run_from_a_string_still_exits_130(tmp_path):
  # CPython marks a Ctrl-C that ends an `exec` of text as unhandled even
  # when a caller catches it; `python -m` then dies by SIGINT (status -2).
  # The networks' dataclass `__init__`s are built that way.
  (tmp_path / "interrupted_in_exec.py").write_text(
      "from synthdistill_jax import errors\n"
      "errors.exit_on_ctrl_c(lambda: exec('raise KeyboardInterrupt'))()\n"
  )
  proc = subprocess.run(
      [sys.executable, "-m", "interrupted_in_exec"],
      cwd=tmp_path,
      env=dict(os.environ, PYTHONPATH=str(ROOT)),
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert proc.returncode == errors.INTERRUPTED_STATUS, proc.stderr
  assert proc.stderr.strip() == "interrupted (Ctrl-C)"


def test_a_save_that_cannot_fit_is_one_line_before_anything_is_written(
    tmp_path, monkeypatch
):
  # A full disk half-way through an orbax write leaves its threads printing
  # tracebacks: the free space is checked first.
  real_statvfs = os.statvfs

  class Full:

    def __init__(self, path):
      stat = real_statvfs(path)
      self.f_frsize, self.f_bavail = stat.f_frsize, 10

  monkeypatch.setattr(train.os, "statvfs", Full)
  workdir = tmp_path / "run"
  with pytest.raises(train.WriteFailed) as info:
    train.train_and_evaluate(tiny.tiny_config(), str(workdir))
  message = _one_line_error(str(info.value))
  # Before any iteration: no training is lost to it.
  assert message.startswith(
      f"before the first iteration: a checkpoint in {workdir} needs about"
  )
  assert "MiB free on this host; no checkpoint is complete" in message
  assert not list((workdir / "checkpoints").iterdir())
  assert not (workdir / "student").exists()
  assert not (workdir / "metrics.jsonl").exists()


def test_a_workdir_file_that_cannot_be_written_is_one_line(tmp_path):
  # `tb` taken by a file: TensorBoard's writer fails once the run has begun.
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "tb").write_text("not a folder")
  proc = _main(TINY, f"--workdir={workdir}")
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 1
  message = _one_line_error(
      "\n".join(l for l in err.splitlines() if not l.startswith("mesh:"))
  )
  assert message.startswith(f"error: {workdir / 'tb'}/events.out.tfevents")
  assert ": Not a directory; checkpoints already written are kept" in message


def test_a_failed_write_is_one_line_and_a_bug_keeps_its_traceback(
    tmp_path, monkeypatch
):
  def fail_with(error):
    def export_student(*args, **kwargs):
      del args, kwargs
      raise error

    return export_student

  # How tensorstore words a full disk under orbax.
  full = ValueError(
      'RESOURCE_EXHAUSTED: Error writing "params.w/0" in OCDBT database:'
      " Failed to write 811863 bytes to file 23: No space left on device"
      " [os_error_code='28']"
  )
  monkeypatch.setattr(checkpoints, "export_student", fail_with(full))
  with pytest.raises(train.WriteFailed) as info:
    train.train_and_evaluate(tiny.tiny_config(), str(tmp_path / "full"))
  message = _one_line_error(str(info.value))
  assert "saving iteration 2 in" in message
  assert "failed (No space left on device); checkpoint 2 is the newest" in (
      message
  )
  # Any other error is ours: `_save` lets it go with its type and traceback.
  assert not checkpoints.is_write_error(ValueError("shapes (3,) and (4,)"))
  assert not checkpoints.is_write_error(RuntimeError("Event loop is closed"))
  assert checkpoints.is_write_error(PermissionError(13, "Permission denied"))


class _FailedWrite:
  """A background write of an async save that fails (as a lost disk would)."""

  def result(self, timeout=None):
    del timeout
    time.sleep(0.05)  # In flight for an iteration or two.
    raise OSError(5, "Input/output error", "params.w/0")


def _fail_background_saves(monkeypatch, steps):
  """Makes the async checkpoint saves of iterations `steps` fail late."""
  save = ocp.StandardCheckpointHandler.async_save

  async def async_save(self, directory, *args, **kwargs):
    futures = await save(self, directory, *args, **kwargs)
    # directory: .../checkpoints/<step>.orbax-checkpoint-tmp/default...
    name = pathlib.Path(os.fspath(directory)).parent.name.split(".")[0]
    if name.isdigit() and int(name) in steps:
      return list(futures or []) + [_FailedWrite()]
    return futures

  monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", async_save)


def _async_config():
  return tiny.tiny_config(
      **{
          "checkpoint.use_async": True,
          "checkpoint.every_steps": 6,
          "schedule.epochs": 2,
          "schedule.steps_per_epoch": 6,
          "log_every_steps": 1,
      }
  )


def test_a_failed_background_save_is_replaced_at_the_next_log_step(
    tmp_path, monkeypatch, capsys
):
  # orbax reports it only when the next save starts: the run went on
  # without a checkpoint for a whole interval, then stopped there.
  _fail_background_saves(monkeypatch, {6})
  result = train.train_and_evaluate(_async_config(), str(tmp_path))
  assert int(result.state.step) == 12
  out = capsys.readouterr().out
  line = next(l for l in out.splitlines() if "in the background" in l)
  replaced = int(line.rsplit("saving iteration ", 1)[1].split()[0])
  assert line == (
      "saving iteration 6 failed in the background (Input/output error:"
      f" params.w/0); saving iteration {replaced} instead"
  )
  # Found at a log step; on a loaded host perhaps only at the next save.
  assert 6 < replaced <= 12
  manager = checkpoints.create_manager(
      tmp_path / "checkpoints", keep=3, use_async=False
  )
  assert manager.all_steps() == sorted({replaced, 12})
  manager.close()


def test_a_background_save_failing_again_stops_at_once(
    tmp_path, monkeypatch, capsys
):
  _fail_background_saves(monkeypatch, set(range(6, 13)))
  with pytest.raises(train.WriteFailed) as info:
    train.train_and_evaluate(_async_config(), str(tmp_path))
  message = _one_line_error(str(info.value))
  step = int(message.split("saving iteration ", 1)[1].split()[0])
  assert 6 < step <= 12, message
  assert message == (
      f"saving iteration {step} in {tmp_path} failed (Input/output error:"
      " params.w/0); no checkpoint is complete: free space or restore"
      " access, then run the same command to resume"
  )
  assert "iteration 6 failed in the background" in capsys.readouterr().out
  # Stopped where the second save failed, not at the next interval's.
  assert max(r["step"] for r in metrics_io.read_metrics(tmp_path)) == step


def _logged(name, pathname, error):
  """How a handler prints `error`, logged by `name` from `pathname`."""
  try:
    raise error
  except type(error):
    record = logging.LogRecord(
        name, logging.ERROR, pathname, 1, "write failed", (), sys.exc_info()
    )
  for f in logging.getLogger(name).filters:
    f.filter(record)
  return logging.Formatter().format(record)


def test_a_write_that_fails_midway_is_not_a_wall_of_tracebacks(
    tmp_path, monkeypatch
):
  # A full disk during an async save (on a 3 MiB tmpfs, the free-space
  # check bypassed): 788 lines of orbax's, asyncio's and tensorstore's
  # tracebacks before the trainer's one line; now 9 lines.
  # A checkpoint manager installs the log filter.
  checkpoints.create_manager(tmp_path, keep=1, use_async=False).close()
  full = ValueError(
      "RESOURCE_EXHAUSTED: Error writing ... No space left on device"
      " [os_error_code='28']"
  )
  orbax_file = os.path.join(os.sep, "x", "orbax", "checkpoint", "future.py")
  # orbax's lines keep their text, not their tracebacks...
  assert _logged("absl", orbax_file, full) == "write failed"
  assert _logged("asyncio", "base_events.py", full) == "write failed"
  # ...but a bug in orbax, or a write error logged by other code, keeps it.
  bug = TypeError("unsupported operand")
  assert "Traceback" in _logged("absl", orbax_file, bug)
  assert "Traceback" in _logged("absl", "/x/elsewhere.py", full)
  # Tensorstore's callbacks onto the failed write's closed loop: not shown.
  shown = []
  monkeypatch.setattr(errors, "_previous_unraisablehook", shown.append)

  def unraisable(error, obj=None):
    return types.SimpleNamespace(
        exc_type=type(error),
        exc_value=error,
        exc_traceback=None,
        err_msg=None,
        object=obj,
    )

  errors._unraisable_hook(unraisable(RuntimeError("Event loop is closed")))
  assert not shown
  other = unraisable(RuntimeError("Event loop is closed"), obj=object())
  errors._unraisable_hook(other)
  errors._unraisable_hook(unraisable(ValueError("x")))
  assert len(shown) == 2
