"""Command line: `python -m synthdistill_jax.main --config=... --workdir=...`.

  python -m synthdistill_jax.main --config=configs/demo.py --workdir=/tmp/demo

Multi-host: pass `--distributed` on TPU pods / SLURM / Kubernetes (JAX finds
the coordinator itself), or `--coordinator_address=HOST:PORT
--num_processes=N --process_id=I` elsewhere (e.g. several processes on one
machine). A bad config prints one line to stderr and exits 1.
"""

import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from synthdistill_jax import train

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


def main(argv) -> None:
  del argv
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
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (train.ConfigError, train.TrainingDiverged) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
