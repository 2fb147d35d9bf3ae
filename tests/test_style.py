"""House style: every Python file is pyink-formatted (2 spaces, 80 columns)."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_pyink_formatted():
  pytest.importorskip("pyink")
  targets = [
      str(ROOT / d)
      for d in ("synthdistill_jax", "tools", "configs", "tests")
      if (ROOT / d).exists()
  ]
  result = subprocess.run(
      [sys.executable, "-m", "pyink", "--check", "--quiet", *targets],
      capture_output=True,
      text=True,
      check=False,
  )
  assert result.returncode == 0, (
      "not pyink-formatted; run `pyink synthdistill_jax tools configs tests`:\n"
      + result.stderr
  )


def test_every_module_has_a_docstring():
  import ast  # pylint: disable=g-import-not-at-top

  missing = []
  for d in ("synthdistill_jax", "tools", "configs", "tests"):
    for path in sorted((ROOT / d).rglob("*.py")):
      tree = ast.parse(path.read_text())
      if ast.get_docstring(tree) is None:
        missing.append(str(path.relative_to(ROOT)))
  assert not missing, f"modules without a docstring: {missing}"
