"""Where metrics and pictures go: JSONL, TensorBoard events, a face grid PNG.

Only process 0 writes. `WORKDIR/metrics.jsonl` holds one JSON object per
logged step (`{"step": ..., "split": "train"|"val"|..., name: value}`);
TensorBoard reads `WORKDIR/tb` (`tensorboard --logdir WORKDIR/tb`).
"""

import json
import math
import os
import pathlib
from typing import Mapping

import jax
import numpy as np
from PIL import Image


class MetricWriter:
  """Appends scalars to `metrics.jsonl` and TensorBoard (process 0 only).

  Args:
    workdir: the training workdir.
    enabled: write at all (default: on process 0).
  """

  def __init__(self, workdir: str | os.PathLike, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.jsonl_path = pathlib.Path(workdir) / "metrics.jsonl"
    self.tb_dir = pathlib.Path(workdir) / "tb"
    self._tb = None
    self._file = None
    if self.enabled:
      # tensorboardX is imported lazily: it pulls in protobuf at import time.
      import tensorboardX  # pylint: disable=g-import-not-at-top

      self.jsonl_path.parent.mkdir(parents=True, exist_ok=True)
      self._file = open(self.jsonl_path, "a", encoding="utf-8")
      self._tb = tensorboardX.SummaryWriter(str(self.tb_dir))

  def write(self, step: int, split: str, scalars: Mapping[str, float]):
    """Writes `scalars` of `split` at `step` to both sinks.

    Args:
      step: the iteration number.
      split: 'train', 'val', or an evaluator's name.
      scalars: name -> float.
    """
    if not self.enabled:
      return
    record = {"step": int(step), "split": split}
    record.update({k: _to_json_float(v) for k, v in scalars.items()})
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    for name, value in scalars.items():
      self._tb.add_scalar(f"{split}/{name}", float(value), int(step))
    self._tb.flush()

  def close(self):
    """Flushes and closes the files."""
    if self._file is not None:
      self._file.close()
      self._tb.close()
      self._file = self._tb = None


def _to_json_float(value) -> float | None:
  value = float(value)
  return value if math.isfinite(value) else None


def read_metrics(path: str | os.PathLike, split: str | None = None) -> list:
  """Reads `metrics.jsonl` back (optionally one split).

  Args:
    path: the file, or the workdir holding it.
    split: keep only records of this split.

  Returns:
    A list of dicts in file order.
  """
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / "metrics.jsonl"
  records = [json.loads(line) for line in path.read_text().splitlines()]
  return [r for r in records if split is None or r["split"] == split]


def _to_uint8(images: np.ndarray, low: float, high: float) -> np.ndarray:
  x = (np.clip(images, low, high) - low) / (high - low)
  return np.round(x * 255.0).astype(np.uint8)


def _resize_nearest(image: np.ndarray, size: int) -> np.ndarray:
  pil = Image.fromarray(image).resize((size, size), Image.NEAREST)
  return np.asarray(pil)


def write_face_grid(
    path: str | os.PathLike, generated: np.ndarray, crops: np.ndarray
) -> pathlib.Path:
  """A PNG: each generated image (top row) above its 112x112 crop.

  Args:
    path: output file.
    generated: `[N, R, R, 3]` generator output in about [-1, 1].
    crops: `[N, 112, 112, 3]` faces in [0, 1].

  Returns:
    The path written.
  """
  generated = _to_uint8(np.asarray(generated, np.float32), -1.0, 1.0)
  crops = _to_uint8(np.asarray(crops, np.float32), 0.0, 1.0)
  cell = max(generated.shape[1], crops.shape[1])
  pad = 4
  n = generated.shape[0]
  grid = np.full((2 * cell + 3 * pad, n * (cell + pad) + pad, 3), 255, np.uint8)
  for i in range(n):
    x0 = pad + i * (cell + pad)
    grid[pad : pad + cell, x0 : x0 + cell] = _resize_nearest(generated[i], cell)
    y0 = 2 * pad + cell
    grid[y0 : y0 + cell, x0 : x0 + cell] = _resize_nearest(crops[i], cell)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(grid).save(path)
  return path
