"""Exports a trained student (or any face model folder) to PyTorch or ONNX.

  python tools/export_student.py --checkpoint WORKDIR/student --format torch \\
      [--output student.pth]
  python tools/export_student.py --checkpoint WORKDIR --format onnx \\
      [--output student.onnx]

`--checkpoint` is a model folder (`model.json` + variables) or a training
workdir holding `student/`. `torch` writes a state dict with the reference
keys (SynthDistill `LightNetwork` for tinyfar_*, insightface for iresnet* and
mobilefacenet) that `torch.load(weights_only=True)` and a strict
`load_state_dict` accept. `onnx` writes a dynamic-batch model: input `input`
NCHW float32 normalised like the network's training input, output
`embedding`. Afterwards the same random batch is embedded with JAX, PyTorch
(and onnxruntime) and the max |difference| printed; `--tolerance` makes a
larger one an error, and the file is then kept as `OUTPUT.rejected`, not
at `OUTPUT`. Needs the `export` extra. Errors are one line on stderr
and exit status 1.
"""

import argparse
import os
import pathlib
import sys

from synthdistill_jax import errors
from synthdistill_jax import platforms
from synthdistill_jax import safe_pickle
from synthdistill_jax import validation
from synthdistill_jax.export import student


def parse_args(argv: list[str]) -> argparse.Namespace:
  """Parses the command line (see the module docstring)."""
  parser = errors.ArgumentParser(
      description=__doc__.split("\n\n", maxsplit=1)[0]
  )
  parser.add_argument(
      "--checkpoint", required=True, help="model folder or workdir"
  )
  parser.add_argument("--format", required=True, choices=("torch", "onnx"))
  parser.add_argument(
      "--output", help="file to write (default CHECKPOINT/student.pth|.onnx)"
  )
  parser.add_argument(
      "--tolerance",
      type=float,
      default=1e-4,
      help="max |export - JAX| allowed on the check batch",
  )
  parser.add_argument(
      "--no-check", action="store_true", help="skip the output comparison"
  )
  return parser.parse_args(argv)


def export(args: argparse.Namespace) -> None:
  """Writes the file, compares its outputs with JAX, then puts it in place.

  Written under a temporary name beside `--output` and renamed only once
  the comparison passes: a run stopped half-way, or an export whose outputs
  differ, never leaves a file at `--output` that looks finished.
  """
  model_dir = student.resolve_model_dir(args.checkpoint)
  suffix = "pth" if args.format == "torch" else "onnx"
  output = pathlib.Path(args.output or model_dir / f"student.{suffix}")
  validation.check_output_file(str(output), "--output", f"student.{suffix}")
  temporary = output.with_name(f".{output.name}.tmp-{os.getpid()}")
  try:
    if args.format == "torch":
      student.export_torch(model_dir, temporary)
      onnx_path = None
    else:
      onnx_path = student.export_onnx(model_dir, temporary)
    if not args.no_check:
      _check(model_dir, onnx_path, args.tolerance, output, temporary)
    os.replace(temporary, output)
  finally:
    temporary.unlink(missing_ok=True)
  print(f"wrote {output}")


def _check(model_dir, onnx_path, tolerance, output, temporary) -> None:
  """Compares the export with JAX; a failed one is set aside, not installed."""
  diffs = student.compare(model_dir, onnx_path)
  print(
      "max |export - JAX| on a random batch: "
      + ", ".join(f"{k} {v:.3g}" for k, v in diffs.items())
  )
  worst = max(v for k, v in diffs.items() if k != "max_abs_ref")
  if worst > tolerance:
    rejected = output.with_name(output.name + ".rejected")
    os.replace(temporary, rejected)
    raise ValueError(
        f"{output}: outputs differ from JAX by {worst:.3g} > --tolerance"
        f" {tolerance:g}; nothing written there (the export is kept as"
        f" {rejected} for inspection)"
    )


@errors.exit_on_ctrl_c
def main(argv: list[str] | None = None) -> int:
  """Runs the tool; returns the exit status."""
  platforms.skip_absent_tpu()  # Before JAX starts its runtimes.
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    export(args)
  except (
      OSError,
      ValueError,
      ImportError,
      safe_pickle.UnsafePickleError,
  ) as e:
    message = " ".join(str(e).split())  # Always exactly one line.
    print(f"export_student: error: {message}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
