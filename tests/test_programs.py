"""The CPU split iteration equals the one-program iteration."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from synthdistill_jax import distill
from synthdistill_jax import experiment
from synthdistill_jax import programs
from synthdistill_jax.benchmark import stages as benchmark_stages
from tests import tiny

# A MobileFaceNet student trains every parameter, so its optimiser is
# raveled on CPU and the split step takes the update's offsets as inputs
# (`programs.offset_inputs`); the IResNet's frozen `features.scale` keeps
# the whole optimiser in the step (`experiment.flat_transformation`).
MOBILEFACENET = {
    "student.arch": "mobilefacenet",
    "student.kwargs": dict(blocks=(1, 1, 1, 1), scale=1, num_features=16),
}


@pytest.mark.parametrize(
    "sampler,student",
    [("resample", {}), ("dynamic", {}), ("resample", MOBILEFACENET)],
)
def test_split_iteration_equals_the_fused_program(sampler, student):
  results = {}
  for mode in ("on", "off"):
    config = tiny.tiny_config(
        **{"mesh.split_iteration": mode, "sampler.kind": sampler}, **student
    )
    exp = experiment.create(config, random_weights=True)
    assert isinstance(exp.iterate, programs.SplitIteration) == (mode == "on")
    assert (exp.spec.flat_tx is not None) == bool(student)
    state, metrics = exp.iterate(
        exp.state, exp.gen_vars, exp.teacher_vars, None
    )
    results[mode] = (state, jax.device_get(metrics))
  (split, m_split), (fused, m_fused) = results["on"], results["off"]
  assert int(split.step) == int(fused.step) == 1
  # The render+teacher piece runs other convolution kernels on CPU
  # (`RENDER_CPU_OPTIONS`): the first update's loss is equal up to float32
  # rounding. The first update moves parameters whose gradient is zero but
  # for rounding (a BN offset feeding another BN) by +-lr, the sign depending
  # on the rounding (see `tiny.assert_params_close`): what the second update
  # sees differs: its loss by up to ~5e-4 (measured on an AVX2 CPU; AVX-512
  # rounding happened to agree to 1e-4), its gradient's norm by up to 2 %,
  # too sensitive to compare.
  np.testing.assert_allclose(
      m_split["loss_first"], m_fused["loss_first"], rtol=1e-5
  )
  for name in ("loss_second", "param_norm"):
    np.testing.assert_allclose(m_split[name], m_fused[name], rtol=5e-3)
  assert m_split["learning_rate"] == m_fused["learning_rate"]
  # Adam moves a parameter by about the learning rate whatever its
  # gradient's size, so rounding may flip the sign of a vanishing one: two
  # updates bound any difference by 4 * lr.
  lr = float(m_fused["learning_rate"])
  for a, b in zip(jax.tree.leaves(split.params), jax.tree.leaves(fused.params)):
    np.testing.assert_allclose(a, b, atol=4 * lr)


def test_cpu_pieces_compile_with_their_options():
  """The XLA options each CPU piece is compiled with, trainer and benchmark."""
  exp = experiment.create(
      tiny.tiny_config(**{"mesh.split_iteration": "on"}), random_weights=True
  )
  lowered = exp.iterate.lower(exp.state, exp.gen_vars, exp.teacher_vars)
  options = {name: low.options for name, (low, _) in lowered.lowered.items()}
  assert options == {
      "begin": None,
      "render": programs.RENDER_CPU_OPTIONS,
      "step": programs.STEP_CPU_OPTIONS,
      "next": None,
      "finish": None,
  }
  stages = benchmark_stages.build_stages(exp, jax.random.PRNGKey(0))
  by_name = {stage[0]: stage[1] for stage in stages}
  assert by_name["student fwd+bwd+update"].options == programs.STEP_CPU_OPTIONS
  assert by_name["teacher forward"].options == programs.RENDER_CPU_OPTIONS


def test_auto_splits_on_cpu_only():
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
  assert programs.use_split("auto", mesh, "resample")
  assert not programs.use_split("auto", mesh, "static")
  assert not programs.use_split("off", mesh, "resample")


def test_unknown_mode_is_one_config_error():
  config = tiny.tiny_config(**{"mesh.split_iteration": "yes"})
  with pytest.raises(
      experiment.ConfigError,
      match="mesh.split_iteration must be one of auto, on, off, got .yes.",
  ):
    experiment.create(config, random_weights=True)


def test_offset_inputs_are_replicated_int32_scalars():
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
  spec = distill.DistillSpec(
      generator=None,
      teacher=None,
      student=None,
      tx=optax.flatten(optax.adam(1e-3)),
      schedule=None,
      batch_size=1,
      flat_tx=optax.adam(1e-3),
  )
  params = {"a": jnp.zeros((2, 3)), "b": {"c": jnp.zeros((4,))}}
  offsets = programs.offset_inputs(spec, mesh, params)
  assert [int(o) for o in offsets] == [0, 6]
  assert all(o.dtype == jnp.int32 and o.shape == () for o in offsets)
  assert all(o.sharding.is_fully_replicated for o in offsets)
  # Without a raveled optimiser, or past int32 indices, no inputs: the
  # step then slices the update at constant offsets.
  per_leaf = dataclasses.replace(spec, flat_tx=None)
  assert programs.offset_inputs(per_leaf, mesh, params) is None
  huge = {"a": jax.ShapeDtypeStruct((2**31,), jnp.float32)}
  assert programs.offset_inputs(spec, mesh, huge) is None
