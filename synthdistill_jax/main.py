"""Command line: `python -m synthdistill_jax.main --config=... --workdir=...`.

  python -m synthdistill_jax.main --config=configs/demo.py --workdir=/tmp/demo

Multi-host: pass `--distributed` on TPU pods / SLURM / Kubernetes (JAX finds
the coordinator itself), or `--coordinator_address=HOST:PORT
--num_processes=N --process_id=I` elsewhere (e.g. several processes on one
machine). A bad flag, config file, field or setting prints one line to
stderr and exits 1, before anything is built; a workdir whose checkpoints
are all damaged exits 2 (they are moved aside, never deleted). SIGTERM and
a first Ctrl-C save a checkpoint and stop (exit 0); Ctrl-C before the loop,
or a second one, stops at once with one line (exit 130).
"""

import os
import re
import sys

from synthdistill_jax import hostmem

# Before the imports below (about 2 s, which a later restart would pay
# twice): large CPU buffers on huge pages (`hostmem`).
if __name__ == "__main__":
  hostmem.reexec_with_huge_pages()

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from synthdistill_jax import checkpoints
from synthdistill_jax import errors
from synthdistill_jax import train

# pylint: enable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config",
    None,
    "Experiment config file (configs/*.py[:preset]).",
    lock_config=True,
)
flags.DEFINE_string("workdir", None, "Output folder (resumed if it exists).")
flags.DEFINE_bool(
    "distributed",
    False,
    "Call jax.distributed.initialize() with no arguments (TPU pods, SLURM).",
)
flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0 (multi-process)."
)
flags.DEFINE_integer("num_processes", None, "Number of processes.")
flags.DEFINE_integer("process_id", None, "This process's index.")
flags.DEFINE_string(
    "cpu_collectives",
    None,
    "CPU cross-process collectives ('gloo') for multi-process CPU runs.",
)
flags.mark_flags_as_required(["config", "workdir"])


def initialize_distributed() -> None:
  """Starts `jax.distributed` as the flags say (no-op for one process)."""
  if FLAGS.cpu_collectives:
    jax.config.update(
        "jax_cpu_collectives_implementation", FLAGS.cpu_collectives
    )
  if FLAGS.coordinator_address:
    jax.distributed.initialize(
        coordinator_address=FLAGS.coordinator_address,
        num_processes=FLAGS.num_processes,
        process_id=FLAGS.process_id,
    )
  elif FLAGS.distributed:
    jax.distributed.initialize()


def _fail(message: str, status: int = 1) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(status)


def _one_line(error: BaseException) -> str:
  """An exception's message on one line (config files raise multi-line)."""
  text = str(error).replace("\\n", "\n")
  lines = [l.strip().strip("'\"\\") for l in text.splitlines() if l.strip()]
  if any(l.startswith("Traceback") for l in lines):
    # A config file raised: its own message is the last line.
    return re.sub(r"^\w+(Error|Exception): ", "", lines[-1])
  return "; ".join(lines) or type(error).__name__


def _unknown_field(error: BaseException, argv: list[str]) -> str | None:
  """`--config.a.b=...` naming no field: which flag, and the suggestion."""
  text = str(error).replace("\\n", "\n")
  match = re.search(r"(\w+)\W*Did you mean \W*(\w+)", text)
  names = re.search(r"'(\w+)'", text)
  field = match.group(1) if match else (names.group(1) if names else None)
  if not field:
    return None
  flag = next((a.split("=", 1)[0] for a in argv if f".{field}" in a), None)
  if flag is None:
    return None
  hint = f" (did you mean {match.group(2)}?)" if match else ""
  return f"{flag}: no such config field{hint}"


def parse_flags(argv: list[str]) -> list[str]:
  """absl parsing where a flag or config-file mistake is one line, exit 1.

  Args:
    argv: the command line.

  Returns:
    The arguments absl leaves over.
  """
  try:
    rest = FLAGS(argv)
  except flags.Error as e:
    _fail(_one_line(e))
  except Exception as e:  # pylint: disable=broad-except
    # `--config.a.b=...` naming no field, or a config file that raises.
    _fail(_unknown_field(e, argv) or f"--config: {_one_line(e)}")
  path = (FLAGS["config"].serialize().split("=", 1)[-1]).split(":", 1)[0]
  if path and not os.path.isfile(path):
    _fail(
        f"--config={path}: no such config file (e.g."
        " --config=configs/demo.py)"
    )
  try:
    FLAGS.config  # pylint: disable=pointless-statement
  except Exception as e:  # pylint: disable=broad-except
    _fail(f"--config: {_one_line(e)}")
  return rest


def main(argv) -> None:
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  # A second Ctrl-C must stop the run even when it lands in a finaliser.
  errors.install_unraisable_hook()
  if not FLAGS["verbosity"].present:
    # orbax logs every save at INFO; keep the console to the progress bar.
    logging.set_verbosity(logging.WARNING)
  initialize_distributed()
  logging.info(
      "process %d/%d, %d local / %d global devices (%s)",
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      jax.device_count(),
      jax.devices()[0].platform,
  )
  logging.info("host memory: %s", hostmem.describe())
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except checkpoints.CheckpointError as e:
    # Checkpoints exist but none can be restored: never a silent restart.
    _fail(str(e), status=2)
  except (errors.ConfigError, train.TrainingDiverged, train.WriteFailed) as e:
    _fail(str(e))
  except OSError as e:
    # Metrics, reports, the face grid: the workdir became unwritable.
    _fail(
        f"{e.filename or FLAGS.workdir}: {e.strerror or e}; checkpoints"
        " already written are kept: fix the cause and run the same command"
        " to resume"
    )
  except KeyboardInterrupt:
    # Ctrl-C before the loop, or a second one in it: nothing after the
    # last checkpoint is kept, the checkpoints themselves are.
    errors.ignore_further_ctrl_c()
    _fail(
        "interrupted (Ctrl-C) before a checkpoint of the last iterations;"
        " run the same command to resume from the latest one",
        status=130,
    )


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
