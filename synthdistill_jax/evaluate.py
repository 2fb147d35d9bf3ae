r"""Face-recognition evaluation: verification bins, IJB-B/C, reports, CLI.

Any face model folder works: a trained student, a converted teacher, or any
converted checkpoint (see `synthdistill_jax.models.load`); a PyTorch `.pth`
with `--arch` is converted on the fly (needs the `convert` extra).

  python -m synthdistill_jax.evaluate --model DIR \
      --bins lfw.bin,cfp_fp.bin,agedb_30.bin [--output DIR/eval]
  python -m synthdistill_jax.evaluate --workdir WORKDIR --bins ...   # WORKDIR/student
  python -m synthdistill_jax.evaluate --model DIR --ijb_meta_dir IJBC/meta \
      --ijb_image_dir IJBC/loose_crop --ijb_name ijbc

Writes `report.md`, `report.json`, `roc_<benchmark>.png` and, for IJB, the
per-pair scores `scores_<benchmark>.npy`. Every input is validated before
the model is loaded; a bad input (a flag, a missing, hostile or malformed
file, a model whose arrays do not match its `model.json`) prints one line
naming it and exits with status 2, and so do NaN/Inf embeddings (no
accuracy is reported for them). Nothing in a `.pth`/`.bin` given to it is
ever run.

During training, `create_training_evaluator(config.evals, module, mesh)`
builds the same evaluation once (inputs validated at start, one
compilation) for every epoch, on any number of processes.

Images are normalised `(x / 255 - 0.5) / 0.5` for every network, as
insightface's evaluation does; each image and its horizontal flip are
embedded in one jitted call of a fixed batch size (the last batch is padded),
sharded over all devices on a 1-D 'data' mesh.
"""

import dataclasses
import functools
import json
import os
import pathlib
import sys
from typing import Any, Callable, Iterable

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from synthdistill_jax import ijb
from synthdistill_jax import progress
from synthdistill_jax import safe_pickle
from synthdistill_jax import verification
from synthdistill_jax.data import verification_bin

Embedder = Callable[[Iterable[np.ndarray]], tuple[np.ndarray, np.ndarray]]


# ----------------------------------------------------------------------------
# Embedding.


def normalize_images(images: jax.Array) -> jax.Array:
  """uint8 NHWC -> float32 `(x / 255 - 0.5) / 0.5` (insightface eval)."""
  return (images.astype(jnp.float32) / 255.0 - 0.5) / 0.5


class BatchEmbedder:
  """A jitted embedding program of one batch size, reused for any variables.

  `embedder(variables, batches) -> (emb, emb_flip)`. Images are laid out over every device of `mesh` (global arrays built from
  the host batch, which every process holds, so it works with several
  processes); the outputs are replicated, so each process reads its local
  copy rather than `np.asarray` of an array it cannot address.

  Attributes:
    size: images per device call (a multiple of the mesh size).
    num_traces: how many times the program was traced (compiled); stays 1
      while variables keep their shapes and shardings.
  """

  def __init__(self, module, mesh: jax.sharding.Mesh, batch_size: int):
    self.size = -(-batch_size // mesh.size) * mesh.size
    self.num_traces = 0
    self._data = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(mesh.axis_names)
    )
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    size = self.size

    def embed_batch(variables, images):
      self.num_traces += 1  # Runs at trace time only.
      x = normalize_images(images)
      both = jnp.concatenate([x, x[:, :, ::-1, :]], axis=0)
      out = module.apply(variables, both, train=False).astype(jnp.float32)
      return out[:size], out[size:]

    self._embed_batch = jax.jit(
        embed_batch, out_shardings=(replicated, replicated)
    )

  def _global_batch(self, padded: np.ndarray) -> jax.Array:
    return jax.make_array_from_callback(
        padded.shape, self._data, lambda index: padded[index]
    )

  def __call__(
      self, variables, batches: Iterable[np.ndarray]
  ) -> tuple[np.ndarray, np.ndarray]:
    """Embeds every image of `batches` and its horizontal flip.

    Args:
      variables: the model's variables (global arrays on the mesh).
      batches: uint8 [b, 112, 112, 3] batches of any sizes.

    Returns:
      float32 `(emb, emb_flip)`, one row per image, in order.
    """
    outputs, counts = [], []
    for batch in batches:
      for start in range(0, len(batch), self.size):
        chunk = np.asarray(batch[start : start + self.size], np.uint8)
        padded = np.zeros((self.size,) + chunk.shape[1:], np.uint8)
        padded[: len(chunk)] = chunk
        # Dispatch is asynchronous: decoding the next batch overlaps this.
        outputs.append(self._embed_batch(variables, self._global_batch(padded)))
        counts.append(len(chunk))
    if not outputs:
      raise ValueError("nothing to embed")

    def local(x, n):  # Replicated: every process holds the whole array.
      return np.asarray(x.addressable_data(0))[:n]

    emb = np.concatenate([local(o[0], n) for o, n in zip(outputs, counts)])
    flip = np.concatenate([local(o[1], n) for o, n in zip(outputs, counts)])
    return emb, flip


def create_embedder(module, variables, batch_size: int = 64) -> Embedder:
  """Builds `embed(batches) -> (emb, emb_flip)` for a Flax face model.

  Args:
    module: Flax module, `module.apply(variables, x, train=False) -> [B, D]`.
    variables: its variables (host arrays).
    batch_size: images per device call; rounded up to a multiple of the
      device count. Every call has this size (no recompiles).

  Returns:
    A function mapping an iterable of uint8 [b, 112, 112, 3] batches to the
    float32 embeddings of the images and of their horizontal flips.
  """
  devices = jax.devices()
  mesh = jax.make_mesh((len(devices),), ("data",), devices=devices)
  embedder = BatchEmbedder(module, mesh, batch_size)
  variables = _put_replicated(mesh, variables)
  return functools.partial(embedder, variables)


def _put_replicated(mesh: jax.sharding.Mesh, variables) -> Any:
  """Host leaves -> replicated global arrays; global arrays stay as they are."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def put(x):
    if isinstance(x, jax.Array):
      return x
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, replicated, lambda i: x[i])

  return jax.tree.map(put, variables)


# ----------------------------------------------------------------------------
# Evaluators.


class NonFiniteEmbeddingError(ValueError):
  """The model embedded some images to NaN/Inf; no metric would be honest."""


def check_finite(name: str, *embeddings: np.ndarray) -> None:
  """Refuses NaN/Inf embeddings rather than scoring them.

  With NaN distances no pair is ever "same", and the protocol would report
  the share of different pairs (50.00 % on the usual bins) as accuracy.

  Args:
    name: the benchmark, named in the message.
    *embeddings: [N, D] arrays (the images', their flips').

  Raises:
    NonFiniteEmbeddingError: one line with the count of bad rows.
  """
  rows = np.concatenate([np.asarray(e).reshape(len(e), -1) for e in embeddings])
  bad = int(np.count_nonzero(~np.isfinite(rows).all(axis=1)))
  if bad:
    raise NonFiniteEmbeddingError(
        f"{name}: {bad} of {len(rows)} embeddings (images and flips) are not"
        " finite (NaN/Inf): the model overflows or its weights are broken; no"
        " accuracy is reported"
    )


def mean_embedding_norm(emb: np.ndarray, emb_flip: np.ndarray) -> float:
  """`xnorm` as insightface reports it: the mean L2 norm of the raw rows.

  `recognition/arcface_torch/eval/verification.py` (`test`) sums
  `np.linalg.norm(row)` over every row of both embedding lists, the images'
  and their flips', in float64, and divides by the number of rows: the mean
  per-row L2 norm of the raw (unnormalised) embeddings, flips included.

  Args:
    emb: [N, D] raw embeddings of the images.
    emb_flip: [N, D] raw embeddings of their horizontal flips.

  Returns:
    The mean row norm.
  """
  rows = np.concatenate([emb, emb_flip]).astype(np.float64)
  return float(np.mean(np.linalg.norm(rows, axis=1)))


@dataclasses.dataclass
class BenchmarkResult:
  """One benchmark's outcome.

  Attributes:
    name: benchmark name ('lfw', 'ijbc', ...).
    kind: 'verification' or 'ijb'.
    size: number of pairs.
    metrics: flat scalar metrics (keys without the benchmark prefix).
    fpr: ROC false-positive rates (for the plot).
    tpr: ROC true-positive rates.
    scores: per-pair scores in the pair file's order (IJB), else None.
    details: settings to record in report.json (IJB: warp, aligned).
  """

  name: str
  kind: str
  size: int
  metrics: dict[str, float]
  fpr: np.ndarray
  tpr: np.ndarray
  scores: np.ndarray | None = None
  details: dict[str, Any] = dataclasses.field(default_factory=dict)


def check_bin_folds(vbin: verification_bin.VerificationBin) -> None:
  """Refuses a bin whose labels the 10-fold protocol cannot score.

  Args:
    vbin: a set from `verification_bin.read_bin`.

  Raises:
    BinFormatError: one line naming the file and the fold.
  """
  try:
    verification.check_folds(vbin.issame)
  except ValueError as e:
    raise verification_bin.BinFormatError(
        f"{vbin.path}: its labels cannot be scored in"
        f" {verification.NUM_FOLDS} folds: {e}"
    ) from None


def evaluate_bin(
    vbin: verification_bin.VerificationBin,
    embed: Embedder,
    batch_size: int,
    progress_bar: bool = True,
) -> BenchmarkResult:
  """The insightface 10-fold protocol on one `.bin`, with and without flip.

  Args:
    vbin: a validated set from `verification_bin.read_bin`.
    embed: from `create_embedder`.
    batch_size: images decoded per batch.
    progress_bar: show the images decoded and embedded (`synthdistill_jax.
      progress`: a bar on a terminal, log lines in a file).

  Returns:
    A `BenchmarkResult`: accuracy (+std), accuracy without flip, VAL@FAR=1e-3
    (+std), achieved FAR, and the mean raw embedding norm `xnorm` (see
    `mean_embedding_norm`).

  Raises:
    BinFormatError: labels that 10 folds cannot score.
    NonFiniteEmbeddingError: the model gave NaN/Inf embeddings.
  """
  check_bin_folds(vbin)  # Before any image is embedded.
  batches = progress.count_batches(
      verification_bin.iterate_batches(vbin, batch_size),
      total=vbin.num_images,
      desc=f"{vbin.name}: embedding",
      enabled=progress_bar,
  )
  emb, emb_flip = embed(batches)
  check_finite(vbin.name, emb, emb_flip)
  flip = verification.evaluate(
      verification.combine_flip(emb, emb_flip), vbin.issame
  )
  plain = verification.evaluate(
      verification.combine_flip(emb, None), vbin.issame
  )
  metrics = {
      "accuracy": float(np.mean(flip.accuracy)),
      "accuracy_std": float(np.std(flip.accuracy)),
      "accuracy_noflip": float(np.mean(plain.accuracy)),
      "accuracy_noflip_std": float(np.std(plain.accuracy)),
      "val": flip.val,
      "val_std": flip.val_std,
      "far": flip.far,
      "xnorm": mean_embedding_norm(emb, emb_flip),
  }
  return BenchmarkResult(
      vbin.name, "verification", vbin.num_pairs, metrics, flip.fpr, flip.tpr
  )


def far_key(far: float) -> str:
  """Metric name of TAR at a FAR: 1e-4 -> 'tar_far_1e-4'."""
  return f"tar_far_1e{int(round(np.log10(far)))}"


def evaluate_ijb(
    meta: ijb.IJBMeta,
    name: str,
    image_dir: str | os.PathLike,
    embed: Embedder,
    batch_size: int,
    aligned: bool = False,
    warp: str = ijb.DEFAULT_WARP,
    progress_bar: bool = True,
) -> BenchmarkResult:
  """IJB-B/C 1:1 verification (see `synthdistill_jax.ijb`).

  Args:
    meta: from `ijb.read_meta`.
    name: benchmark name ('ijbb', 'ijbc').
    image_dir: folder of the images the meta files name.
    embed: from `create_embedder`.
    batch_size: images per batch.
    aligned: images are aligned 112x112 faces already.
    warp: alignment kernel, 'opencv4' or 'opencv5' (`ijb.warp_affine`).
    progress_bar: show images, templates and pairs as they are done.

  Returns:
    A `BenchmarkResult` with `tar_far_1e-6` ... `tar_far_1e-1`, `auc` and
    the per-pair scores.

  Raises:
    NonFiniteEmbeddingError: the model gave NaN/Inf embeddings.
  """

  def checked(batches):
    emb, emb_flip = embed(batches)
    check_finite(name, emb, emb_flip)
    return emb, emb_flip

  out = ijb.evaluate(
      meta,
      image_dir,
      checked,
      batch_size=batch_size,
      aligned=aligned,
      warp=warp,
      progress_bar=progress_bar,
  )
  metrics = {far_key(f): t for f, t in out["tar_at_far"].items()}
  metrics["auc"] = out["auc"]
  return BenchmarkResult(
      name,
      "ijb",
      len(meta.labels),
      metrics,
      out["fpr"],
      out["tpr"],
      scores=np.asarray(out["scores"], np.float64),
      details={"warp": "none" if aligned else warp, "aligned": aligned},
  )


def default_evals_config() -> ml_collections.ConfigDict:
  """The `config.evals` block: which benchmarks the trainer runs."""
  config = ml_collections.ConfigDict()
  config.bins = ()  # Paths of insightface .bin files ('lfw.bin', ...).
  config.batch_size = 64  # Images per device call.
  config.ijb = ml_collections.ConfigDict()
  config.ijb.meta_dir = ""  # IJB meta folder; '' skips IJB.
  config.ijb.image_dir = ""  # Folder of the images the meta files name.
  config.ijb.name = ""  # 'ijbb' or 'ijbc' (the meta file prefix).
  config.ijb.aligned = False  # Images are aligned 112x112 faces already.
  # Alignment kernel: 'opencv4' = cv2.warpAffine of OpenCV <= 4.x, bit for
  # bit (the published insightface numbers); 'opencv5' = OpenCV 5's float.
  config.ijb.warp = ijb.DEFAULT_WARP
  return config


@dataclasses.dataclass
class _Inputs:
  bins: list[verification_bin.VerificationBin]
  ijb_meta: ijb.IJBMeta | None


def read_inputs(evals_config, progress_bar: bool = False) -> _Inputs:
  """Reads and validates every benchmark file before any model runs.

  Args:
    evals_config: see `default_evals_config`.
    progress_bar: show the images of each `.bin` being checked.

  Returns:
    The validated bins and IJB meta files.

  Raises:
    BinFormatError, IJBFormatError: one-line messages naming the file.
  """
  bins = [
      verification_bin.read_bin(p, progress_bar=progress_bar)
      for p in _bin_paths(evals_config)
  ]
  names = [b.name for b in bins]
  if len(set(names)) != len(names):
    raise ValueError(f"two bins share a name: {names}")
  meta = None
  cfg = evals_config.get("ijb", None)
  if isinstance(cfg, str) and cfg:
    raise ValueError(
        f"evals.ijb must be a ConfigDict (meta_dir, image_dir, name) or '',"
        f" got {cfg!r}"
    )
  if cfg and cfg.get("meta_dir", "") and cfg.get("name", ""):
    warp = cfg.get("warp", ijb.DEFAULT_WARP)
    if warp not in ijb.WARPS:
      raise ValueError(
          f"evals.ijb.warp must be one of {', '.join(ijb.WARPS)}, got"
          f" {warp!r}"
      )
    meta = ijb.read_meta(cfg.meta_dir, cfg.name)
  return _Inputs(bins, meta)


def evaluate_all(
    evals_config,
    module,
    variables,
    inputs: _Inputs | None = None,
    progress_bar: bool = True,
) -> list[BenchmarkResult]:
  """Runs every configured benchmark.

  Args:
    evals_config: see `default_evals_config`.
    module: Flax face model.
    variables: its variables.
    inputs: pre-validated inputs (`read_inputs`); read here when None.
    progress_bar: progress per benchmark (see `synthdistill_jax.progress`).

  Returns:
    One `BenchmarkResult` per benchmark, bins first.
  """
  inputs = inputs or read_inputs(evals_config)
  batch_size = int(evals_config.batch_size)
  embed = create_embedder(module, variables, batch_size)
  results = [
      evaluate_bin(b, embed, batch_size, progress_bar) for b in inputs.bins
  ]
  if inputs.ijb_meta is not None:
    cfg = evals_config.ijb
    results.append(
        evaluate_ijb(
            inputs.ijb_meta,
            cfg.name,
            cfg.image_dir,
            embed,
            batch_size,
            bool(cfg.get("aligned", False)),
            cfg.get("warp", ijb.DEFAULT_WARP),
            progress_bar,
        )
    )
  return results


def flatten_metrics(results: Iterable[BenchmarkResult]) -> dict[str, float]:
  """`{'lfw/accuracy': ..., 'ijbc/tar_far_1e-4': ...}`."""
  return {
      f"{r.name}/{k}": float(v) for r in results for k, v in r.metrics.items()
  }


def run_evaluators(
    evals_config, module, variables, *, output_dir=None, progress_bar=True
) -> dict[str, float]:
  """The trainer's hook: runs the configured benchmarks on a model.

  Args:
    evals_config: `ConfigDict` with `bins`, `batch_size` and `ijb` (see
      `default_evals_config`).
    module: Flax face model (`apply(variables, x, train=False)`).
    variables: its variables.
    output_dir: if given, also write the report and ROC plots there.
    progress_bar: progress per benchmark (the trainer passes its
      `config.progress_bar`).

  Returns:
    Flat metrics such as `{'lfw/accuracy': ..., 'lfw/val': ...}`; empty when
    nothing is configured.
  """
  inputs = read_inputs(evals_config)
  if not inputs.bins and inputs.ijb_meta is None:
    return {}
  results = evaluate_all(evals_config, module, variables, inputs, progress_bar)
  if output_dir is not None:
    write_report(output_dir, results)
  return flatten_metrics(results)


# ----------------------------------------------------------------------------
# Evaluation during training.


def _config_error(message: str) -> Exception:
  # The trainer's error type; imported here so the CLI stays light.
  from synthdistill_jax import frozen  # pylint: disable=g-import-not-at-top

  return frozen.ConfigError(message)


def _bin_paths(evals_config) -> list:
  paths = evals_config.get("bins", None) or []
  if isinstance(paths, str):  # `--config.evals.bins=a.bin,b.bin`
    paths = [p for p in paths.split(",") if p]
  return list(paths)


def check_evals_config(evals_config) -> None:
  """Checks `config.evals` before anything is built (paths only, no reads).

  Args:
    evals_config: see `default_evals_config`.

  Raises:
    frozen.ConfigError: one line naming the field: a bin that is missing or
      a folder, two bins with one name, a batch size below 1, an IJB meta or
      image folder that is missing or a file, an IJB block without a name,
      or IJB fields set while `meta_dir` is empty (IJB would never run).
  """
  names = {}
  for i, path in enumerate(_bin_paths(evals_config)):
    field = f"evals.bins[{i}]={path!r}"
    if not isinstance(path, str) or not path:
      raise _config_error(f"{field}: expected the path of a .bin file")
    if not os.path.exists(path):
      raise _config_error(f"{field}: no such file")
    if not os.path.isfile(path):
      raise _config_error(f"{field}: not a file (an insightface .bin)")
    name = pathlib.Path(path).stem
    if name in names:
      raise _config_error(
          f"{field}: same benchmark name {name!r} as evals.bins[{names[name]}]"
      )
    names[name] = i
  batch_size = evals_config.get("batch_size", 64)
  if isinstance(batch_size, bool) or not isinstance(batch_size, int):
    raise _config_error(f"evals.batch_size={batch_size!r}: not an integer")
  if batch_size < 1:
    raise _config_error(f"evals.batch_size={batch_size}: must be at least 1")
  cfg = evals_config.get("ijb", None)
  if isinstance(cfg, str):
    if cfg:
      raise _config_error(
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
        raise _config_error(
            f"evals.ijb.{key}={cfg.get(key)!r} is set but evals.ijb.meta_dir"
            " is empty, so IJB would never run; set meta_dir"
        )
    return
  for key in ("meta_dir", "image_dir"):
    value = cfg.get(key, "")
    if not value:
      raise _config_error(f"evals.ijb.{key} is empty; give the IJB folder")
    if not os.path.isdir(value):
      what = "not a folder" if os.path.exists(value) else "no such folder"
      raise _config_error(f"evals.ijb.{key}={value!r}: {what}")
  if not cfg.get("name", ""):
    raise _config_error(
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
  return bool(_bin_paths(evals_config)) or has_ijb


class TrainingEvaluator:
  """The configured benchmarks, built once for a training run.

  Every input is read and validated at construction; the embedding program
  is jitted once on the training mesh and reused for every call. Works with
  several processes (every process must call it, with the same variables).

  Attributes:
    enabled: whether any benchmark is configured; when False, calls return
      `{}` without running anything.
    embedder: the `BatchEmbedder` (its `num_traces` counts compilations).
  """

  def __init__(self, evals_config, module, mesh: jax.sharding.Mesh):
    check_evals_config(evals_config)
    self._config = evals_config
    self.enabled = is_configured(evals_config)
    self._inputs = _Inputs([], None)
    self.embedder = None
    if not self.enabled:
      return
    try:
      self._inputs = read_inputs(evals_config)
      for vbin in self._inputs.bins:
        check_bin_folds(vbin)
    except (verification_bin.BinFormatError, ijb.IJBFormatError) as e:
      raise _config_error(f"evals: {e}") from None
    self._mesh = mesh
    self.embedder = BatchEmbedder(module, mesh, int(evals_config.batch_size))

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
    variables = _put_replicated(self._mesh, variables)
    embed = functools.partial(self.embedder, variables)
    batch_size = int(self._config.batch_size)
    jobs = [
        (b.name, functools.partial(evaluate_bin, b, embed, batch_size))
        for b in self._inputs.bins
    ]
    if self._inputs.ijb_meta is not None:
      cfg = self._config.ijb
      jobs.append(
          (
              cfg.name,
              functools.partial(
                  evaluate_ijb,
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
        metrics.update(flatten_metrics([job()]))
      except NonFiniteEmbeddingError as e:
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
    evals_config: `config.evals` (see `default_evals_config`).
    student_module: the student's Flax module.
    mesh: the training mesh (every process's devices).

  Returns:
    A `TrainingEvaluator`.

  Raises:
    frozen.ConfigError: one line naming the field (see
      `check_evals_config`), or a malformed bin or IJB meta file.
  """
  return TrainingEvaluator(evals_config, student_module, mesh)


# ----------------------------------------------------------------------------
# Reports.


def _percent(x: float) -> str:
  return f"{100.0 * x:.2f}"


def format_markdown(results: list[BenchmarkResult], title: str) -> str:
  """Markdown tables: one for the verification bins, one for IJB."""
  lines = [f"# {title}", ""]
  bins = [r for r in results if r.kind == "verification"]
  ijbs = [r for r in results if r.kind == "ijb"]
  if bins:
    lines += [
        "| benchmark | pairs | accuracy (%) | std | no flip (%) |"
        " VAL@FAR=1e-3 (%) | FAR (%) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in bins:
      m = r.metrics
      lines.append(
          f"| {r.name} | {r.size} | {_percent(m['accuracy'])} |"
          f" {_percent(m['accuracy_std'])} |"
          f" {_percent(m['accuracy_noflip'])} |"
          f" {_percent(m['val'])} +- {_percent(m['val_std'])} |"
          f" {_percent(m['far'])} |"
      )
    lines.append("")
  if ijbs:
    fars = ijb.FAR_TARGETS
    lines += [
        "| benchmark | pairs | "
        + " | ".join(f"TAR@FAR={f:.0e} (%)" for f in fars)
        + " |",
        "|---|---|" + "---|" * len(fars),
    ]
    for r in ijbs:
      cells = " | ".join(_percent(r.metrics[far_key(f)]) for f in fars)
      lines.append(f"| {r.name} | {r.size} | {cells} |")
    lines.append("")
  return "\n".join(lines)


def plot_roc(path: pathlib.Path, result: BenchmarkResult) -> None:
  """Writes the ROC curve of one benchmark as a PNG (Agg backend)."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
  if result.kind == "ijb":
    # The interesting FARs span 1e-6..1e-1: log axis, zero FAR left out.
    keep = result.fpr > 0
    ax.semilogx(result.fpr[keep], result.tpr[keep])
    label = f"TAR@FAR=1e-4: {_percent(result.metrics[far_key(1e-4)])}%"
  else:
    ax.plot(result.fpr, result.tpr)
    label = f"accuracy: {_percent(result.metrics['accuracy'])}%"
  ax.set(
      xlabel="false positive rate",
      ylabel="true positive rate",
      title=f"{result.name} ({label})",
  )
  ax.grid(True, alpha=0.3)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def scores_file_name(name: str) -> str:
  """File of a benchmark's per-pair scores next to `report.json`."""
  return f"scores_{name}.npy"


def write_report(
    output_dir: str | os.PathLike,
    results: list[BenchmarkResult],
    title: str = "Evaluation",
    extra: dict[str, Any] | None = None,
) -> pathlib.Path:
  """Writes `report.md`, `report.json` and `roc_<name>.png` per benchmark.

  Benchmarks with per-pair scores (IJB) also get `scores_<name>.npy`: a
  float64 [P] array in the pair file's row order (what upstream's
  `eval_ijbc.py` saves as `<job>/ijbc.npy`), named in `report.json` under
  `scores_file`.

  Args:
    output_dir: folder to write into (created).
    results: from `evaluate_all`.
    title: Markdown title (e.g. the model folder).
    extra: more JSON fields (the model, the command line, ...).

  Returns:
    The folder.
  """
  out = pathlib.Path(output_dir)
  out.mkdir(parents=True, exist_ok=True)
  for r in results:
    plot_roc(out / f"roc_{r.name}.png", r)
  report = dict(extra or {})
  report["benchmarks"] = {}
  for r in results:
    entry = {"kind": r.kind, "pairs": r.size, **r.metrics, **r.details}
    if r.scores is not None:
      entry["scores_file"] = scores_file_name(r.name)
      np.save(out / entry["scores_file"], np.asarray(r.scores, np.float64))
    report["benchmarks"][r.name] = entry
  (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
  (out / "report.md").write_text(format_markdown(results, title))
  return out


# ----------------------------------------------------------------------------
# Command line.

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the CLI flags.

  Only called when this module runs as a program, so that importing it (the
  trainer does) cannot clash with the trainer's own flags such as --workdir.
  """
  flags.DEFINE_string("model", None, "Model folder (or a .pth with --arch).")
  flags.DEFINE_string("workdir", None, "Training workdir: evaluates W/student.")
  flags.DEFINE_string("arch", None, "Architecture of a .pth given to --model.")
  flags.DEFINE_list("bins", [], "Comma-separated insightface .bin files.")
  flags.DEFINE_string("ijb_meta_dir", "", "IJB meta folder ('' skips IJB).")
  flags.DEFINE_string("ijb_image_dir", "", "IJB image folder (loose crops).")
  flags.DEFINE_string("ijb_name", "ijbc", "IJB meta prefix: ijbb or ijbc.")
  flags.DEFINE_bool("ijb_aligned", False, "IJB images are aligned 112x112.")
  flags.DEFINE_enum(
      "ijb_warp",
      ijb.DEFAULT_WARP,
      list(ijb.WARPS),
      "IJB alignment: cv2.warpAffine of OpenCV 4 (bit for bit, as the"
      " published numbers) or OpenCV 5 (float kernel).",
  )
  flags.DEFINE_integer("batch_size", 64, "Images per device call.")
  flags.DEFINE_string("output", None, "Report folder (default MODEL/eval).")
  progress.define_flag()


def _resolve_paths() -> tuple[pathlib.Path, pathlib.Path]:
  if bool(FLAGS.model) == bool(FLAGS.workdir):
    raise ValueError("give exactly one of --model and --workdir")
  if FLAGS.workdir:
    model = pathlib.Path(FLAGS.workdir) / "student"
    default_out = pathlib.Path(FLAGS.workdir) / "eval"
  else:
    model = pathlib.Path(FLAGS.model)
    default_out = (model.parent if model.is_file() else model) / "eval"
  if not model.exists():
    raise FileNotFoundError(f"{model}: no such model folder or file")
  output = pathlib.Path(FLAGS.output) if FLAGS.output else default_out
  _check_output(output)
  return model, output


def _check_output(output: pathlib.Path) -> None:
  """The report folder must be creatable: checked before any work."""
  if output.exists() and not output.is_dir():
    raise FileExistsError(f"--output {output}: exists and is not a folder")
  parent = output
  while not parent.exists():
    parent = parent.parent
  if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
    raise PermissionError(f"--output {output}: {parent} is not writable")


def _check_flags() -> None:
  if FLAGS.batch_size < 1:
    raise ValueError(f"--batch_size={FLAGS.batch_size}: must be at least 1")
  if FLAGS.ijb_meta_dir:
    for flag in ("ijb_meta_dir", "ijb_image_dir"):
      value = FLAGS[flag].value
      if not value or not os.path.isdir(value):
        raise FileNotFoundError(f"--{flag}={value!r}: no such folder")
    if not FLAGS.ijb_name:
      raise ValueError("--ijb_name is empty; give ijbb or ijbc")


def load_model(path: pathlib.Path, arch: str | None):
  """A face model folder, or a PyTorch `.pth` converted on the fly (`--arch`).

  Args:
    path: a model folder, or a state-dict file.
    arch: the architecture of a state-dict file.

  Returns:
    `(module, variables)`.

  Raises:
    ValueError, OSError, UnsafePickleError, ImportError: one line each (a
      StyleGAN2 folder, a hostile or corrupt file, a shape mismatch, ...).
  """
  if path.is_file():
    if not arch:
      raise ValueError(f"{path}: a checkpoint file needs --arch")
    from synthdistill_jax import convert  # pylint: disable=g-import-not-at-top

    return convert.load_face_model(str(path), arch)
  from synthdistill_jax import models  # pylint: disable=g-import-not-at-top

  config = models.registry.read_config(path)
  if config["arch"] == "stylegan2":
    raise ValueError(
        f"{path}: holds a StyleGAN2 generator, not a face recognition model"
    )
  return models.load(path)


def _evals_config_from_flags() -> ml_collections.ConfigDict:
  config = default_evals_config()
  config.bins = list(FLAGS.bins)
  config.batch_size = FLAGS.batch_size
  config.ijb.meta_dir = FLAGS.ijb_meta_dir
  config.ijb.image_dir = FLAGS.ijb_image_dir
  config.ijb.name = FLAGS.ijb_name if FLAGS.ijb_meta_dir else ""
  config.ijb.aligned = FLAGS.ijb_aligned
  config.ijb.warp = FLAGS.ijb_warp
  return config


# Mistakes in what the user gave (flags, files, models): one line, status 2.
# UnsafePickleError is a pickle.UnpicklingError, not a ValueError.
_USER_ERRORS = (
    verification_bin.BinFormatError,
    ijb.IJBFormatError,
    safe_pickle.UnsafePickleError,
    OSError,
    ImportError,
    ValueError,
)
# Problems found while evaluating that come from the data or the model.
_RUN_ERRORS = (
    NonFiniteEmbeddingError,
    verification_bin.BinFormatError,
    ijb.IJBFormatError,
)
USAGE_STATUS = 2


def _fail(error: BaseException) -> None:
  message = " ".join(str(error).split())  # Always exactly one line.
  print(f"error: {message}", file=sys.stderr)
  sys.exit(USAGE_STATUS)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with a flag mistake as one line and status 2."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    _fail(e)


def main(argv: list[str]) -> None:
  """Validates every input, loads the model, evaluates, writes the report."""
  # Bad input (files, flags, model folder) is one line on stderr and status
  # 2, before anything runs; errors after this point are bugs and keep
  # their traceback, except what the data or the model cause (NaN
  # embeddings, an unreadable IJB image).
  if not FLAGS["verbosity"].present:
    # orbax logs every restore at INFO; an error must stay one line.
    logging.set_verbosity(logging.WARNING)
  try:
    if len(argv) > 1:
      raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
    _check_flags()
    model_path, output = _resolve_paths()
    config = _evals_config_from_flags()
    inputs = read_inputs(config, progress_bar=FLAGS.progress)
    if not inputs.bins and inputs.ijb_meta is None:
      raise ValueError("nothing to evaluate: give --bins and/or --ijb_meta_dir")
    module, variables = load_model(model_path, FLAGS.arch)
  except _USER_ERRORS as e:
    _fail(e)
  try:
    results = evaluate_all(
        config, module, variables, inputs, progress_bar=FLAGS.progress
    )
  except _RUN_ERRORS as e:
    _fail(e)
  write_report(
      output,
      results,
      title=f"Evaluation of {model_path}",
      extra={"model": str(model_path.absolute()), "argv": sys.argv[1:]},
  )
  print((output / "report.md").read_text())
  print(f"report written to {output}")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)
