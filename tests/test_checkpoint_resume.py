"""A run killed with SIGKILL and resumed ends bit-identical to an unbroken one."""

import os
import signal
import subprocess
import sys
import time

import numpy as np

from synthdistill_jax import train
from tests import test_train

STEPS = 4  # Checkpoint every 2: the kill lands after the checkpoint at 2.


def test_killed_and_resumed_equals_uninterrupted(tmp_path):
  killed = tmp_path / "killed"
  # The same XLA client set-up as this process (8 simulated devices, a
  # 1-device mesh): float results are then bit-identical across processes.
  env = dict(os.environ)
  cmd = [
      sys.executable,
      "-m",
      "synthdistill_jax.main",
      f"--config={test_train.ROOT / 'configs' / 'demo.py'}:tiny",
      f"--workdir={killed}",
      f"--config.schedule.steps_per_epoch={STEPS}",
      "--config.mesh.num_devices=1",
  ]
  proc = subprocess.Popen(
      cmd,
      cwd=test_train.ROOT,
      env=env,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
  )
  first = killed / "checkpoints" / "2"
  deadline = time.time() + 600
  # orbax renames the finished checkpoint into place: once it is there, kill.
  while not (first.exists() and (killed / "student").exists()):
    assert proc.poll() is None, "finished before it could be killed"
    assert time.time() < deadline
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  overrides = {"schedule.steps_per_epoch": STEPS, "mesh.num_devices": 1}
  resumed = train.train_and_evaluate(
      test_train.tiny_config(**overrides), str(killed)
  )
  straight = train.train_and_evaluate(
      test_train.tiny_config(**overrides), str(tmp_path / "straight")
  )
  assert int(resumed.state.step) == int(straight.state.step) == STEPS
  for a, b in zip(
      test_train.final_params(resumed), test_train.final_params(straight)
  ):
    np.testing.assert_array_equal(a, b)
  assert resumed.validation[-1]["r2"] == straight.validation[-1]["r2"]
