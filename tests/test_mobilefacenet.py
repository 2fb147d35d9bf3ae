"""MobileFaceNet (insightface `mbf`): golden parity, layout, bfloat16 trunk."""

import jax
import numpy as np
import pytest

from synthdistill_jax.convert import face
from synthdistill_jax.models import mobilefacenet
from tests import golden
from tests import test_iresnet

_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@pytest.fixture(scope="module")
def converted():
  return face.variables_from_state_dict(
      "mobilefacenet", golden.state_dict("mobilefacenet")
  )


def test_golden_parity(converted):
  module, variables = converted
  arrays = golden.load_arrays("mobilefacenet")
  out = test_iresnet.embed(module, variables, arrays["x_nhwc"])
  diff, rel, cos = test_iresnet.assert_embedding_parity(out, arrays["emb"])
  print(f"mobilefacenet: max|diff| {diff:.3g} ({rel:.3g} of max), cos {cos}")


def test_golden_keys_shapes_order_count_and_round_trip(converted):
  state_dict = golden.state_dict("mobilefacenet")
  expected = face.expected_state_dict_shapes("mobilefacenet")
  assert list(expected) == list(state_dict)
  assert all(tuple(expected[k]) == v.shape for k, v in state_dict.items())
  count = sum(
      v.size
      for k, v in state_dict.items()
      if k.rsplit(".", 1)[1] not in _BUFFERS
  )
  assert count == golden.load_manifest("mobilefacenet")["param_count"]
  _, variables = converted
  params = sum(x.size for x in jax.tree.leaves(variables["params"]))
  assert params == count == 2_059_520
  back = face.state_dict_from_variables("mobilefacenet", variables)
  assert list(back) == list(state_dict)
  for key, value in state_dict.items():
    assert back[key].dtype == value.dtype, key
    np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_bfloat16_trunk_stays_close(converted):
  _, variables = converted
  module = mobilefacenet.create("mobilefacenet", dtype="bfloat16")
  arrays = golden.load_arrays("mobilefacenet")
  out = test_iresnet.embed(module, variables, arrays["x_nhwc"])
  ref = arrays["emb"]
  assert out.dtype == np.float32
  cos = np.sum(out * ref, 1) / np.linalg.norm(out, axis=1)
  cos /= np.linalg.norm(ref, axis=1)
  assert cos.min() > 0.99 and not np.allclose(out, ref, atol=1e-5)


def test_create_rejects_bad_arguments():
  with pytest.raises(ValueError, match="mbf"):
    mobilefacenet.create("mbf")
  with pytest.raises(ValueError, match="blocks"):
    mobilefacenet.create("mobilefacenet", blocks=(1, 2))
  with pytest.raises(ValueError, match="dtype"):
    mobilefacenet.create("mobilefacenet", dtype="float64")
