"""Config presets: every one builds and steps; bad configs fail in one line."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from configs import synthdistill
from synthdistill_jax import distill
from synthdistill_jax import experiment
from synthdistill_jax import models
from synthdistill_jax import networks
from tests import conftest
from tests import test_train

# Each student family shrunk to seconds (same code paths, fewer channels).
TINY_STUDENTS = {
    "tinyfar_a": dict(width_multiplier=0.25, depth_multiplier=0.25),
    "tinyfar_b": dict(width_multiplier=0.25, depth_multiplier=0.25),
    "tinyfar_c": dict(width_multiplier=0.25, depth_multiplier=0.25),
    "mobilefacenet": dict(blocks=(1, 1, 1, 1), scale=1),
    "iresnet18": dict(layers=(1, 1, 1, 1), widths=(4, 8, 8, 8)),
}


def test_presets_cover_students_and_samplers():
  assert len(synthdistill.presets()) == 15
  assert synthdistill.get_config().name == "synthdistill_tinyfar_a_resample"
  for preset in synthdistill.presets():
    config = synthdistill.get_config(preset)
    assert preset == f"{config.student.arch}_{config.sampler.kind}"
    # The paper's schedule and optimiser.
    assert config.schedule.batch_size == 128
    assert config.schedule.epochs == 21
    assert config.schedule.steps_per_epoch == 7812
    assert config.optimizer.learning_rate == 1e-3
    assert config.seed == 2021
  with pytest.raises(ValueError, match="unknown preset"):
    synthdistill.get_config("resnet9000")


def test_paper_learning_rate_halves_every_ten_epochs():
  config = synthdistill.get_config("tinyfar_a")
  config.schedule.steps_per_epoch = 5
  _, schedule = experiment.create_optimizer(config)
  updates_per_epoch = 5 * distill.UPDATES_PER_ITERATION
  lrs = [float(schedule(e * updates_per_epoch)) for e in (0, 9, 10, 19, 20)]
  np.testing.assert_allclose(lrs, [1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4])
  last_of_epoch_9 = 10 * updates_per_epoch - 1
  assert float(schedule(last_of_epoch_9)) == pytest.approx(1e-3)


@pytest.mark.parametrize("student", sorted(TINY_STUDENTS))
def test_every_preset_student_takes_a_step(student):
  """One jitted update of each preset's student family at tiny width."""
  for sampler in synthdistill.SAMPLERS:
    config = synthdistill.get_config(f"{student}_{sampler}")
    assert config.student.arch == student
  config.student.kwargs = TINY_STUDENTS[student]
  net = networks.build_student(config.student, config.seed)
  tx, schedule = experiment.create_optimizer(config)
  spec = distill.DistillSpec(
      generator=None,
      teacher=None,
      student=net.module,
      tx=tx,
      schedule=schedule,
      batch_size=4,
      sampler="static",
  )
  state = distill.TrainState(
      step=jnp.zeros((), jnp.int32),
      params=net.variables["params"],
      batch_stats=net.variables["batch_stats"],
      opt_state=tx.init(net.variables["params"]),
      rng=jax.random.PRNGKey(0),
  )
  rng = np.random.default_rng(0)
  face = rng.integers(0, 256, (4, 112, 112, 3)).astype(np.uint8)
  target = rng.normal(size=(4, 512)).astype(np.float32)
  new, metrics = jax.jit(
      lambda s, b: distill.iteration(spec, s, None, None, b)
  )(state, ((face, target), (face, target)))
  assert int(new.step) == 1 and np.isfinite(float(metrics["loss"]))
  # Parameters the reference freezes (IResNet features.weight) stay put;
  # the others move.
  frozen_paths = models.registry.frozen_params(student)
  assert bool(frozen_paths) == (student == "iresnet18")
  moved = {}
  for path, before in jax.tree_util.tree_leaves_with_path(state.params):
    after = new.params
    for k in path:
      after = after[k.key]
    moved[tuple(k.key for k in path)] = not np.array_equal(before, after)
  for path in frozen_paths:
    assert not moved[path], path
  assert sum(moved.values()) >= len(moved) - len(frozen_paths) - 2


def _error(config, num_devices=None):
  with pytest.raises(experiment.ConfigError) as info:
    experiment.check_config(config, num_devices or jax.device_count())
  message = str(info.value)
  assert "\n" not in message
  return message


def test_bad_configs_fail_with_one_line(tmp_path):
  config = test_train.tiny_config(**{"student.arch": "resnet9000"})
  assert "student.arch='resnet9000'" in _error(config)
  config = synthdistill.get_config("tinyfar_a")
  config.generator.checkpoint = str(tmp_path / "missing")
  config.teacher.checkpoint = ""  # A random teacher.
  assert "generator.checkpoint=" in _error(config)
  assert "no such checkpoint folder (write one with tools/convert_" in (
      _error(config)
  )
  # The paper config without its frozen networks names the flags to give,
  # all of them at once.
  config = synthdistill.get_config("tinyfar_a")
  assert _error(config) == (
      "generator.checkpoint and teacher.checkpoint are not set: give"
      " --config.generator.checkpoint=DIR (written by"
      " tools/convert_stylegan2.py), --config.teacher.checkpoint=DIR"
      " (written by tools/convert_face_model.py); README: Converting real"
      " checkpoints"
  )
  config.generator.checkpoint = str(tmp_path)
  assert _error(config).startswith("teacher.checkpoint is not set: give")
  config = test_train.tiny_config(**{"schedule.batch_size": 12})
  assert "not divisible by the 8 devices" in _error(config, 8)
  config = test_train.tiny_config(**{"sampler.kind": "static"})
  assert "sampler.static_dataset" in _error(config)
  config = test_train.tiny_config(**{"loss": "l1"})
  assert "loss='l1'" in _error(config)
  config = test_train.tiny_config(**{"generator.upsample_method": "fft"})
  assert "generator.upsample_method='fft': known auto," in _error(config)
  config = test_train.tiny_config(**{"student.pointwise_grad": "fast"})
  assert "student.pointwise_grad='fast': known auto, matmul, blocked" in (
      _error(config)
  )


def test_embedding_mismatch_fails_before_any_network_is_built(monkeypatch):
  built = []
  real_init = networks._init_face_network

  def init(arch, kwargs, seed, field, abstract=False, adjust=None):
    built.append((field, abstract))
    return real_init(arch, kwargs, seed, field, abstract, adjust)

  monkeypatch.setattr(networks, "_init_face_network", init)
  config = test_train.tiny_config()
  config.student.kwargs = dict(config.student.kwargs, embedding_size=17)
  with pytest.raises(experiment.ConfigError) as info:
    experiment.create(config, random_weights=True)
  assert str(info.value).startswith("student.kwargs: the student embeds to 17")
  assert "set the student's embedding size to" in str(info.value)
  assert built and all(abstract for _, abstract in built), built


def test_face_network_init_unoptimised_on_cpu_same_values():
  assert networks.one_off_options() == {"xla_backend_optimization_level": 0}
  config = test_train.tiny_config()
  net = networks.build_student(config.student, 3, platform="cpu")
  x = jnp.zeros((2, 112, 112, 3), jnp.float32)
  ref = jax.jit(lambda k: net.module.init(k, x, train=False))(jax.random.key(3))
  for a, b in zip(jax.tree.leaves(net.variables), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_upsample_method_auto_is_phases_on_cpu_only():
  config = test_train.tiny_config()
  assert config.generator.upsample_method == "auto"
  picks = {
      p: networks.pick_for_platform(
          config.generator, "generator.upsample_method", p
      )
      for p in ("cpu", "gpu", "tpu")
  }
  assert picks == {"cpu": "phases", "gpu": "dilated", "tpu": "dilated"}
  config.generator.upsample_method = "dilated"
  assert (
      networks.pick_for_platform(
          config.generator, "generator.upsample_method", "cpu"
      )
      == "dilated"
  )
  net = networks.build_generator(config.generator, platform="cpu")
  assert net.module.upsample_method == "dilated"
  config.generator.upsample_method = "auto"
  net = networks.build_generator(config.generator, platform="cpu")
  assert net.module.upsample_method == "phases"


def test_pointwise_grad_auto_is_blocked_on_cpu_only():
  config = synthdistill.get_config("tinyfar_a")
  assert config.student.pointwise_grad == "auto"
  picks = {
      p: networks.pick_for_platform(config.student, "student.pointwise_grad", p)
      for p in ("cpu", "gpu", "tpu")
  }
  assert picks == {"cpu": "blocked", "gpu": "matmul", "tpu": "matmul"}
  net = networks.build_student(config.student, 0, abstract=True, platform="tpu")
  assert net.module.pointwise_grad == "matmul"
  net = networks.build_student(config.student, 0, abstract=True, platform="cpu")
  assert net.module.pointwise_grad == "blocked"
  # A training setting: not among the constructor kwargs that are exported.
  assert "pointwise_grad" not in net.kwargs
  config.student.pointwise_grad = "matmul"
  net = networks.build_student(config.student, 0, abstract=True, platform="cpu")
  assert net.module.pointwise_grad == "matmul"
  # Students without the setting accept only 'auto'.
  config.student.arch = "mobilefacenet"
  with pytest.raises(networks.ConfigError, match="mobilefacenet has no such"):
    networks.build_student(config.student, 0, abstract=True)
  config.student.pointwise_grad = "auto"
  networks.build_student(config.student, 0, abstract=True)


def test_face_network_folder_is_not_a_generator(tmp_path):
  module = models.create_model("iresnet18", **demo.TINY_FACE_NET)
  x = jnp.zeros((1, 112, 112, 3))
  variables = jax.jit(module.init)(jax.random.key(0), x)
  models.save(tmp_path / "face", "iresnet18", demo.TINY_FACE_NET, variables)
  config = test_train.tiny_config()
  config.generator.checkpoint = str(tmp_path / "face")
  assert "not a StyleGAN2 generator" in _error(config)
  config.generator.checkpoint = ""
  config.teacher.checkpoint = str(tmp_path / "face")
  experiment.check_config(config, 1)  # A face network is a valid teacher.


def test_main_prints_one_line_and_exits_1(tmp_path):
  env = dict(os.environ, XLA_FLAGS=conftest.xla_flags(1))
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "synthdistill_jax.main",
          f"--config={test_train.ROOT / 'configs' / 'demo.py'}:tiny",
          f"--workdir={tmp_path}",
          "--config.student.arch=resnet9000",
      ],
      cwd=test_train.ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  assert proc.returncode == 1
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert errors == [
      "error: student.arch='resnet9000': unknown student; known: "
      + ", ".join(networks.face_archs())
  ]
  assert "Traceback" not in proc.stderr
