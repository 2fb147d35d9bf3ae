"""The stages of one SynthDistill iteration and the benchmark of a config.

Each stage runs the trainer's own functions with the trainer's shardings,
built by `experiment.create` (what is benchmarked is what is trained).
"""

import functools
import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp

from synthdistill_jax import distill
from synthdistill_jax import experiment
from synthdistill_jax import faces
from synthdistill_jax import hostmem
from synthdistill_jax import programs
from synthdistill_jax import progress
from synthdistill_jax import sharding
from synthdistill_jax import validation
from synthdistill_jax.benchmark import timing

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

  def update(state, x, t, offsets):
    return distill.train_step(spec, state, x, t, 0, offsets)[:2]

  embed = functools.partial(distill.embed_teacher, spec)
  state_sh = exp.state_shardings
  offsets = programs.offset_inputs(spec, mesh, exp.state.params)
  gv, tv = exp.gen_vars, exp.teacher_vars
  # Each stage compiled as the trainer compiles it (on CPU the frozen
  # networks without YNNPACK fusions and the student step at -O1,
  # `programs.SplitIteration`).
  options = getattr(exp.iterate, "render_options", None)
  step_options = getattr(exp.iterate, "step_options", None)

  def frozen(fn, **kwargs):
    return programs.WithOptions(jax.jit(fn, **kwargs), options)

  return [
      (gen, frozen(generate, out_shardings=batch), lambda o: (gv, key), n),
      (crop, frozen(faces.generator_to_faces), lambda o: (o[gen],), n),
      (teach, frozen(embed), lambda o: (tv, o[crop]), n),
      (
          upd,
          programs.WithOptions(
              jax.jit(update, out_shardings=(state_sh, rep), donate_argnums=0),
              step_options,
          ),
          lambda o: (exp.state, o[crop], o[teach], offsets),
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
  if config.sampler.kind == "static":
    raise experiment.ConfigError(
        "sampler.kind='static': the benchmark times the generator, use"
        " 'dynamic' or 'resample'"
    )
  # A number that cannot run is one line before the peak's seconds too.
  validation.check_numbers(config)
  # The peak is measured before and after the stages, and the higher one
  # counts: on a shared host its speed drifts over the minutes the stages
  # take, and a low peak would inflate every MFU.
  peaks = [timing.measure_peak(dtype, peak_size, warmup, max(iters, 3))]
  logging.info("peak %s matmul: %.3g FLOP/s", dtype, peaks[0]["flops_per_s"])
  start = time.perf_counter()
  exp = experiment.create(config, random_weights=random_weights)
  setup_s = time.perf_counter() - start
  logging.info("networks and state ready in %.1f s", setup_s)
  device = jax.devices()[0]
  datasheet = timing.look_up_datasheet(device.device_kind, dtype)
  # Simulated CPU devices share the host's cores, which the peak matmul
  # already uses in full: on CPU the whole host is one unit of peak.
  units = 1 if device.platform == "cpu" else exp.mesh.size
  results, outputs = {}, {}
  key = jax.random.PRNGKey(config.seed)
  named_stages = progress.each_phase(
      f"benchmark {describe_config(config)}",
      build_stages(exp, key),
      name=lambda s: s[0],
      enabled=progress_bar,
      unit="stage",
  )
  for name, jitted, make_args, images, *carry in named_stages:
    stage = timing.Stage(name, jitted, make_args(outputs), images, bool(carry))
    trace_dir = None
    if profile_dir:
      slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
      trace_dir = os.path.join(profile_dir, describe_config(config), slug)
    record, outputs[name] = timing.time_stage(stage, warmup, iters, trace_dir)
    record["mfu_datasheet"] = (
        record["flops_per_s"] / units / datasheet if datasheet else None
    )
    results[name] = record
    logging.info(
        "%s: %.1f s compile, %.3g s/call",
        name,
        record["compile_s"],
        record["seconds_median"],
    )
  peaks.append(timing.measure_peak(dtype, peak_size, 1, max(iters, 3)))
  logging.info("peak %s matmul: %.3g FLOP/s", dtype, peaks[1]["flops_per_s"])
  peak = dict(
      max(peaks, key=lambda p: p["flops_per_s"]),
      flops_per_s_runs=[p["flops_per_s"] for p in peaks],
  )
  for record in results.values():
    record["mfu"] = record["flops_per_s"] / units / peak["flops_per_s"]
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
      "peak_memory": timing.read_peak_memory(),
      "host_memory": hostmem.describe(),
  }


def describe_config(config) -> str:
  """A short name of a config for the table header."""
  return str(config.get("name", "")) or "config"
