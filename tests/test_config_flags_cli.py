"""The `--config` flags every command shares: mistakes are one line."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.py"

# A command with the two config flags the benchmark has, which prints what
# it was given (and whether the config can still gain keys by mistake).
_PROBE = """
from absl import app
from absl import flags
from synthdistill_jax import config_flags_cli

config_flags_cli.define_config("config", "first")
config_flags_cli.define_config("compare", "second")


def main(argv):
  config = flags.FLAGS.config
  print("batch", config.schedule.batch_size)
  print("kwargs", dict(config.student.kwargs))
  try:
    config.schedule.new_key = 1
  except AttributeError:
    print("locked")


app.run(main, flags_parser=config_flags_cli.flags_parser("probe"))
"""


def _probe(tmp_path, *args: str) -> subprocess.CompletedProcess:
  script = tmp_path / "probe.py"
  script.write_text(_PROBE)
  return subprocess.run(
      [sys.executable, str(script), *args],
      cwd=tmp_path,
      env=dict(os.environ, PYTHONPATH=str(ROOT)),
      capture_output=True,
      text=True,
      timeout=120,
      check=False,
  )


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--config.schedule.batchsize=3"],
            "--config.schedule.batchsize: no such config field (did you mean"
            " batch_size?)",
        ),
        (
            ["--config.schedul.batch_size=3"],
            "--config.schedul.batch_size: no such config field (did you mean"
            " schedule?)",
        ),
        (
            ["--config.schedule.batch_size=3.5"],
            "flag --config.schedule.batch_size=3.5: invalid literal for int()"
            " with base 10: '3.5'",
        ),
        (
            [f"--compare={DEMO}", "--compare.sede=3"],
            "--compare.sede: no such config field (did you mean seed?)",
        ),
        (
            ["--compare=nope.py"],
            "--compare=nope.py: no such config file",
        ),
    ],
)
def test_mistakes_are_one_line_naming_the_flag(tmp_path, args, message):
  proc = _probe(tmp_path, f"--config={DEMO}", *args)
  assert proc.returncode == 1, proc.stderr
  (line,) = proc.stderr.strip().splitlines()
  assert line.startswith(f"probe: error: {message}"), proc.stderr


def test_a_config_file_that_raises_is_its_own_message(tmp_path):
  raising = tmp_path / "raising.py"
  raising.write_text(
      "def get_config():\n  raise ValueError(\"no preset named 'x'\")\n"
  )
  proc = _probe(tmp_path, f"--config={raising}")
  assert proc.returncode == 1
  assert proc.stderr.strip() == "probe: error: --config: no preset named 'x'"
  proc = _probe(tmp_path, "--config=absent.py", "--config.seed=1")
  assert proc.stderr.strip() == (
      "probe: error: --config=absent.py: no such config file (e.g."
      " --config=configs/demo.py)"
  )


def test_constructor_arguments_take_new_keys_and_the_config_is_locked(
    tmp_path,
):
  # The demo's student kwargs do not mention `remat`: a constructor
  # argument, not a typo (the paper config's kwargs are empty).
  proc = _probe(
      tmp_path,
      f"--config={DEMO}",
      "--config.student.kwargs.remat=True",
      "--config.schedule.batch_size=3",
  )
  assert proc.returncode == 0, proc.stderr
  assert "batch 3" in proc.stdout
  assert "'remat': True" in proc.stdout
  assert "locked" in proc.stdout


def test_the_trainer_and_the_benchmark_refuse_a_typo(tmp_path):
  for command, prefix in (
      (["synthdistill_jax.main", f"--workdir={tmp_path / 'w'}"], "error"),
      (["synthdistill_jax.benchmark"], "benchmark: error"),
  ):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            *command,
            f"--config={DEMO}",
            "--config.optimizer.learning_rat=1",
        ],
        cwd=tmp_path,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip() == (
        f"{prefix}: --config.optimizer.learning_rat: no such config field"
        " (did you mean learning_rate?)"
    )
  assert not (tmp_path / "w").exists()
  assert not (tmp_path / "benchmark.json").exists()
