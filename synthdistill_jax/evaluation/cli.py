r"""Command line of the face-recognition evaluation.

Any face model folder works: a trained student, a converted teacher, or any
converted checkpoint (see `synthdistill_jax.models.load`); a PyTorch `.pth`
with `--arch` is converted on the fly (needs the `convert` extra).

  python -m synthdistill_jax.evaluate --model DIR \
      --bins lfw.bin,cfp_fp.bin,agedb_30.bin [--output DIR/eval]
  python -m synthdistill_jax.evaluate --workdir WORKDIR --bins ...   # WORKDIR/student
  python -m synthdistill_jax.evaluate --model DIR --ijb_meta_dir IJBC/meta \
      --ijb_image_dir IJBC/loose_crop --ijb_name ijbc

Writes `report.md`, `report.json`, `roc_<benchmark>.png` and, for IJB, the
per-pair scores `scores_<benchmark>.npy`. Every input is validated before
the model is loaded; a bad input (a flag, a missing, hostile or malformed
file, a model whose arrays do not match its `model.json`) prints one line
naming it and exits with status 2, and so do NaN/Inf embeddings (no
accuracy is reported for them). Nothing in a `.pth`/`.bin` given to it is
ever run.

During training, `create_training_evaluator(config.evals, module, mesh)`
builds the same evaluation once (inputs validated at start, one
compilation) for every epoch, on any number of processes.

Images are normalised `(x / 255 - 0.5) / 0.5` for every network, as
insightface's evaluation does; each image and its horizontal flip are
embedded in one jitted call of a fixed batch size (the last batch is padded),
sharded over all devices on a 1-D 'data' mesh.
"""

import os
import pathlib
import sys

from absl import flags
from absl import logging
import ml_collections

from synthdistill_jax import errors
from synthdistill_jax import platforms
from synthdistill_jax import progress
from synthdistill_jax import safe_pickle
from synthdistill_jax.data import verification_bin
from synthdistill_jax.evaluation import benchmarks
from synthdistill_jax.evaluation import ijb
from synthdistill_jax.evaluation import reports
from synthdistill_jax.evaluation import settings

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the CLI flags.

  Only called when this module runs as a program, so that importing it (the
  trainer does) cannot clash with the trainer's own flags such as --workdir.
  """
  flags.DEFINE_string("model", None, "Model folder (or a .pth with --arch).")
  flags.DEFINE_string("workdir", None, "Training workdir: evaluates W/student.")
  flags.DEFINE_string("arch", None, "Architecture of a .pth given to --model.")
  flags.DEFINE_list("bins", [], "Comma-separated insightface .bin files.")
  flags.DEFINE_string("ijb_meta_dir", "", "IJB meta folder ('' skips IJB).")
  flags.DEFINE_string("ijb_image_dir", "", "IJB image folder (loose crops).")
  flags.DEFINE_string("ijb_name", "ijbc", "IJB meta prefix: ijbb or ijbc.")
  flags.DEFINE_bool("ijb_aligned", False, "IJB images are aligned 112x112.")
  flags.DEFINE_enum(
      "ijb_warp",
      ijb.DEFAULT_WARP,
      list(ijb.WARPS),
      "IJB alignment: cv2.warpAffine of OpenCV 4 (bit for bit, as the"
      " published numbers) or OpenCV 5 (float kernel).",
  )
  flags.DEFINE_integer("batch_size", 64, "Images per device call.")
  flags.DEFINE_string("output", None, "Report folder (default MODEL/eval).")
  progress.define_flag()


def _resolve_paths() -> tuple[pathlib.Path, pathlib.Path]:
  if bool(FLAGS.model) == bool(FLAGS.workdir):
    raise ValueError("give exactly one of --model and --workdir")
  if FLAGS.workdir:
    model = pathlib.Path(FLAGS.workdir) / "student"
    default_out = pathlib.Path(FLAGS.workdir) / "eval"
  else:
    model = pathlib.Path(FLAGS.model)
    default_out = (model.parent if model.is_file() else model) / "eval"
  if not model.exists() and FLAGS.workdir:
    if (model.parent / "model.json").exists():
      raise FileNotFoundError(
          f"--workdir={FLAGS.workdir} is a model folder, not a training"
          f" workdir: give --model={FLAGS.workdir}"
      )
    raise FileNotFoundError(
        f"{model}: no such model folder (the trainer writes WORKDIR/student"
        " at its first checkpoint)"
    )
  if not model.exists():
    raise FileNotFoundError(f"{model}: no such model folder or file")
  output = pathlib.Path(FLAGS.output) if FLAGS.output else default_out
  _check_output(output)
  return model, output


def _check_output(output: pathlib.Path) -> None:
  """The report folder must be creatable: checked before any work."""
  if output.exists() and not output.is_dir():
    raise FileExistsError(f"--output {output}: exists and is not a folder")
  parent = output
  while not parent.exists():
    parent = parent.parent
  if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
    raise PermissionError(f"--output {output}: {parent} is not writable")


def _check_flags() -> None:
  if FLAGS.batch_size < 1:
    raise ValueError(f"--batch_size={FLAGS.batch_size}: must be at least 1")
  if FLAGS.ijb_meta_dir:
    for flag in ("ijb_meta_dir", "ijb_image_dir"):
      value = FLAGS[flag].value
      if not value or not os.path.isdir(value):
        raise FileNotFoundError(f"--{flag}={value!r}: no such folder")
    if not FLAGS.ijb_name:
      raise ValueError("--ijb_name is empty; give ijbb or ijbc")


def load_model(path: pathlib.Path, arch: str | None):
  """A face model folder, or a PyTorch `.pth` converted on the fly (`--arch`).

  Args:
    path: a model folder, or a state-dict file.
    arch: the architecture of a state-dict file.

  Returns:
    `(module, variables)`.

  Raises:
    ValueError, OSError, UnsafePickleError, ImportError: one line each (a
      StyleGAN2 folder, a hostile or corrupt file, a shape mismatch, ...).
  """
  if path.is_file():
    if not arch:
      raise ValueError(f"{path}: a checkpoint file needs --arch")
    from synthdistill_jax import convert  # pylint: disable=g-import-not-at-top

    return convert.load_face_model(str(path), arch)
  from synthdistill_jax import models  # pylint: disable=g-import-not-at-top

  config = models.registry.read_config(path)
  if config["arch"] == "stylegan2":
    raise ValueError(
        f"{path}: holds a StyleGAN2 generator, not a face recognition model"
    )
  return models.load(path)


def _evals_config_from_flags() -> ml_collections.ConfigDict:
  config = settings.default_evals_config()
  config.bins = list(FLAGS.bins)
  config.batch_size = FLAGS.batch_size
  config.ijb.meta_dir = FLAGS.ijb_meta_dir
  config.ijb.image_dir = FLAGS.ijb_image_dir
  config.ijb.name = FLAGS.ijb_name if FLAGS.ijb_meta_dir else ""
  config.ijb.aligned = FLAGS.ijb_aligned
  config.ijb.warp = FLAGS.ijb_warp
  return config


# Mistakes in what the user gave (flags, files, models): one line, status 2.
# UnsafePickleError is a pickle.UnpicklingError, not a ValueError.
_USER_ERRORS = (
    verification_bin.BinFormatError,
    ijb.IJBFormatError,
    safe_pickle.UnsafePickleError,
    OSError,
    ImportError,
    ValueError,
)
# Problems found while evaluating that come from the data or the model.
_RUN_ERRORS = (
    benchmarks.NonFiniteEmbeddingError,
    verification_bin.BinFormatError,
    ijb.IJBFormatError,
)
USAGE_STATUS = 2


def _fail(error: BaseException) -> None:
  message = " ".join(str(error).split())  # Always exactly one line.
  print(f"error: {message}", file=sys.stderr)
  sys.exit(USAGE_STATUS)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with a flag mistake as one line and status 2."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    _fail(e)


@errors.exit_on_ctrl_c
def main(argv: list[str]) -> None:
  """Validates every input, loads the model, evaluates, writes the report."""
  platforms.skip_absent_tpu()  # Before JAX starts its runtimes.
  # Bad input (files, flags, model folder) is one line on stderr and status
  # 2, before anything runs; errors after this point are bugs and keep
  # their traceback, except what the data or the model cause (NaN
  # embeddings, an unreadable IJB image).
  if not FLAGS["verbosity"].present:
    # orbax logs every restore at INFO; an error must stay one line.
    logging.set_verbosity(logging.WARNING)
  try:
    if len(argv) > 1:
      raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
    _check_flags()
    model_path, output = _resolve_paths()
    config = _evals_config_from_flags()
    inputs = benchmarks.read_inputs(config, progress_bar=FLAGS.progress)
    if not inputs.bins and inputs.ijb_meta is None:
      raise ValueError("nothing to evaluate: give --bins and/or --ijb_meta_dir")
    module, variables = load_model(model_path, FLAGS.arch)
  except _USER_ERRORS as e:
    _fail(e)
  try:
    results = benchmarks.evaluate_all(
        config, module, variables, inputs, progress_bar=FLAGS.progress
    )
  except _RUN_ERRORS as e:
    _fail(e)
  reports.write_report(
      output,
      results,
      title=f"Evaluation of {model_path}",
      extra={"model": str(model_path.absolute()), "argv": sys.argv[1:]},
  )
  print((output / "report.md").read_text())
  print(f"report written to {output}")
