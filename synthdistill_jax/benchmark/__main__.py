"""Command line of the throughput benchmark (see the package docstring).

python -m synthdistill_jax.benchmark --config=configs/demo.py
"""

import datetime
import json
import os
import sys

from synthdistill_jax import hostmem

# Before the heavy imports below, as `synthdistill_jax.main` does: the
# benchmark times what training runs.
if __name__ == "__main__":
  hostmem.reexec_with_huge_pages()

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
import jax

from synthdistill_jax import config_flags_cli
from synthdistill_jax import errors
from synthdistill_jax import experiment
from synthdistill_jax import platforms
from synthdistill_jax import progress
from synthdistill_jax import validation
from synthdistill_jax.benchmark import report
from synthdistill_jax.benchmark import stages
from synthdistill_jax.benchmark import timing

# pylint: enable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags_cli.define_config(
    "config", "Experiment config file (path[:arg])."
)
_COMPARE = config_flags_cli.define_config(
    "compare",
    "Second config to run side by side in the same process; overrides via"
    " --compare.x=y. The ratio second/first is printed.",
)
_OUTPUT = flags.DEFINE_string("output", "benchmark.json", "JSON output path.")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", None, "Overrides schedule.batch_size of every config."
)
_WARMUP = flags.DEFINE_integer(
    "warmup", 2, "Untimed calls per stage.", lower_bound=0
)
_ITERS = flags.DEFINE_integer(
    "iters", 5, "Timed calls per stage.", lower_bound=1
)
_RANDOM_WEIGHTS = flags.DEFINE_bool(
    "random_weights",
    False,
    "Random frozen networks of the configured shapes instead of checkpoints"
    " (also used, and labelled, when a checkpoint is missing).",
)
_PROFILE_DIR = flags.DEFINE_string(
    "profile_dir",
    None,
    "Also record a profiler trace of each stage's timed calls under"
    " DIR/<config>/<stage> (open with TensorBoard's profile plugin or XProf).",
)
_PEAK_SIZE = flags.DEFINE_integer(
    "peak_size",
    None,
    "Side of the square peak matmul (default by backend).",
    lower_bound=1,
)
_PROGRESS = progress.define_flag()


@errors.exit_on_ctrl_c
def main(argv: list[str]) -> None:
  """Runs the benchmark(s) named by the flags and writes the JSON."""
  platforms.skip_absent_tpu()  # Before JAX starts its runtimes.
  if len(argv) > 1:
    sys.exit(f"benchmark: error: unexpected arguments {argv[1:]}")
  if _CONFIG.value is None:
    sys.exit("benchmark: error: --config is required")
  # Checked before any network is built: a mismatched libtpu would end the
  # run in a segmentation fault at the first stage's profile.
  if _PROFILE_DIR.value and (conflict := timing.find_profiler_conflict()):
    sys.exit(f"benchmark: error: --profile_dir: {conflict}")
  try:
    validation.check_output_file(_OUTPUT.value, "--output")
  except experiment.ConfigError as e:
    sys.exit(f"benchmark: error: {e}")
  configs = [_CONFIG.value]
  if _COMPARE.value is not None:
    configs.append(_COMPARE.value)
  peak_size = _PEAK_SIZE.value or (
      4096 if jax.default_backend() == "cpu" else 8192
  )
  results = []
  try:
    for config in configs:
      if _BATCH_SIZE.value is not None:
        config.schedule.batch_size = _BATCH_SIZE.value
      results.append(
          stages.run_benchmark(
              config,
              _RANDOM_WEIGHTS.value,
              _WARMUP.value,
              _ITERS.value,
              peak_size,
              _PROFILE_DIR.value,
              _PROGRESS.value,
          )
      )
      print(report.format_table(results[-1]), flush=True)
  except (experiment.ConfigError, FileNotFoundError) as e:
    sys.exit(f"benchmark: error: {e}")
  record = {
      "date": datetime.datetime.now()
      .astimezone()
      .isoformat(timespec="seconds"),
      "command": " ".join(
          ["python -m synthdistill_jax.benchmark"] + sys.argv[1:]
      ),
      "machine": report.read_cpu_model(),
      "cpu_count": os.cpu_count(),
      "jax_version": jax.__version__,
      "runs": results,
  }
  if len(results) == 2:
    record["ratios"] = report.compare_results(*results)
    record["config_diff"] = report.diff_configs(*configs)
    print(report.format_ratios(record["ratios"], record["config_diff"]))
  output = experiment.registry.resolve_path(_OUTPUT.value)
  output.parent.mkdir(parents=True, exist_ok=True)
  output.write_text(json.dumps(record, indent=2) + "\n")
  print(f"wrote {output}")


if __name__ == "__main__":
  app.run(main, flags_parser=config_flags_cli.flags_parser("benchmark"))
