"""Where metrics and pictures go: JSONL, TensorBoard events, a face grid PNG.

Only process 0 writes. `WORKDIR/metrics.jsonl` holds one JSON object per
logged step (`{"step": ..., "split": "train"|"val"|..., name: value}`);
TensorBoard reads `WORKDIR/tb` (`tensorboard --logdir WORKDIR/tb`).
"""

import contextlib
import io
import json
import math
import os
import sys
from typing import Callable, Mapping

from etils import epath
import jax
import numpy as np
from PIL import Image


class MetricWriter:
  """Writes scalars to `metrics.jsonl` and TensorBoard (process 0 only).

  The workdir may be local or any `etils.epath` URI (gs://...). Object
  stores cannot append, so the JSONL records are kept in memory and the
  file is rewritten whole (a temporary file renamed over it) at each write;
  a run logs a few thousand lines at most. On a resume at iteration
  `resume_step`, records of later iterations (written after the checkpoint
  the run resumes from) are dropped, so no step appears twice, and
  TensorBoard is told to purge them too.

  Args:
    workdir: the training workdir.
    enabled: write at all (default: on process 0).
    resume_step: the iteration the run (re)starts from.
    log: where a note on unreadable lines goes (they are dropped).
  """

  def __init__(
      self,
      workdir: str | os.PathLike,
      enabled: bool | None = None,
      resume_step: int = 0,
      log: Callable[[str], None] = print,
  ):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.jsonl_path = epath.Path(workdir) / "metrics.jsonl"
    self.tb_dir = epath.Path(workdir) / "tb"
    self._tb = None
    self._lines = []
    if self.enabled:
      tensorboardx = import_tensorboardx()
      _register_epath_event_writers()
      self.jsonl_path.parent.mkdir(parents=True, exist_ok=True)
      if self.jsonl_path.exists():
        lines = [
            line
            for line in self.jsonl_path.read_text().splitlines()
            if line.strip()
        ]
        steps = [_step_of(line) for line in lines]
        self._lines = [
            line for line, step in zip(lines, steps) if step <= resume_step
        ]
        if unreadable := steps.count(math.inf):
          # The file is replaced whole at each write: only a damaged or
          # edited file has such lines.
          log(
              f"{self.jsonl_path}: dropped {unreadable} unreadable line(s)"
              " (not a JSON record with a step)"
          )
      self._tb = tensorboardx.SummaryWriter(
          os.fspath(self.tb_dir), purge_step=resume_step + 1
      )

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
    self._lines.append(json.dumps(record))
    write_text_atomic(self.jsonl_path, "\n".join(self._lines) + "\n")
    for name, value in scalars.items():
      self._tb.add_scalar(f"{split}/{name}", float(value), int(step))
    self._tb.flush()

  def close(self):
    """Flushes and closes the TensorBoard writer."""
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def _step_of(line: str) -> float:
  """The step of a JSONL record (inf for an unreadable line: dropped)."""
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return math.inf


def write_text_atomic(path: epath.Path, text: str) -> None:
  """Writes `path` through a temporary file renamed over it.

  A reader sees the old or the new file, never half of one (a rename is
  atomic on local disks; object stores replace the object whole).

  Args:
    path: the file (local or an `etils.epath` URI).
    text: its new content.
  """
  path = epath.Path(path)
  tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
  tmp.write_text(text)
  tmp.replace(path)


# Optional modules that tensorboardX imports when they are installed and that
# scalars never need: torch (its tensors as values; 3.9 s and 190 MB of
# memory here when the `convert` extra is installed), google-cloud-storage
# and boto3 (its own gs:// and s3:// writers, which
# `_EpathRecordWriterFactory` replaces).
TENSORBOARDX_SKIPPED_IMPORTS = ("torch", "google.cloud.storage", "boto3")


@contextlib.contextmanager
def _imports_hidden(names):
  """`import name` raises ImportError inside, for names not yet imported.

  A `None` entry in `sys.modules` is Python's documented way to make an
  import fail; the entries are removed again afterwards, so a later import
  of the real module works.
  """
  hidden = [n for n in names if n not in sys.modules]
  for name in hidden:
    sys.modules[name] = None
  try:
    yield
  finally:
    for name in hidden:
      if sys.modules.get(name, 0) is None:
        del sys.modules[name]


def import_tensorboardx():
  """tensorboardX, imported without its optional torch/GCS/S3 back ends.

  Imported lazily (it pulls in protobuf) and with
  `TENSORBOARDX_SKIPPED_IMPORTS` hidden: where torch is installed, the
  import takes 0.2 s instead of 5.6 s on a 2-core host, and the trainer
  does not hold torch in memory.

  Returns:
    The `tensorboardX` module.
  """
  with _imports_hidden(TENSORBOARDX_SKIPPED_IMPORTS):
    import tensorboardX  # pylint: disable=g-import-not-at-top

  return tensorboardX


class _EpathRecordWriter:
  """A tensorboardX record writer over `etils.epath` (object stores).

  Object stores have no append: the bytes are kept and the object is
  rewritten whole at each flush (event files of scalars stay small).
  """

  def __init__(self, path: str):
    self._path = epath.Path(path)
    self._data = bytearray()

  def write(self, data: bytes) -> None:
    self._data.extend(data)

  def flush(self) -> None:
    with self._path.open("wb") as f:
      f.write(bytes(self._data))

  def close(self) -> None:
    self.flush()


class _EpathRecordWriterFactory:

  def directory_check(self, path: str) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)

  def open(self, path: str) -> _EpathRecordWriter:
    return _EpathRecordWriter(path)


def _register_epath_event_writers() -> None:
  """Routes tensorboardX's gs:// and s3:// event files through epath."""
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top

  for prefix in ("gs", "s3"):
    record_writer.register_writer_factory(prefix, _EpathRecordWriterFactory())


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
  path = epath.Path(path)
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
) -> epath.Path:
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
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  buffer = io.BytesIO()
  Image.fromarray(grid).save(buffer, format="PNG")
  path.write_bytes(buffer.getvalue())
  return path
