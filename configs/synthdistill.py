"""The paper's SynthDistill runs: a student x sampler preset grid.

Needs a converted FFHQ-256 StyleGAN2 and ArcFace IResNet-100 (see
docs/training.md, "Converting the frozen networks"):

  python -m synthdistill_jax.main \
    --config=configs/synthdistill.py:tinyfar_a_resample --workdir=runs/a \
    --config.generator.checkpoint=ckpt/stylegan2-ffhq-256 \
    --config.teacher.checkpoint=ckpt/arcface-iresnet100

Presets `<student>_<sampler>` with student in tinyfar_a, tinyfar_b,
tinyfar_c, mobilefacenet, iresnet18 and sampler in static, dynamic, resample;
a bare student name means `_resample`; the default is `tinyfar_a_resample`.
Cost: 21 x 7,812 iterations x 2 updates x 128 images = 42 M generated faces
at about 28 GMAC each (generator 15, teacher 12.1, student forward and
backward 0.4): about 2.4e18 FLOP, roughly 5 hours at a sustained 125 TFLOP/s
(bfloat16 on a GPU/TPU host); out of reach on a CPU (the PyTorch reference
runs 2.2 images/s on the 2-core development machine).
The static sampler also needs `--config.sampler.static_dataset=DIR` from
`tools/make_static_dataset.py`.
"""

from synthdistill_jax import defaults

STUDENTS = ("tinyfar_a", "tinyfar_b", "tinyfar_c", "mobilefacenet", "iresnet18")
SAMPLERS = ("static", "dynamic", "resample")


def presets() -> list[str]:
  """Every `<student>_<sampler>` preset name."""
  return [f"{s}_{m}" for s in STUDENTS for m in SAMPLERS]


def get_config(arg: str | None = None):
  """The paper config for preset `arg` (default 'tinyfar_a' = resample)."""
  arg = arg or "tinyfar_a"
  student, sampler = arg, "resample"
  for m in SAMPLERS:
    if arg.endswith("_" + m):
      student, sampler = arg[: -len(m) - 1], m
  if student not in STUDENTS:
    raise ValueError(
        f"configs/synthdistill.py: unknown preset {arg!r}; known:"
        f" {', '.join(presets())}, or a bare student name"
        f" ({', '.join(STUDENTS)}) for its _resample preset"
    )
  config = defaults.base_config()
  config.name = f"synthdistill_{student}_{sampler}"
  config.student.arch = student
  config.sampler.kind = sampler
  # The frozen networks must come from converted checkpoints.
  config.generator.checkpoint = defaults.required("generator.checkpoint")
  config.teacher.checkpoint = defaults.required("teacher.checkpoint")
  return config
