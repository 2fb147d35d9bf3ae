"""Golden cases: reference outputs of the official PyTorch networks.

The cases under `tests/data/golden/` were produced by the unmodified upstream
PyTorch code with deterministic pseudo-random weights. The weights are not
stored: every `state_dict` entry is rebuilt from its manifest row with the
recipe below (bit-exact with the torch `state_dict` that produced the outputs).
"""

import functools
import json
import pathlib
import zlib

import numpy as np

GOLDEN_DIR = pathlib.Path(__file__).parent / "data" / "golden"


@functools.lru_cache(maxsize=None)
def load_manifest(case: str) -> dict:
  """Returns the parsed `<case>.manifest.json`."""
  return json.loads((GOLDEN_DIR / f"{case}.manifest.json").read_text())


@functools.lru_cache(maxsize=None)
def load_arrays(case: str) -> dict[str, np.ndarray]:
  """Returns every array of `<case>.npz` (inputs, outputs and literals)."""
  with np.load(GOLDEN_DIR / f"{case}.npz") as npz:
    return {k: npz[k] for k in npz.files}


def _rebuild(row: dict, arrays: dict[str, np.ndarray]) -> np.ndarray:
  name, shape, dtype, init = (
      row["name"],
      row["shape"],
      row["dtype"],
      row["init"],
  )
  kind = init[0]
  if kind == "literal":
    return np.asarray(arrays[f"literal/{name}"]).astype(dtype)
  if kind == "zeros":
    return np.zeros(shape, dtype)
  if kind == "ones":
    return np.ones(shape, dtype)
  # Drawn in float64 and then cast: passing dtype=float32 to standard_normal
  # would switch to another algorithm and other numbers.
  rng = np.random.default_rng(zlib.crc32(name.encode("utf-8")))
  base = rng.standard_normal(size=shape).astype(np.float32)
  mean, std = np.float32(init[1]), np.float32(init[2])
  if kind == "normal":
    value = mean + std * base
  elif kind == "abs_normal":
    value = mean + std * np.abs(base)
  else:
    raise ValueError(f"unknown init {init!r} for {name}")
  return np.asarray(value).astype(dtype)


@functools.lru_cache(maxsize=None)
def _state_dict(case: str) -> tuple[tuple[str, np.ndarray], ...]:
  manifest = load_manifest(case)
  arrays = load_arrays(case)
  return tuple(
      (row["name"], _rebuild(row, arrays)) for row in manifest["tensors"]
  )


def state_dict(case: str) -> dict[str, np.ndarray]:
  """Rebuilds the case's PyTorch `state_dict` as numpy arrays, in torch order.

  Returns a fresh dict of copies, so callers may mutate it.
  """
  return {k: v.copy() for k, v in _state_dict(case)}


def torch_state_dict(case: str):
  """The same state dict as torch tensors (needs the `test` extra)."""
  import torch  # pylint: disable=g-import-not-at-top

  return {k: torch.from_numpy(v) for k, v in state_dict(case).items()}
