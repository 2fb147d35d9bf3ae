"""PyTorch face-network checkpoints <-> Flax variables.

IResNet and MobileFaceNet (insightface `arcface_torch`) are mapped here; the
TinyFaR students (`tinyfar_*`) are dispatched to
`synthdistill_jax.convert.tinynet`, which has the same two functions.

The name map is derived, not tabulated: the Flax models name their
submodules like the PyTorch modules (`layer1_0/downsample_1` for
`layer1.0.downsample.1`), and tracing the model records the leaf layers
(conv, linear, BatchNorm, PReLU) in call order, which for these networks is
PyTorch's registration order, hence the state-dict order. Each leaf kind
then maps its tensors:

| PyTorch | Flax |
|---|---|
| conv `weight` [O, I/g, kh, kw] | `params/.../kernel` [kh, kw, I/g, O] |
| linear `weight` [O, I] | `params/.../kernel` [I, O] |
| BN `weight`, `bias` | `params/.../scale`, `bias` |
| BN `running_mean`, `running_var` | `batch_stats/.../mean`, `var` |
| BN `num_batches_tracked` | not kept (optional on input, 0 on output) |
| PReLU `weight` [C] | `params/.../alpha` |
"""

import dataclasses
import importlib
import os
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from synthdistill_jax.convert import torch_io
from synthdistill_jax.models import iresnet
from synthdistill_jax.models import layers
from synthdistill_jax.models import mobilefacenet
from synthdistill_jax.models import registry

# Re-exported: the safe reader and the strict key check live in torch_io so
# that every converter shares them.
load_state_dict = torch_io.load_state_dict
check_keys = torch_io.check_keys

FACE_ARCHS = iresnet.ARCHS + mobilefacenet.ARCHS
STUDENT_PREFIX = "tinyfar_"
NUM_BATCHES_TRACKED = "num_batches_tracked"


@dataclasses.dataclass(frozen=True)
class _Leaf:
  """One PyTorch tensor and where it lives in the Flax variables."""

  torch_key: str
  collection: str  # 'params' or 'batch_stats'; '' for num_batches_tracked.
  path: tuple[str, ...]
  to_torch: Callable[[np.ndarray], np.ndarray]
  from_torch: Callable[[np.ndarray], np.ndarray]


def _same(a: np.ndarray) -> np.ndarray:
  return a


def _kernel_to_torch(k: np.ndarray) -> np.ndarray:
  # Conv HWIO -> OIHW; dense [in, out] -> [out, in].
  return k.transpose(3, 2, 0, 1) if k.ndim == 4 else k.T


def _kernel_from_torch(w: np.ndarray) -> np.ndarray:
  return w.transpose(2, 3, 1, 0) if w.ndim == 4 else w.T


def _torch_module_name(path: tuple[str, ...]) -> str:
  # 'layer1_0' -> 'layer1.0', 'layers_2' -> 'layers.2'; 'conv_sep' stays.
  return ".".join(re.sub(r"_(\d+)(?=_|$)", r".\1", p) for p in path)


def _trace_leaves(module: nn.Module, input_size: int):
  """Leaf layers in call order, and the variable shapes, without computing."""
  order = []

  def record(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and isinstance(
        context.module, (nn.Conv, nn.Dense, layers.BatchNorm, layers.PReLU)
    ):
      entry = (tuple(context.module.path), type(context.module))
      if entry not in order:
        order.append(entry)
    return next_fun(*args, **kwargs)

  x = jnp.zeros((1, input_size, input_size, 3), jnp.float32)
  with nn.intercept_methods(record):
    shapes = jax.eval_shape(module.init, jax.random.key(0), x)
  return order, shapes


def _layout(module: nn.Module) -> tuple[list[_Leaf], Any]:
  """The ordered PyTorch tensors of `module` and its variable shapes."""
  order, shapes = _trace_leaves(module, getattr(module, "input_size", 112))
  leaves = []
  for path, kind in order:
    name = _torch_module_name(path)

    def leaf(suffix, collection, flax_name, to_t=_same, from_t=_same):
      leaves.append(
          _Leaf(
              f"{name}.{suffix}",
              collection,
              path + (flax_name,),
              to_t,
              from_t,
          )
      )

    if kind is layers.BatchNorm:
      leaf("weight", "params", "scale")
      leaf("bias", "params", "bias")
      leaf("running_mean", "batch_stats", "mean")
      leaf("running_var", "batch_stats", "var")
      leaf(NUM_BATCHES_TRACKED, "", "")
    elif kind is layers.PReLU:
      leaf("weight", "params", "alpha")
    else:
      leaf("weight", "params", "kernel", _kernel_to_torch, _kernel_from_torch)
      if "bias" in _get(shapes["params"], path):
        leaf("bias", "params", "bias")
  return leaves, shapes


def _get(tree: Any, path: tuple[str, ...]) -> Any:
  for p in path:
    tree = tree[p]
  return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _torch_shape(leaf: _Leaf, shapes: Any) -> tuple[int, ...]:
  if not leaf.collection:
    return ()
  shape = _get(shapes[leaf.collection], leaf.path).shape
  return leaf.to_torch(np.empty(shape, np.float32)).shape


def _create(arch: str, **kwargs: Any) -> nn.Module:
  if arch not in FACE_ARCHS:
    raise ValueError(
        f"unknown face-model architecture {arch!r}; known:"
        f" {', '.join(FACE_ARCHS)} and tinyfar_a/b/c"
    )
  return registry.create_model(arch, **kwargs)


def _student_converter():
  return importlib.import_module("synthdistill_jax.convert.tinynet")


def expected_state_dict_shapes(arch: str, **kwargs: Any) -> dict[str, tuple]:
  """PyTorch `{key: shape}` of `arch`, in state-dict order.

  Args:
    arch: an IResNet or MobileFaceNet name.
    **kwargs: constructor arguments of the Flax model.

  Returns:
    The keys and shapes the official PyTorch model's `state_dict()` has.
  """
  leaves, shapes = _layout(_create(arch, **kwargs))
  return {leaf.torch_key: _torch_shape(leaf, shapes) for leaf in leaves}


def variables_from_state_dict(
    arch: str,
    state_dict: dict[str, np.ndarray],
    *,
    source: str = "state dict",
    allow_nonfinite: bool = False,
    **kwargs: Any,
):
  """Maps a PyTorch state dict onto the Flax model.

  Args:
    arch: registry name ('iresnet100', 'mobilefacenet', 'tinyfar_a', ...).
    state_dict: `{torch key: array}`, `module.` prefixes already stripped.
    source: what to call the state dict in errors (the file path).
    allow_nonfinite: keep NaN/Inf weights instead of refusing them.
    **kwargs: constructor arguments (`bn_eps`, `dtype`, ...).

  Returns:
    `(module, variables)`, variables `{'params', 'batch_stats'}` as float32
    numpy arrays. `num_batches_tracked` (an integer counter) is skipped.

  Raises:
    ValueError: unknown arch, missing / unexpected / misshapen keys, a
      non-float weight, or NaN/Inf values.
  """
  if arch.startswith(STUDENT_PREFIX):
    return _student_converter().variables_from_state_dict(
        arch,
        state_dict,
        source=source,
        allow_nonfinite=allow_nonfinite,
        **kwargs,
    )
  module = _create(arch, **kwargs)
  leaves, shapes = _layout(module)
  expected = {leaf.torch_key: _torch_shape(leaf, shapes) for leaf in leaves}
  optional = [leaf.torch_key for leaf in leaves if not leaf.collection]
  check_keys(state_dict, expected, f"{source} (as {arch})", optional=optional)
  variables = {}
  for leaf in leaves:
    # No collection: `num_batches_tracked`, an integer counter we do not keep.
    if leaf.collection:
      value = torch_io.float_weight(
          leaf.torch_key,
          state_dict[leaf.torch_key],
          source,
          allow_nonfinite=allow_nonfinite,
      )
      _set(variables, (leaf.collection,) + leaf.path, leaf.from_torch(value))
  return module, variables


def state_dict_from_variables(
    arch: str, variables: Any, **kwargs: Any
) -> dict[str, np.ndarray]:
  """The reverse map: Flax variables -> a PyTorch-ordered state dict.

  Args:
    arch: registry name.
    variables: `{'params': ..., 'batch_stats': ...}` of the model.
    **kwargs: the constructor arguments the variables were made with.

  Returns:
    `{torch key: array}` with PyTorch's key names, shapes and order;
    `num_batches_tracked` is an int64 0-d zero (only read by PyTorch when
    BatchNorm momentum is None).
  """
  if arch.startswith(STUDENT_PREFIX):
    return _student_converter().state_dict_from_variables(
        arch, variables, **kwargs
    )
  leaves, _ = _layout(_create(arch, **kwargs))
  out = {}
  for leaf in leaves:
    if leaf.collection:
      value = np.asarray(_get(variables[leaf.collection], leaf.path))
      out[leaf.torch_key] = np.ascontiguousarray(leaf.to_torch(value))
    else:
      out[leaf.torch_key] = np.zeros((), np.int64)
  return out


def load_face_model(
    path: str | os.PathLike,
    arch: str,
    *,
    allow_nonfinite: bool = False,
    **kwargs: Any,
):
  """Reads a face-network `.pth` into `(module, variables)`.

  Args:
    path: PyTorch state dict (insightface backbone, SynthDistill student,
      or timm ImageNet TinyNet for initialising a student).
    arch: registry name.
    allow_nonfinite: keep NaN/Inf weights instead of refusing them.
    **kwargs: constructor arguments (`bn_eps=2e-5` for old MXNet ports,
      `dtype='bfloat16'`, ...).

  Returns:
    `(module, variables)`.

  Raises:
    FileNotFoundError, UnsafePickleError, ValueError: one line each, naming
      the file.
  """
  path = os.fspath(path)
  if not arch.startswith(STUDENT_PREFIX) and arch not in FACE_ARCHS:
    raise ValueError(
        f"{path}: unknown face-model architecture {arch!r}; known:"
        f" {', '.join(FACE_ARCHS)} and tinyfar_a/b/c"
    )
  state_dict = load_state_dict(path)
  return variables_from_state_dict(
      arch,
      state_dict,
      source=path,
      allow_nonfinite=allow_nonfinite,
      **kwargs,
  )
