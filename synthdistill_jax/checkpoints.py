"""Checkpoints: orbax `CheckpointManager`, resume order, preemption, export.

Resume order: the latest complete checkpoint in `WORKDIR/checkpoints` (orbax
only lists finished ones, so a run killed mid-save resumes from the one
before); otherwise a fresh start from the config seed. A checkpoint holds the
whole `distill.TrainState` (student params, batch stats, optimiser state,
iteration and root key), never the frozen networks. Restoring it gives the
same bits, so an interrupted and resumed run ends where an uninterrupted one
does.

SIGTERM (preemption) and a first Ctrl-C only set a flag; the training loop
saves at the next iteration boundary and returns cleanly.
"""

import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
from typing import Any, Sequence

from etils import epath
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import orbax.checkpoint as ocp

from synthdistill_jax import errors
from synthdistill_jax import integrity
from synthdistill_jax import models
from synthdistill_jax import sharding

# Local paths made absolute, URIs (gs://...) kept.
resolve_path = models.registry.resolve_path

# Keys of a step's custom metadata: array name -> checksum, and how it was
# computed.
CHECKSUMS = "checksums"
ALGORITHM = "checksum_algorithm"
# orbax's per-step metadata file (commit times, custom metadata).
STEP_METADATA = "_CHECKPOINT_METADATA"


# How tensorstore (under orbax) words a failed read or write: an absl status
# code first, e.g. "RESOURCE_EXHAUSTED: Error writing ...".
_STATUS_ERROR = re.compile(r"^[A-Z][A-Z_]+: ")


def is_write_error(error: BaseException) -> bool:
  """An OS or storage error (not a bug, which keeps its traceback)."""
  return isinstance(error, OSError) or bool(
      _STATUS_ERROR.match(str(error).strip())
  )


def write_error_cause(error: BaseException) -> str:
  """The OS error behind a failed write, short (for a one-line message)."""
  text = str(error)
  code = re.search(r"os_error_code='(\d+)'", text)
  if isinstance(error, OSError) and error.strerror:
    return f"{error.strerror}: {error.filename or ''}".rstrip(": ")
  if code:
    return os.strerror(int(code.group(1)))
  return (text.strip().splitlines() or [""])[0][:300]


class _WriteErrorsWithoutTracebacks(logging.Filter):
  """Keeps orbax's log lines of a failed write, without their tracebacks.

  A write that fails (a full disk, lost access) is logged by each of
  orbax's background threads with its traceback, about 40 lines each (and
  by asyncio, for the futures of that write nobody awaited any more); the
  trainer ends with one line naming the cause (`train.WriteFailed`). Any
  other error orbax or asyncio logs keeps its traceback.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    if (
        error is not None
        and (
            f"{os.sep}orbax{os.sep}" in record.pathname
            or record.name in _STORAGE_LOGGERS
        )
        and is_write_error(error)
    ):
      record.exc_info = record.exc_text = None
    return True


_WRITE_ERROR_FILTER = _WriteErrorsWithoutTracebacks()
# Loggers whose records of a storage error lose their tracebacks besides
# orbax's (which log through absl): asyncio's, and gcsfs's retries of a
# bucket it cannot reach (a 60-line traceback before the one-line error).
_STORAGE_LOGGERS = ("asyncio", "gcsfs")


def quiet_storage_tracebacks() -> None:
  """Installs the filter above (adding it twice is a no-op)."""
  for name in ("absl",) + _STORAGE_LOGGERS:
    logging.getLogger(name).addFilter(_WRITE_ERROR_FILTER)


def create_manager(
    directory: str | os.PathLike, *, keep: int, use_async: bool
) -> ocp.CheckpointManager:
  """A `CheckpointManager` over `directory`, keeping the last `keep` saves.

  Args:
    directory: the checkpoint folder (created if missing).
    keep: how many checkpoints to keep.
    use_async: write in a background thread (training continues).

  Returns:
    The manager; close it with `.close()`.
  """
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      enable_async_checkpointing=use_async,
      create=True,
  )
  quiet_storage_tracebacks()
  # The handler is named up front so that a fresh manager (a resumed run)
  # can read a step's metadata before restoring it.
  return ocp.CheckpointManager(
      resolve_path(directory),
      options=options,
      item_handlers=ocp.StandardCheckpointHandler(),
  )


def save(
    manager: ocp.CheckpointManager,
    state: Any,
    *,
    force: bool = True,
    step: int | None = None,
) -> bool:
  """Saves `state` under its iteration number (`state.step`, or `step`).

  The step's metadata (`_CHECKPOINT_METADATA`, committed with the arrays)
  holds a checksum per array (`integrity.checksums`), which
  `restore_latest` compares. A collective with several processes.

  Args:
    manager: from `create_manager`.
    state: a `distill.TrainState` of global arrays.
    force: save even if the manager's policy would skip this step.
    step: the step to save under; None reads `state.step`.

  Returns:
    Whether a save was started.
  """
  if step is None:
    step = int(jax.device_get(state.step))
  if step in manager.all_steps():
    return False
  return manager.save(
      step,
      args=ocp.args.StandardSave(state),
      force=force,
      custom_metadata={
          CHECKSUMS: integrity.checksums(state),
          ALGORITHM: integrity.ALGORITHM,
      },
  )


class CheckpointError(errors.ConfigError):
  """The workdir holds checkpoints but none can be restored (one line)."""


def _layout(tree, field: str = "shape") -> dict[str, Any]:
  """Array path -> shape (or dtype), dict keys and dataclass fields alike."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  if field == "dtype":
    return {
        integrity.leaf_name(path): str(getattr(leaf, "dtype", None))
        for path, leaf in leaves
    }
  return {
      integrity.leaf_name(path): tuple(getattr(leaf, "shape", ()))
      for path, leaf in leaves
  }


def _first_difference(saved: dict, wanted: dict) -> str:
  for name in sorted(set(saved) | set(wanted)):
    if saved.get(name) != wanted.get(name):
      return f"{name}: saved {saved.get(name)}, config {wanted.get(name)}"
  return ""


def _set_aside(manager, step: int, reason: str, log) -> str:
  """Moves checkpoint `step` to `<dir>.corrupt/<step>-<time>` (process 0)."""
  directory = epath.Path(manager.directory)
  stamp = time.strftime("%Y%m%d-%H%M%S")
  target = directory.parent / f"{directory.name}.corrupt" / f"{step}-{stamp}"
  if jax.process_index() == 0:
    target.parent.mkdir(parents=True, exist_ok=True)
    (directory / str(step)).rename(target)
    log(f"checkpoint {step} cannot be restored ({reason}); moved to {target}")
  sharding.wait_for_all_processes(f"checkpoints:aside:{step}")
  manager.reload()
  return str(target)


def _saved_checksums(manager, step: int) -> tuple[dict | None, str]:
  """The checksums saved with checkpoint `step`, or None and why not.

  Read from the step's metadata file itself: orbax answers an unreadable
  one with empty metadata (and log lines), which would pass for a
  checkpoint written before checksums.

  Raises:
    ValueError: the metadata file is not valid JSON (damage).
  """
  path = epath.Path(manager.directory) / str(step) / STEP_METADATA
  if not path.exists():
    return None, f"it has no {STEP_METADATA}"
  try:
    custom = json.loads(path.read_text()).get("custom_metadata") or {}
  except ValueError as e:
    raise ValueError(f"{STEP_METADATA} is not valid JSON ({e})") from None
  if CHECKSUMS not in custom:
    return None, "it has no checksums (written before 2026-12-07)"
  if custom.get(ALGORITHM) != integrity.ALGORITHM:
    # A later version's checksums: not damage.
    return None, f"its checksums are {custom.get(ALGORITHM)!r}, unknown here"
  return dict(custom[CHECKSUMS]), ""


def restore_latest(
    manager: ocp.CheckpointManager,
    abstract_state: Any,
    log=print,
    alternatives: Sequence[Any] = (),
):
  """Restores the newest restorable checkpoint onto `abstract_state`.

  A checkpoint whose files cannot be read (truncated or overwritten arrays,
  missing metadata) or whose arrays differ from the checksums saved with
  them (`save`) is moved aside to `<dir>.corrupt/` (never deleted), with one
  line naming it and why, and the one before it is tried. A checkpoint
  without checksums (written by an earlier version) is restored with one
  line saying so. A checkpoint of other shapes than the config's student is
  a config mistake, not corruption: `errors.ConfigError`, nothing moved. A
  checkpoint laid out as one of `alternatives` (the same numbers in other
  arrays: the optimiser state per parameter or raveled) is restored onto it
  and converted with `regroup`, with one line saying so.

  Args:
    manager: from `create_manager`.
    abstract_state: a `TrainState` of `jax.ShapeDtypeStruct`s with shardings.
    log: where the messages go.
    alternatives: other abstract states a checkpoint may hold, each
      convertible to `abstract_state` by `regroup`.

  Returns:
    The restored state, or None when there is no checkpoint at all.

  Raises:
    CheckpointError: there were checkpoints and none could be restored.
  """
  wanted = _layout(abstract_state)
  aside = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      sums, unverified = _saved_checksums(manager, step)
      meta = manager.item_metadata(step)
      # None: a manager without a known handler, not damage; the restore
      # below decides.
      saved = None if meta is None else _layout(meta.tree)
      saved_dtypes = {} if meta is None else _layout(meta.tree, "dtype")
    except Exception as e:  # pylint: disable=broad-except
      # orbax/tensorstore raise many types for damaged files.
      aside.append(_set_aside(manager, step, _reason(e), log))
      continue
    target = abstract_state
    if saved is not None and saved != wanted:
      target = next((a for a in alternatives if _layout(a) == saved), None)
    if target is None:
      raise errors.ConfigError(
          f"checkpoint {step} in {manager.directory} holds a student of other"
          f" shapes ({_first_difference(saved, wanted)}); resume with the"
          " config it was trained with, or use another --workdir"
      )
    try:
      restored = manager.restore(step, args=ocp.args.StandardRestore(target))
    except Exception as e:  # pylint: disable=broad-except
      aside.append(_set_aside(manager, step, _reason(e), log))
      continue
    if sums is None:
      log(f"checkpoint {step} restored unverified: {unverified}")
    else:
      # An array restored onto another dtype than it was saved in (orbax
      # casts) has other bits: only the others are compared.
      cast = {
          k
          for k, v in _layout(restored, "dtype").items()
          if saved_dtypes.get(k, v) != v
      }
      found = integrity.checksums(restored)
      wrong = [k for k in integrity.mismatches(sums, found) if k not in cast]
      if wrong:
        which = (
            f"{wrong[0]} and {len(wrong) - 1} more arrays differ"
            if len(wrong) > 1
            else f"{wrong[0]} differs"
        )
        reason = (
            f"{which} from the checksums saved with it: the files changed"
            " after they were written"
        )
        del restored
        aside.append(_set_aside(manager, step, reason, log))
        continue
    if target is abstract_state:
      return restored
    log(
        f"checkpoint {step} holds the optimiser state in another layout (an"
        " earlier version's, another platform's or another"
        " mesh.student_sharding's); converted to this run's, the numbers"
        " unchanged"
    )
    return regroup(restored, abstract_state)
  if aside:
    raise CheckpointError(
        f"no restorable checkpoint in {manager.directory}: all were damaged"
        f" and moved aside ({', '.join(aside)}); start a new --workdir or"
        " restore a copy"
    )
  check_fresh_start(manager.directory)
  return None


def check_fresh_start(directory) -> None:
  """Raises `CheckpointError` where a start from iteration 0 would lose a run.

  For a checkpoint folder with no checkpoint to resume from: an earlier
  start set every checkpoint aside, or the run saved before (its student is
  exported with every checkpoint) and its checkpoints are gone. Files only,
  nothing built: the trainer asks before it builds the networks.

  Args:
    directory: the checkpoint folder (`WORKDIR/checkpoints`).
  """
  directory = epath.Path(directory)
  corrupt = directory.parent / f"{directory.name}.corrupt"
  if corrupt.exists() and any(corrupt.iterdir()):
    # Running again must not start afresh (and drop the run's metrics after
    # iteration 0).
    raise CheckpointError(
        f"no restorable checkpoint in {directory}; the damaged ones are in"
        f" {corrupt}: start a new --workdir, or restore a copy into"
        f" {directory}"
    )
  saved = _exported_step(directory.parent)
  if saved:
    # Starting afresh would replace the student and drop the metrics without
    # a word.
    raise CheckpointError(
        f"no checkpoint in {directory}, but {directory.parent / 'student'}"
        f" was saved at iteration {saved}: the run's checkpoints were removed"
        " or are on another disk; restore them, or start a new --workdir"
    )


def _exported_step(workdir: epath.Path) -> int:
  """The iteration of `WORKDIR/student`'s last export (0: none, unreadable)."""
  try:
    config = json.loads((workdir / "student" / "model.json").read_text())
    return int(config["metadata"]["step"])
  except (OSError, ValueError, KeyError, TypeError):
    return 0


def _regroup_plan(source: list, target: list) -> list | None:
  """How `target`'s leaves are made of `source`'s (shape/dtype lists).

  Each entry is `("take", i)`: source leaf `i` as it is; `("concat", i, j)`:
  source leaves `i:j` raveled and concatenated (a raveled vector); or
  `("cut", i, offset)`: the elements from `offset` of the 1-D source leaf
  `i` (one array of a raveled vector). None when the two do not hold the
  same numbers in the same order.
  """
  plan, i, offset = [], 0, 0
  for want in target:
    size = math.prod(want.shape)
    if i >= len(source):
      return None
    here = source[i]
    if offset == 0 and here.shape == want.shape and here.dtype == want.dtype:
      plan.append(("take", i))
      i += 1
      continue
    if offset == 0 and len(want.shape) == 1:
      j, total = i, 0
      while j < len(source) and total < size:
        if source[j].dtype != want.dtype:
          break
        total += math.prod(source[j].shape)
        j += 1
      if total == size:
        plan.append(("concat", i, j))
        i = j
        continue
    length = math.prod(here.shape)
    if len(here.shape) != 1 or here.dtype != want.dtype:
      return None
    if offset + size > length:
      return None
    plan.append(("cut", i, offset))
    offset += size
    if offset == length:
      i, offset = i + 1, 0
  if i != len(source) or offset:
    return None
  return plan


def regroup(tree: Any, target: Any) -> Any:
  """`tree`'s numbers in `target`'s arrays (and shardings), in leaf order.

  The optimiser state of `optax.flatten(t)` holds in one vector what that
  of `t` holds in one array per parameter, in the same tree order: this
  converts either way (concatenating raveled leaves, or cutting a vector
  into arrays), and leaves of equal shapes as they are.

  Args:
    tree: global arrays.
    target: `jax.ShapeDtypeStruct`s with shardings, of the same numbers.

  Returns:
    `tree` regrouped as `target`.

  Raises:
    ValueError: the two do not hold the same numbers in the same order.
  """
  source = jax.tree.leaves(tree)
  wanted, treedef = jax.tree.flatten(target)
  plan = _regroup_plan(source, wanted)
  if plan is None:
    raise ValueError(
        "the state cannot be regrouped: other numbers than the target's"
    )

  def convert(leaves):
    out = []
    for (kind, i, *rest), want in zip(plan, wanted):
      if kind == "take":
        out.append(leaves[i])
      elif kind == "concat":
        out.append(jnp.concatenate([jnp.ravel(x) for x in leaves[i : rest[0]]]))
      else:
        size = math.prod(want.shape)
        piece = jax.lax.slice_in_dim(leaves[i], rest[0], rest[0] + size)
        out.append(jnp.reshape(piece, want.shape))
    return out

  shardings = [w.sharding for w in wanted]
  return jax.tree.unflatten(
      treedef, jax.jit(convert, out_shardings=shardings)(source)
  )


def _reason(error: BaseException) -> str:
  first = (str(error).strip().splitlines() or [""])[0]
  return f"{type(error).__name__}: {first[:160]}"


def has_checkpoints(directory) -> bool:
  """Whether `directory` holds finished orbax step folders."""
  directory = epath.Path(directory)
  if not directory.exists():
    return False
  return any(p.name.isdigit() for p in directory.iterdir())


def newest_step(directory) -> int | None:
  """The highest finished step folder in `directory`, None if there is none.

  A listing only (nothing read): the step may still be set aside as damaged
  when it is restored.
  """
  directory = epath.Path(directory)
  if not directory.exists():
    return None
  steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit()]
  return max(steps, default=None)


class PreemptionFlag:
  """Turns SIGTERM and the first Ctrl-C into a flag the training loop polls.

  SIGTERM (preemption) and the first SIGINT (Ctrl-C) set the flag: the loop
  saves at the next iteration boundary and stops. The first Ctrl-C says so
  on stderr and gives SIGINT back to its previous handler, so that a second
  one interrupts at once (Python's `KeyboardInterrupt`, delivered again if
  it lands in a finaliser: `errors.install_unraisable_hook`), without a
  save. Use as a context manager; the previous handlers are restored on
  exit.

  Attributes:
    signal_name: 'SIGTERM' or 'SIGINT', whichever set the flag first.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self._event = threading.Event()
    self._previous = {}
    self.signal_name = ""

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for signum in self.SIGNALS:
        # An ignored SIGINT (a job a script started with `&`, `nohup`) stays
        # ignored: only Python's own Ctrl-C handler is replaced.
        if signum == signal.SIGINT and (
            signal.getsignal(signum) is not signal.default_int_handler
        ):
          continue
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if not self._event.is_set():
      self.signal_name = signal.Signals(signum).name
    self._event.set()
    if signum == signal.SIGINT:
      signal.signal(signum, self._previous.pop(signum))
      print(
          "\nCtrl-C: saving a checkpoint after this iteration, then stopping"
          " (Ctrl-C again stops at once, without it)",
          file=sys.stderr,
          flush=True,
      )

  def is_set(self, sync: bool = False) -> bool:
    """Whether the flag is set (on any host when `sync`: a collective)."""
    local = self._event.is_set()
    if not sync or jax.process_count() == 1:
      return local
    flags = multihost_utils.process_allgather(int(local))
    return bool(flags.max())


def export_student(
    workdir: str | os.PathLike,
    arch: str,
    kwargs: dict,
    variables: Any,
    metadata: dict,
) -> epath.Path:
  """Writes the student as a model folder `WORKDIR/student`, replacing it.

  The folder is written next to the old one and swapped in by renames, so a
  reader sees either the old or the new model, never half of one.

  Args:
    workdir: the training workdir.
    arch: the student's registry name.
    kwargs: its constructor arguments.
    variables: host numpy `{'params', 'batch_stats'}`.
    metadata: free-form (step, config name, ...).

  Returns:
    The path of `WORKDIR/student`.
  """
  workdir = resolve_path(workdir)
  final = workdir / "student"
  tmp = workdir / f"student.tmp-{metadata.get('step', 0)}"
  old = workdir / "student.old"
  primary = jax.process_index() == 0
  if primary and tmp.exists():
    tmp.rmtree()
  sharding.wait_for_all_processes("export_student:start")
  models.save(tmp, arch, kwargs, variables, metadata)
  sharding.wait_for_all_processes("export_student:written")
  if primary:
    if old.exists():
      old.rmtree()
    if final.exists():
      final.rename(old)
    tmp.rename(final)
    if old.exists():
      old.rmtree()
  sharding.wait_for_all_processes("export_student:done")
  return final
