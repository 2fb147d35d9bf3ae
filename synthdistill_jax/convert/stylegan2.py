"""Converts official StyleGAN2 generators to `models.stylegan2` variables.

Two inputs:

* an NVIDIA network pickle (NVlabs/stylegan2-ada-pytorch `training.networks`
  or NVlabs/stylegan3 `training.networks_stylegan2`), read by
  `nvidia_pickle` without running anything from it; `G_ema` is converted
  and its init kwargs recovered from the pickle, with the writer's defaults
  for what is missing (reported in the metadata);
* a plain PyTorch `state_dict` (`torch.save(G.state_dict())`), read with
  `torch.load(weights_only=True)`, plus the generator config.

Every tensor is checked against a freshly initialised module of the config:
a missing, unexpected or misshapen tensor is a one-line `ConversionError`
naming the file and the key.
"""

import json
import os
import pathlib
import zipfile
from typing import Any

import jax
import numpy as np

from synthdistill_jax.convert import nvidia_pickle
from synthdistill_jax.convert import torch_io
from synthdistill_jax.models import stylegan2

# The official 4x4 `resample_filter` buffer: setup_filter([1,3,3,1]).
OFFICIAL_FILTER = np.outer(*(2 * [stylegan2.RESAMPLE_FILTER]))

# Constructor defaults of the two code bases that write StyleGAN2 pickles.
WRITERS = {
    "stylegan3": dict(
        code="NVlabs/stylegan3 training/networks_stylegan2.py",
        channel_base=32768,
        channel_max=512,
        num_fp16_res=4,
        conv_clamp=256,
        w_avg_beta=0.998,
    ),
    "stylegan2-ada": dict(
        code="NVlabs/stylegan2-ada-pytorch training/networks.py",
        channel_base=32768,
        channel_max=512,
        num_fp16_res=0,
        conv_clamp=None,
        w_avg_beta=0.995,
    ),
}
COMMON_DEFAULTS = dict(
    mapping_layers=8,
    architecture="skip",
    embed_features=None,
    layer_features=None,
    lr_multiplier=0.01,
)
G_POSITIONAL = ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels")
# Init kwargs that do not change the computation (memory layout, defaults of
# the fused-conv switch, the class name the training script resolves).
IGNORED_KWARGS = {"fp16_channels_last", "fused_modconv_default", "class_name"}
# Init kwargs that exist upstream but are only supported at one value.
FIXED_KWARGS = {
    "activation": "lrelu",
    "use_noise": True,
    "kernel_size": 3,
    "resample_filter": [1, 3, 3, 1],
    "channels_last": False,
}
MAPPING_KWARGS = {
    "num_layers": "mapping_layers",
    "embed_features": "embed_features",
    "layer_features": "layer_features",
    "lr_multiplier": "lr_multiplier",
    "w_avg_beta": "w_avg_beta",
}
SYNTHESIS_KWARGS = (
    "channel_base",
    "channel_max",
    "num_fp16_res",
    "conv_clamp",
    "architecture",
)


class ConversionError(ValueError):
  """A checkpoint that cannot be converted; the message is one line."""


def _plain(value):
  """JSON-friendly copy of recovered kwargs (numpy scalars, EasyDicts)."""
  if isinstance(value, dict):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  return repr(value)


def _check_fixed(source, name, value):
  if name in IGNORED_KWARGS:
    return
  if name not in FIXED_KWARGS:
    raise ConversionError(f"{source}: unsupported init kwarg {name}={value!r}")
  if _plain(value) != FIXED_KWARGS[name]:
    raise ConversionError(
        f"{source}: unsupported {name}={_plain(value)!r} (only"
        f" {FIXED_KWARGS[name]!r} is implemented)"
    )


def _writer(source, g: nvidia_pickle.PersistentObject) -> str:
  """Which code base wrote the generator (refusing StyleGAN3 proper)."""
  if g.class_name != "Generator":
    raise ConversionError(
        f"{source}: G_ema is a {g.class_name}, not a Generator"
    )
  synthesis = g.modules.get("synthesis")
  if not isinstance(synthesis, nvidia_pickle.PersistentObject):
    raise ConversionError(f"{source}: G_ema has no synthesis network")
  children = list(synthesis.modules)
  if "input" in children or any(c.startswith("L0_") for c in children):
    raise ConversionError(
        f"{source}: unsupported architecture: StyleGAN3 alias-free generator"
        " (training.networks_stylegan3); only StyleGAN2 generators convert"
    )
  if "b4" not in children:
    raise ConversionError(
        f"{source}: unsupported architecture: synthesis network without a b4"
        f" block (children: {', '.join(children)})"
    )
  if "synthesis_kwargs" in g.init_kwargs:
    return "stylegan2-ada"
  # stylegan3's Generator takes the synthesis kwargs flat, and its modules
  # store attributes that stylegan2-ada's do not.
  block = synthesis.modules["b4"]
  if set(SYNTHESIS_KWARGS) & set(g.init_kwargs):
    return "stylegan3"
  if "num_fp16_res" in synthesis.state:
    return "stylegan3"
  if "fused_modconv_default" in block.state:
    return "stylegan3"
  return "stylegan2-ada"


def _gather_kwargs(source, g, writer):
  """The generator's, mapping's and synthesis' init kwargs, merged."""
  top = dict(zip(G_POSITIONAL, g.init_args), **g.init_kwargs)
  mapping_kw = dict(top.pop("mapping_kwargs", None) or {})
  synthesis_kw = dict(top.pop("synthesis_kwargs", None) or {})
  for name in list(top):
    if name not in G_POSITIONAL:
      synthesis_kw[name] = top.pop(name)
  mapping, synthesis = g.modules["mapping"], g.modules["synthesis"]
  for key, value in mapping.init_kwargs.items():
    if key not in G_POSITIONAL + ("num_ws",):
      mapping_kw.setdefault(key, value)
  for key, value in synthesis.init_kwargs.items():
    if key not in G_POSITIONAL:
      synthesis_kw.setdefault(key, value)
  for name, value in list(mapping_kw.items()):
    if name not in MAPPING_KWARGS:
      _check_fixed(source, name, value)
  for name, value in list(synthesis_kw.items()):
    if name not in SYNTHESIS_KWARGS:
      _check_fixed(source, name, value)
  return top, mapping_kw, synthesis_kw


def _state_attributes(g) -> dict[str, Any]:
  """Config values stored as plain attributes in the modules' state."""
  mapping, synthesis = g.modules["mapping"], g.modules["synthesis"]
  b4 = synthesis.modules["b4"]
  found = {k: g.state[k] for k in G_POSITIONAL if k in g.state}
  found["mapping_layers"] = mapping.state.get("num_layers")
  found["w_avg_beta"] = mapping.state.get("w_avg_beta", "missing")
  fc0 = mapping.modules.get("fc0")
  if fc0 is not None and "bias_gain" in fc0.state:
    found["lr_multiplier"] = float(fc0.state["bias_gain"])
  conv1 = b4.modules.get("conv1")
  if conv1 is not None and "conv_clamp" in conv1.state:
    found["conv_clamp"] = conv1.state["conv_clamp"]
  found["architecture"] = b4.state.get("architecture")
  if "num_fp16_res" in synthesis.state:
    found["num_fp16_res"] = synthesis.state["num_fp16_res"]
  else:
    blocks = [m for m in synthesis.modules.values() if "use_fp16" in m.state]
    if blocks:
      found["num_fp16_res"] = sum(bool(m.state["use_fp16"]) for m in blocks)
  return {k: v for k, v in found.items() if v is not None and v != "missing"}


def recover_config(source, g: nvidia_pickle.PersistentObject):
  """Recovers the `Generator` kwargs of a pickled NVIDIA generator.

  Args:
    source: file name for messages.
    g: the `G_ema` persistent object.

  Returns:
    `(kwargs, metadata)`: kwargs for `stylegan2.create`, and a record of the
    writer, the original init kwargs and which defaults were used.
  """
  writer = _writer(source, g)
  top, mapping_kw, synthesis_kw = _gather_kwargs(source, g, writer)
  given = dict(top)
  given.update({MAPPING_KWARGS[k]: v for k, v in mapping_kw.items()})
  given.update(
      {k: synthesis_kw[k] for k in SYNTHESIS_KWARGS if k in synthesis_kw}
  )
  attributes = _state_attributes(g)
  defaults = dict(COMMON_DEFAULTS, **WRITERS[writer])
  del defaults["code"]
  kwargs, from_state, from_defaults = {}, {}, {}
  names = G_POSITIONAL + tuple(defaults)
  for name in names:
    if name in given:
      kwargs[name] = given[name]
    elif name in attributes:
      kwargs[name] = from_state[name] = attributes[name]
    elif name in defaults:
      kwargs[name] = from_defaults[name] = defaults[name]
    else:
      raise ConversionError(f"{source}: G_ema does not record {name}")
  kwargs = _plain(kwargs)
  metadata = dict(
      format="nvidia-pickle",
      writer=WRITERS[writer]["code"],
      init_kwargs=_plain(g.init_kwargs),
      values_from_state=_plain(from_state),
      defaults_used=_plain(from_defaults),
  )
  return kwargs, metadata


def _torch_key(collection: str, path: tuple[str, ...]) -> str:
  del collection  # Buffers and params share the PyTorch name space.
  return ".".join(path)


def _to_flax(name: str, value: np.ndarray) -> np.ndarray:
  """PyTorch layout -> Flax layout of one tensor."""
  leaf = name.rsplit(".", 1)[-1]
  if leaf == "weight" and value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  if leaf == "weight" and value.ndim == 2:
    return value.T
  if leaf == "const" and value.ndim == 3:
    return value.transpose(1, 2, 0)
  return value


def _torch_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """Flax shape -> the PyTorch shape of the same tensor (for messages)."""
  leaf = name.rsplit(".", 1)[-1]
  if leaf == "weight" and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if leaf == "weight" and len(shape) == 2:
    return (shape[1], shape[0])
  if leaf == "const" and len(shape) == 3:
    return (shape[2], shape[0], shape[1])
  return tuple(shape)


def expected_shapes(module: stylegan2.Generator) -> dict[str, tuple]:
  """`{PyTorch key: (collection, flax path, flax shape)}` for a config."""
  tree = jax.eval_shape(
      lambda k: stylegan2.init_variables(module, k), jax.random.key(0)
  )
  result = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = tuple(p.key for p in path)
    result[_torch_key(names[0], names[1:])] = (names[0], names[1:], leaf.shape)
  return result


def state_dict_to_variables(
    state_dict: dict[str, np.ndarray],
    module: stylegan2.Generator,
    source: str = "<state_dict>",
    *,
    allow_nonfinite: bool = False,
) -> dict:
  """Maps an official StyleGAN2 `state_dict` onto the module's variables.

  Args:
    state_dict: official keys (`mapping.fc0.weight`, ...) -> arrays.
    module: the `Generator` of the same configuration.
    source: file name for messages.
    allow_nonfinite: keep NaN/Inf values instead of refusing them.

  Returns:
    `{'params': ..., 'buffers': ...}` of float32 numpy arrays.

  Raises:
    ConversionError: a missing, unexpected or misshapen key, a
      `resample_filter` other than the official [1,3,3,1] one, a tensor that
      is not floating point (refused, not cast) or holds NaN/Inf.
  """
  expected = expected_shapes(module)
  variables = {}
  for name, value in state_dict.items():
    value = np.asarray(value)
    if name.endswith("resample_filter"):
      if value.shape != OFFICIAL_FILTER.shape or not np.allclose(
          value, OFFICIAL_FILTER, atol=1e-7
      ):
        raise ConversionError(
            f"{source}: unsupported {name} (only setup_filter([1,3,3,1]))"
        )
      continue
    if name not in expected:
      raise ConversionError(f"{source}: unexpected key {name}")
    collection, path, shape = expected[name]
    if value.shape != _torch_shape(name, shape):
      raise ConversionError(
          f"{source}: {name} has shape {list(value.shape)}, expected"
          f" {list(_torch_shape(name, shape))}"
      )
    try:
      value = torch_io.float_weight(
          name, value, source, allow_nonfinite=allow_nonfinite
      )
    except ValueError as e:
      raise ConversionError(str(e)) from None
    node = variables.setdefault(collection, {})
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = _to_flax(name, value)
  missing = [k for k in expected if k not in state_dict]
  if missing:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise ConversionError(f"{source}: missing key {missing[0]}{more}")
  return variables


def _normalise_config(config) -> dict[str, Any]:
  """`Generator` kwargs from a dict/JSON file in Flax or NVIDIA spelling.

  NVIDIA-style `mapping_kwargs` / `synthesis_kwargs` are flattened.
  """
  if isinstance(config, (str, os.PathLike)):
    try:
      config = json.loads(pathlib.Path(config).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ConversionError(
          f"config {os.fspath(config)}: not a readable JSON file"
          f" ({type(e).__name__}: {e})"
      ) from None
  if not isinstance(config, dict):
    raise ConversionError(
        f"config: expected a JSON object of generator kwargs, got"
        f" {type(config).__name__}"
    )
  config = dict(config)
  mapping_kw = dict(config.pop("mapping_kwargs", None) or {})
  config.update(config.pop("synthesis_kwargs", None) or {})
  for key, value in mapping_kw.items():
    if key not in MAPPING_KWARGS:
      raise ConversionError(
          f"config: unsupported mapping kwarg {key}={value!r}"
      )
    config[MAPPING_KWARGS[key]] = value
  for key in IGNORED_KWARGS:
    config.pop(key, None)
  return config


def _read_state_dict(path: str) -> dict[str, np.ndarray]:
  torch = nvidia_pickle._torch()  # pylint: disable=protected-access
  try:
    # The shared reader: one line, and never torch's advice to load unsafely.
    obj = torch_io.read_file(path)
  except (ValueError, OSError) as e:
    raise ConversionError(str(e)) from None
  if not isinstance(obj, dict):
    raise ConversionError(
        f"{path}: holds a {type(obj).__name__}, not a state dict"
    )
  result = {}
  for key, value in obj.items():
    if not isinstance(value, torch.Tensor):
      raise ConversionError(
          f"{path}: {key} is a {type(value).__name__}, not a tensor"
      )
    result[str(key)] = nvidia_pickle._to_numpy(value)  # pylint: disable=protected-access
  return result


def read_checkpoint(path, config=None):
  """Reads a StyleGAN2 checkpoint into kwargs, state dict and metadata.

  Args:
    path: an NVIDIA `.pkl`, or a `torch.save`d state dict when `config`
      is given.
    config: None for pickles; for state dicts the `Generator` kwargs (dict or
      JSON file; NVIDIA's nested `mapping_kwargs`/`synthesis_kwargs` work).

  Returns:
    `(kwargs, state_dict, metadata)`.

  Raises:
    ConversionError, safe_pickle.UnsafePickleError: one-line messages.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ConversionError(torch_io.not_a_file(path))
  if config is not None:
    kwargs = _normalise_config(config)
    metadata = dict(format="state_dict", defaults_used={})
    return kwargs, _read_state_dict(path), metadata
  if zipfile.is_zipfile(path):
    raise ConversionError(
        f"{path}: a torch.save archive, not an NVIDIA pickle; pass the"
        " generator config (--config) to read it as a state dict"
    )
  data = nvidia_pickle.load_pickle(path)
  if not isinstance(data, dict) or "G_ema" not in data:
    keys = list(data) if isinstance(data, dict) else type(data).__name__
    raise ConversionError(f"{path}: no G_ema in the pickle (found {keys})")
  g = data["G_ema"]
  if not isinstance(g, nvidia_pickle.PersistentObject):
    raise ConversionError(
        f"{path}: G_ema is a {type(g).__name__}, not a network"
    )
  kwargs, metadata = recover_config(path, g)
  try:
    state = nvidia_pickle.state_dict(g)
  except ValueError as e:
    raise ConversionError(f"{path}: G_ema.{e}") from None
  return kwargs, state, metadata


def load_stylegan2(path, config=None, *, allow_nonfinite=False, **overrides):
  """Converts an official StyleGAN2 checkpoint: `(module, variables)`.

  Args:
    path: NVIDIA `.pkl` (stylegan2-ada-pytorch or stylegan3), or a state dict
      `.pt`/`.pth` together with `config`.
    config: generator kwargs for state dicts (dict or JSON path).
    allow_nonfinite: keep NaN/Inf values instead of refusing them.
    **overrides: `Generator` attributes to change, e.g. `dtype`, which do
      not change the variables.

  Returns:
    The `Generator` and its variables (numpy float32).
  """
  kwargs, state, _ = read_checkpoint(path, config)
  try:
    module = stylegan2.create("stylegan2", **kwargs, **overrides)
  except (TypeError, ValueError) as e:
    raise ConversionError(
        f"{os.fspath(path)}: bad generator config ({e})"
    ) from None
  return module, state_dict_to_variables(
      state, module, os.fspath(path), allow_nonfinite=allow_nonfinite
  )
