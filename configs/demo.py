"""The demo: distil a random tiny teacher on a random tiny generator's faces.

Runs on a 2-core CPU in a few minutes, no download:

  python -m synthdistill_jax.main --config=configs/demo.py --workdir=/tmp/demo

Everything the paper run does happens here at toy size: faces generated on
the fly by a StyleGAN2 (64x64, random weights, built in code), the eye-template
crop, a frozen IResNet teacher (random, BN statistics calibrated on generated
faces), the TinyFaR-C student, two updates per iteration with the feedback
re-sampling, checkpoints, metrics and the per-epoch held-out R^2 (printed),
which rises from below 0 to above 0.5. Cost: about 3 minutes of which half is
compilation (2 cores, measured in docs/training.md).
"""

import pathlib
import sys

# Config files are loaded by path; make the `configs` package importable
# whatever the working directory.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import configs  # pylint: disable=g-import-not-at-top,wrong-import-position

EMBEDDING = 128  # Teacher and student embedding size.


def get_config(arg: str | None = None):
  """The demo config (`arg` unused)."""
  del arg
  config = configs.base_config()
  config.name = "demo"
  config.generator.random = dict(
      z_dim=64,  # Latent size (512 in FFHQ).
      w_dim=64,  # Intermediate latent size.
      img_resolution=64,  # The crop is 54x54, resized up to 112.
      mapping_layers=2,  # Mapping depth (8 in FFHQ).
      channel_base=1024,  # Channels min(1024 / res, 64): 64 ... 16.
      channel_max=64,
      num_fp16_res=0,  # Everything in float32 on CPU.
  )
  config.teacher.arch = "iresnet18"
  config.teacher.kwargs = dict(
      layers=(1, 1, 1, 1), widths=(8, 16, 32, 64), embedding_size=EMBEDDING
  )
  config.teacher.calibrate_batches = 8
  config.student.arch = "tinyfar_c"
  config.student.kwargs = dict(embedding_size=EMBEDDING)
  config.optimizer.learning_rate = 2e-3
  config.optimizer.decay_every_epochs = 2
  config.schedule.batch_size = 32
  config.schedule.epochs = 3
  config.schedule.steps_per_epoch = 60
  config.schedule.val_batches = 4
  config.checkpoint.every_steps = 60
  config.log_every_steps = 20
  return config
