"""The `config.evals` block and its helpers (no heavy imports).

The base config (`configs/__init__.py`) builds its `evals` block here, so
reading a config does not import the evaluator.
"""

import ml_collections

from synthdistill_jax import errors

# The IJB alignment kernel used unless `config.evals.ijb.warp` says otherwise
# (see `ijb.warp_affine`): OpenCV 4's cv2.warpAffine, bit for bit.
DEFAULT_WARP = "opencv4"


def default_evals_config() -> ml_collections.ConfigDict:
  """The `config.evals` block: which benchmarks the trainer runs."""
  config = ml_collections.ConfigDict()
  config.bins = ()  # Paths of insightface .bin files ('lfw.bin', ...).
  config.batch_size = 64  # Images per device call.
  config.ijb = ml_collections.ConfigDict()
  config.ijb.meta_dir = ""  # IJB meta folder; '' skips IJB.
  config.ijb.image_dir = ""  # Folder of the images the meta files name.
  config.ijb.name = ""  # 'ijbb' or 'ijbc' (the meta file prefix).
  config.ijb.aligned = False  # Images are aligned 112x112 faces already.
  # Alignment kernel: 'opencv4' = cv2.warpAffine of OpenCV <= 4.x, bit for
  # bit (the published insightface numbers); 'opencv5' = OpenCV 5's float.
  config.ijb.warp = DEFAULT_WARP
  return config


def config_error(message: str) -> Exception:
  """The trainer's one-line error for `config.evals` fields."""
  return errors.ConfigError(message)


def bin_paths(evals_config) -> list:
  paths = evals_config.get("bins", None) or []
  if isinstance(paths, str):  # `--config.evals.bins=a.bin,b.bin`
    paths = [p for p in paths.split(",") if p]
  return list(paths)
