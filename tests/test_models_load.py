"""`models.load` checks every array against what `model.json` implies."""

import json
import shutil

import jax
import numpy as np
import pytest

from synthdistill_jax import models
from tests import test_evaluate_cli
from tests import test_reliability


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  directory = tmp_path_factory.mktemp("model") / "tiny"
  _, variables = test_evaluate_cli.save_tiny_model(directory)
  return directory, jax.tree.map(np.array, variables)


def _save_edited(tmp_path, variables, edit):
  variables = jax.tree.map(np.array, variables)
  edit(variables)
  directory = tmp_path / "edited"
  models.save(directory, "iresnet18", test_evaluate_cli.TINY_KWARGS, variables)
  return directory


def _one_line(exc_info, *fragments):
  message = str(exc_info.value)
  assert "\n" not in message
  for fragment in fragments:
    assert fragment in message, message


def test_intact_model_loads(saved):
  directory, variables = saved
  _, got = models.load(directory)
  assert jax.tree.structure(got) == jax.tree.structure(variables)
  assert jax.tree.all(jax.tree.map(np.array_equal, got, variables))


def test_kwargs_that_do_not_match_the_arrays(saved, tmp_path):
  directory, _ = saved
  copy = tmp_path / "copy"
  shutil.copytree(directory, copy)
  config = json.loads((copy / "model.json").read_text())
  config["kwargs"]["embedding_size"] = 16
  (copy / "model.json").write_text(json.dumps(config))
  with pytest.raises(ValueError) as e:
    models.load(copy)
  _one_line(e, str(copy), "has shape (32,), model.json implies (16,)")


def test_misshapen_missing_mistyped_and_nonfinite_arrays(saved, tmp_path):
  _, variables = saved

  def shrink(v):
    v["params"]["fc"]["kernel"] = v["params"]["fc"]["kernel"][:-1]

  def drop(v):
    del v["params"]["fc"]["bias"]

  def to_int(v):
    v["params"]["fc"]["bias"] = v["params"]["fc"]["bias"].astype(np.int64)

  def nan(v):
    v["batch_stats"]["bn1"]["var"][2] = np.nan

  cases = [
      (shrink, "array params/fc/kernel has shape"),
      (drop, "array params/fc/bias is missing (expected shape (32,))"),
      (to_int, "array params/fc/bias has dtype int64, expected float32"),
      (nan, "array batch_stats/bn1/var has 1 non-finite value(s)"),
  ]
  for i, (edit, message) in enumerate(cases):
    directory = _save_edited(tmp_path / str(i), variables, edit)
    with pytest.raises(ValueError) as e:
      models.load(directory)
    _one_line(e, str(directory), message)
  # NaN is read when the caller asks for it explicitly.
  _, got = models.load(directory, allow_nonfinite=True)
  assert np.isnan(got["batch_stats"]["bn1"]["var"][2])


def test_damaged_variables_are_one_line(saved, tmp_path):
  directory, _ = saved
  copy = tmp_path / "copy"
  shutil.copytree(directory, copy)
  for path in (copy / "variables").rglob("*"):
    if path.is_file() and path.name != "_CHECKPOINT_METADATA":
      path.write_bytes(b"garbage")
  with pytest.raises(ValueError) as e:
    models.load(copy)
  _one_line(e, "cannot read the variables")
  shutil.rmtree(copy / "variables")
  with pytest.raises(FileNotFoundError) as e:
    models.load(copy)
  _one_line(e, "no variables/ folder")


def test_changed_bytes_in_the_variables_are_refused(saved, tmp_path):
  directory, variables = saved
  copy = tmp_path / "copy"
  shutil.copytree(directory, copy)
  # The largest array file, changed in place (orbax itself reads it
  # without an error, as different numbers).
  test_reliability.flip_bytes_in_largest_array_file(copy / "variables")
  with pytest.raises(ValueError) as e:
    models.load(copy)
  _one_line(e, str(copy), "differs from its checksum in model.json")
  # The changed bytes read as NaN here: the array is named once, for its
  # cause.
  assert "more problem" not in str(e.value)
  # A folder written before checksums loads as before.
  old = tmp_path / "old"
  shutil.copytree(directory, old)
  config = json.loads((old / "model.json").read_text())
  del config["checksums"], config["checksum_algorithm"]
  (old / "model.json").write_text(json.dumps(config))
  _, got = models.load(old)
  assert jax.tree.all(jax.tree.map(np.array_equal, got, variables))


def test_checksums_that_are_not_a_map_are_one_line(saved, tmp_path):
  directory, _ = saved
  for i, value in enumerate(([1, 2], {"params/fc/bias": 3}, "abc")):
    copy = tmp_path / str(i)
    shutil.copytree(directory, copy)
    config = json.loads((copy / "model.json").read_text())
    config["checksums"] = value
    (copy / "model.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as e:
      models.load(copy)
    _one_line(e, "must map array names to checksum strings")
