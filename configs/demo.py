"""The demo: distil a random tiny teacher on a random tiny generator's faces.

Runs on a 2-core CPU in a few minutes, no download:

  python -m synthdistill_jax.main --config=configs/demo.py --workdir=/tmp/demo

Everything the paper run does happens here at toy size: faces generated on
the fly by a StyleGAN2 (32x32, random weights, built in code), the eye-template
crop, a frozen IResNet teacher (random, BN statistics calibrated on generated
faces), a narrow IResNet student with its own random init, two updates per
iteration with the feedback re-sampling, checkpoints, metrics and the
per-epoch held-out R^2 (printed), which rises from below 0 to above 0.5 (the
measured curve and time are in the README).
"""

from synthdistill_jax import defaults

EMBEDDING = 64  # Teacher and student embedding size.

# `configs/demo.py:tiny`: seconds-per-step shapes for tests and smoke runs.
TINY_GENERATOR = dict(
    z_dim=16,
    w_dim=16,
    img_resolution=32,
    mapping_layers=2,
    channel_base=128,
    channel_max=16,
    num_fp16_res=0,
)
TINY_FACE_NET = dict(
    layers=(1, 1, 1, 1), widths=(4, 8, 8, 8), embedding_size=16
)


def get_config(arg: str | None = None):
  """The demo config; `arg='tiny'` shrinks it to test size (3 iterations)."""
  config = _demo_config()
  if arg == "tiny":
    _shrink(config)
  elif arg:
    raise ValueError(f"configs/demo.py: unknown argument {arg!r}; known: tiny")
  return config


def _shrink(config):
  """Tiny networks, batch 8, 1 epoch of 3 iterations, checkpoint every 2."""
  config.name = "demo_tiny"
  config.generator.random = TINY_GENERATOR
  config.teacher.kwargs = TINY_FACE_NET
  config.teacher.calibrate_batches = 1
  config.student.arch = "iresnet18"
  config.student.kwargs = TINY_FACE_NET
  config.schedule.batch_size = 8
  config.schedule.epochs = 1
  config.schedule.steps_per_epoch = 3
  config.schedule.val_batches = 1
  config.checkpoint.every_steps = 2
  config.checkpoint.use_async = False
  config.log_every_steps = 1
  config.face_grid_size = 2
  config.progress_bar = False


def _demo_config():
  config = defaults.base_config()
  config.name = "demo"
  config.generator.random = dict(
      z_dim=32,  # Latent size (512 in FFHQ).
      w_dim=32,  # Intermediate latent size.
      img_resolution=32,  # The face crop is 28x28, resized up to 112.
      mapping_layers=2,  # Mapping depth (8 in FFHQ).
      channel_base=512,  # Channels min(512 / res, 32): 32 ... 16.
      channel_max=32,
      num_fp16_res=0,  # Everything in float32 on CPU.
  )
  config.teacher.arch = "iresnet18"
  config.teacher.kwargs = dict(
      layers=(1, 1, 1, 1), widths=(8, 16, 32, 64), embedding_size=EMBEDDING
  )
  config.teacher.calibrate_batches = 4
  # An IResNet student of the teacher's size but its own random init:
  # TinyFaR-C would compile for minutes and train 5x slower on 2 cores.
  config.student.arch = "iresnet18"
  config.student.kwargs = dict(
      layers=(1, 1, 1, 1), widths=(8, 16, 32, 64), embedding_size=EMBEDDING
  )
  config.optimizer.learning_rate = 3e-3
  config.optimizer.decay_every_epochs = 2
  config.schedule.batch_size = 16
  config.schedule.epochs = 3
  config.schedule.steps_per_epoch = 40
  config.schedule.val_batches = 4
  config.checkpoint.every_steps = 40
  config.log_every_steps = 10
  return config
