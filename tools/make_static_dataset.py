"""Writes the offline set of the `static` sampler (paper: "static" variant).

  python tools/make_static_dataset.py --config=configs/demo.py \
      --output=/tmp/static --num_examples=4096

Renders faces with the config's generator (z -> w -> synthesis -> crop),
quantises each 112x112 crop to uint8, embeds the quantised face with the
config's teacher (so the stored target is exactly the teacher's view of the
stored image) and writes `{w, face, teacher}` as a TFDS dataset
(`synthdistill_jax.data.static_dataset`). Train on it with
`--config.sampler.kind=static --config.sampler.static_dataset=DIR`.
"""

import pathlib
import sys

from synthdistill_jax import hostmem

# Before the heavy imports below, as `synthdistill_jax.main` does: the
# generator and teacher run on CPU here too.
if __name__ == "__main__":
  hostmem.reexec_with_huge_pages()

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags

from synthdistill_jax import checkpoints
from synthdistill_jax import config_flags_cli
from synthdistill_jax import errors
from synthdistill_jax import experiment
from synthdistill_jax import platforms
from synthdistill_jax import progress
from synthdistill_jax import validation

FLAGS = flags.FLAGS
config_flags_cli.define_config("config", "Experiment config file.")
flags.DEFINE_string("output", None, "TFDS data directory to write.")
flags.DEFINE_integer("num_examples", 4096, "How many faces to write.")
flags.DEFINE_integer("seed", 0, "Seed of the static set's latents.")
progress.define_flag()


@errors.exit_on_ctrl_c
def main(argv) -> None:
  del argv
  platforms.skip_absent_tpu()  # Before JAX starts its runtimes.
  if FLAGS.config is None:
    _fail("--config is required, e.g. --config=configs/demo.py:tiny")
  from synthdistill_jax.data import static_dataset  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  # TFDS's own bars would write fragments into a log; ours counts the faces.
  tfds.display_progress_bar(False)

  config = FLAGS.config
  if not FLAGS.output:
    _fail("--output is required")
  if FLAGS.num_examples < 1:
    _fail(f"--num_examples={FLAGS.num_examples}: must be at least 1")
  try:
    validation.check_workdir(FLAGS.output, "--output")
  except experiment.ConfigError as e:
    _fail(str(e))
  # TFDS would replace a set already there: hours of rendering, for a typo.
  # (A killed run's `incomplete.*` folder is no set: TFDS writes anew.)
  existing = [
      p.parent
      for p in pathlib.Path(FLAGS.output).glob(
          f"{static_dataset.NAME}/*/dataset_info.json"
      )
      if not p.parent.name.startswith("incomplete")
  ]
  if existing:
    _fail(
        f"--output={FLAGS.output}: already holds a static set"
        f" ({existing[0]}); choose another folder, or delete that one"
        " to write it again"
    )
  try:
    examples = progress.count_batches(
        static_dataset.render_examples(config, FLAGS.num_examples, FLAGS.seed),
        total=FLAGS.num_examples,
        desc="static set",
        unit="face",
        enabled=FLAGS.progress,
        size=lambda batch: len(batch["w"]),
        tick=True,  # The first batch waits for the compiles.
    )
    first = next(examples)
    stream = _chain(first, examples)
    path = static_dataset.write_static_dataset(
        FLAGS.output,
        stream,
        num_examples=FLAGS.num_examples,
        w_dim=first["w"].shape[1],
        emb_dim=first["teacher"].shape[1],
        metadata={"config": config.name, "seed": FLAGS.seed},
    )
  except experiment.ConfigError as e:
    _fail(str(e))
  except OSError as e:  # A disk that filled up, access lost while writing.
    _fail(
        f"--output={FLAGS.output}: writing the set failed"
        f" ({checkpoints.write_error_cause(e)}); free space or restore"
        " access, then run the same command again"
    )
  print(f"wrote {FLAGS.num_examples} examples to {path}")


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(1)


def _chain(first, rest):
  yield first
  yield from rest


if __name__ == "__main__":
  app.run(main, flags_parser=config_flags_cli.flags_parser())
