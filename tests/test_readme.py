"""The README's quick-start commands and CI stay in step."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _quick_start_commands() -> list[str]:
  text = (ROOT / "README.md").read_text()
  section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
  return re.findall(r"```(?:bash|sh)\n(.*?)\n```", section, flags=re.S)


def test_quick_start_has_two_commands():
  commands = _quick_start_commands()
  assert len(commands) == 2, commands
  assert "synthdistill_jax.main" in commands[0]
  assert "configs/demo.py" in commands[0]
  assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command_verbatim():
  test_command = _quick_start_commands()[1].strip()
  ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
  assert test_command in [line.strip() for line in ci_lines]
