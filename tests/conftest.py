"""Shared pytest setup: one CPU device, float32 parity, a compilation cache.

- One device unless a test is about devices: such a test carries
  `@pytest.mark.devices(n)` and, when this process has fewer, runs again in
  a subprocess (`python -m pytest <its node id>`) with `n` simulated devices
  (`XLA_FLAGS=--xla_force_host_platform_device_count=n`, which must be set
  before JAX starts, hence the subprocess).
- JAX's persistent compilation cache in `.pytest_cache/jax` (or
  `$JAX_COMPILATION_CACHE_DIR`), shared by the xdist workers and the
  subprocesses the tests start, so the same tiny programs compile once per
  run (and once per machine when the folder is kept).
- XLA:CPU's code generation at LLVM -O1 (`XLA_FLAGS`), as the trainer's
  CPU student step already is: compiling is most of the suite's time, and
  -O1 compiles 15 % faster than the default -O2 (the remat, config and
  distill tests: 181 -> 153 s on 2 cores, 2026-12-07) with the same HLO
  programs; options a program sets itself (`programs.*_CPU_OPTIONS`) still
  apply. -O0 would be faster again (111 s) but changes the summation order
  that the remat test's noise floor is measured with.
"""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEVICES_ENV = "SYNTHDISTILL_TEST_DEVICES"


def xla_flags(devices: int) -> str:
  """`XLA_FLAGS` for tests: `devices` CPU devices, code generation at -O1.

  Also for the commands that tests start with one device of their own:
  the same flags compile as fast and share the compilation cache, whose
  keys include `XLA_FLAGS`.
  """
  return (
      "--xla_backend_optimization_level=1"
      f" --xla_force_host_platform_device_count={devices}"
  )


os.environ.setdefault(
    "XLA_FLAGS", xla_flags(int(os.environ.get(DEVICES_ENV, "1")))
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", str(ROOT / ".pytest_cache" / "jax")
)
# Cache every program that took a moment to compile (the default, 1 s,
# skips most of the tiny ones that tests compile again and again).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import pytest

# Parity tests compare against float32 PyTorch on CPU: use exact matmuls.
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
  config.addinivalue_line(
      "markers",
      "devices(n): needs n JAX devices; rerun in a subprocess with n"
      " simulated CPU devices when this process has fewer",
  )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
  """Runs a `devices(n)` test in a subprocess when it needs more devices."""
  marker = item.get_closest_marker("devices")
  if marker is None or jax.device_count() >= marker.args[0]:
    return
  n = marker.args[0]
  env = dict(os.environ, XLA_FLAGS="", **{DEVICES_ENV: str(n)})
  del env["XLA_FLAGS"]
  result = subprocess.run(
      [
          sys.executable,
          "-m",
          "pytest",
          "-p",
          "no:xdist",
          "-p",
          "no:cacheprovider",
          "-q",
          "-x",
          item.nodeid,
      ],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      check=False,
  )
  if result.returncode == 0 and " passed" not in result.stdout:
    pytest.skip(f"skipped with {n} devices: {result.stdout.strip()[-300:]}")
  if result.returncode != 0:
    pytest.fail(
        f"{item.nodeid} with {n} devices failed:\n"
        + (result.stdout + result.stderr)[-6000:],
        pytrace=False,
    )
  # Passed in the subprocess: do not run the body here as well.
  item.runtest = lambda: None
