"""Checks a training config and its workdir before anything is built.

`check_training_config(config, workdir)` runs in well under a second: every
numeric field in range, the devices available, the workdir creatable and
writable, every input path present and of the right kind. Each problem is a
`errors.ConfigError` with one line naming the field and the fix; the
trainer raises it before any network is built or compiled.
"""

import contextlib
import math
import os
import uuid

from etils import epath
import jax
import ml_collections

from synthdistill_jax import errors
from synthdistill_jax import networks

ConfigError = errors.ConfigError

# (field, lowest allowed integer, what it means) for integer fields.
_MINIMUMS = (
    ("schedule.batch_size", 1, "the global batch"),
    ("schedule.epochs", 1, "at least one epoch"),
    ("schedule.steps_per_epoch", 1, "iterations per epoch"),
    ("schedule.val_batches", 0, "0 turns validation off"),
    ("log_every_steps", 1, "iterations between metric fetches"),
    ("checkpoint.every_steps", 1, "iterations between checkpoints"),
    ("checkpoint.keep", 1, "keep at least the latest checkpoint"),
    ("optimizer.decay_every_epochs", 1, "epochs between learning-rate steps"),
    ("face_grid_size", 0, "0 = no face grid"),
    ("teacher.calibrate_batches", 0, "0 = no calibration"),
    ("mesh.num_devices", 0, "0 = every device"),
)


def _get(config, field: str):
  node = config
  for part in field.split("."):
    node = node[part]
  return node


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_numbers(config) -> None:
  """Every numeric field in range (see `_MINIMUMS` and the optimiser's)."""
  for field, lowest, meaning in _MINIMUMS:
    value = _get(config, field)
    if not _is_number(value) or value < lowest or value != int(value):
      raise ConfigError(
          f"{field}={value!r}: must be an integer >= {lowest} ({meaning})"
      )
  opt = config.optimizer
  if not _is_number(opt.learning_rate) or not opt.learning_rate > 0:
    raise ConfigError(
        f"optimizer.learning_rate={opt.learning_rate!r}: must be > 0"
        " (the paper uses 1e-3)"
    )
  for name in ("b1", "b2"):
    value = opt[name]
    if not _is_number(value) or not 0 <= value < 1:
      raise ConfigError(f"optimizer.{name}={value!r}: must be in [0, 1)")
  if not _is_number(opt.eps) or not opt.eps > 0:
    raise ConfigError(f"optimizer.eps={opt.eps!r}: must be > 0 (e.g. 1e-8)")
  if not _is_number(opt.decay_factor) or not 0 < opt.decay_factor <= 1:
    raise ConfigError(
        f"optimizer.decay_factor={opt.decay_factor!r}: must be in (0, 1]"
        " (1 = constant learning rate)"
    )
  coef = config.sampler.resampling_coef
  if not _is_number(coef) or not math.isfinite(coef) or coef < 0:
    raise ConfigError(
        f"sampler.resampling_coef={coef!r}: must be a finite number >= 0"
    )
  psi = config.generator.truncation_psi
  if not _is_number(psi) or not math.isfinite(psi):
    raise ConfigError(
        f"generator.truncation_psi={psi!r}: must be a finite number"
    )


def check_devices(config) -> None:
  """The mesh asks for no more devices than there are."""
  available = jax.device_count()
  wanted = config.mesh.num_devices
  if wanted > available:
    raise ConfigError(
        f"mesh.num_devices={wanted}: only {available} device(s) here; use"
        f" at most {available} (0 = all)"
    )


def check_workdir(workdir: str, flag: str = "--workdir") -> None:
  """The workdir can be created and written (a probe file, then removed).

  Args:
    workdir: local path or URI (gs://...).
    flag: the flag that named it, for the message.
  """
  if not workdir.strip():
    raise ConfigError(f"{flag} is empty: give the output folder")
  with _reachable(flag, workdir):
    path = epath.Path(workdir)
    is_file = path.exists() and not path.is_dir()
  if is_file:
    raise ConfigError(
        f"{flag}={workdir}: is a file, not a folder; choose another path"
    )
  if reason := _cannot_write_in(path):
    raise ConfigError(
        f"{flag}={workdir}: cannot create or write it ({reason}); choose"
        " a writable folder"
    )


@contextlib.contextmanager
def _reachable(flag: str, value: str):
  """Turns a path that cannot be asked about into one `ConfigError` line.

  epath raises ImportError for a URI whose file system is not installed
  (s3://, az://: fsspec names the package), KeyError for an unknown scheme,
  and OSError for a bucket out of reach.
  """
  try:
    yield
  except (ImportError, KeyError) as e:
    detail = str(e) if isinstance(e, ImportError) else f"no file system for {e}"
    raise ConfigError(
        f"{flag}={value}: cannot open such a path here ({detail}); local"
        " folders and gs:// work (gs:// with pip install -e '.[gcs]')"
    ) from None
  except OSError as e:
    raise ConfigError(
        f"{flag}={value}: cannot reach it"
        f" ({e.strerror or str(e) or type(e).__name__}); check the path,"
        " the network and the credentials"
    ) from None


def _cannot_write_in(folder: epath.Path) -> str | None:
  """Why `folder` cannot be created and written in, or None if it can."""
  probe = folder / f".write-probe-{uuid.uuid4().hex}"
  try:
    folder.mkdir(parents=True, exist_ok=True)
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    return e.strerror or type(e).__name__
  return None


def check_output_file(path: str, flag: str, example: str = "out.json") -> None:
  """A file a command writes at its end can be written there.

  Checked before the work (minutes of compiling and timing), so that a
  folder given as the file, or a folder that cannot be created or written,
  is one line at the start instead of a traceback at the end.

  Args:
    path: local path or URI (gs://...).
    flag: the flag that named it, e.g. '--output'.
    example: a file name for the message's example, when `path` is a folder.

  Raises:
    ConfigError: naming the flag, the path and the fix.
  """
  if not path.strip():
    raise ConfigError(f"{flag} is empty: give the file to write")
  with _reachable(flag, path):
    target = epath.Path(path)
    is_dir = target.is_dir()
  if is_dir:
    raise ConfigError(
        f"{flag}={path}: is a folder; give a file in it, e.g."
        f" {flag}={target / example}"
    )
  if reason := _cannot_write_in(target.parent):
    raise ConfigError(
        f"{flag}={path}: cannot write in {target.parent} ({reason}); choose"
        " a writable folder"
    )


def check_paths(config) -> None:
  """Every input path named by the config exists and is of the right kind."""
  folders = [
      (config.student.init_checkpoint, "student.init_checkpoint", "face")
  ]
  if config.sampler.kind != "static":
    folders += [
        (config.generator.checkpoint, "generator.checkpoint", "stylegan2"),
        (config.teacher.checkpoint, "teacher.checkpoint", "face"),
    ]
  # Every folder the config still lacks in one line, not one per run.
  unset = [(f, kind) for d, f, kind in folders if networks.is_unset(d)]
  if unset:
    raise networks.unset_error(unset)
  for directory, field, kind in folders:
    if directory:
      networks.check_model_folder(directory, field, kind)
  if config.sampler.kind == "static":
    path = config.sampler.static_dataset
    if not path or not os.path.isdir(path):
      raise ConfigError(
          f"sampler.static_dataset={path!r}: no such folder (write one with"
          " tools/make_static_dataset.py)"
      )
  cache = config.get("compilation_cache_dir", "auto")
  if cache and cache != "auto":
    # JAX would warn once per program and run without the cache.
    check_workdir(cache, "compilation_cache_dir")
  evals = config.get("evals")
  if evals is not None and (
      evals.get("bins") or evals.get("ijb", {}).get("meta_dir")
  ):
    from synthdistill_jax.evaluation import training  # pylint: disable=g-import-not-at-top

    training.check_evals_config(evals)


def _missing_fields(config, base, prefix: str = "") -> list[str]:
  """Fields of `base` (the defaults) that `config` lacks, dotted."""
  missing = []
  for key, value in base.items():
    if key not in config:
      missing.append(prefix + key)
    elif isinstance(value, ml_collections.ConfigDict) and isinstance(
        config[key], ml_collections.ConfigDict
    ):
      missing += _missing_fields(config[key], value, f"{prefix}{key}.")
  return missing


def check_structure(config) -> None:
  """The config is a `ConfigDict` with every field of the defaults.

  A config file that returns something else, or builds its own
  `ConfigDict` without `defaults.base_config()`, would otherwise fail with
  a traceback at the first missing field.
  """
  from synthdistill_jax import defaults  # pylint: disable=g-import-not-at-top

  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(
        f"--config: get_config() returned a {type(config).__name__}, not an"
        " ml_collections.ConfigDict; start from defaults.base_config()"
    )
  missing = _missing_fields(config, defaults.base_config())
  if missing:
    raise ConfigError(
        f"--config: the config has no field {missing[0]}"
        f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''};"
        " start from synthdistill_jax.defaults.base_config()"
    )


def check_training_config(config, workdir: str) -> None:
  """All the checks above, cheapest first.

  Args:
    config: the experiment config.
    workdir: the run's workdir.

  Raises:
    ConfigError: one line naming the field (or flag) and the fix.
  """
  check_structure(config)
  check_numbers(config)
  check_devices(config)
  check_paths(config)
  check_workdir(workdir)
