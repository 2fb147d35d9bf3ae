"""TinyFaR students: timm layout, parameter counts, golden parity, name map."""

import flax.linen as nn
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from synthdistill_jax import models
from synthdistill_jax.convert import tinynet as convert_tinynet
from synthdistill_jax.models import layers
from synthdistill_jax.models import tinynet
from tests import golden

# timm 0.6.13 `tinynet_x` (num_classes=0) + Linear(1280, 512).
PARAM_COUNTS = {
    "tinyfar_a": 5_562_844,
    "tinyfar_b": 3_105_434,
    "tinyfar_c": 1_832_106,
}
FC_PARAMS = 1280 * 512 + 512


def _nhwc(x):
  return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


@pytest.mark.parametrize("arch", tinynet.ARCHS)
def test_param_count_equals_timm(arch):
  assert tinynet.count_arch_params(arch) == PARAM_COUNTS[arch]


def test_rounding_rules_match_timm():
  # make_divisible never rounds down by more than 10 %.
  assert tinynet.make_divisible(16 * 0.54) == 8
  assert tinynet.make_divisible(40 * 0.54) == 24
  assert tinynet.make_divisible(11.0) == 16  # 8 would lose 27 %.
  # Stage depth uses Python's round (half to even), at least one block.
  assert [tinynet.scale_depth(r, 0.85) for r in (1, 2, 3, 4)] == [1, 2, 3, 3]
  assert tinynet.scale_depth(3, 1.2) == 4
  assert tinynet.scale_depth(1, 0.4) == 1


@pytest.mark.parametrize("case", ["tinyfar_a", "tinyfar_c"])
def test_layout_equals_golden_manifest(case):
  """Keys, order and shapes of every state_dict entry, SE widths included."""
  rows = golden.load_manifest(case)["tensors"]
  expected = convert_tinynet.expected_shapes(case)
  assert list(expected) == [row["name"] for row in rows]
  assert [expected[row["name"]] for row in rows] == [
      tuple(row["shape"]) for row in rows
  ]


@pytest.mark.parametrize("case", ["tinyfar_a", "tinyfar_c"])
def test_golden_parity_float32(case):
  module, variables = convert_tinynet.variables_from_state_dict(
      case, golden.state_dict(case)
  )
  arrays = golden.load_arrays(case)
  out = np.asarray(jax.jit(module.apply)(variables, _nhwc(arrays["x"])))
  ref = arrays["out"]
  assert out.dtype == np.float32 and out.shape == ref.shape
  assert np.max(np.abs(out - ref)) <= 1e-4 * np.max(np.abs(ref))
  cos = np.sum(out * ref, 1) / np.linalg.norm(out, axis=1)
  cos /= np.linalg.norm(ref, axis=1)
  assert np.min(cos) >= 0.99999


@pytest.mark.parametrize("case", ["tinyfar_a", "tinyfar_c"])
def test_state_dict_round_trip_is_exact(case):
  state_dict = golden.state_dict(case)
  _, variables = convert_tinynet.variables_from_state_dict(case, state_dict)
  back = convert_tinynet.state_dict_from_variables(case, variables)
  assert list(back) == list(state_dict)
  for key, value in state_dict.items():
    assert back[key].dtype == value.dtype, key
    np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_variables_have_the_flax_layout():
  _, variables = convert_tinynet.variables_from_state_dict(
      "tinyfar_c", golden.state_dict("tinyfar_c")
  )
  module = tinynet.create("tinyfar_c")
  shapes = jax.eval_shape(
      module.init, jax.random.key(0), jnp.zeros((1, 112, 112, 3))
  )
  got = jax.tree.map(lambda a: (a.shape, a.dtype), variables)
  want = jax.tree.map(lambda a: (a.shape, a.dtype), shapes)
  assert got == want
  stem = golden.state_dict("tinyfar_c")["cnn.conv_stem.weight"]
  np.testing.assert_array_equal(
      variables["params"]["conv_stem"]["kernel"], stem.transpose(2, 3, 1, 0)
  )


def _timm_imagenet_state_dict(case):
  """The golden backbone laid out as timm's ImageNet `tinynet_x` file."""
  sd = golden.state_dict(case)
  timm_sd = {k[len("cnn.") :]: v for k, v in sd.items() if k.startswith("cnn.")}
  rng = np.random.default_rng(0)
  timm_sd["classifier.weight"] = rng.standard_normal((1000, 1280), np.float32)
  timm_sd["classifier.bias"] = np.zeros((1000,), np.float32)
  return sd, timm_sd


def test_timm_imagenet_checkpoint_gets_a_fresh_head():
  sd, timm_sd = _timm_imagenet_state_dict("tinyfar_c")
  assert convert_tinynet.detect_format(timm_sd) == convert_tinynet.TIMM
  _, v0 = convert_tinynet.variables_from_state_dict("tinyfar_c", timm_sd)
  _, v0b = convert_tinynet.variables_from_state_dict("tinyfar_c", timm_sd)
  _, v1 = convert_tinynet.variables_from_state_dict(
      "tinyfar_c", timm_sd, seed=1
  )
  back = convert_tinynet.state_dict_from_variables("tinyfar_c", v0)
  for key in sd:
    if key.startswith("cnn."):
      np.testing.assert_array_equal(back[key], sd[key], err_msg=key)
  fc0, fc1 = v0["params"]["fc"], v1["params"]["fc"]
  assert fc0["kernel"].shape == (1280, 512) and fc0["bias"].shape == (512,)
  np.testing.assert_array_equal(fc0["kernel"], v0b["params"]["fc"]["kernel"])
  assert not np.array_equal(fc0["kernel"], fc1["kernel"])
  # torch.nn.Linear's init: U(-1/sqrt(1280), 1/sqrt(1280)).
  bound = 1 / np.sqrt(1280)
  assert np.max(np.abs(fc0["kernel"])) <= bound
  assert np.std(fc0["kernel"]) == pytest.approx(bound / np.sqrt(3), rel=0.02)


def test_dataparallel_prefix_and_missing_counters_are_accepted():
  sd = golden.state_dict("tinyfar_c")
  wrapped = {
      f"module.{k}": v
      for k, v in sd.items()
      if not k.endswith("num_batches_tracked")
  }
  _, variables = convert_tinynet.variables_from_state_dict("tinyfar_c", wrapped)
  back = convert_tinynet.state_dict_from_variables("tinyfar_c", variables)
  np.testing.assert_array_equal(back["fc.weight"], sd["fc.weight"])


@pytest.mark.parametrize(
    "edit,words",
    [
        (lambda sd: sd.pop("cnn.blocks.2.1.se.conv_reduce.bias"), "missing"),
        (
            lambda sd: sd.__setitem__("cnn.extra.weight", np.zeros(3)),
            "unexpected",
        ),
        (
            lambda sd: sd.__setitem__("fc.weight", np.zeros((128, 1280))),
            "misshapen",
        ),
    ],
)
def test_bad_state_dicts_fail_in_one_line(edit, words):
  sd = golden.state_dict("tinyfar_c")
  edit(sd)
  with pytest.raises(ValueError) as info:
    convert_tinynet.variables_from_state_dict(
        "tinyfar_c", sd, source="student.pt"
    )
  message = str(info.value)
  assert "\n" not in message
  assert message.startswith("student.pt") and words in message


def test_wrong_architecture_is_reported():
  with pytest.raises(ValueError, match="student.pt.*misshapen"):
    convert_tinynet.variables_from_state_dict(
        "tinyfar_a", golden.state_dict("tinyfar_c"), source="student.pt"
    )
  with pytest.raises(ValueError, match="x.pt: neither"):
    convert_tinynet.variables_from_state_dict(
        "tinyfar_c", {"weight": np.zeros(3)}, source="x.pt"
    )


def test_torch_tensors_are_accepted():
  pytest.importorskip("torch")
  case = "tinyfar_c"
  _, ours = convert_tinynet.variables_from_state_dict(
      case, golden.torch_state_dict(case)
  )
  _, ref = convert_tinynet.variables_from_state_dict(
      case, golden.state_dict(case)
  )
  jax.tree.map(np.testing.assert_array_equal, ours, ref)


def test_load_face_model_reads_a_student_file(tmp_path):
  torch = pytest.importorskip("torch")
  from synthdistill_jax import convert  # pylint: disable=g-import-not-at-top

  state_dict = golden.torch_state_dict("tinyfar_c")
  path = tmp_path / "light_model_20.pt"
  torch.save(state_dict, path)
  _, variables = convert.load_face_model(path, "tinyfar_c")
  back = convert_tinynet.state_dict_from_variables("tinyfar_c", variables)
  for key, value in state_dict.items():
    np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)
  del state_dict["fc.bias"]
  torch.save(state_dict, path)
  with pytest.raises(ValueError, match=f"{path}.*missing.*fc.bias"):
    convert.load_face_model(path, "tinyfar_c")


def test_registry_builds_and_saves_students(tmp_path):
  module = models.create_model("tinyfar_b", embedding_size=128)
  assert module.embedding_size == 128 and module.width_multiplier == 0.75
  with pytest.raises(ValueError, match="dtype"):
    tinynet.create("tinyfar_c", dtype="float16")
  _, variables = convert_tinynet.variables_from_state_dict(
      "tinyfar_c", golden.state_dict("tinyfar_c")
  )
  models.save(tmp_path / "m", "tinyfar_c", {"dtype": "float32"}, variables)
  loaded_module, loaded = models.load(tmp_path / "m")
  assert isinstance(loaded_module, tinynet.TinyFaR)
  jax.tree.map(np.testing.assert_array_equal, loaded, variables)


def _random_variables(module, x):
  """Well-scaled random variables from shapes alone (no RNG compile)."""
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name = path[-1].key
    if name in ("kernel",):
      fan_in = int(np.prod(leaf.shape[:-1]))
      return rng.standard_normal(leaf.shape).astype(np.float32) / np.sqrt(
          fan_in
      )
    if name in ("scale", "var"):
      return (1 + 0.1 * np.abs(rng.standard_normal(leaf.shape))).astype(
          np.float32
      )
    return (0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)

  shapes = jax.eval_shape(module.init, jax.random.key(0), x)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def test_bfloat16_compute_keeps_float32_params_and_output():
  module = tinynet.create("tinyfar_c", dtype="bfloat16")
  x = jax.ShapeDtypeStruct((2, 112, 112, 3), jnp.float32)
  variables = jax.eval_shape(module.init, jax.random.key(0), x)
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(variables))
  out = jax.eval_shape(module.apply, variables, x)
  assert out.dtype == jnp.float32 and out.shape == (2, 512)
  out, updates = jax.eval_shape(
      lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"]),
      variables,
      x,
  )
  assert out.dtype == jnp.float32
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(updates))


def test_bfloat16_block_is_close_to_float32():
  # One stride-2 inverted residual with SE: compiling a whole network in
  # bfloat16 on CPU takes far longer and exercises the same layers.
  spec = tinynet.build_block_specs(0.54, 0.85)[2][0]
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, spec.in_chs))
  f32 = tinynet.Block(spec)
  bf16 = tinynet.Block(spec, dtype=jnp.bfloat16)
  variables = _random_variables(f32, x)
  ref = jax.jit(f32.apply)(variables, x)
  out = jax.jit(bf16.apply)(variables, x)
  assert out.dtype == jnp.bfloat16
  out, ref = np.asarray(out, np.float32).ravel(), np.asarray(ref).ravel()
  # bfloat16 keeps 8 bits of mantissa: close, not parity.
  assert out @ ref / np.linalg.norm(out) / np.linalg.norm(ref) > 0.999


@pytest.mark.parametrize(
    "kernel,stride,size",
    [
        (3, 1, 7),
        (5, 1, 8),
        (5, 2, 9),
        (5, 2, 8),
        (3, 2, 8),
        (3, 2, 2),
        (3, 1, 16),
        (3, 1, 11),
        (5, 2, 18),
    ],
)
def test_depthwise_slices_equal_the_grouped_conv(kernel, stride, size):
  """Forward and gradients of both `conv_dw` methods agree.

  The slices' gradient is the hand-written VJP (`_depthwise_bwd`): odd and
  even sizes cover the high pads of the dilated `dy` at stride 2; output
  heights 16, 11 and 9 cover the kernel gradient's row groups (2 of 8, 11
  of 1, 3 of 3 rows).
  """
  x = jax.random.normal(jax.random.key(0), (2, size, size + 1, 6))
  variables = tinynet.DepthwiseConv(6, kernel, stride).init(
      jax.random.key(1), x
  )
  # The output has the same shape as timm's conv with k // 2 padding.
  out_size = (size + 2 * (kernel // 2) - kernel) // stride + 1

  def run(method):
    module = tinynet.DepthwiseConv(6, kernel, stride, method=method)

    def loss(v, x):
      y = module.apply(v, x)
      return jnp.sum(jnp.sin(y)), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(
        variables, x
    )
    return y, grads

  y, grads = run("slices")
  y_ref, grads_ref = run("conv")
  assert y.shape[1] == out_size and y.shape == y_ref.shape
  np.testing.assert_allclose(y, y_ref, atol=1e-5)
  for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5)


def test_depthwise_backward_reads_dy_once_and_flips_no_kernel():
  """The shape of the hand-written VJP that keeps XLA:CPU's kernels few.

  Every array computed outside the kernel gradient's loop and read inside
  it is a loop input that XLA:CPU copies with a kernel of its own, and so
  is a reversed kernel: the loop takes `dy` as one input (not one per row
  of its 8-row groups here), and the flipped taps are read in reverse.
  """
  x = jnp.ones((2, 16, 16, 4))
  kernel = jnp.ones((3, 3, 1, 4))
  jaxpr = jax.make_jaxpr(
      jax.grad(
          lambda x, k: jnp.sum(tinynet.depthwise_by_slices(x, k, 1)), (0, 1)
      )
  )(x, kernel)

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      yield eqn
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        yield from walk(sub)

  eqns = list(walk(jaxpr.jaxpr))
  assert not [e for e in eqns if e.primitive.name == "rev"]
  (loop,) = [e for e in eqns if e.primitive.name in ("scan", "while")]
  shapes = [v.aval.shape for v in loop.invars]
  # `dy` as one `[batch, groups, rows, width, C]` input, no row of it alone.
  assert (2, 2, 8, 16, 4) in shapes and (2, 2, 16, 4) not in shapes, shapes


def _count_convolutions(lowered) -> int:
  return lowered.as_text().count("stablehlo.convolution")


def test_depthwise_method_is_part_of_the_jitted_program(tmp_path):
  """The switch reaches every block and is never stale under `jax.jit`.

  One jitted function with the module as a static argument: each method is
  its own trace (a module-level switch would be baked into the first one).
  """
  # One block per stage and a small input: every path, a short compile.
  kwargs = dict(depth_multiplier=0.3, embedding_size=8)
  modules = {
      m: models.create_model("tinyfar_c", depthwise_method=m, **kwargs)
      for m in tinynet.DEPTHWISE_METHODS
  }
  blocks = sum(len(s) for s in modules["slices"].block_specs())
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  variables = jax.tree.map(
      lambda a: np.asarray(a, np.float32),
      _random_variables(modules["slices"], x),
  )
  apply = jax.jit(lambda m, v, x: m.apply(v, x), static_argnums=0)
  lowered = {m: apply.lower(mod, variables, x) for m, mod in modules.items()}
  # 'conv' runs every `conv_dw` as a grouped convolution, 'slices' none.
  assert _count_convolutions(lowered["conv"]) == (
      _count_convolutions(lowered["slices"]) + blocks
  )
  out = {m: apply(mod, variables, x) for m, mod in modules.items()}
  np.testing.assert_allclose(out["slices"], out["conv"], atol=1e-5)
  # The method is a model.json kwarg like any other, checked when built.
  saved = dict(kwargs, depthwise_method="conv")
  models.save(tmp_path / "m", "tinyfar_c", saved, variables)
  loaded, _ = models.load(tmp_path / "m")
  assert loaded == modules["conv"]
  with pytest.raises(ValueError, match="depthwise_method must be one of"):
    tinynet.create("tinyfar_c", depthwise_method="grouped")
  with pytest.raises(ValueError, match="depthwise_method must be one of"):
    tinynet.DepthwiseConv(3, 3, method="grouped").init(jax.random.key(0), x)


@pytest.mark.parametrize(
    "kernel,stride,padding,groups,matmul",
    [
        (1, 1, 0, 1, True),
        (1, 2, 0, 1, False),
        (3, 1, 1, 1, False),
        (1, 1, 0, 2, False),
        (1, 1, 1, 1, False),
    ],
)
def test_pointwise_convs_run_as_matmuls(
    kernel, stride, padding, groups, matmul
):
  """`layers.conv` runs 1x1 stride-1 convs as a matmul, others as convs.

  Same outputs and gradients as `lax.conv_general_dilated` either way.
  """
  x = jax.random.normal(jax.random.key(0), (2, 5, 6, 4))
  conv = layers.conv(
      6, kernel, stride=stride, padding=padding, groups=groups, use_bias=True
  )
  ref = nn.Conv(
      6,
      (kernel, kernel),
      strides=stride,
      padding=padding,
      feature_group_count=groups,
  )
  variables = conv.init(jax.random.key(1), x)

  def loss(module, v, x):
    y = module.apply(v, x)
    return jnp.sum(jnp.sin(y)), y

  grad = jax.jit(
      jax.value_and_grad(loss, (1, 2), has_aux=True), static_argnums=0
  )
  (_, y), grads = grad(conv, variables, x)
  (_, y_ref), grads_ref = grad(ref, variables, x)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5)
  text = jax.jit(conv.apply).lower(variables, x).as_text()
  assert ("stablehlo.convolution" not in text) == matmul


@pytest.mark.parametrize(
    "shape,blocks",
    [
        ((2, 32, 32, 8), 4),  # 2048 pixels: four blocks of 512
        ((3, 28, 28, 5), 6),  # 2352 = 6 x 392
        ((1, 23, 23, 4), 1),  # 529 = 23^2: blocks of 23 are too small
        ((2, 8, 8, 4), 1),  # 128 pixels: one block
    ],
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_blocked_pointwise_gradient_equals_autodiff(shape, blocks, dtype):
  """'blocked' 1x1 convs: same output and gradients as 'matmul'.

  The weight gradient is a dot batched over `blocks` pixel blocks.
  """
  x = jax.random.normal(jax.random.key(0), shape).astype(dtype)
  w = jax.random.normal(jax.random.key(1), (1, 1, shape[-1], 7)).astype(dtype)
  args = ((1, 1), ((0, 0), (0, 0)))
  dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, layers._NHWC)

  def loss(method, x, w):
    y = layers.conv_or_matmul(
        x, w, *args, dimension_numbers=dn, pointwise_grad=method
    )
    return jnp.sum(jnp.sin(y.astype(jnp.float32))), y

  grad = jax.jit(
      jax.value_and_grad(loss, (1, 2), has_aux=True), static_argnums=0
  )
  (_, y), grads = grad("blocked", x, w)
  (_, y_ref), grads_ref = grad("matmul", x, w)
  tol = 1e-5 if dtype == jnp.float32 else 3e-2
  assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
  np.testing.assert_array_equal(y, y_ref)
  for g, g_ref in zip(grads, grads_ref):
    np.testing.assert_allclose(
        np.asarray(g, np.float32),
        np.asarray(g_ref, np.float32),
        rtol=tol,
        atol=tol * float(jnp.max(jnp.abs(g_ref.astype(jnp.float32)))),
    )
  text = (
      jax.jit(jax.grad(lambda w: loss("blocked", x, w)[0])).lower(w).as_text()
  )
  rows = shape[0] * shape[1] * shape[2]
  assert f"tensor<{blocks}x{rows // blocks}x{shape[3]}x" in text


def test_pointwise_grad_reaches_every_pointwise_conv():
  """TinyFaR's 'blocked' and 'matmul' give the same parameter gradients."""
  kwargs = dict(embedding_size=16)
  modules = {
      m: models.create_model("tinyfar_c", pointwise_grad=m, **kwargs)
      for m in layers.POINTWISE_GRADS
  }
  x = jax.random.normal(jax.random.key(0), (4, 64, 64, 3))
  variables = jax.tree.map(
      lambda a: np.asarray(a, np.float32),
      _random_variables(modules["matmul"], x),
  )

  def loss(module, params, x):
    y, _ = module.apply(
        {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
    )
    return jnp.sum(jnp.sin(y))

  grad = jax.jit(jax.grad(loss, 1), static_argnums=0)
  grads = {m: grad(mod, variables["params"], x) for m, mod in modules.items()}
  flat = jax.tree_util.tree_leaves_with_path(grads["blocked"])
  for (path, g), g_ref in zip(flat, jax.tree.leaves(grads["matmul"])):
    np.testing.assert_allclose(
        g, g_ref, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path)
    )
  # 64x64 faces: the 32x32 stage's pointwise convs have 4096 pixels, so
  # their weight gradients are dots over 8 blocks; 'matmul' has none.
  text = {
      m: jax.jit(jax.grad(loss, 1), static_argnums=0)
      .lower(mod, variables["params"], x)
      .as_text()
      for m, mod in modules.items()
  }
  assert "batching_dims = [0] x [0]" in text["blocked"]
  assert "batching_dims = [0] x [0]" not in text["matmul"]
  with pytest.raises(ValueError, match="pointwise_grad must be one of"):
    tinynet.create("tinyfar_c", pointwise_grad="fast")
