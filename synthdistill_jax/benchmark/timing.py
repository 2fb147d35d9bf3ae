"""The timing harness: compile ahead of time, warm up, time, read XLA's analyses.

Also the datasheet peaks of known accelerators (for MFU against them), the
count of distinct kernels in a compiled program (what compile time grows
with) and the check that the profiler can run beside the installed libtpu.
"""

import collections
import dataclasses
import importlib.metadata
import os
import re
import resource
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
from packaging import requirements

from synthdistill_jax import errors

# Dense datasheet peaks per JAX device in TFLOP/s, by compute dtype. Matched
# against `device.device_kind` (lower case, first match wins, so the more
# specific names come first). TPU v2/v3 expose one JAX device per core, later
# generations one per chip.
DATASHEET_TFLOPS = (
    ("h100 pcie", {"bfloat16": 756.0, "float16": 756.0, "float32": 51.2}),
    ("h100", {"bfloat16": 989.4, "float16": 989.4, "float32": 66.9}),
    ("h200", {"bfloat16": 989.4, "float16": 989.4, "float32": 66.9}),
    ("a100", {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5}),
    ("l4", {"bfloat16": 121.0, "float16": 121.0, "float32": 30.3}),
    ("v100", {"float16": 125.0, "float32": 15.7}),
    ("tpu v6 lite", {"bfloat16": 918.0}),
    ("tpu v5 lite", {"bfloat16": 197.0}),
    ("tpu v5p", {"bfloat16": 459.0}),
    ("tpu v5", {"bfloat16": 459.0}),
    ("tpu v4", {"bfloat16": 275.0}),
    ("tpu v3", {"bfloat16": 61.5}),
    ("tpu v2", {"bfloat16": 22.5}),
)


@dataclasses.dataclass
class Stage:
  """One timed piece of work.

  Attributes:
    name: row label.
    jitted: a `jax.jit` function (frozen weights are among its arguments).
    args: its arguments (device arrays / pytrees).
    images: images one call processes (for images/s and FLOPs per image).
    carry: if True the first output replaces the first argument on the next
      call (a training state threaded through the loop, as the trainer does).
  """

  name: str
  jitted: Any
  args: tuple[Any, ...]
  images: int
  carry: bool = False


def look_up_datasheet(device_kind: str, dtype: str) -> float | None:
  """Returns the datasheet peak (FLOP/s per device) or None if unknown.

  Args:
    device_kind: `jax.Device.device_kind`, e.g. 'NVIDIA H100 80GB HBM3'.
    dtype: compute dtype name, e.g. 'bfloat16'.
  """
  kind = device_kind.lower()
  for key, peaks in DATASHEET_TFLOPS:
    if key in kind:
      return peaks[dtype] * 1e12 if dtype in peaks else None
  return None


def read_flops(compiled) -> float:
  """FLOPs of one call of a compiled executable, summed over its devices.

  `cost_analysis()` returned a list with one dict per program in older jax
  versions and a dict now; the count is per device for an SPMD program.

  Args:
    compiled: a `jax.stages.Compiled`.

  Returns:
    The FLOP count (0.0 when the backend reports none).
  """
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  flops = float((analysis or {}).get("flops", 0.0))
  return max(flops, 0.0) * count_devices(compiled)


def count_devices(compiled) -> int:
  """Number of devices an SPMD executable runs on."""
  devices = set()
  for sharding in jax.tree.leaves(compiled.output_shardings):
    devices |= set(sharding.device_set)
  return max(len(devices), 1)


def read_memory_analysis(compiled) -> dict[str, int]:
  """XLA's static buffer sizes of an executable (bytes per device)."""
  stats = compiled.memory_analysis()
  if isinstance(stats, (list, tuple)):
    stats = stats[0] if stats else None
  if stats is None:
    return {}
  names = ("argument", "output", "temp", "alias", "generated_code")
  return {
      f"{name}_bytes": int(getattr(stats, f"{name}_size_in_bytes", 0))
      for name in names
  }


_HLO_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) \(.*\{$")
_HLO_FUSION = re.compile(r" fusion\(.*kind=(\w+).*calls=%([\w.\-]+)")
# What differs between two copies of the same kernel: names and metadata.
_HLO_NAMES = re.compile(r"%[\w.\-]+|param_\d+(?:\.\d+)?")
_HLO_METADATA = re.compile(r",? metadata=\{[^}]*\}")


def count_fusions(hlo_text: str) -> dict[str, Any]:
  """Fusions of an optimised HLO module, and how many differ in their code.

  Compile time grows with the distinct kernels, not the fusions: XLA:CPU
  compiles a fused computation once and shares it between the fusions
  whose bodies match up to names (a network's identical blocks). Two
  bodies count as one kernel when they are equal once instruction names,
  parameter names and metadata are set aside.

  Args:
    hlo_text: `compiled.as_text()`.

  Returns:
    `{'fusions', 'distinct', 'by_kind': {kind: {'fusions', 'distinct'}}}`,
    kinds as XLA names them (`kLoop`, `kInput`, `kCustom` for library
    fusions such as XLA:CPU's YNNPACK calls, ...).
  """
  bodies, calls, name, lines = {}, [], None, []
  for line in hlo_text.splitlines():
    if (m := _HLO_FUSION.search(line)) is not None:
      calls.append(m.groups())
    if (m := _HLO_COMPUTATION.match(line)) is not None:
      name, lines = m.group(1), []
    elif line.startswith("}") and name is not None:
      bodies[name], name = "\n".join(lines), None
    elif name is not None:
      lines.append(_HLO_NAMES.sub("%", _HLO_METADATA.sub("", line.strip())))
  kinds = collections.defaultdict(lambda: [0, set()])
  for kind, called in calls:
    kinds[kind][0] += 1
    kinds[kind][1].add(bodies.get(called, called))
  by_kind = {
      kind: {"fusions": n, "distinct": len(distinct)}
      for kind, (n, distinct) in sorted(kinds.items())
  }
  return {
      "fusions": sum(k["fusions"] for k in by_kind.values()),
      "distinct": sum(k["distinct"] for k in by_kind.values()),
      "by_kind": by_kind,
  }


def read_fusions(compiled) -> dict[str, Any] | None:
  """`count_fusions` of an executable, summed over separately compiled pieces.

  Args:
    compiled: a `jax.stages.Compiled`, or `programs.CompiledSplit` (whose
      pieces are compiled one by one, so each counts its own kernels).

  Returns:
    As `count_fusions`, or None when the backend gives no HLO text.
  """
  pieces = getattr(compiled, "compiled", None)
  executables = [c for c, _ in pieces.values()] if pieces else [compiled]
  total = {"fusions": 0, "distinct": 0, "by_kind": {}}
  for executable in executables:
    try:
      text = executable.as_text()
    except (NotImplementedError, AttributeError):
      return None
    counts = count_fusions(text or "")
    total["fusions"] += counts["fusions"]
    total["distinct"] += counts["distinct"]
    for kind, n in counts["by_kind"].items():
      into = total["by_kind"].setdefault(kind, {"fusions": 0, "distinct": 0})
      into["fusions"] += n["fusions"]
      into["distinct"] += n["distinct"]
  return total


def read_peak_memory() -> dict[str, Any]:
  """Peak memory so far: device stats where the backend has them, else RSS."""
  device = jax.local_devices()[0]
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and "peak_bytes_in_use" in stats:
    return {
        "source": "device.memory_stats",
        "peak_bytes": int(stats["peak_bytes_in_use"]),
        "bytes_limit": int(stats.get("bytes_limit", 0)),
    }
  # Linux reports ru_maxrss in KiB, macOS in bytes.
  scale = 1 if sys.platform == "darwin" else 1024
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
  return {"source": "process max RSS", "peak_bytes": int(rss)}


def find_profiler_conflict(
    jax_requires: list[str] | None = None,
    libtpu_version: str | None = None,
    platforms: str | None = None,
) -> str | None:
  """Why `jax.profiler` would crash this process, or None.

  The profiler starts the tracer of every PJRT plugin that JAX loaded, and
  libtpu's plugin is loaded on any host where it is installed, TPU or not.
  A libtpu other than the one jax's `tpu` extra pins has another plugin ABI:
  libtpu 0.0.52 under jaxlib 0.10.2 (which pins 0.0.42.*) logs "Unexpected
  PLUGIN_Profiler_Api size" and the process dies of a segmentation fault.

  Args:
    jax_requires: jax's requirements (default: the installed jax's).
    libtpu_version: the installed libtpu's version (default: looked up;
      None when libtpu is not installed).
    platforms: `$JAX_PLATFORMS` (default: the environment's); a list that
      names no TPU keeps the plugin unloaded.

  Returns:
    A one-line message naming the fix, or None if nothing conflicts.
  """
  if libtpu_version is None:
    try:
      libtpu_version = importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
      return None
  if platforms is None:
    platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms.strip() and "tpu" not in platforms.lower():
    return None
  if jax_requires is None:
    try:
      jax_requires = importlib.metadata.requires("jax") or []
    except importlib.metadata.PackageNotFoundError:  # jax from a source tree
      return None
  for line in jax_requires:
    req = requirements.Requirement(line)
    if req.name != "libtpu" or req.marker is None:
      continue
    if not req.marker.evaluate({"extra": "tpu"}):
      continue
    if req.specifier.contains(libtpu_version, prereleases=True):
      return None
    return (
        f"libtpu {libtpu_version} is installed, but jax {jax.__version__} is"
        f" built for libtpu{req.specifier}: jax's profiler would crash this"
        f" process. Fix: pip install 'jax[tpu]=={jax.__version__}' (or"
        " uninstall libtpu, or run with JAX_PLATFORMS=cpu on a host without"
        " TPUs)"
    )
  return None


def time_stage(
    stage: Stage, warmup: int, iters: int, profile_dir: str | None = None
):
  """Compiles a stage ahead of time, then times `iters` calls after `warmup`.

  Args:
    stage: what to run.
    warmup: untimed calls (at least one, so caches and allocators are warm).
    iters: timed calls; each is followed by `block_until_ready`.
    profile_dir: if set, the timed calls run under `jax.profiler.trace` into
      this folder (the timings then include the tracer's small overhead).

  Returns:
    `(record, last_output)`: timings (seconds), FLOPs, images/s and memory
    figures; the output feeds the next stage.

  Raises:
    errors.ConfigError: `profile_dir` is set and the profiler would crash
      (`find_profiler_conflict`).
  """
  if profile_dir and (conflict := find_profiler_conflict()):
    raise errors.ConfigError(f"profile_dir: {conflict}")
  start = time.perf_counter()
  lowered = stage.jitted.lower(*stage.args)
  trace_s = time.perf_counter() - start
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  args = stage.args
  times = []
  warmup = max(warmup, 1)
  for i in range(warmup + iters):
    if profile_dir and i == warmup:
      jax.profiler.start_trace(profile_dir)
    start = time.perf_counter()
    out = compiled(*args)
    jax.block_until_ready(out)
    if i >= warmup:
      times.append(time.perf_counter() - start)
    if stage.carry:
      args = (out[0],) + tuple(args[1:])
  if profile_dir:
    jax.profiler.stop_trace()
  seconds = statistics.median(times)
  flops = read_flops(compiled)
  n_devices = count_devices(compiled)
  record = {
      "images_per_call": stage.images,
      "devices": n_devices,
      "seconds_median": seconds,
      "seconds_min": min(times),
      "seconds_all": times,
      "images_per_s": stage.images / seconds,
      "images_per_s_per_device": stage.images / seconds / n_devices,
      "trace_s": trace_s,
      "compile_s": compile_s,
      "flops_per_call": flops,
      "flops_per_image": flops / stage.images,
      "flops_per_s": flops / seconds,
      "memory": read_memory_analysis(compiled),
      "fusions": read_fusions(compiled),
  }
  return record, out


def measure_peak(dtype: str, size: int, warmup: int, iters: int) -> dict:
  """Times a square `size` matmul in `dtype` on one device: the MFU baseline.

  Args:
    dtype: compute dtype name.
    size: matrix side; large enough to be compute-bound.
    warmup: untimed calls.
    iters: timed calls.

  Returns:
    `{'dtype', 'size', 'flops_per_s', 'seconds_min', 'seconds_median',
    'cost_analysis_flops'}`: `flops_per_s` from the fastest call (a peak is
    what the host can do; a noisy neighbour only slows calls down).
  """
  keys = jax.random.split(jax.random.key(0))
  a = jax.random.normal(keys[0], (size, size), jnp.float32).astype(dtype)
  b = jax.random.normal(keys[1], (size, size), jnp.float32).astype(dtype)
  stage = Stage("peak matmul", jax.jit(jnp.matmul), (a, b), images=1)
  timing, _ = time_stage(stage, warmup, iters)
  # Count 2 n^3 ourselves: the analysis may not see through library calls.
  flops = 2.0 * size**3
  return {
      "dtype": dtype,
      "size": size,
      "seconds_min": timing["seconds_min"],
      "seconds_median": timing["seconds_median"],
      "flops_per_s": flops / timing["seconds_min"],
      "cost_analysis_flops": timing["flops_per_call"],
  }
