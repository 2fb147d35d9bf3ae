"""TinyFaR students: timm's TinyNet (EfficientNet-B0 family) + a linear head.

SynthDistill's students (H. Otroshi Shahreza et al., IJCB 2023,
arXiv 2308.14852; `otroshi/synthdistill` `src/Network.py`) are
`timm.create_model('tinynet_x', num_classes=0)` followed by
`Linear(1280, 512)`. This module rebuilds timm 0.6.13's `_gen_tinynet`
exactly: EfficientNet-B0 block strings scaled by a width and a depth
multiplier, channels rounded with `make_divisible(ch * width, 8)` (never more
than 10 % down), stage depths rounded per stage with Python's `round`, a fixed
32-channel stem and 1280 head features, SiLU ("Swish") everywhere,
squeeze-excite with `round(0.25 * block input channels)` reduced channels and
a sigmoid gate, BatchNorm eps 1e-5 and PyTorch's symmetric `k // 2` padding.

Submodule names follow timm's `state_dict` keys (`conv_stem`, `bn1`,
`blocks_<stage>_<block>` with `conv_pw`/`conv_dw`/`se`/`conv_pwl`/`bn1..3`,
`conv_head`, `bn2`, `fc`), so `synthdistill_jax.convert.tinynet` is a plain
name map.

  module = create('tinyfar_c')
  variables = module.init(jax.random.key(0), x_nhwc)
  out = module.apply(variables, x_nhwc)                  # eval: running stats
  out, updates = module.apply(variables, x_nhwc, train=True,
                              mutable=['batch_stats'])   # batch stats
"""

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from synthdistill_jax import errors
from synthdistill_jax.models import layers
from synthdistill_jax.ops import upfirdn2d

ARCHS = ("tinyfar_a", "tinyfar_b", "tinyfar_c")

# timm's (width, depth) multipliers of tinynet_a/b/c (the input resolution
# factor r of the TinyNet paper is not part of the network).
MULTIPLIERS = {
    "tinyfar_a": (1.0, 1.2),
    "tinyfar_b": (0.75, 1.1),
    "tinyfar_c": (0.54, 0.85),
}

# EfficientNet-B0 stages as in timm's arch_def: block type, repeats, depthwise
# kernel, stride of the first block, expansion ratio, output channels. Every
# block has squeeze-excite 0.25.
B0_STAGES = (
    ("ds", 1, 3, 1, 1, 16),
    ("ir", 2, 3, 2, 6, 24),
    ("ir", 2, 5, 2, 6, 40),
    ("ir", 3, 3, 2, 6, 80),
    ("ir", 3, 5, 1, 6, 112),
    ("ir", 4, 5, 2, 6, 192),
    ("ir", 1, 3, 1, 6, 320),
)
SE_RATIO = 0.25
STEM_SIZE = 32
HEAD_FEATURES = 1280


def make_divisible(
    value: float, divisor: int = 8, round_limit: float = 0.9
) -> int:
  """Rounds channels to a multiple of `divisor` as timm's `make_divisible`.

  Args:
    value: the scaled channel count.
    divisor: the multiple to round to.
    round_limit: rounding down may lose at most `1 - round_limit` of `value`.

  Returns:
    The rounded channel count (at least `divisor`).
  """
  new_value = max(divisor, int(value + divisor / 2) // divisor * divisor)
  if new_value < round_limit * value:
    new_value += divisor
  return new_value


def round_channels(channels: int, multiplier: float) -> int:
  """timm's `round_channels`: scale by the width multiplier, then round.

  Args:
    channels: the EfficientNet-B0 channel count.
    multiplier: the width multiplier (0 or None: unchanged).

  Returns:
    The rounded channel count.
  """
  if not multiplier:
    return channels
  return make_divisible(channels * multiplier)


def scale_depth(repeats: int, multiplier: float) -> int:
  """timm's `_scale_stage_depth` with `depth_trunc='round'` for one string.

  Each B0 stage holds one block string, so the stage total is simply
  `round(repeats * multiplier)` (Python's round half to even), at least 1.

  Args:
    repeats: the stage's EfficientNet-B0 block count.
    multiplier: the depth multiplier.

  Returns:
    The stage's block count.
  """
  return max(1, round(repeats * multiplier))


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """The static shape of one block.

  Attributes:
    kind: 'ds' (DepthwiseSeparableConv) or 'ir' (InvertedResidual).
    in_chs: block input channels.
    mid_chs: depthwise channels (`in_chs` for 'ds').
    out_chs: block output channels.
    kernel: depthwise kernel size.
    stride: depthwise stride.
    se_chs: squeeze-excite reduced channels.
    has_skip: whether the input is added to the output.
  """

  kind: str
  in_chs: int
  mid_chs: int
  out_chs: int
  kernel: int
  stride: int
  se_chs: int
  has_skip: bool


def build_block_specs(
    width_multiplier: float, depth_multiplier: float, stem_size: int = 32
) -> tuple[tuple[BlockSpec, ...], ...]:
  """The blocks of every stage, as timm's `EfficientNetBuilder` makes them.

  Args:
    width_multiplier: channel multiplier (timm's `model_width`).
    depth_multiplier: stage depth multiplier.
    stem_size: stem channels (fixed, not scaled: timm's `fix_stem=True`).

  Returns:
    One tuple of `BlockSpec` per stage.
  """
  stages = []
  in_chs = stem_size
  for kind, repeats, kernel, stride, exp_ratio, out in B0_STAGES:
    out_chs = round_channels(out, width_multiplier)
    blocks = []
    for i in range(scale_depth(repeats, depth_multiplier)):
      s = stride if i == 0 else 1
      mid_chs = in_chs if kind == "ds" else make_divisible(in_chs * exp_ratio)
      # timm divides the SE ratio by the expansion so that the reduction is
      # relative to the block input (`se_from_exp=False`), then rounds.
      se_ratio = SE_RATIO / (1.0 if kind == "ds" else exp_ratio)
      blocks.append(
          BlockSpec(
              kind=kind,
              in_chs=in_chs,
              mid_chs=mid_chs,
              out_chs=out_chs,
              kernel=kernel,
              stride=s,
              se_chs=round(mid_chs * se_ratio),
              has_skip=s == 1 and in_chs == out_chs,
          )
      )
      in_chs = out_chs
    stages.append(tuple(blocks))
  return tuple(stages)


# How depthwise convs run: 'slices' (k*k shifted strided slices times
# per-channel weights, summed; the default) or 'conv' (`feature_group_count`
# = channels, which XLA:CPU runs far below its matmul speed). A module
# attribute (`TinyFaR.depthwise_method`), so part of every traced program.
DEPTHWISE_METHODS = ("slices", "conv")


def _depthwise_valid(
    xp: jax.Array, kernel: jax.Array, stride: int, flip: bool = False
):
  """VALID depthwise correlation of padded `xp` by `kernel [k, k, C]`.

  With `flip`, by the kernel rotated 180 degrees (the input gradient's),
  read tap by tap: a `lax.rev` of the kernel is a kernel of its own for
  XLA:CPU to compile, per layer shape.
  """
  k, c = kernel.shape[0], kernel.shape[-1]
  # The taps by one reshape and one split: `kernel[i, j]` would trace `jnp`
  # indexing per tap, `lax.index_in_dim` a slice and a reshape.
  taps = jax.lax.split(jax.lax.reshape(kernel, (k * k * c,)), (c,) * (k * k))
  if flip:
    taps = taps[::-1]
  return upfirdn2d.weighted_window_sum(
      xp, lambda i, j: taps[i * k + j], k, k, (stride, stride)
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def depthwise_by_slices(x: jax.Array, kernel: jax.Array, stride: int):
  """A depthwise conv with PyTorch's `k // 2` padding as shifted slices.

  Pads once, then sums `kernel[i, j] * x[i::stride, j::stride]` over the
  `k*k` taps. The backward pass is written out too (`_depthwise_bwd`):
  autodiff of the slices gives one full-size pad per tap, which XLA:CPU
  runs as separate memory-bound loops (about a fifth of a TinyFaR step).

  Args:
    x: `[batch, h, w, channels]`.
    kernel: `[k, k, 1, channels]` (Flax depthwise HWIO layout).
    stride: spatial stride.

  Returns:
    `[batch, h_out, w_out, channels]`, as the grouped conv.
  """
  return _depthwise_fwd(x, kernel, stride)[0]


def _depthwise_fwd(x, kernel, stride):
  (p0, p1), (q0, q1) = layers.torch_padding(kernel.shape[0])
  xp = jnp.pad(x, ((0, 0), (p0, p1), (q0, q1), (0, 0)))
  return _depthwise_valid(xp, kernel[:, :, 0], stride), (xp, kernel)


def _strided(a: jax.Array, start, step, count) -> jax.Array:
  """`a[:, h0::sh, w0::sw, :]` with `count = (n_h, n_w)` rows and columns."""
  (h0, w0), (sh, sw), (nh, nw) = start, step, count
  return jax.lax.slice(
      a,
      (0, h0, w0, 0),
      (a.shape[0], h0 + sh * (nh - 1) + 1, w0 + sw * (nw - 1) + 1, a.shape[3]),
      (1, sh, sw, 1),
  )


def _depthwise_kernel_grad(xp, dyp, lo, out_hw, k, stride):
  """`dkernel[i, j, 0, c] = sum(xp[:, i::stride, j::stride, c] * dy[..., c])`.

  XLA:CPU hands reductions to YNNPACK, whose input must be in memory: one
  reduction per tap wrote `k*k` full-size products (each recomputing the
  block's BN and SiLU), a third of a TinyFaR-A step. Here each tap's loop
  sums the products of `rows` (<= 8) output rows first, so only `1/rows` of
  the size is written, and one reduction over the stacked taps finishes.
  `dy` is read from `dyp` (`dy` at `[lo::stride, lo::stride]`), which the
  input gradient keeps in memory anyway: sliced from `dy` itself, each
  tap's loop inlined the BN backward that produces it, once per row.

  The kernel rows `i` are a `fori_loop` whose body holds the `k` taps of one
  row: a tap's loop with a constant offset is its own compiled kernel, so
  unrolled rows made `k*k` kernels per layer shape (about 200 of the
  student step's 1,048), a loop at a run-time row makes `k`. TinyFaR-A's
  student step compiles about 10 s faster on 2 AVX2 cores, at the same step
  time (`docs/performance.md`, 2026-12-03).
  """
  out_h, out_w = out_hw
  rows = max(d for d in range(1, 9) if out_h % d == 0)
  groups = out_h // rows
  acc = jnp.promote_types(dyp.dtype, jnp.float32)
  n, _, _, c = xp.shape
  # Every tap reads a window of this size from `xp` at offset (i, j).
  window = (n, stride * (out_h - 1) + 1, stride * (out_w - 1) + 1, c)
  # `dy` once, its rows grouped `[groups, rows]`: the loop body takes row
  # `q` of each group. Sliced from `dyp` per `q` instead, each slice was a
  # copy of its own outside the loop, and a kernel for XLA:CPU to compile
  # (up to 8 per layer shape, 76 in TinyFaR-A's step).
  dy_rows = jax.lax.reshape(
      jax.lax.convert_element_type(
          _strided(dyp, (lo, lo), (stride, stride), (out_h, out_w)), acc
      ),
      (n, groups, rows, out_w, c),
  )

  def kernel_row(i, stacked):
    # Sliced in the body: outside, each row would be a loop input.
    dys = [
        jax.lax.index_in_dim(dy_rows, q, axis=2, keepdims=False)
        for q in range(rows)
    ]
    parts = []
    for j in range(k):
      x_ij = jax.lax.dynamic_slice(
          xp, (0, i, j, 0), window, allow_negative_indices=False
      )
      part = None
      for q, d in enumerate(dys):
        tap = _strided(
            x_ij, (q * stride, 0), (stride * rows, stride), (groups, out_w)
        )
        # `lax` ops: k*rows of them per row, see `weighted_window_sum`.
        prod = jax.lax.mul(jax.lax.convert_element_type(tap, acc), d)
        part = prod if q == 0 else jax.lax.add(part, prod)
      parts.append(part)
    row = jnp.stack(parts, axis=3)[None]
    return jax.lax.dynamic_update_slice(
        stacked, row, (i, 0, 0, 0, 0, 0), allow_negative_indices=False
    )

  stacked = jax.lax.fori_loop(
      0, k, kernel_row, jnp.zeros((k, n, groups, out_w, k, c), acc)
  )
  return jnp.sum(stacked, axis=(1, 2, 3)).reshape(k, k, 1, c)


def _depthwise_bwd(stride, residuals, dy):
  """Input gradient as one more depthwise pass, then the kernel gradient.

  `dx` is the correlation of `dy`, dilated by the stride and padded, with the
  flipped kernel (a single fused loop like the forward); `dkernel` is
  `_depthwise_kernel_grad`.
  """
  xp, kernel = residuals
  k = kernel.shape[0]
  (p, _), _ = layers.torch_padding(k)
  _, hp, wp, _ = xp.shape
  out_h, out_w = dy.shape[1:3]
  # dxp[u] = sum_i kernel[i] * dy_dilated[u - i]; only the unpadded rows
  # [p, p + h) of dxp are dx, so the low pad is k - 1 - p and the high pad
  # what completes h + k - 1 rows. It is >= p >= 0 (`(out_h - 1) * stride
  # <= h - 1` for odd k), so `dyp` holds every element of `dy`.
  lo = k - 1 - p
  hi_h = hp - p - 1 - (out_h - 1) * stride
  hi_w = wp - p - 1 - (out_w - 1) * stride
  zero = jnp.zeros((), dy.dtype)
  dyp = jax.lax.pad(
      dy,
      zero,
      ((0, 0, 0), (lo, hi_h, stride - 1), (lo, hi_w, stride - 1), (0, 0, 0)),
  )
  dx = _depthwise_valid(dyp, kernel[:, :, 0], 1, flip=True)
  dkernel = _depthwise_kernel_grad(
      xp, dyp, lo, (out_h, out_w), k, stride
  ).astype(kernel.dtype)
  return dx.astype(dy.dtype), dkernel


depthwise_by_slices.defvjp(_depthwise_fwd, _depthwise_bwd)


class DepthwiseConv(nn.Module):
  """A bias-free depthwise conv, params as `nn.Conv` (`kernel [k,k,1,C]`).

  Initialised as timm does it: `layers.conv` draws with fan-out `k*k*C`;
  timm divides the fan-out by the groups (`fix_group_fanout`), i.e. `k*k`
  for a depthwise conv, which gives a `sqrt(C)` larger initial scale (only
  matters when training from scratch).

  Attributes:
    features: channels (in = out = groups).
    kernel_size: square kernel side.
    stride: spatial stride.
    dtype: compute dtype; the kernel is float32.
    method: one of `DEPTHWISE_METHODS` (same result up to rounding).
  """

  features: int
  kernel_size: int
  stride: int = 1
  dtype: Any = jnp.float32
  method: str = "slices"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    kernel = self.param(
        "kernel",
        nn.initializers.normal(math.sqrt(2.0 / (k * k))),
        (k, k, 1, self.features),
        jnp.float32,
    )
    x = x.astype(self.dtype)
    kernel = kernel.astype(self.dtype)
    errors.check_choice(self.method, DEPTHWISE_METHODS, "depthwise_method")
    if self.method == "slices":
      return depthwise_by_slices(x, kernel, self.stride)
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(self.stride, self.stride),
        padding=layers.torch_padding(k),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=self.features,
    )


def _depthwise_conv(features, kernel, stride, dtype, method, name):
  """The block's `conv_dw` (same param tree as the former `nn.Conv`)."""
  return DepthwiseConv(features, kernel, stride, dtype, method, name=name)


def _torch_linear_bias_init(fan_in):
  """`torch.nn.Linear`'s bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""

  def init(key, shape, dtype=jnp.float32):
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def create_head(
    embedding_size: int, fan_in: int, dtype: Any = jnp.float32, name=None
) -> nn.Dense:
  """The `fc` head, initialised as `torch.nn.Linear` (kaiming_uniform a=√5).

  Args:
    embedding_size: output features.
    fan_in: input features (the backbone's `num_features`).
    dtype: compute dtype; params are float32.
    name: submodule name ('fc' inside `TinyFaR`).

  Returns:
    A `nn.Dense` whose kernel and bias are U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
  """
  return nn.Dense(
      embedding_size,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
      bias_init=_torch_linear_bias_init(fan_in),
      name=name,
  )


class SqueezeExcite(nn.Module):
  """timm's EfficientNet `SqueezeExcite`: mean, reduce, SiLU, expand, sigmoid.

  Attributes:
    reduced: channels of the bottleneck (`conv_reduce` output).
    dtype: compute dtype.
    pointwise_grad: weight gradient of the 1x1 convs (`layers.conv`).
  """

  reduced: int
  dtype: Any = jnp.float32
  pointwise_grad: str = "matmul"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True)
    conv = functools.partial(
        layers.conv,
        use_bias=True,
        dtype=self.dtype,
        pointwise_grad=self.pointwise_grad,
    )
    s = conv(self.reduced, 1, name="conv_reduce")(pooled.astype(self.dtype))
    s = nn.silu(s)
    s = conv(features, 1, name="conv_expand")(s)
    return x * nn.sigmoid(s)


class Block(nn.Module):
  """One DepthwiseSeparableConv ('ds') or InvertedResidual ('ir') block.

  'ds': conv_dw, bn1, SiLU, se, conv_pw, bn2 (no activation).
  'ir': conv_pw, bn1, SiLU, conv_dw, bn2, SiLU, se, conv_pwl, bn3.
  Both add the input when stride is 1 and the channels match (no drop path:
  SynthDistill's students train without it).

  Attributes:
    spec: the block's static shape.
    bn_eps: BatchNorm epsilon.
    dtype: compute dtype.
    depthwise_method: how `conv_dw` runs (`DEPTHWISE_METHODS`).
    pointwise_grad: weight gradient of the 1x1 convs
      (`layers.POINTWISE_GRADS`).
  """

  spec: BlockSpec
  bn_eps: float = 1e-5
  dtype: Any = jnp.float32
  depthwise_method: str = "slices"
  pointwise_grad: str = "matmul"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    spec, dtype = self.spec, self.dtype

    def bn(name):
      return layers.BatchNorm(epsilon=self.bn_eps, dtype=dtype, name=name)

    def pointwise(features, name):
      return layers.conv(
          features,
          1,
          dtype=dtype,
          pointwise_grad=self.pointwise_grad,
          name=name,
      )

    def se(x):
      return SqueezeExcite(spec.se_chs, dtype, self.pointwise_grad, name="se")(
          x
      )

    shortcut = x
    if spec.kind == "ds":
      x = _depthwise_conv(
          spec.mid_chs,
          spec.kernel,
          spec.stride,
          dtype,
          self.depthwise_method,
          "conv_dw",
      )(x)
      x = nn.silu(bn("bn1")(x, train=train))
      x = se(x)
      x = pointwise(spec.out_chs, "conv_pw")(x)
      x = bn("bn2")(x, train=train)
    else:
      x = pointwise(spec.mid_chs, "conv_pw")(x)
      x = nn.silu(bn("bn1")(x, train=train))
      x = _depthwise_conv(
          spec.mid_chs,
          spec.kernel,
          spec.stride,
          dtype,
          self.depthwise_method,
          "conv_dw",
      )(x)
      x = nn.silu(bn("bn2")(x, train=train))
      x = se(x)
      x = pointwise(spec.out_chs, "conv_pwl")(x)
      x = bn("bn3")(x, train=train)
    if spec.has_skip:
      x = x + shortcut
    return x


class TinyFaR(nn.Module):
  """TinyNet backbone (timm, `num_classes=0`) + `fc` Linear to the embedding.

  Attributes:
    width_multiplier: channel multiplier (a 1.0, b 0.75, c 0.54).
    depth_multiplier: depth multiplier (a 1.2, b 1.1, c 0.85).
    embedding_size: output size of `fc` (512 in SynthDistill).
    num_features: head channels; None = timm's `max(1280, round(1280*w))`.
    stem_size: stem channels (fixed at 32 by timm).
    bn_eps: BatchNorm epsilon (PyTorch's 1e-5, not TF's 1e-3).
    dtype: compute dtype name ('float32' or 'bfloat16'); params are float32
      and the output is float32.
    remat: recompute each block's activations in the backward pass (less
      memory when training, about one more forward of compute).
    depthwise_method: how the blocks' depthwise convs run, one of
      `DEPTHWISE_METHODS`: 'slices' (shifted-slice sums, the default; ~5x
      faster on XLA:CPU) or 'conv' (grouped convs). Same variables and, up to
      rounding, the same embeddings.
    pointwise_grad: how the 1x1 convs' weight gradients are computed, one of
      `layers.POINTWISE_GRADS`: 'matmul' (autodiff, the default) or
      'blocked' (per-block matmuls summed; 11 % faster TinyFaR-A steps on
      XLA:CPU, which the trainer's `student.pointwise_grad='auto'` picks
      there). Only training depends on it.
  """

  width_multiplier: float = 1.0
  depth_multiplier: float = 1.0
  embedding_size: int = 512
  num_features: int | None = None
  stem_size: int = STEM_SIZE
  bn_eps: float = 1e-5
  dtype: str = "float32"
  remat: bool = False
  depthwise_method: str = "slices"
  pointwise_grad: str = "matmul"

  def block_specs(self) -> tuple[tuple[BlockSpec, ...], ...]:
    """The static block shapes of this network."""
    return build_block_specs(
        self.width_multiplier, self.depth_multiplier, self.stem_size
    )

  def head_features(self) -> int:
    """Channels of `conv_head` (the backbone's feature size)."""
    if self.num_features is not None:
      return self.num_features
    return max(
        HEAD_FEATURES, round_channels(HEAD_FEATURES, self.width_multiplier)
    )

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Embeds faces.

    Args:
      x: [B, H, W, 3] NHWC, normalised as `(x - 0.5) / 0.5` (112x112 in
        SynthDistill).
      train: batch statistics (and running-stat updates; pass
        `mutable=['batch_stats']`) instead of running statistics.

    Returns:
      [B, embedding_size] float32 raw embeddings (not normalised).
    """
    dtype = jnp.dtype(self.dtype)

    def bn(name):
      return layers.BatchNorm(epsilon=self.bn_eps, dtype=dtype, name=name)

    x = x.astype(dtype)
    x = layers.conv(self.stem_size, 3, stride=2, dtype=dtype, name="conv_stem")(
        x
    )
    x = nn.silu(bn("bn1")(x, train=train))
    for i, stage in enumerate(self.block_specs()):
      for j, spec in enumerate(stage):
        block_cls = layers.remat_block(Block, self.remat)
        block = block_cls(
            spec,
            self.bn_eps,
            dtype,
            depthwise_method=self.depthwise_method,
            pointwise_grad=self.pointwise_grad,
            name=f"blocks_{i}_{j}",
        )
        x = block(x, train)
    x = layers.conv(
        self.head_features(),
        1,
        dtype=dtype,
        pointwise_grad=self.pointwise_grad,
        name="conv_head",
    )(x)
    x = nn.silu(bn("bn2")(x, train=train))
    features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    head = create_head(self.embedding_size, features.shape[-1], dtype, "fc")
    out = head(features.astype(dtype))
    return out.astype(jnp.float32)


def create(arch: str, **kwargs: Any) -> TinyFaR:
  """Builds TinyFaR-A/B/C.

  Args:
    arch: one of `ARCHS`.
    **kwargs: `TinyFaR` attributes to override (JSON-serialisable).

  Returns:
    The Flax module.
  """
  if arch not in MULTIPLIERS:
    raise ValueError(f"unknown TinyFaR architecture {arch!r}; known: {ARCHS}")
  width, depth = MULTIPLIERS[arch]
  config = dict(width_multiplier=width, depth_multiplier=depth)
  config.update(kwargs)
  if str(config.get("dtype", "float32")) not in ("float32", "bfloat16"):
    raise ValueError(
        f"{arch}: dtype must be 'float32' or 'bfloat16', got {config['dtype']!r}"
    )
  # Checked here too (not only at trace time) so that a config or model.json
  # mistake is reported when the module is built.
  errors.check_choice(
      config.get("depthwise_method", "slices"),
      DEPTHWISE_METHODS,
      "depthwise_method",
  )
  errors.check_choice(
      config.get("pointwise_grad", "matmul"),
      layers.POINTWISE_GRADS,
      "pointwise_grad",
  )
  return TinyFaR(**config)


def count_params(params: Any) -> int:
  """Number of scalars in a parameter tree (arrays or ShapeDtypeStructs).

  Args:
    params: e.g. `variables['params']`; running statistics are not params.

  Returns:
    The total element count.
  """
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def count_arch_params(arch: str, image_size: int = 112, **kwargs: Any) -> int:
  """Parameter count of `arch` from shapes alone (`jax.eval_shape`).

  Args:
    arch: one of `ARCHS`.
    image_size: input side (the count does not depend on it).
    **kwargs: constructor overrides, as for `create`.

  Returns:
    The number of trainable parameters, head included.
  """
  module = create(arch, **kwargs)
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  shapes = jax.eval_shape(module.init, jax.random.key(0), x)
  return count_params(shapes["params"])
