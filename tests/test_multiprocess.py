"""Two processes on localhost (`jax.distributed`, gloo) train like one."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from synthdistill_jax import checkpoints
from synthdistill_jax import metrics_io
from synthdistill_jax import models
from synthdistill_jax import train
from synthdistill_jax.data import verification_bin
from tests import conftest
from tests import test_evaluate_cli
from tests import test_train

STEPS = 2


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.devices(2)  # The single-process reference runs on 2.
def test_two_processes_match_one_process(tmp_path):
  # A verification .bin evaluated after each of the two epochs.
  bin_path = tmp_path / "toy.bin"
  verification_bin.write_bin(bin_path, *test_evaluate_cli.make_faces(40))
  overrides = {
      "schedule.steps_per_epoch": STEPS,
      "schedule.epochs": 2,
      "evals.bins": [str(bin_path)],
      # Both processes ask after the save in flight at each log step.
      "checkpoint.use_async": True,
      "log_every_steps": 1,
  }
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS=conftest.xla_flags(1))
  env["JAX_PLATFORMS"] = "cpu"
  procs = [
      subprocess.Popen(
          [
              sys.executable,
              "-m",
              "synthdistill_jax.main",
              f"--config={test_train.ROOT / 'configs' / 'demo.py'}:tiny",
              f"--workdir={tmp_path / 'multi'}",
              *[f"--config.{k}={v}" for k, v in overrides.items()],
              f"--coordinator_address=127.0.0.1:{port}",
              "--num_processes=2",
              f"--process_id={i}",
              "--cpu_collectives=gloo",
          ],
          cwd=test_train.ROOT,
          env=env,
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
      )
      for i in range(2)
  ]
  outputs = [p.communicate(timeout=900)[0] for p in procs]
  # Both logs on failure: the process that failed first may be the other.
  logs = "\n".join(
      f"--- process {i} (exit {p.returncode}):\n"
      + "\n".join(l for l in out.splitlines() if "@ 0x" not in l)[-4000:]
      for i, (p, out) in enumerate(zip(procs, outputs))
  )
  assert all(p.returncode == 0 for p in procs), logs
  single = train.train_and_evaluate(
      test_train.tiny_config(**overrides, **{"mesh.num_devices": 2}),
      str(tmp_path / "single"),
  )
  multi_losses = [
      r["loss"] for r in metrics_io.read_metrics(tmp_path / "multi", "train")
  ]
  single_losses = [
      r["loss"] for r in metrics_io.read_metrics(tmp_path / "single", "train")
  ]
  np.testing.assert_allclose(multi_losses, single_losses, rtol=1e-5)
  multi_evals = metrics_io.read_metrics(tmp_path / "multi", "evals")
  single_evals = metrics_io.read_metrics(tmp_path / "single", "evals")
  assert [r["step"] for r in multi_evals] == [STEPS, 2 * STEPS]
  assert [r["step"] for r in single_evals] == [STEPS, 2 * STEPS]
  for got, want in zip(multi_evals, single_evals):
    assert got.keys() == want.keys()
    assert got["toy/accuracy"] == want["toy/accuracy"]
    np.testing.assert_allclose(got["toy/xnorm"], want["toy/xnorm"], 1e-4)
  _, variables = models.load(tmp_path / "multi" / "student")
  test_train.assert_params_close(
      jax.tree.leaves(variables["params"]), test_train.final_params(single)
  )
  # The checksums the two processes saved together (each summing its own
  # shards, then added across processes) are those of the arrays read back
  # here by one process: the checkpoint restores verified, without a line.
  manager = checkpoints.create_manager(
      tmp_path / "multi" / "checkpoints", keep=3, use_async=False
  )
  saved = manager.item_metadata(manager.latest_step()).tree
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), saved
  )
  messages = []
  restored = checkpoints.restore_latest(manager, target, messages.append)
  manager.close()
  assert messages == []
  assert int(restored["step"]) == 2 * STEPS
