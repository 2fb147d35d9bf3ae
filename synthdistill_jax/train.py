"""`train_and_evaluate(config, workdir)`: the SynthDistill training loop.

Sections: config checks, mesh, frozen networks, student state, compiled
programs, held-out validation, the loop (metrics, checkpoints, preemption).
The iteration itself is `distill.iteration`, jitted once over a
`jax.make_mesh` mesh with the global batch on the 'data' axis; the frozen
generator and teacher are replicated jit arguments, never state.
"""

import dataclasses
import functools
import math
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from synthdistill_jax import checkpoints
from synthdistill_jax import distill
from synthdistill_jax import faces
from synthdistill_jax import frozen
from synthdistill_jax import metrics_io
from synthdistill_jax import models
from synthdistill_jax import report
from synthdistill_jax import sharding

ConfigError = frozen.ConfigError
# fold_in tag of the held-out latent set; training iterations never reach it.
_VAL_TAG = 0xFFFFFFFF


class TrainingDiverged(RuntimeError):
  """The loss became non-finite; the last good checkpoint is kept."""


@dataclasses.dataclass
class TrainResult:
  """What `train_and_evaluate` returns.

  Attributes:
    state: the final `distill.TrainState` (global arrays).
    validation: one dict per validation run (`mse`, `cosine`, `r2`, `step`).
    preempted: whether the run stopped on SIGTERM before the end.
  """

  state: Any
  validation: list
  preempted: bool = False


# ----------------------------------------------------------------------------
# Config checks: fail at start with one line.


def check_config(config, num_devices: int) -> None:
  """Raises `ConfigError` for settings that cannot run.

  Args:
    config: the experiment config.
    num_devices: devices on the mesh's 'data' axis.
  """
  if config.sampler.kind not in distill.SAMPLERS:
    raise ConfigError(
        f"sampler.kind={config.sampler.kind!r}: known"
        f" {', '.join(distill.SAMPLERS)}"
    )
  if config.loss not in distill.LOSSES:
    raise ConfigError(
        f"loss={config.loss!r}: known {', '.join(distill.LOSSES)}"
    )
  if config.student.arch not in frozen.face_archs():
    raise ConfigError(
        f"student.arch={config.student.arch!r}: unknown student; known:"
        f" {', '.join(frozen.face_archs())}"
    )
  mode = config.mesh.student_sharding
  if mode not in sharding.STUDENT_SHARDINGS:
    raise ConfigError(
        f"mesh.student_sharding={mode!r}: known"
        f" {', '.join(sharding.STUDENT_SHARDINGS)}"
    )
  batch = config.schedule.batch_size
  if batch <= 0 or batch % num_devices or batch % jax.process_count():
    raise ConfigError(
        f"schedule.batch_size={batch} is not divisible by the"
        f" {num_devices} devices of the mesh"
    )
  for field in ("epochs", "steps_per_epoch", "val_batches"):
    if config.schedule[field] < 0:
      raise ConfigError(f"schedule.{field}={config.schedule[field]} < 0")
  folders = [
      (config.student.init_checkpoint, "student.init_checkpoint", "face")
  ]
  if config.sampler.kind != "static":
    folders += [
        (config.generator.checkpoint, "generator.checkpoint", "stylegan2"),
        (config.teacher.checkpoint, "teacher.checkpoint", "face"),
    ]
  for directory, field, kind in folders:
    if directory:
      frozen.check_model_folder(directory, field, kind)
  if config.sampler.kind == "static":
    path = pathlib.Path(config.sampler.static_dataset or "")
    if not config.sampler.static_dataset or not path.is_dir():
      raise ConfigError(
          f"sampler.static_dataset={config.sampler.static_dataset!r}: no such"
          " folder (write one with tools/make_static_dataset.py)"
      )


# ----------------------------------------------------------------------------
# Student state and the optimiser.


def create_optimizer(config):
  """Adam with the paper's step decay, counted in optimiser updates.

  Args:
    config: the experiment config.

  Returns:
    `(tx, schedule)`.
  """
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
  tx = optax.adam(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps)
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


def create_state(mesh, config, student: frozen.Network, tx):
  """The initial `TrainState`, created directly with its shardings.

  Args:
    mesh: the device mesh.
    config: the experiment config.
    student: the initialised student network (host variables).
    tx: the optax transformation.

  Returns:
    `(state, state_shardings)`.
  """
  variables = sharding.put_replicated(mesh, student.variables)

  def make_state(v):
    return distill.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=v["params"],
        batch_stats=v.get("batch_stats", {}),
        opt_state=tx.init(v["params"]),
        rng=jax.random.PRNGKey(config.seed),
    )

  shapes = jax.eval_shape(make_state, variables)
  shardings = sharding.student_shardings(
      mesh, shapes, config.mesh.student_sharding
  )
  rep = sharding.replicated(mesh)
  shardings = shardings.replace(step=rep, rng=rep)
  state = jax.jit(make_state, out_shardings=shardings)(variables)
  return state, shardings


def abstract_state(state, shardings):
  """`ShapeDtypeStruct`s with shardings: the restore target."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      state,
      shardings,
  )


# ----------------------------------------------------------------------------
# Compiled programs.


def compile_programs(spec, mesh, state_shardings):
  """Jits the iteration (state donated) and the held-out evaluation.

  Args:
    spec: the `distill.DistillSpec`.
    mesh: the device mesh.
    state_shardings: shardings of the `TrainState`.

  Returns:
    `(iterate, evaluate)` callables.
  """
  rep = sharding.replicated(mesh)
  batch = sharding.batch_sharding(mesh)
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


def validate(evaluate, state, gen_vars, teacher_vars, config) -> dict:
  """MSE, mean cosine and R^2 on the fixed held-out latent set.

  R^2 = 1 - SSE / SST over every embedding dimension, SST around the
  teacher's per-dimension mean.

  Args:
    evaluate: the compiled `distill.evaluate_batch`.
    state: current state.
    gen_vars: generator variables.
    teacher_vars: teacher variables.
    config: the experiment config.

  Returns:
    `{'mse', 'cosine', 'r2'}` floats (empty without validation batches).
  """
  val_root = jax.random.fold_in(jax.random.PRNGKey(config.seed), _VAL_TAG)
  sums = None
  for b in range(config.schedule.val_batches):
    out = evaluate(
        state, gen_vars, teacher_vars, jax.random.fold_in(val_root, b)
    )
    out = jax.tree.map(
        lambda x: np.asarray(x, np.float64), sharding.to_host(out)
    )
    sums = out if sums is None else jax.tree.map(np.add, sums, out)
  if sums is None:
    return {}
  n, dims = sums["count"], sums["t_sum"].shape[0]
  sst = np.sum(sums["t_sq_sum"] - np.square(sums["t_sum"]) / n)
  return {
      "mse": float(sums["sse"] / (n * dims)),
      "cosine": float(sums["cos"] / n),
      "r2": float(1.0 - sums["sse"] / max(sst, 1e-30)),
  }


# ----------------------------------------------------------------------------
# Frozen networks, the face grid and the static data feed.


def build_networks(config):
  """Generator, teacher and student `frozen.Network`s of the config.

  Args:
    config: the experiment config.

  Returns:
    `(generator or None, teacher or None, student)`; the static sampler
    needs neither generator nor teacher.
  """
  student = frozen.build_student(config.student, config.seed)
  if config.sampler.kind == "static":
    return None, None, student
  generator = frozen.build_generator(config.generator)
  teacher = frozen.build_teacher(config.teacher)
  frozen.check_embedding_sizes(teacher, student)
  return generator, teacher, student


def create_spec(config, mesh, networks, tx=None, schedule=None):
  """The `distill.DistillSpec` of a config, sharded over `mesh`.

  Args:
    config: the experiment config.
    mesh: the device mesh (the batch is sharded on its 'data' axis).
    networks: `(generator, teacher, student)` from `build_networks`; any may
      be None where the caller does not need it.
    tx: the student's optax transformation (None when nothing is trained).
    schedule: its learning-rate schedule.

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
  )


def place_frozen(config, mesh, spec, generator, teacher):
  """Replicates the frozen networks on the mesh (inputs, never state).

  A random teacher (no checkpoint) first gets BN statistics estimated on
  generated faces (`teacher.calibrate_batches`), as a trained one has.

  Args:
    config: the experiment config.
    mesh: the device mesh.
    spec: from `create_spec`.
    generator: the generator `frozen.Network`.
    teacher: the teacher `frozen.Network`.

  Returns:
    `(gen_vars, teacher_vars, render)`; `render(gen_vars, key)` gives host
    images and crops of one batch (`frozen.create_renderer`).
  """
  gen_vars = sharding.put_replicated(mesh, generator.variables)
  render = frozen.create_renderer(spec, mesh, config.schedule.batch_size)
  if not config.teacher.checkpoint and config.teacher.calibrate_batches:
    teacher = calibrate_random_teacher(config, render, teacher, gen_vars)
  teacher_vars = sharding.put_replicated(mesh, teacher.variables)
  return gen_vars, teacher_vars, render


def calibrate_random_teacher(config, render, teacher, gen_vars):
  """Estimates a random teacher's BN statistics on generated faces."""
  root = jax.random.fold_in(jax.random.PRNGKey(config.seed), _VAL_TAG - 1)
  batches = (
      render(gen_vars, jax.random.fold_in(root, i))[1]
      for i in range(config.teacher.calibrate_batches)
  )
  return frozen.calibrate_teacher(teacher, batches)


def static_examples(config, num_examples: int, seed: int):
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
  spec = create_spec(config, mesh, (generator, teacher, None))
  gen_vars, teacher_vars, _ = place_frozen(
      config, mesh, spec, generator, teacher
  )
  batch = spec.batch_size

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
        make_batch(gen_vars, teacher_vars, jax.random.fold_in(root, i))
    )
    n = min(batch, num_examples - start)
    yield {"w": w[:n], "face": face[:n], "teacher": np.asarray(t[:n])}


def static_batches(config, mesh, start_step: int):
  """Yields pairs of global static batches, resuming at `start_step`.

  Each epoch reads the set in a fresh order (`epoch` seeds the shuffle);
  every iteration takes two batches. The host reads only its own rows.

  Args:
    config: the experiment config.
    mesh: the device mesh.
    start_step: iterations already done (those batches are skipped).

  Yields:
    `((faces_uint8, teacher), (faces_uint8, teacher))` global arrays.
  """
  from synthdistill_jax.data import static_dataset  # pylint: disable=g-import-not-at-top

  ds = static_dataset.StaticDataset(config.sampler.static_dataset)
  per_host = config.schedule.batch_size // jax.process_count()

  def every_batch():
    for epoch in range(sys.maxsize):
      count = 0
      for batch in ds.batches(
          per_host,
          seed=config.seed,
          epoch=epoch,
          shard_index=jax.process_index(),
          num_shards=jax.process_count(),
      ):
        count += 1
        yield batch
      if not count:
        raise ConfigError(
            f"sampler.static_dataset={config.sampler.static_dataset!r}: fewer"
            f" examples than one batch of {per_host}"
        )

  # One flat stream of batches, so a resumed run skips exactly what the
  # interrupted one consumed.
  stream = every_batch()
  for _ in range(2 * start_step):
    next(stream)
  while True:
    pair = [next(stream) for _ in range(2)]
    yield tuple(
        sharding.put_process_local_batch(
            mesh, (np.asarray(b["face"]), np.asarray(b["teacher"]))
        )
        for b in pair
    )


# ----------------------------------------------------------------------------
# The loop.


def _check_finite(metrics: dict, step: int) -> None:
  if not all(math.isfinite(float(v)) for v in metrics.values()):
    raise TrainingDiverged(
        f"non-finite loss at iteration {step} (loss={metrics['loss']}); "
        "stopped without saving, the last good checkpoint is kept"
    )


def _format(metrics: dict) -> str:
  return ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())


def _epoch_end(ctx, state, step: int, epoch: int) -> dict:
  """Validation, benchmarks and logging after an epoch."""
  config = ctx["config"]
  val = validate(ctx["evaluate"], state, *ctx["frozen_vars"], config)
  if val:
    ctx["writer"].write(step, "val", val)
    ctx["log"](
        f"epoch {epoch}/{config.schedule.epochs}: held-out {_format(val)}"
    )
  if config.evals.get("bins") and step:
    from synthdistill_jax import evaluate  # pylint: disable=g-import-not-at-top

    host = sharding.to_host(
        {"params": state.params, "batch_stats": state.batch_stats}
    )
    results = evaluate.run_evaluators(
        config.evals,
        ctx["student"].module,
        host,
        progress_bar=config.progress_bar,
    )
    ctx["writer"].write(step, "evals", results)
    ctx["log"](f"epoch {epoch}: {_format(results)}")
  report.write_run_report(ctx["workdir"], config, {"step": step})
  return dict(val, step=step)


def _save(ctx, state, step: int) -> None:
  """Checkpoint plus the `WORKDIR/student` model folder."""
  checkpoints.save(ctx["manager"], state)
  student = ctx["student"]
  host = sharding.to_host(
      {"params": state.params, "batch_stats": state.batch_stats}
  )
  checkpoints.export_student(
      ctx["workdir"],
      student.arch,
      student.kwargs,
      host,
      {"step": step, "config": ctx["config"].name},
  )


def train_and_evaluate(config, workdir: str) -> TrainResult:
  """Trains a student by SynthDistill and validates it after every epoch.

  Resumes from the latest checkpoint in `workdir` if there is one.

  Args:
    config: an experiment config (see `configs/`).
    workdir: output folder: checkpoints/, student/, metrics.jsonl, tb/,
      faces.png.

  Returns:
    A `TrainResult`.
  """
  workdir = pathlib.Path(workdir).absolute()
  primary = jax.process_index() == 0
  log = tqdm.tqdm.write if primary else (lambda _: None)
  # --- Mesh.
  mesh = sharding.create_mesh(config.mesh.num_devices)
  check_config(config, mesh.size)
  log(f"mesh: {mesh.size} devices on {jax.process_count()} process(es)")
  # --- Frozen networks and the student.
  generator, teacher, student = build_networks(config)
  tx, schedule = create_optimizer(config)
  spec = create_spec(config, mesh, (generator, teacher, student), tx, schedule)
  gen_vars = teacher_vars = render = None
  if generator is not None:
    gen_vars, teacher_vars, render = place_frozen(
        config, mesh, spec, generator, teacher
    )
  # --- Student state, restored if the workdir has a checkpoint.
  state, state_shardings = create_state(mesh, config, student, tx)
  manager = checkpoints.create_manager(
      workdir / "checkpoints",
      keep=config.checkpoint.keep,
      use_async=config.checkpoint.use_async,
  )
  restored = checkpoints.restore_latest(
      manager, abstract_state(state, state_shardings)
  )
  if restored is not None:
    state = restored
    log(
        f"resumed from {workdir / 'checkpoints'} at iteration {int(state.step)}"
    )
  iterate, evaluate = compile_programs(spec, mesh, state_shardings)
  writer = metrics_io.MetricWriter(workdir)
  grid_path = workdir / "faces.png"
  n = min(config.face_grid_size, config.schedule.batch_size)
  if render and n and not grid_path.exists():
    # Every process renders (a collective program); process 0 writes.
    img, crops = render(gen_vars, jax.random.PRNGKey(config.seed))
    if primary:
      metrics_io.write_face_grid(grid_path, img[:n], crops[:n])
  ctx = dict(
      config=config,
      workdir=workdir,
      manager=manager,
      writer=writer,
      student=student,
      evaluate=evaluate,
      log=log,
      frozen_vars=(gen_vars, teacher_vars),
  )
  try:
    result = _loop(ctx, iterate, state)
  finally:
    manager.wait_until_finished()
    manager.close()
    writer.close()
  report.write_run_report(workdir, config, {"preempted": result.preempted})
  log(
      f"checkpoints: {workdir / 'checkpoints'}\n"
      f"student model: {workdir / 'student'}\n"
      f"metrics: {workdir / 'metrics.jsonl'} (TensorBoard: {workdir / 'tb'})\n"
      f"face grid: {grid_path}"
  )
  return result


def _loop(ctx, iterate, state) -> TrainResult:
  """Runs iterations until the end (or SIGTERM); see `train_and_evaluate`."""
  config = ctx["config"]
  sched = config.schedule
  total = sched.epochs * sched.steps_per_epoch
  step = int(jax.device_get(state.step))
  gen_vars, teacher_vars = ctx["frozen_vars"]
  feed = None
  if config.sampler.kind == "static":
    feed = static_batches(config, iterate_mesh(state), step)
  images_per_step = sched.batch_size * distill.UPDATES_PER_ITERATION
  multi = jax.process_count() > 1
  result = TrainResult(state=state, validation=[])
  bar = tqdm.tqdm(
      total=total,
      initial=step,
      unit="it",
      dynamic_ncols=True,
      disable=not (config.progress_bar and jax.process_index() == 0),
  )
  if step == 0 and sched.val_batches:
    # The starting point of the held-out curve.
    result.validation.append(_epoch_end(ctx, state, 0, 0))
  with checkpoints.PreemptionFlag() as flag, bar:
    t0, steps0 = time.perf_counter(), step
    while step < total:
      batches = next(feed) if feed is not None else None
      state, metrics = iterate(state, gen_vars, teacher_vars, batches)
      step += 1
      bar.update(1)
      epoch_end = step % sched.steps_per_epoch == 0
      save_now = step % config.checkpoint.every_steps == 0 or step == total
      log_now = step % config.log_every_steps == 0 or epoch_end or save_now
      stop = (
          flag.is_set(sync=multi and log_now)
          if (log_now or not multi)
          else False
      )
      if log_now or stop:
        host = {k: float(v) for k, v in sharding.to_host(metrics).items()}
        _check_finite(host, step)
        rate = (step - steps0) * images_per_step / (time.perf_counter() - t0)
        host["images_per_sec"] = rate
        bar.set_postfix(loss=f"{host['loss']:.4g}", img_s=f"{rate:.1f}")
        ctx["writer"].write(step, "train", host)
      if epoch_end:
        result.validation.append(
            _epoch_end(ctx, state, step, step // sched.steps_per_epoch)
        )
      if save_now or stop:
        _save(ctx, state, step)
      if stop:
        ctx["log"](f"SIGTERM: saved iteration {step} and stopped")
        result.preempted = True
        break
  result.state = state
  return result


def iterate_mesh(state):
  """The mesh the state lives on."""
  return jax.tree.leaves(state)[0].sharding.mesh
