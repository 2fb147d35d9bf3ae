r"""Face-recognition evaluation: verification bins, IJB-B/C, reports, CLI.

Any face model folder works: a trained student, a converted teacher, or any
converted checkpoint (see `synthdistill_jax.models.load`); a PyTorch `.pth`
with `--arch` is converted on the fly (needs the `convert` extra).

  python -m synthdistill_jax.evaluate --model DIR \
      --bins lfw.bin,cfp_fp.bin,agedb_30.bin [--output DIR/eval]
  python -m synthdistill_jax.evaluate --workdir WORKDIR --bins ...   # WORKDIR/student
  python -m synthdistill_jax.evaluate --model DIR --ijb_meta_dir IJBC/meta \
      --ijb_image_dir IJBC/loose_crop --ijb_name ijbc

Writes `report.md`, `report.json` and `roc_<benchmark>.png`. Every input is
validated before the model is loaded; a bad input prints one line naming the
file and exits with status 2.

Images are normalised `(x / 255 - 0.5) / 0.5` for every network, as
insightface's evaluation does; each image and its horizontal flip are
embedded in one jitted call of a fixed batch size (the last batch is padded),
sharded over all devices on a 1-D 'data' mesh.
"""

import dataclasses
import json
import os
import pathlib
import sys
from typing import Any, Callable, Iterable, Iterator

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from synthdistill_jax import ijb
from synthdistill_jax import progress
from synthdistill_jax import verification
from synthdistill_jax.data import verification_bin

Embedder = Callable[[Iterable[np.ndarray]], tuple[np.ndarray, np.ndarray]]


# ----------------------------------------------------------------------------
# Embedding.


def normalize_images(images: jax.Array) -> jax.Array:
  """uint8 NHWC -> float32 `(x / 255 - 0.5) / 0.5` (insightface eval)."""
  return (images.astype(jnp.float32) / 255.0 - 0.5) / 0.5


def create_embedder(module, variables, batch_size: int = 64) -> Embedder:
  """Builds `embed(batches) -> (emb, emb_flip)` for a Flax face model.

  Args:
    module: Flax module, `module.apply(variables, x, train=False) -> [B, D]`.
    variables: its variables.
    batch_size: images per device call; rounded up to a multiple of the
      device count. Every call has this size (no recompiles).

  Returns:
    A function mapping an iterable of uint8 [b, 112, 112, 3] batches to the
    float32 embeddings of the images and of their horizontal flips.
  """
  devices = jax.devices()
  size = -(-batch_size // len(devices)) * len(devices)
  mesh = jax.make_mesh((len(devices),), ("data",), devices=devices)
  data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  variables = jax.device_put(variables, replicated)

  @jax.jit
  def embed_batch(variables, images):
    x = normalize_images(images)
    both = jnp.concatenate([x, x[:, :, ::-1, :]], axis=0)
    out = module.apply(variables, both, train=False).astype(jnp.float32)
    return out[:size], out[size:]

  def embed(batches: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    outputs, counts = [], []
    for batch in batches:
      for start in range(0, len(batch), size):
        chunk = np.asarray(batch[start : start + size], np.uint8)
        padded = np.zeros((size,) + chunk.shape[1:], np.uint8)
        padded[: len(chunk)] = chunk
        # Dispatch is asynchronous: decoding the next batch overlaps this.
        outputs.append(embed_batch(variables, jax.device_put(padded, data)))
        counts.append(len(chunk))
    if not outputs:
      raise ValueError("nothing to embed")
    emb = np.concatenate(
        [np.asarray(o[0])[:n] for o, n in zip(outputs, counts)]
    )
    flip = np.concatenate(
        [np.asarray(o[1])[:n] for o, n in zip(outputs, counts)]
    )
    return emb, flip

  return embed


# ----------------------------------------------------------------------------
# Evaluators.


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
  """

  name: str
  kind: str
  size: int
  metrics: dict[str, float]
  fpr: np.ndarray
  tpr: np.ndarray


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
    (+std), achieved FAR, and the mean raw embedding norm `xnorm`.
  """
  batches = progress.count_batches(
      verification_bin.iterate_batches(vbin, batch_size),
      total=vbin.num_images,
      desc=f"{vbin.name}: embedding",
      enabled=progress_bar,
  )
  emb, emb_flip = embed(batches)
  flip = verification.evaluate(
      verification.combine_flip(emb, emb_flip), vbin.issame
  )
  plain = verification.evaluate(
      verification.combine_flip(emb, None), vbin.issame
  )
  norms = np.linalg.norm(np.concatenate([emb, emb_flip]).astype(np.float64), 1)
  metrics = {
      "accuracy": float(np.mean(flip.accuracy)),
      "accuracy_std": float(np.std(flip.accuracy)),
      "accuracy_noflip": float(np.mean(plain.accuracy)),
      "accuracy_noflip_std": float(np.std(plain.accuracy)),
      "val": flip.val,
      "val_std": flip.val_std,
      "far": flip.far,
      "xnorm": float(np.mean(norms)),
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
    progress_bar: show images, templates and pairs as they are done.

  Returns:
    A `BenchmarkResult` with `tar_far_1e-6` ... `tar_far_1e-1` and `auc`.
  """
  out = ijb.evaluate(
      meta,
      image_dir,
      embed,
      batch_size=batch_size,
      aligned=aligned,
      progress_bar=progress_bar,
  )
  metrics = {far_key(f): t for f, t in out["tar_at_far"].items()}
  metrics["auc"] = out["auc"]
  return BenchmarkResult(
      name, "ijb", len(meta.labels), metrics, out["fpr"], out["tpr"]
  )


def default_evals_config() -> ml_collections.ConfigDict:
  """The `config.evals` block: which benchmarks the trainer runs."""
  config = ml_collections.ConfigDict()
  config.bins = []  # Paths of insightface .bin files ('lfw.bin', ...).
  config.batch_size = 64  # Images per device call.
  config.ijb = ml_collections.ConfigDict()
  config.ijb.meta_dir = ""  # IJB meta folder; '' skips IJB.
  config.ijb.image_dir = ""  # Folder of the images the meta files name.
  config.ijb.name = ""  # 'ijbb' or 'ijbc' (the meta file prefix).
  config.ijb.aligned = False  # Images are aligned 112x112 faces already.
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
  paths = evals_config.bins
  if isinstance(paths, str):  # `--config.evals.bins=a.bin,b.bin`
    paths = [p for p in paths.split(",") if p]
  bins = [
      verification_bin.read_bin(p, progress_bar=progress_bar) for p in paths
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


def write_report(
    output_dir: str | os.PathLike,
    results: list[BenchmarkResult],
    title: str = "Evaluation",
    extra: dict[str, Any] | None = None,
) -> pathlib.Path:
  """Writes `report.md`, `report.json` and `roc_<name>.png` per benchmark.

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
  report["benchmarks"] = {
      r.name: {"kind": r.kind, "pairs": r.size, **r.metrics} for r in results
  }
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
  return model, pathlib.Path(FLAGS.output) if FLAGS.output else default_out


def load_model(path: pathlib.Path, arch: str | None):
  """A model folder, or a PyTorch `.pth` converted on the fly (`--arch`)."""
  if path.is_file():
    if not arch:
      raise ValueError(f"{path}: a checkpoint file needs --arch")
    from synthdistill_jax import convert  # pylint: disable=g-import-not-at-top

    return convert.load_face_model(str(path), arch)
  from synthdistill_jax import models  # pylint: disable=g-import-not-at-top

  return models.load(path)


def _evals_config_from_flags() -> ml_collections.ConfigDict:
  config = default_evals_config()
  config.bins = list(FLAGS.bins)
  config.batch_size = FLAGS.batch_size
  config.ijb.meta_dir = FLAGS.ijb_meta_dir
  config.ijb.image_dir = FLAGS.ijb_image_dir
  config.ijb.name = FLAGS.ijb_name if FLAGS.ijb_meta_dir else ""
  config.ijb.aligned = FLAGS.ijb_aligned
  return config


_USER_ERRORS = (
    verification_bin.BinFormatError,
    ijb.IJBFormatError,
    FileNotFoundError,
    FileExistsError,
    ValueError,
)


def main(argv: list[str]) -> None:
  """Validates every input, loads the model, evaluates, writes the report."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Bad input (files, flags, model folder) is one line on stderr and status
  # 2, before anything runs; errors after this point are bugs and keep
  # their traceback.
  try:
    model_path, output = _resolve_paths()
    config = _evals_config_from_flags()
    inputs = read_inputs(config, progress_bar=FLAGS.progress)
    if not inputs.bins and inputs.ijb_meta is None:
      raise ValueError("nothing to evaluate: give --bins and/or --ijb_meta_dir")
    module, variables = load_model(model_path, FLAGS.arch)
  except _USER_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  results = evaluate_all(
      config, module, variables, inputs, progress_bar=FLAGS.progress
  )
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
  app.run(main)
