"""Name map between TinyFaR PyTorch state dicts and the Flax variables.

Two inputs are understood:

* a SynthDistill student (`otroshi/synthdistill` `LightNetwork`): timm keys
  under `cnn.` plus `fc.weight` / `fc.bias`;
* a timm ImageNet `tinynet_a/b/c` state dict: timm keys without prefix and
  `classifier.weight` / `classifier.bias`, which are dropped; the 512-d `fc`
  head is then freshly initialised from `seed`.

The reverse map writes the SynthDistill layout (same keys, order, shapes and
dtypes as `LightNetwork.state_dict()`), so students trained here can be
exported to PyTorch; a round trip is exact. No PyTorch is needed: values are
numpy arrays (torch tensors are accepted and converted).
"""

import collections
import functools
import logging
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from synthdistill_jax.convert import torch_io
from synthdistill_jax.models import tinynet

SYNTHDISTILL = "synthdistill"
TIMM = "timm"

# PyTorch parameter/buffer name -> (Flax collection, leaf name), per layer kind.
_LEAVES = {
    "conv": (("weight", "params", "kernel"),),
    "conv_bias": (
        ("weight", "params", "kernel"),
        ("bias", "params", "bias"),
    ),
    "bn": (
        ("weight", "params", "scale"),
        ("bias", "params", "bias"),
        ("running_mean", "batch_stats", "mean"),
        ("running_var", "batch_stats", "var"),
        ("num_batches_tracked", None, None),
    ),
    "linear": (
        ("weight", "params", "kernel"),
        ("bias", "params", "bias"),
    ),
}


def _block_layers(spec: tinynet.BlockSpec) -> list[tuple[str, str]]:
  """(name, kind) of a block's layers in PyTorch registration order."""
  se = [("se.conv_reduce", "conv_bias"), ("se.conv_expand", "conv_bias")]
  if spec.kind == "ds":
    return [
        ("conv_dw", "conv"),
        ("bn1", "bn"),
        *se,
        ("conv_pw", "conv"),
        ("bn2", "bn"),
    ]
  return [
      ("conv_pw", "conv"),
      ("bn1", "bn"),
      ("conv_dw", "conv"),
      ("bn2", "bn"),
      *se,
      ("conv_pwl", "conv"),
      ("bn3", "bn"),
  ]


def _layers(module: tinynet.TinyFaR) -> Iterator[tuple[str, tuple, str]]:
  """(torch key prefix, Flax module path, kind) for every layer, in order."""
  yield "cnn.conv_stem", ("conv_stem",), "conv"
  yield "cnn.bn1", ("bn1",), "bn"
  for i, stage in enumerate(module.block_specs()):
    for j, spec in enumerate(stage):
      for name, kind in _block_layers(spec):
        path = (f"blocks_{i}_{j}", *name.split("."))
        yield f"cnn.blocks.{i}.{j}.{name}", path, kind
  yield "cnn.conv_head", ("conv_head",), "conv"
  yield "cnn.bn2", ("bn2",), "bn"
  yield "fc", ("fc",), "linear"


def _entries(module):
  """(torch key, Flax collection or None, Flax path) for every entry."""
  for prefix, path, kind in _layers(module):
    for torch_name, collection, leaf in _LEAVES[kind]:
      yield f"{prefix}.{torch_name}", collection, path + (leaf,)


def _to_torch_layout(value: np.ndarray) -> np.ndarray:
  """Flax conv HWIO -> PyTorch OIHW; Dense [in, out] -> Linear [out, in]."""
  if value.ndim == 4:
    return value.transpose(3, 2, 0, 1)
  if value.ndim == 2:
    return value.T
  return value


def _to_flax_layout(value: np.ndarray) -> np.ndarray:
  """PyTorch OIHW -> Flax HWIO; Linear [out, in] -> Dense [in, out]."""
  if value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  if value.ndim == 2:
    return value.T
  return value


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree, path, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _init_shapes(module: tinynet.TinyFaR):
  x = jax.ShapeDtypeStruct((1, 112, 112, 3), jnp.float32)
  return jax.eval_shape(module.init, jax.random.key(0), x)


def expected_shapes(arch: str, **kwargs: Any) -> dict[str, tuple[int, ...]]:
  """The SynthDistill state dict layout of `arch`: key -> shape, in order.

  Args:
    arch: 'tinyfar_a', 'tinyfar_b' or 'tinyfar_c'.
    **kwargs: constructor overrides for `tinynet.create`.

  Returns:
    An ordered dict of every `LightNetwork.state_dict()` key and its shape.
  """
  return collections.OrderedDict(
      _cached_shapes(arch, tuple(sorted(kwargs.items())))
  )


@functools.lru_cache(maxsize=16)
def _cached_shapes(arch, kwargs_items):
  # Tracing the network takes seconds; the layout only depends on the config.
  module = tinynet.create(arch, **dict(kwargs_items))
  shapes = _init_shapes(module)
  out = []
  for key, collection, path in _entries(module):
    if collection is None:
      out.append((key, ()))
    else:
      shape = _get(shapes[collection], path).shape
      out.append(
          (key, tuple(_to_torch_layout(np.empty(shape, np.bool_)).shape))
      )
  return tuple(out)


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # A torch tensor; avoid importing torch.
    value = value.detach().cpu().numpy()
  return np.asarray(value)


def detect_format(
    state_dict: dict[str, Any], source: str = "state dict"
) -> str:
  """'synthdistill' (`cnn.*` + `fc.*`) or 'timm' (ImageNet `tinynet_x`).

  Args:
    state_dict: key -> array, after any `module.` prefix is removed.
    source: what to name in the error message.

  Returns:
    `SYNTHDISTILL` or `TIMM`.
  """
  if "cnn.conv_stem.weight" in state_dict:
    return SYNTHDISTILL
  if "conv_stem.weight" in state_dict:
    return TIMM
  raise ValueError(
      f"{source}: neither a SynthDistill student (no 'cnn.conv_stem.weight')"
      " nor a timm tinynet state dict (no 'conv_stem.weight')"
  )


def _normalise(state_dict, source):
  """numpy values, no `module.` prefix, SynthDistill key names."""
  sd = torch_io.strip_prefix({k: _to_numpy(v) for k, v in state_dict.items()})
  fmt = detect_format(sd, source)
  if fmt == TIMM:
    for k in ("classifier.weight", "classifier.bias"):
      sd.pop(k, None)
    sd = {f"cnn.{k}": v for k, v in sd.items()}
  return sd, fmt


def variables_from_state_dict(
    arch: str,
    state_dict: dict[str, Any],
    *,
    seed: int = 0,
    source: str = "state dict",
    allow_nonfinite: bool = False,
    **kwargs: Any,
):
  """Maps a PyTorch TinyFaR / timm tinynet state dict to Flax variables.

  Args:
    arch: 'tinyfar_a', 'tinyfar_b' or 'tinyfar_c'.
    state_dict: key -> numpy array or torch tensor (see the module docstring
      for the two accepted layouts; a DataParallel `module.` prefix is
      removed). `num_batches_tracked` entries may be absent.
    seed: initialises the `fc` head when the input is a timm ImageNet
      checkpoint (which has none).
    source: named in error messages (the file path).
    allow_nonfinite: keep NaN/Inf weights instead of refusing them.
    **kwargs: constructor overrides for `tinynet.create`.

  Returns:
    `(module, variables)` with float32 `{'params', 'batch_stats'}`.
  """
  module = tinynet.create(arch, **kwargs)
  sd, fmt = _normalise(state_dict, source)
  expected = expected_shapes(arch, **kwargs)
  optional = tuple(k for k in expected if k.endswith(".num_batches_tracked"))
  if fmt == TIMM:
    optional += ("fc.weight", "fc.bias")
  torch_io.check_keys(sd, expected, f"{source} (as {arch})", optional)
  variables = {"params": {}, "batch_stats": {}}
  for key, collection, path in _entries(module):
    if collection is None or key not in sd:
      continue
    value = torch_io.float_weight(
        key, sd[key], source, allow_nonfinite=allow_nonfinite
    )
    value = _to_flax_layout(value)
    _set(variables[collection], path, np.ascontiguousarray(value))
  if fmt == TIMM:
    fan_in = module.head_features()
    head = tinynet.create_head(module.embedding_size, fan_in)
    init = head.init(jax.random.key(seed), jnp.zeros((1, fan_in)))
    variables["params"]["fc"] = jax.tree.map(np.asarray, init["params"])
    logging.info(
        "%s: timm ImageNet tinynet checkpoint; classifier dropped, fc head"
        " freshly initialised with seed %d",
        source,
        seed,
    )
  return module, variables


def state_dict_from_variables(
    arch: str,
    variables: dict[str, Any],
    *,
    num_batches_tracked: int = 0,
    **kwargs: Any,
) -> dict[str, np.ndarray]:
  """Writes Flax variables as a SynthDistill `LightNetwork.state_dict()`.

  Args:
    arch: 'tinyfar_a', 'tinyfar_b' or 'tinyfar_c'.
    variables: `{'params', 'batch_stats'}` of `tinynet.create(arch, **kwargs)`.
    num_batches_tracked: value of every BatchNorm's counter (we do not track
      it; PyTorch only reads it when BatchNorm momentum is None).
    **kwargs: constructor overrides for `tinynet.create`.

  Returns:
    An ordered dict key -> numpy array: float32 tensors in PyTorch layout and
    int64 0-d `num_batches_tracked`, in PyTorch's key order.
  """
  module = tinynet.create(arch, **kwargs)
  out = collections.OrderedDict()
  for key, collection, path in _entries(module):
    if collection is None:
      out[key] = np.array(num_batches_tracked, np.int64)
      continue
    try:
      value = np.asarray(_get(variables[collection], path), np.float32)
    except KeyError:
      raise ValueError(
          f"{arch}: variables lack {collection}/{'/'.join(path)} (for {key})"
      ) from None
    out[key] = np.ascontiguousarray(_to_torch_layout(value))
  return out
