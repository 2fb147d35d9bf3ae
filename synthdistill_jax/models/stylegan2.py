"""StyleGAN2 generator (mapping + synthesis networks) in Flax linen.

A port of NVIDIA's `Generator` ("Analyzing and Improving the Image Quality of
StyleGAN", Karras et al. 2020, arXiv 1912.04958) as written in NVlabs/stylegan3
`training/networks_stylegan2.py` and NVlabs/stylegan2-ada-pytorch
`training/networks.py`, with images in NHWC:

  G = stylegan2.create('stylegan2', z_dim=512, w_dim=512, img_resolution=256,
                       channel_base=16384)
  variables = stylegan2.init_variables(G, jax.random.key(0))
  ws = G.apply(variables, z, c, truncation_psi=1.0, method='mapping')
  img = G.apply(variables, ws, noise_mode='random',
                rngs={'noise': key}, method='synthesis')   # [B, R, R, 3]

Stored weights are raw and the official runtime gains are applied in the
forward pass, so converted checkpoints keep their values (only layouts change:
conv kernels HWIO, dense kernels [in, out], `const` [R, R, C]). Variables:

  params:  mapping/{embed,fc0..}/{weight,bias}
           synthesis/b{R}/{const, conv0, conv1, torgb, skip}; a conv layer has
           weight, bias, noise_strength, affine/{weight,bias}
  buffers: mapping/w_avg [w_dim], synthesis/b{R}/conv{0,1}/noise_const [R, R]

The FIR filter [1,3,3,1] is a constant of the code, not a variable; how it
is applied (`filter_method`, 'slices' or 'conv', see `ops.upfirdn2d`) is an
attribute, so it is part of every program that traces the module; so is how
the up-sampling convs run (`upsample_method`, see `ops.conv`).
"""

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from synthdistill_jax import errors
from synthdistill_jax.models import registry
from synthdistill_jax.ops import conv as conv_ops
from synthdistill_jax.ops import upfirdn2d

ARCHS = ("stylegan2",)
ARCHITECTURES = ("orig", "skip", "resnet")
NOISE_MODES = ("random", "const", "none")

# Separable form of setup_filter([1,3,3,1]): the outer product of this 1D
# filter with itself is exactly the official 4x4 `resample_filter` buffer.
RESAMPLE_FILTER = upfirdn2d.setup_filter(separable=True)


def _normal(scale: float = 1.0):
  """N(0, scale^2) initialiser in float32 (the official `torch.randn`)."""

  def init(key, shape, dtype=jnp.float32):
    return (jax.random.normal(key, shape, jnp.float32) * scale).astype(dtype)

  return init


def _precision(name: str | None):
  return None if name is None else jax.lax.Precision(name)


class FullyConnectedLayer(nn.Module):
  """Dense layer with StyleGAN's equalised learning rate.

  Attributes:
    features: output features.
    activation: 'linear' or 'lrelu'.
    lr_multiplier: runtime gain on weights (with 1/sqrt(in)) and bias; the
      stored weight is initialised N(0, 1/lr_multiplier^2).
    bias_init: initial bias (1 for the style affines).
    precision: matmul precision name or None.
  """

  features: int
  activation: str = "linear"
  lr_multiplier: float = 1.0
  bias_init: float = 0.0
  precision: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_features = x.shape[-1]
    weight = self.param(
        "weight",
        _normal(1.0 / self.lr_multiplier),
        (in_features, self.features),
    )
    bias = self.param(
        "bias", nn.initializers.constant(self.bias_init), (self.features,)
    )
    w = weight * float(self.lr_multiplier / np.sqrt(in_features))
    b = bias * float(self.lr_multiplier) if self.lr_multiplier != 1 else bias
    x = jnp.matmul(x, w, precision=_precision(self.precision))
    return conv_ops.bias_act(x, b, act=self.activation)


def _normalize_2nd_moment(x: jax.Array, eps: float = 1e-8) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=1, keepdims=True) + eps)


def _lerp(start: jax.Array, end: jax.Array, weight) -> jax.Array:
  """`torch.lerp` with its two-sided formula (bit-compatible rounding)."""
  diff = end - start
  return jnp.where(
      jnp.abs(weight) < 0.5, start + weight * diff, end - diff * (1 - weight)
  )


class MappingNetwork(nn.Module):
  """z (and label c) -> w, broadcast to `num_ws` rows, optionally truncated."""

  z_dim: int
  c_dim: int
  w_dim: int
  num_ws: int
  num_layers: int = 8
  embed_features: int | None = None
  layer_features: int | None = None
  lr_multiplier: float = 0.01
  precision: str | None = None

  @nn.compact
  def __call__(self, z, c, truncation_psi=1.0, truncation_cutoff=None):
    embed = self.w_dim if self.embed_features is None else self.embed_features
    layer = self.w_dim if self.layer_features is None else self.layer_features
    w_avg = self.variable(
        "buffers", "w_avg", lambda: jnp.zeros((self.w_dim,), jnp.float32)
    )
    parts = []
    if self.z_dim > 0:
      parts.append(_normalize_2nd_moment(jnp.asarray(z, jnp.float32)))
    if self.c_dim > 0:
      if c is None:
        raise ValueError(f"c is required: the generator has c_dim={self.c_dim}")
      y = FullyConnectedLayer(embed, precision=self.precision, name="embed")(
          jnp.asarray(c, jnp.float32)
      )
      parts.append(_normalize_2nd_moment(y))
    x = jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    for idx in range(self.num_layers):
      features = self.w_dim if idx == self.num_layers - 1 else layer
      x = FullyConnectedLayer(
          features,
          activation="lrelu",
          lr_multiplier=self.lr_multiplier,
          precision=self.precision,
          name=f"fc{idx}",
      )(x)
    x = jnp.broadcast_to(x[:, None, :], (x.shape[0], self.num_ws, self.w_dim))
    if isinstance(truncation_psi, (int, float)) and truncation_psi == 1:
      return x
    truncated = _lerp(w_avg.value, x, truncation_psi)
    if truncation_cutoff is None:
      return truncated
    return x.at[:, :truncation_cutoff].set(truncated[:, :truncation_cutoff])


class SynthesisLayer(nn.Module):
  """Modulated 3x3 conv (optionally 2x upsampling) + noise + bias + lrelu."""

  out_channels: int
  resolution: int
  up: int = 1
  kernel_size: int = 3
  conv_clamp: float | None = None
  precision: str | None = None
  filter_method: str = "slices"
  upsample_method: str = "dilated"

  @nn.compact
  def __call__(self, x, w, *, noise_mode="random", fused=False, gain=1.0):
    batch, in_channels = x.shape[0], x.shape[-1]
    k, res = self.kernel_size, self.resolution
    styles = FullyConnectedLayer(
        in_channels, bias_init=1.0, precision=self.precision, name="affine"
    )(w)
    weight = self.param(
        "weight", _normal(), (k, k, in_channels, self.out_channels)
    )
    noise_const = self.variable(
        "buffers",
        "noise_const",
        lambda: _normal()(self.make_rng("params"), (res, res)),
    )
    strength = self.param("noise_strength", nn.initializers.zeros, ())
    noise = None
    if noise_mode == "random":
      if self.has_rng("noise"):
        shape = (batch, res, res, 1)
        noise = jax.random.normal(self.make_rng("noise"), shape) * strength
      elif not self.is_initializing():
        raise ValueError(
            "noise_mode='random' needs a noise key: pass rngs={'noise': key}"
        )
    elif noise_mode == "const":
      noise = noise_const.value[None, :, :, None] * strength
    x = conv_ops.modulated_conv2d(
        x,
        weight,
        styles,
        noise=noise,
        up=self.up,
        resample_filter=RESAMPLE_FILTER,
        fused=fused,
        precision=_precision(self.precision),
        filter_method=self.filter_method,
        upsample_method=self.upsample_method,
    )
    bias = self.param("bias", nn.initializers.zeros, (self.out_channels,))
    clamp = None if self.conv_clamp is None else self.conv_clamp * gain
    act_gain = conv_ops.ACTIVATIONS["lrelu"] * gain
    return conv_ops.bias_act(x, bias, act="lrelu", gain=act_gain, clamp=clamp)


class ToRGBLayer(nn.Module):
  """Modulated 1x1 conv without demodulation, + bias, clamped."""

  out_channels: int
  conv_clamp: float | None = None
  precision: str | None = None

  @nn.compact
  def __call__(self, x, w, *, fused=False):
    in_channels = x.shape[-1]
    styles = FullyConnectedLayer(
        in_channels, bias_init=1.0, precision=self.precision, name="affine"
    )(w)
    styles = styles * float(1 / np.sqrt(in_channels))
    weight = self.param(
        "weight", _normal(), (1, 1, in_channels, self.out_channels)
    )
    x = conv_ops.modulated_conv2d(
        x,
        weight,
        styles,
        demodulate=False,
        fused=fused,
        precision=_precision(self.precision),
    )
    bias = self.param("bias", nn.initializers.zeros, (self.out_channels,))
    return conv_ops.bias_act(x, bias, clamp=self.conv_clamp)


class SkipLayer(nn.Module):
  """1x1 conv with 2x FIR upsampling, no bias ('resnet' architecture)."""

  out_channels: int
  precision: str | None = None
  filter_method: str = "slices"
  upsample_method: str = "dilated"

  @nn.compact
  def __call__(self, x, *, gain=1.0):
    in_channels = x.shape[-1]
    weight = self.param(
        "weight", _normal(), (1, 1, in_channels, self.out_channels)
    )
    w = (weight * float(1 / np.sqrt(in_channels))).astype(x.dtype)
    x = conv_ops.conv2d_resample(
        x,
        w,
        f=RESAMPLE_FILTER,
        up=2,
        precision=_precision(self.precision),
        filter_method=self.filter_method,
        upsample_method=self.upsample_method,
    )
    return conv_ops.bias_act(x, None, gain=gain)


class SynthesisBlock(nn.Module):
  """One resolution: [const | conv0 (up)] -> conv1 -> [ToRGB], + skip image."""

  in_channels: int
  out_channels: int
  resolution: int
  img_channels: int
  is_last: bool
  architecture: str = "skip"
  conv_clamp: float | None = None
  dtype: str = "float32"
  precision: str | None = None
  filter_method: str = "slices"
  upsample_method: str = "dilated"

  @property
  def num_conv(self) -> int:
    return 1 if self.in_channels == 0 else 2

  @property
  def num_torgb(self) -> int:
    return int(self.is_last or self.architecture == "skip")

  @nn.compact
  def __call__(self, x, img, ws, *, noise_mode="random", fused=False):
    dtype = jnp.dtype(self.dtype)
    res, ch = self.resolution, self.out_channels
    layer_kw = dict(conv_clamp=self.conv_clamp, precision=self.precision)
    up_kw = dict(
        layer_kw,
        filter_method=self.filter_method,
        upsample_method=self.upsample_method,
    )
    kw = dict(noise_mode=noise_mode, fused=fused)
    if self.in_channels == 0:
      const = self.param("const", _normal(), (res, res, ch))
      x = jnp.broadcast_to(const.astype(dtype), (ws.shape[0], res, res, ch))
    else:
      x = x.astype(dtype)
    # 'resnet' adds a 1x1 upsampled skip; both branches get gain sqrt(1/2).
    resnet = self.in_channels > 0 and self.architecture == "resnet"
    gain = float(np.sqrt(0.5)) if resnet else 1.0
    if resnet:
      skip = SkipLayer(
          ch,
          precision=self.precision,
          filter_method=self.filter_method,
          upsample_method=self.upsample_method,
          name="skip",
      )
      y = skip(x, gain=gain)
    if self.in_channels > 0:
      conv0 = SynthesisLayer(ch, res, up=2, name="conv0", **up_kw)
      x = conv0(x, ws[:, 0], **kw)
    conv1 = SynthesisLayer(ch, res, name="conv1", **layer_kw)
    x = conv1(x, ws[:, self.num_conv - 1], gain=gain, **kw)
    if resnet:
      x = y + x
    if img is not None:
      img = upfirdn2d.upsample2d(
          img,
          RESAMPLE_FILTER,
          precision=_precision(self.precision),
          method=self.filter_method,
      )
    if self.num_torgb:
      torgb = ToRGBLayer(self.img_channels, name="torgb", **layer_kw)
      y = torgb(x, ws[:, self.num_conv], fused=fused).astype(jnp.float32)
      img = y if img is None else img + y
    return x, img


def block_layout(
    img_resolution: int, channel_base: int, channel_max: int, num_fp16_res: int
) -> list[tuple[int, int, int, bool]]:
  """The synthesis blocks of a configuration, as the official code builds them.

  Args:
    img_resolution: output resolution, a power of two >= 4.
    channel_base: channels at resolution r are min(channel_base // r, max).
    channel_max: upper bound on the channels.
    num_fp16_res: how many of the highest resolutions use the fp16 dtype
      (never the 4x4 block).

  Returns:
    `(resolution, in_channels, out_channels, use_fp16)` per block, 4 first;
    `in_channels` is 0 for the constant-input block.
  """
  log2 = int(np.log2(img_resolution))
  if img_resolution < 4 or 2**log2 != img_resolution:
    raise ValueError(
        f"img_resolution must be a power of 2 >= 4, got {img_resolution}"
    )
  resolutions = [2**i for i in range(2, log2 + 1)]
  channels = {r: min(channel_base // r, channel_max) for r in resolutions}
  fp16_resolution = max(2 ** (log2 + 1 - num_fp16_res), 8)
  return [
      (r, channels[r // 2] if r > 4 else 0, channels[r], r >= fp16_resolution)
      for r in resolutions
  ]


class SynthesisNetwork(nn.Module):
  """ws [B, num_ws, w_dim] -> image [B, R, R, img_channels] (float32)."""

  img_resolution: int
  img_channels: int
  channel_base: int = 32768
  channel_max: int = 512
  num_fp16_res: int = 4
  conv_clamp: float | None = 256
  architecture: str = "skip"
  dtype: str = "float32"
  fp16_dtype: str | None = None
  precision: str | None = None
  filter_method: str = "slices"
  upsample_method: str = "dilated"

  def _blocks(self) -> list[SynthesisBlock]:
    layout = block_layout(
        self.img_resolution,
        self.channel_base,
        self.channel_max,
        self.num_fp16_res,
    )
    return [
        SynthesisBlock(
            in_ch,
            out_ch,
            res,
            self.img_channels,
            is_last=res == self.img_resolution,
            architecture=self.architecture,
            conv_clamp=self.conv_clamp,
            # The official code runs these blocks in fp16 on GPUs; here
            # they follow `dtype` unless `fp16_dtype` says otherwise.
            dtype=(self.fp16_dtype or self.dtype) if use_fp16 else self.dtype,
            precision=self.precision,
            filter_method=self.filter_method,
            upsample_method=self.upsample_method,
            name=f"b{res}",
        )
        for res, in_ch, out_ch, use_fp16 in layout
    ]

  @nn.compact
  def __call__(self, ws, *, noise_mode="random", fused=False):
    errors.check_choice(noise_mode, NOISE_MODES, "noise_mode")
    ws = jnp.asarray(ws, jnp.float32)
    x = img = None
    w_idx = 0
    for block in self._blocks():
      block_ws = ws[:, w_idx : w_idx + block.num_conv + block.num_torgb]
      w_idx += block.num_conv
      x, img = block(x, img, block_ws, noise_mode=noise_mode, fused=fused)
    return img


class Generator(nn.Module):
  """StyleGAN2 generator; attributes mirror NVIDIA's init kwargs.

  Attributes:
    z_dim: latent z size (0 = no latent).
    c_dim: label size (0 = unconditional).
    w_dim: intermediate latent w size.
    img_resolution: output resolution (4 .. 1024, power of 2).
    img_channels: output channels.
    mapping_layers: mapping network depth (`mapping_kwargs.num_layers`).
    channel_base: channels at resolution r are min(channel_base // r, max).
    channel_max: maximum channels.
    num_fp16_res: number of top resolutions computed in `fp16_dtype`.
    conv_clamp: clamp of conv outputs (None = off).
    architecture: 'skip' (official generators), 'orig' or 'resnet'.
    embed_features: label embedding size (None = w_dim).
    layer_features: mapping hidden size (None = w_dim).
    lr_multiplier: mapping learning-rate multiplier (runtime gain).
    w_avg_beta: decay of the w average during training (kept as metadata).
    dtype: compute dtype of every synthesis block ('float32' for parity,
      'bfloat16' on accelerators), the top `num_fp16_res` ones included
      unless `fp16_dtype` is set.
    fp16_dtype: compute dtype of the top `num_fp16_res` blocks only; None
      (default) = `dtype`. NVIDIA's code uses float16 there on GPUs.
    fused_modconv: use grouped convs (True) or the faster batched form.
    precision: `jax.lax.Precision` name for convs/matmuls (None = default;
      'highest' for float32 parity on GPU/TPU).
    filter_method: how the upsampling FIR filter runs, one of
      `upfirdn2d.FILTER_METHODS`: 'slices' (shifted-slice sums, the default;
      ~40x faster on XLA:CPU) or 'conv' (depthwise grouped convs). Same
      variables and, up to rounding, the same images.
    upsample_method: how the six up-sampling convs run, one of
      `conv.UPSAMPLE_METHODS`: 'dilated' (the transposed conv as one conv
      of the zero-inserted input, the default: cuDNN's and the TPU's
      native form) or 'phases' (four convs on the input grid, interleaved;
      faster on XLA:CPU). Same variables and, up to rounding, the same
      images; `networks.build_generator` picks per platform.
  """

  z_dim: int = 512
  c_dim: int = 0
  w_dim: int = 512
  img_resolution: int = 256
  img_channels: int = 3
  mapping_layers: int = 8
  channel_base: int = 32768
  channel_max: int = 512
  num_fp16_res: int = 4
  conv_clamp: float | None = 256
  architecture: str = "skip"
  embed_features: int | None = None
  layer_features: int | None = None
  lr_multiplier: float = 0.01
  w_avg_beta: float | None = 0.998
  dtype: str = "float32"
  fp16_dtype: str | None = None
  fused_modconv: bool = False
  precision: str | None = None
  filter_method: str = "slices"
  upsample_method: str = "dilated"

  @property
  def num_ws(self) -> int:
    """Number of w rows the synthesis network consumes."""
    # Every block has two convs (one for 4x4) and the last a ToRGB, whose w
    # rows are shared with the next block's conv0.
    return 2 * (int(np.log2(self.img_resolution)) - 1)

  def setup(self):
    errors.check_choice(self.architecture, ARCHITECTURES, "architecture")
    errors.check_choice(
        self.filter_method, upfirdn2d.FILTER_METHODS, "filter_method"
    )
    errors.check_choice(
        self.upsample_method, conv_ops.UPSAMPLE_METHODS, "upsample_method"
    )
    self.mapping_net = MappingNetwork(
        self.z_dim,
        self.c_dim,
        self.w_dim,
        self.num_ws,
        num_layers=self.mapping_layers,
        embed_features=self.embed_features,
        layer_features=self.layer_features,
        lr_multiplier=self.lr_multiplier,
        precision=self.precision,
        name="mapping",
    )
    self.synthesis_net = SynthesisNetwork(
        self.img_resolution,
        self.img_channels,
        channel_base=self.channel_base,
        channel_max=self.channel_max,
        num_fp16_res=self.num_fp16_res,
        conv_clamp=self.conv_clamp,
        architecture=self.architecture,
        dtype=self.dtype,
        fp16_dtype=self.fp16_dtype,
        precision=self.precision,
        filter_method=self.filter_method,
        upsample_method=self.upsample_method,
        name="synthesis",
    )

  def mapping(self, z, c=None, truncation_psi=1.0, truncation_cutoff=None):
    """z [B, z_dim], c [B, c_dim] or None -> ws [B, num_ws, w_dim] float32."""
    return self.mapping_net(z, c, truncation_psi, truncation_cutoff)

  def synthesis(self, ws, noise_mode="random", fused_modconv=None):
    """ws [B, num_ws, w_dim] -> images [B, R, R, C] float32, unclamped.

    `noise_mode='random'` draws fresh noise from the 'noise' rng stream
    (`rngs={'noise': key}`), 'const' uses the stored `noise_const` buffers,
    'none' adds no noise. `fused_modconv` overrides the attribute.
    """
    fused = self.fused_modconv if fused_modconv is None else fused_modconv
    return self.synthesis_net(ws, noise_mode=noise_mode, fused=fused)

  def __call__(
      self,
      z,
      c=None,
      truncation_psi=1.0,
      truncation_cutoff=None,
      noise_mode="random",
      fused_modconv=None,
  ):
    """z, c -> images: `synthesis(mapping(z, c, ...), ...)`."""
    ws = self.mapping(z, c, truncation_psi, truncation_cutoff)
    return self.synthesis(ws, noise_mode, fused_modconv)


def create(arch: str = "stylegan2", **kwargs: Any) -> Generator:
  """Builds a `Generator` (registry entry point).

  Args:
    arch: must be 'stylegan2'.
    **kwargs: `Generator` attributes (JSON values).

  Returns:
    The Flax module.
  """
  if arch not in ARCHS:
    raise ValueError(f"unknown StyleGAN architecture {arch!r}; known: {ARCHS}")
  # Checked here too (not only at trace time) so that a config or model.json
  # mistake is reported when the module is built.
  errors.check_choice(
      kwargs.get("filter_method", "slices"),
      upfirdn2d.FILTER_METHODS,
      "filter_method",
  )
  errors.check_choice(
      kwargs.get("upsample_method", "dilated"),
      conv_ops.UPSAMPLE_METHODS,
      "upsample_method",
  )
  return Generator(**kwargs)


def _official_value(path: tuple[str, ...], lr_multiplier: float):
  """Initial value rule of one variable: ('normal', scale) or ('const', v)."""
  name, parent = path[-1], path[-2]
  if name == "weight":
    mapping_fc = path[1] == "mapping" and parent.startswith("fc")
    return "normal", 1.0 / lr_multiplier if mapping_fc else 1.0
  if name in ("const", "noise_const"):
    return "normal", 1.0
  if name == "bias" and parent == "affine":
    return "const", 1.0
  return "const", 0.0  # biases, noise_strength, w_avg


def init_variables(module: Generator, key: jax.Array):
  """The official random initialisation of a generator's variables.

  Weights N(0, 1) (mapping weights N(0, 1/lr_multiplier^2)), biases 0,
  affine biases 1, `noise_strength` 0, `const` and `noise_const` N(0, 1),
  `w_avg` 0, as NVIDIA's modules build them. `module.init` gives the same
  distributions; this helper draws all normals at once, which compiles in a
  fraction of the time of one generator per parameter.

  Args:
    module: a `Generator`.
    key: PRNG key.

  Returns:
    `{'params': ..., 'buffers': ...}` of float32 arrays.
  """
  z = jnp.zeros((1, module.z_dim), jnp.float32)
  c = jnp.zeros((1, module.c_dim), jnp.float32) if module.c_dim else None
  shapes = jax.eval_shape(
      lambda k: module.init({"params": k}, z, c, noise_mode="none"), key
  )
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  rules = [
      _official_value(tuple(p.key for p in path), module.lr_multiplier)
      for path, _ in leaves
  ]
  sizes = [
      int(np.prod(leaf.shape)) if kind == "normal" else 0
      for (_, leaf), (kind, _) in zip(leaves, rules)
  ]

  @jax.jit
  def draw(key):
    normals = jax.random.normal(key, (sum(sizes),), jnp.float32)
    offsets = np.cumsum([0] + sizes)
    values = []
    for (_, leaf), (kind, v), start, size in zip(leaves, rules, offsets, sizes):
      if kind == "normal":
        values.append(normals[start : start + size].reshape(leaf.shape) * v)
      else:
        values.append(jnp.full(leaf.shape, v, jnp.float32))
    return jax.tree_util.tree_unflatten(treedef, values)

  return draw(key)


def load(directory: str | os.PathLike, **overrides: Any):
  """Reads a converted generator folder (no PyTorch needed).

  Args:
    directory: written by `tools/convert_stylegan2.py` or `models.save`.
    **overrides: attributes to change, e.g. `fp16_dtype='bfloat16'`.

  Returns:
    `(module, variables)`.
  """
  arch = registry.read_config(directory)["arch"]
  if arch not in ARCHS:
    raise ValueError(
        f"{directory}: holds a {arch!r} model, not a StyleGAN2 generator"
    )
  return registry.load(directory, **overrides)
