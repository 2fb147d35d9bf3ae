"""Test helpers: the tiny config and comparisons of final parameters."""

import pathlib
import sys

import jax
import ml_collections
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import demo  # pylint: disable=g-import-not-at-top,wrong-import-position


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  """`configs/demo.py:tiny` with dotted-name overrides (test helper)."""
  config = demo.get_config("tiny")
  for name, value in overrides.items():
    node = config
    *parents, leaf = name.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def final_params(result) -> list[np.ndarray]:
  """Host copies of the final student parameters (test helper)."""
  return [np.asarray(x) for x in jax.tree.leaves(result.state.params)]


def assert_params_close(a: list, b: list, rtol: float = 2e-2):
  """Parameter vectors agree up to Adam's amplification of rounding noise.

  Where a gradient is zero up to rounding (e.g. a BN offset feeding another
  BN), Adam's first steps move the element by about +-lr whatever its sign,
  so runs whose reductions differ only in float order agree in loss to 1e-5
  but not element by element. Compare the whole vector instead.
  """
  a = np.concatenate([np.ravel(x) for x in a])
  b = np.concatenate([np.ravel(x) for x in b])
  dist = np.linalg.norm(a - b) / np.linalg.norm(b)
  assert dist < rtol, f"relative L2 distance {dist:.3g}"
  return dist
