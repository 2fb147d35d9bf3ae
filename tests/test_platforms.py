"""No TPU runtime where no TPU is: `platforms.skip_absent_tpu`."""

import os
import pathlib
import subprocess
import sys

import pytest

from synthdistill_jax import platforms

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_tpu_present_reads_pci_vendors_and_device_files(tmp_path):
  sys_root, dev_root = tmp_path / "sys", tmp_path / "dev"
  nic = sys_root / "bus" / "pci" / "devices" / "0000:00:04.0"
  nic.mkdir(parents=True)
  (nic / "vendor").write_text("0x1af4\n")  # A virtio device.
  dev_root.mkdir()
  assert not platforms.tpu_present(str(sys_root), str(dev_root))
  chip = sys_root / "bus" / "pci" / "devices" / "0000:00:05.0"
  chip.mkdir()
  (chip / "vendor").write_text("0x1ae0\n")  # Google: a TPU chip.
  assert platforms.tpu_present(str(sys_root), str(dev_root))
  (chip / "vendor").unlink()
  (dev_root / "accel0").write_text("")  # A TPU VM's device file.
  assert platforms.tpu_present(str(sys_root), str(dev_root))


def test_a_host_without_tpu_starts_no_tpu_runtime():
  # libtpu is installed by the test extra; on a host without a TPU chip it
  # printed five lines of warnings before JAX fell back to the CPU.
  pytest.importorskip("libtpu")
  if platforms.tpu_present() or platforms._jax_plugins_installed():
    pytest.skip("this host may have an accelerator")
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  chosen, stderr = _platforms_chosen(env)
  assert chosen == "'cpu' cpu"  # The setting, and the backend JAX started.
  assert "TPU" not in stderr, stderr
  # The user's own setting, even an empty one (every platform), stays.
  chosen, _ = _platforms_chosen(dict(env, JAX_PLATFORMS=""))
  assert chosen.startswith("'' "), chosen


def _platforms_chosen(env) -> tuple[str, str]:
  """`jax_platforms` and the backend of a process after `skip_absent_tpu`."""
  code = (
      "from synthdistill_jax import platforms\n"
      "platforms.skip_absent_tpu()\n"
      "import jax\n"
      "print(repr(jax.config.jax_platforms), jax.default_backend())\n"
  )
  proc = subprocess.run(
      [sys.executable, "-c", code],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
      check=True,
  )
  return proc.stdout.strip(), proc.stderr
