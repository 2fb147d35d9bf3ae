"""The run's workdir: one trainer at a time, its config, no stale leftovers.

- `RunLock`: `WORKDIR/LOCK` names the trainer that holds the workdir (host,
  pid, start, heartbeat). A second trainer is refused with one line naming
  the holder; a lock whose process is gone (same host: the pid is dead, or
  alive but another process than the one that wrote the lock, by its start
  time and the boot id, as in a restarted container with the same hostname
  and pid; another host: no heartbeat for `STALE_AFTER_S`) is taken over,
  with a message. A holder that finds its lock taken over stops its
  heartbeat rather than overwrite the new holder's. Only process 0 of a
  multi-process run takes it.
- `check_or_store_config`: `WORKDIR/config.json` is the config of the run's
  checkpoints; resuming with another student, batch, sampler, seed or
  schedule (other than more epochs) is refused with one line naming the
  fields, unless `config.allow_config_change` is set.
- `remove_stale_temporaries`: half-written checkpoint and student folders
  that a killed run left behind.

Every path is an `etils.epath.Path` (local or gs://).
"""

import datetime
import json
import os
import socket
import threading
import time
import uuid

from etils import epath
import jax

from synthdistill_jax import errors

LOCK_NAME = "LOCK"
CONFIG_NAME = "config.json"
HEARTBEAT_S = 30.0
# A lock from another host without a heartbeat for this long is stale.
STALE_AFTER_S = 600.0
# Config fields that must not change on resume: the checkpoints (shapes,
# optimiser schedule, data stream) depend on them. `schedule.epochs` may
# grow: that is how a finished run is continued.
FROZEN_FIELDS = (
    "seed",
    "student.arch",
    "student.kwargs",
    "student.init_checkpoint",
    "sampler.kind",
    "sampler.resampling_coef",
    "sampler.static_dataset",
    "loss",
    "schedule.batch_size",
    "schedule.steps_per_epoch",
    "schedule.val_batches",
    "optimizer.learning_rate",
    "optimizer.decay_every_epochs",
    "optimizer.decay_factor",
)


class WorkdirBusyError(errors.ConfigError):
  """Another live trainer holds the workdir."""


def _now() -> float:
  return time.time()


def _stamp(t: float) -> str:
  return datetime.datetime.fromtimestamp(t).isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # Exists, owned by someone else.
  return True


# Tokens of the locks this process holds: a lock naming this process's pid
# but none of these tokens was left by an earlier process that had the same
# pid (a restarted container: same hostname, same small pid).
_HELD_TOKENS = set()


def _read_text(path: str) -> str | None:
  # /proc is local and not a workdir path: plain reads.
  try:
    with open(path, encoding="ascii") as f:
      return f.read().strip()
  except (OSError, ValueError):
    return None


def _boot_id() -> str | None:
  """This boot of this machine (Linux), None elsewhere."""
  return _read_text("/proc/sys/kernel/random/boot_id")


def _process_start(pid: int) -> str | None:
  """When process `pid` started, in clock ticks since boot (Linux)."""
  stat = _read_text(f"/proc/{pid}/stat")
  if not stat:
    return None
  # Field 22; the command name (field 2) may hold spaces, so split after it.
  fields = stat.rsplit(")", 1)[-1].split()
  return fields[19] if len(fields) > 19 else None


class RunLock:
  """`WORKDIR/LOCK`, held from `acquire()` to `release()` (or `with`).

  Args:
    workdir: the run's workdir.
    log: where the take-over message goes.
  """

  def __init__(self, workdir, log=print):
    self.path = epath.Path(workdir) / LOCK_NAME
    self._log = log
    self._token = uuid.uuid4().hex
    self._record = None
    self._stop = threading.Event()
    self._thread = None

  def _read(self) -> dict | None:
    try:
      return json.loads(self.path.read_text())
    except FileNotFoundError:
      return None
    except (ValueError, OSError):
      return {}  # Half-written or unreadable: treated as stale below.

  def _is_live(self, holder: dict) -> bool:
    if not holder:
      return False
    if holder.get("host") == socket.gethostname():
      pid = int(holder.get("pid", -1))
      if pid == os.getpid():
        # This process: live only if one of its own locks wrote it.
        return holder.get("token") in _HELD_TOKENS
      if not _pid_alive(pid):
        return False
      boot = holder.get("boot_id")
      if boot and _boot_id() and boot != _boot_id():
        return False  # The machine restarted: every pid is a new process.
      start = holder.get("process_start")
      if start and _process_start(pid) and start != _process_start(pid):
        return False  # The pid was reused by another process.
      return True
    return _now() - float(holder.get("heartbeat", 0)) < STALE_AFTER_S

  def _write(self) -> None:
    self._record["heartbeat"] = _now()
    tmp = self.path.parent / f".{LOCK_NAME}.tmp-{self._token}"
    tmp.write_text(json.dumps(self._record))
    tmp.replace(self.path)

  def acquire(self) -> "RunLock":
    """Takes the lock or raises `WorkdirBusyError` (one line)."""
    if jax.process_index() != 0:
      return self
    holder = self._read()
    if holder is not None and holder.get("token") != self._token:
      if self._is_live(holder):
        raise WorkdirBusyError(
            f"--workdir={self.path.parent}: in use by pid"
            f" {holder.get('pid')} on {holder.get('host')} (started"
            f" {_stamp(float(holder.get('started', 0)))}); wait for it, stop"
            f" it, or use another --workdir"
        )
      self._log(
          f"taking over the lock of a stopped run (pid {holder.get('pid')} on"
          f" {holder.get('host')}): {self.path}"
      )
    self._record = dict(
        host=socket.gethostname(),
        pid=os.getpid(),
        started=_now(),
        token=self._token,
        boot_id=_boot_id(),
        process_start=_process_start(os.getpid()),
    )
    _HELD_TOKENS.add(self._token)
    self._write()
    # Two trainers started in the same instant both wrote: the last write
    # wins, the other one sees a foreign token and stops.
    time.sleep(0.2)
    if (self._read() or {}).get("token") != self._token:
      _HELD_TOKENS.discard(self._token)
      raise WorkdirBusyError(
          f"--workdir={self.path.parent}: another trainer took it at the"
          " same moment; use another --workdir"
      )
    self._thread = threading.Thread(target=self._beat, daemon=True)
    self._thread.start()
    return self

  def _beat(self) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      try:
        if (self._read() or {}).get("token") != self._token:
          # Taken over while this process looked dead (e.g. a long stall):
          # never overwrite the new holder's lock.
          self._log(f"lost the lock {self.path} to another trainer")
          return
        self._write()
      except OSError:
        pass  # A missed heartbeat only matters after STALE_AFTER_S.

  def release(self) -> None:
    """Stops the heartbeat and removes the lock if it is still ours."""
    if self._thread is None:
      return
    self._stop.set()
    self._thread.join()
    self._thread = None
    _HELD_TOKENS.discard(self._token)
    if (self._read() or {}).get("token") == self._token:
      self.path.unlink(missing_ok=True)

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def _flat(tree, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _normalise(value):
  # JSON turns tuples into lists; compare what JSON keeps.
  return json.loads(json.dumps(value, default=str))


def check_or_store_config(
    config, workdir, has_checkpoints: bool, log=print
) -> None:
  """Refuses a resume whose config changed a frozen field; stores the config.

  An unreadable stored config is moved aside to `config.json.corrupt-<time>`
  with one line (the resume then goes on without the comparison; the
  checkpoints' shapes are still checked when they are restored).

  Args:
    config: the experiment config.
    workdir: the run's workdir.
    has_checkpoints: whether the workdir holds checkpoints to resume from.
    log: where the message about an unreadable stored config goes.
  """
  path = epath.Path(workdir) / CONFIG_NAME
  current = _normalise(config.to_dict())
  if has_checkpoints and path.exists():
    try:
      stored = json.loads(path.read_text())
      if not isinstance(stored, dict):
        raise ValueError(f"a JSON {type(stored).__name__}, not an object")
    except (ValueError, OSError) as e:
      stored = None
      # Process 0 moves it; another process may find it gone meanwhile.
      if jax.process_index() == 0 and path.exists():
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = path.parent / f"{CONFIG_NAME}.corrupt-{stamp}"
        path.rename(aside)
        log(
            f"{path} is not a readable config ({type(e).__name__}:"
            f" {str(e)[:120]}); moved to {aside}, resuming without comparing"
            " the settings"
        )
    if stored is not None and not config.get("allow_config_change", False):
      now, then = _flat(current), _flat(stored)
      changed = [
          field
          for field in FROZEN_FIELDS
          if any(
              k == field or k.startswith(field + ".")
              for k in set(now) | set(then)
              if now.get(k) != then.get(k)
          )
      ]
      if changed:
        shown = ", ".join(
            f"{f} {_get(then, f)!r} -> {_get(now, f)!r}" for f in changed
        )
        raise errors.ConfigError(
            f"--workdir={workdir}: its checkpoints were trained with other"
            f" settings ({shown}); resume with the stored"
            f" {CONFIG_NAME}, use another --workdir, or set"
            " --config.allow_config_change=True to change them on purpose"
        )
  if jax.process_index() == 0:
    tmp = path.parent / f".{CONFIG_NAME}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def _get(flat: dict, field: str):
  if field in flat:
    return flat[field]
  sub = {k[len(field) + 1 :]: v for k, v in flat.items() if k.startswith(field)}
  return sub or None


def remove_stale_temporaries(workdir, log=print) -> list[str]:
  """Removes what a killed run half-wrote (process 0, under the lock).

  Orbax's `*.orbax-checkpoint-tmp*` step folders (never restored: orbax
  only lists finished steps), `student.tmp-*` / `student.old` (the student
  folder is swapped in by renames) and temporary metric/report files.

  Args:
    workdir: the run's workdir.
    log: where the message goes.

  Returns:
    The names removed.
  """
  if jax.process_index() != 0:
    return []
  workdir = epath.Path(workdir)
  stale = []
  if workdir.exists():
    stale += [p for p in workdir.glob("student.tmp-*")]
    stale += [p for p in workdir.glob("student.old")]
    stale += [p for p in workdir.glob(".*.tmp-*")]
  checkpoints = workdir / "checkpoints"
  if checkpoints.exists():
    stale += [p for p in checkpoints.glob("*.orbax-checkpoint-tmp*")]
  for path in stale:
    if path.is_dir():
      path.rmtree()
    else:
      path.unlink(missing_ok=True)
  if stale:
    log(
        f"removed stale temporaries of a stopped run: {[p.name for p in stale]}"
    )
  return [p.name for p in stale]
