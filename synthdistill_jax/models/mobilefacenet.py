"""MobileFaceNet (insightface's `mbf`) in Flax.

A port of insightface `recognition/arcface_torch/backbones/mobilefacenet.py`
(itself adapted from cavaface; Chen et al., "MobileFaceNets", 2018). The
structure, including upstream's fixed inner widths (the `groups` argument
of its `DepthWise`/`Residual`, independent of `scale`), is kept so that
converted checkpoints give the same embeddings:

* stem conv3x3 s2 (64*scale) -> a grouped conv3x3 (groups 64) or a residual
  stage; then DepthWise s2 / Residual stages of `blocks` depth-wise blocks;
* `conv_sep` 1x1 to 512 with PReLU, then the GDC head: depth-wise 7x7 valid
  conv + BN, flatten, Linear without bias, BatchNorm1d.

Submodule names follow the PyTorch keys with `.<digit>` written `_<digit>`
(`layers.2.layers.1.layers.0` is `layers_2/layers_1/layers_0`).
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from synthdistill_jax.models import layers

ARCHS = ("mobilefacenet",)

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


class ConvBlock(nn.Module):
  """Conv (no bias) -> BN [-> PReLU]: upstream `ConvBlock` / `LinearBlock`.

  Attributes:
    features: output channels.
    kernel: square kernel size.
    stride: conv stride.
    padding: symmetric padding.
    groups: conv groups.
    linear: no PReLU (upstream's `LinearBlock`).
    bn_eps: BatchNorm epsilon.
    gain: init variance times fan_in; default 2 before a PReLU, else 1.
      Eval-mode BatchNorm at init is the identity, so the init alone keeps
      the random network's activations at a moderate scale.
    dtype: compute dtype.
  """

  features: int
  kernel: int = 1
  stride: int = 1
  padding: int = 0
  groups: int = 1
  linear: bool = False
  bn_eps: float = 1e-5
  gain: float | None = None
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    gain = self.gain or (1.0 if self.linear else 2.0)
    x = nn.Conv(
        self.features,
        (self.kernel, self.kernel),
        strides=(self.stride, self.stride),
        padding=layers.torch_padding(self.kernel, self.padding),
        feature_group_count=self.groups,
        use_bias=False,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.initializers.variance_scaling(gain, "fan_in", "normal"),
        conv_general_dilated=layers.conv_or_matmul,
        name="layers_0",
    )(x)
    x = layers.BatchNorm(
        epsilon=self.bn_eps, dtype=self.dtype, name="layers_1"
    )(x, train=train)
    if not self.linear:
      x = layers.PReLU(dtype=self.dtype, name="layers_2")(x)
    return x


class DepthWise(nn.Module):
  """1x1 expand -> depth-wise 3x3 (stride) -> 1x1 linear, optional residual.

  Attributes:
    features: output channels.
    groups: inner (expanded) width, also the depth-wise conv's groups.
    stride: stride of the depth-wise conv.
    residual: add the input to the output.
    bn_eps: BatchNorm epsilon.
    branch_gain: init gain of the last (linear) conv.
    dtype: compute dtype.
  """

  features: int
  groups: int
  stride: int = 1
  residual: bool = False
  bn_eps: float = 1e-5
  branch_gain: float = 1.0
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    common = dict(bn_eps=self.bn_eps, dtype=self.dtype)
    y = ConvBlock(self.groups, name="layers_0", **common)(x, train=train)
    y = ConvBlock(
        self.groups,
        kernel=3,
        stride=self.stride,
        padding=1,
        groups=self.groups,
        name="layers_1",
        **common,
    )(y, train=train)
    y = ConvBlock(
        self.features,
        linear=True,
        gain=self.branch_gain,
        name="layers_2",
        **common,
    )(y, train=train)
    return x + y if self.residual else y


class Residual(nn.Module):
  """`num_blocks` residual `DepthWise` blocks at constant width.

  Attributes:
    features: channels.
    num_blocks: number of blocks.
    groups: inner width of each block.
    bn_eps: BatchNorm epsilon.
    branch_gain: init gain of each block's last conv.
    dtype: compute dtype.
    remat: rematerialise each block (see `layers.remat_block`).
  """

  features: int
  num_blocks: int
  groups: int
  bn_eps: float = 1e-5
  branch_gain: float = 1.0
  dtype: layers.Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    for i in range(self.num_blocks):
      x = layers.remat_block(DepthWise, self.remat)(
          self.features,
          self.groups,
          residual=True,
          bn_eps=self.bn_eps,
          branch_gain=self.branch_gain,
          dtype=self.dtype,
          name=f"layers_{i}",
      )(x, train)
    return x


class GDC(nn.Module):
  """Global depth-wise conv head: dw 7x7 + BN, flatten, FC, BN1d (float32).

  Attributes:
    embedding_size: output size.
    bn_eps: BatchNorm epsilon.
  """

  embedding_size: int = 512
  bn_eps: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    x = ConvBlock(
        x.shape[-1],
        kernel=7,
        groups=x.shape[-1],
        linear=True,
        bn_eps=self.bn_eps,
        name="layers_0",
    )(x, train=train)
    # PyTorch's flatten order (C, H, W); the map is 1x1 at 112 input anyway.
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
    x = nn.Dense(
        self.embedding_size,
        use_bias=False,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        name="layers_2",
    )(x)
    return layers.BatchNorm(epsilon=self.bn_eps, name="layers_3")(
        x, train=train
    )


class MobileFaceNet(nn.Module):
  """MobileFaceNet: NHWC 112x112 face crops -> raw float32 embeddings.

  Attributes:
    num_features: embedding size.
    blocks: residual blocks of the four stages ((1, 4, 6, 2) for `mbf`,
      (2, 8, 12, 4) for upstream's `mbf_large`).
    scale: width multiplier of the stages (2 for `mbf`, 4 for `mbf_large`).
    bn_eps: BatchNorm epsilon.
    dtype: compute dtype of the trunk ('float32', 'bfloat16', 'float16');
      `conv_sep` and the GDC head run in float32, as upstream's fp16 mode.
    remat: recompute each depth-wise block's activations in the backward
      pass (less memory when training, about one more forward of compute).
  """

  num_features: int = 512
  blocks: Sequence[int] = (1, 4, 6, 2)
  scale: int = 2
  bn_eps: float = 1e-5
  dtype: str = "float32"
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Embeds a batch.

    Args:
      x: [B, 112, 112, 3] normalised face crops.
      train: batch statistics instead of running statistics.

    Returns:
      [B, num_features] float32 embeddings, not L2-normalised.
    """
    dtype = jnp.dtype(self.dtype)
    common = dict(bn_eps=self.bn_eps, dtype=dtype)
    # Each residual branch adds about 1/depth of the variance at init.
    residual = dict(common, branch_gain=1.0 / sum(self.blocks))
    c1, c2 = 64 * self.scale, 128 * self.scale
    x = x.astype(dtype)
    x = ConvBlock(c1, 3, 2, 1, name="layers_0", **common)(x, train=train)
    if self.blocks[0] == 1:
      stage0 = ConvBlock(c1, 3, 1, 1, groups=64, name="layers_1", **common)
    else:
      stage0 = Residual(
          c1, self.blocks[0], 128, remat=self.remat, name="layers_1", **residual
      )
    x = stage0(x, train=train)
    # (module, out channels, inner width) as upstream hard-codes them.
    stages = (
        (DepthWise, c1, 128),
        (Residual, c1, 128),
        (DepthWise, c2, 256),
        (Residual, c2, 256),
        (DepthWise, c2, 512),
        (Residual, c2, 256),
    )
    for i, (kind, features, groups) in enumerate(stages):
      name = f"layers_{i + 2}"
      if kind is DepthWise:
        block = layers.remat_block(DepthWise, self.remat)(
            features, groups, 2, name=name, **common
        )
        x = block(x, train)
      else:
        block = Residual(
            features,
            self.blocks[i // 2 + 1],
            groups,
            remat=self.remat,
            name=name,
            **residual,
        )
        x = block(x, train=train)
    x = ConvBlock(512, bn_eps=self.bn_eps, name="conv_sep")(
        x.astype(jnp.float32), train=train
    )
    return GDC(self.num_features, self.bn_eps, name="features")(x, train=train)


def create(arch: str, **kwargs) -> MobileFaceNet:
  """Builds a MobileFaceNet.

  Args:
    arch: 'mobilefacenet'.
    **kwargs: `MobileFaceNet` attributes to override (`num_features`,
      `blocks`, `scale`, `bn_eps`, `dtype`).

  Returns:
    The (unbound) module.
  """
  if arch not in ARCHS:
    raise ValueError(
        f"unknown MobileFaceNet architecture {arch!r}; known: {ARCHS[0]}"
    )
  kwargs = dict(kwargs)
  kwargs["blocks"] = tuple(kwargs.get("blocks", (1, 4, 6, 2)))
  if len(kwargs["blocks"]) != 4:
    raise ValueError(f"{arch}: blocks needs 4 entries, got {kwargs['blocks']}")
  dtype = kwargs.get("dtype", "float32")
  if dtype not in COMPUTE_DTYPES:
    raise ValueError(
        f"{arch}: dtype={dtype!r} is not one of {', '.join(COMPUTE_DTYPES)}"
    )
  unknown = set(kwargs) - set(MobileFaceNet.__dataclass_fields__)
  if unknown:
    raise ValueError(
        f"{arch}: unknown argument(s) {', '.join(sorted(unknown))}"
    )
  return MobileFaceNet(**kwargs)
