"""Face-model conversion: safe `.pth` reading, strict keys, the CLI tool."""

import importlib.util
import json
import os
import pathlib
import pickle
import subprocess
import sys

import jax
import numpy as np
import pytest

from synthdistill_jax import models
from synthdistill_jax import safe_pickle
from synthdistill_jax.convert import face
from synthdistill_jax.convert import stylegan2
from tests import golden
from tests import test_iresnet

torch = pytest.importorskip("torch")

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "convert_face_model.py"


def _load_tool():
  spec = importlib.util.spec_from_file_location("convert_face_model", TOOL)
  tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tool)
  return tool


def _save(path, state_dict, prefix="", wrap=None):
  tensors = {prefix + k: torch.from_numpy(v) for k, v in state_dict.items()}
  torch.save({wrap: tensors, "epoch": 3} if wrap else tensors, path)
  return str(path)


@pytest.fixture(scope="module")
def r18_pth(tmp_path_factory):
  path = tmp_path_factory.mktemp("r18") / "backbone.pth"
  return _save(path, golden.state_dict("iresnet18"))


def _assert_same_variables(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  assert jax.tree.all(jax.tree.map(np.array_equal, a, b))


def test_load_face_model_golden_parity(r18_pth):
  module, variables = face.load_face_model(r18_pth, "iresnet18")
  arrays = golden.load_arrays("iresnet18")
  out = test_iresnet.embed(module, variables, arrays["x_nhwc"])
  test_iresnet.assert_embedding_parity(out, arrays["emb"])


@pytest.mark.parametrize(
    "prefix,wrap", [("module.", None), ("", "state_dict"), ("module.", "model")]
)
def test_prefixes_and_wrappers(tmp_path, r18_pth, prefix, wrap):
  path = _save(tmp_path / "x.pth", golden.state_dict("iresnet18"), prefix, wrap)
  _, want = face.load_face_model(r18_pth, "iresnet18")
  _, got = face.load_face_model(path, "iresnet18")
  _assert_same_variables(got, want)


def test_tool_summary_output_and_models_load(tmp_path, r18_pth, capsys):
  out_dir = tmp_path / "r18"
  tool = _load_tool()
  argv = ["--arch", "iresnet18", "--input", r18_pth, "--output", str(out_dir)]
  assert tool.main(argv + ["--summary"]) == 0
  printed = capsys.readouterr().out
  assert "24,025,600  (matches the reference 24,025,600)" in printed
  assert "layer3" in printed and "trainable" in printed
  module, variables = models.load(out_dir)
  _, want = face.load_face_model(r18_pth, "iresnet18")
  _assert_same_variables(variables, want)
  assert module == models.create_model("iresnet18")
  config = json.loads((out_dir / "model.json").read_text())
  assert config["metadata"]["sha256"] == tool.sha256(r18_pth)
  assert config["metadata"]["source"] == os.path.abspath(r18_pth)
  # A second conversion into the same folder is refused, in one line.
  assert tool.main(argv) == 1
  assert "already holds a model" in capsys.readouterr().err


def test_tool_tinyfar_through_the_dispatch(tmp_path, capsys):
  pytest.importorskip("synthdistill_jax.convert.tinynet")
  path = _save(tmp_path / "student.pth", golden.state_dict("tinyfar_c"))
  tool = _load_tool()
  argv = ["--arch", "tinyfar_c", "--input", path, "--summary"]
  assert tool.main(argv + ["--output", str(tmp_path / "s")]) == 0
  assert "1,832,106  (matches" in capsys.readouterr().out
  module, variables = models.load(tmp_path / "s")
  arrays = golden.load_arrays("tinyfar_c")
  out = test_iresnet.embed(module, variables, arrays["x"].transpose(0, 2, 3, 1))
  test_iresnet.assert_embedding_parity(out, arrays["out"])


def _edited(tmp_path, edit):
  state_dict = golden.state_dict("iresnet18")
  edit(state_dict)
  return _save(tmp_path / "edited.pth", state_dict)


def _one_line_error(exc_info, *fragments):
  message = str(exc_info.value)
  assert "\n" not in message
  for fragment in fragments:
    assert fragment in message, message


def test_missing_key(tmp_path):
  path = _edited(tmp_path, lambda sd: sd.pop("layer2.1.conv2.weight"))
  with pytest.raises(ValueError) as e:
    face.load_face_model(path, "iresnet18")
  _one_line_error(e, path, "1 missing key(s): layer2.1.conv2.weight")


def test_unexpected_key(tmp_path):
  path = _edited(
      tmp_path, lambda sd: sd.update({"head.weight": np.ones(3, np.float32)})
  )
  with pytest.raises(ValueError) as e:
    face.load_face_model(path, "iresnet18")
  _one_line_error(e, path, "1 unexpected key(s): head.weight")


def test_misshapen_key(tmp_path):
  def edit(sd):
    sd["fc.weight"] = sd["fc.weight"][:100]

  path = _edited(tmp_path, edit)
  with pytest.raises(ValueError) as e:
    face.load_face_model(path, "iresnet18")
  _one_line_error(e, path, "misshapen", "fc.weight (100, 25088)")


def test_wrong_arch(r18_pth):
  with pytest.raises(ValueError) as e:
    face.load_face_model(r18_pth, "iresnet19")
  _one_line_error(e, r18_pth, "iresnet19")
  # The right name with the wrong depth is a key mismatch, not a crash.
  with pytest.raises(ValueError) as e:
    face.load_face_model(r18_pth, "iresnet34")
  _one_line_error(e, r18_pth, "missing key(s): layer1.2.bn1.weight")


def test_truncated_and_missing_files(tmp_path, r18_pth):
  data = pathlib.Path(r18_pth).read_bytes()
  path = tmp_path / "truncated.pth"
  path.write_bytes(data[: len(data) // 3])
  with pytest.raises(ValueError) as e:
    face.load_face_model(path, "iresnet18")
  _one_line_error(e, str(path), "truncated or corrupt")
  with pytest.raises(FileNotFoundError) as e:
    face.load_face_model(tmp_path / "nope.pth", "iresnet18")
  _one_line_error(e, "nope.pth")


class _Payload:
  """Unpickling this would create `marker` (if anything ran it)."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_unsupported_pickle_construct_is_refused(tmp_path):
  path = tmp_path / "proto4.pth"
  path.write_bytes(pickle.dumps({"a": _Payload(tmp_path / "m")}, protocol=4))
  with pytest.raises(safe_pickle.UnsafePickleError) as e:
    face.load_state_dict(path)
  _one_line_error(e, str(path), "refused")
  assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("legacy", [False, True])
def test_code_in_the_file_is_refused_and_not_run(tmp_path, legacy):
  marker = tmp_path / "marker"
  path = tmp_path / "evil.pth"
  if legacy:  # A plain pickle rather than torch's zip format.
    payload = {"conv1.weight": _Payload(marker)}
    path.write_bytes(pickle.dumps(payload, protocol=2))
  else:
    torch.save({"conv1.weight": _Payload(marker)}, path)
  with pytest.raises(safe_pickle.UnsafePickleError) as e:
    face.load_face_model(path, "iresnet18")
  _one_line_error(e, str(path), "refused global", "system")
  assert not marker.exists()


def test_check_keys_lists_at_most_five():
  expected = {f"k{i}": (2,) for i in range(9)}
  with pytest.raises(ValueError) as e:
    face.check_keys({}, expected, "src")
  _one_line_error(e, "src:", "9 missing key(s)", "k4, ... and 4 more")
  face.check_keys({"a": np.zeros(2)}, {"a": (2,), "b": ()}, "s", optional=["b"])


def test_tool_errors_are_one_line_on_stderr(tmp_path, r18_pth):
  result = subprocess.run(
      [sys.executable, str(TOOL), "--arch", "resnet18", "--input", r18_pth]
      + ["--output", str(tmp_path / "out")],
      capture_output=True,
      text=True,
      check=False,
  )
  assert result.returncode == 1
  lines = [l for l in result.stderr.splitlines() if "error" in l]
  assert lines == [lines[-1]] and "resnet18" in lines[-1], result.stderr
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "out").exists()


def test_nonfinite_weight_is_refused_unless_allowed(tmp_path, capsys):
  def edit(sd):
    sd["layer1.0.conv1.weight"][0, 0, 0, 0] = np.nan
    sd["fc.bias"][3] = np.inf

  path = _edited(tmp_path, edit)
  with pytest.raises(ValueError) as e:
    face.load_face_model(path, "iresnet18")
  _one_line_error(
      e, path, "tensor layer1.0.conv1.weight has 1 non-finite", "NaN/Inf"
  )
  tool = _load_tool()
  argv = ["--arch", "iresnet18", "--input", path, "--output"]
  assert tool.main(argv + [str(tmp_path / "refused")]) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "--allow_nonfinite" in err, err
  assert not (tmp_path / "refused").exists()
  # The explicit flag converts it, and model.json records the choice so
  # that models.load reads the NaN back rather than refusing it.
  out = tmp_path / "allowed"
  assert tool.main(argv + [str(out), "--allow_nonfinite"]) == 0
  config = json.loads((out / "model.json").read_text())
  assert config["metadata"]["allow_nonfinite"] is True
  _, variables = models.load(out)
  kernel = variables["params"]["layer1_0"]["conv1"]["kernel"]
  assert np.isnan(kernel[0, 0, 0, 0])
  assert np.isinf(variables["params"]["fc"]["bias"][3])
  with pytest.raises(ValueError, match="params/fc/bias has 1 non-finite"):
    models.load(out, allow_nonfinite=False)


@pytest.mark.parametrize("arch", ["iresnet18", "tinyfar_c"])
def test_integer_weight_is_refused_not_cast(tmp_path, arch):
  state_dict = golden.state_dict(arch)
  key = next(k for k in state_dict if k.endswith("bn1.running_var"))
  state_dict[key] = np.round(state_dict[key] * 10).astype(np.int64)
  # The integer BN counters are legitimate and skipped, not refused.
  for k in [k for k in state_dict if k.endswith("num_batches_tracked")][:2]:
    state_dict[k] = np.array(7, np.int64)
  path = _save(tmp_path / "int.pth", state_dict)
  with pytest.raises(ValueError) as e:
    face.load_face_model(path, arch)
  _one_line_error(e, path, f"tensor {key} has dtype int64", "rather than cast")


def test_a_folder_given_as_the_checkpoint_file_says_so(tmp_path):
  # A converted model folder or a workdir passed as --input.
  with pytest.raises(
      FileNotFoundError, match="is a folder; give the checkpoint"
  ):
    face.load_state_dict(tmp_path)
  with pytest.raises(FileNotFoundError, match="absent.pth: no such file"):
    face.load_state_dict(tmp_path / "absent.pth")
  with pytest.raises(
      stylegan2.ConversionError, match="is a folder; give the checkpoint"
  ):
    stylegan2.read_checkpoint(tmp_path)
