"""Evaluation during training: checked at start, built once, multi-process.

`training.create_training_evaluator` validates `config.evals` before a run
starts, compiles its embedder once for every epoch, runs for IJB-only
configs too, and gives the same numbers with two processes as with one.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from synthdistill_jax import errors
from synthdistill_jax.data import verification_bin
from synthdistill_jax.evaluation import benchmarks
from synthdistill_jax.evaluation import settings
from synthdistill_jax.evaluation import training
from tests import conftest
from tests import test_evaluate_cli as helpers
from tests import test_ijb

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _mesh(n):
  return jax.sharding.Mesh(np.asarray(jax.devices()[:n]), ("data",))


@pytest.fixture(scope="module")
def toy_bin(tmp_path_factory):
  path = tmp_path_factory.mktemp("bins") / "toy.bin"
  images, issame = helpers.make_faces(40, seed=2)
  verification_bin.write_bin(path, images, issame)
  return path


def _config(**fields):
  config = settings.default_evals_config()
  config.batch_size = 16
  for key, value in fields.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def test_check_evals_config_names_the_field(tmp_path, toy_bin):
  (tmp_path / "dir.bin").mkdir()
  (tmp_path / "meta").mkdir()
  (tmp_path / "file").write_text("x")
  cases = [
      ({"bins": [str(tmp_path / "typo.bin")]}, "evals.bins[0]=", "no such"),
      ({"bins": [str(tmp_path / "dir.bin")]}, "evals.bins[0]=", "not a file"),
      ({"bins": [str(toy_bin), str(toy_bin)]}, "evals.bins[1]=", "same"),
      ({"batch_size": 0}, "evals.batch_size=0", "at least 1"),
      ({"ijb.name": "ijbc"}, "evals.ijb.name='ijbc'", "meta_dir is empty"),
      (
          {"ijb.meta_dir": str(tmp_path / "nope"), "ijb.name": "ijbc"},
          "evals.ijb.meta_dir=",
          "no such folder",
      ),
      (
          {
              "ijb.meta_dir": str(tmp_path / "meta"),
              "ijb.name": "ijbc",
              "ijb.image_dir": str(tmp_path / "file"),
          },
          "evals.ijb.image_dir=",
          "not a folder",
      ),
      (
          {
              "ijb.meta_dir": str(tmp_path / "meta"),
              "ijb.image_dir": str(tmp_path / "meta"),
          },
          "evals.ijb.name",
          "empty",
      ),
  ]
  for fields, field, why in cases:
    with pytest.raises(errors.ConfigError) as e:
      training.check_evals_config(_config(**fields))
    message = str(e.value)
    assert field in message and why in message and "\n" not in message
  # Hand-written configs: bins as a comma-separated string, ijb ''.
  training.check_evals_config(
      ml_collections.ConfigDict(
          {"bins": f"{toy_bin},", "batch_size": 8, "ijb": ""}
      )
  )
  # A malformed bin is found when the evaluator is built, not after epoch 1.
  (tmp_path / "bad.bin").write_bytes(b"not a pickle")
  with pytest.raises(errors.ConfigError, match="bad.bin: not a readable"):
    training.create_training_evaluator(
        _config(bins=[str(tmp_path / "bad.bin")]), None, _mesh(1)
    )


def test_built_once_and_matches_the_cli_path(toy_bin):
  module, variables = helpers.create_tiny_model()
  config = _config(bins=[str(toy_bin)])
  evaluator = training.create_training_evaluator(config, module, _mesh(8))
  assert evaluator.enabled
  first = evaluator(variables)
  # Second epoch, other weights: no new compilation.
  _, other = helpers.create_tiny_model(seed=1)
  second = evaluator(other)
  assert evaluator.embedder.num_traces == 1
  assert first != second
  want = benchmarks.run_evaluators(config, module, variables)
  assert first.keys() == want.keys()
  for key, value in want.items():
    assert first[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_ijb_only_config_evaluates(tmp_path):
  meta_dir, image_dir = test_ijb._write_ijb(tmp_path)  # pylint: disable=protected-access
  config = _config(
      **{
          "ijb.meta_dir": str(meta_dir),
          "ijb.image_dir": str(image_dir),
          "ijb.name": "toy",
      }
  )
  module, variables = helpers.create_tiny_model()
  evaluator = training.create_training_evaluator(config, module, _mesh(2))
  assert evaluator.enabled
  metrics = evaluator(variables)
  want = benchmarks.run_evaluators(config, module, variables)
  assert "toy/tar_far_1e-4" in metrics
  for key, value in want.items():
    assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_nothing_configured_and_nonfinite(toy_bin):
  module, variables = helpers.create_tiny_model()
  evaluator = training.create_training_evaluator(_config(), module, _mesh(1))
  assert not evaluator.enabled and evaluator(variables) == {}
  evaluator = training.create_training_evaluator(
      _config(bins=[str(toy_bin)], batch_size=40), module, _mesh(1)
  )
  variables["params"]["bn1"]["scale"] = (
      variables["params"]["bn1"]["scale"] * 1e38
  )
  assert evaluator(variables) == {"toy/nonfinite": 1.0}


_WORKER = """
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                           process_id=int(sys.argv[2]))
import numpy as np
from synthdistill_jax.evaluation import benchmarks
from synthdistill_jax.evaluation import settings
from synthdistill_jax.evaluation import training
from tests import test_evaluate_cli as helpers
config = settings.default_evals_config()
config.bins, config.batch_size = [sys.argv[3]], 16
mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
module, variables = helpers.create_tiny_model()
evaluator = training.create_training_evaluator(config, module, mesh)
out = [evaluator(variables), evaluator(variables)]
out.append(evaluator.embedder.num_traces)
with open(sys.argv[4], "w") as f:
  json.dump(out, f)
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path, toy_bin):
  address = f"127.0.0.1:{_free_port()}"
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = conftest.xla_flags(1)
  outs = [tmp_path / f"p{i}.json" for i in range(2)]
  procs = [
      subprocess.Popen(
          [sys.executable, "-c", _WORKER, address, str(i), str(toy_bin)]
          + [str(outs[i])],
          cwd=ROOT,
          env=env,
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
      )
      for i in range(2)
  ]
  logs = [p.communicate(timeout=600)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  results = [json.loads(o.read_text()) for o in outs]
  assert results[0] == results[1]  # Every process gets the same numbers.
  first, second, traces = results[0]
  assert first == second and traces == 1
  module, variables = helpers.create_tiny_model()
  config = _config(bins=[str(toy_bin)])
  single = training.create_training_evaluator(config, module, _mesh(2))
  want = single(variables)
  assert first.keys() == want.keys()
  for key, value in want.items():
    assert first[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
