"""`train_and_evaluate(config, workdir)`: the SynthDistill training loop.

Everything a run needs (mesh, frozen networks, student state, shardings,
jitted programs) comes from `experiment.create`, the setup that the
benchmark, the static-set writer and the ahead-of-time compile share; this
module adds the workdir (checkpoints, metrics, face grid), held-out
validation and the loop (metrics, checkpoints, preemption). The iteration
itself is `distill.iteration`, jitted once over a `jax.make_mesh` mesh with
the global batch on the 'data' axis; the frozen generator and teacher are
replicated jit arguments, never state.
"""

import contextlib
import dataclasses
import math
import os
import sys
import time
from typing import Any, Callable

from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import tqdm

from synthdistill_jax import checkpoints
from synthdistill_jax import distill
from synthdistill_jax import experiment
from synthdistill_jax import metrics_io
from synthdistill_jax import progress
from synthdistill_jax import report
from synthdistill_jax import sharding
from synthdistill_jax import validation
from synthdistill_jax import workdir as workdir_lib

ConfigError = experiment.ConfigError


class TrainingDiverged(RuntimeError):
  """The loss became non-finite; the last good checkpoint is kept."""


class WriteFailed(RuntimeError):
  """A checkpoint or the student could not be written (disk full, access).

  The message is one line naming the workdir, the cause and the newest
  complete checkpoint, which a rerun resumes from.
  """


@contextlib.contextmanager
def _write_errors(manager, workdir, what: str):
  """Turns a failed write inside the block into one-line `WriteFailed`.

  orbax and tensorstore report a failed write as ValueError (e.g.
  "RESOURCE_EXHAUSTED: ... No space left on device") or RuntimeError; the
  message names the OS error and the newest complete checkpoint. Any other
  error is a bug and keeps its type and traceback.
  """
  try:
    yield
  except (OSError, ValueError, RuntimeError) as e:
    if not checkpoints.is_write_error(e):
      raise
    raise WriteFailed(
        f"{what} in {workdir} failed ({checkpoints.write_error_cause(e)}); {_newest(manager)}:"
        " free space or restore access, then run the same command to resume"
    ) from e


def _newest(manager) -> str:
  """Which checkpoint a rerun resumes from, for a message."""
  try:
    latest = manager.latest_step()
  except Exception:  # pylint: disable=broad-except
    latest = None
  if latest is None:
    return "no checkpoint is complete"
  return f"checkpoint {latest} is the newest complete one"


@dataclasses.dataclass
class TrainResult:
  """What `train_and_evaluate` returns.

  Attributes:
    state: the final `distill.TrainState` (global arrays).
    validation: one dict per validation run (`mse`, `cosine`, `r2`, `step`).
    preempted: whether the run stopped on SIGTERM or Ctrl-C before the end.
  """

  state: Any
  validation: list
  preempted: bool = False


# ----------------------------------------------------------------------------
# Held-out validation and the static data feed.


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
  val_root = jax.random.fold_in(
      jax.random.PRNGKey(config.seed), experiment.VAL_TAG
  )
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


def static_batches(config, mesh, start_step: int, damage: list | None = None):
  """Yields pairs of global static batches, resuming at `start_step`.

  Each epoch reads the set in a fresh order (`epoch` seeds the shuffle);
  every iteration takes two batches. The host reads only its own rows.

  Args:
    config: the experiment config.
    mesh: the device mesh.
    start_step: iterations already done (those batches are skipped).
    damage: where the first non-finite target read is described. The batch
      still goes on: its NaN reaches the global loss, so that every host
      stops at the same iteration (`TrainingDiverged`, with this cause on
      the host that read it), not one host alone while the others wait in
      a collective. Without a list, such a batch raises `ConfigError`.

  Yields:
    `((faces_uint8, teacher), (faces_uint8, teacher))` global arrays.
  """
  from synthdistill_jax.data import static_dataset  # pylint: disable=g-import-not-at-top

  ds = static_dataset.StaticDataset(config.sampler.static_dataset)
  per_host = config.schedule.batch_size // jax.process_count()

  per_epoch = ds.batches_per_epoch(per_host, jax.process_count())
  if not per_epoch:
    raise ConfigError(
        f"sampler.static_dataset={config.sampler.static_dataset!r}: fewer"
        f" examples than one batch of {per_host}"
    )
  # One flat stream of batches, two per iteration; a resumed run seeks to
  # where the interrupted one stopped without reading the batches before.
  first_epoch, offset = divmod(2 * start_step, per_epoch)

  def every_batch():
    for epoch in range(first_epoch, sys.maxsize):
      yield from ds.batches(
          per_host,
          seed=config.seed,
          epoch=epoch,
          shard_index=jax.process_index(),
          num_shards=jax.process_count(),
          start_batch=offset if epoch == first_epoch else 0,
      )

  stream = every_batch()
  while True:
    pair = [next(stream) for _ in range(2)]
    for b in pair:
      # A damaged set: named, not taken for a diverged run.
      bad = ~np.isfinite(b["teacher"]).all(axis=-1)
      if bad.any() and not damage:
        message = (
            f"sampler.static_dataset={config.sampler.static_dataset!r}:"
            f" example {int(b['index'][bad][0])} has a non-finite teacher"
            f" embedding ({int(bad.sum())} in its batch): the set is"
            " damaged; write it again with tools/make_static_dataset.py"
        )
        if damage is None:
          raise ConfigError(message)
        damage.append(message)
    yield tuple(
        sharding.put_process_local_batch(
            mesh, (np.asarray(b["face"]), np.asarray(b["teacher"]))
        )
        for b in pair
    )


# ----------------------------------------------------------------------------
# The loop.


def _check_finite(metrics: dict, step: int, cause: str = "") -> None:
  if not all(math.isfinite(float(v)) for v in metrics.values()):
    raise TrainingDiverged(
        f"{cause + ' (' if cause else ''}non-finite loss at iteration"
        f" {step} (loss={metrics['loss']}); stopped without saving, the last"
        f" good checkpoint is kept{')' if cause else ''}"
    )


def _format(metrics: dict) -> str:
  return ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())


@dataclasses.dataclass
class _Run:
  """What the loop needs besides the state: the experiment and its outputs.

  Attributes:
    exp: the `experiment.Experiment`.
    workdir: the workdir (`epath.Path`, local or e.g. gs://).
    manager: the orbax `CheckpointManager`.
    writer: the `metrics_io.MetricWriter`.
    log: prints a line above the progress bar (primary process only).
    evaluator: `evaluation.training.TrainingEvaluator` of `config.evals` (built once).
    saving: the iteration whose asynchronous save may still be in flight.
  """

  exp: experiment.Experiment
  workdir: epath.Path
  manager: Any
  writer: metrics_io.MetricWriter
  log: Callable[[str], None]
  evaluator: Any = None
  # The iteration of an asynchronous save not yet known to be complete.
  saving: int | None = None

  @property
  def config(self):
    return self.exp.config


def _epoch_end(run: _Run, state, step: int, epoch: int) -> dict:
  """Validation, benchmarks and logging after an epoch."""
  config, exp = run.config, run.exp
  val = validate(exp.evaluate, state, exp.gen_vars, exp.teacher_vars, config)
  if val:
    run.writer.write(step, "val", val)
    run.log(f"epoch {epoch}/{config.schedule.epochs}: held-out {_format(val)}")
  if run.evaluator is not None and run.evaluator.enabled and step:
    # Every process takes part (sharded embedding); all get the numbers.
    results = run.evaluator(
        {"params": state.params, "batch_stats": state.batch_stats}
    )
    run.writer.write(step, "evals", results)
    run.log(f"epoch {epoch}: {_format(results)}")
  report.write_run_report(run.workdir, config, _report_info(run, step))
  # Process 0 wrote the report; the others wait here, not in a collective.
  sharding.wait_for_all_processes(f"synthdistill:epoch-end:{step}")
  return dict(val, step=step)


def _report_info(run: _Run, step: int, **extra) -> dict:
  """Facts for `report.write_run_report` that the metrics do not hold."""
  return dict(
      step=step,
      devices=run.exp.mesh.size,
      processes=jax.process_count(),
      weights=run.exp.weights,
      **extra,
  )


def _save_bytes(state) -> int:
  """Bytes a save writes: the state, and the student's variables again."""
  student = (state.params, state.batch_stats)
  return sum(
      math.prod(x.shape) * np.dtype(x.dtype).itemsize
      for x in jax.tree.leaves((state, student))
  )


# Room kept free beyond a save's arrays (metadata, manifests, the reports).
_SPARE_BYTES = 64 << 20


def check_free_space(workdir, need: int, when: str, manager) -> None:
  """Refuses a save that cannot fit on the workdir's file system.

  A write that runs out of space half-way leaves orbax's background
  threads printing tracebacks; checked first, it is one line and nothing
  is written. Checked before the first iteration (so that no training is
  lost to a disk that is already too full) and before every save. Local
  workdirs only (a bucket has no free space to ask). With several
  processes, all of them refuse if any would.

  Args:
    workdir: the run's workdir.
    need: bytes a save writes (the arrays, uncompressed).
    when: what was about to happen, for the message.
    manager: the checkpoint manager (names the newest checkpoint).

  Raises:
    WriteFailed: less than `need` plus a margin is free.
  """
  free = None
  if "://" not in os.fspath(workdir):
    stat = os.statvfs(os.fspath(workdir))
    free = stat.f_bavail * stat.f_frsize
  short = free is not None and free < need + _SPARE_BYTES
  if jax.process_count() > 1:
    short = bool(multihost_utils.process_allgather(int(short)).max())
  if short:
    mib = lambda n: f"{n / 2**20:,.0f} MiB"
    shown = mib(free) if free is not None else "too little"
    raise WriteFailed(
        f"{when}: a checkpoint in {workdir} needs about"
        f" {mib(need + _SPARE_BYTES)}, {shown} free on this host;"
        f" {_newest(manager)}: free space, then run the same command to"
        " resume"
    )


def _save(run: _Run, state, step: int, *, confirm: bool = False) -> None:
  """Checkpoint plus the `WORKDIR/student` model folder.

  A previous asynchronous save that failed is reported first; this save
  then replaces it and is waited for (`confirm`), so that a second failure
  stops the run at once instead of at the next save.

  Raises:
    WriteFailed: either could not be written (a full disk, lost access).
  """
  confirm = _background_save_failed(run, step, wait=True) or confirm
  check_free_space(
      run.workdir, _save_bytes(state), f"saving iteration {step}", run.manager
  )
  with _write_errors(run.manager, run.workdir, f"saving iteration {step}"):
    checkpoints.save(run.manager, state)
    student = run.exp.student
    host = sharding.to_host(
        {"params": state.params, "batch_stats": state.batch_stats}
    )
    checkpoints.export_student(
        run.workdir,
        student.arch,
        student.kwargs,
        host,
        {"step": step, "config": run.config.name},
    )
    if confirm:
      run.manager.wait_until_finished()
    elif run.config.checkpoint.use_async:
      run.saving = step


def _finish_save(manager) -> BaseException | None:
  """Waits for the save in flight; its write error, if it failed of one."""
  try:
    manager.wait_until_finished()
  except (OSError, ValueError, RuntimeError) as e:
    if not checkpoints.is_write_error(e):
      raise
    return e
  return None


def _background_save_failed(run: _Run, now: int, *, wait: bool) -> bool:
  """Whether the asynchronous save of iteration `run.saving` failed.

  orbax reports a background write's error only when the next save starts
  or the run ends: a save that failed at iteration k (a storage hiccup, lost
  access) was found a whole checkpoint interval later, with everything since
  k lost on a stop. Asked at every log step, it is found within
  `log_every_steps` and replaced by a save of iteration `now`. With several
  processes all of them decide alike (a save is a collective).

  Args:
    run: the run (`run.saving` is cleared once the save is known complete).
    now: the iteration that will be saved instead, for the message.
    wait: wait for a save still being written; otherwise it counts as not
      failed, and is asked about again next time.

  Returns:
    True if it failed (logged, one line, with the cause).

  Raises:
    Whatever the save raised that is not a write error (a bug).
  """
  if run.saving is None:
    return False
  manager = run.manager
  done = wait or not manager.is_saving_in_progress()
  # Without `wait` this returns at once: nothing is running.
  error = _finish_save(manager) if done else None
  failed, running = error is not None, not done
  if jax.process_count() > 1:
    flags = multihost_utils.process_allgather(
        np.array([failed, running], np.int32)
    )
    failed, running = (bool(x) for x in np.max(flags, axis=0))
    if failed and not done:
      # Another process's part failed: this one's is replaced all the same.
      _finish_save(manager)
  if running and not failed:
    return False
  if failed:
    cause = (
        checkpoints.write_error_cause(error)
        if error is not None
        else "on another process"
    )
    run.log(
        f"saving iteration {run.saving} failed in the background ({cause});"
        f" saving iteration {now} instead"
    )
  run.saving = None
  return failed


def enable_compilation_cache(config, workdir: epath.Path) -> str | None:
  """Turns on JAX's persistent compilation cache as the config says.

  `compilation_cache_dir`: '' = off; 'auto' = the directory JAX already
  uses (`JAX_COMPILATION_CACHE_DIR`) or else `WORKDIR/compile_cache`, so a
  restarted run (also on a new VM with a gs:// workdir) reuses the compiled
  iteration; any other value is the directory (local or gs://).

  Args:
    config: the experiment config.
    workdir: the run's workdir.

  Returns:
    The cache directory in use, or None.
  """
  setting = config.get("compilation_cache_dir", "auto")
  if not setting:
    return None
  current = jax.config.jax_compilation_cache_dir
  if setting == "auto":
    if current:
      return current
    setting = str(workdir / "compile_cache")
  if setting != current:
    jax.config.update("jax_compilation_cache_dir", setting)
  return setting


def train_and_evaluate(config, workdir: str) -> TrainResult:
  """Trains a student by SynthDistill and validates it after every epoch.

  Resumes from the latest checkpoint in `workdir` if there is one.

  Args:
    config: an experiment config (see `configs/`).
    workdir: output folder, local or any `etils.epath` URI (gs://...):
      checkpoints/, student/, metrics.jsonl, tb/, faces.png.

  Returns:
    A `TrainResult`.
  """
  # Before the workdir is first touched: a bucket out of reach is one line.
  checkpoints.quiet_storage_tracebacks()
  # Every field, device count, input path and the workdir: before anything
  # is built (under a second). The raw name: an empty one must not become
  # the current directory.
  validation.check_training_config(config, os.fspath(workdir))
  workdir = checkpoints.resolve_path(workdir)
  primary = jax.process_index() == 0
  log = tqdm.tqdm.write if primary else (lambda _: None)
  lock = workdir_lib.RunLock(workdir, log).acquire()
  try:
    workdir_lib.remove_stale_temporaries(workdir, log)
    resumable = checkpoints.has_checkpoints(workdir / "checkpoints")
    if not resumable:
      # Before the stored config is replaced and anything is built.
      checkpoints.check_fresh_start(workdir / "checkpoints")
    if resumable:
      _check_schedule_reaches(config, workdir)
    workdir_lib.check_or_store_config(config, workdir, resumable, log)
    enable_compilation_cache(config, workdir)
    return _train(config, workdir, log)
  finally:
    lock.release()


def _check_schedule_reaches(config, workdir: epath.Path) -> None:
  """Refuses fewer epochs than the run's newest checkpoint has done.

  `schedule.epochs` may change on resume (more epochs continue a finished
  run); fewer than done would resume, train nothing, and store the shorter
  schedule as the run's. Checked before anything is built.
  """
  sched = config.schedule
  total = sched.epochs * sched.steps_per_epoch
  done = checkpoints.newest_step(workdir / "checkpoints")
  if done is not None and done > total:
    need = -(-done // sched.steps_per_epoch)
    raise ConfigError(
        f"schedule.epochs={sched.epochs} ends at iteration {total}, but the"
        f" run in {workdir} is at iteration {done}: give at least"
        f" --config.schedule.epochs={need} (more to train on), or use another"
        " --workdir"
    )


def _train(config, workdir: epath.Path, log) -> TrainResult:
  """`train_and_evaluate` once the workdir is checked and locked."""
  primary = jax.process_index() == 0
  # --- Mesh, frozen networks, student state and the jitted programs.
  exp = experiment.create(config)
  log(f"mesh: {exp.mesh.size} devices on {jax.process_count()} process(es)")
  evaluator = None
  evals = config.evals
  if evals.get("bins") or evals.get("ijb", {}).get("meta_dir"):
    # Pulls in image and plotting libraries: only when configured.
    from synthdistill_jax.evaluation import training as evaluation  # pylint: disable=g-import-not-at-top

    evaluator = evaluation.create_training_evaluator(
        evals, exp.student.module, exp.mesh
    )
  # Hosts compile at different speeds: meet before the first collective.
  sharding.wait_for_all_processes("synthdistill:setup")
  # --- Restored if the workdir has a checkpoint (damaged ones set aside).
  manager = checkpoints.create_manager(
      workdir / "checkpoints",
      keep=config.checkpoint.keep,
      use_async=config.checkpoint.use_async,
  )
  state = exp.state
  try:
    check_free_space(
        workdir, _save_bytes(state), "before the first iteration", manager
    )
    restored = checkpoints.restore_latest(
        manager,
        experiment.abstract_state(state, exp.state_shardings),
        log,
        alternatives=experiment.other_state_layouts(config, exp.mesh, state),
    )
  except BaseException:
    manager.close()
    raise
  if restored is not None:
    state = restored
    log(
        f"resumed from {workdir / 'checkpoints'} at iteration {int(state.step)}"
    )
  # The initial state's buffers are not needed any more.
  exp.state = None
  start_step = int(jax.device_get(state.step))
  writer = metrics_io.MetricWriter(workdir, resume_step=start_step, log=log)
  grid_path = workdir / "faces.png"
  n = min(config.face_grid_size, config.schedule.batch_size)
  draw = bool(exp.render and n and not grid_path.exists())
  if jax.process_count() > 1:
    # Process 0's view decides for all: the render needs no communication
    # on every platform, so a process that looked after process 0 wrote
    # the grid would skip the barrier below while the others wait there.
    draw = bool(multihost_utils.broadcast_one_to_all(np.int32(draw)))
  if draw:
    # Every process renders (a collective program); process 0 writes.
    img, crops = exp.render(exp.gen_vars, jax.random.PRNGKey(config.seed))
    if primary:
      metrics_io.write_face_grid(grid_path, img[:n], crops[:n])
    sharding.wait_for_all_processes("synthdistill:face-grid")
  run = _Run(
      exp=exp,
      workdir=workdir,
      manager=manager,
      writer=writer,
      log=log,
      evaluator=evaluator,
  )
  try:
    result = _loop(run, state)
  finally:
    try:
      # An asynchronous save's error surfaces here.
      with _write_errors(manager, workdir, "saving a checkpoint"):
        manager.wait_until_finished()
    finally:
      manager.close()
      writer.close()
  report.write_run_report(
      workdir,
      config,
      _report_info(
          run,
          int(jax.device_get(result.state.step)),
          preempted=result.preempted,
      ),
  )
  log(
      f"checkpoints: {workdir / 'checkpoints'}\n"
      f"student model: {workdir / 'student'}\n"
      f"metrics: {workdir / 'metrics.jsonl'} (TensorBoard: {workdir / 'tb'})\n"
      f"face grid: {grid_path}"
  )
  return result


def _loop(run: _Run, state) -> TrainResult:
  """Runs iterations until the end (or SIGTERM, Ctrl-C); see the caller."""
  config, exp = run.config, run.exp
  sched = config.schedule
  total = sched.epochs * sched.steps_per_epoch
  step = start = int(jax.device_get(state.step))
  # A damaged static set's first bad target, named if the loss turns NaN.
  feed, damage = None, []
  if config.sampler.kind == "static":
    feed = static_batches(config, exp.mesh, step, damage)
  images_per_step = sched.batch_size * distill.UPDATES_PER_ITERATION
  multi = jax.process_count() > 1
  result = TrainResult(state=state, validation=[])
  # A bar on a terminal, periodic lines in a log file (process 0 only).
  bar = progress.create(
      total=total,
      initial=step,
      desc="training",
      unit="it",
      enabled=config.progress_bar,
  )
  # SIGTERM and a first Ctrl-C are caught from here on, the first validation
  # included: the run then stops after the first iteration, saved, instead
  # of dying.
  if step >= total:
    run.log(
        f"nothing left to train: the run is at iteration {step} of {total};"
        " give a larger --config.schedule.epochs to continue it"
    )
  with checkpoints.PreemptionFlag() as flag, bar:
    if step == 0 and sched.val_batches:
      # The starting point of the held-out curve.
      result.validation.append(_epoch_end(run, state, 0, 0))
    # images/s of each logging window counts iterations only: the window
    # restarts after the first call (compilation) and after every
    # validation, evaluation and save.
    window_start, window_steps = None, 0
    while step < total:
      if window_start is None:
        first_call = time.perf_counter()
      batches = next(feed) if feed is not None else None
      if multi and step == start:
        # Hosts compile at different speeds and a CPU (gloo) collective
        # gives up after 30 s: compile everywhere, meet, then run.
        exp.iterate = exp.iterate.lower(
            state, exp.gen_vars, exp.teacher_vars, batches
        ).compile()
        sharding.wait_for_all_processes("synthdistill:compiled")
      state, metrics = exp.iterate(
          state, exp.gen_vars, exp.teacher_vars, batches
      )
      step += 1
      bar.update(1)
      if window_start is None:
        jax.block_until_ready(metrics)
        window_start, window_steps = time.perf_counter(), 0
        # Mostly compilation (or a compilation-cache hit).
        run.log(
            f"first iteration (compile + run): {window_start - first_call:.1f}"
            " s"
        )
      else:
        window_steps += 1
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
        _check_finite(host, step, damage[0] if damage else "")
        if window_steps:
          seconds = time.perf_counter() - window_start
          host["images_per_sec"] = window_steps * images_per_step / seconds
          bar.set_postfix(
              loss=f"{host['loss']:.4g}", img_s=f"{host['images_per_sec']:.1f}"
          )
        run.writer.write(step, "train", host)
        window_start, window_steps = time.perf_counter(), 0
      if save_now or stop:
        # Save first: a preempted machine may have seconds left.
        _save(run, state, step)
      elif log_now and _background_save_failed(run, step, wait=False):
        _save(run, state, step, confirm=True)
      if stop:
        run.log(
            f"{flag.signal_name or 'SIGTERM'}: saved iteration {step} and"
            " stopped (run the same command to resume)"
        )
        result.preempted = True
        break
      if epoch_end:
        result.validation.append(
            _epoch_end(run, state, step, step // sched.steps_per_epoch)
        )
      if epoch_end or save_now:
        window_start, window_steps = time.perf_counter(), 0
    # The last save may still be in flight: it must not fail unseen.
    if _background_save_failed(run, step, wait=True):
      _save(run, state, step, confirm=True)
  result.state = state
  return result
