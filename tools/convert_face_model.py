"""Converts a PyTorch face-network checkpoint into a synthdistill-jax model.

  python tools/convert_face_model.py --arch iresnet100 \\
      --input backbone.pth --output models/arcface_r100 [--summary]

Architectures: iresnet18/34/50/100/200 and mobilefacenet (insightface
`arcface_torch` backbones), tinyfar_a/b/c (a SynthDistill student checkpoint,
or a timm ImageNet TinyNet checkpoint to initialise a student). The file is
read with `torch.load(weights_only=True)`: nothing in it is run. Keys must
match exactly (`module.` prefixes are stripped; `num_batches_tracked` may be
absent). The output folder holds `model.json` and an orbax checkpoint, read
back without torch by `synthdistill_jax.models.load(DIR)`.

Weights must be floating point (an integer tensor is refused, not cast;
the integer `num_batches_tracked` counters are skipped) and finite (NaN/Inf
refused unless `--allow_nonfinite`, which `model.json` then records).

`--summary` prints PyTorch-style parameter counts (running statistics
excluded) per top-level module and in total, with the reference count of the
official model when the architecture has its default shape. Errors are one
line on stderr and exit status 1.
"""

import argparse
import collections
import hashlib
import os
import sys

from synthdistill_jax import errors
from synthdistill_jax import models
from synthdistill_jax import platforms
from synthdistill_jax import progress
from synthdistill_jax import safe_pickle
from synthdistill_jax.convert import face

# PyTorch parameter counts of the official models at default settings,
# `sum(p.numel() for p in model.parameters())` (IResNet, MobileFaceNet:
# insightface arcface_torch; TinyFaR: SynthDistill). IResNet counts include
# `features.weight` (512), a parameter upstream freezes at 1: insightface's
# "65,155,648" for r100 is the trainable count.
REFERENCE_PARAMS = {
    "iresnet18": 24_025_600,
    "iresnet34": 34_139_328,
    "iresnet50": 43_590_848,
    "iresnet100": 65_156_160,
    "iresnet200": 118_833_920,
    "mobilefacenet": 2_059_520,
    "tinyfar_a": 5_562_844,
    "tinyfar_b": 3_105_434,
    "tinyfar_c": 1_832_106,
}
# Parameters PyTorch keeps frozen (requires_grad=False), per arch prefix.
FROZEN = {"iresnet": ("features.weight",)}
# Constructor arguments that do not change the parameter count.
_COUNT_NEUTRAL = {"bn_eps", "dtype", "dropout"}
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def parse_args(argv: list[str]) -> argparse.Namespace:
  """Parses the command line (see the module docstring)."""
  parser = errors.ArgumentParser(
      description=__doc__.split("\n\n", maxsplit=1)[0]
  )
  parser.add_argument("--arch", required=True, help="architecture name")
  parser.add_argument("--input", required=True, help="PyTorch .pth file")
  parser.add_argument("--output", help="model folder to write")
  parser.add_argument(
      "--summary", action="store_true", help="print parameter counts"
  )
  parser.add_argument(
      "--bn-eps",
      type=float,
      default=None,
      help="BatchNorm epsilon (default 1e-5; 2e-5 for old MXNet ports)",
  )
  parser.add_argument(
      "--allow_nonfinite",
      action="store_true",
      help="convert weights holding NaN/Inf instead of refusing them",
  )
  parser.add_argument(
      "--dtype",
      default=None,
      help="compute dtype saved in model.json (float32, bfloat16)",
  )
  progress.add_argument(parser)
  args = parser.parse_args(argv)
  if not args.output and not args.summary:
    parser.error("give --output DIR, --summary, or both")
  return args


def count_parameters(
    arch: str, variables, kwargs
) -> tuple[dict[str, int], int]:
  """PyTorch parameter counts per top-level module, in state-dict order.

  Args:
    arch: registry name.
    variables: the converted Flax variables.
    kwargs: their constructor arguments.

  Returns:
    `({top-level module: count}, frozen)`: running statistics are buffers in
    PyTorch and not counted; `frozen` counts parameters upstream does not
    train (IResNet's `features.weight`).
  """
  state_dict = face.state_dict_from_variables(arch, variables, **kwargs)
  frozen_keys = [
      key
      for prefix, keys in FROZEN.items()
      if arch.startswith(prefix)
      for key in keys
  ]
  counts = collections.OrderedDict()
  for key, value in state_dict.items():
    if key.rsplit(".", 1)[-1] in _BUFFERS:
      continue
    top = key.split(".", 1)[0]
    counts[top] = counts.get(top, 0) + int(value.size)
  frozen = sum(int(state_dict[k].size) for k in frozen_keys)
  return counts, frozen


def format_summary(arch: str, counts: dict[str, int], frozen: int, kwargs):
  """The `--summary` table as text."""
  width = max(len(k) for k in counts) + 2
  lines = [f"{arch}: parameters (PyTorch count, running statistics excluded)"]
  lines += [f"  {k:<{width}}{v:>14,}" for k, v in counts.items()]
  total = sum(counts.values())
  line = f"  {'total':<{width}}{total:>14,}"
  reference = REFERENCE_PARAMS.get(arch)
  if reference is not None and set(kwargs) <= _COUNT_NEUTRAL:
    verdict = "matches" if total == reference else "DIFFERS FROM"
    line += f"  ({verdict} the reference {reference:,})"
  lines.append(line)
  if frozen:
    lines.append(
        f"  {'trainable':<{width}}{total - frozen:>14,}  ({frozen:,} frozen"
        " upstream)"
    )
  return "\n".join(lines)


def sha256(path: str) -> str:
  """Hex SHA-256 of a file."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def convert(args: argparse.Namespace) -> None:
  """Reads, checks, optionally summarises and writes the model."""
  kwargs = {}
  if args.bn_eps is not None:
    kwargs["bn_eps"] = args.bn_eps
  if args.dtype is not None:
    kwargs["dtype"] = args.dtype
  if args.output and os.path.exists(
      os.path.join(args.output, models.registry.MODEL_JSON)
  ):
    raise FileExistsError(f"{args.output}: already holds a model")
  names = ("reading and converting",) + (
      ("checksum", "saving") if args.output else ()
  )
  with progress.phases(
      f"convert {os.path.basename(args.input)}",
      names,
      enabled=args.progress,
  ) as phase:
    with phase(names[0]):
      _, variables = face.load_face_model(
          args.input,
          args.arch,
          allow_nonfinite=args.allow_nonfinite,
          **kwargs,
      )
    if args.output:
      with phase("checksum"):
        digest = sha256(args.input)
      with phase("saving"):
        metadata = {
            "source": os.path.abspath(args.input),
            "sha256": digest,
            "converted_by": "tools/convert_face_model.py",
        }
        if args.allow_nonfinite:
          metadata[models.registry.ALLOW_NONFINITE] = True
        path = models.save(args.output, args.arch, kwargs, variables, metadata)
  if args.summary:
    counts, frozen = count_parameters(args.arch, variables, kwargs)
    print(format_summary(args.arch, counts, frozen, kwargs))
  if args.output:
    print(f"wrote {path}")


@errors.exit_on_ctrl_c
def main(argv: list[str] | None = None) -> int:
  """Runs the tool; returns the exit status."""
  platforms.skip_absent_tpu()  # Before JAX starts its runtimes.
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    convert(args)
  except (
      OSError,
      ValueError,
      ImportError,
      safe_pickle.UnsafePickleError,
  ) as e:
    message = " ".join(str(e).split())  # Always exactly one line.
    print(f"convert_face_model: error: {message}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
