"""Model registry and the on-disk format of converted and trained models.

A model folder holds `model.json` (which architecture, with which constructor
arguments, a checksum per array, plus free-form metadata such as where it was
converted from) and `variables/`, an orbax checkpoint of the Flax variables.
Reading it back needs neither PyTorch nor the original checkpoint:

  module, variables = synthdistill_jax.models.load(directory)
  emb = module.apply(variables, x_nhwc)

Each model module (`iresnet`, `mobilefacenet`, `tinynet`, `stylegan2`) exposes
`ARCHS` (the names it builds) and `create(arch, **kwargs) -> nn.Module`, and
optionally `FROZEN_PARAMS`, the parameter paths the reference never trains.
"""

import importlib
import json
import os
from typing import Any

from etils import epath
import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp

from synthdistill_jax import integrity

FORMAT = "synthdistill-jax-model/1"
MODEL_JSON = "model.json"
VARIABLES_DIR = "variables"
# `model.json` metadata key: the converter was told to keep NaN/Inf values.
ALLOW_NONFINITE = "allow_nonfinite"
# `model.json` keys: array name -> `integrity.checksums`, and its algorithm.
CHECKSUMS = "checksums"
CHECKSUM_ALGORITHM = "checksum_algorithm"

# Architecture name -> module of `synthdistill_jax.models` that builds it.
_ARCH_MODULES = {
    "iresnet18": "iresnet",
    "iresnet34": "iresnet",
    "iresnet50": "iresnet",
    "iresnet100": "iresnet",
    "iresnet200": "iresnet",
    "mobilefacenet": "mobilefacenet",
    "tinyfar_a": "tinynet",
    "tinyfar_b": "tinynet",
    "tinyfar_c": "tinynet",
    "stylegan2": "stylegan2",
}


def architectures() -> list[str]:
  """All architecture names the registry knows."""
  return sorted(_ARCH_MODULES)


def create_model(arch: str, **kwargs: Any) -> nn.Module:
  """Builds the Flax module of `arch` with constructor overrides `kwargs`."""
  if arch not in _ARCH_MODULES:
    raise ValueError(
        f"unknown architecture {arch!r}; known: {', '.join(architectures())}"
    )
  module = importlib.import_module(
      f"synthdistill_jax.models.{_ARCH_MODULES[arch]}"
  )
  return module.create(arch, **kwargs)


def frozen_params(arch: str) -> tuple[tuple[str, ...], ...]:
  """Parameter paths of `arch` that the reference code does not train.

  Args:
    arch: an architecture name (see `architectures()`).

  Returns:
    Paths into the `params` collection, e.g. `(('features', 'scale'),)` for
    the IResNets; empty for architectures that train every parameter.
  """
  if arch not in _ARCH_MODULES:
    raise ValueError(
        f"unknown architecture {arch!r}; known: {', '.join(architectures())}"
    )
  module = importlib.import_module(
      f"synthdistill_jax.models.{_ARCH_MODULES[arch]}"
  )
  return tuple(getattr(module, "FROZEN_PARAMS", ()))


def resolve_path(path: str | os.PathLike) -> epath.Path:
  """An `epath.Path`: local paths made absolute, URIs (gs://...) kept."""
  path = epath.Path(path)
  return path if "://" in os.fspath(path) else path.absolute()


def _to_numpy(tree):
  return jax.tree.map(np.asarray, tree)


def save(
    directory: str | os.PathLike,
    arch: str,
    kwargs: dict[str, Any],
    variables: Any,
    metadata: dict[str, Any] | None = None,
) -> epath.Path:
  """Writes a model folder: `model.json` and an orbax checkpoint.

  Args:
    directory: folder to create; must not hold a model already.
    arch: registry name (`iresnet100`, `tinyfar_a`, `stylegan2`, ...).
    kwargs: JSON-serialisable constructor arguments for `create_model`.
    variables: the Flax variables (`{'params': ..., 'batch_stats': ...}`).
    metadata: anything else worth keeping (source file, defaults used, ...).

  Returns:
    The absolute path of the folder.
  """
  directory = resolve_path(directory)
  if (directory / MODEL_JSON).exists():
    raise FileExistsError(f"{directory} already holds a model")
  create_model(arch, **kwargs)  # Fails early on a bad arch or kwargs.
  directory.mkdir(parents=True, exist_ok=True)
  variables = _to_numpy(variables)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(directory / VARIABLES_DIR, variables)
    ckptr.wait_until_finished()
  config = {
      "format": FORMAT,
      "arch": arch,
      "kwargs": kwargs,
      "metadata": metadata or {},
      CHECKSUM_ALGORITHM: integrity.ALGORITHM,
      CHECKSUMS: integrity.checksums(variables),
  }
  (directory / MODEL_JSON).write_text(json.dumps(config, indent=2) + "\n")
  return directory


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
  """Reads and checks `model.json` of a model folder."""
  path = epath.Path(directory) / MODEL_JSON
  if not path.is_file():
    raise FileNotFoundError(
        f"{directory}: not a model folder (no {MODEL_JSON}); convert a"
        " checkpoint with tools/convert_*.py first"
    )
  try:
    config = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None
  if config.get("format") != FORMAT:
    raise ValueError(
        f"{path}: unknown format {config.get('format')!r}, expected {FORMAT!r}"
    )
  if config.get("arch") not in _ARCH_MODULES:
    raise ValueError(f"{path}: unknown architecture {config.get('arch')!r}")
  sums = config.get(CHECKSUMS, {})
  if not isinstance(sums, dict) or not all(
      isinstance(k, str) and isinstance(v, str) for k, v in sums.items()
  ):
    raise ValueError(
        f"{path}: {CHECKSUMS!r} must map array names to checksum strings"
    )
  return config


def abstract_variables(arch: str, module: nn.Module) -> Any:
  """The variables `module.init` would create, as `ShapeDtypeStruct`s.

  Args:
    arch: the registry name `module` was built from.
    module: the Flax module.

  Returns:
    `jax.eval_shape` of the module's initialisation (nothing is computed).
  """
  key = jax.random.key(0)
  if _ARCH_MODULES[arch] == "stylegan2":
    stylegan2 = importlib.import_module("synthdistill_jax.models.stylegan2")
    return jax.eval_shape(lambda k: stylegan2.init_variables(module, k), key)
  size = getattr(module, "input_size", 112)
  x = jax.ShapeDtypeStruct((1, size, size, 3), np.float32)
  return jax.eval_shape(lambda k, x: module.init(k, x, train=False), key, x)


def _flat(tree: Any) -> dict[str, Any]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {
      "/".join(str(getattr(p, "key", p)) for p in path): leaf
      for path, leaf in flat
  }


def check_variables(
    source: str,
    variables: Any,
    expected: Any,
    *,
    allow_nonfinite: bool = False,
    checksums: dict[str, str] | None = None,
) -> None:
  """Checks read variables against the shapes and dtypes a config implies.

  Args:
    source: what to name in the message (the folder).
    variables: the arrays read.
    expected: `abstract_variables` of the module `model.json` describes.
    allow_nonfinite: accept NaN/Inf values.
    checksums: `integrity.checksums` of the variables as written (None: not
      checked).

  Raises:
    ValueError: one line naming the first missing, unexpected, misshapen,
      mistyped, changed (checksum) or non-finite array (and how many more
      arrays are wrong).
  """
  got, want = _flat(variables), _flat(expected)
  problems = [
      f"array {k} is missing (expected shape {tuple(want[k].shape)})"
      for k in want
      if k not in got
  ]
  problems += [f"unexpected array {k}" for k in got if k not in want]
  nonfinite = {}
  for k in (k for k in want if k in got):
    found, spec = got[k], want[k]
    if tuple(np.shape(found)) != tuple(spec.shape):
      problems.append(
          f"array {k} has shape {tuple(np.shape(found))}, model.json implies"
          f" {tuple(spec.shape)}"
      )
    elif np.asarray(found).dtype != spec.dtype:
      problems.append(
          f"array {k} has dtype {np.asarray(found).dtype}, expected"
          f" {np.dtype(spec.dtype)}"
      )
    elif not allow_nonfinite and not np.isfinite(found).all():
      bad = int(np.size(found) - np.count_nonzero(np.isfinite(found)))
      nonfinite[k] = f"array {k} has {bad} non-finite value(s) (NaN/Inf)"
  if checksums is not None and not problems:
    # Before NaN/Inf: changed bytes can read as NaN, and the cause is the
    # file, not the model (such an array is named once).
    changed = integrity.mismatches(checksums, integrity.checksums(variables))
    problems += [
        f"array {k} differs from its checksum in model.json: the files"
        " changed after they were written (convert or export it again)"
        for k in changed
    ]
    nonfinite = {k: v for k, v in nonfinite.items() if k not in changed}
  problems += list(nonfinite.values())
  if problems:
    more = len(problems) - 1
    raise ValueError(
        f"{source}: {problems[0]}"
        + (f" (and {more} more problem(s))" if more else "")
    )


def load(
    directory: str | os.PathLike,
    *,
    allow_nonfinite: bool | None = None,
    **overrides: Any,
):
  """Reads a model folder back, checking every array.

  Args:
    directory: a folder written by `save` (or by the conversion tools).
    allow_nonfinite: accept NaN/Inf values; None takes `model.json`'s record
      (set when a converter was run with `--allow_nonfinite`).
    **overrides: constructor arguments to change, e.g. `dtype='bfloat16'`.

  Returns:
    `(module, variables)`, variables as host numpy arrays.

  Raises:
    FileNotFoundError, ValueError: one line naming the folder: no or a bad
      `model.json`, unreadable variables, or an array whose name, shape or
      dtype differs from what `model.json` implies (`jax.eval_shape` of the
      module's init), or that holds NaN/Inf.
  """
  config = read_config(directory)
  kwargs = dict(config["kwargs"], **overrides)
  try:
    module = create_model(config["arch"], **kwargs)
  except TypeError as e:
    raise ValueError(
        f"{epath.Path(directory) / MODEL_JSON}: bad kwargs ({e})"
    ) from None
  path = resolve_path(directory) / VARIABLES_DIR
  if not path.is_dir():
    raise FileNotFoundError(f"{directory}: no {VARIABLES_DIR}/ folder")
  try:
    with ocp.StandardCheckpointer() as ckptr:
      variables = ckptr.restore(path)
  except Exception as e:  # pylint: disable=broad-except
    # orbax/tensorstore raise many types for damaged files; all one line.
    first = (str(e).strip().splitlines() or [""])[0][:200]
    raise ValueError(
        f"{path}: cannot read the variables ({type(e).__name__}: {first})"
    ) from None
  variables = _to_numpy(variables)
  if allow_nonfinite is None:
    allow_nonfinite = bool(config.get("metadata", {}).get(ALLOW_NONFINITE))
  # Folders written before checksums (or by a later algorithm): unchecked.
  checksums = None
  if config.get(CHECKSUM_ALGORITHM) == integrity.ALGORITHM:
    checksums = config.get(CHECKSUMS, {})
  check_variables(
      str(directory),
      variables,
      abstract_variables(config["arch"], module),
      allow_nonfinite=allow_nonfinite,
      checksums=checksums,
  )
  return module, variables
