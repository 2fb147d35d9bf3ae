"""Export a JAX face model (a trained student, or any model folder) to PyTorch.

* `export_torch`: a `.pth` state dict with the reference code's exact keys,
  shapes and order (`synthdistill_jax.convert.face.state_dict_from_variables`),
  saved as plain tensors so `torch.load(weights_only=True)` reads it; it is
  checked by a strict `load_state_dict` into the PyTorch twin.
* `export_onnx`: the PyTorch twin with those weights, exported with the
  TorchScript-based ONNX exporter (`dynamo=False`: the torch.export-based
  default needs `onnxscript`), input `input` NCHW float32 [batch, 3, 112,
  112] normalised as the network expects, output `embedding` [batch, D]
  (raw, not L2-normalised), dynamic batch.
* `compare`: embeds the same batch with JAX, PyTorch and onnxruntime.
"""

import os
import pathlib
from typing import Any

import numpy as np

from synthdistill_jax import models
from synthdistill_jax.models import registry

INPUT_NAME = "input"
OUTPUT_NAME = "embedding"
ONNX_OPSET = 17


def resolve_model_dir(path: str | os.PathLike) -> pathlib.Path:
  """A model folder, or a training workdir holding `student/`."""
  path = pathlib.Path(path)
  for candidate in (path, path / "student"):
    if (candidate / registry.MODEL_JSON).is_file():
      return candidate
  raise FileNotFoundError(
      f"{path}: neither a model folder nor a workdir with student/"
      f"{registry.MODEL_JSON}"
  )


def load(model_dir: pathlib.Path):
  """Returns `(arch, kwargs, module, variables)` of a model folder."""
  config = registry.read_config(model_dir)
  module, variables = models.load(model_dir)
  return config["arch"], dict(config["kwargs"]), module, variables


def torch_state_dict(arch: str, kwargs: dict[str, Any], variables):
  """`{key: torch.Tensor}` in the reference layout."""
  import torch  # pylint: disable=g-import-not-at-top
  from synthdistill_jax.convert import face  # pylint: disable=g-import-not-at-top

  arrays = face.state_dict_from_variables(arch, variables, **kwargs)
  return {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}


def build_torch_model(arch: str, kwargs: dict[str, Any], variables):
  """The PyTorch twin, loaded strictly with the model's weights (eval)."""
  from synthdistill_jax.export import torch_nets  # pylint: disable=g-import-not-at-top

  model = torch_nets.create(arch, **kwargs)
  model.load_state_dict(torch_state_dict(arch, kwargs, variables), strict=True)
  return model.eval()


def export_torch(model_dir, output) -> pathlib.Path:
  """Writes the state dict and checks it reloads safely and strictly.

  Args:
    model_dir: a model folder.
    output: the `.pth` file to write.

  Returns:
    The written path.
  """
  import torch  # pylint: disable=g-import-not-at-top
  from synthdistill_jax.export import torch_nets  # pylint: disable=g-import-not-at-top

  arch, kwargs, _, variables = load(pathlib.Path(model_dir))
  output = pathlib.Path(output)
  output.parent.mkdir(parents=True, exist_ok=True)
  torch.save(torch_state_dict(arch, kwargs, variables), output)
  reloaded = torch.load(output, map_location="cpu", weights_only=True)
  torch_nets.create(arch, **kwargs).load_state_dict(reloaded, strict=True)
  return output


def export_onnx(model_dir, output, opset: int = ONNX_OPSET) -> pathlib.Path:
  """Writes an ONNX file of the model (dynamic batch, NCHW input).

  Args:
    model_dir: a model folder.
    output: the `.onnx` file to write.
    opset: ONNX opset version.

  Returns:
    The written path.
  """
  import torch  # pylint: disable=g-import-not-at-top

  arch, kwargs, _, variables = load(pathlib.Path(model_dir))
  model = build_torch_model(arch, kwargs, variables)
  size = int(kwargs.get("input_size", 112))
  output = pathlib.Path(output)
  output.parent.mkdir(parents=True, exist_ok=True)
  torch.onnx.export(
      model,
      (torch.zeros(2, 3, size, size),),
      str(output),
      dynamo=False,
      input_names=[INPUT_NAME],
      output_names=[OUTPUT_NAME],
      dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
      opset_version=opset,
  )
  return output


def compare(model_dir, onnx_path=None, batch: int = 4, seed: int = 0):
  """Embeds one random batch with JAX, PyTorch and (optionally) ONNX.

  Args:
    model_dir: a model folder.
    onnx_path: an exported `.onnx` of it, or None.
    batch: images in the batch.
    seed: input seed.

  Returns:
    `{'max_abs_ref': ..., 'torch': max |torch - jax|, 'onnx': ...}`.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  arch, kwargs, module, variables = load(pathlib.Path(model_dir))
  size = int(kwargs.get("input_size", 112))
  x = np.random.default_rng(seed).uniform(-1, 1, (batch, size, size, 3))
  x = x.astype(np.float32)
  # Jitted: op-by-op dispatch of a whole network is far slower on CPU.
  apply = jax.jit(lambda v, x: module.apply(v, x, train=False))
  ref = np.asarray(apply(variables, x), np.float32)
  nchw = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
  with torch.no_grad():
    out = build_torch_model(arch, kwargs, variables)(torch.from_numpy(nchw))
  result = {
      "max_abs_ref": float(np.abs(ref).max()),
      "torch": float(np.abs(out.numpy() - ref).max()),
  }
  if onnx_path is not None:
    import onnxruntime  # pylint: disable=g-import-not-at-top

    session = onnxruntime.InferenceSession(
        str(onnx_path), providers=["CPUExecutionProvider"]
    )
    (onnx_out,) = session.run([OUTPUT_NAME], {INPUT_NAME: nchw})
    result["onnx"] = float(np.abs(onnx_out - ref).max())
  return result
