"""Safe reading of PyTorch `.pth` state dicts, and strict key checking.

`torch.load(..., weights_only=True)` only rebuilds tensors and plain
containers: a file that names any other global (a pickled `nn.Module`, or a
payload that would run code) is refused before anything runs. This module
turns torch's multi-paragraph errors into one line naming the file, unwraps
the usual checkpoint wrappers, strips DataParallel's `module.` prefixes and
returns numpy arrays, so the rest of the converters never touch torch.
"""

import os
import re
import warnings
from typing import Any, Iterable, Mapping

import numpy as np

from synthdistill_jax import safe_pickle

# Keys under which training scripts commonly nest the state dict.
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
# How many offending keys an error message lists per kind.
_MAX_LISTED = 5


def _import_torch(path: str):
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(
        f"{path}: reading PyTorch checkpoints needs torch; install the"
        " 'convert' extra (pip install 'synthdistill-jax[convert]')"
    ) from None
  return torch


def not_a_file(path: str) -> str:
  """Why `path`, given as a checkpoint file, is not one (one line)."""
  if os.path.isdir(path):
    # A converted model folder, or a training workdir, given by mistake.
    return f"{path}: is a folder; give the checkpoint file itself"
  return f"{path}: no such file"


def read_file(path: str) -> Any:
  """`torch.load` with weights only, every failure as one line.

  torch's own messages advise re-running with `weights_only=False` (which
  would run the file's code) or allow-listing the refused global; neither is
  ever repeated: only the refused global or construct is named.

  Args:
    path: a file written by `torch.save` (zip or legacy pickle format).

  Returns:
    Whatever the file holds (tensors and plain containers only).

  Raises:
    FileNotFoundError: no such file.
    UnsafePickleError: the file names a global other than tensors, or uses
      a construct the weights-only reader refuses (nothing was run).
    ValueError: truncated or corrupt.
  """
  torch = _import_torch(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(not_a_file(path))
  try:
    with warnings.catch_warnings():
      # torch warns about pickle protocols on stderr; the file is refused or
      # read below either way, and errors stay one line.
      warnings.simplefilter("ignore")
      return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    text = str(e)
    refused = re.search(r"GLOBAL ([\w.]+)", text)
    if refused:
      raise safe_pickle.UnsafePickleError(
          f"{path}: refused global {refused.group(1)} (only tensors and plain"
          " containers are read, nothing from the file was run; save"
          " model.state_dict() rather than the model object)"
      ) from None
    if "Weights only load failed" in text:
      # Not a forbidden global but another construct the weights-only
      # reader rejects (e.g. an unsupported opcode): still refused, not run.
      lines = [l.strip() for l in text.splitlines() if l.strip()]
      # Never the lines that advise loading unsafely.
      lines = [l for l in lines if "weights_only" not in l] or ["refused"]
      detail = next(
          (l for l in lines if l.startswith("Unsupported")), lines[-1]
      )
      raise safe_pickle.UnsafePickleError(
          f"{path}: refused by torch's weights-only reader ({detail[:160]});"
          " nothing from the file was run"
      ) from None
    lines = [l for l in text.strip().splitlines() if "weights_only" not in l]
    first = lines[0] if lines else ""
    raise ValueError(
        f"{path}: not a readable PyTorch checkpoint, truncated or corrupt"
        f" ({type(e).__name__}: {first[:160]})"
    ) from None


def _is_tensor_mapping(obj: Any, torch) -> bool:
  return (
      isinstance(obj, Mapping)
      and bool(obj)
      and all(isinstance(v, torch.Tensor) for v in obj.values())
  )


def _unwrap(obj: Any, path: str, torch) -> Mapping[str, Any]:
  """Finds the state dict in a raw dict or a {'state_dict': ...} wrapper."""
  if _is_tensor_mapping(obj, torch):
    return obj
  if isinstance(obj, Mapping):
    for key in WRAPPER_KEYS:
      if key in obj and isinstance(obj[key], Mapping):
        return _unwrap(obj[key], f"{path}[{key!r}]", torch)
    for key, value in obj.items():
      if not isinstance(value, torch.Tensor):
        keys = ", ".join(repr(k) for k in list(obj)[:8])
        raise ValueError(
            f"{path}: entry {key!r} is a {type(value).__name__}, not a"
            f" tensor, and no state dict is nested under"
            f" {'/'.join(WRAPPER_KEYS)} (top-level keys: {keys})"
        )
  raise ValueError(
      f"{path}: holds a {type(obj).__name__}, not a state dict of tensors"
  )


def _to_numpy(tensor) -> np.ndarray:
  tensor = tensor.detach().cpu()
  if tensor.is_floating_point():
    # numpy has no bfloat16; every consumer works in float32 anyway.
    tensor = tensor.float()
  return tensor.numpy().copy()


def strip_prefix(
    state_dict: Mapping[str, Any], prefix: str = "module."
) -> dict[str, Any]:
  """Removes (repeated) `prefix` from every key, as DataParallel adds it."""
  out = {}
  for key, value in state_dict.items():
    while key.startswith(prefix):
      key = key[len(prefix) :]
    out[key] = value
  return out


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a PyTorch state dict safely, as numpy arrays.

  Args:
    path: a `.pth`/`.pt` file holding a state dict, or a dict that nests one
      under 'state_dict', 'model', 'model_state_dict' or 'module'.

  Returns:
    `{key: array}` in file order, `module.` prefixes stripped, floating
    tensors as float32 and integer buffers (`num_batches_tracked`) as is.

  Raises:
    FileNotFoundError: no such file.
    UnsafePickleError: the file names a global other than tensors (a pickled
      module, or code).
    ValueError: truncated, corrupt, or not a state dict.
  """
  path = os.fspath(path)
  torch = _import_torch(path)
  state_dict = _unwrap(read_file(path), path, torch)
  return {k: _to_numpy(v) for k, v in strip_prefix(state_dict).items()}


def float_weight(
    key: str, value: Any, source: str, *, allow_nonfinite: bool = False
) -> np.ndarray:
  """Checks one tensor that must be a floating-point weight; float32 copy.

  Args:
    key: the tensor's name in the state dict (named in errors).
    value: the array.
    source: what to call the file in errors (its path).
    allow_nonfinite: keep NaN/Inf values instead of refusing them.

  Returns:
    The values as a float32 numpy array.

  Raises:
    ValueError: one line naming the tensor: an integer, boolean or complex
      tensor (refused rather than cast), or NaN/Inf values (also values that
      overflow float32).
  """
  value = np.asarray(value)
  if not np.issubdtype(value.dtype, np.floating):
    raise ValueError(
        f"{source}: tensor {key} has dtype {value.dtype}, expected a"
        " floating-point weight (refused rather than cast)"
    )
  with np.errstate(over="ignore"):
    value = value.astype(np.float32)
  if not allow_nonfinite:
    bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
    if bad:
      raise ValueError(
          f"{source}: tensor {key} has {bad} non-finite value(s) (NaN/Inf) of"
          f" {value.size}; refused (--allow_nonfinite / allow_nonfinite=True"
          " converts it anyway)"
      )
  return value


def _listed(items: list[str]) -> str:
  shown = ", ".join(items[:_MAX_LISTED])
  more = len(items) - _MAX_LISTED
  return shown + (f", ... and {more} more" if more > 0 else "")


def check_keys(
    state_dict: Mapping[str, Any],
    expected: Mapping[str, tuple[int, ...]],
    source: str,
    optional: Iterable[str] = (),
) -> None:
  """Checks that a state dict has exactly the expected keys and shapes.

  Args:
    state_dict: `{key: array}` as read from the file.
    expected: `{key: shape}` the architecture needs.
    source: what to call the state dict in the message (its path).
    optional: expected keys that may be absent (e.g. `num_batches_tracked`,
      which old MXNet-port checkpoints lack).

  Raises:
    ValueError: one line listing up to 5 missing, unexpected and misshapen
      keys each, with counts.
  """
  optional = set(optional)
  missing = [k for k in expected if k not in state_dict and k not in optional]
  unexpected = [k for k in state_dict if k not in expected]
  misshapen = [
      f"{k} {tuple(np.shape(v))} != expected {tuple(expected[k])}"
      for k, v in state_dict.items()
      if k in expected and tuple(np.shape(v)) != tuple(expected[k])
  ]
  problems = []
  for what, items in (
      ("missing", missing),
      ("unexpected", unexpected),
      ("misshapen", misshapen),
  ):
    if items:
      problems.append(f"{len(items)} {what} key(s): {_listed(items)}")
  if problems:
    raise ValueError(
        f"{source}: state dict does not match; " + "; ".join(problems)
    )
