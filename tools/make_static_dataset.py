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

import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from synthdistill_jax import distill
from synthdistill_jax import faces
from synthdistill_jax import frozen
from synthdistill_jax import sharding
from synthdistill_jax import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.")
flags.DEFINE_string("output", None, "TFDS data directory to write.")
flags.DEFINE_integer("num_examples", 4096, "How many faces to write.")
flags.DEFINE_integer("seed", 0, "Seed of the static set's latents.")


def generate_examples(config, num_examples: int, seed: int):
  """Yields `{w, face, teacher}` numpy batches of the config's networks.

  Args:
    config: an experiment config (generator, teacher, batch size).
    num_examples: total examples; the last batch may be smaller.
    seed: seed of the latents and pixel noise.

  Yields:
    Batches: w `[b, w_dim]` float32, face `[b, 112, 112, 3]` uint8, teacher
    `[b, emb]` float32.
  """
  generator = frozen.build_generator(config.generator)
  teacher = frozen.build_teacher(config.teacher)
  mesh = sharding.create_mesh(1)
  batch = config.schedule.batch_size
  spec = distill.DistillSpec(
      generator=generator.module,
      teacher=teacher.module,
      student=None,
      tx=None,
      schedule=None,
      batch_size=batch,
      truncation_psi=config.generator.truncation_psi,
      noise_mode=config.generator.noise_mode,
  )
  if not config.teacher.checkpoint and config.teacher.calibrate_batches:
    render = frozen.create_renderer(spec, mesh, batch)
    teacher = train.calibrate_random_teacher(
        config, render, teacher, generator.variables
    )

  @jax.jit
  def make_batch(gen_vars, teacher_vars, key):
    w = distill.sample_latents(spec, gen_vars, jax.random.fold_in(key, 0))
    x = distill.render_faces(spec, gen_vars, w, jax.random.fold_in(key, 1))
    face = faces.quantise_faces(x)
    t = distill.embed_teacher(
        spec, teacher_vars, face.astype(jnp.float32) / 255.0
    )
    return w, face, t

  root = jax.random.PRNGKey(seed)
  for i, start in enumerate(range(0, num_examples, batch)):
    w, face, t = jax.device_get(
        make_batch(
            generator.variables, teacher.variables, jax.random.fold_in(root, i)
        )
    )
    n = min(batch, num_examples - start)
    yield {"w": w[:n], "face": face[:n], "teacher": np.asarray(t[:n])}


def main(argv) -> None:
  del argv
  from synthdistill_jax.data import static_dataset  # pylint: disable=g-import-not-at-top

  config = FLAGS.config
  if not FLAGS.output:
    print("error: --output is required", file=sys.stderr)
    sys.exit(1)
  try:
    examples = generate_examples(config, FLAGS.num_examples, FLAGS.seed)
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
  except frozen.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"wrote {FLAGS.num_examples} examples to {path}")


def _chain(first, rest):
  yield first
  yield from rest


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
