"""Evaluation during training: checked at start, built once, any processes.

`create_training_evaluator(config.evals, module, mesh)` validates the paths
and reads every benchmark file before training starts, compiles the
embedder once, and is called after each epoch by every process.
"""

import functools
import os
import pathlib

from absl import logging
import jax

from synthdistill_jax.data import verification_bin
from synthdistill_jax.evaluation import benchmarks
from synthdistill_jax.evaluation import embedding
from synthdistill_jax.evaluation import ijb
from synthdistill_jax.evaluation import settings


def check_evals_config(evals_config) -> None:
  """Checks `config.evals` before anything is built (paths only, no reads).

  Args:
    evals_config: see `settings.default_evals_config`.

  Raises:
    errors.ConfigError: one line naming the field: a bin that is missing or
      a folder, two bins with one name, a batch size below 1, an IJB meta or
      image folder that is missing or a file, an IJB block without a name,
      or IJB fields set while `meta_dir` is empty (IJB would never run).
  """
  names = {}
  for i, path in enumerate(settings.bin_paths(evals_config)):
    field = f"evals.bins[{i}]={path!r}"
    if not isinstance(path, str) or not path:
      raise settings.config_error(f"{field}: expected the path of a .bin file")
    if not os.path.exists(path):
      raise settings.config_error(f"{field}: no such file")
    if not os.path.isfile(path):
      raise settings.config_error(f"{field}: not a file (an insightface .bin)")
    name = pathlib.Path(path).stem
    if name in names:
      raise settings.config_error(
          f"{field}: same benchmark name {name!r} as evals.bins[{names[name]}]"
      )
    names[name] = i
  batch_size = evals_config.get("batch_size", 64)
  if isinstance(batch_size, bool) or not isinstance(batch_size, int):
    raise settings.config_error(
        f"evals.batch_size={batch_size!r}: not an integer"
    )
  if batch_size < 1:
    raise settings.config_error(
        f"evals.batch_size={batch_size}: must be at least 1"
    )
  cfg = evals_config.get("ijb", None)
  if isinstance(cfg, str):
    if cfg:
      raise settings.config_error(
          f"evals.ijb={cfg!r}: must be a block (meta_dir, image_dir, name)"
          " or ''"
      )
    return
  if not cfg:
    return
  meta_dir = cfg.get("meta_dir", "")
  if not meta_dir:
    for key in ("image_dir", "name"):
      if cfg.get(key, ""):
        raise settings.config_error(
            f"evals.ijb.{key}={cfg.get(key)!r} is set but evals.ijb.meta_dir"
            " is empty, so IJB would never run; set meta_dir"
        )
    return
  for key in ("meta_dir", "image_dir"):
    value = cfg.get(key, "")
    if not value:
      raise settings.config_error(
          f"evals.ijb.{key} is empty; give the IJB folder"
      )
    if not os.path.isdir(value):
      what = "not a folder" if os.path.exists(value) else "no such folder"
      raise settings.config_error(f"evals.ijb.{key}={value!r}: {what}")
  if not cfg.get("name", ""):
    raise settings.config_error(
        "evals.ijb.name is empty; give the meta file prefix ('ijbb' or"
        " 'ijbc')"
    )


def is_configured(evals_config) -> bool:
  """Whether any benchmark (a bin or IJB) is configured."""
  cfg = evals_config.get("ijb", None)
  has_ijb = bool(
      cfg
      and not isinstance(cfg, str)
      and cfg.get("meta_dir", "")
      and cfg.get("name", "")
  )
  return bool(settings.bin_paths(evals_config)) or has_ijb


class TrainingEvaluator:
  """The configured benchmarks, built once for a training run.

  Every input is read and validated at construction; the embedding program
  is jitted once on the training mesh and reused for every call. Works with
  several processes (every process must call it, with the same variables).

  Attributes:
    enabled: whether any benchmark is configured; when False, calls return
      `{}` without running anything.
    embedder: the `embedding.BatchEmbedder` (its `num_traces` counts compilations).
  """

  def __init__(self, evals_config, module, mesh: jax.sharding.Mesh):
    check_evals_config(evals_config)
    self._config = evals_config
    self.enabled = is_configured(evals_config)
    self._inputs = benchmarks.Inputs([], None)
    self.embedder = None
    if not self.enabled:
      return
    try:
      self._inputs = benchmarks.read_inputs(evals_config)
      for vbin in self._inputs.bins:
        benchmarks.check_bin_folds(vbin)
    except (verification_bin.BinFormatError, ijb.IJBFormatError) as e:
      raise settings.config_error(f"evals: {e}") from None
    self._mesh = mesh
    self.embedder = embedding.BatchEmbedder(
        module, mesh, int(evals_config.batch_size)
    )

  def __call__(self, variables) -> dict[str, float]:
    """Evaluates the student.

    Args:
      variables: `{'params': ..., 'batch_stats': ...}`, global arrays on the
        mesh (replicated or sharded) or host arrays.

    Returns:
      Flat metrics, `{'lfw/accuracy': ..., 'ijbc/tar_far_1e-4': ...}`, the
      same on every process. A benchmark whose embeddings are not finite is
      reported as `{name}/nonfinite: 1.0` (with a warning) instead of
      accuracies, so that a run is not ended by its evaluation.
    """
    if not self.enabled:
      return {}
    variables = embedding.put_replicated(self._mesh, variables)
    embed = functools.partial(self.embedder, variables)
    batch_size = int(self._config.batch_size)
    jobs = [
        (
            b.name,
            functools.partial(benchmarks.evaluate_bin, b, embed, batch_size),
        )
        for b in self._inputs.bins
    ]
    if self._inputs.ijb_meta is not None:
      cfg = self._config.ijb
      jobs.append(
          (
              cfg.name,
              functools.partial(
                  benchmarks.evaluate_ijb,
                  self._inputs.ijb_meta,
                  cfg.name,
                  cfg.image_dir,
                  embed,
                  batch_size,
                  bool(cfg.get("aligned", False)),
              ),
          )
      )
    metrics = {}
    for name, job in jobs:
      try:
        metrics.update(benchmarks.flatten_metrics([job()]))
      except benchmarks.NonFiniteEmbeddingError as e:
        logging.warning("%s", e)
        metrics[f"{name}/nonfinite"] = 1.0
    return metrics


def create_training_evaluator(
    evals_config, student_module, mesh: jax.sharding.Mesh
) -> TrainingEvaluator:
  """Builds the evaluator the trainer calls after each epoch.

  Call once at start (it validates `config.evals` and reads every benchmark
  file, so a typo fails before training), then `evaluator(variables)` per
  epoch; `evaluator.enabled` says whether anything is configured.

  Args:
    evals_config: `config.evals` (see `settings.default_evals_config`).
    student_module: the student's Flax module.
    mesh: the training mesh (every process's devices).

  Returns:
    A `TrainingEvaluator`.

  Raises:
    errors.ConfigError: one line naming the field (see
      `check_evals_config`), or a malformed bin or IJB meta file.
  """
  return TrainingEvaluator(evals_config, student_module, mesh)
