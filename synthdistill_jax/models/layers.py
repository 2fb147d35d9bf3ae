"""Layers shared by the face networks, with PyTorch semantics.

Flax's defaults differ from PyTorch where the ported checkpoints care:
`nn.BatchNorm` updates its running variance with the biased batch variance
(PyTorch uses the unbiased one), and `nn.PReLU` has a single slope (PyTorch's
`nn.PReLU(C)` has one per channel). Convolutions take explicit symmetric
padding because PyTorch's `padding=1` is not Flax's 'SAME' on strided convs.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from synthdistill_jax import errors

Dtype = Any


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def normalize_batch(
    x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float
) -> jax.Array:
  """`(x - mean) / sqrt(var + epsilon) * scale + bias` with batch statistics.

  The statistics are over every axis but the last (biased variance, as
  PyTorch normalises in train mode). The gradient is written out: the two
  per-channel sums `sum(dy)` and `sum(dy * x_hat)` and one elementwise pass
  for `dx`, where autodiff of the mean and variance gives XLA more distinct
  fusions to compile (TinyFaR-A's step: 1,878 -> 1,646; docs/performance.md).
  As a `jax.custom_vjp` it has reverse-mode derivatives only: forward mode
  (`jax.jvp`) through a network in train mode is not supported.

  Args:
    x: `[..., C]` float32.
    scale: `[C]`.
    bias: `[C]`.
    epsilon: added to the variance.

  Returns:
    An array like `x`.
  """
  return _normalize_batch_fwd(x, scale, bias, epsilon)[0]


def batch_moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-channel mean and biased variance over every axis but the last."""
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(x, axis=axes)
  return mean, jnp.mean(jnp.square(x - mean), axis=axes)


def _normalize_batch_fwd(x, scale, bias, epsilon):
  mean, var = batch_moments(x)
  inv_std = jax.lax.rsqrt(var + epsilon)
  mul = inv_std * scale
  return x * mul + (bias - mean * mul), (x, mean, inv_std, scale)


def _normalize_batch_bwd(epsilon, residuals, dy):
  del epsilon  # In `inv_std` already.
  x, mean, inv_std, scale = residuals
  axes = tuple(range(x.ndim - 1))
  count = x.size // x.shape[-1]
  x_hat = (x - mean) * inv_std
  d_bias = jnp.sum(dy, axis=axes)
  d_scale = jnp.sum(dy * x_hat, axis=axes)
  # The batch mean and variance depend on every x: their part of dx is the
  # mean of dy and of dy * x_hat taken back out.
  dx = (scale * inv_std) * (dy - (d_bias + x_hat * d_scale) / count)
  return dx, d_scale, d_bias


normalize_batch.defvjp(_normalize_batch_fwd, _normalize_batch_bwd)


class BatchNorm(nn.Module):
  """BatchNorm over the last axis with PyTorch's train/eval semantics.

  Train mode normalises with the biased batch variance and updates the running
  statistics as `r = (1 - momentum) * r + momentum * batch`, with the
  *unbiased* batch variance for `var` (as `torch.nn.BatchNorm*d` does). Eval
  mode uses the running statistics. Statistics are computed in float32
  whatever the compute dtype.

  Attributes:
    momentum: PyTorch momentum (weight of the new batch statistic).
    epsilon: added to the variance; 1e-5 in PyTorch, 2e-5 in old MXNet models.
    use_scale: whether there is a learned scale (`weight` in PyTorch).
    use_bias: whether there is a learned offset (`bias` in PyTorch).
    dtype: compute dtype of the output.
  """

  momentum: float = 0.1
  epsilon: float = 1e-5
  use_scale: bool = True
  use_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    features = x.shape[-1]
    ra_mean = self.variable(
        "batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32)
    )
    ra_var = self.variable(
        "batch_stats", "var", lambda: jnp.ones((features,), jnp.float32)
    )
    x32 = x.astype(jnp.float32)
    scale = bias = None
    if self.use_scale:
      scale = self.param("scale", nn.initializers.ones, (features,))
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (features,))
    if train:
      if not self.is_initializing():
        # The running statistics carry no gradient; XLA computes these sums
        # once with `normalize_batch`'s own.
        mean, var = batch_moments(jax.lax.stop_gradient(x32))
        n = x32.size // features
        unbiased = var * (n / max(n - 1, 1))
        m = self.momentum
        ra_mean.value = (1.0 - m) * ra_mean.value + m * mean
        ra_var.value = (1.0 - m) * ra_var.value + m * unbiased
      y = normalize_batch(
          x32,
          jnp.ones((features,), jnp.float32) if scale is None else scale,
          jnp.zeros((features,), jnp.float32) if bias is None else bias,
          self.epsilon,
      )
      return y.astype(self.dtype)
    # Fold the normalisation into one multiply-add per element.
    mul = jax.lax.rsqrt(ra_var.value + self.epsilon)
    if scale is not None:
      mul = mul * scale
    add = -ra_mean.value * mul
    if bias is not None:
      add = add + bias
    return (x32 * mul + add).astype(self.dtype)


class PReLU(nn.Module):
  """Per-channel PReLU, as `torch.nn.PReLU(num_parameters=C)`.

  Attributes:
    init_slope: initial negative slope (PyTorch's default 0.25).
    dtype: compute dtype of the output.
  """

  init_slope: float = 0.25
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    alpha = self.param(
        "alpha", nn.initializers.constant(self.init_slope), (x.shape[-1],)
    )
    x = x.astype(self.dtype)
    return jnp.where(x >= 0, x, alpha.astype(self.dtype) * x)


def remat_block(block_cls, enabled: bool):
  """`block_cls`, rematerialised in the backward pass when `enabled`.

  The block's activations are then recomputed during differentiation instead
  of being kept from the forward pass: less memory for a student's backward
  at the cost of about one more forward. Parameter names are unchanged. The
  block must take `train` as its second positional argument (it is static).

  Args:
    block_cls: a Flax module class called as `block(x, train)`.
    enabled: whether to wrap it.

  Returns:
    The class to instantiate.
  """
  return nn.remat(block_cls, static_argnums=(2,)) if enabled else block_cls


def torch_padding(kernel_size: int, padding: int | None = None):
  """Explicit symmetric padding of a PyTorch conv (default: `k // 2`)."""
  p = kernel_size // 2 if padding is None else padding
  return ((p, p), (p, p))


_NHWC = ("NHWC", "HWIO", "NHWC")


# How the weight gradient of a 1x1 conv run as a matmul is computed:
# 'matmul', autodiff's one dot over every pixel; 'blocked', dots over blocks
# of `POINTWISE_BLOCK_ROWS` pixels summed afterwards. XLA:CPU lays one
# operand of the single dot out transposed, and that copy reads the
# activations with a stride of the channel count (10 ms of a 215 ms
# TinyFaR-A step for one 56x56x96 layer); a block's transpose stays in cache.
POINTWISE_GRADS = ("matmul", "blocked")
POINTWISE_BLOCK_ROWS = 512


def _pointwise(x: jax.Array, w: jax.Array, precision=None) -> jax.Array:
  """`x [..., Cin] @ w [Cin, Cout]`, contracting the channels."""
  return jax.lax.dot_general(
      x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=precision
  )


def _row_block(rows: int) -> int:
  """The largest divisor of `rows` up to `POINTWISE_BLOCK_ROWS`."""
  return max(
      d for d in range(1, min(rows, POINTWISE_BLOCK_ROWS) + 1) if rows % d == 0
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def pointwise_blocked(x: jax.Array, w: jax.Array, precision=None):
  """`_pointwise(x, w)` whose weight gradient sums per-block matmuls.

  `dw = sum_b x_b^T dy_b` over blocks `b` of at most `POINTWISE_BLOCK_ROWS`
  pixels (a batched dot, then a sum over the blocks); the input gradient is
  the plain `dy @ w^T`. Same values as autodiff's up to float rounding.

  Args:
    x: `[..., Cin]` activations.
    w: `[Cin, Cout]` weights.
    precision: `lax.dot_general` precision.

  Returns:
    `[..., Cout]`.
  """
  return _pointwise(x, w, precision)


def _pointwise_blocked_fwd(x, w, precision):
  return _pointwise(x, w, precision), (x, w)


def _pointwise_blocked_bwd(precision, residuals, dy):
  x, w = residuals
  dx = jax.lax.dot_general(
      dy, w, (((dy.ndim - 1,), (1,)), ((), ())), precision=precision
  )
  cin, cout = w.shape
  rows = x.size // cin
  block = _row_block(rows)
  # A block too small to amortise its dot (a prime pixel count, say) or
  # the whole batch in one block: the single dot.
  if block == rows or block * 4 < POINTWISE_BLOCK_ROWS:
    xb, dyb = x.reshape(1, rows, cin), dy.reshape(1, rows, cout)
  else:
    xb = x.reshape(rows // block, block, cin)
    dyb = dy.reshape(rows // block, block, cout)
  dw = jax.lax.dot_general(
      xb,
      dyb,
      (((1,), (1,)), ((0,), (0,))),
      precision=precision,
      preferred_element_type=jnp.float32,
  )
  return dx.astype(x.dtype), jnp.sum(dw, axis=0).astype(w.dtype)


pointwise_blocked.defvjp(_pointwise_blocked_fwd, _pointwise_blocked_bwd)


def conv_or_matmul(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    precision=None,
    pointwise_grad: str = "matmul",
) -> jax.Array:
  """`lax.conv_general_dilated`, with 1x1 stride-1 NHWC convs as matmuls.

  For those the result is the same contraction over input channels, but
  XLA:CPU runs the weight gradient of a convolution by copying the
  activations to `[C, H, W, N]` first (a tenth of a TinyFaR step); a
  matmul's gradient contracts the activations in place. `pointwise_grad`
  (`POINTWISE_GRADS`) picks how the matmul's weight gradient is computed.
  """
  pointwise = (
      rhs.shape[:2] == (1, 1)
      and feature_group_count == 1
      and all(s == 1 for s in window_strides)
      and not isinstance(padding, str)
      and all(tuple(p) == (0, 0) for p in padding)
      and all(d == 1 for d in (lhs_dilation or (1, 1)))
      and all(d == 1 for d in (rhs_dilation or (1, 1)))
      and dimension_numbers
      == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
  )
  if not pointwise:
    return jax.lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        precision=precision,
    )
  errors.check_choice(pointwise_grad, POINTWISE_GRADS, "pointwise_grad")
  if pointwise_grad == "blocked":
    return pointwise_blocked(lhs, rhs[0, 0], precision)
  return _pointwise(lhs, rhs[0, 0], precision)


def conv(
    features: int,
    kernel_size: int,
    *,
    stride: int = 1,
    padding: int | None = None,
    groups: int = 1,
    use_bias: bool = False,
    dtype: Dtype = jnp.float32,
    pointwise_grad: str = "matmul",
    name: str | None = None,
) -> nn.Conv:
  """A `nn.Conv` laid out like `torch.nn.Conv2d` (NHWC, HWIO kernel).

  A PyTorch kernel `[out, in/groups, kh, kw]` maps to this one by
  `w.transpose(2, 3, 1, 0)`. 1x1 stride-1 convs run as matmuls whose weight
  gradient is computed as `pointwise_grad` says (`conv_or_matmul`).
  """
  return nn.Conv(
      features,
      (kernel_size, kernel_size),
      strides=(stride, stride),
      padding=torch_padding(kernel_size, padding),
      feature_group_count=groups,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
      conv_general_dilated=functools.partial(
          conv_or_matmul, pointwise_grad=pointwise_grad
      ),
      name=name,
  )
