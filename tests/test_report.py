"""`WORKDIR/report.md` and `curves.png`: from a metrics file and after a run."""

import json
import pathlib
import sys

import numpy as np
from PIL import Image

from synthdistill_jax import report
from synthdistill_jax import train
from synthdistill_jax.data import verification_bin

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import demo  # pylint: disable=g-import-not-at-top,wrong-import-position


def _expected_curves(jsonl: pathlib.Path, steps_per_epoch: int) -> dict:
  """The curves the report must draw, parsed from the file on its own."""
  curves = {}
  for line in jsonl.read_text().splitlines():
    record = json.loads(line)
    split, step = record.pop("split"), record.pop("step")
    for name, value in record.items():
      key = f"{split}/{name}"
      wanted = key in ("train/loss", "train/images_per_sec") or split == "val"
      if split == "evals" and name.endswith(("/accuracy", "/tar_far_1e-4")):
        wanted, step_x = True, step / steps_per_epoch
      else:
        step_x = step
      if wanted:
        xs, ys = curves.setdefault(key, ([], []))
        xs.append(step_x)
        ys.append(np.nan if value is None else value)
  return curves


def _assert_curves_equal(plotted: dict, expected: dict):
  assert sorted(plotted) == sorted(expected)
  for key, (x, y) in expected.items():
    np.testing.assert_array_equal(plotted[key][0], x, err_msg=key)
    np.testing.assert_array_equal(plotted[key][1], y, err_msg=key)


def test_report_from_a_metrics_file(tmp_path):
  config = demo.get_config("tiny")
  config.schedule.epochs = 2
  records = [{"step": 0, "split": "val", "mse": 2.0, "cosine": 0.1, "r2": -1.0}]
  for step in range(1, 7):
    records.append(
        {
            "step": step,
            "split": "train",
            "loss": None if step == 4 else 1.0 / step,  # A non-finite value.
            "images_per_sec": 10.0 + step,
            "grad_norm": 3.0,
        }
    )
    if step % 3 == 0:
      records.append(
          {
              "step": step,
              "split": "val",
              "mse": 1.0 / step,
              "cosine": 0.5,
              "r2": 0.1 * step,
          }
      )
      records.append(
          {
              "step": step,
              "split": "evals",
              "lfw/accuracy": 0.5 + 0.01 * step,
              "lfw/val": 0.2,
          }
      )
  jsonl = tmp_path / "metrics.jsonl"
  jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
  plotted = report.write_run_report(tmp_path, config, {"devices": 4})
  _assert_curves_equal(plotted, _expected_curves(jsonl, 3))
  np.testing.assert_array_equal(plotted["evals/lfw/accuracy"][0], [1.0, 2.0])
  text = (tmp_path / "report.md").read_text()
  assert "# Run report: demo_tiny" in text
  assert "| iteration | 6 of 6 (2 of 2 epochs) |" in text
  assert "| devices | 4 (cpu) on 1 process(es) |" in text
  assert "| images/s (last logged) | 16 |" in text
  # Held-out table, benchmarks per epoch, and the config's differences.
  assert "| 6 | 2 | 0.1667 | 0.5 | 0.6 |" in text
  assert "| iteration | epoch | evals/lfw/accuracy |" in text
  assert "| schedule.batch_size | `8` | `128` |" in text
  assert "| student.arch | `'iresnet18'` | `'tinyfar_a'` |" in text
  assert "| seed |" not in text  # Unchanged fields are left out.
  assert "| generator | random (init_seed 0" in text
  assert "| teacher | random iresnet18 (init_seed 1" in text
  assert "| student.kwargs.layers | `(1, 1, 1, 1)` | (unset) |" in text
  with Image.open(tmp_path / "curves.png") as png:
    assert png.format == "PNG" and png.size == (1260, 680)  # 5 panels.
  # Written through temporary files that are gone.
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      "curves.png",
      "metrics.jsonl",
      "report.md",
  ]


def test_report_after_a_tiny_run(tmp_path, monkeypatch):
  # Two epochs of two iterations, a small verification set after each.
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (40, 112, 112, 3), dtype=np.uint8)
  verification_bin.write_bin(tmp_path / "mini.bin", images, [True, False] * 10)
  config = demo.get_config("tiny")
  config.schedule.epochs = 2
  config.schedule.steps_per_epoch = 2
  config.evals.bins = [str(tmp_path / "mini.bin")]
  config.evals.batch_size = 8
  calls = []
  write = report.write_run_report

  def spy(workdir, config, info=None):
    calls.append((dict(info or {}), write(workdir, config, info)))
    return calls[-1][1]

  monkeypatch.setattr(report, "write_run_report", spy)
  workdir = tmp_path / "run"
  result = train.train_and_evaluate(config, str(workdir))
  assert int(result.state.step) == 4
  # After the starting validation, each epoch, and at the end.
  assert [info.get("step") for info, _ in calls] == [0, 2, 4, 4]
  plotted = calls[-1][1]
  expected = _expected_curves(workdir / "metrics.jsonl", 2)
  assert {"train/loss", "val/r2", "evals/mini/accuracy"} <= set(expected)
  assert len(expected["train/loss"][0]) == 4
  _assert_curves_equal(plotted, expected)
  text = (workdir / "report.md").read_text()
  assert "| iteration | 4 of 4 (2 of 2 epochs) |" in text
  assert f"| student model | {workdir / 'student'} |" in text
  assert "![curves](curves.png)" in text and "![faces](faces.png)" in text
  r2 = expected["val/r2"][1][-1]
  assert f"| held-out r2 (last) | {r2:.4g} |" in text
  with Image.open(workdir / "curves.png") as png:
    assert png.format == "PNG" and png.size == (1260, 680)


def test_unchanged_curves_are_not_drawn_again(tmp_path, monkeypatch):
  config = demo.get_config("tiny")
  jsonl = tmp_path / "metrics.jsonl"
  record = {"step": 1, "split": "train", "loss": 1.0, "images_per_sec": 5.0}
  jsonl.write_text(json.dumps(record) + "\n")
  draws = []
  plot = report.plot_curves
  monkeypatch.setattr(
      report, "plot_curves", lambda *a: draws.append(a) or plot(*a)
  )
  first = report.write_run_report(tmp_path, config, {"step": 1})
  # Same metrics (the final report after the last epoch's): report.md is
  # rewritten, the figure is not drawn again.
  again = report.write_run_report(tmp_path, config, {"step": 3})
  assert len(draws) == 1 and again == first
  assert "| iteration | 3 of 3" in (tmp_path / "report.md").read_text()
  # A new record, another steps_per_epoch, or a deleted PNG: drawn again.
  record["step"] = 2
  with jsonl.open("a") as f:
    f.write(json.dumps(record) + "\n")
  plotted = report.write_run_report(tmp_path, config, {"step": 2})
  assert len(draws) == 2
  np.testing.assert_array_equal(plotted["train/loss"][0], [1, 2])
  config.schedule.steps_per_epoch = 5
  report.write_run_report(tmp_path, config)
  (tmp_path / "curves.png").unlink()
  report.write_run_report(tmp_path, config)
  assert len(draws) == 4 and (tmp_path / "curves.png").exists()
