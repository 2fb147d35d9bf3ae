"""The benchmark's table, the comparison of two runs and the machine's name."""

import pathlib
import platform
from typing import Any

from synthdistill_jax import hostmem


def format_table(result: dict[str, Any]) -> str:
  """Renders one benchmark result as a fixed-width text table."""
  head = (
      f"{'stage':<26}{'img/call':>9}{'ms/call':>10}{'img/s':>9}"
      f"{'img/s/dev':>10}{'GFLOP/img':>10}{'GFLOP/s':>9}{'MFU':>7}"
      f"{'MFU(ds)':>8}{'compile s':>10}{'kernels':>8}{'temp MiB':>9}"
  )
  # Results written before the peak was measured twice have no runs.
  runs = result["peak"].get("flops_per_s_runs")
  best_of = (
      f", best of {'/'.join(f'{r / 1e9:.1f}' for r in runs)} before/after"
      if runs
      else ""
  )
  lines = [
      f"== {result['config']}  batch {result['batch_size']}"
      f"  {result['compute_dtype']}  weights: {result['weights']}",
      f"   {result['num_devices']} x {result['device_kind']}"
      f" ({result['backend']}); measured {result['peak']['dtype']} matmul"
      f" peak {result['peak']['flops_per_s'] / 1e9:.1f} GFLOP/s"
      f" ({result['peak']['size']}^2{best_of})"
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
    # Distinct fused kernels (what compile time grows with); results
    # written before they were counted have none.
    kernels = (t.get("fusions") or {}).get("distinct", "-")
    lines.append(
        f"{name:<26}{t['images_per_call']:>9}"
        f"{t['seconds_median'] * 1e3:>10.1f}{t['images_per_s']:>9.2f}"
        f"{t['images_per_s_per_device']:>10.2f}"
        f"{t['flops_per_image'] / 1e9:>10.2f}{t['flops_per_s'] / 1e9:>9.1f}"
        f"{t['mfu']:>7.1%}{ds:>8}{t['compile_s']:>10.1f}{kernels:>8}"
        f"{temp:>9.0f}"
    )
  memory = result["peak_memory"]
  # Results written before huge pages were recorded have no `host_memory`.
  host = result.get("host_memory")
  pages = (
      f"; huge pages: {hostmem.TUNABLE}={host['glibc_hugetlb'] or 'unset'},"
      f" THP {host['thp_mode'] or 'unknown'}"
      if host
      else ""
  )
  lines.append(
      f"peak memory {memory['peak_bytes'] / 2**30:.2f} GiB"
      f" ({memory['source']}){pages}"
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
