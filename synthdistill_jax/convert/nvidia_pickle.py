"""Reads NVIDIA's network pickles without running anything from them.

Official StyleGAN2-ADA / StyleGAN3 `.pkl` files are plain pickles of a dict
(`G`, `D`, `G_ema`, `augment_pipe`, `training_set_kwargs`, ...) whose networks
were saved by `torch_utils/persistence.py`: every module is pickled as
`_reconstruct_persistent_obj(meta)`, where `meta` holds the module's Python
source (`module_src`), its `class_name` and its `state` (the `__dict__` of the
`torch.nn.Module`: `_parameters`, `_buffers`, `_modules`, `_init_kwargs`, ...).
Unpickling such a file normally *executes* `module_src`.

Here every global goes through an allow-list (`safe_pickle`): the
reconstructor becomes `PersistentObject`, which keeps `class_name` and `state`
and never reads or runs `module_src`; tensors are rebuilt by PyTorch from the
storages' `torch.save` bytes with `torch.load(weights_only=True)`; the rest are
plain containers and numpy scalars. Any other global is refused.
"""

import collections
import io
import os
from typing import Any

import numpy as np

from synthdistill_jax import safe_pickle


class PersistentObject:
  """Stand-in for an NVIDIA persistent module: its class name and state only.

  Attributes:
    class_name: the class the file says it is (e.g. 'Generator').
    state: the module's pickled `__dict__`.
  """

  def __init__(self, class_name: str, state: dict):
    self.class_name = class_name
    self.state = state

  @property
  def init_kwargs(self) -> dict:
    return dict(self.state.get("_init_kwargs") or {})

  @property
  def init_args(self) -> tuple:
    return tuple(self.state.get("_init_args") or ())

  @property
  def modules(self) -> dict:
    return dict(self.state.get("_modules") or {})

  def __repr__(self):
    return f"PersistentObject({self.class_name!r})"


class EasyDict(dict):
  """Stand-in for `dnnlib.util.EasyDict`: a plain dict (no attribute magic)."""


def _reconstruct_persistent_obj(meta) -> PersistentObject:
  """Replaces `torch_utils.persistence._reconstruct_persistent_obj`.

  Keeps `class_name` and `state`; `module_src` is never looked at.
  """
  if not isinstance(meta, dict) or meta.get("type") != "class":
    raise ValueError("persistent object without a class record")
  class_name, state = meta.get("class_name"), meta.get("state")
  if not isinstance(class_name, str) or not isinstance(state, dict):
    raise ValueError("persistent object with a malformed class record")
  return PersistentObject(class_name, state)


def _torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(
        "reading PyTorch checkpoints needs torch: pip install"
        " 'synthdistill-jax[convert]'"
    ) from None
  return torch


def _load_storage(data):
  """Replaces `torch.storage._load_from_bytes`: a weights-only `torch.load`."""
  torch = _torch()
  if not isinstance(data, (bytes, bytearray)):
    raise ValueError("storage record is not bytes")
  storage = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
  if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
    raise ValueError(f"storage record holds a {type(storage).__name__}")
  return storage


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  """Replaces `torch._utils._rebuild_tensor_v2`; drops grad flags and hooks."""
  torch = _torch()
  if not isinstance(storage, torch.TypedStorage):
    raise ValueError("tensor record without a storage")
  if not all(isinstance(v, int) for v in (storage_offset, *size, *stride)):
    raise ValueError("tensor record with non-integer geometry")
  return torch._utils._rebuild_tensor(  # pylint: disable=protected-access
      storage, storage_offset, tuple(size), tuple(stride)
  )


def _rebuild_parameter(data, *unused):
  """Replaces `torch._utils._rebuild_parameter(_with_state)`: the tensor."""
  torch = _torch()
  if not isinstance(data, torch.Tensor):
    raise ValueError("parameter record without a tensor")
  return data


def _numpy_scalar(dtype, data=None):
  """Replaces `numpy.core.multiarray.scalar` for plain numeric dtypes."""
  if not isinstance(dtype, np.dtype) or dtype.hasobject:
    raise ValueError("numpy scalar of a non-numeric dtype")
  if not isinstance(data, bytes):
    raise ValueError("numpy scalar without bytes")
  return np.frombuffer(data, dtype)[0]


def _numpy_reconstruct(cls, shape, unused_dtype_code):
  """Replaces `numpy.core.multiarray._reconstruct` for plain ndarrays.

  The array's real dtype and data arrive afterwards through
  `ndarray.__setstate__`.
  """
  if cls is not np.ndarray:
    raise ValueError("numpy array record of another class")
  return np.ndarray.__new__(np.ndarray, shape, np.uint8)


def _allow_list() -> dict[tuple[str, str], Any]:
  torch_globals = {
      ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
      ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
      ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
      ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
      ("torch.storage", "_load_from_bytes"): _load_storage,
  }
  numpy_globals = {
      ("numpy", "dtype"): np.dtype,
      ("numpy", "ndarray"): np.ndarray,
  }
  for core in ("numpy.core.multiarray", "numpy._core.multiarray"):
    numpy_globals[(core, "scalar")] = _numpy_scalar
    numpy_globals[(core, "_reconstruct")] = _numpy_reconstruct
  return {
      ("torch_utils.persistence", "_reconstruct_persistent_obj"): (
          _reconstruct_persistent_obj
      ),
      ("dnnlib.util", "EasyDict"): EasyDict,
      ("dnnlib", "EasyDict"): EasyDict,
      ("collections", "OrderedDict"): collections.OrderedDict,
      ("builtins", "set"): set,
      ("builtins", "frozenset"): frozenset,
      **torch_globals,
      **numpy_globals,
  }


def load_pickle(path: str | os.PathLike) -> Any:
  """Unpickles an NVIDIA network pickle safely.

  Args:
    path: the `.pkl` file.

  Returns:
    The top-level object (normally a dict holding `PersistentObject`s).

  Raises:
    safe_pickle.UnsafePickleError: a global outside the allow-list (nothing
      was run), or a corrupt/truncated file.
  """
  path = os.fspath(path)
  _torch()  # Fail early and clearly if torch is missing.
  with open(path, "rb") as f:
    try:
      return safe_pickle.load(f, _allow_list(), source=path)
    except safe_pickle.UnsafePickleError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      # A torch error while rebuilding a tensor from corrupt bytes.
      raise safe_pickle.UnsafePickleError(
          f"{path}: not a readable pickle ({type(e).__name__}: {e})"
      ) from None


def _to_numpy(value) -> np.ndarray:
  torch = _torch()
  value = value.detach().cpu()
  if value.dtype == torch.bfloat16:
    value = value.float()
  return value.numpy().copy()


def state_dict(
    obj: PersistentObject, prefix: str = ""
) -> dict[str, np.ndarray]:
  """Flattens a persistent module tree like `torch.nn.Module.state_dict()`.

  Args:
    obj: a `PersistentObject` (e.g. `pickle['G_ema']`).
    prefix: key prefix (used in recursion).

  Returns:
    `{'mapping.fc0.weight': array, ...}` with the official key names.
  """
  torch = _torch()
  result = {}
  skip = set(obj.state.get("_non_persistent_buffers_set") or ())
  for group in ("_parameters", "_buffers"):
    for name, value in (obj.state.get(group) or {}).items():
      if value is None or (group == "_buffers" and name in skip):
        continue
      if not isinstance(value, torch.Tensor):
        raise ValueError(
            f"{prefix}{name} is a {type(value).__name__}, not a tensor"
        )
      result[prefix + name] = _to_numpy(value)
  for name, child in obj.modules.items():
    if child is None:
      continue
    if not isinstance(child, PersistentObject):
      raise ValueError(
          f"{prefix}{name} is a {type(child).__name__}, not a module"
      )
    result.update(state_dict(child, f"{prefix}{name}."))
  return result
