"""Reports of an evaluation: `report.md`, `report.json`, ROC PNGs, scores."""

import json
import os
import pathlib
from typing import Any

import numpy as np

from synthdistill_jax.evaluation import ijb
from synthdistill_jax.evaluation import outcome


def _percent(x: float) -> str:
  return f"{100.0 * x:.2f}"


def format_markdown(results: list[outcome.BenchmarkResult], title: str) -> str:
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
      cells = " | ".join(_percent(r.metrics[outcome.far_key(f)]) for f in fars)
      lines.append(f"| {r.name} | {r.size} | {cells} |")
    lines.append("")
  return "\n".join(lines)


def plot_roc(path: pathlib.Path, result: outcome.BenchmarkResult) -> None:
  """Writes the ROC curve of one benchmark as a PNG (Agg backend)."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
  if result.kind == "ijb":
    # The interesting FARs span 1e-6..1e-1: log axis, zero FAR left out.
    keep = result.fpr > 0
    ax.semilogx(result.fpr[keep], result.tpr[keep])
    label = f"TAR@FAR=1e-4: {_percent(result.metrics[outcome.far_key(1e-4)])}%"
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
    results: list[outcome.BenchmarkResult],
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
    results: from `benchmarks.evaluate_all`.
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
