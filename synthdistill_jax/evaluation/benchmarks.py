"""Runs the benchmarks: verification `.bin` sets and IJB-B/C 1:1.

Inputs are read and validated first (`read_inputs`), then each benchmark is
embedded and scored; NaN/Inf embeddings are an error, never an accuracy.
"""

import dataclasses
import os
from typing import Iterable

import numpy as np

from synthdistill_jax import errors
from synthdistill_jax import progress
from synthdistill_jax.data import verification_bin
from synthdistill_jax.evaluation import embedding
from synthdistill_jax.evaluation import ijb
from synthdistill_jax.evaluation import outcome
from synthdistill_jax.evaluation import reports
from synthdistill_jax.evaluation import settings
from synthdistill_jax.evaluation import verification


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
    embed: embedding.Embedder,
    batch_size: int,
    progress_bar: bool = True,
) -> outcome.BenchmarkResult:
  """The insightface 10-fold protocol on one `.bin`, with and without flip.

  Args:
    vbin: a validated set from `verification_bin.read_bin`.
    embed: from `embedding.create_embedder`.
    batch_size: images decoded per batch.
    progress_bar: show the images decoded and embedded (`synthdistill_jax.
      progress`: a bar on a terminal, log lines in a file).

  Returns:
    A `outcome.BenchmarkResult`: accuracy (+std), accuracy without flip, VAL@FAR=1e-3
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
  return outcome.BenchmarkResult(
      vbin.name, "verification", vbin.num_pairs, metrics, flip.fpr, flip.tpr
  )


def evaluate_ijb(
    meta: ijb.IJBMeta,
    name: str,
    image_dir: str | os.PathLike,
    embed: embedding.Embedder,
    batch_size: int,
    aligned: bool = False,
    warp: str = ijb.DEFAULT_WARP,
    progress_bar: bool = True,
) -> outcome.BenchmarkResult:
  """IJB-B/C 1:1 verification (see `synthdistill_jax.ijb`).

  Args:
    meta: from `ijb.read_meta`.
    name: benchmark name ('ijbb', 'ijbc').
    image_dir: folder of the images the meta files name.
    embed: from `embedding.create_embedder`.
    batch_size: images per batch.
    aligned: images are aligned 112x112 faces already.
    warp: alignment kernel, 'opencv4' or 'opencv5' (`ijb.warp_affine`).
    progress_bar: show images, templates and pairs as they are done.

  Returns:
    A `outcome.BenchmarkResult` with `tar_far_1e-6` ... `tar_far_1e-1`, `auc` and
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
  metrics = {outcome.far_key(f): t for f, t in out["tar_at_far"].items()}
  metrics["auc"] = out["auc"]
  return outcome.BenchmarkResult(
      name,
      "ijb",
      len(meta.labels),
      metrics,
      out["fpr"],
      out["tpr"],
      scores=np.asarray(out["scores"], np.float64),
      details={"warp": "none" if aligned else warp, "aligned": aligned},
  )


@dataclasses.dataclass
class Inputs:
  bins: list[verification_bin.VerificationBin]
  ijb_meta: ijb.IJBMeta | None


def read_inputs(evals_config, progress_bar: bool = False) -> Inputs:
  """Reads and validates every benchmark file before any model runs.

  Args:
    evals_config: see `settings.default_evals_config`.
    progress_bar: show the images of each `.bin` being checked.

  Returns:
    The validated bins and IJB meta files.

  Raises:
    BinFormatError, IJBFormatError: one-line messages naming the file.
  """
  bins = [
      verification_bin.read_bin(p, progress_bar=progress_bar)
      for p in settings.bin_paths(evals_config)
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
    errors.check_choice(
        cfg.get("warp", ijb.DEFAULT_WARP), ijb.WARPS, "evals.ijb.warp"
    )
    meta = ijb.read_meta(cfg.meta_dir, cfg.name)
  return Inputs(bins, meta)


def evaluate_all(
    evals_config,
    module,
    variables,
    inputs: Inputs | None = None,
    progress_bar: bool = True,
) -> list[outcome.BenchmarkResult]:
  """Runs every configured benchmark.

  Args:
    evals_config: see `settings.default_evals_config`.
    module: Flax face model.
    variables: its variables.
    inputs: pre-validated inputs (`read_inputs`); read here when None.
    progress_bar: progress per benchmark (see `synthdistill_jax.progress`).

  Returns:
    One `outcome.BenchmarkResult` per benchmark, bins first.
  """
  inputs = inputs or read_inputs(evals_config)
  batch_size = int(evals_config.batch_size)
  embed = embedding.create_embedder(module, variables, batch_size)
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


def flatten_metrics(
    results: Iterable[outcome.BenchmarkResult],
) -> dict[str, float]:
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
      `settings.default_evals_config`).
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
    reports.write_report(output_dir, results)
  return flatten_metrics(results)
