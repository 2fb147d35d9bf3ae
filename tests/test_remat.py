"""Rematerialised students: same parameters, outputs and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synthdistill_jax import models
from tests import test_configs


def _flat(tree) -> np.ndarray:
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


# One architecture per block implementation (TinyFaR-A/B/C share theirs).
@pytest.mark.parametrize("arch", ["iresnet18", "mobilefacenet", "tinyfar_c"])
def test_remat_student_has_the_same_gradients(arch):
  kwargs = dict(test_configs.TINY_STUDENTS[arch], embedding_size=16)
  if arch == "mobilefacenet":
    kwargs["num_features"] = kwargs.pop("embedding_size")
  plain = models.create_model(arch, **kwargs)
  remat = models.create_model(arch, remat=True, **kwargs)
  x = jax.random.uniform(jax.random.key(1), (8, 112, 112, 3)) * 2 - 1
  target = jax.random.normal(jax.random.key(2), (8, 16))
  variables = jax.jit(plain.init)(jax.random.key(0), x)
  assert jax.tree.structure(variables) == jax.tree.structure(
      jax.eval_shape(remat.init, jax.random.key(0), x)
  )

  def loss_and_grads(module):
    def loss(params, x, target):
      out, new = module.apply(
          {**variables, "params": params},
          x,
          train=True,
          mutable=["batch_stats"],
      )
      return jnp.sum(out * target), new

    return jax.jit(jax.value_and_grad(loss, has_aux=True))

  plain_fn = loss_and_grads(plain)
  (l1, s1), g1 = plain_fn(variables["params"], x, target)
  (l2, s2), g2 = loss_and_grads(remat)(variables["params"], x, target)
  np.testing.assert_allclose(l1, l2, rtol=1e-4)
  np.testing.assert_allclose(_flat(s1), _flat(s2), rtol=1e-4, atol=1e-5)
  # Remat changes XLA's fusions and so the float summation order; these
  # random tiny networks amplify rounding noise to ~1e-3 of the gradient.
  # The noise floor: the same program on the batch in another order (the
  # same function mathematically, other sums).
  perm = np.arange(8)[::-1]
  _, g0 = plain_fn(variables["params"], x[perm], target[perm])
  ref = np.linalg.norm(_flat(g1))
  noise = np.linalg.norm(_flat(g1) - _flat(g0)) / ref
  dist = np.linalg.norm(_flat(g1) - _flat(g2)) / ref
  assert dist <= 3 * noise + 1e-6, (dist, noise)
