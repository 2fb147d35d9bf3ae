"""How much bfloat16 frozen networks change the teacher's embeddings.

  python tools/compare_dtypes.py --config=configs/synthdistill.py:tinyfar_a \
      --batch_size=8 --batches=2

Builds the config twice with `experiment.create` (checkpoint folders that
do not exist become random networks of the paper's shapes; a random teacher's BN statistics are
calibrated on generated faces): once in float32, once with the generator
and teacher in bfloat16. For the same latents and pixel noise it embeds the
faces four ways and prints the cosine of each to the all-float32 embedding:
bfloat16 generator only, bfloat16 teacher only, both. For scale it also
prints the cosine between embeddings of different faces.
"""

import sys

from synthdistill_jax import hostmem

# Before the heavy imports below, as `synthdistill_jax.main` does: the
# generator and teacher run on CPU here too.
if __name__ == "__main__":
  hostmem.reexec_with_huge_pages()

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from synthdistill_jax import config_flags_cli
from synthdistill_jax import distill
from synthdistill_jax import errors
from synthdistill_jax import experiment
from synthdistill_jax import platforms

_CONFIG = config_flags_cli.define_config("config", "Experiment config file.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Faces per batch.")
_BATCHES = flags.DEFINE_integer("batches", 2, "Batches compared.")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "The low-precision dtype.")


def _build(config, dtype: str) -> experiment.Experiment:
  config = config.copy_and_resolve_references()
  config.generator.dtype = config.teacher.dtype = dtype
  config.schedule.batch_size = _BATCH_SIZE.value
  config.sampler.kind = "dynamic"
  if not config.teacher.calibrate_batches:
    config.teacher.calibrate_batches = 2
  # Missing checkpoints become random networks of the paper's shapes.
  experiment.use_random_weights(config, force=False)
  return experiment.create(config, devices=jax.devices()[:1])


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  a = a / np.linalg.norm(a, axis=1, keepdims=True)
  b = b / np.linalg.norm(b, axis=1, keepdims=True)
  return np.sum(a * b, axis=1)


@errors.exit_on_ctrl_c
def main(argv) -> None:
  del argv
  platforms.skip_absent_tpu()  # Before JAX starts its runtimes.
  if _CONFIG.value is None:
    sys.exit("compare_dtypes: error: --config is required")
  try:
    full = _build(_CONFIG.value, "float32")
    low = _build(_CONFIG.value, _DTYPE.value)
  except experiment.ConfigError as e:
    sys.exit(f"compare_dtypes: error: {e}")

  def faces_fn(spec):
    @jax.jit
    def render(gen_vars, key):
      w = distill.sample_latents(spec, gen_vars, jax.random.fold_in(key, 0))
      x = distill.render_faces(spec, gen_vars, w, jax.random.fold_in(key, 1))
      return x.astype(jnp.float32)

    return render

  def embed_fn(spec):
    return jax.jit(lambda v, x: distill.embed_teacher(spec, v, x))

  render32, render16 = faces_fn(full.spec), faces_fn(low.spec)
  embed32, embed16 = embed_fn(full.spec), embed_fn(low.spec)
  # The same calibrated teacher statistics in both (calibration itself ran
  # in each dtype): compare the networks, not two calibrations.
  t_vars = full.teacher_vars
  cos = {"generator": [], "teacher": [], "both": [], "other faces": []}
  for b in range(_BATCHES.value):
    key = jax.random.PRNGKey(1000 + b)
    x32 = render32(full.gen_vars, key)
    x16 = render16(full.gen_vars, key)
    ref = np.asarray(embed32(t_vars, x32), np.float64)
    cos["generator"].append(
        _cosine(np.asarray(embed32(t_vars, x16), np.float64), ref)
    )
    cos["teacher"].append(
        _cosine(np.asarray(embed16(t_vars, x32), np.float64), ref)
    )
    cos["both"].append(
        _cosine(np.asarray(embed16(t_vars, x16), np.float64), ref)
    )
    cos["other faces"].append(_cosine(ref, np.roll(ref, 1, axis=0)))
  print(
      f"cosine to the float32 embedding, {_DTYPE.value} in ..."
      f" ({_BATCHES.value} x {_BATCH_SIZE.value} faces, {full.weights})"
  )
  for name, values in cos.items():
    v = np.concatenate(values)
    print(f"  {name:<12} mean {v.mean():.6f}  min {v.min():.6f}")


if __name__ == "__main__":
  app.run(main, flags_parser=config_flags_cli.flags_parser("compare_dtypes"))
