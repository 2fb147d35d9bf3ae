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

from synthdistill_jax import checkpoints
from synthdistill_jax import config_flags_cli
from synthdistill_jax import errors
from synthdistill_jax import platforms
from synthdistill_jax import train

# pylint: enable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
config_flags_cli.define_config(
    "config", "Experiment config file (configs/*.py[:preset])."
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


def main(argv) -> None:
  platforms.skip_absent_tpu()  # Before JAX starts its runtimes.
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  missing = [f"--{n}" for n in ("config", "workdir") if FLAGS[n].value is None]
  if missing:
    verb = "is" if len(missing) == 1 else "are"
    _fail(
        f"{' and '.join(missing)} {verb} required, e.g."
        " --config=configs/demo.py --workdir=/tmp/demo"
    )
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
  app.run(main, flags_parser=config_flags_cli.flags_parser())
