"""Which JAX platforms a command starts: no TPU runtime where no TPU is.

The `test` and `tpu` extras install libtpu (the ahead-of-time compiles for
TPU slices need it). JAX then tries the TPU runtime on every host, and on
one without a TPU chip libtpu prints five lines of warnings to stderr
("could not determine TPU accelerator type", "unexpected worker hostname")
before JAX falls back quietly: in front of every command's output and of
every one-line error. `skip_absent_tpu` leaves JAX to the CPU on such a
host, and changes nothing where a TPU, a GPU plugin or the user's own
`JAX_PLATFORMS` is there.
"""

import glob
import importlib.metadata
import importlib.util
import os

import jax

# PCI vendor of Google's TPU chips, as /sys lists it.
_GOOGLE_PCI_VENDOR = "0x1ae0"


def tpu_present(sys_root: str = "/sys", dev_root: str = "/dev") -> bool:
  """Whether this host shows any sign of a TPU chip.

  Args:
    sys_root: where sysfs is mounted (tests point it elsewhere).
    dev_root: where the device files are.

  Returns:
    True when a PCI device of Google's vendor id, an `accel*` device file
    (TPU VMs) or a VFIO group (TPUs passed to containers) is there: any
    sign counts, so that a TPU is never hidden from JAX.
  """
  for vendor in glob.glob(os.path.join(sys_root, "bus/pci/devices/*/vendor")):
    try:
      with open(vendor, encoding="ascii") as f:
        if f.read().strip().lower() == _GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return bool(
      glob.glob(os.path.join(dev_root, "accel*"))
      or glob.glob(os.path.join(dev_root, "vfio", "[0-9]*"))
  )


def _jax_plugins_installed() -> bool:
  """Whether a PJRT plugin (CUDA, ROCm, ...) may offer another platform."""
  if importlib.util.find_spec("jax_plugins") is not None:
    return True
  return bool(importlib.metadata.entry_points(group="jax_plugins"))


def skip_absent_tpu() -> None:
  """Leaves JAX to the CPU where libtpu is installed but no TPU is.

  Call before anything asks JAX for its devices. Does nothing when
  `JAX_PLATFORMS` is set (the user's choice), libtpu is not installed,
  the host shows a TPU, or a PJRT plugin could offer a GPU.
  """
  if "JAX_PLATFORMS" in os.environ or jax.config.jax_platforms:
    return
  if importlib.util.find_spec("libtpu") is None:
    return
  if tpu_present() or _jax_plugins_installed():
    return
  jax.config.update("jax_platforms", "cpu")
