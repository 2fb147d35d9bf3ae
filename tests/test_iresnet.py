"""IResNet: golden parity with insightface, structure of the deep variants.

The golden cases (iresnet18, iresnet50) pin the port to the official PyTorch
code. Depths without a golden case (34, 100, 200) are checked against
`torch_iresnet`, a PyTorch re-statement of insightface's `iresnet.py` written
from its structure (module names and order, strides, paddings); the golden
cases also pin that re-statement (`test_torch_reference_matches_golden`).
"""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synthdistill_jax import models
from synthdistill_jax.convert import face
from synthdistill_jax.models import iresnet
from synthdistill_jax.models import layers
from tests import golden

_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def torch_iresnet(
    layers, widths=(64, 128, 256, 512), num_features=512, eps=1e-5
):
  """insightface's IResNet in PyTorch, widths configurable (needs torch)."""
  torch = pytest.importorskip("torch")
  nn = torch.nn

  class IBasicBlock(nn.Module):

    def __init__(self, cin, cout, stride):
      super().__init__()
      self.bn1 = nn.BatchNorm2d(cin, eps=eps)
      self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(cout, eps=eps)
      self.prelu = nn.PReLU(cout)
      self.conv2 = nn.Conv2d(cout, cout, 3, stride, 1, bias=False)
      self.bn3 = nn.BatchNorm2d(cout, eps=eps)
      self.downsample = None
      if stride != 1 or cin != cout:
        self.downsample = nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False),
            nn.BatchNorm2d(cout, eps=eps),
        )

    def forward(self, x):
      out = self.conv1(self.bn1(x))
      out = self.bn3(self.conv2(self.prelu(self.bn2(out))))
      return out + (x if self.downsample is None else self.downsample(x))

  class IResNet(nn.Module):

    def __init__(self):
      super().__init__()
      self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(widths[0], eps=eps)
      self.prelu = nn.PReLU(widths[0])
      cin = widths[0]
      for i, (blocks, width) in enumerate(zip(layers, widths)):
        stage = [IBasicBlock(cin, width, 2)]
        stage += [IBasicBlock(width, width, 1) for _ in range(blocks - 1)]
        setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        cin = width
      self.bn2 = nn.BatchNorm2d(cin, eps=eps)
      self.dropout = nn.Dropout(p=0.0)
      self.fc = nn.Linear(cin * 7 * 7, num_features)
      self.features = nn.BatchNorm1d(num_features, eps=eps)
      self.features.weight.requires_grad = False

    def forward(self, x):
      x = self.prelu(self.bn1(self.conv1(x)))
      for i in range(4):
        x = getattr(self, f"layer{i + 1}")(x)
      x = self.dropout(torch.flatten(self.bn2(x), 1))
      return self.features(self.fc(x))

  return IResNet()


def randomise_torch(module, conv_gain=1.0):
  """Golden-recipe-like random weights for `module`; returns them as numpy.

  Conv N(0, gain/sqrt(fan_in)); linear weight N(0, 1/sqrt(in)), bias
  N(0, 0.1); BN weight N(1, 0.1), bias and mean N(0, 0.1), var 1 + 0.1|N|;
  PReLU N(0.25, 0.05). Seeded by the key, as the golden recipe.
  """
  torch = pytest.importorskip("torch")
  state = {}
  for key, value in module.state_dict().items():
    owner_name, leaf = key.rsplit(".", 1)
    owner = module.get_submodule(owner_name)
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    base = rng.standard_normal(tuple(value.shape)).astype(np.float32)
    if leaf == "num_batches_tracked":
      state[key] = np.zeros((), np.int64)
    elif isinstance(owner, torch.nn.Conv2d):
      state[key] = base * np.float32(conv_gain / np.sqrt(value[0].numel()))
    elif isinstance(owner, torch.nn.Linear) and leaf == "weight":
      state[key] = base / np.float32(np.sqrt(value.shape[1]))
    elif isinstance(owner, torch.nn.PReLU):
      state[key] = np.float32(0.25) + np.float32(0.05) * base
    elif leaf == "weight":
      state[key] = np.float32(1) + np.float32(0.1) * base
    elif leaf == "running_var":
      state[key] = np.float32(1) + np.float32(0.1) * np.abs(base)
    else:
      state[key] = np.float32(0.1) * base
  module.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
  return state


def torch_param_count(module, trainable_only=False):
  return sum(
      p.numel()
      for p in module.parameters()
      if p.requires_grad or not trainable_only
  )


def assert_embedding_parity(out, ref):
  """The acceptance bounds: max|diff| <= 1e-4 max|ref|, cosine >= 0.99999."""
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  assert out.shape == ref.shape and np.all(np.isfinite(out))
  max_diff = np.abs(out - ref).max()
  scale = np.abs(ref).max()
  cos = np.sum(out * ref, 1) / np.linalg.norm(out, axis=1)
  cos /= np.linalg.norm(ref, axis=1)
  assert max_diff <= 1e-4 * scale, (max_diff, scale)
  assert cos.min() >= 0.99999, cos
  return max_diff, max_diff / scale, cos.min()


def embed(module, variables, x):
  return np.asarray(jax.jit(lambda v, x: module.apply(v, x))(variables, x))


@pytest.mark.parametrize("case", ["iresnet18", "iresnet50"])
def test_golden_parity(case):
  state_dict = golden.state_dict(case)
  arrays = golden.load_arrays(case)
  module, variables = face.variables_from_state_dict(case, state_dict)
  out = embed(module, variables, arrays["x_nhwc"])
  diff, rel, cos = assert_embedding_parity(out, arrays["emb"])
  print(f"{case}: max|diff| {diff:.3g} ({rel:.3g} of max|ref|), cos {cos}")


@pytest.mark.parametrize("case", ["iresnet18", "iresnet50"])
def test_golden_keys_shapes_order_and_count(case):
  state_dict = golden.state_dict(case)
  expected = face.expected_state_dict_shapes(case)
  assert list(expected) == list(state_dict)
  assert all(tuple(expected[k]) == v.shape for k, v in state_dict.items())
  count = sum(
      int(np.prod(s))
      for k, s in expected.items()
      if k.rsplit(".", 1)[1] not in _BUFFERS
  )
  assert count == golden.load_manifest(case)["param_count"]


def test_golden_state_dict_round_trip_is_exact():
  state_dict = golden.state_dict("iresnet18")
  _, variables = face.variables_from_state_dict("iresnet18", state_dict)
  back = face.state_dict_from_variables("iresnet18", variables)
  assert list(back) == list(state_dict)
  for key, value in state_dict.items():
    assert back[key].dtype == value.dtype, key
    np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_torch_reference_matches_golden():
  torch = pytest.importorskip("torch")
  net = torch_iresnet(iresnet.STAGE_BLOCKS["iresnet18"]).eval()
  state_dict = golden.state_dict("iresnet18")
  assert list(net.state_dict()) == list(state_dict)
  net.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()})
  with torch.no_grad():
    out = net(torch.from_numpy(golden.load_arrays("iresnet18")["x"])).numpy()
  # Same code up to thread scheduling: float32 rounding only.
  assert_embedding_parity(out, golden.load_arrays("iresnet18")["emb"])


@pytest.mark.parametrize("arch", ["iresnet34", "iresnet100", "iresnet200"])
def test_deep_variants_keys_shapes_and_counts(arch):
  torch = pytest.importorskip("torch")
  with torch.device("meta"):
    net = torch_iresnet(iresnet.STAGE_BLOCKS[arch])
  want = {k: tuple(v.shape) for k, v in net.state_dict().items()}
  got = face.expected_state_dict_shapes(arch)
  assert list(got) == list(want)
  assert {k: tuple(v) for k, v in got.items()} == want
  count = sum(
      int(np.prod(s))
      for k, s in got.items()
      if k.rsplit(".", 1)[1] not in _BUFFERS
  )
  assert count == torch_param_count(net)
  if arch == "iresnet100":
    # insightface's r100: 65,155,648 trainable; features.weight (512) is a
    # parameter frozen at 1.
    assert torch_param_count(net, trainable_only=True) == 65_155_648
    assert count == 65_155_648 + 512


def test_iresnet100_parity_and_round_trip():
  arch = "iresnet100"
  torch = pytest.importorskip("torch")
  widths = (8, 8, 16, 16)
  net = torch_iresnet(iresnet.STAGE_BLOCKS[arch], widths, num_features=32)
  state_dict = randomise_torch(net.eval(), conv_gain=0.75)
  x = golden.load_arrays("iresnet18")["x"][:2]
  with torch.no_grad():
    ref = net(torch.from_numpy(x)).numpy()
  kwargs = dict(widths=widths, embedding_size=32)
  module, variables = face.variables_from_state_dict(arch, state_dict, **kwargs)
  out = embed(module, variables, x.transpose(0, 2, 3, 1))
  diff, rel, cos = assert_embedding_parity(out, ref)
  print(f"{arch} (narrow): max|diff| {diff:.3g} ({rel:.3g} of max), cos {cos}")
  back = face.state_dict_from_variables(arch, variables, **kwargs)
  assert list(back) == list(state_dict)
  _, again = face.variables_from_state_dict(arch, back, **kwargs)
  assert jax.tree.all(jax.tree.map(np.array_equal, again, variables))


def test_old_mxnet_port_without_num_batches_tracked_and_bn_eps():
  state_dict = {
      k: v
      for k, v in golden.state_dict("iresnet18").items()
      if not k.endswith("num_batches_tracked")
  }
  module, variables = face.variables_from_state_dict(
      "iresnet18", state_dict, bn_eps=2e-5
  )
  assert module.bn_eps == 2e-5
  x = golden.load_arrays("iresnet18")["x_nhwc"][:1]
  out = embed(module, variables, x)
  ref = golden.load_arrays("iresnet18")["emb"][:1]
  # A different epsilon moves the output a little, but not far.
  assert 0 < np.abs(out - ref).max() < 1e-2 * np.abs(ref).max()


# A small random teacher as the demo builds one. Equal widths keep the number
# of distinct parameter shapes (hence of compiled random ops) low.
SMALL = dict(widths=(16, 16, 16, 16), embedding_size=64)


@pytest.fixture(scope="module")
def small_teacher():
  """(inputs, variables) of a randomly initialised small IResNet-18."""
  x = jax.random.uniform(jax.random.key(1), (4, 112, 112, 3), minval=-1)
  module = models.create_model("iresnet18", **SMALL)
  return x, module.init(jax.random.key(0), x[:1])


def test_random_init_is_sane_for_a_small_teacher(small_teacher):
  x, variables = small_teacher
  out = embed(models.create_model("iresnet18", **SMALL), variables, x)
  assert out.shape == (4, 64) and out.dtype == np.float32
  assert np.all(np.isfinite(out))
  assert 0.1 < out.std() < 10
  unit = out / np.linalg.norm(out, axis=1, keepdims=True)
  assert (unit @ unit.T)[np.triu_indices(4, 1)].max() < 0.9


def test_train_mode_updates_running_stats_and_bfloat16_trunk(small_teacher):
  x, variables = small_teacher
  module = models.create_model("iresnet18", dtype="bfloat16", **SMALL)
  out, updates = jax.jit(
      lambda v, x: module.apply(
          v,
          x,
          train=True,
          mutable=["batch_stats", "intermediates"],
          capture_intermediates=lambda m, _: m.name == "fc",
      )
  )(variables, x)
  assert out.dtype == jnp.float32 and out.shape == (4, 64)
  # Train mode normalises the embedding with batch statistics (bias 0).
  np.testing.assert_allclose(np.asarray(out).mean(0), 0, atol=1e-4)
  # PyTorch's running-stat update: momentum 0.1, unbiased variance.
  fc_out = np.asarray(updates["intermediates"]["fc"]["__call__"][0])
  stats = updates["batch_stats"]["features"]
  np.testing.assert_allclose(stats["mean"], 0.1 * fc_out.mean(0), rtol=1e-4)
  np.testing.assert_allclose(
      stats["var"], 0.9 + 0.1 * fc_out.var(0, ddof=1), rtol=1e-4
  )
  # The trunk computes in bfloat16, close to float32; parameters stay f32.
  ref = embed(models.create_model("iresnet18", **SMALL), variables, x)
  bf16 = embed(module, variables, x)
  cos = np.sum(ref * bf16, 1) / np.linalg.norm(ref, axis=1)
  assert (cos / np.linalg.norm(bf16, axis=1)).min() > 0.99
  assert not np.array_equal(ref, bf16)
  kernel = variables["params"]["layer1_0"]["conv1"]["kernel"]
  assert kernel.dtype == jnp.float32


@pytest.mark.parametrize("shape", [(4, 5, 7, 3), (6, 8), (2, 1, 1, 4)])
def test_batch_norm_gradient_equals_autodiff(shape):
  """The written-out train-mode gradient against autodiff of the formula."""

  def reference(x, scale, bias):
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axis=axes)
    var = jnp.mean(jnp.square(x - mean), axis=axes)
    return (x - mean) / jnp.sqrt(var + 1e-5) * scale + bias

  rng = np.random.default_rng(len(shape))
  x = jnp.asarray(rng.normal(2.0, 3.0, shape), jnp.float32)
  scale = jnp.asarray(rng.normal(1.0, 0.5, shape[-1:]), jnp.float32)
  bias = jnp.asarray(rng.normal(size=shape[-1:]), jnp.float32)
  dy = jnp.asarray(rng.normal(size=shape), jnp.float32)
  got_y, got_vjp = jax.vjp(
      lambda *a: layers.normalize_batch(*a, 1e-5), x, scale, bias
  )
  want_y, want_vjp = jax.vjp(reference, x, scale, bias)
  np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-5)
  for got, want in zip(got_vjp(dy), want_vjp(dy)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_create_rejects_bad_arguments():
  with pytest.raises(ValueError, match="iresnet99"):
    iresnet.create("iresnet99")
  with pytest.raises(ValueError, match="dtype"):
    iresnet.create("iresnet18", dtype="int8")
  with pytest.raises(ValueError, match="colour"):
    iresnet.create("iresnet18", colour=3)
