"""The run report: `WORKDIR/report.md` and `WORKDIR/curves.png`.

The trainer rewrites both after every epoch and at the end of the run, from
`WORKDIR/metrics.jsonl` alone (so `write_run_report` also works on a
finished or running workdir from another process):

  from synthdistill_jax import report
  report.write_run_report(workdir, config, {"step": 312})

`report.md` says what was trained (config name, the fields that differ from
`defaults.base_config()`, where the frozen networks came from), on what (device
and process count), how far (iteration reached of the total), how fast
(images/s) and how good (held-out MSE / cosine / R^2 per validation, the
benchmark accuracies per epoch), and where the outputs are. `curves.png`
plots the training loss, the held-out metrics, the benchmark accuracies and
images/s against iterations. Both files are written to a temporary name in
the workdir and renamed over the old one: a reader never sees half a file.
Only process 0 writes.
"""

import datetime
import hashlib
import io
import json
import math
import os
from typing import Any

from etils import epath
import jax
import numpy as np

from synthdistill_jax import defaults

# (split, metric) pairs plotted, with their panel and label.
TRAIN_LOSS = ("train", "loss")
HELD_OUT = (("val", "mse"), ("val", "cosine"), ("val", "r2"))
IMAGES_PER_SEC = ("train", "images_per_sec")
# Benchmark metrics plotted per epoch (verification bins, IJB).
EVAL_SUFFIXES = ("/accuracy", "/tar_far_1e-4")
UNSET = "(unset)"  # A field the base config (or the run's config) lacks.
REPORT_MD = "report.md"
CURVES_PNG = "curves.png"
MAX_PANELS_PER_ROW = 3

# curves.png path -> (digest of what it shows, curves drawn): the trainer's
# final report follows the last epoch's with the same metrics, and drawing
# costs 1.3 s of a 2-core host; an unchanged figure is not drawn again.
_DRAWN: dict[str, tuple[str, dict]] = {}


def read_records(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of `WORKDIR/metrics.jsonl` (empty if there is none).

  Args:
    workdir: the training workdir (local or any `etils.epath` path).

  Returns:
    One dict per line; non-finite values (stored as null) become NaN. A
    line that is not a JSON record with a step and a split (a damaged file)
    is left out, as the trainer leaves it out when it resumes
    (`metrics_io.MetricWriter`).
  """
  path = epath.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  records = []
  for line in path.read_text().splitlines():
    try:
      record = json.loads(line)
    except ValueError:
      continue
    if isinstance(record, dict) and {"step", "split"} <= record.keys():
      records.append(
          {k: math.nan if v is None else v for k, v in record.items()}
      )
  return records


def collect_series(records: list[dict[str, Any]]) -> dict[str, tuple]:
  """Every curve of the report as `{'split/metric': (steps, values)}`.

  Args:
    records: from `read_records`, in file order.

  Returns:
    For each split and numeric metric, the iterations and values in file
    order (a resumed run may log a step twice; both points are kept).
  """
  series: dict[str, tuple[list, list]] = {}
  for record in records:
    for name, value in record.items():
      if name in ("step", "split") or not isinstance(value, (int, float)):
        continue
      steps, values = series.setdefault(f"{record['split']}/{name}", ([], []))
      steps.append(int(record["step"]))
      values.append(float(value))
  return {
      k: (np.asarray(s, np.int64), np.asarray(v, np.float64))
      for k, (s, v) in series.items()
  }


def _eval_names(series: dict[str, tuple]) -> list[str]:
  return sorted(
      k for k in series if k.startswith("evals/") and k.endswith(EVAL_SUFFIXES)
  )


def plot_curves(series: dict[str, tuple], steps_per_epoch: int):
  """Draws the report's figure.

  Args:
    series: from `collect_series`.
    steps_per_epoch: iterations per epoch (the benchmark panel's x axis is
      in epochs).

  Returns:
    `(figure, plotted)`: a matplotlib `Figure` and, read back from its
    lines, `{'split/metric': (x, y)}` of every curve drawn (x in epochs for
    benchmark metrics, in iterations otherwise).
  """
  from matplotlib import figure as mpl_figure  # pylint: disable=g-import-not-at-top
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top

  panels = [
      ("training loss", [TRAIN_LOSS], "iteration"),
      ("held-out MSE", [HELD_OUT[0]], "iteration"),
      ("held-out cosine and R$^2$", list(HELD_OUT[1:]), "iteration"),
      ("images/s (mean since the loop started)", [IMAGES_PER_SEC], "iteration"),
  ]
  evals = _eval_names(series)
  if evals:
    panels.insert(
        3, ("benchmarks", [tuple(k.split("/", 1)) for k in evals], "epoch")
    )
  cols = min(MAX_PANELS_PER_ROW, -(-len(panels) // 2))
  rows = -(-len(panels) // cols)
  fig = mpl_figure.Figure(figsize=(4.2 * cols, 3.4 * rows), dpi=100)
  axes = fig.subplots(rows, cols, squeeze=False).ravel()
  for ax in axes[len(panels) :]:
    ax.set_axis_off()
  plotted = {}
  for ax, (title, keys, xlabel) in zip(axes, panels):
    for split, metric in keys:
      name = f"{split}/{metric}"
      if name not in series:
        continue
      steps, values = series[name]
      x = steps / max(steps_per_epoch, 1) if xlabel == "epoch" else steps
      (line,) = ax.plot(
          x,
          values,
          marker="o" if len(x) < 30 else None,
          markersize=3,
          label=metric,
      )
      xy = line.get_xydata()
      plotted[name] = (xy[:, 0], xy[:, 1])
    if ax.lines and (len(keys) > 1 or xlabel == "epoch"):
      ax.legend(fontsize=7)
    ax.set(title=title, xlabel=xlabel)
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    if not ax.lines:
      ax.text(
          0.5,
          0.5,
          "no data yet",
          ha="center",
          va="center",
          transform=ax.transAxes,
      )
  if "train/loss" in plotted:
    loss = plotted["train/loss"][1]
    if np.all(loss[np.isfinite(loss)] > 0):
      axes[0].set_yscale("log")
  fig.tight_layout()
  return fig, plotted


# ----------------------------------------------------------------------------
# What was trained.


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  items = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      # An empty block (e.g. default kwargs) is the same as an absent one.
      items.update(_flatten(value, f"{prefix}{key}."))
    else:
      items[prefix + key] = value
  return items


def _base_config():
  """The base config every experiment starts from (`defaults.base_config`)."""
  return defaults.base_config()


def config_changes(config) -> list[tuple[str, Any, Any]]:
  """Fields that differ from `defaults.base_config()`.

  Args:
    config: the run's `ConfigDict`.

  Returns:
    `(dotted name, value, default)` sorted by name, `UNSET` for a field one
    side lacks; every field when the base config cannot be imported.
  """
  base = _base_config()
  ours = _flatten(config.to_dict())
  defaults = _flatten(base.to_dict()) if base is not None else {}
  missing = object()
  changes = []
  for name in sorted(set(ours) | set(defaults)):
    value, default = ours.get(name, missing), defaults.get(name, missing)
    if _same(value, default):
      continue
    changes.append(
        (
            name,
            UNSET if value is missing else value,
            UNSET if default is missing else default,
        )
    )
  return changes


def _same(a, b) -> bool:
  # Tuples and lists of equal items are the same setting.
  if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
    return list(a) == list(b)
  return a == b


def frozen_sources(config) -> list[tuple[str, str]]:
  """Where each network came from: a checkpoint folder or 'random ...'.

  Args:
    config: the run's `ConfigDict`.

  Returns:
    `(network, source)` rows for the generator, teacher and student.
  """
  gen, teacher, student = config.generator, config.teacher, config.student
  if config.sampler.kind == "static":
    unused = f"not used: faces and targets from {config.sampler.static_dataset}"
    rows = [("generator", unused), ("teacher", unused)]
  else:
    rows = [
        (
            "generator",
            gen.checkpoint
            or f"random (init_seed {gen.init_seed}, {dict(gen.random)})",
        ),
        (
            "teacher",
            teacher.checkpoint
            or f"random {teacher.arch} (init_seed {teacher.init_seed},"
            f" BN statistics from {teacher.calibrate_batches} generated"
            " batches)",
        ),
    ]
  init = (
      f"initialised from {student.init_checkpoint}"
      if student.init_checkpoint
      else f"random init (seed {config.seed})"
  )
  rows.append(("student", f"{student.arch}, {init}"))
  return rows


# ----------------------------------------------------------------------------
# The Markdown.


def _fmt(value) -> str:
  if isinstance(value, float):
    return "nan" if math.isnan(value) else f"{value:.4g}"
  return str(value)


def _cell(value) -> str:
  return UNSET if isinstance(value, str) and value == UNSET else f"`{value!r}`"


def _last(series: dict[str, tuple], name: str):
  return (
      series[name][1][-1] if name in series and len(series[name][1]) else None
  )


def _metric_table(series, names, steps_per_epoch) -> list[str]:
  """Rows `| iteration | epoch | metric... |` for metrics logged together."""
  steps = sorted({int(s) for n in names for s in series[n][0]})
  lines = [
      "| iteration | epoch | " + " | ".join(names) + " |",
      "|---|---|" + "---|" * len(names),
  ]
  for step in steps:
    cells = []
    for n in names:
      hits = series[n][1][series[n][0] == step]
      cells.append(_fmt(float(hits[-1])) if len(hits) else "")
    epoch = step / max(steps_per_epoch, 1)
    lines.append(f"| {step} | {epoch:g} | " + " | ".join(cells) + " |")
  return lines + [""]


def _sources(config) -> str:
  """Where the frozen networks come from, read off the config."""
  parts = []
  for name in ("generator", "teacher"):
    directory = config[name].get("checkpoint")
    parts.append(f"{name} {directory or 'random'}")
  return ", ".join(parts)


def format_report(config, series, info: dict[str, Any], workdir) -> str:
  """The text of `report.md`.

  Args:
    config: the run's `ConfigDict`.
    series: from `collect_series`.
    info: `step`, `devices`, `processes`, `preempted`, `weights` (where the
      frozen networks come from; any may be absent).
    workdir: the training workdir.

  Returns:
    Markdown.
  """
  sched = config.schedule
  total = sched.epochs * sched.steps_per_epoch
  step = info.get("step")
  if step is None:
    step = max((int(s[-1]) for s, _ in series.values() if len(s)), default=0)
  devices = info.get("devices") or config.mesh.num_devices or jax.device_count()
  processes = info.get("processes") or jax.process_count()
  workdir = epath.Path(workdir)
  state = " (stopped by SIGTERM or Ctrl-C)" if info.get("preempted") else ""
  rows = [
      ("config", config.name),
      (
          "iteration",
          f"{step} of {total} ({step / max(sched.steps_per_epoch, 1):g}"
          f" of {sched.epochs} epochs){state}",
      ),
      (
          "devices",
          f"{devices} ({jax.default_backend()}) on {processes} process(es)",
      ),
      ("global batch", sched.batch_size),
      ("frozen networks", info.get("weights") or _sources(config)),
      ("images/s (last logged)", _fmt(_last(series, "train/images_per_sec"))),
      ("training loss (last)", _fmt(_last(series, "train/loss"))),
  ]
  for split, metric in HELD_OUT:
    value = _last(series, f"{split}/{metric}")
    if value is not None:
      rows.append((f"held-out {metric} (last)", _fmt(value)))
  rows += [
      ("checkpoints", str(workdir / "checkpoints")),
      ("student model", str(workdir / "student")),
      (
          "metrics",
          f"{workdir / 'metrics.jsonl'} (TensorBoard: {workdir / 'tb'})",
      ),
      (
          "updated",
          datetime.datetime.now(datetime.timezone.utc).strftime(
              "%Y-%m-%d %H:%M:%S UTC"
          ),
      ),
  ]
  lines = [f"# Run report: {config.name}", "", "| | |", "|---|---|"]
  lines += [f"| {k} | {v} |" for k, v in rows]
  lines += ["", f"![curves]({CURVES_PNG})", ""]
  if (workdir / "faces.png").exists():
    lines += [
        "Generated faces (top) and their crops (bottom):",
        "",
        "![faces](faces.png)",
        "",
    ]
  lines += ["## Networks", "", "| network | source |", "|---|---|"]
  lines += [f"| {k} | {v} |" for k, v in frozen_sources(config)]
  held_out = [f"{s}/{m}" for s, m in HELD_OUT if f"{s}/{m}" in series]
  if held_out:
    lines += ["", "## Held-out validation", ""]
    lines += _metric_table(series, held_out, sched.steps_per_epoch)
  evals = _eval_names(series)
  if evals:
    lines += ["", "## Benchmarks per epoch", ""]
    lines += _metric_table(series, evals, sched.steps_per_epoch)
  changes = config_changes(config)
  lines += [
      "",
      "## Config: fields that differ from `defaults.base_config()`",
      "",
  ]
  lines += ["| field | value | default |", "|---|---|---|"]
  lines += [f"| {n} | {_cell(v)} | {_cell(d)} |" for n, v, d in changes]
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------
# Writing.


def write_atomic(path: epath.Path, data: bytes) -> None:
  """Writes `data` to a temporary file beside `path`, then renames it over.

  Args:
    path: the destination.
    data: the whole content.
  """
  tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
  try:
    tmp.write_bytes(data)
    tmp.replace(path)
  finally:
    if tmp.exists():
      tmp.unlink()


def _digest(series: dict[str, tuple], steps_per_epoch: int) -> str:
  """A fingerprint of everything `plot_curves` draws."""
  h = hashlib.sha256(str(steps_per_epoch).encode())
  for name in sorted(series):
    steps, values = series[name]
    h.update(name.encode() + b"\0")
    h.update(np.ascontiguousarray(steps, np.int64).tobytes() + b"\0")
    h.update(np.ascontiguousarray(values, np.float64).tobytes() + b"\0")
  return h.hexdigest()


def write_run_report(
    workdir: str | os.PathLike, config, info: dict[str, Any] | None = None
) -> dict[str, tuple] | None:
  """Writes `WORKDIR/report.md` and `WORKDIR/curves.png` (process 0 only).

  `curves.png` is drawn again only if its curves changed since this process
  last drew it (or the file is gone); `report.md` is always rewritten.

  Args:
    workdir: the training workdir (holding `metrics.jsonl`).
    config: the run's `ConfigDict`.
    info: facts the metrics do not hold: `step` (default: the last logged),
      `devices`, `processes`, `preempted`.

  Returns:
    The curves drawn, `{'split/metric': (x, y)}` as read back from the
    figure (see `plot_curves`); None on other processes.
  """
  if jax.process_index() != 0:
    return None
  workdir = epath.Path(workdir)
  series = collect_series(read_records(workdir))
  steps_per_epoch = config.schedule.steps_per_epoch
  curves = workdir / CURVES_PNG
  digest = _digest(series, steps_per_epoch)
  drawn = _DRAWN.get(os.fspath(curves))
  if drawn is not None and drawn[0] == digest and curves.exists():
    plotted = drawn[1]
  else:
    fig, plotted = plot_curves(series, steps_per_epoch)
    png = io.BytesIO()
    fig.savefig(png, format="png")
    write_atomic(curves, png.getvalue())
    _DRAWN[os.fspath(curves)] = (digest, plotted)
  text = format_report(config, series, dict(info or {}), workdir)
  write_atomic(workdir / REPORT_MD, text.encode())
  return plotted
