"""StyleGAN2 generator: golden parity, noise modes, init, ops, full-size shapes."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synthdistill_jax.convert import stylegan2 as convert_sg2
from synthdistill_jax.models import stylegan2
from synthdistill_jax.ops import upfirdn2d
from tests import golden

CASES = ("stylegan2_sg3_small", "stylegan2_ada_small")


@functools.lru_cache(maxsize=None)
def _golden_generator(case):
  """The golden case's module and variables, with jitted mapping/synthesis."""
  kwargs = convert_sg2._normalise_config(  # pylint: disable=protected-access
      golden.load_manifest(case)["config"]["G_init_kwargs"]
  )
  module = stylegan2.create("stylegan2", **kwargs)
  variables = convert_sg2.state_dict_to_variables(
      golden.state_dict(case), module
  )
  mapping = jax.jit(
      lambda v, z, c, psi: module.apply(
          v, z, c, truncation_psi=psi, method="mapping"
      )
  )
  synthesis = jax.jit(
      lambda v, ws, mode, fused: module.apply(
          v, ws, noise_mode=mode, fused_modconv=fused, method="synthesis"
      ),
      static_argnums=(2, 3),
  )
  return module, variables, mapping, synthesis


def _max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - b)))


@pytest.mark.parametrize("case", CASES)
def test_golden_mapping(case):
  _, variables, mapping, _ = _golden_generator(case)
  arrays = golden.load_arrays(case)
  c = arrays.get("c")
  for psi, key in ((1.0, "ws_psi1"), (0.7, "ws_psi07")):
    ws = mapping(variables, arrays["z"], c, psi)
    assert ws.shape == arrays[key].shape and ws.dtype == jnp.float32
    assert _max_diff(ws, arrays[key]) <= 1e-5, key


@pytest.mark.parametrize("case", CASES)
def test_golden_images(case):
  _, variables, _, synthesis = _golden_generator(case)
  arrays = golden.load_arrays(case)
  runs = (
      ("img_const", "ws_psi1", "const", False),
      ("img_none", "ws_psi1", "none", False),
      ("img_mixed_const", "ws_mixed", "const", False),
      ("img_psi07_const", "ws_psi07", "const", False),
      ("img_const_unfused", "ws_psi1", "const", False),
      ("img_const", "ws_psi1", "const", True),  # grouped-conv formulation
  )
  for out, ws, mode, fused in runs:
    img = synthesis(variables, arrays[ws], mode, fused)
    ref = arrays[out].transpose(0, 2, 3, 1)  # NCHW -> NHWC
    assert img.shape == ref.shape and img.dtype == jnp.float32
    np.testing.assert_allclose(img, ref, rtol=1e-4, atol=1e-4, err_msg=out)
    assert _max_diff(img, ref) <= 1e-3


def test_truncation_cutoff_only_touches_first_rows():
  module, variables, _, _ = _golden_generator(CASES[0])
  z = golden.load_arrays(CASES[0])["z"]
  full = module.apply(variables, z, method="mapping")
  cut = module.apply(
      variables, z, truncation_psi=0.5, truncation_cutoff=3, method="mapping"
  )
  w_avg = variables["buffers"]["mapping"]["w_avg"]
  np.testing.assert_array_equal(cut[:, 3:], full[:, 3:])
  np.testing.assert_allclose(
      cut[:, :3], w_avg + 0.5 * (full[:, :3] - w_avg), rtol=1e-6, atol=1e-6
  )


def _noise_probe_layer():
  """A SynthesisLayer whose output is only its noise (weights zero)."""
  layer = stylegan2.SynthesisLayer(out_channels=4, resolution=16)
  x = jnp.ones((3, 16, 16, 2))
  w = jnp.ones((3, 8))
  variables = layer.init(jax.random.key(0), x, w, noise_mode="none")
  params = jax.tree.map(jnp.zeros_like, variables["params"])
  params["noise_strength"] = jnp.asarray(0.5)
  return layer, {"params": params, "buffers": variables["buffers"]}, x, w


def _recover_noise(y):
  # Output = lrelu(noise) * sqrt(2): invert the activation.
  y = np.asarray(y) / np.sqrt(2)
  return np.where(y >= 0, y, y / 0.2)


def test_random_noise_statistics():
  layer, variables, x, w = _noise_probe_layer()
  run = jax.jit(
      lambda key: layer.apply(
          variables, x, w, noise_mode="random", rngs={"noise": key}
      )
  )
  n1 = _recover_noise(run(jax.random.key(1)))
  n2 = _recover_noise(run(jax.random.key(2)))
  # One noise image per sample, shared by all channels, scaled by strength.
  np.testing.assert_allclose(n1, np.repeat(n1[..., :1], 4, -1), atol=1e-6)
  assert abs(n1.mean()) < 0.1 and abs(n1.std() / 0.5 - 1) < 0.1
  assert np.abs(n1[0] - n1[1]).mean() > 0.3  # fresh per sample
  assert np.abs(n1 - n2).mean() > 0.3  # fresh per key
  np.testing.assert_array_equal(n1, _recover_noise(run(jax.random.key(1))))
  # Neighbouring pixels are independent.
  img = n1[..., 0].reshape(3, -1)
  corr = np.corrcoef(img[:, :-1].ravel(), img[:, 1:].ravel())[0, 1]
  assert abs(corr) < 0.15
  const = layer.apply(variables, x, w, noise_mode="const")
  expected = 0.5 * np.asarray(variables["buffers"]["noise_const"])
  np.testing.assert_allclose(
      _recover_noise(const)[..., 0],
      np.broadcast_to(expected, (3, 16, 16)),
      atol=1e-6,
  )
  assert np.all(
      np.asarray(layer.apply(variables, x, w, noise_mode="none")) == 0
  )


def test_random_noise_needs_a_key():
  module, variables, _, _ = _golden_generator(CASES[0])
  ws = golden.load_arrays(CASES[0])["ws_psi1"]
  with pytest.raises(ValueError, match="rngs"):
    module.apply(variables, ws, noise_mode="random", method="synthesis")


def test_official_random_init_makes_useful_images():
  module = stylegan2.create(
      "stylegan2",
      z_dim=128,
      w_dim=128,
      img_resolution=32,
      channel_base=1024,
      channel_max=64,
      mapping_layers=2,
  )
  variables = stylegan2.init_variables(module, jax.random.key(0))
  params, buffers = variables["params"], variables["buffers"]
  assert module.num_ws == 8
  assert abs(np.std(params["mapping"]["fc0"]["weight"]) / 100 - 1) < 0.05
  conv = params["synthesis"]["b32"]["conv1"]
  assert abs(np.std(conv["weight"]) - 1) < 0.05
  np.testing.assert_array_equal(conv["affine"]["bias"], 1.0)
  assert float(conv["noise_strength"]) == 0 and not np.any(conv["bias"])
  np.testing.assert_array_equal(buffers["mapping"]["w_avg"], 0)
  noise = buffers["synthesis"]["b32"]["conv1"]["noise_const"]
  assert noise.shape == (32, 32) and abs(np.std(noise) - 1) < 0.1
  z = jax.random.normal(jax.random.key(1), (4, 128))
  img = jax.jit(lambda v, z, k: module.apply(v, z, rngs={"noise": k}))(
      variables, z, jax.random.key(2)
  )
  img = np.asarray(img)
  assert img.shape == (4, 32, 32, 3) and np.all(np.isfinite(img))
  assert 0.05 < img.std() < 100
  assert np.abs(img[0] - img[1]).mean() > 0.1 * img.std()


def _count_official_params(z, w, res, base, cmax, layers, img_ch=3):
  """Parameter count of NVIDIA's Generator, from its layer definitions."""
  mapping = sum((z if i == 0 else w) * w + w for i in range(layers))
  layout = stylegan2.block_layout(res, base, cmax, 0)
  total = mapping
  for r, cin, cout, _ in layout:
    conv = lambda i, o: (w * i + i) + o * i * 9 + o + 1  # affine, w, b, noise
    total += cout * 16 if cin == 0 else conv(cin, cout)
    total += conv(cout, cout)
    total += (w * cout + cout) + img_ch * cout + img_ch  # ToRGB
  return total


@pytest.mark.parametrize(
    "res,base,official",
    [(256, 16384, 24_767_458), (1024, 32768, 30_370_060)],
)
def test_full_size_shapes(res, base, official):
  # Counts measured on NVIDIA's own modules: stylegan2-ffhq-256x256 config
  # (stylegan3 code) and the 1024 paper config (stylegan2-ada-pytorch).
  assert _count_official_params(512, 512, res, base, 512, 8) == official
  module = stylegan2.create("stylegan2", img_resolution=res, channel_base=base)
  tree = jax.eval_shape(
      lambda k: stylegan2.init_variables(module, k), jax.random.key(0)
  )
  count = sum(np.prod(x.shape) for x in jax.tree.leaves(tree["params"]))
  assert count == official
  assert module.num_ws == {256: 14, 1024: 18}[res]
  out = jax.eval_shape(
      lambda v, z: module.apply(v, z, noise_mode="const"),
      tree,
      jax.ShapeDtypeStruct((2, 512), jnp.float32),
  )
  assert out.shape == (2, res, res, 3) and out.dtype == jnp.float32


def _upfirdn2d_reference(x, f, up, down, pad, gain):
  """Direct numpy statement of the op (NHWC, one loop per output pixel)."""
  b, h, w, c = x.shape
  u = np.zeros((b, h * up, w * up, c), x.dtype)
  u[:, ::up, ::up] = x
  px0, px1, py0, py1 = pad
  u = np.pad(
      u,
      [(0, 0), (max(py0, 0), max(py1, 0)), (max(px0, 0), max(px1, 0)), (0, 0)],
  )
  u = u[
      :,
      max(-py0, 0) : u.shape[1] - max(-py1, 0),
      max(-px0, 0) : u.shape[2] - max(-px1, 0),
  ]
  f = np.asarray(f, np.float64) * gain
  k = f[::-1, ::-1]  # true convolution
  fh, fw = k.shape
  out = np.zeros((b, u.shape[1] - fh + 1, u.shape[2] - fw + 1, c))
  for i, j in itertools.product(range(out.shape[1]), range(out.shape[2])):
    out[:, i, j] = np.einsum("bhwc,hw->bc", u[:, i : i + fh, j : j + fw], k)
  return out[:, ::down, ::down]


@pytest.mark.parametrize(
    "up,down,pad",
    [
        (1, 1, (1, 2, 0, 1)),
        (2, 1, (2, 1, 2, 1)),
        (1, 2, (1, 1, 1, 1)),
        (2, 2, (-1, 2, 3, -2)),
        (3, 1, (0, 0, 1, 1)),
    ],
)
def test_upfirdn2d_matches_direct_definition(up, down, pad):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 7, 6, 3)).astype(np.float32)
  f2d = upfirdn2d.setup_filter([1, 3, 3, 1])
  asym = rng.standard_normal((3, 4)).astype(np.float32)
  ref = _upfirdn2d_reference(x, f2d, up, down, pad, up * up)
  for f in (f2d, upfirdn2d.setup_filter(separable=True)):
    got = upfirdn2d.upfirdn2d(x, f, up=up, down=down, padding=pad, gain=up * up)
    np.testing.assert_allclose(got, ref, atol=1e-5)
  got = upfirdn2d.upfirdn2d(x, asym, up=up, down=down, padding=pad)
  np.testing.assert_allclose(
      got, _upfirdn2d_reference(x, asym, up, down, pad, 1.0), atol=1e-5
  )


def _small_generator(**kwargs):
  return stylegan2.create(
      "stylegan2",
      z_dim=32,
      w_dim=32,
      img_resolution=16,
      channel_base=256,
      channel_max=32,
      mapping_layers=2,
      **kwargs,
  )


def _with_noise(variables, key):
  """Official-init variables with nonzero biases and noise strengths."""
  leaves, tree = jax.tree.flatten(variables["params"])
  keys = jax.random.split(key, len(leaves))
  leaves = [
      l + 0.1 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)
  ]
  return {
      "params": jax.tree.unflatten(tree, leaves),
      "buffers": variables["buffers"],
  }


def test_reduced_precision_blocks_stay_close():
  ref_module = _small_generator(num_fp16_res=2)
  variables = _with_noise(
      stylegan2.init_variables(ref_module, jax.random.key(0)), jax.random.key(1)
  )
  z = jax.random.normal(jax.random.key(3), (2, 32))
  ref = ref_module.apply(variables, z, noise_mode="const")
  for dtype in ("bfloat16", "float16"):
    module = _small_generator(num_fp16_res=2, fp16_dtype=dtype)
    img = jax.jit(lambda v, z: module.apply(v, z, noise_mode="const"))(
        variables, z
    )
    assert img.dtype == jnp.float32 and np.all(np.isfinite(img))
    err = np.abs(np.asarray(img) - np.asarray(ref)).max() / np.std(ref)
    assert err < (0.1 if dtype == "bfloat16" else 0.02), dtype


@pytest.mark.parametrize("architecture", ["orig", "resnet"])
def test_other_architectures(architecture):
  module = _small_generator(architecture=architecture)
  variables = stylegan2.init_variables(module, jax.random.key(0))
  blocks = variables["params"]["synthesis"]
  assert ("torgb" in blocks["b8"]) == (architecture == "skip")
  assert ("skip" in blocks["b8"]) == (architecture == "resnet")
  assert "torgb" in blocks["b16"] and "skip" not in blocks["b4"]
  z = jax.random.normal(jax.random.key(3), (2, 32))
  fused, batched = (
      module.apply(variables, z, noise_mode="const", fused_modconv=f)
      for f in (True, False)
  )
  assert fused.shape == (2, 16, 16, 3) and np.all(np.isfinite(fused))
  np.testing.assert_allclose(fused, batched, rtol=1e-4, atol=1e-4)


def test_jit_any_batch_without_host_transfers():
  module = _small_generator()
  variables = jax.device_put(
      stylegan2.init_variables(module, jax.random.key(0))
  )

  @jax.jit
  def generate(v, key):
    kz, kn = jax.random.split(key)
    z = jax.random.normal(kz, (3, 32))
    ws = module.apply(v, z, None, truncation_psi=0.7, method="mapping")
    return module.apply(v, ws, rngs={"noise": kn}, method="synthesis")

  key = jax.device_put(jax.random.key(5))
  generate(variables, key)  # compile
  with jax.transfer_guard("disallow"):
    img = generate(variables, key)
  assert img.shape == (3, 16, 16, 3)
  one = jax.jit(lambda v, z: module.apply(v, z, noise_mode="none"))(
      variables, jnp.zeros((1, 32))
  )
  assert one.shape == (1, 16, 16, 3)


def test_load_refuses_other_architectures(tmp_path):
  module = _small_generator()
  variables = stylegan2.init_variables(module, jax.random.key(0))
  kwargs = dict(
      z_dim=32,
      w_dim=32,
      img_resolution=16,
      channel_base=256,
      channel_max=32,
      mapping_layers=2,
  )
  from synthdistill_jax import models  # pylint: disable=g-import-not-at-top

  models.save(tmp_path / "g", "stylegan2", kwargs, variables)
  loaded, restored = stylegan2.load(tmp_path / "g")
  assert loaded == module
  config = (tmp_path / "g" / "model.json").read_text()
  (tmp_path / "g" / "model.json").write_text(
      config.replace('"stylegan2"', '"iresnet18"')
  )
  with pytest.raises(ValueError, match="not a StyleGAN2 generator"):
    stylegan2.load(tmp_path / "g")
  np.testing.assert_array_equal(
      restored["buffers"]["mapping"]["w_avg"],
      variables["buffers"]["mapping"]["w_avg"],
  )
