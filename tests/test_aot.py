"""bfloat16 end to end and the ahead-of-time compile for a TPU slice.

A small generator is written as an NVIDIA-format pickle with
`num_fp16_res=2` (as the official FFHQ pickles carry 4) and converted by
`tools/convert_stylegan2.py`; with every network's dtype set to bfloat16 no
convolution of the lowered iteration may run in float32, and float32
configs stay float32. The `aot` CLI then compiles the tiny config with that
generator for a 4-chip v5e slice (libtpu, which the `tpu` extra installs).
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from synthdistill_jax import aot
from synthdistill_jax import experiment
from tests import nvidia_pickles
from tests import tiny

ROOT = pathlib.Path(__file__).resolve().parents[1]
BF16 = {
    f"{net}.dtype": "bfloat16" for net in ("generator", "teacher", "student")
}


@pytest.fixture(scope="module")
def converted_generator(tmp_path_factory):
  """A converted folder of the small golden generator, num_fp16_res=2."""
  tmp = tmp_path_factory.mktemp("generator")
  pkl, out = tmp / "g.pkl", tmp / "model"
  nvidia_pickles.write_official_pickle(
      pkl, "stylegan2_sg3_small", init_kwargs={"num_fp16_res": 2}
  )
  result = subprocess.run(
      [
          sys.executable,
          str(ROOT / "tools" / "convert_stylegan2.py"),
          f"--input={pkl}",
          f"--output={out}",
      ],
      capture_output=True,
      text=True,
      check=False,
  )
  assert result.returncode == 0, result.stderr
  kwargs = json.loads((out / "model.json").read_text())["kwargs"]
  assert kwargs["num_fp16_res"] == 2 and "fp16_dtype" not in kwargs
  return str(out)


def _lowered_convolutions(config) -> dict[str, int]:
  exp = experiment.create(config, devices=jax.devices()[:1], abstract=True)
  lowered = exp.iterate.lower(*exp.iterate_args())
  return aot.count_convolutions(lowered.as_text())


def test_bfloat16_reaches_every_convolution(converted_generator):
  config = tiny.tiny_config(
      **BF16, **{"generator.checkpoint": converted_generator}
  )
  counts = _lowered_convolutions(config)
  # The generator's convs (two per block above 4x4, forward only), the
  # teacher's forward and the student's forward and backward.
  assert counts.get("bf16", 0) >= 40, counts
  assert "f32" not in counts, counts
  config = tiny.tiny_config(**{"generator.checkpoint": converted_generator})
  counts = _lowered_convolutions(config)
  assert set(counts) == {"f32"}, counts


def test_aot_compiles_for_a_four_chip_slice(converted_generator, tmp_path):
  pytest.importorskip("libtpu")
  output = tmp_path / "aot.json"
  flags = [f"--config.{k}={v}" for k, v in BF16.items()]
  result = subprocess.run(
      [
          sys.executable,
          "-m",
          "synthdistill_jax.aot",
          f"--config={ROOT / 'configs' / 'demo.py'}:tiny",
          "--topology=v5e:2x2",
          f"--output={output}",
          f"--config.generator.checkpoint={converted_generator}",
          *flags,
      ],
      capture_output=True,
      text=True,
      check=False,
      cwd=ROOT,
      env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "predicted images/s" in result.stdout
  record = json.loads(output.read_text())
  assert record["fits"] is True
  assert record["chips"] == 4 and record["per_chip_batch"] == 2
  assert 0 < record["hbm_bytes_per_chip"] < record["hbm_capacity_bytes"]
  assert record["hbm_capacity_bytes"] == 16 * 2**30
  assert record["predicted_images_per_s"] > 0
  assert record["compile_s"] > 0
  assert "f32" not in record["convolutions_by_dtype"]
  assert record["convolutions_by_dtype"]["bf16"] >= 40
  # The TPU keeps its native transposed conv (the phase convs are for CPU).
  assert record["upsample_method"] == "dilated"
  # The tiny student (an IResNet) has no `pointwise_grad` setting.
  assert record["pointwise_grad"] is None
  # Data parallel over 4 chips: the gradients are all-reduced.
  assert record["collectives"].get("all-reduce", 0) >= 1


def _aot_cli(*flags):
  return subprocess.run(
      [sys.executable, "-m", "synthdistill_jax.aot", *flags],
      capture_output=True,
      text=True,
      check=False,
      cwd=ROOT,
      env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )


def test_aot_refuses_a_batch_the_chips_do_not_divide(tmp_path):
  # In subprocesses: libtpu is never loaded into the test process (the
  # profiler test crashed in a worker that had it loaded).
  pytest.importorskip("libtpu")
  tiny_config = f"--config={ROOT / 'configs' / 'demo.py'}:tiny"
  output = tmp_path / "aot.json"
  for flags, expected in (
      (
          ["--topology=v5e:2x2", "--batch_size=6"],
          "schedule.batch_size=6 does not divide over the 4 chips of v5e:2x2;"
          " use a multiple of 4",
      ),
      (["--topology=v5e"], "--topology='v5e': expected <generation>:<shape>"),
      (["--topology=v9z:2x2"], "--topology='v9z:2x2': "),
      (
          ["--topology=v5e:2x2", f"--output={tmp_path}"],
          f"--output={tmp_path}: is a folder; give a file in it",
      ),
  ):
    result = _aot_cli(tiny_config, f"--output={output}", *flags)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [
        l for l in result.stderr.splitlines() if l.startswith("aot: error:")
    ]
    assert len(lines) == 1 and expected in lines[0], result.stderr[-2000:]
    assert not output.exists()
    if "batch_size" in expected or "--output" in expected:
      # Checked before libtpu loads: nothing but the one line.
      assert result.stderr.strip() == lines[0]


def test_count_convolutions_reads_operand_dtypes():
  text = "\n".join(
      [
          "%0 = stablehlo.convolution(%a, %b) dim_numbers = [b, 0, 1, f]x[0, 1,"
          " i, o]->[b, 0, 1, f], window = {} : (tensor<2x8x8x4xbf16>,"
          " tensor<3x3x4x4xbf16>) -> tensor<2x8x8x4xbf16>",
          "%1 = stablehlo.convolution(%c, %d) : (tensor<2x8x8x4xf32>,"
          " tensor<3x3x4x4xf32>) -> tensor<2x8x8x4xf32>",
          "%2 = stablehlo.dot_general %e, %f : (tensor<2x4xf32>, tensor<4x4xf32>)",
      ]
  )
  assert aot.count_convolutions(text) == {"bf16": 1, "f32": 1}
