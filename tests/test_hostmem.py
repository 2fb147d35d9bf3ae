"""The huge-page restart of the command-line entry points (`hostmem`)."""

import os
import subprocess
import sys

import pytest

from synthdistill_jax import hostmem

GLIBC = (2, 36)
ON = "glibc.malloc.hugetlb=1"


@pytest.mark.parametrize(
    "environ, platform, glibc, thp, expected",
    [
        ({}, "linux", GLIBC, "madvise", ON),
        # Other tunables are kept.
        (
            {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
            "linux",
            GLIBC,
            "madvise",
            f"glibc.malloc.arena_max=2:{ON}",
        ),
        ({"JAX_PLATFORMS": "cpu"}, "linux", GLIBC, "madvise", ON),
        ({"JAX_PLATFORMS": "cuda,cpu"}, "linux", GLIBC, "madvise", ON),
        # The user's own setting wins, also the opt-out.
        (
            {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"},
            "linux",
            GLIBC,
            "madvise",
            None,
        ),
        (
            {"GLIBC_TUNABLES": "a.b=1:glibc.malloc.hugetlb=1"},
            "linux",
            GLIBC,
            "madvise",
            None,
        ),
        # Accelerator runs stay as they are.
        ({"JAX_PLATFORMS": "tpu"}, "linux", GLIBC, "madvise", None),
        ({"JAX_PLATFORMS": "cuda"}, "linux", GLIBC, "madvise", None),
        # THP on for every mapping already, off, or unknown.
        ({}, "linux", GLIBC, "always", None),
        ({}, "linux", GLIBC, "never", None),
        ({}, "linux", GLIBC, None, None),
        # No tunable in this C library.
        ({}, "linux", (2, 34), "madvise", None),
        ({}, "linux", None, "madvise", None),
        ({}, "darwin", None, None, None),
    ],
)
def test_tunables_with_huge_pages(environ, platform, glibc, thp, expected):
  assert (
      hostmem.tunables_with_huge_pages(environ, platform, glibc, thp)
      == expected
  )


@pytest.mark.parametrize(
    "text, mode",
    [
        ("always [madvise] never\n", "madvise"),
        ("[always] madvise never\n", "always"),
        ("always madvise [never]\n", "never"),
        ("garbage\n", None),
    ],
)
def test_read_thp_mode(tmp_path, text, mode):
  path = tmp_path / "enabled"
  path.write_text(text)
  assert hostmem.read_thp_mode(str(path)) == mode


def test_read_thp_mode_without_the_file(tmp_path):
  assert hostmem.read_thp_mode(str(tmp_path / "missing")) is None


def test_read_tunable():
  assert hostmem.read_tunable("a.b=1:glibc.malloc.hugetlb=0") == "0"
  assert hostmem.read_tunable("glibc.malloc.hugetlb_x=1") is None
  assert hostmem.read_tunable("") is None


def run_child(code: str, env: dict[str, str], *args: str) -> str:
  """Runs `code` in a fresh interpreter with `env`; returns its stdout."""
  return subprocess.run(
      [sys.executable, "-c", code, *args],
      capture_output=True,
      text=True,
      check=True,
      env=env,
      timeout=60,
  ).stdout


def test_restart_adds_the_tunable_once_and_keeps_the_arguments():
  # The child prints its tunables, arguments and process id; a restart
  # loop would never end (the timeout fails the test).
  code = (
      "import os, sys\n"
      "from synthdistill_jax import hostmem\n"
      "print('start', os.getpid(), flush=True)\n"
      "hostmem.reexec_with_huge_pages()\n"
      "print(os.environ.get('GLIBC_TUNABLES', ''), os.getpid(), sys.argv[1:])"
  )
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  env["JAX_PLATFORMS"] = "cpu"
  *starts, last = run_child(code, env, "--flag=1", "x").splitlines()
  tunables, pid, args = last.split(" ", 2)
  assert args == "['--flag=1', 'x']"
  # Same process id before and after: exec, not a child process.
  assert {s.split()[1] for s in starts} == {pid}
  expected = hostmem.tunables_with_huge_pages(
      env, sys.platform, hostmem.read_glibc_version(), hostmem.read_thp_mode()
  )
  if expected is None:
    # This host gains nothing from the tunable: no restart.
    assert len(starts) == 1 and tunables == ""
  else:
    # Restarted once, with the tunable.
    assert len(starts) == 2
    assert tunables == expected == ON


def test_restart_respects_an_opt_out():
  code = (
      "import os\n"
      "from synthdistill_jax import hostmem\n"
      "print('start', flush=True)\n"
      "hostmem.reexec_with_huge_pages()\n"
      "print(os.environ['GLIBC_TUNABLES'])"
  )
  env = dict(os.environ, GLIBC_TUNABLES="glibc.malloc.hugetlb=0")
  assert run_child(code, env).split() == ["start", "glibc.malloc.hugetlb=0"]
