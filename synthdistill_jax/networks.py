"""The three networks of a config: frozen generator and teacher, the student.

The generator and the teacher are frozen: read from converted checkpoint
folders (`tools/convert_*.py`), or, for the demo and tests, built in code with
a random initialisation. A random teacher's BatchNorm running statistics are
then estimated on generated faces (`teacher.calibrate_batches`), so that its
eval-mode embeddings are well scaled, as a trained network's are.

Every mistake a user can make in these config fields raises `ConfigError`
with one line naming the field and the value.
"""

import collections.abc
import dataclasses
import functools
import os
import typing
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from synthdistill_jax import defaults
from synthdistill_jax import distill
from synthdistill_jax import errors
from synthdistill_jax import faces
from synthdistill_jax import models
from synthdistill_jax import sharding
from synthdistill_jax.models import layers
from synthdistill_jax.models import registry
from synthdistill_jax.ops import conv as conv_ops

GENERATOR_ARCH = "stylegan2"
FACE_SIZE = faces.FACE_SIZE
ConfigError = errors.ConfigError


@dataclasses.dataclass
class Network:
  """A Flax module with its variables and how to rebuild it.

  Attributes:
    module: the Flax module.
    variables: host numpy variables.
    arch: registry name.
    kwargs: constructor arguments (JSON-serialisable).
  """

  module: Any
  variables: Any
  arch: str
  kwargs: dict


def face_archs() -> list[str]:
  """Registry names usable as teacher or student."""
  return [a for a in registry.architectures() if a != GENERATOR_ARCH]


def _kwargs(cfg, field: str = "kwargs") -> dict:
  value = cfg.get(field) or {}
  return dict(value.to_dict() if hasattr(value, "to_dict") else value)


def _writer(expect_arch) -> str:
  """The tool that writes a model folder of this kind, for messages."""
  return {
      GENERATOR_ARCH: "tools/convert_stylegan2.py",
      "face": "tools/convert_face_model.py",
  }.get(expect_arch, "tools/convert_*.py")


def is_unset(directory) -> bool:
  """Whether a folder field still holds its config's `defaults.required`."""
  return str(directory).startswith(defaults.REQUIRED_PREFIX)


def unset_error(fields) -> ConfigError:
  """One line naming every unset folder field and the flag that sets it.

  Args:
    fields: `(field, expect_arch)` pairs, as `check_model_folder` takes.

  Returns:
    The error to raise.
  """
  names = " and ".join(field for field, _ in fields)
  flags = ", ".join(
      f"--config.{field}=DIR (written by {_writer(kind)})"
      for field, kind in fields
  )
  verb = "is" if len(fields) == 1 else "are"
  return ConfigError(
      f"{names} {verb} not set: give {flags}; README: Converting real"
      " checkpoints"
  )


def check_model_folder(directory: str, field: str, expect_arch=None) -> dict:
  """Checks a model folder and returns its `model.json`.

  Args:
    directory: the folder.
    field: config field name, for the error message.
    expect_arch: 'stylegan2', 'face' or None (any).

  Returns:
    The parsed `model.json`.
  """
  if is_unset(directory):
    raise unset_error([(field, expect_arch)])
  if not os.path.isdir(directory):
    raise ConfigError(
        f"{field}={directory!r}: no such checkpoint folder (write one with"
        f" {_writer(expect_arch)})"
    )
  try:
    config = registry.read_config(directory)
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(f"{field}={directory!r}: {e}") from None
  if expect_arch == GENERATOR_ARCH and config["arch"] != GENERATOR_ARCH:
    raise ConfigError(
        f"{field}={directory!r}: holds a {config['arch']!r} model, not a"
        " StyleGAN2 generator"
    )
  if expect_arch == "face" and config["arch"] == GENERATOR_ARCH:
    raise ConfigError(
        f"{field}={directory!r}: holds a StyleGAN2 generator, not a face"
        " network"
    )
  return config


def _load(
    directory: str, field: str, expect_arch, overrides, abstract: bool
) -> Network:
  config = check_model_folder(directory, field, expect_arch)
  kwargs = dict(config["kwargs"], **overrides)
  if abstract:
    # Shapes from `model.json` alone: the weights are never read.
    module = models.create_model(config["arch"], **kwargs)
    return Network(module, _abstract_init(module), config["arch"], kwargs)
  module, variables = models.load(directory, **overrides)
  return Network(module, variables, config["arch"], kwargs)


def _abstract_init(module) -> Any:
  """`ShapeDtypeStruct`s of a module's variables (nothing allocated)."""
  key = jax.random.key(0)
  if module.__class__.__name__ == "Generator":
    from synthdistill_jax.models import stylegan2  # pylint: disable=g-import-not-at-top

    return jax.eval_shape(lambda k: stylegan2.init_variables(module, k), key)
  x = jnp.zeros((2, FACE_SIZE, FACE_SIZE, 3), jnp.float32)
  return jax.eval_shape(lambda k: module.init(k, x, train=False), key)


def _dtype_overrides(cfg, generator: bool = False) -> dict:
  """Constructor overrides of a network's configured compute dtype."""
  if not cfg.get("dtype"):
    return {}
  if generator:
    # One setting for every synthesis block: the top `num_fp16_res` ones
    # (float16 on GPUs in NVIDIA's code) follow it too, whatever a
    # converted `model.json` or the random kwargs say.
    return {"dtype": cfg.dtype, "fp16_dtype": cfg.dtype}
  return {"dtype": cfg.dtype}


# Settings whose 'auto' depends on where the program runs: field ->
# (choices, the pick on CPU, the pick on TPU and GPU). Both CPU picks were
# measured on XLA:CPU only (docs/performance.md): the phase convs make the
# paper generator 1.4x faster, blocked weight gradients the TinyFaR-A step
# 11 %; accelerators keep their native transposed conv and autodiff's
# single matmul.
PLATFORM_SETTINGS = {
    "generator.upsample_method": (
        conv_ops.UPSAMPLE_METHODS,
        "phases",
        "dilated",
    ),
    "student.pointwise_grad": (layers.POINTWISE_GRADS, "blocked", "matmul"),
}


def pick_for_platform(cfg, field: str, platform: str) -> str:
  """A `PLATFORM_SETTINGS` field of a config section, 'auto' resolved.

  Args:
    cfg: the section (`config.generator`, `config.student`).
    field: the dotted field, e.g. 'generator.upsample_method'.
    platform: the mesh's platform ('cpu', 'gpu', 'tpu').

  Returns:
    One of the field's choices.

  Raises:
    ConfigError: one line naming the field and the known values.
  """
  choices, on_cpu, elsewhere = PLATFORM_SETTINGS[field]
  value = cfg.get(field.rsplit(".", 1)[1], "auto")
  if value == "auto":
    return on_cpu if platform == "cpu" else elsewhere
  try:
    return errors.check_choice(value, choices, field)
  except ValueError:
    raise ConfigError(
        f"{field}={value!r}: known auto, {', '.join(choices)}"
    ) from None


def build_generator(
    cfg, abstract: bool = False, platform: str | None = None
) -> Network:
  """The frozen generator of `config.generator`.

  Args:
    cfg: `config.generator` (`checkpoint`, or `random` kwargs + `init_seed`;
      `dtype`, the compute dtype of every synthesis block;
      `upsample_method`).
    abstract: variables as `jax.ShapeDtypeStruct`s (nothing is read or
      allocated), for ahead-of-time compilation.
    platform: where the generator will run, for `upsample_method='auto'`
      (default: the platform of `jax.devices()`).

  Returns:
    The generator `Network`.
  """
  overrides = _dtype_overrides(cfg, generator=True)
  overrides["upsample_method"] = pick_for_platform(
      cfg,
      "generator.upsample_method",
      platform or jax.devices()[0].platform,
  )
  if cfg.get("checkpoint"):
    net = _load(
        cfg.checkpoint,
        "generator.checkpoint",
        GENERATOR_ARCH,
        overrides,
        abstract,
    )
  else:
    from synthdistill_jax.models import stylegan2  # pylint: disable=g-import-not-at-top

    module, kwargs = _random_generator(cfg, overrides)
    if abstract:
      variables = _abstract_init(module)
    else:
      variables = jax.device_get(
          stylegan2.init_variables(
              module, jax.random.key(cfg.get("init_seed", 0))
          )
      )
    net = Network(module, variables, GENERATOR_ARCH, kwargs)
  _check_generator(net.module)
  return net


def check_generator_settings(cfg) -> None:
  """A random generator's settings, without building its weights (cheap).

  Called before the student's and the generator's initialisers compile, so
  that a mistyped `generator.random` setting is one line at once.

  Args:
    cfg: `config.generator`.

  Raises:
    ConfigError: naming the setting.
  """
  if not cfg.get("checkpoint"):
    _random_generator(cfg, _dtype_overrides(cfg, generator=True))


def _random_generator(cfg, overrides: dict):
  """The module of `generator.random` (checked) and its kwargs."""
  kwargs = dict(_kwargs(cfg, "random"), **overrides)
  try:
    module = models.create_model(GENERATOR_ARCH, **kwargs)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"generator.random={kwargs}: {e}") from None
  check_kwarg_types(module, kwargs, "generator.random")
  _check_generator(module)
  return module, kwargs


def _check_generator(module) -> None:
  """An unconditional generator whose images the face crop can use."""
  if module.c_dim:
    raise ConfigError(
        f"generator: c_dim={module.c_dim}; only unconditional generators"
        " are supported"
    )
  faces.compute_crop_box(module.img_resolution)


_KIND_NAMES = {
    bool: "True or False",
    int: "an integer",
    float: "a number",
    str: "a string",
}


def _is_a(value: Any, kind: type) -> bool:
  """isinstance, with bool apart from the numbers and numpy scalars in."""
  if kind is bool:
    return isinstance(value, (bool, np.bool_))
  if isinstance(value, (bool, np.bool_)):
    return False
  if kind is int:
    return isinstance(value, (int, np.integer))
  if kind is float:
    return isinstance(value, (int, float, np.integer, np.floating))
  return isinstance(value, kind)


def check_kwarg_types(module, kwargs: dict, field: str) -> None:
  """Each of `kwargs` has the type that `module`'s attribute declares.

  The kwargs dicts take new keys on the command line, where a value's type
  is how it was typed: `--config.student.kwargs.remat=yes` arrives as the
  string 'yes', which Python reads as true, and a run went ahead with a
  setting nobody chose. Plain `bool`, `int`, `float` and `str` attributes
  (also `| None`) and sequences of ints are checked; other annotations are
  left to the module.

  Args:
    module: the built module (a dataclass with annotations).
    kwargs: the settings it was built with.
    field: the config field of `kwargs`, for the message.

  Raises:
    ConfigError: `field.name=value: must be ...`.
  """
  hints = typing.get_type_hints(type(module))
  for name, value in kwargs.items():
    want = hints.get(name)
    args = typing.get_args(want)
    if type(None) in args:
      if value is None:
        continue
      rest = [a for a in args if a is not type(None)]
      want = rest[0] if len(rest) == 1 else None
    if want in _KIND_NAMES:
      ok, expected = _is_a(value, want), _KIND_NAMES[want]
    elif typing.get_origin(want) is collections.abc.Sequence and (
        typing.get_args(want) == (int,)
    ):
      ok = isinstance(value, (list, tuple)) and all(
          _is_a(v, int) for v in value
      )
      expected = "a list of integers, e.g. (1, 2, 3)"
    else:
      continue
    if not ok:
      raise ConfigError(f"{field}.{name}={value!r}: must be {expected}")


def _init_face_network(
    arch: str,
    kwargs: dict,
    seed: int,
    field: str,
    abstract: bool = False,
    adjust=None,
):
  """Builds and initialises a face network; `adjust(module)` runs first.

  `adjust` returns the module to initialise (e.g. a clone with training
  settings that are not constructor kwargs) and may raise `ConfigError`
  before anything is compiled.
  """
  if arch not in face_archs():
    raise ConfigError(
        f"{field}.arch={arch!r}: unknown face network; known:"
        f" {', '.join(face_archs())}"
    )
  try:
    module = models.create_model(arch, **kwargs)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{field}.kwargs={kwargs}: {e}") from None
  check_kwarg_types(module, kwargs, f"{field}.kwargs")
  if getattr(module, "dropout", 0.0) > 0:
    # Neither the student's update nor a random teacher's calibration (both
    # in train mode) gives the network 'dropout' randomness.
    raise ConfigError(
        f"{field}.kwargs.dropout={module.dropout}: the trainer does not use"
        " dropout (SynthDistill's networks have none); remove it or set 0"
    )
  if adjust is not None:
    module = adjust(module)
  if abstract:
    return Network(module, _abstract_init(module), arch, kwargs)
  x = jnp.zeros((2, FACE_SIZE, FACE_SIZE, 3), jnp.float32)
  key = jax.random.key(seed)
  init = jax.jit(lambda k: module.init(k, x, train=False)).lower(key)
  variables = init.compile(compiler_options=one_off_options())(key)
  return Network(module, jax.device_get(variables), arch, kwargs)


# XLA:CPU options for programs that run once, such as initialisers: LLVM
# without optimisation passes. A student's initialiser is one random-number
# kernel per parameter; TinyFaR-A's compiled in 31 s on a 2-core host and
# runs in 0.13 s; unoptimised it compiles in 16 s and runs in 0.9 s.
ONE_OFF_CPU_OPTIONS = {"xla_backend_optimization_level": 0}


def one_off_options() -> dict | None:
  """Compiler options for a program run once on the default device."""
  return ONE_OFF_CPU_OPTIONS if jax.default_backend() == "cpu" else None


def build_teacher(cfg, abstract: bool = False) -> Network:
  """The frozen teacher of `config.teacher` (calibrated later if random).

  Args:
    cfg: `config.teacher` (`checkpoint`, or `arch` + `kwargs` + `init_seed`;
      `dtype`).
    abstract: variables as `jax.ShapeDtypeStruct`s (see `build_generator`).

  Returns:
    The teacher `Network`.
  """
  overrides = _dtype_overrides(cfg)
  if cfg.get("checkpoint"):
    return _load(
        cfg.checkpoint, "teacher.checkpoint", "face", overrides, abstract
    )
  kwargs = dict(_kwargs(cfg), **overrides)
  return _init_face_network(
      cfg.arch, kwargs, cfg.get("init_seed", 1), "teacher", abstract
  )


def build_student(
    cfg, seed: int, abstract: bool = False, platform: str | None = None
) -> Network:
  """The student of `config.student`, randomly initialised or pre-trained.

  With `init_checkpoint` (e.g. a converted timm ImageNet TinyNet), every
  variable whose path and shape match is taken from it; the others (such as
  the new embedding head) keep their random initialisation.

  Args:
    cfg: `config.student` (`arch`, `kwargs`, `dtype`, `init_checkpoint`).
    seed: initialisation seed.
    abstract: variables as `jax.ShapeDtypeStruct`s (see `build_generator`).
    platform: where the student will train, for `pointwise_grad='auto'`
      (default: the platform of `jax.devices()`).

  Returns:
    The student `Network`; `pointwise_grad` is set on the module only (how
    gradients are computed is not part of the exported model).
  """
  kwargs = dict(_kwargs(cfg), **_dtype_overrides(cfg))
  grad = pick_for_platform(
      cfg, "student.pointwise_grad", platform or jax.devices()[0].platform
  )

  def set_pointwise_grad(module):
    if hasattr(module, "pointwise_grad"):
      return module.clone(pointwise_grad=grad)
    if cfg.get("pointwise_grad", "auto") != "auto":
      raise ConfigError(
          f"student.pointwise_grad={cfg.pointwise_grad!r}: {cfg.arch} has no"
          " such setting (TinyFaR students do); leave it 'auto'"
      )
    return module

  net = _init_face_network(
      cfg.arch, kwargs, seed, "student", abstract, set_pointwise_grad
  )
  if cfg.get("init_checkpoint") and not abstract:
    check_model_folder(cfg.init_checkpoint, "student.init_checkpoint", "face")
    _, pretrained = models.load(cfg.init_checkpoint)
    net.variables = merge_matching(net.variables, pretrained)
  return net


def merge_matching(target: Any, source: Any) -> Any:
  """`target` with every leaf that `source` has at the same path and shape.

  Args:
    target: nested dict of arrays.
    source: nested dict of arrays.

  Returns:
    A new nested dict.
  """
  if not isinstance(target, dict):
    ok = source is not None and np.shape(source) == np.shape(target)
    return np.asarray(source, np.asarray(target).dtype) if ok else target
  source = source if isinstance(source, dict) else {}
  return {k: merge_matching(v, source.get(k)) for k, v in target.items()}


def calibrate_teacher(teacher: Network, faces_batches) -> Network:
  """Sets a random teacher's BN running stats from generated faces.

  Runs the teacher in train mode on each batch, reads the batch statistics
  back from the momentum-0.1 running-stat update and averages them over the
  batches, so that eval mode sees normalised activations.

  Args:
    teacher: the teacher network (random init).
    faces_batches: iterable of `[B, 112, 112, 3]` faces in [0, 1].

  Returns:
    The teacher with new `batch_stats`.
  """

  @jax.jit
  def batch_stats(variables, x):
    _, upd = teacher.module.apply(
        variables,
        faces.normalise_for_teacher(x),
        train=True,
        mutable=["batch_stats"],
    )
    return upd["batch_stats"]

  variables = teacher.variables
  total, n = None, 0
  for x in faces_batches:
    # The layer blends old and batch stats with momentum 0.1: undo it to
    # read the batch statistics themselves.
    new = batch_stats(variables, x)
    est = jax.tree.map(
        lambda a, b: (b - 0.9 * a) / 0.1, variables["batch_stats"], new
    )
    total = est if total is None else jax.tree.map(jnp.add, total, est)
    n += 1
  if n:
    stats = jax.device_get(jax.tree.map(lambda a: a / n, total))
    teacher.variables = dict(teacher.variables, batch_stats=stats)
  return teacher


def create_renderer(spec, mesh, num: int):
  """A compiled `(gen_vars, key) -> (images, faces)` for `num` latents.

  Used for the face grid and the teacher calibration (compiled once).

  Args:
    spec: the `distill.DistillSpec` (generator, psi, noise mode).
    mesh: the device mesh.
    num: how many samples per call.

  Returns:
    A function returning host numpy `[num, R, R, 3]` generator images and
    `[num, 112, 112, 3]` faces in [0, 1].
  """
  spec = dataclasses.replace(spec, batch_sharding=None)

  @functools.partial(jax.jit, out_shardings=sharding.replicated(mesh))
  def render(gen_vars, key):
    w = distill.sample_latents(spec, gen_vars, key, num)
    n, gen = w.shape[0], spec.generator
    ws = jnp.broadcast_to(w[:, None], (n, gen.num_ws, w.shape[1]))
    img = gen.apply(
        gen_vars,
        ws,
        noise_mode=spec.noise_mode,
        rngs={"noise": key},
        method="synthesis",
    )
    return img, faces.generator_to_faces(img)

  return lambda gen_vars, key: sharding.to_host(render(gen_vars, key))


def embedding_size(network: Network) -> int:
  """The size of a face network's embedding (shapes only, nothing runs)."""
  x = jax.ShapeDtypeStruct((1, FACE_SIZE, FACE_SIZE, 3), jnp.float32)
  # Variables as arguments, so abstract ones (`ShapeDtypeStruct`s) work.
  return jax.eval_shape(
      lambda v, x: network.module.apply(v, x, train=False),
      network.variables,
      x,
  ).shape[-1]


def check_embedding_sizes(teacher: Network, student: Network) -> None:
  """Raises `ConfigError` unless teacher and student embed to the same size."""
  sizes = [embedding_size(n) for n in (teacher, student)]
  if sizes[0] != sizes[1]:
    raise ConfigError(
        f"student.kwargs: the student embeds to {sizes[1]} dimensions, the"
        f" teacher to {sizes[0]}; set the student's embedding size to"
        f" {sizes[0]}"
    )
