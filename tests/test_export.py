"""Export: PyTorch twins of the face networks, state dicts and ONNX files.

The twins are checked against the official PyTorch outputs of the golden
cases (strict keys, same order); the round trip JAX model -> export ->
PyTorch / onnxruntime must reproduce the JAX embeddings within 1e-4.
"""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from tests import conftest
from tests import golden
from tests import test_evaluate_cli as helpers

torch = pytest.importorskip("torch")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _subprocess_env():
  # One CPU device: compiling for the 8 simulated devices of conftest costs
  # more than the work here (the sharded path is tested in-process).
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  env["XLA_FLAGS"] = conftest.xla_flags(1)
  env["OMP_NUM_THREADS"] = "1"  # Torch threads contend on a busy 2-core CI.
  return env


@pytest.fixture(autouse=True)
def fixture_one_torch_thread():
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "case", ["iresnet18", "mobilefacenet", "tinyfar_c", "tinyfar_a"]
)
def test_torch_twin_matches_official_outputs(case):
  from synthdistill_jax.export import torch_nets  # pylint: disable=g-import-not-at-top

  state_dict = golden.torch_state_dict(case)
  model = torch_nets.create(case)
  model.load_state_dict(state_dict, strict=True)
  assert list(model.state_dict()) == list(state_dict)
  arrays = golden.load_arrays(case)
  ref = arrays["emb"] if "emb" in arrays else arrays["out"]
  with torch.no_grad():
    out = model(torch.from_numpy(arrays["x"])).numpy()
  assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()


def _save_golden_student(directory, case="tinyfar_c"):
  """A model folder holding the golden weights, converted to Flax."""
  from synthdistill_jax import models  # pylint: disable=g-import-not-at-top
  from synthdistill_jax.convert import face  # pylint: disable=g-import-not-at-top

  _, variables = face.variables_from_state_dict(case, golden.state_dict(case))
  return models.save(directory, case, {}, variables)


def test_export_torch_state_dict_is_the_reference_layout(tmp_path):
  from synthdistill_jax.export import student  # pylint: disable=g-import-not-at-top
  from synthdistill_jax.export import torch_nets  # pylint: disable=g-import-not-at-top

  model_dir = _save_golden_student(tmp_path / "student")
  path = student.export_torch(model_dir, tmp_path / "out" / "student.pth")
  state_dict = torch.load(path, map_location="cpu", weights_only=True)
  want = golden.state_dict("tinyfar_c")
  assert list(state_dict) == list(want)
  for key, value in want.items():
    if not key.endswith("num_batches_tracked"):
      np.testing.assert_array_equal(state_dict[key].numpy(), value)
  model = torch_nets.create("tinyfar_c")
  model.load_state_dict(state_dict, strict=True)
  arrays = golden.load_arrays("tinyfar_c")
  with torch.no_grad():
    out = model(torch.from_numpy(arrays["x"])).numpy()
  ref = arrays["out"]
  assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()


def test_export_cli_onnx_round_trip_within_1e4(tmp_path):
  pytest.importorskip("onnxruntime")
  model_dir = _save_golden_student(tmp_path / "run" / "student")
  result = subprocess.run(
      [
          sys.executable,
          str(ROOT / "tools" / "export_student.py"),
          f"--checkpoint={tmp_path / 'run'}",  # A workdir: uses student/.
          "--format=onnx",
          "--tolerance=1e-4",  # The tool fails above this.
      ],
      capture_output=True,
      text=True,
      env=_subprocess_env(),
      timeout=600,
      check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  line = [l for l in result.stdout.splitlines() if "max |export - JAX|" in l]
  numbers = dict(
      item.strip().split(" ") for item in line[0].split(": ")[1].split(",")
  )
  assert float(numbers["torch"]) <= 1e-4 and float(numbers["onnx"]) <= 1e-4
  assert float(numbers["max_abs_ref"]) > 1.0
  assert os.path.getsize(model_dir / "student.onnx") > 1e6


def test_export_cli_never_installs_an_export_that_fails_its_check(tmp_path):
  model_dir = _save_golden_student(tmp_path / "run" / "student")
  output = tmp_path / "out" / "student.pth"
  output.parent.mkdir()
  output.write_bytes(b"the user's earlier export")

  def export(*flags):
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "export_student.py"),
            f"--checkpoint={model_dir}",
            "--format=torch",
            *flags,
        ],
        capture_output=True,
        text=True,
        env=_subprocess_env(),
        timeout=600,
        check=False,
    )

  # No float32 export equals JAX to 0: the check fails.
  result = export(f"--output={output}", "--tolerance=0")
  assert result.returncode == 1
  (line,) = result.stderr.strip().splitlines()
  assert line.startswith(f"export_student: error: {output}: outputs differ")
  assert line.endswith(
      f"nothing written there (the export is kept as {output}.rejected for"
      " inspection)"
  )
  # The file there before is untouched; no temporary is left.
  assert output.read_bytes() == b"the user's earlier export"
  assert sorted(p.name for p in output.parent.iterdir()) == [
      "student.pth",
      "student.pth.rejected",
  ]
  result = export(f"--output={output}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().splitlines()[-1] == f"wrote {output}"
  torch = pytest.importorskip("torch")
  state = torch.load(output, map_location="cpu", weights_only=True)
  assert len(state) > 10
  result = export(f"--output={output.parent}")
  assert result.returncode == 1
  assert result.stderr.strip() == (
      f"export_student: error: --output={output.parent}: is a folder; give a"
      f" file in it, e.g. --output={output}"
  )


def test_round_trip_matches_jax_within_1e4(tmp_path):
  pytest.importorskip("onnxruntime")
  from synthdistill_jax import models  # pylint: disable=g-import-not-at-top
  from synthdistill_jax.export import student  # pylint: disable=g-import-not-at-top

  _, variables = helpers.create_tiny_model(seed=3)
  model_dir = models.save(
      tmp_path / "tiny", "iresnet18", helpers.TINY_KWARGS, variables
  )
  onnx_path = student.export_onnx(model_dir, model_dir / "m.onnx")
  diffs = student.compare(model_dir, onnx_path, batch=3)
  assert diffs["torch"] <= 1e-4, diffs
  assert diffs["onnx"] <= 1e-4, diffs
  assert diffs["max_abs_ref"] > 0.1  # Not a vacuous comparison.


def test_errors_are_one_line(tmp_path):
  result = subprocess.run(
      [
          sys.executable,
          str(ROOT / "tools" / "export_student.py"),
          f"--checkpoint={tmp_path}",
          "--format=torch",
      ],
      capture_output=True,
      text=True,
      env=_subprocess_env(),
      check=False,
  )
  assert result.returncode == 1
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "neither a model folder" in lines[0]
