"""IResNet face-recognition backbones (ArcFace teachers) in Flax.

A port of insightface's `recognition/arcface_torch/backbones/iresnet.py`
(Deng et al., "ArcFace", CVPR 2019; Duta et al., "Improved Residual Networks",
ICPR 2020), kept numerically faithful so converted PyTorch checkpoints give
the same embeddings:

* stem: conv3x3 stride 1 -> BatchNorm -> per-channel PReLU, no max-pool;
* four stages of `BasicBlock`s, each stage starting with stride 2
  (112 -> 56 -> 28 -> 14 -> 7);
* block: BN -> conv3x3 -> BN -> PReLU -> conv3x3 (the stride is here) -> BN,
  plus the shortcut (conv1x1 + BN in the first block of a stage), no
  activation after the sum;
* head: BN2d -> flatten in PyTorch's NCHW (C, H, W) order -> Linear ->
  BatchNorm1d. The output is the raw embedding, not L2-normalised.

Submodule names follow the PyTorch state-dict keys with `.<digit>` written
as `_<digit>` (`layer1.0.downsample.1` is `layer1_0/downsample_1`), so the
converter in `synthdistill_jax.convert.face` maps names mechanically.
"""

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from synthdistill_jax.models import layers

ARCHS = ("iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200")
# Parameters an optimiser must leave alone: insightface initialises the final
# BatchNorm1d's weight to 1 and sets `requires_grad = False`, so a trained
# IResNet keeps it at 1 (PyTorch's Adam skips parameters without gradients).
FROZEN_PARAMS = (("features", "scale"),)

# Blocks per stage, as insightface's iresnet18 ... iresnet200 build them.
STAGE_BLOCKS = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
    "iresnet200": (6, 26, 60, 6),
}

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def _conv(
    features: int,
    kernel: int,
    *,
    gain: float,
    stride: int = 1,
    dtype: layers.Dtype = jnp.float32,
    name: str,
) -> nn.Conv:
  """A PyTorch-padded conv whose random init has variance `gain / fan_in`.

  Eval-mode BatchNorm at init is the identity (running stats 0 and 1), so
  the init alone must keep activations at a moderate scale: He gain 2 before
  a PReLU, gain 1 for linear convs, and a small gain on the last conv of
  each residual branch so that depth does not blow the scale up (a
  randomly initialised IResNet serves as the demo teacher).
  """
  return nn.Conv(
      features,
      (kernel, kernel),
      strides=(stride, stride),
      padding=layers.torch_padding(kernel),
      use_bias=False,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=nn.initializers.variance_scaling(gain, "fan_in", "normal"),
      name=name,
  )


class BasicBlock(nn.Module):
  """insightface's `IBasicBlock` (pre-activation style, stride on conv2).

  Attributes:
    features: output channels of the block.
    stride: stride of the second 3x3 conv and of the shortcut conv.
    bn_eps: BatchNorm epsilon.
    branch_gain: init gain of the branch's last conv (see `_conv`).
    dtype: compute dtype.
  """

  features: int
  stride: int = 1
  bn_eps: float = 1e-5
  branch_gain: float = 1.0
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    bn = functools.partial(
        layers.BatchNorm, epsilon=self.bn_eps, dtype=self.dtype
    )
    conv = functools.partial(_conv, self.features, dtype=self.dtype)
    out = bn(name="bn1")(x, train=train)
    out = conv(3, gain=2.0, name="conv1")(out)
    out = bn(name="bn2")(out, train=train)
    out = layers.PReLU(dtype=self.dtype, name="prelu")(out)
    out = conv(3, gain=self.branch_gain, stride=self.stride, name="conv2")(out)
    out = bn(name="bn3")(out, train=train)
    # Same condition as upstream `_make_layer`: a projection shortcut when
    # the shape changes (always the first block of a stage).
    if self.stride != 1 or x.shape[-1] != self.features:
      x = conv(1, gain=1.0, stride=self.stride, name="downsample_0")(x)
      x = bn(name="downsample_1")(x, train=train)
    return out + x


class IResNet(nn.Module):
  """IResNet backbone: NHWC face crops -> raw float32 embeddings.

  Attributes:
    layers: blocks per stage, e.g. (3, 13, 30, 3) for IResNet-100.
    widths: channels of the four stages (the stem has `widths[0]`).
    embedding_size: size of the output embedding.
    bn_eps: BatchNorm epsilon (1e-5 for arcface_torch models, 2e-5 for the
      old MXNet ones).
    dropout: dropout rate before the FC layer (train mode only; needs a
      'dropout' rng when > 0).
    input_size: side of the square input; the FC input size depends on it.
    dtype: compute dtype of the trunk ('float32', 'bfloat16' or 'float16');
      the head (BN, flatten, FC, BN) always runs in float32.
    remat: recompute each block's activations in the backward pass (less
      memory when training a student, about one more forward of compute).
  """

  layers: Sequence[int] = STAGE_BLOCKS["iresnet100"]
  widths: Sequence[int] = (64, 128, 256, 512)
  embedding_size: int = 512
  bn_eps: float = 1e-5
  dropout: float = 0.0
  input_size: int = 112
  dtype: str = "float32"
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Embeds a batch.

    Args:
      x: [B, input_size, input_size, 3] normalised face crops.
      train: batch statistics (and running-stat updates, with
        `mutable=['batch_stats']`) instead of running statistics.

    Returns:
      [B, embedding_size] float32 embeddings, not L2-normalised.
    """
    dtype = jnp.dtype(self.dtype)
    x = x.astype(dtype)
    x = _conv(self.widths[0], 3, gain=2.0, dtype=dtype, name="conv1")(x)
    x = layers.BatchNorm(epsilon=self.bn_eps, dtype=dtype, name="bn1")(
        x, train=train
    )
    x = layers.PReLU(dtype=dtype, name="prelu")(x)
    for stage, (blocks, width) in enumerate(zip(self.layers, self.widths)):
      for i in range(blocks):
        x = layers.remat_block(BasicBlock, self.remat)(
            width,
            stride=2 if i == 0 else 1,
            bn_eps=self.bn_eps,
            # Each branch adds about 1/depth of the input variance.
            branch_gain=1.0 / sum(self.layers),
            dtype=dtype,
            name=f"layer{stage + 1}_{i}",
        )(x, train)
    return self._embed(x, train)

  def _embed(self, x: jax.Array, train: bool) -> jax.Array:
    """The float32 head: BN2d -> NCHW flatten -> (dropout) -> FC -> BN1d."""
    x = layers.BatchNorm(epsilon=self.bn_eps, name="bn2")(x, train=train)
    # PyTorch flattens (C, H, W); transposing here lets the FC weight be
    # used as stored.
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
    if self.dropout > 0:
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = nn.Dense(
        self.embedding_size,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        name="fc",
    )(x)
    return layers.BatchNorm(epsilon=self.bn_eps, name="features")(
        x, train=train
    )


def create(arch: str, **kwargs) -> IResNet:
  """Builds an IResNet.

  Args:
    arch: one of `ARCHS`; sets the default blocks per stage.
    **kwargs: `IResNet` attributes to override (`layers`, `widths`,
      `embedding_size`, `bn_eps`, `dropout`, `input_size`, `dtype`). Lists
      (as read back from JSON) are accepted for the sequences.

  Returns:
    The (unbound) module.
  """
  if arch not in STAGE_BLOCKS:
    raise ValueError(
        f"unknown IResNet architecture {arch!r}; known: {', '.join(ARCHS)}"
    )
  kwargs = dict(kwargs)
  kwargs["layers"] = tuple(kwargs.get("layers", STAGE_BLOCKS[arch]))
  kwargs["widths"] = tuple(kwargs.get("widths", (64, 128, 256, 512)))
  if len(kwargs["layers"]) != 4 or len(kwargs["widths"]) != 4:
    raise ValueError(
        f"{arch}: layers and widths need 4 entries, got"
        f" layers={kwargs['layers']} widths={kwargs['widths']}"
    )
  dtype = kwargs.get("dtype", "float32")
  if dtype not in COMPUTE_DTYPES:
    raise ValueError(
        f"{arch}: dtype={dtype!r} is not one of {', '.join(COMPUTE_DTYPES)}"
    )
  if kwargs.get("input_size", 112) % 16:
    raise ValueError(
        f"{arch}: input_size={kwargs['input_size']} is not a multiple of 16"
    )
  unknown = set(kwargs) - set(IResNet.__dataclass_fields__)
  if unknown:
    raise ValueError(
        f"{arch}: unknown argument(s) {', '.join(sorted(unknown))}"
    )
  return IResNet(**kwargs)
