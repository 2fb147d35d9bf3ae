"""Safe readers for PyTorch checkpoints and name maps to Flax variables.

Nothing read from a checkpoint is ever executed: NVIDIA `.pkl` files go
through a restricted unpickler, `.pth` state dicts through
`torch.load(weights_only=True)`. PyTorch (the `convert` extra) is needed here
and nowhere else.
"""

import importlib


def load_stylegan2(path, **kwargs):
  """Reads an NVIDIA StyleGAN2 `.pkl` (or a state dict): `(module, variables)`.

  See `synthdistill_jax.convert.stylegan2.load_stylegan2`.
  """
  stylegan2 = importlib.import_module("synthdistill_jax.convert.stylegan2")
  return stylegan2.load_stylegan2(path, **kwargs)


def load_face_model(path, arch, **kwargs):
  """Reads a face-network `.pth` for `arch`: `(module, variables)`.

  See `synthdistill_jax.convert.face.load_face_model`.
  """
  face = importlib.import_module("synthdistill_jax.convert.face")
  return face.load_face_model(path, arch, **kwargs)
