"""StyleGAN2 generator: golden parity, noise modes, init, ops, full-size shapes."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synthdistill_jax.convert import stylegan2 as convert_sg2
from synthdistill_jax.models import stylegan2
from synthdistill_jax.ops import conv as conv_ops
from synthdistill_jax.ops import upfirdn2d
from tests import golden

CASES = ("stylegan2_sg3_small", "stylegan2_ada_small")


@functools.lru_cache(maxsize=None)
def _golden_generator(case):
  """The golden case's module and variables, with a jitted mapping."""
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
  return module, variables, mapping


SYNTHESIS_KWARGS = ("img_resolution", "channel_base", "channel_max", "w_dim")


@functools.lru_cache(maxsize=None)
def _synthesis_fn(mode, fused, upsample="dilated"):
  """A jitted synthesis that both golden cases share (same synthesis config).

  It takes only the synthesis variables: the cases differ in their mapping
  networks alone, so one compilation serves both.
  """
  module = _golden_generator(CASES[0])[0].clone(upsample_method=upsample)
  return jax.jit(
      lambda v, ws: module.apply(
          v, ws, noise_mode=mode, fused_modconv=fused, method="synthesis"
      )
  )


def _synthesis(case, ws, mode, fused=False, upsample="dilated"):
  module, variables, _ = _golden_generator(case)
  shared = _golden_generator(CASES[0])[0]
  for name in SYNTHESIS_KWARGS:
    assert getattr(module, name) == getattr(shared, name)
  sub = {k: {"synthesis": v["synthesis"]} for k, v in variables.items()}
  return _synthesis_fn(mode, fused, upsample)(sub, ws)


def _max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - b)))


@pytest.mark.parametrize("case", CASES)
def test_golden_mapping(case):
  _, variables, mapping = _golden_generator(case)
  arrays = golden.load_arrays(case)
  c = arrays.get("c")
  for psi, key in ((1.0, "ws_psi1"), (0.7, "ws_psi07")):
    ws = mapping(variables, arrays["z"], c, psi)
    assert ws.shape == arrays[key].shape and ws.dtype == jnp.float32
    assert _max_diff(ws, arrays[key]) <= 1e-5, key


def _check_images(got, refs):
  for name, img in zip(refs, np.split(np.asarray(got), len(refs))):
    ref = refs[name].transpose(0, 2, 3, 1)  # NCHW -> NHWC
    assert img.shape == ref.shape and img.dtype == np.float32
    np.testing.assert_allclose(img, ref, rtol=1e-4, atol=1e-4, err_msg=name)
    assert _max_diff(img, ref) <= 1e-3


@pytest.mark.parametrize("case", CASES)
def test_golden_images(case):
  a = golden.load_arrays(case)
  # One batch for all 'const' outputs of the default (batched) modconv.
  ws = np.concatenate([a["ws_psi1"], a["ws_mixed"], a["ws_psi07"]])
  names = ("img_const", "img_mixed_const", "img_psi07_const")
  _check_images(_synthesis(case, ws, "const"), {n: a[n] for n in names})
  _check_images(
      _synthesis(case, a["ws_psi1"], "none"), {"img_none": a["img_none"]}
  )
  _check_images(
      _synthesis(case, a["ws_psi1"], "const"),
      {"img_const_unfused": a["img_const_unfused"]},
  )
  # The grouped-conv formulation (the official default in eval).
  _check_images(
      _synthesis(case, a["ws_psi1"], "const", True),
      {"img_const": a["img_const"]},
  )
  # The up-sampling convs as phase convs (the CPU default of the trainer),
  # batched and grouped.
  for fused in (False, True):
    _check_images(
        _synthesis(case, a["ws_psi1"], "const", fused, "phases"),
        {"img_const": a["img_const"]},
    )


def test_truncation_cutoff_only_touches_first_rows():
  module, variables, _ = _golden_generator(CASES[0])
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
  shapes = jax.eval_shape(
      lambda k: layer.init(k, x, w, noise_mode="none"), jax.random.key(0)
  )
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes["params"])
  params["noise_strength"] = np.float32(0.5)
  noise = np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32)
  return layer, {"params": params, "buffers": {"noise_const": noise}}, x, w


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
  module, variables, _ = _golden_generator(CASES[0])
  ws = golden.load_arrays(CASES[0])["ws_psi1"]
  with pytest.raises(ValueError, match="rngs"):
    module.apply(variables, ws, noise_mode="random", method="synthesis")


def test_official_random_init_makes_useful_images():
  module = stylegan2.create(
      "stylegan2",
      z_dim=64,
      w_dim=64,
      img_resolution=16,
      channel_base=256,
      channel_max=32,
      mapping_layers=2,
  )
  variables = stylegan2.init_variables(module, jax.random.key(0))
  params, buffers = variables["params"], variables["buffers"]
  assert module.num_ws == 6
  assert abs(np.std(params["mapping"]["fc0"]["weight"]) / 100 - 1) < 0.05
  conv = params["synthesis"]["b16"]["conv1"]
  assert abs(np.std(conv["weight"]) - 1) < 0.05
  np.testing.assert_array_equal(conv["affine"]["bias"], 1.0)
  assert float(conv["noise_strength"]) == 0 and not np.any(conv["bias"])
  np.testing.assert_array_equal(buffers["mapping"]["w_avg"], 0)
  noise = buffers["synthesis"]["b16"]["conv1"]["noise_const"]
  assert noise.shape == (16, 16) and abs(np.std(noise) - 1) < 0.15
  z = jax.random.normal(jax.random.key(1), (4, 64))
  img = jax.jit(lambda v, z: module.apply(v, z, noise_mode="const"))(
      variables, z
  )
  img = np.asarray(img)
  assert img.shape == (4, 16, 16, 3) and np.all(np.isfinite(img))
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
@pytest.mark.parametrize("method", upfirdn2d.FILTER_METHODS)
def test_upfirdn2d_matches_direct_definition(up, down, pad, method):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 7, 6, 3)).astype(np.float32)
  f2d = upfirdn2d.setup_filter([1, 3, 3, 1])
  asym = rng.standard_normal((3, 4)).astype(np.float32)
  ref = _upfirdn2d_reference(x, f2d, up, down, pad, up * up)
  for f in (f2d, upfirdn2d.setup_filter(separable=True)):
    got = upfirdn2d.upfirdn2d(
        x, f, up=up, down=down, padding=pad, gain=up * up, method=method
    )
    np.testing.assert_allclose(got, ref, atol=1e-5)
  got = upfirdn2d.upfirdn2d(
      x, asym, up=up, down=down, padding=pad, method=method
  )
  np.testing.assert_allclose(
      got, _upfirdn2d_reference(x, asym, up, down, pad, 1.0), atol=1e-5
  )
  # A traced filter (no compile-time taps) takes the conv path.
  traced = jax.jit(
      lambda x, f: upfirdn2d.upfirdn2d(
          x, f, up=up, down=down, padding=pad, method=method
      )
  )(x, asym)
  np.testing.assert_allclose(traced, got, atol=1e-5)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("up", [2, 3])
@pytest.mark.parametrize("kh,kw", [(1, 1), (3, 3), (2, 2), (4, 3), (1, 3)])
def test_phase_convs_equal_the_dilated_transposed_conv(kh, kw, up, groups):
  """Every kernel size and stride, odd and even inputs, with the FIR after."""
  rng = np.random.default_rng(kh * 10 + kw)
  x = rng.standard_normal((2, 5, 4, 4)).astype(np.float32)
  w = rng.standard_normal((kh, kw, 4 // groups, 6)).astype(np.float32)
  got = conv_ops.transposed_conv_phases(x, w, up=up, groups=groups)
  ref = jax.lax.conv_general_dilated(
      x,
      np.flip(w, (0, 1)),
      window_strides=(1, 1),
      padding=((kh - 1, kh - 1), (kw - 1, kw - 1)),
      lhs_dilation=(up, up),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=groups,
  )
  assert got.shape == ref.shape == (2, up * 4 + kh, up * 3 + kw, 6)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  f = upfirdn2d.setup_filter([1, 3, 3, 1])
  kwargs = dict(f=f, up=up, padding=kh // 2, groups=groups)
  np.testing.assert_allclose(
      conv_ops.conv2d_resample(x, w, upsample_method="phases", **kwargs),
      conv_ops.conv2d_resample(x, w, **kwargs),
      rtol=1e-5,
      atol=1e-5,
  )
  with pytest.raises(ValueError, match="upsample_method must be one of"):
    conv_ops.conv2d_resample(x, w, upsample_method="fft", **kwargs)


TINY = dict(
    z_dim=16,
    w_dim=16,
    img_resolution=8,
    channel_base=64,
    channel_max=16,
    mapping_layers=2,
)


@functools.lru_cache(maxsize=None)
def _tiny(**kwargs):
  """A tiny generator and its variables: official init plus 0.1 N(0,1).

  The perturbation makes biases and noise strengths nonzero, so that every
  path of the network counts.
  """
  module = stylegan2.create("stylegan2", **TINY, **kwargs)
  variables = stylegan2.init_variables(module, jax.random.key(0))
  leaves, tree = jax.tree.flatten(variables["params"])
  rng = np.random.default_rng(1)
  leaves = [
      np.asarray(l) + 0.1 * rng.standard_normal(l.shape).astype(np.float32)
      for l in leaves
  ]
  params = jax.tree.unflatten(tree, leaves)
  return module, {"params": params, "buffers": variables["buffers"]}


def test_reduced_precision_blocks_stay_close():
  ref_module, variables = _tiny(num_fp16_res=1)
  z = np.random.default_rng(3).standard_normal((2, 16)).astype(np.float32)
  ref = jax.jit(lambda v, z: ref_module.apply(v, z, noise_mode="const"))(
      variables, z
  )
  for dtype in ("bfloat16", "float16"):
    module = ref_module.clone(fp16_dtype=dtype)
    img = jax.jit(lambda v, z, m=module: m.apply(v, z, noise_mode="const"))(
        variables, z
    )
    assert img.dtype == jnp.float32 and np.all(np.isfinite(img))
    err = np.abs(np.asarray(img) - np.asarray(ref)).max() / np.std(ref)
    assert err < (0.1 if dtype == "bfloat16" else 0.02), dtype


@pytest.mark.parametrize("architecture", ["orig", "resnet"])
def test_other_architectures(architecture):
  module, variables = _tiny(architecture=architecture)
  blocks = variables["params"]["synthesis"]
  # Only the last block has a ToRGB; 'resnet' adds a 1x1 skip conv.
  assert "torgb" not in blocks["b4"] and "torgb" in blocks["b8"]
  assert ("skip" in blocks["b8"]) == (architecture == "resnet")
  z = np.random.default_rng(3).standard_normal((2, 16)).astype(np.float32)
  fused, batched = (
      jax.jit(
          lambda v, z, f=f: module.apply(
              v, z, noise_mode="const", fused_modconv=f
          )
      )(variables, z)
      for f in (True, False)
  )
  assert fused.shape == (2, 8, 8, 3) and np.all(np.isfinite(fused))
  np.testing.assert_allclose(fused, batched, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("architecture", ["skip", "resnet"])
def test_filter_method_is_part_of_the_jitted_program(architecture):
  """The switch reaches every FIR filter and is never stale under `jax.jit`.

  One jitted function with the module as a static argument: each method is
  its own trace (a module-level switch would be baked into the first one).
  """
  # The default architecture shares `_tiny()`'s cache entry.
  module, variables = _tiny(
      **({} if architecture == "skip" else {"architecture": architecture})
  )
  modules = {m: module.clone(filter_method=m) for m in upfirdn2d.FILTER_METHODS}
  z = np.random.default_rng(3).standard_normal((2, 16)).astype(np.float32)
  generate = jax.jit(
      lambda m, v, z: m.apply(v, z, noise_mode="const"), static_argnums=0
  )
  convs = {
      m: generate.lower(mod, variables, z)
      .as_text()
      .count("stablehlo.convolution")
      for m, mod in modules.items()
  }
  # b8 filters twice: after conv0, and the skip image ('skip') or the 1x1
  # skip conv ('resnet'). Each separable filter is two convolutions.
  assert convs["conv"] == convs["slices"] + 4
  img = {m: generate(mod, variables, z) for m, mod in modules.items()}
  np.testing.assert_allclose(img["slices"], img["conv"], rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="filter_method must be one of"):
    stylegan2.create(**TINY, filter_method="fft")
  with pytest.raises(ValueError, match="method must be one of"):
    upfirdn2d.upsample2d(z[:, None, :, None], [1, 3, 3, 1], method="fft")


@pytest.mark.parametrize("architecture", ["skip", "resnet"])
def test_upsample_method_is_part_of_the_jitted_program(architecture):
  """'phases' leaves no zero-inserted conv in the program, same images."""
  module, variables = _tiny(
      **({} if architecture == "skip" else {"architecture": architecture})
  )
  modules = {
      m: module.clone(upsample_method=m) for m in conv_ops.UPSAMPLE_METHODS
  }
  z = np.random.default_rng(3).standard_normal((2, 16)).astype(np.float32)
  generate = jax.jit(
      lambda m, v, z: m.apply(v, z, noise_mode="const"), static_argnums=0
  )
  text = {
      m: generate.lower(mod, variables, z).as_text()
      for m, mod in modules.items()
  }
  # b8's conv0, and the 1x1 skip conv of 'resnet'.
  ups = 1 if architecture == "skip" else 2
  assert text["dilated"].count("lhs_dilate = [2, 2]") == ups
  assert "lhs_dilate = [2, 2]" not in text["phases"]
  # A 3x3 kernel at stride 2 splits in four convs, a 1x1 in one (its other
  # three phases are zeros).
  convs = {m: t.count("stablehlo.convolution") for m, t in text.items()}
  assert convs["phases"] == convs["dilated"] + 3
  img = {m: generate(mod, variables, z) for m, mod in modules.items()}
  np.testing.assert_allclose(
      img["phases"], img["dilated"], rtol=1e-4, atol=1e-4
  )
  with pytest.raises(ValueError, match="upsample_method must be one of"):
    stylegan2.create(**TINY, upsample_method="fft")


def test_jit_any_batch_without_host_transfers():
  module, variables = _tiny()
  variables = jax.device_put(variables)

  @jax.jit
  def generate(v, key):
    kz, kn = jax.random.split(key)
    z = jax.random.normal(kz, (3, 16))
    ws = module.apply(v, z, None, truncation_psi=0.7, method="mapping")
    return module.apply(v, ws, rngs={"noise": kn}, method="synthesis")

  key, key2 = jax.device_put(jax.random.split(jax.random.key(5)))
  generate(variables, key)  # compile
  with jax.transfer_guard("disallow"):
    img = generate(variables, key)
    other = generate(variables, key2)
  assert img.shape == (3, 8, 8, 3) and np.all(np.isfinite(img))
  assert np.abs(np.asarray(img) - np.asarray(other)).mean() > 1e-3
  one = jax.jit(lambda v, z: module.apply(v, z, noise_mode="none"))(
      variables, jnp.zeros((1, 16))
  )
  assert one.shape == (1, 8, 8, 3)


def test_load_refuses_other_architectures(tmp_path):
  module, variables = _tiny()
  from synthdistill_jax import models  # pylint: disable=g-import-not-at-top

  models.save(tmp_path / "g", "stylegan2", TINY, variables)
  loaded, restored = stylegan2.load(tmp_path / "g")
  assert loaded == module
  # An attribute that changes only the compiled program is an override.
  loaded, _ = stylegan2.load(tmp_path / "g", filter_method="conv")
  assert loaded == module.clone(filter_method="conv")
  np.testing.assert_array_equal(
      restored["params"]["synthesis"]["b8"]["conv0"]["weight"],
      variables["params"]["synthesis"]["b8"]["conv0"]["weight"],
  )
  config = (tmp_path / "g" / "model.json").read_text()
  (tmp_path / "g" / "model.json").write_text(
      config.replace('"stylegan2"', '"iresnet18"')
  )
  with pytest.raises(ValueError, match="not a StyleGAN2 generator"):
    stylegan2.load(tmp_path / "g")
