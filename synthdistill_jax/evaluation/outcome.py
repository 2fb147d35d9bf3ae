"""What an evaluation returns: `BenchmarkResult` and metric names."""

import dataclasses
from typing import Any

import numpy as np


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


def far_key(far: float) -> str:
  """Metric name of TAR at a FAR: 1e-4 -> 'tar_far_1e-4'."""
  return f"tar_far_1e{int(round(np.log10(far)))}"
