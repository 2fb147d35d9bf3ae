"""Tests of the throughput benchmark: helpers, and the CLI on the demo config.

No test asserts a time: the machine is shared and timings are noisy.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from synthdistill_jax import errors
from synthdistill_jax import hostmem
from synthdistill_jax.benchmark import report
from synthdistill_jax.benchmark import timing

ROOT = pathlib.Path(__file__).resolve().parents[1]
STAGES = (
    "generate (map+synth)",
    "face crop",
    "teacher forward",
    "student fwd+bwd+update",
    "iteration (2 updates)",
)


def _demo_command(*flags: str) -> list[str]:
  """The benchmark CLI on the demo config, with `flags`."""
  return [
      sys.executable,
      "-m",
      "synthdistill_jax.benchmark",
      "--config=configs/demo.py",
      *flags,
  ]


def test_look_up_datasheet_matches_device_kinds():
  h100 = timing.look_up_datasheet("NVIDIA H100 80GB HBM3", "bfloat16")
  assert h100 == pytest.approx(989.4e12)
  pcie = timing.look_up_datasheet("NVIDIA H100 PCIe", "bfloat16")
  assert pcie == pytest.approx(756e12)
  assert timing.look_up_datasheet("TPU v5 lite", "bfloat16") == 197e12
  assert timing.look_up_datasheet("TPU v5p", "bfloat16") == 459e12
  assert timing.look_up_datasheet("TPU v4", "float32") is None
  assert timing.look_up_datasheet("cpu", "float32") is None


@pytest.mark.devices(8)
def test_read_flops_counts_a_matmul_over_all_devices():
  a = jnp.ones((64, 32), jnp.float32)
  b = jnp.ones((32, 16), jnp.float32)
  compiled = jax.jit(jnp.matmul).lower(a, b).compile()
  assert timing.read_flops(compiled) == 2 * 64 * 32 * 16
  # Sharded over the 8 simulated devices, the per-device count is summed.
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("data")
  )
  a = jax.device_put(a, sharding)
  compiled = jax.jit(jnp.matmul).lower(a, b).compile()
  assert timing.count_devices(compiled) == jax.device_count()
  assert timing.read_flops(compiled) == 2 * 64 * 32 * 16


def test_time_stage_threads_the_carried_state():
  calls = []

  def step(state, increment):
    calls.append(None)  # Traced once: AOT compilation, no retracing.
    return state + increment, jnp.sum(state)

  stage = timing.Stage(
      "toy", jax.jit(step), (jnp.zeros(4), jnp.ones(4)), images=4, carry=True
  )
  record, out = timing.time_stage(stage, warmup=1, iters=3)
  assert len(calls) == 1
  # 1 warm-up + 3 timed calls, each adding one to the carried state.
  assert jnp.all(out[0] == 4.0)
  assert len(record["seconds_all"]) == 3
  assert record["images_per_s"] > 0
  assert record["flops_per_call"] >= 0
  assert record["compile_s"] > 0
  assert set(record["memory"]) >= {"argument_bytes", "temp_bytes"}


def test_time_stage_writes_a_profiler_trace(tmp_path):
  stage = timing.Stage(
      "toy", jax.jit(jnp.sin), (jnp.zeros((64, 64)),), images=64
  )
  timing.time_stage(stage, warmup=1, iters=2, profile_dir=str(tmp_path))
  traces = list(tmp_path.glob("**/*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 0


def test_count_fusions_shares_bodies_equal_up_to_names():
  def three(a, b, c):
    return jnp.sin(a) * 2 + 1, jnp.sin(b) * 2 + 1, jnp.sin(c) * 2 + 1

  args = (jnp.ones((64, 64)), jnp.ones((64, 64)), jnp.ones((32, 32)))
  compiled = jax.jit(three).lower(*args).compile()
  counts = timing.read_fusions(compiled)
  # Three fusions; the two on [64, 64] are one kernel.
  assert counts["by_kind"]["kLoop"] == {"fusions": 3, "distinct": 2}
  assert (counts["fusions"], counts["distinct"]) == (3, 2)


def test_count_fusions_tells_constants_and_kinds_apart():
  def body(name, constant):
    return (
        f"%{name} (param_0.{constant}: f32[4]) -> f32[4] {{\n"
        f"  %param_0.{constant} = f32[4]{{0}} parameter(0)\n"
        f"  %c.{constant} = f32[] constant({constant})\n"
        f"  %b.{constant} = f32[4]{{0}} broadcast(%c.{constant}),"
        ' dimensions={}, metadata={op_name="x"}\n'
        f"  ROOT %a.{constant} = f32[4]{{0}} add(%param_0.{constant},"
        f" %b.{constant})\n}}\n"
    )

  def call(name, kind, computation):
    return (
        f"  %{name} = f32[4]{{0}} fusion(%p), kind={kind},"
        f" calls=%{computation}\n"
    )

  text = (
      body("f1", 1)
      + body("f2", 1)  # f1 under other names.
      + body("f3", 2)  # Another constant: another kernel.
      + "ENTRY %main (p: f32[4]) -> f32[4] {\n"
      + call("x1", "kLoop", "f1")
      + call("x2", "kLoop", "f2")
      + call("x3", "kLoop", "f3")
      + call("x4", "kCustom", "f1")
      + "}\n"
  )
  counts = timing.count_fusions(text)
  assert counts["by_kind"] == {
      "kCustom": {"fusions": 1, "distinct": 1},
      "kLoop": {"fusions": 3, "distinct": 2},
  }
  assert (counts["fusions"], counts["distinct"]) == (4, 3)


JAX_TPU_PIN = ['libtpu==0.0.42.*; extra == "tpu"', "jaxlib==0.10.2"]


def test_find_profiler_conflict_compares_libtpu_with_jax_pin():
  def conflict(version, platforms=""):
    return timing.find_profiler_conflict(JAX_TPU_PIN, version, platforms)

  message = conflict("0.0.52")
  assert "libtpu 0.0.52" in message and "==0.0.42.*" in message
  assert f"pip install 'jax[tpu]=={jax.__version__}'" in message
  assert "\n" not in message
  assert conflict("0.0.42.1") is None
  assert conflict("0.0.52", platforms="tpu,cpu") is not None
  # Platforms that name no TPU keep libtpu's plugin unloaded.
  assert conflict("0.0.52", platforms="cpu") is None
  assert conflict("0.0.52", platforms="cuda") is None
  # No pin to compare with: nothing to say.
  assert timing.find_profiler_conflict(["jaxlib==0.10.2"], "0.0.52", "") is None


def _environment_without_platforms(**extra):
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  env.update(extra)
  return env


def test_profiler_trace_in_a_fresh_process_with_installed_plugins(tmp_path):
  # As a user runs it: JAX_PLATFORMS unset (the test process sets it to cpu),
  # so JAX loads every installed PJRT plugin, libtpu's included, and the
  # profiler starts their tracers. A libtpu that jax's `tpu` extra does not
  # pin crashed here (segmentation fault); now it is refused in one line.
  script = (
      "import jax, jax.numpy as jnp\n"
      "from synthdistill_jax.benchmark import timing\n"
      "stage = timing.Stage('toy', jax.jit(jnp.sin), (jnp.zeros(8),), 8)\n"
      f"timing.time_stage(stage, 1, 1, profile_dir={str(tmp_path)!r})\n"
  )
  result = subprocess.run(
      [sys.executable, "-c", script],
      cwd=ROOT,
      capture_output=True,
      text=True,
      check=False,
      env=_environment_without_platforms(),
  )
  if timing.find_profiler_conflict(platforms="") is None:
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(tmp_path.glob("**/*.xplane.pb"))
  else:
    assert result.returncode == 1, result.stderr[-3000:]
    assert "ConfigError: profile_dir: libtpu" in result.stderr


def test_cli_refuses_profile_dir_beside_a_libtpu_jax_does_not_pin(tmp_path):
  # A distribution record of another libtpu version, first on the path: the
  # check reads versions from the metadata, as pip leaves them.
  info = tmp_path / "site" / "libtpu-0.0.1.dist-info"
  info.mkdir(parents=True)
  (info / "METADATA").write_text(
      "Metadata-Version: 2.1\nName: libtpu\nVersion: 0.0.1\n"
  )
  output = tmp_path / "bench.json"
  result = subprocess.run(
      _demo_command(
          f"--profile_dir={tmp_path / 'profile'}",
          f"--output={output}",
      ),
      cwd=ROOT,
      capture_output=True,
      text=True,
      check=False,
      env=_environment_without_platforms(PYTHONPATH=str(tmp_path / "site")),
  )
  assert result.returncode == 1, result.stderr[-3000:]
  lines = result.stderr.strip().splitlines()
  assert lines[-1].startswith(
      "benchmark: error: --profile_dir: libtpu 0.0.1 is installed"
  ), lines[-3:]
  assert "Traceback" not in result.stderr
  assert not output.exists() and not (tmp_path / "profile").exists()


def test_cli_refuses_a_bad_setting_before_measuring_the_peak(tmp_path):
  result = subprocess.run(
      _demo_command("--batch_size=0", f"--output={tmp_path / 'b.json'}"),
      cwd=ROOT,
      capture_output=True,
      text=True,
      check=False,
  )
  assert result.returncode == 1, result.stderr[-3000:]
  assert result.stderr.strip().splitlines()[-1] == (
      "benchmark: error: schedule.batch_size=0: must be an integer >= 1 (the"
      " global batch)"
  )
  assert "peak float32 matmul" not in result.stderr


def test_cli_flag_mistakes_are_one_line_before_any_work(tmp_path):
  afile = tmp_path / "afile"
  afile.write_text("x")
  for flag, expected in (
      ("--iters=0", "flag --iters=0: 0 is not a positive integer"),
      ("--warmup=-1", "flag --warmup=-1: -1 is not a non-negative integer"),
      (
          f"--output={tmp_path}",
          f"--output={tmp_path}: is a folder; give a file in it, e.g."
          f" --output={tmp_path / 'out.json'}",
      ),
      (f"--output={afile / 'b.json'}", f"--output={afile / 'b.json'}: cannot"),
  ):
    result = subprocess.run(
        _demo_command(flag), cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 1, result.stderr[-3000:]
    # --iters=0 used to time nothing and end in a traceback from `median`.
    assert result.stderr.strip().startswith(f"benchmark: error: {expected}")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "peak float32 matmul" not in result.stdout


def test_measure_peak_reports_matmul_flops():
  peak = timing.measure_peak("float32", 128, warmup=1, iters=2)
  assert peak["flops_per_s"] > 0
  assert peak["cost_analysis_flops"] == 2 * 128**3
  # A peak: the fastest timed call, not the median.
  assert peak["flops_per_s"] == 2 * 128**3 / peak["seconds_min"]
  assert peak["seconds_min"] <= peak["seconds_median"]


def test_compare_reports_ratios_and_the_config_difference():
  import ml_collections  # pylint: disable=g-import-not-at-top

  first = ml_collections.ConfigDict({"generator": {"dtype": "float32"}})
  second = ml_collections.ConfigDict({"generator": {"dtype": "bfloat16"}})
  diff = report.diff_configs(first, second)
  assert diff == {"generator.dtype": ["float32", "bfloat16"]}

  def run(images_per_s, compile_s):
    stage = dict(images_per_s=images_per_s, compile_s=compile_s)
    return {"stages": {"teacher forward": dict(stage, flops_per_image=2.0)}}

  ratios = report.compare_results(run(10.0, 4.0), run(25.0, 2.0))
  assert ratios["teacher forward"]["images_per_s"] == pytest.approx(2.5)
  assert ratios["teacher forward"]["compile_s"] == pytest.approx(0.5)
  text = report.format_ratios(ratios, diff)
  assert "2.50x" in text and "generator.dtype" in text


def test_read_peak_memory_is_positive():
  memory = timing.read_peak_memory()
  assert memory["peak_bytes"] > 0
  assert memory["source"]


def test_cli_on_the_demo_config_writes_table_and_json(tmp_path):
  output = tmp_path / "bench.json"
  # The demo config at batch 8 (one face per simulated device); the student is
  # swapped for a tiny IResNet so that compiling its backward pass stays
  # within the test budget on 2 cores.
  command = _demo_command(
      "--config.student.arch=iresnet18",
      "--config.student.kwargs.layers=(1,1,1,1)",
      "--config.student.kwargs.widths=(8,8,8,8)",
      "--config.teacher.calibrate_batches=0",
      "--batch_size=8",
      "--warmup=1",
      "--iters=1",
      "--peak_size=256",
      f"--output={output}",
  )
  # A log line for every progress update, however quick (not a terminal).
  env = dict(os.environ, SYNTHDISTILL_PROGRESS_EVERY_S="0")
  result = subprocess.run(
      command, cwd=ROOT, capture_output=True, text=True, check=False, env=env
  )
  assert result.returncode == 0, result.stderr[-3000:]
  # Progress over the stages: whole lines in a pipe, no bar fragments.
  assert "benchmark demo: 5/5 (100%)" in result.stderr
  assert "benchmark demo: face crop done in" in result.stderr
  assert "\r" not in result.stderr
  record = json.loads(output.read_text())
  (run,) = record["runs"]
  assert run["num_devices"] == jax.device_count()
  assert run["peak"]["flops_per_s"] > 0
  # Measured before and after the stages; MFU is against the higher one.
  assert run["peak"]["flops_per_s"] == max(run["peak"]["flops_per_s_runs"])
  assert len(run["peak"]["flops_per_s_runs"]) == 2
  assert "random" in run["weights"]
  assert tuple(run["stages"]) == STAGES
  for name, stage in run["stages"].items():
    assert stage["images_per_s"] > 0, name
    assert stage["images_per_s_per_device"] > 0, name
    assert stage["flops_per_image"] > 0, name
    assert stage["mfu"] > 0, name
    assert "mfu_datasheet" in stage, name
    assert stage["compile_s"] > 0, name
    assert 0 < stage["fusions"]["distinct"] <= stage["fusions"]["fusions"]
    assert stage["images_per_call"] == (16 if "iteration" in name else 8)
    assert name in result.stdout  # The table row.
  assert "MFU" in result.stdout and "peak memory" in result.stdout
  assert "kernels" in result.stdout
  assert run["peak_memory"]["peak_bytes"] > 0
  # The CLI restarts itself with huge pages where that helps (`hostmem`).
  restart = hostmem.tunables_with_huge_pages(
      env, sys.platform, hostmem.read_glibc_version(), hostmem.read_thp_mode()
  )
  assert run["host_memory"] == {
      "thp_mode": hostmem.read_thp_mode(),
      "glibc_hugetlb": hostmem.read_tunable(
          restart or env.get("GLIBC_TUNABLES", "")
      ),
  }
  assert "huge pages: glibc.malloc.hugetlb=" in result.stdout


def test_ctrl_c_is_one_line_and_status_130(tmp_path):
  # Ctrl-C while it builds the networks: no traceback, the shell's status.
  command = _demo_command(f"--output={tmp_path / 'bench.json'}")
  env = dict(os.environ, SYNTHDISTILL_PROGRESS_EVERY_S="0")
  proc = subprocess.Popen(
      command,
      cwd=ROOT,
      env=env,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
  )
  lines = []
  for line in proc.stderr:
    lines.append(line)
    if "peak float32 matmul" in line:  # Building the networks next.
      break
  proc.send_signal(signal.SIGINT)
  _, rest = proc.communicate(timeout=300)
  assert proc.returncode == errors.INTERRUPTED_STATUS, "".join(lines) + rest
  assert "Traceback" not in rest
  assert rest.strip().splitlines()[-1] == "interrupted (Ctrl-C)"
  assert not (tmp_path / "bench.json").exists()


def test_exit_on_ctrl_c_keeps_results_and_other_errors():
  @errors.exit_on_ctrl_c
  def main(value):
    if value is None:
      raise KeyboardInterrupt
    if value < 0:
      raise ValueError("a bug keeps its traceback")
    return value

  handler, hook = signal.getsignal(signal.SIGINT), sys.unraisablehook
  try:
    assert main(3) == 3
    with pytest.raises(SystemExit) as info:
      main(None)
    assert info.value.code == errors.INTERRUPTED_STATUS
    # Stopping: a further Ctrl-C cannot interrupt the exit.
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
  finally:
    signal.signal(signal.SIGINT, handler)
    sys.unraisablehook = hook
  with pytest.raises(ValueError, match="keeps its traceback"):
    main(-1)
