"""The pure iteration functions: loss, re-sampling rule, updates, iteration."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from synthdistill_jax import distill
from synthdistill_jax import experiment
from synthdistill_jax import networks
from tests import test_train

TINY_GENERATOR = test_train.demo.TINY_GENERATOR
TINY_FACE_NET = test_train.demo.TINY_FACE_NET


def test_cosine_matches_torch_definition():
  s = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]], np.float32)
  t = np.array([[1.0, 0.0], [-1.0, -1.0], [1.0, 0.0]], np.float32)
  np.testing.assert_allclose(
      distill.cosine_similarity(s, t), [1, -1, 0], atol=1e-6
  )


@pytest.mark.parametrize("kind", distill.LOSSES)
def test_losses(kind):
  rng = np.random.default_rng(0)
  s = rng.normal(size=(4, 8)).astype(np.float32)
  t = rng.normal(size=(4, 8)).astype(np.float32)
  loss, parts = distill.distill_loss(s, t, kind)
  mse = np.mean((s - t) ** 2)
  cos = np.mean(
      np.sum(s * t, 1) / np.linalg.norm(s, axis=1) / np.linalg.norm(t, axis=1)
  )
  np.testing.assert_allclose(parts["mse"], mse, rtol=1e-6)
  np.testing.assert_allclose(parts["cosine"], cos, rtol=1e-5)
  want = {"mse": mse, "cosine": 1 - cos, "mse+cosine": mse + 1 - cos}[kind]
  np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_resampling_perturbation_scales_with_cosine():
  # Four samples with cos(s, t) = -1, 0, 0.5, 1: the rule moves w by
  # coef * (cos + 1) / 2 * eps, so the perturbation std is 0, .5, .75, 1
  # times coef, and hard samples (cos = -1) do not move at all.
  coef, dim = 0.8, 20000
  t = np.tile(np.array([[1.0, 0.0]], np.float32), (4, 1))
  s = np.array(
      [[-1.0, 0.0], [0.0, 1.0], [0.5, np.sqrt(0.75)], [2.0, 0.0]], np.float32
  )
  w = np.random.default_rng(1).normal(size=(4, dim)).astype(np.float32)
  eps = jax.random.normal(jax.random.PRNGKey(0), (4, dim))
  new = np.asarray(distill.resample_latents(w, s, t, eps, coef))
  delta = new - w
  expected = coef * np.array([0.0, 0.5, 0.75, 1.0])
  np.testing.assert_allclose(delta.std(axis=1), expected, rtol=0.03, atol=1e-6)
  assert np.abs(delta.mean(axis=1)).max() < 0.03
  # Exactly the rule, per sample.
  c = (np.asarray(distill.cosine_similarity(s, t)) + 1) / 2
  np.testing.assert_allclose(delta, coef * c[:, None] * eps, atol=1e-5)


@functools.lru_cache(maxsize=None)
def _networks():
  """Tiny generator, teacher and student, built once (init compiles slowly)."""
  gen = networks.build_generator(
      ml_collections.ConfigDict(
          dict(checkpoint="", random=TINY_GENERATOR, init_seed=0, dtype="")
      )
  )
  teacher = networks.build_teacher(
      ml_collections.ConfigDict(
          dict(checkpoint="", arch="iresnet18", kwargs=TINY_FACE_NET, dtype="")
      )
  )
  student = networks.build_student(
      ml_collections.ConfigDict(
          dict(arch="iresnet18", kwargs=TINY_FACE_NET, init_checkpoint="")
      ),
      seed=3,
  )
  return gen, teacher, student


def _spec(sampler="resample", batch=4, loss="mse"):
  gen, teacher, student = _networks()
  tx = optax.adam(1e-3)
  spec = distill.DistillSpec(
      generator=gen.module,
      teacher=teacher.module,
      student=student.module,
      tx=tx,
      schedule=lambda count: jnp.asarray(1e-3),
      batch_size=batch,
      sampler=sampler,
      loss=loss,
  )
  v = student.variables
  state = distill.TrainState(
      step=jnp.zeros((), jnp.int32),
      params=v["params"],
      batch_stats=v["batch_stats"],
      opt_state=tx.init(v["params"]),
      rng=jax.random.PRNGKey(0),
  )
  return spec, state, gen.variables, teacher.variables


def test_sample_latents_do_not_depend_on_batch_size():
  spec, _, gen_vars, _ = _spec(batch=4)
  key = jax.random.PRNGKey(7)
  w4 = distill.sample_latents(spec, gen_vars, key, 4)
  w2 = distill.sample_latents(spec, gen_vars, key, 2)
  np.testing.assert_array_equal(w4[:2], w2)
  assert w4.shape == (4, TINY_GENERATOR["w_dim"])


def test_render_faces_shape_and_range():
  spec, _, gen_vars, _ = _spec()
  w = distill.sample_latents(spec, gen_vars, jax.random.PRNGKey(1))
  x = distill.render_faces(spec, gen_vars, w, jax.random.PRNGKey(2))
  assert x.shape == (4, 112, 112, 3)
  assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_iteration_is_two_adam_updates_with_resampling():
  spec, state, gen_vars, t_vars = _spec()
  step = jax.jit(lambda st: distill.iteration(spec, st, gen_vars, t_vars))
  new, metrics = step(state)
  assert int(new.step) == 1
  assert int(new.opt_state[0].count) == 2  # Two optimiser updates.
  # Replay by hand: update k of the iteration uses key fold_in(key, 3k + tag)
  # with tags z=0, noise=1, eps=2; update 1 re-samples update 0's latents.
  key = jax.random.fold_in(state.rng, 0)
  sub = lambda k, tag: jax.random.fold_in(key, 3 * k + tag)
  w = distill.sample_latents(spec, gen_vars, sub(0, 0))
  x = distill.render_faces(spec, gen_vars, w, sub(0, 1))
  t = distill.embed_teacher(spec, t_vars, x)
  mid, m1, s = distill.train_step(spec, state, x, t, 0)
  eps = jax.random.normal(sub(1, 2), w.shape)
  w2 = distill.resample_latents(w, s, t, eps, 1.0)
  x2 = distill.render_faces(spec, gen_vars, w2, sub(1, 1))
  t2 = distill.embed_teacher(spec, t_vars, x2)
  _, m2, _ = distill.train_step(spec, mid, x2, t2, 1)
  np.testing.assert_allclose(metrics["loss_first"], m1["loss"], rtol=1e-5)
  np.testing.assert_allclose(metrics["loss_second"], m2["loss"], rtol=1e-5)
  assert float(metrics["update_norm"]) > 0
  for name in ("grad_norm", "param_norm", "learning_rate", "cosine", "mse"):
    assert np.isfinite(float(metrics[name])), name


def test_train_step_reduces_loss_on_a_fixed_batch():
  spec, state, gen_vars, t_vars = _spec()
  w = distill.sample_latents(spec, gen_vars, jax.random.PRNGKey(5))
  x = distill.render_faces(spec, gen_vars, w, jax.random.PRNGKey(6))
  t = distill.embed_teacher(spec, t_vars, x)
  step = jax.jit(lambda st: distill.train_step(spec, st, x, t, 0)[:2])
  losses = []
  for _ in range(15):
    state, m = step(state)
    losses.append(float(m["loss"]))
  assert losses[-1] < 0.7 * losses[0], losses


def test_dynamic_uses_fresh_latents_and_static_uses_given_batches():
  spec, state, gen_vars, t_vars = _spec(sampler="dynamic")
  _, m = distill.iteration(spec, state, gen_vars, t_vars)
  assert np.isfinite(float(m["loss"]))
  static = dataclasses.replace(spec, sampler="static", generator=None)
  rng = np.random.default_rng(0)
  batch = (
      rng.integers(0, 256, (4, 112, 112, 3)).astype(np.uint8),
      rng.normal(size=(4, 16)).astype(np.float32),
  )
  new, m = distill.iteration(static, state, None, None, (batch, batch))
  assert int(new.step) == 1 and np.isfinite(float(m["loss"]))


def test_global_norm_concatenated_equals_the_tree_norm():
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  tree = {
      "a": jax.random.normal(keys[0], (3, 3, 1, 7)),
      "b": {"c": jax.random.normal(keys[1], (5,)), "d": jnp.zeros(())},
      "e": jax.random.normal(keys[2], (4, 2)) * 100.0,
  }
  expected = float(optax.tree.norm(tree))
  assert float(distill.global_norm(tree, False)) == expected
  got = jax.jit(distill.global_norm, static_argnums=1)(tree, True)
  np.testing.assert_allclose(float(got), expected, rtol=1e-6)


@pytest.mark.parametrize(
    "student_sharding,concatenated",
    [("replicated", True), ("sharded", False)],
)
def test_spec_concatenates_norms_only_for_a_replicated_student(
    student_sharding, concatenated
):
  config = test_train.demo.get_config()
  config.mesh.student_sharding = student_sharding
  mesh = experiment.create_mesh(config)
  spec = experiment.create_spec(config, mesh, (None, None, None))
  assert spec.concatenated_norms is concatenated


@pytest.mark.parametrize(
    "student_sharding,platform,raveled",
    [
        ("replicated", "cpu", True),
        ("sharded", "cpu", False),
        ("replicated", "tpu", False),
        ("replicated", "gpu", False),
    ],
)
def test_adam_raveled_only_for_a_replicated_student_on_cpu(
    student_sharding, platform, raveled
):
  config = test_train.demo.get_config()
  config.mesh.student_sharding = student_sharding
  assert experiment.ravel_optimizer(config, platform) is raveled
  tx, _ = experiment.create_optimizer(config, ravel=raveled)
  params = {"a": jnp.ones((2, 3)), "b": jnp.ones((4,))}
  moments = [x for x in jax.tree.leaves(tx.init(params)) if x.ndim]
  assert [m.shape for m in moments] == (
      [(10,), (10,)] if raveled else [(2, 3), (4,), (2, 3), (4,)]
  )


def test_raveled_update_at_offsets_equals_optax_flatten():
  # `DistillSpec.flat_tx`: `train_step` runs Adam on the raveled vector
  # itself and adds the update at offsets given as program inputs; the
  # state, parameters and metrics are those of `optax.flatten(adam)` with
  # `optax.apply_updates`, the update's norm taken on the raveled vector.
  spec, state, gen_vars, t_vars = _spec()
  tx = optax.flatten(optax.adam(1e-3))
  spec = dataclasses.replace(spec, tx=tx, concatenated_norms=True)
  state = state.replace(opt_state=tx.init(state.params))
  fast = dataclasses.replace(spec, flat_tx=optax.adam(1e-3))
  w = distill.sample_latents(spec, gen_vars, jax.random.PRNGKey(5))
  x = distill.render_faces(spec, gen_vars, w, jax.random.PRNGKey(6))
  t = distill.embed_teacher(spec, t_vars, x)
  offsets = distill.raveled_offsets(state.params)
  sizes = [leaf.size for leaf in jax.tree.leaves(state.params)]
  assert offsets == tuple(np.cumsum([0] + sizes[:-1]))
  runs = {
      "optax": jax.jit(lambda st: distill.train_step(spec, st, x, t, 0)[:2]),
      "constant": jax.jit(lambda st: distill.train_step(fast, st, x, t, 0)[:2]),
      "inputs": functools.partial(
          jax.jit(lambda st, o: distill.train_step(fast, st, x, t, 0, o)[:2]),
          o=tuple(jnp.int32(o) for o in offsets),
      ),
  }
  results = {}
  for name, step in runs.items():
    st = state
    for _ in range(2):
      st, metrics = step(st)
    results[name] = jax.device_get((st, metrics))
  want_state, want_metrics = results.pop("optax")
  for got_state, got_metrics in results.values():
    for a, b in zip(
        jax.tree.leaves(got_state), jax.tree.leaves(want_state), strict=True
    ):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert got_metrics.keys() == want_metrics.keys()
    for name, value in want_metrics.items():
      np.testing.assert_allclose(got_metrics[name], value, rtol=1e-5)


@pytest.mark.parametrize(
    "arch,ravel,expected",
    [
        ("tinyfar_a", True, True),
        ("tinyfar_a", False, False),
        ("iresnet18", True, False),
    ],
)
def test_flat_transformation_only_without_frozen_parameters(
    arch, ravel, expected
):
  config = test_train.demo.get_config()
  config.student.arch = arch
  flat = experiment.flat_transformation(config, ravel)
  assert (flat is not None) is expected
  if flat is not None:
    # The same state as what `create_optimizer`'s `optax.flatten` wraps.
    tx, _ = experiment.create_optimizer(config, ravel=True)
    params = {"a": jnp.ones((2, 3)), "b": jnp.ones((4,))}
    flat_params = jnp.ones((10,))
    assert jax.tree.structure(tx.init(params)) == jax.tree.structure(
        flat.init(flat_params)
    )
