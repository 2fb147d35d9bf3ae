"""Throughput benchmark: per-stage and whole-iteration speed, memory and MFU.

For one config it times, after warm-up and with `block_until_ready`, each stage
of a SynthDistill iteration alone (mapping + synthesis, face crop, teacher
forward, student forward + backward + update) and the whole two-update
iteration; it reports images/s (global and per device), compile times, peak
memory, FLOPs per image from XLA's cost analysis and the model-FLOPs
utilisation (MFU) against a matmul peak measured in the same run (and against
the datasheet figure on known accelerators). Output: a table on stdout and a
JSON file.

  python -m synthdistill_jax.benchmark --config=configs/demo.py
  python -m synthdistill_jax.benchmark \
      --config=configs/synthdistill.py:tinyfar_a --batch_size=8 \
      --random_weights --output=bench/tinyfar_a.json
  python -m synthdistill_jax.benchmark --config=configs/demo.py \
      --compare=configs/demo.py --compare.compute_dtype=bfloat16

Checkpoints of the paper networks cannot always be at hand; with
`--random_weights` (or automatically when a checkpoint is missing) the frozen
networks get random weights of the right shapes: FLOPs and speed do not depend
on the values. The JSON and the table say so.
"""

import dataclasses
import datetime
import functools
import json
import os
import pathlib
import platform
import resource
import statistics
import sys
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from synthdistill_jax import distill
from synthdistill_jax import experiment
from synthdistill_jax import faces
from synthdistill_jax import progress
from synthdistill_jax import sharding

# New attributes are accepted so that kwargs dicts such as generator.random
# can gain keys from the command line (`--config.generator.random.x=y`).
_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Experiment config file (path[:arg]).",
    lock_config=False,
    accept_new_attributes=True,
)
_COMPARE = config_flags.DEFINE_config_file(
    "compare",
    None,
    "Second config to run side by side in the same process; overrides via"
    " --compare.x=y. The ratio second/first is printed.",
    lock_config=False,
    accept_new_attributes=True,
)
_OUTPUT = flags.DEFINE_string("output", "benchmark.json", "JSON output path.")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", None, "Overrides schedule.batch_size of every config."
)
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls per stage.")
_ITERS = flags.DEFINE_integer("iters", 5, "Timed calls per stage.")
_RANDOM_WEIGHTS = flags.DEFINE_bool(
    "random_weights",
    False,
    "Random frozen networks of the configured shapes instead of checkpoints"
    " (also used, and labelled, when a checkpoint is missing).",
)
_PROFILE_DIR = flags.DEFINE_string(
    "profile_dir",
    None,
    "Also record a profiler trace of each stage's timed calls under"
    " DIR/<config>/<stage> (open with TensorBoard's profile plugin or XProf).",
)
_PEAK_SIZE = flags.DEFINE_integer(
    "peak_size", None, "Side of the square peak matmul (default by backend)."
)
_PROGRESS = progress.define_flag()

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
  """
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
    `{'dtype', 'size', 'flops_per_s', 'seconds_median'}`.
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
      "seconds_median": timing["seconds_median"],
      "flops_per_s": flops / timing["seconds_median"],
      "cost_analysis_flops": timing["flops_per_call"],
  }


# ----------------------------------------------------------------------------
# The stages, built with the trainer's own functions and shardings.

STAGE_NAMES = (
    "generate (map+synth)",
    "face crop",
    "teacher forward",
    "student fwd+bwd+update",
    "iteration (2 updates)",
)


def read_compute_dtype(config) -> str:
  """The dtype of the peak matmul: a 16-bit dtype if any network uses one."""
  dtypes = {
      str(config[n].get("dtype") or "float32")
      for n in ("generator", "teacher", "student")
  }
  return next((d for d in ("bfloat16", "float16") if d in dtypes), "float32")


def build_stages(exp: experiment.Experiment, key: jax.Array) -> list:
  """The stages in order, as `(name, jitted, make_args, images, carry)`.

  Each stage runs a trainer function (`distill.*`, `faces.*`, the trainer's
  jitted iteration) with the trainer's shardings; `make_args(outputs)` builds
  its arguments from the last outputs of the earlier stages, so the crop sees
  generated images, the teacher cropped faces, and so on.

  Args:
    exp: from `experiment.create` (the trainer's own setup).
    key: PRNG key of the generated batch.

  Returns:
    A list of tuples, see above; `carry` threads the training state.
  """
  spec, mesh, n = exp.spec, exp.mesh, exp.spec.batch_size
  rep, batch = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  gen, crop, teach, upd, it = STAGE_NAMES

  def generate(gen_vars, key):
    # `distill.render_faces` without the crop, which is timed on its own.
    w = distill.sample_latents(spec, gen_vars, jax.random.fold_in(key, 0))
    ws = jnp.broadcast_to(w[:, None], (n, spec.generator.num_ws, w.shape[1]))
    noise = {"noise": jax.random.fold_in(key, 1)}
    return spec.generator.apply(
        gen_vars, ws, noise_mode=spec.noise_mode, rngs=noise, method="synthesis"
    )

  def update(state, x, t):
    return distill.train_step(spec, state, x, t, 0)[:2]

  embed = functools.partial(distill.embed_teacher, spec)
  state_sh = exp.state_shardings
  gv, tv = exp.gen_vars, exp.teacher_vars
  return [
      (gen, jax.jit(generate, out_shardings=batch), lambda o: (gv, key), n),
      (crop, jax.jit(faces.generator_to_faces), lambda o: (o[gen],), n),
      (teach, jax.jit(embed), lambda o: (tv, o[crop]), n),
      (
          upd,
          jax.jit(update, out_shardings=(state_sh, rep), donate_argnums=0),
          lambda o: (exp.state, o[crop], o[teach]),
          n,
          True,
      ),
      (
          it,
          exp.iterate,
          lambda o: (o[upd][0], gv, tv, None),
          n * distill.UPDATES_PER_ITERATION,
          True,
      ),
  ]


def run_benchmark(
    config,
    random_weights: bool,
    warmup: int,
    iters: int,
    peak_size: int,
    profile_dir: str | None = None,
    progress_bar: bool = True,
) -> dict[str, Any]:
  """Benchmarks every stage of one config.

  Args:
    config: the experiment `ConfigDict`.
    random_weights: random frozen networks instead of checkpoints.
    warmup: untimed calls per stage.
    iters: timed calls per stage.
    peak_size: side of the peak matmul.
    profile_dir: if set, a profiler trace per stage under
      `profile_dir/<config name>/<stage>`.
    progress_bar: a bar over the stages (`synthdistill_jax.progress`).

  Returns:
    The result record that goes into the JSON file.
  """
  dtype = read_compute_dtype(config)
  peak = measure_peak(dtype, peak_size, warmup, max(iters, 3))
  logging.info("peak %s matmul: %.3g FLOP/s", dtype, peak["flops_per_s"])
  start = time.perf_counter()
  if config.sampler.kind == "static":
    raise experiment.ConfigError(
        "sampler.kind='static': the benchmark times the generator, use"
        " 'dynamic' or 'resample'"
    )
  exp = experiment.create(config, random_weights=random_weights)
  setup_s = time.perf_counter() - start
  logging.info("networks and state ready in %.1f s", setup_s)
  device = jax.devices()[0]
  datasheet = look_up_datasheet(device.device_kind, dtype)
  # Simulated CPU devices share the host's cores, which the peak matmul
  # already uses in full: on CPU the whole host is one unit of peak.
  units = 1 if device.platform == "cpu" else exp.mesh.size
  results, outputs = {}, {}
  key = jax.random.PRNGKey(config.seed)
  stages = progress.each_phase(
      f"benchmark {describe_config(config)}",
      build_stages(exp, key),
      name=lambda s: s[0],
      enabled=progress_bar,
      unit="stage",
  )
  for name, jitted, make_args, images, *carry in stages:
    stage = Stage(name, jitted, make_args(outputs), images, bool(carry))
    trace_dir = None
    if profile_dir:
      slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
      trace_dir = os.path.join(profile_dir, describe_config(config), slug)
    timing, outputs[name] = time_stage(stage, warmup, iters, trace_dir)
    timing["mfu"] = timing["flops_per_s"] / units / peak["flops_per_s"]
    timing["mfu_datasheet"] = (
        timing["flops_per_s"] / units / datasheet if datasheet else None
    )
    results[name] = timing
    logging.info(
        "%s: %.1f s compile, %.3g s/call",
        name,
        timing["compile_s"],
        timing["seconds_median"],
    )
  return {
      "config": describe_config(config),
      "compute_dtype": dtype,
      "batch_size": int(config.schedule.batch_size),
      "weights": exp.weights,
      "backend": jax.default_backend(),
      "device_kind": device.device_kind,
      "num_devices": exp.mesh.size,
      "peak": peak,
      "peak_units": units,
      "datasheet_flops_per_s": datasheet,
      "setup_s": setup_s,
      "stages": results,
      "peak_memory": read_peak_memory(),
  }


def describe_config(config) -> str:
  """A short name of a config for the table header."""
  return str(config.get("name", "")) or "config"


def format_table(result: dict[str, Any]) -> str:
  """Renders one benchmark result as a fixed-width text table."""
  head = (
      f"{'stage':<26}{'img/call':>9}{'ms/call':>10}{'img/s':>9}"
      f"{'img/s/dev':>10}{'GFLOP/img':>10}{'GFLOP/s':>9}{'MFU':>7}"
      f"{'MFU(ds)':>8}{'compile s':>10}{'temp MiB':>9}"
  )
  lines = [
      f"== {result['config']}  batch {result['batch_size']}"
      f"  {result['compute_dtype']}  weights: {result['weights']}",
      f"   {result['num_devices']} x {result['device_kind']}"
      f" ({result['backend']}); measured {result['peak']['dtype']} matmul"
      f" peak {result['peak']['flops_per_s'] / 1e9:.1f} GFLOP/s"
      f" ({result['peak']['size']}^2)"
      + (
          f"; datasheet {result['datasheet_flops_per_s'] / 1e12:.0f} TFLOP/s"
          if result["datasheet_flops_per_s"]
          else ""
      ),
      head,
      "-" * len(head),
  ]
  for name, t in result["stages"].items():
    ds = f"{t['mfu_datasheet']:.1%}" if t["mfu_datasheet"] else "-"
    temp = t["memory"].get("temp_bytes", 0) / 2**20
    lines.append(
        f"{name:<26}{t['images_per_call']:>9}"
        f"{t['seconds_median'] * 1e3:>10.1f}{t['images_per_s']:>9.2f}"
        f"{t['images_per_s_per_device']:>10.2f}"
        f"{t['flops_per_image'] / 1e9:>10.2f}{t['flops_per_s'] / 1e9:>9.1f}"
        f"{t['mfu']:>7.1%}{ds:>8}{t['compile_s']:>10.1f}{temp:>9.0f}"
    )
  memory = result["peak_memory"]
  lines.append(
      f"peak memory {memory['peak_bytes'] / 2**30:.2f} GiB"
      f" ({memory['source']})"
  )
  return "\n".join(lines)


def compare_results(first: dict, second: dict) -> dict[str, dict]:
  """Per-stage ratios second/first of images/s and compile time."""
  ratios = {}
  for name, a in first["stages"].items():
    b = second["stages"].get(name)
    if b is None:
      continue
    ratios[name] = {
        "images_per_s": b["images_per_s"] / a["images_per_s"],
        "compile_s": b["compile_s"] / a["compile_s"],
        "flops_per_image": (
            b["flops_per_image"] / a["flops_per_image"]
            if a["flops_per_image"]
            else None
        ),
    }
  return ratios


def diff_configs(first, second) -> dict[str, list]:
  """Fields whose values differ: `{dotted.name: [first, second]}`."""

  def flatten(tree, prefix=""):
    items = {}
    for k, v in tree.items():
      if isinstance(v, dict) and v:
        items.update(flatten(v, f"{prefix}{k}."))
      else:
        items[prefix + k] = v
    return items

  a, b = flatten(first.to_dict()), flatten(second.to_dict())
  return {
      k: [a.get(k), b.get(k)]
      for k in sorted(set(a) | set(b))
      if a.get(k) != b.get(k)
  }


def format_ratios(ratios: dict[str, dict], diff: dict[str, list]) -> str:
  """Renders the `--compare` ratio table.

  A stage whose program is the same in both configs hits the in-process
  compilation cache the second time: its compile ratio is then near 0.

  Args:
    ratios: from `compare_results`.
    diff: from `diff_configs`, shown in the header.

  Returns:
    The table text.
  """
  head = f"{'stage':<26}{'img/s ratio':>12}{'compile ratio':>14}"
  changes = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
  lines = [
      f"== ratio second/first ({changes or 'identical configs'})",
      head,
      "-" * len(head),
  ]
  for name, r in ratios.items():
    lines.append(
        f"{name:<26}{r['images_per_s']:>11.2f}x{r['compile_s']:>13.2f}x"
    )
  return "\n".join(lines)


def read_cpu_model() -> str:
  """The CPU model name (the `lscpu` 'Model name'), for the record."""
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def main(argv: list[str]) -> None:
  """Runs the benchmark(s) named by the flags and writes the JSON."""
  if len(argv) > 1:
    sys.exit(f"benchmark: error: unexpected arguments {argv[1:]}")
  if _CONFIG.value is None:
    sys.exit("benchmark: error: --config is required")
  configs = [_CONFIG.value]
  if _COMPARE.value is not None:
    configs.append(_COMPARE.value)
  peak_size = _PEAK_SIZE.value or (
      4096 if jax.default_backend() == "cpu" else 8192
  )
  results = []
  try:
    for config in configs:
      if _BATCH_SIZE.value is not None:
        config.schedule.batch_size = _BATCH_SIZE.value
      results.append(
          run_benchmark(
              config,
              _RANDOM_WEIGHTS.value,
              _WARMUP.value,
              _ITERS.value,
              peak_size,
              _PROFILE_DIR.value,
              _PROGRESS.value,
          )
      )
      print(format_table(results[-1]), flush=True)
  except (experiment.ConfigError, FileNotFoundError) as e:
    sys.exit(f"benchmark: error: {e}")
  record = {
      "date": datetime.datetime.now()
      .astimezone()
      .isoformat(timespec="seconds"),
      "command": " ".join(
          ["python -m synthdistill_jax.benchmark"] + sys.argv[1:]
      ),
      "machine": read_cpu_model(),
      "cpu_count": os.cpu_count(),
      "jax_version": jax.__version__,
      "runs": results,
  }
  if len(results) == 2:
    record["ratios"] = compare_results(*results)
    record["config_diff"] = diff_configs(*configs)
    print(format_ratios(record["ratios"], record["config_diff"]))
  output = pathlib.Path(_OUTPUT.value)
  output.parent.mkdir(parents=True, exist_ok=True)
  output.write_text(json.dumps(record, indent=2) + "\n")
  print(f"wrote {output}")


if __name__ == "__main__":
  app.run(main)
