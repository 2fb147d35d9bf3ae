"""The base config: the paper's settings, every field commented.

Experiment files (`configs/demo.py`, `configs/synthdistill.py`) start from
`base_config()` and override only what differs; on the command line any
field can be changed: `--config.schedule.batch_size=64`. It lives in the
package so that config files import it without `sys.path` edits.
"""

import ml_collections

from synthdistill_jax.evaluation import settings

# How a config marks a path the user must give (`required`): a string, so
# that `--config.FIELD=DIR` overrides it as any other, but one that the
# checks recognise and answer with the flag to set instead of a missing path.
REQUIRED_PREFIX = "REQUIRED: "


# The constructor-argument dicts: the only places where `--config.X.key=v`
# may add a key the config file does not set (`config_flags_cli`).
OPEN_FIELDS = ("generator.random", "teacher.kwargs", "student.kwargs")


def required(field: str) -> str:
  """The placeholder of a folder `field` that has no default."""
  return f"{REQUIRED_PREFIX}--config.{field}=DIR"


def base_config() -> ml_collections.ConfigDict:
  """The paper's settings (SynthDistill, IJCB 2023), before the presets."""
  config = ml_collections.ConfigDict()
  config.name = "synthdistill"  # Run name, stored with the student.
  config.seed = 2021  # Root seed: latents, noise, student init.

  # Frozen StyleGAN2 generator: a converted folder, or random for the demo.
  config.generator = ml_collections.ConfigDict()
  config.generator.checkpoint = ""  # tools/convert_stylegan2.py output dir.
  config.generator.random = ml_collections.ConfigDict()  # Generator kwargs.
  config.generator.init_seed = 0  # Seed of the random generator.
  config.generator.truncation_psi = 1.0  # Truncation (1.0 = none, paper).
  config.generator.noise_mode = "random"  # Fresh pixel noise every call.
  config.generator.dtype = "float32"  # Compute dtype ('bfloat16' on TPU).
  # The six up-sampling convs: 'auto' = 'phases' on CPU (four convs on the
  # input grid; XLA:CPU runs the zero-inserted form slowly), 'dilated' on
  # TPU and GPU (the transposed conv as one conv, their native form).
  config.generator.upsample_method = "auto"

  # Frozen teacher: a converted folder, or an arch built in code.
  config.teacher = ml_collections.ConfigDict()
  config.teacher.checkpoint = ""  # tools/convert_face_model.py output dir.
  config.teacher.arch = "iresnet100"  # Used only without a checkpoint.
  config.teacher.kwargs = ml_collections.ConfigDict()  # Constructor kwargs.
  config.teacher.init_seed = 1  # Seed of a random teacher.
  config.teacher.calibrate_batches = 0  # Random teacher: BN stats batches.
  config.teacher.dtype = "float32"  # Compute dtype.

  # The student being trained.
  config.student = ml_collections.ConfigDict()
  config.student.arch = "tinyfar_a"  # tinyfar_a/b/c, mobilefacenet, iresnet*.
  config.student.kwargs = ml_collections.ConfigDict()  # Constructor kwargs.
  config.student.init_checkpoint = ""  # Converted (ImageNet) weights dir.
  config.student.dtype = "float32"  # Compute dtype; params stay float32.
  # Weight gradients of a TinyFaR student's 1x1 convs: 'auto' = 'blocked' on
  # CPU (matmuls over blocks of 512 pixels, summed; XLA:CPU's single matmul
  # copies the activations transposed, slowly), 'matmul' on TPU and GPU.
  config.student.pointwise_grad = "auto"

  # Where training faces come from (see docs/training.md).
  config.sampler = ml_collections.ConfigDict()
  config.sampler.kind = "resample"  # 'static' | 'dynamic' | 'resample'.
  config.sampler.resampling_coef = 1.0  # coef of w + coef*(cos+1)/2*eps.
  config.sampler.static_dataset = ""  # tools/make_static_dataset.py dir.

  config.loss = "mse"  # 'mse' (paper) | 'cosine' | 'mse+cosine'.

  # Adam with a step schedule, counted in optimiser updates.
  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 1e-3  # Initial learning rate.
  config.optimizer.b1 = 0.9  # Adam beta1.
  config.optimizer.b2 = 0.999  # Adam beta2.
  config.optimizer.eps = 1e-8  # Adam epsilon.
  config.optimizer.decay_every_epochs = 10  # StepLR step_size (epochs).
  config.optimizer.decay_factor = 0.5  # StepLR gamma.

  config.schedule = ml_collections.ConfigDict()
  config.schedule.batch_size = 128  # Global batch (all devices, all hosts).
  config.schedule.epochs = 21  # Epochs; validation after each.
  config.schedule.steps_per_epoch = 7812  # Iterations (2 updates each).
  config.schedule.val_batches = 78  # Held-out batches per validation.

  config.mesh = ml_collections.ConfigDict()
  config.mesh.num_devices = 0  # Devices on the 'data' axis; 0 = all.
  config.mesh.student_sharding = "replicated"  # Or 'sharded' (ZeRO-3).
  # 'auto': the iteration as separate executables on CPU (faster there, see
  # synthdistill_jax/programs.py), one program on TPU/GPU; or 'on' / 'off'.
  config.mesh.split_iteration = "auto"

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 1000  # Save every N iterations (and end).
  config.checkpoint.keep = 3  # Checkpoints kept.
  config.checkpoint.use_async = True  # Write in the background.

  config.log_every_steps = 100  # Metric fetch (and NaN check) interval.
  config.face_grid_size = 8  # Faces in WORKDIR/faces.png (0 = none).
  config.progress_bar = True  # tqdm bar with ETA and images/s.
  # JAX's persistent compilation cache: 'auto' = $JAX_COMPILATION_CACHE_DIR
  # if set, else WORKDIR/compile_cache (works for gs:// workdirs, so a
  # restarted or preempted run skips compiling); '' = off; or a directory.
  config.compilation_cache_dir = "auto"
  # Resuming with another student, batch, sampler, seed or schedule (more
  # epochs excepted) is refused; True accepts such a change on purpose.
  config.allow_config_change = False
  config.evals = settings.default_evals_config()  # Benchmarks after each epoch.
  return config
