"""Converts an official StyleGAN2 checkpoint into a synthdistill-jax model folder.

  python tools/convert_stylegan2.py --input stylegan2-ffhq-256x256.pkl \
      --output models/stylegan2-ffhq-256

reads an NVIDIA `.pkl` (NVlabs/stylegan3 or stylegan2-ada-pytorch; `G_ema`)
without running anything from it, or a `torch.save`d state dict with
`--config generator.json`, and writes `model.json` plus an orbax checkpoint
that `synthdistill_jax.models.stylegan2.load(DIR)` reads without PyTorch.
Errors are one line on stderr and a non-zero exit status: a tensor holding
NaN/Inf is refused unless `--allow_nonfinite` is given, a non-float tensor
is refused rather than cast.
"""

import json
import pathlib
import sys

from synthdistill_jax import errors
from synthdistill_jax import models
from synthdistill_jax import platforms
from synthdistill_jax import progress
from synthdistill_jax import safe_pickle
from synthdistill_jax.convert import stylegan2 as convert_stylegan2


def parse_args(argv):
  """Parses the command line."""
  parser = errors.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--input", required=True, help=".pkl or state dict")
  parser.add_argument("--output", required=True, help="model folder to write")
  parser.add_argument(
      "--config",
      default=None,
      help="JSON generator kwargs, required for a state dict input",
  )
  parser.add_argument(
      "--allow_nonfinite",
      action="store_true",
      help="convert tensors holding NaN/Inf instead of refusing them",
  )
  progress.add_argument(parser)
  return parser.parse_args(argv)


def convert(
    input_path: str,
    output: str,
    config: str | None = None,
    allow_nonfinite: bool = False,
    progress_bar: bool = True,
) -> str:
  """Converts one checkpoint.

  Args:
    input_path: NVIDIA pickle or state dict.
    output: model folder to create.
    config: JSON file of generator kwargs (state dicts only).
    allow_nonfinite: keep NaN/Inf tensors (recorded in `model.json`, so that
      `models.load` reads them back) instead of refusing them.
    progress_bar: show the phases (reading, converting, saving).

  Returns:
    A one-line summary of what was written.
  """
  if pathlib.Path(output, models.registry.MODEL_JSON).exists():
    raise convert_stylegan2.ConversionError(f"{output}: already holds a model")
  name = pathlib.Path(input_path).name
  with progress.phases(
      f"convert {name}",
      ("reading", "converting", "saving"),
      enabled=progress_bar,
  ) as phase:
    with phase("reading"):
      kwargs, state, metadata = convert_stylegan2.read_checkpoint(
          input_path, config
      )
    with phase("converting"):
      try:
        module = models.create_model("stylegan2", **kwargs)
      except (TypeError, ValueError) as e:
        raise convert_stylegan2.ConversionError(
            f"{input_path}: bad generator config ({e})"
        ) from None
      variables = convert_stylegan2.state_dict_to_variables(
          state, module, input_path, allow_nonfinite=allow_nonfinite
      )
    with phase("saving"):
      metadata = dict(metadata, source=name)
      if allow_nonfinite:
        metadata[models.registry.ALLOW_NONFINITE] = True
      models.save(output, "stylegan2", kwargs, variables, metadata)
  defaults = metadata.get("defaults_used") or {}
  note = f"; writer defaults used: {json.dumps(defaults)}" if defaults else ""
  return (
      f"wrote {output}: {kwargs['img_resolution']}px StyleGAN2, num_ws"
      f" {module.num_ws}, {len(state)} tensors{note}"
  )


@errors.exit_on_ctrl_c
def main(argv=None) -> int:
  """Entry point; returns the exit status."""
  platforms.skip_absent_tpu()  # Before JAX starts its runtimes.
  args = parse_args(argv)
  try:
    print(
        convert(
            args.input,
            args.output,
            args.config,
            args.allow_nonfinite,
            args.progress,
        )
    )
  except (
      convert_stylegan2.ConversionError,
      safe_pickle.UnsafePickleError,
      ImportError,
      OSError,
  ) as e:
    message = " ".join(str(e).split())
    print(f"error: {message}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
