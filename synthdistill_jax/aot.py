"""Ahead-of-time compile of the training iteration for a TPU slice, on a CPU.

  python -m synthdistill_jax.aot --config=configs/synthdistill.py:tinyfar_a \
      --topology=v5e:2x2 --output=aot.json \
      --config.generator.dtype=bfloat16 --config.teacher.dtype=bfloat16 \
      --config.student.dtype=bfloat16

Builds the config's run with `experiment.create(..., abstract=True)` on the
devices of a TPU topology description (`jax.experimental.topologies`; needs
the `tpu` extra, `pip install 'synthdistill-jax[tpu]'`, which installs
libtpu): the networks' weights are never read or allocated, only their
shapes (from `model.json` where a checkpoint folder exists, else the paper's
networks). It lowers and compiles the same jitted iteration the trainer runs,
at the config's global batch, and reports per chip:

- HBM needed (arguments, outputs, temporaries, aliasing) against the chip's
  HBM, and whether it fits;
- FLOPs per image and bytes accessed (XLA's cost analysis);
- a roofline time per iteration: the larger of FLOPs / datasheet peak and
  bytes / HBM bandwidth, naming the bound (XLA's own `optimal_seconds` is
  reported too, but for programs this size it can come back negative);
  predicted images/s per chip and for the slice (two updates per iteration);
- compile time, spatial convolutions by operand dtype (counted on StableHLO,
  where convolutions and dots stay apart) and the collectives by kind.

Output: a table on stdout and a JSON file. A batch that does not divide the
chips, or a program that does not fit in HBM, is one line and exit 2 (the
JSON is written in the second case). All figures are XLA's estimates for a
slice nobody here has run on.
"""

import collections
import datetime
import json
import os
import re
import sys
from typing import Any

from absl import app
from absl import flags
import jax
import numpy as np

from synthdistill_jax import config_flags_cli
from synthdistill_jax import distill
from synthdistill_jax import errors
from synthdistill_jax import experiment
from synthdistill_jax import platforms
from synthdistill_jax import progress
from synthdistill_jax import validation

# libtpu looks for TPU worker hosts when it loads (there are none on a CPU
# host) and takes a machine-wide lock meant for real chips; a compile-only
# client needs neither, and several may run at once (tests, a sweep).
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

_CONFIG = config_flags_cli.define_config(
    "config", "Experiment config file (path[:arg])."
)
_TOPOLOGY = flags.DEFINE_string(
    "topology",
    None,
    "TPU slice as `<generation>:<shape>`, e.g. v5e:2x2, v5e:16x16,"
    " v5p:2x2x1, v4:2x2x1.",
)
_OUTPUT = flags.DEFINE_string("output", "aot.json", "JSON output path.")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", None, "Overrides schedule.batch_size (global batch)."
)
_PROGRESS = progress.define_flag()

# Per-chip datasheet figures: HBM bytes, HBM bandwidth (bytes/s) and dense
# bfloat16 peak (FLOP/s), matched against `device_kind` (lower case, first
# match wins). TPU v2/v3 expose one JAX device per core: figures per core.
CHIPS = (
    ("tpu v6 lite", dict(hbm=32 * 2**30, bandwidth=1640e9, peak=918e12)),
    ("tpu v5 lite", dict(hbm=16 * 2**30, bandwidth=819e9, peak=197e12)),
    ("tpu v5p", dict(hbm=95 * 2**30, bandwidth=2765e9, peak=459e12)),
    ("tpu v5", dict(hbm=95 * 2**30, bandwidth=2765e9, peak=459e12)),
    ("tpu v4", dict(hbm=32 * 2**30, bandwidth=1228e9, peak=275e12)),
    ("tpu v3", dict(hbm=16 * 2**30, bandwidth=450e9, peak=61.5e12)),
    ("tpu v2", dict(hbm=8 * 2**30, bandwidth=350e9, peak=22.5e12)),
)
COLLECTIVES = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "collective-permute",
    "all-to-all",
)


class AotError(ValueError):
  """A setting that cannot be compiled; the message is one line."""


def look_up_chip(device_kind: str) -> dict[str, float]:
  """Datasheet figures of a TPU `device_kind` (see `CHIPS`)."""
  kind = device_kind.lower()
  for name, figures in CHIPS:
    if name in kind:
      return figures
  raise AotError(f"no datasheet figures for device kind {device_kind!r}")


def get_topology_devices(topology: str) -> list:
  """The devices of a TPU topology description (compile-only devices).

  Args:
    topology: `<generation>:<shape>`, e.g. 'v5e:2x2'.

  Returns:
    The list of devices.
  """
  if not topology or ":" not in topology:
    raise AotError(
        f"--topology={topology!r}: expected <generation>:<shape>, e.g."
        " v5e:2x2 or v5p:2x2x1"
    )
  try:
    import libtpu  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    raise AotError(
        "libtpu is not installed: pip install 'synthdistill-jax[tpu]'"
    ) from None
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  try:
    desc = topologies.get_topology_desc(topology_name=topology, platform="tpu")
  except Exception as e:  # pylint: disable=broad-except
    # libtpu reports unknown names as XlaRuntimeError / ValueError.
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e)
    raise AotError(f"--topology={topology!r}: {first}") from None
  return list(desc.devices)


def count_convolutions(stablehlo: str) -> dict[str, int]:
  """Spatial convolutions by operand element type in StableHLO text.

  Args:
    stablehlo: `lowered.as_text()`.

  Returns:
    dtype name as XLA writes it ('bf16', 'f32', ...) -> count.
  """
  counts = collections.Counter()
  for line in stablehlo.splitlines():
    if "stablehlo.convolution" not in line:
      continue
    # The signature `: (tensor<...xbf16>, tensor<...>) -> tensor<...>`.
    match = re.search(r":\s*\(tensor<(?:[0-9?]+x)*([a-z]+[0-9]*)>", line)
    counts[match.group(1) if match else "unknown"] += 1
  return dict(sorted(counts.items()))


def count_collectives(hlo: str) -> dict[str, int]:
  """Collective ops of a compiled HLO module by kind."""
  counts = collections.Counter()
  pattern = re.compile(
      r"=\s*\S+\s+(" + "|".join(COLLECTIVES) + r")(?:-start)?\("
  )
  for line in hlo.splitlines():
    match = pattern.search(line)
    if match:
      counts[match.group(1)] += 1
  return dict(sorted(counts.items()))


def _first(analysis):
  if isinstance(analysis, (list, tuple)):
    return analysis[0] if analysis else None
  return analysis


def analyse(compiled, chip: dict, per_chip_batch: int) -> dict[str, Any]:
  """Memory, cost and roofline figures of a compiled SPMD iteration.

  Args:
    compiled: the compiled iteration (one program per chip).
    chip: datasheet figures from `look_up_chip`.
    per_chip_batch: images per chip per update.

  Returns:
    A dict of per-chip figures (see the module docstring).
  """
  mem = _first(compiled.memory_analysis())
  sizes = {
      name: int(getattr(mem, f"{name}_size_in_bytes", 0) or 0)
      for name in ("argument", "output", "temp", "alias", "generated_code")
  }
  hbm = (
      sizes["argument"]
      + sizes["output"]
      - sizes["alias"]
      + sizes["temp"]
      + sizes["generated_code"]
  )
  cost = _first(compiled.cost_analysis()) or {}
  flops = float(cost.get("flops", 0.0))
  bytes_accessed = float(cost.get("bytes accessed", 0.0))
  compute_s = flops / chip["peak"]
  memory_s = bytes_accessed / chip["bandwidth"]
  seconds = max(compute_s, memory_s)
  images = per_chip_batch * distill.UPDATES_PER_ITERATION
  return {
      "memory": {f"{k}_bytes": v for k, v in sizes.items()},
      "hbm_bytes_per_chip": hbm,
      "hbm_capacity_bytes": int(chip["hbm"]),
      "fits": hbm <= chip["hbm"],
      "flops_per_chip": flops,
      "flops_per_image": flops / images,
      "bytes_accessed_per_chip": bytes_accessed,
      "xla_optimal_seconds": float(cost.get("optimal_seconds", float("nan"))),
      "roofline_compute_s": compute_s,
      "roofline_memory_s": memory_s,
      "bound": "compute" if compute_s >= memory_s else "memory (HBM)",
      "seconds_per_iteration": seconds,
      "predicted_images_per_s_per_chip": images / seconds if seconds else 0.0,
  }


def compile_for_topology(
    config, topology: str, progress_bar: bool = True
) -> dict[str, Any]:
  """Compiles the config's iteration for a TPU slice and analyses it.

  Args:
    config: the experiment config (checkpoint fields may be rewritten to
      the paper's shapes where a folder is missing).
    topology: e.g. 'v5e:2x2'.
    progress_bar: show the phases (lowering, compiling, analysis).

  Returns:
    The record that goes into the JSON file.
  """
  # The chips a `<gen>:<AxBxC>` name asks for, checked before libtpu loads
  # (it prints a warning line on hosts without TPUs).
  shape = topology.split(":", 1)[-1].split("x")
  chips = (
      int(np.prod([int(d) for d in shape]))
      if all(d.isdigit() for d in shape)
      else 0
  )
  batch = int(config.schedule.batch_size)
  if config.mesh.num_devices:
    raise AotError(
        "mesh.num_devices: the ahead-of-time compile uses every chip of"
        " the slice; leave it at 0"
    )

  def check_batch(chips):
    if batch <= 0 or batch % chips:
      raise AotError(
          f"schedule.batch_size={batch} does not divide over the {chips}"
          f" chips of {topology}; use a multiple of {chips}"
      )

  if ":" in topology and chips:
    check_batch(chips)
  devices = get_topology_devices(topology)
  chips = len(devices)
  check_batch(chips)
  if config.sampler.kind == "static":
    raise AotError(
        "sampler.kind='static': compile the generator's path ('dynamic' or"
        " 'resample')"
    )
  chip = look_up_chip(devices[0].device_kind)
  exp = experiment.create(config, devices=devices, abstract=True)
  with progress.phases(
      f"aot {topology}",
      ("lowering", "compiling", "analysis"),
      enabled=progress_bar,
  ) as phase:
    with phase("lowering"):
      lowered = exp.iterate.lower(*exp.iterate_args())
      convolutions = count_convolutions(lowered.as_text())
    with phase("compiling"):
      compiled = lowered.compile()
    with phase("analysis"):
      collectives = count_collectives(compiled.as_text())
      analysis = analyse(compiled, chip, batch // chips)
  lower_s, compile_s = phase.seconds["lowering"], phase.seconds["compiling"]
  record = {
      "config": str(config.get("name", "")),
      "topology": topology,
      "device_kind": devices[0].device_kind,
      "chips": chips,
      "global_batch": batch,
      "per_chip_batch": batch // chips,
      "dtypes": {
          n: str(config[n].get("dtype") or "float32")
          for n in ("generator", "teacher", "student")
      },
      "weights": exp.weights,
      # 'auto' resolved for the slice's platform (`networks`).
      "upsample_method": exp.generator.module.upsample_method,
      # None for students without the setting (only TinyFaR has it).
      "pointwise_grad": getattr(exp.student.module, "pointwise_grad", None),
      "lower_s": lower_s,
      "compile_s": compile_s,
      "convolutions_by_dtype": convolutions,
      "collectives": collectives,
  }
  record.update(analysis)
  record["predicted_images_per_s"] = (
      record["predicted_images_per_s_per_chip"] * chips
  )
  return record


def format_table(r: dict[str, Any]) -> str:
  """The report of one compile as a small table."""
  gib = 2.0**30
  mem = r["memory"]
  rows = [
      ("config", f"{r['config']} ({r['weights']})"),
      (
          "slice",
          f"{r['topology']}: {r['chips']} x {r['device_kind']},"
          f" batch {r['global_batch']} ({r['per_chip_batch']} per chip)",
      ),
      ("dtypes", ", ".join(f"{k} {v}" for k, v in r["dtypes"].items())),
      (
          "HBM per chip",
          f"{r['hbm_bytes_per_chip'] / gib:.2f} of"
          f" {r['hbm_capacity_bytes'] / gib:.0f} GiB"
          f" ({'fits' if r['fits'] else 'DOES NOT FIT'}): arguments"
          f" {mem['argument_bytes'] / gib:.2f}, outputs"
          f" {mem['output_bytes'] / gib:.2f}, temporaries"
          f" {mem['temp_bytes'] / gib:.2f}, aliased"
          f" {mem['alias_bytes'] / gib:.2f}",
      ),
      ("FLOPs per image", f"{r['flops_per_image'] / 1e9:.1f} GFLOP"),
      (
          "time per iteration",
          f"{r['seconds_per_iteration'] * 1e3:.1f} ms ({r['bound']} bound;"
          f" compute {r['roofline_compute_s'] * 1e3:.1f} ms, HBM"
          f" {r['roofline_memory_s'] * 1e3:.1f} ms)",
      ),
      (
          "predicted images/s",
          f"{r['predicted_images_per_s_per_chip']:.0f} per chip,"
          f" {r['predicted_images_per_s']:.0f} for the slice",
      ),
      ("compile", f"{r['compile_s']:.1f} s (lowering {r['lower_s']:.1f} s)"),
      ("convolutions", json.dumps(r["convolutions_by_dtype"])),
      ("collectives", json.dumps(r["collectives"]) or "none"),
  ]
  width = max(len(k) for k, _ in rows)
  lines = ["Ahead-of-time compile (XLA's estimates, not measurements)"]
  lines += [f"  {k:<{width}}  {v}" for k, v in rows]
  return "\n".join(lines)


@errors.exit_on_ctrl_c
def main(argv: list[str]) -> None:
  """Compiles, prints the table, writes the JSON; exit 2 on user errors."""
  platforms.skip_absent_tpu()  # Before JAX starts its runtimes.
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}")
  if _CONFIG.value is None:
    _fail("--config is required, e.g. --config=configs/synthdistill.py")
  if not _TOPOLOGY.value:
    _fail("--topology is required, e.g. --topology=v5e:2x2")
  if "JAX_PLATFORMS" not in os.environ:
    # The host only traces and compiles; do not try to open TPU chips.
    jax.config.update("jax_platforms", "cpu")
  config = _CONFIG.value
  if _BATCH_SIZE.value is not None:
    config.schedule.batch_size = _BATCH_SIZE.value
  try:
    validation.check_output_file(_OUTPUT.value, "--output")
    record = compile_for_topology(config, _TOPOLOGY.value, _PROGRESS.value)
  except (AotError, experiment.ConfigError) as e:
    _fail(str(e))
  record["date"] = (
      datetime.datetime.now().astimezone().isoformat(timespec="seconds")
  )
  record["command"] = " ".join(
      ["python -m synthdistill_jax.aot"] + sys.argv[1:]
  )
  record["jax_version"] = jax.__version__
  print(format_table(record), flush=True)
  output = experiment.registry.resolve_path(_OUTPUT.value)
  output.parent.mkdir(parents=True, exist_ok=True)
  output.write_text(json.dumps(record, indent=2) + "\n")
  print(f"wrote {output}")
  if not record["fits"]:
    gib = 2.0**30
    _fail(
        f"schedule.batch_size={record['global_batch']} needs"
        f" {record['hbm_bytes_per_chip'] / gib:.1f} GiB per chip, more than"
        f" the {record['hbm_capacity_bytes'] / gib:.0f} GiB of"
        f" {record['device_kind']}; use a smaller batch or more chips"
    )


def _fail(message: str) -> None:
  print(f"aot: error: {message}", file=sys.stderr)
  sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=config_flags_cli.flags_parser("aot"))
