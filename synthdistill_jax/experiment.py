"""One setup path: `create(config)` builds everything a run needs.

The trainer, the benchmark, the static-set writer and the ahead-of-time
compile all call `create`, so what is benchmarked or compiled for a TPU slice
is exactly what is trained: the same mesh, frozen networks and their
placement, `distill.DistillSpec`, student state, shardings and jitted
programs. Nothing here reads or writes the workdir (the trainer restores
checkpoints onto `Experiment.state` itself).

With `abstract=True` nothing is allocated or read: every network's variables,
the state and the frozen inputs are `jax.ShapeDtypeStruct`s with their
shardings, ready for `experiment.iterate.lower(*experiment.iterate_args())`
on devices that need not exist here (a TPU topology).
"""

import dataclasses
import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from synthdistill_jax import distill
from synthdistill_jax import errors
from synthdistill_jax import models
from synthdistill_jax import networks
from synthdistill_jax import programs
from synthdistill_jax import sharding
from synthdistill_jax import validation
from synthdistill_jax.models import registry

ConfigError = errors.ConfigError
# fold_in tag of the held-out latent set; training iterations never reach it.
VAL_TAG = 0xFFFFFFFF

# The paper's generator (stylegan2-ffhq-256x256.pkl) when a checkpoint is
# swapped for random weights and no `model.json` gives the shapes.
FFHQ_256 = dict(
    z_dim=512,
    w_dim=512,
    img_resolution=256,
    mapping_layers=8,
    channel_base=16384,
    channel_max=512,
    num_fp16_res=4,
    conv_clamp=256,
)


@dataclasses.dataclass
class Experiment:
  """Everything a run of one config needs, built by `create`.

  Attributes:
    config: the experiment config.
    mesh: the device mesh ('data' axis).
    generator: the frozen generator `networks.Network` (None: static sampler).
    teacher: the frozen teacher `networks.Network` (None: static sampler).
    student: the student `networks.Network` (its initial variables).
    spec: the `distill.DistillSpec`.
    tx: the student's optax transformation.
    schedule: its learning-rate schedule.
    state: the initial `distill.TrainState` (global arrays, or abstract).
    state_shardings: shardings of the state.
    gen_vars: generator variables replicated on the mesh (or abstract).
    teacher_vars: teacher variables replicated on the mesh (or abstract).
    render: `(gen_vars, key) -> (images, faces)` on the host (None when
      abstract or without a generator).
    iterate: jitted `distill.iteration` (state donated).
    evaluate: jitted `distill.evaluate_batch` (held-out statistics).
    weights: where the frozen weights come from, for reports.
    abstract: whether arrays are `ShapeDtypeStruct`s.
  """

  config: Any
  mesh: jax.sharding.Mesh
  generator: networks.Network | None
  teacher: networks.Network | None
  student: networks.Network
  spec: distill.DistillSpec
  tx: optax.GradientTransformation
  schedule: Callable[[jax.Array], jax.Array]
  state: Any
  state_shardings: Any
  gen_vars: Any
  teacher_vars: Any
  render: Callable[..., Any] | None
  iterate: Any
  evaluate: Any
  weights: str
  abstract: bool = False

  def iterate_args(self, static_batches: Any = None) -> tuple:
    """The arguments of `iterate` for the initial state."""
    return (self.state, self.gen_vars, self.teacher_vars, static_batches)


# ----------------------------------------------------------------------------
# Config checks: fail at start with one line.


def check_config(config, num_devices: int) -> None:
  """Raises `ConfigError` for settings that cannot run.

  Args:
    config: the experiment config.
    num_devices: devices on the mesh's 'data' axis.
  """
  validation.check_numbers(config)
  if config.sampler.kind not in distill.SAMPLERS:
    raise ConfigError(
        f"sampler.kind={config.sampler.kind!r}: known"
        f" {', '.join(distill.SAMPLERS)}"
    )
  if config.loss not in distill.LOSSES:
    raise ConfigError(
        f"loss={config.loss!r}: known {', '.join(distill.LOSSES)}"
    )
  if config.student.arch not in networks.face_archs():
    raise ConfigError(
        f"student.arch={config.student.arch!r}: unknown student; known:"
        f" {', '.join(networks.face_archs())}"
    )
  mode = config.mesh.student_sharding
  if mode not in sharding.STUDENT_SHARDINGS:
    raise ConfigError(
        f"mesh.student_sharding={mode!r}: known"
        f" {', '.join(sharding.STUDENT_SHARDINGS)}"
    )
  # Checks the field; which platform 'auto' means is decided in `create`.
  for field in networks.PLATFORM_SETTINGS:
    networks.pick_for_platform(config[field.split(".")[0]], field, "cpu")
  try:
    errors.check_choice(
        config.mesh.get("split_iteration", "auto"),
        programs.SPLIT_MODES,
        "mesh.split_iteration",
        programs.SPLIT_MODES_NOTE,
    )
  except ValueError as e:
    raise ConfigError(str(e)) from None
  batch = config.schedule.batch_size
  if batch <= 0 or batch % num_devices or batch % jax.process_count():
    raise ConfigError(
        f"schedule.batch_size={batch} is not divisible by the"
        f" {num_devices} devices of the mesh"
    )
  validation.check_paths(config)


# ----------------------------------------------------------------------------
# Random weights in place of checkpoints (benchmark, ahead-of-time compile).


def _checkpoint_kwargs(directory: str) -> dict:
  """Constructor kwargs of a model folder, {} when there is none."""
  if not os.path.isdir(directory):
    return {}
  kwargs = dict(registry.read_config(directory)["kwargs"])
  # The config's dtype decides, as it does for the checkpoint itself.
  kwargs.pop("dtype", None)
  kwargs.pop("fp16_dtype", None)
  return kwargs


def use_random_weights(config, force: bool) -> str:
  """Swaps missing (or, with `force`, all) checkpoints for random networks.

  Only the weights change: the shapes and settings come from the
  checkpoint's `model.json` when the folder exists, else from the paper's
  networks (FFHQ-256 generator, `teacher.arch`); compute dtypes stay the
  config's, applied by `networks.build_*` exactly as for a checkpoint.

  Args:
    config: the experiment config (changed in place).
    force: replace checkpoints that exist too.

  Returns:
    A label of where the frozen weights come from.
  """
  notes = []
  gen, teacher = config.generator, config.teacher
  if gen.checkpoint and (force or not os.path.isdir(gen.checkpoint)):
    kwargs = _checkpoint_kwargs(gen.checkpoint) or dict(FFHQ_256)
    kwargs.update(gen.random.to_dict())
    gen.random, gen.checkpoint = kwargs, ""
    notes.append(f"generator random {kwargs['img_resolution']}px")
  elif not gen.checkpoint:
    notes.append("generator random (config)")
  if teacher.checkpoint and (force or not os.path.isdir(teacher.checkpoint)):
    teacher.kwargs = dict(
        _checkpoint_kwargs(teacher.checkpoint), **teacher.kwargs.to_dict()
    )
    teacher.checkpoint = ""
    notes.append(f"teacher random {teacher.arch}")
  elif not teacher.checkpoint:
    notes.append(f"teacher random {teacher.arch} (config)")
  return ", ".join(notes) if notes else "checkpoints"


def check_static_set(config, emb_dim: int) -> None:
  """Raises `ConfigError` unless the static set can feed this student.

  Args:
    config: the experiment config (`sampler.static_dataset`).
    emb_dim: the student's embedding size.
  """
  from synthdistill_jax.data import static_dataset  # pylint: disable=g-import-not-at-top

  path = config.sampler.static_dataset
  try:
    static_dataset.StaticDataset(path).check_features(emb_dim)
  except Exception as e:  # pylint: disable=broad-except
    # Whatever TFDS raises on a folder of other files is the user's to fix.
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    reason = reason.removeprefix(f"{path}: ")
    if not isinstance(e, (OSError, ValueError)):
      reason = f"not a readable TFDS dataset ({type(e).__name__}: {reason})"
    raise ConfigError(f"sampler.static_dataset={path!r}: {reason}") from None


def describe_weights(config) -> str:
  """Where a config's frozen weights come from (no swap)."""
  notes = []
  for name in ("generator", "teacher"):
    directory = config[name].get("checkpoint")
    notes.append(f"{name} {directory}" if directory else f"{name} random")
  return ", ".join(notes)


# ----------------------------------------------------------------------------
# Student state and the optimiser.


def ravel_optimizer(config, platform: str) -> bool:
  """Whether Adam runs on one raveled vector (`optax.flatten`).

  Leaf by leaf, XLA:CPU compiles a few kernels per parameter leaf
  (TinyFaR-A: 252 leaves) for Adam's moments: raveled, one each. Only for a
  replicated student (raveling sharded leaves would gather them) and on CPU
  (on TPU and GPU raveling may cost relayout copies; not measured there).
  A checkpoint of either layout resumes under the other
  (`other_state_layouts`).
  """
  return platform == "cpu" and config.mesh.student_sharding == "replicated"


def _adam(config):
  """Adam with the paper's step decay, and the schedule."""
  opt = config.optimizer
  updates_per_epoch = (
      config.schedule.steps_per_epoch * distill.UPDATES_PER_ITERATION
  )
  schedule = optax.exponential_decay(
      init_value=opt.learning_rate,
      transition_steps=max(1, opt.decay_every_epochs * updates_per_epoch),
      decay_rate=opt.decay_factor,
      staircase=True,
  )
  return optax.adam(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps), schedule


def create_optimizer(config, ravel: bool = False):
  """Adam with the paper's step decay, counted in optimiser updates.

  Args:
    config: the experiment config.
    ravel: Adam on one raveled vector (`ravel_optimizer`): the same
      numbers, another layout of the optimiser state.

  Returns:
    `(tx, schedule)`.
  """
  tx, schedule = _adam(config)
  if ravel:
    tx = optax.flatten(tx)
  frozen_paths = set(models.registry.frozen_params(config.student.arch))
  if frozen_paths:
    # Parameters the reference never trains keep their initial value.
    def label(params):
      return jax.tree_util.tree_map_with_path(
          lambda path, _: (
              "frozen"
              if tuple(k.key for k in path) in frozen_paths
              else "trained"
          ),
          params,
      )

    tx = optax.multi_transform(
        {"trained": tx, "frozen": optax.set_to_zero()}, label
    )
  return tx, schedule


def flat_transformation(config, ravel: bool):
  """What `create_optimizer`'s `optax.flatten` wraps, for `train_step`.

  `distill.train_step` runs it on the raveled vector itself
  (`DistillSpec.flat_tx`) so that the update is added at run-time offsets;
  None where the optimiser is not raveled or also freezes parameters
  (`optax.multi_transform` around the raveled part: the step then uses the
  optimiser as a whole).
  """
  if not ravel or models.registry.frozen_params(config.student.arch):
    return None
  return _adam(config)[0]


def _with_shardings(tree, shardings):
  """`ShapeDtypeStruct`s of `tree` carrying `shardings` (a tree or one)."""
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, tree)
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree,
      shardings,
  )


def _state_shardings(config, mesh, shapes):
  """The state's shardings: the student's by the config, step/rng replicated."""
  shardings = sharding.student_shardings(
      mesh, shapes, config.mesh.student_sharding
  )
  rep = sharding.replicated(mesh)
  return shardings.replace(step=rep, rng=rep)


def create_state(mesh, config, student: networks.Network, tx, abstract=False):
  """The initial `TrainState`, created directly with its shardings.

  Args:
    mesh: the device mesh.
    config: the experiment config.
    student: the initialised student network (host or abstract variables).
    tx: the optax transformation.
    abstract: return `ShapeDtypeStruct`s instead of arrays.

  Returns:
    `(state, state_shardings)`.
  """

  def make_state(v):
    return distill.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=v["params"],
        batch_stats=v.get("batch_stats", {}),
        opt_state=tx.init(v["params"]),
        rng=jax.random.PRNGKey(config.seed),
    )

  shapes = jax.eval_shape(make_state, student.variables)
  shardings = _state_shardings(config, mesh, shapes)
  if abstract:
    return _with_shardings(shapes, shardings), shardings
  variables = sharding.put_replicated(mesh, student.variables)
  state = jax.jit(make_state, out_shardings=shardings)(variables)
  return state, shardings


def abstract_state(state, shardings):
  """`ShapeDtypeStruct`s with shardings: the restore target."""
  return _with_shardings(state, shardings)


def other_state_layouts(config, mesh, state) -> list:
  """Abstract states of the same numbers that a checkpoint may hold instead.

  The optimiser state raveled or per parameter (`ravel_optimizer`): written
  by an earlier version of this project, on another platform or under the
  other `mesh.student_sharding`. `checkpoints.restore_latest` restores such a
  checkpoint and converts it.

  Args:
    config: the experiment config.
    mesh: the device mesh.
    state: the config's state (arrays or `ShapeDtypeStruct`s).

  Returns:
    A list of `distill.TrainState`s of `ShapeDtypeStruct`s with shardings.
  """
  platform = mesh.devices.flat[0].platform
  tx, _ = create_optimizer(config, ravel=not ravel_optimizer(config, platform))
  other = state.replace(opt_state=jax.eval_shape(tx.init, state.params))
  other = jax.eval_shape(lambda s: s, other)
  return [_with_shardings(other, _state_shardings(config, mesh, other))]


# ----------------------------------------------------------------------------
# The spec, the frozen inputs and the compiled programs.


def create_spec(config, mesh, networks, tx=None, schedule=None, flat_tx=None):
  """The `distill.DistillSpec` of a config, sharded over `mesh`.

  Args:
    config: the experiment config.
    mesh: the device mesh (the batch is sharded on its 'data' axis).
    networks: `(generator, teacher, student)`; any may be None.
    tx: the student's optax transformation (None when nothing is trained).
    schedule: its learning-rate schedule.
    flat_tx: `flat_transformation` when `tx` is raveled.

  Returns:
    The spec.
  """
  generator, teacher, student = networks
  return distill.DistillSpec(
      generator=generator and generator.module,
      teacher=teacher and teacher.module,
      student=student and student.module,
      tx=tx,
      schedule=schedule,
      batch_size=config.schedule.batch_size,
      sampler=config.sampler.kind,
      loss=config.loss,
      resampling_coef=config.sampler.resampling_coef,
      truncation_psi=config.generator.truncation_psi,
      noise_mode=config.generator.noise_mode,
      batch_sharding=sharding.batch_sharding(mesh),
      concatenated_norms=config.mesh.student_sharding == "replicated",
      flat_tx=flat_tx,
  )


def place_frozen(config, mesh, spec, generator, teacher):
  """Replicates the frozen networks on the mesh (inputs, never state).

  A random teacher (no checkpoint) first gets BN statistics estimated on
  generated faces (`teacher.calibrate_batches`), as a trained one has.

  Args:
    config: the experiment config.
    mesh: the device mesh.
    spec: from `create_spec`.
    generator: the generator `networks.Network`.
    teacher: the teacher `networks.Network`.

  Returns:
    `(gen_vars, teacher_vars, render)`; `render(gen_vars, key)` gives host
    images and crops of one batch (`networks.create_renderer`).
  """
  gen_vars = sharding.put_replicated(mesh, generator.variables)
  render = networks.create_renderer(spec, mesh, config.schedule.batch_size)
  if not config.teacher.checkpoint and config.teacher.calibrate_batches:
    root = jax.random.fold_in(jax.random.PRNGKey(config.seed), VAL_TAG - 1)
    batches = (
        render(gen_vars, jax.random.fold_in(root, i))[1]
        for i in range(config.teacher.calibrate_batches)
    )
    teacher = networks.calibrate_teacher(teacher, batches)
  teacher_vars = sharding.put_replicated(mesh, teacher.variables)
  return gen_vars, teacher_vars, render


def compile_programs(spec, mesh, state_shardings, split: str = "auto"):
  """Jits the iteration (state donated) and the held-out evaluation.

  Args:
    spec: the `distill.DistillSpec`.
    mesh: the device mesh.
    state_shardings: shardings of the `TrainState`.
    split: `mesh.split_iteration` (`programs.use_split`).

  Returns:
    `(iterate, evaluate)`: the jitted iteration or a
    `programs.SplitIteration`, and the jitted evaluation.
  """
  rep = sharding.replicated(mesh)
  batch = sharding.batch_sharding(mesh)
  if programs.use_split(split, mesh, spec.sampler):
    iterate = programs.SplitIteration(spec, mesh, state_shardings)
  else:
    iterate = jax.jit(
        functools.partial(distill.iteration, spec),
        in_shardings=(state_shardings, rep, rep, batch),
        out_shardings=(state_shardings, rep),
        donate_argnums=0,
    )
  evaluate = jax.jit(
      functools.partial(distill.evaluate_batch, spec),
      in_shardings=(state_shardings, rep, rep, rep),
      out_shardings=rep,
  )
  return iterate, evaluate


def create_mesh(config, devices=None) -> jax.sharding.Mesh:
  """The config's mesh over `devices` (default: every device)."""
  try:
    return sharding.create_mesh(config.mesh.num_devices, devices)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def create(
    config,
    *,
    devices=None,
    random_weights: bool = False,
    abstract: bool = False,
) -> Experiment:
  """Builds everything a run of `config` needs.

  Args:
    config: the experiment config. With `random_weights` (or `abstract`),
      its checkpoint fields are rewritten in place by `use_random_weights`.
    devices: the devices of the mesh (default `jax.devices()`); e.g. the
      devices of a TPU topology description for ahead-of-time compilation.
    random_weights: random frozen networks of the checkpoints' shapes and
      settings (missing checkpoints are swapped in any case).
    abstract: allocate and read nothing (see the module docstring).

  Returns:
    The `Experiment`.
  """
  if random_weights or abstract:
    # Abstract: only missing checkpoints are swapped for the paper shapes;
    # present ones give their shapes from `model.json`.
    weights = use_random_weights(config, random_weights)
  else:
    weights = describe_weights(config)
  mesh = create_mesh(config, devices)
  check_config(config, mesh.size)
  platform = mesh.devices.flat[0].platform
  # On abstract networks first (seconds): the real builds compile the
  # initialisers and calibrate a random teacher, 50 s on 2 cores for the
  # demo before a mismatch would show.
  abstract_student = networks.build_student(
      config.student, config.seed, abstract=True, platform=platform
  )
  if config.sampler.kind != "static":
    networks.check_generator_settings(config.generator)
    networks.check_embedding_sizes(
        networks.build_teacher(config.teacher, abstract=True),
        abstract_student,
    )
  else:
    check_static_set(config, networks.embedding_size(abstract_student))
  student = networks.build_student(
      config.student, config.seed, abstract, platform=platform
  )
  generator = teacher = None
  if config.sampler.kind != "static":
    generator = networks.build_generator(
        config.generator, abstract, platform=platform
    )
    teacher = networks.build_teacher(config.teacher, abstract)
  ravel = ravel_optimizer(config, platform)
  tx, schedule = create_optimizer(config, ravel=ravel)
  spec = create_spec(
      config,
      mesh,
      (generator, teacher, student),
      tx,
      schedule,
      flat_transformation(config, ravel),
  )
  gen_vars = teacher_vars = render = None
  rep = sharding.replicated(mesh)
  if generator is not None and abstract:
    gen_vars = _with_shardings(generator.variables, rep)
    teacher_vars = _with_shardings(teacher.variables, rep)
  elif generator is not None:
    gen_vars, teacher_vars, render = place_frozen(
        config, mesh, spec, generator, teacher
    )
  state, state_shardings = create_state(mesh, config, student, tx, abstract)
  iterate, evaluate = compile_programs(
      spec, mesh, state_shardings, config.mesh.get("split_iteration", "auto")
  )
  return Experiment(
      config=config,
      mesh=mesh,
      generator=generator,
      teacher=teacher,
      student=student,
      spec=spec,
      tx=tx,
      schedule=schedule,
      state=state,
      state_shardings=state_shardings,
      gen_vars=gen_vars,
      teacher_vars=teacher_vars,
      render=render,
      iterate=iterate,
      evaluate=evaluate,
      weights=weights,
      abstract=abstract,
  )
