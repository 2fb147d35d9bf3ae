"""Large host buffers on transparent huge pages, for the CPU backend.

XLA:CPU allocates each program's temporary buffer (hundreds of MiB for the
paper config's student step) with `malloc` on every call; glibc serves
sizes this large with a fresh `mmap` and unmaps them on `free`, so every
call faults every 4 KiB page in again: about 85,000 page faults and 0.2 s
of kernel time per TinyFaR-A step on 2 cores, two fifths of its CPU time.
With glibc's `glibc.malloc.hugetlb=1` tunable, glibc asks for transparent
huge pages on those mappings (`madvise(MADV_HUGEPAGE)`): 2 MiB pages, 650
faults a step (`docs/performance.md`, 2026-12-03 night).

Tunables are read when the dynamic loader starts, so the command-line entry
points re-execute themselves once with the tunable added, before their
heavy imports (`reexec_with_huge_pages`). Nothing happens when it would not
help or is not wanted: not Linux with glibc >= 2.35, the kernel's THP mode
is not `madvise` (`always` gives huge pages already, `never` none),
`JAX_PLATFORMS` names no CPU platform, or `GLIBC_TUNABLES` already sets
`glibc.malloc.hugetlb` (`glibc.malloc.hugetlb=0` opts out). Standard
library only: this module runs before JAX is imported.
"""

import os
import sys

THP_PATH = "/sys/kernel/mm/transparent_hugepage/enabled"
TUNABLE = "glibc.malloc.hugetlb"
# glibc gained the tunable in 2.35.
MIN_GLIBC = (2, 35)


def read_thp_mode(path: str = THP_PATH) -> str | None:
  """The kernel's THP mode (`always`, `madvise`, `never`), None if unknown."""
  try:
    with open(path, encoding="ascii", errors="replace") as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1 : end] if 0 <= start < end else None


def read_glibc_version() -> tuple[int, ...] | None:
  """glibc's version, e.g. `(2, 36)`; None for another C library."""
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
  except (AttributeError, ValueError, OSError):
    return None
  if name != "glibc":
    return None
  try:
    return tuple(int(part) for part in version.split(".")[:2])
  except ValueError:
    return None


def read_tunable(tunables: str, name: str = TUNABLE) -> str | None:
  """The value of `name` in a `GLIBC_TUNABLES` string, or None."""
  for entry in tunables.split(":"):
    key, sep, value = entry.partition("=")
    if sep and key.strip() == name:
      return value.strip()
  return None


def tunables_with_huge_pages(
    environ: dict[str, str],
    platform: str,
    glibc: tuple[int, ...] | None,
    thp_mode: str | None,
) -> str | None:
  """The `GLIBC_TUNABLES` to restart with, or None to run as is.

  Args:
    environ: the process environment.
    platform: `sys.platform`.
    glibc: `read_glibc_version()`.
    thp_mode: `read_thp_mode()`.

  Returns:
    The current tunables with `glibc.malloc.hugetlb=1` appended, when
    the tunable would give huge pages that the process does not have yet.
  """
  if not platform.startswith("linux") or glibc is None or glibc < MIN_GLIBC:
    return None
  if thp_mode != "madvise":
    return None
  platforms = environ.get("JAX_PLATFORMS", "").strip()
  if platforms and "cpu" not in [p.strip() for p in platforms.split(",")]:
    return None
  current = environ.get("GLIBC_TUNABLES", "")
  if read_tunable(current) is not None:
    return None
  return f"{current}:{TUNABLE}=1" if current else f"{TUNABLE}=1"


def reexec_with_huge_pages() -> None:
  """Restarts this process with the huge-page tunable if it would help.

  Called by the command-line entry points under `if __name__ ==
  "__main__"`, before their heavy imports. Same interpreter, arguments
  (`sys.orig_argv`), process id and environment plus the tunable; returns
  without restarting when `tunables_with_huge_pages` says no or the
  restart fails.
  """
  tunables = tunables_with_huge_pages(
      dict(os.environ), sys.platform, read_glibc_version(), read_thp_mode()
  )
  # `orig_argv` holds the interpreter's own options too (`-m`, `-X`, ...).
  argv = getattr(sys, "orig_argv", None)
  if tunables is None or not sys.executable or not argv:
    return
  env = dict(os.environ, GLIBC_TUNABLES=tunables)
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, argv, env)
  except OSError:
    # The run goes on without huge pages, as it would have before.
    return


def describe() -> dict[str, str | None]:
  """The settings in effect, for logs and benchmark records."""
  return {
      "thp_mode": read_thp_mode(),
      "glibc_hugetlb": read_tunable(os.environ.get("GLIBC_TUNABLES", "")),
  }
