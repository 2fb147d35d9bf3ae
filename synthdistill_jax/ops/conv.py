"""StyleGAN2 convolutions in NHWC: resampling conv, modulated conv, bias_act.

Follows NVIDIA's `conv2d_resample`, `modulated_conv2d` and `bias_act`
(NVlabs/stylegan3 `torch_utils/ops/` and `training/networks_stylegan2.py`,
"Analyzing and Improving the Image Quality of StyleGAN", Karras et al. 2020,
arXiv 1912.04958) with weights in Flax's HWIO layout. Up-sampling is a true
convolution of the zero-inserted input (PyTorch's transposed conv) done as an
lhs-dilated conv with the spatially flipped kernel, then the FIR filter.
"""

import jax
import jax.numpy as jnp
import numpy as np

from synthdistill_jax import errors
from synthdistill_jax.ops import upfirdn2d as upfirdn2d_lib

# How an up-sampling conv runs (`conv2d_resample`): 'dilated' is one conv of
# the zero-inserted input, XLA's transposed-conv form (cuDNN's and the TPU's
# native path); 'phases' computes each of the `up ** 2` output phases as a
# plain conv of the input with its sub-kernel and interleaves them, which
# skips the zeros: on XLA:CPU the dilated form takes a generic path.
UPSAMPLE_METHODS = ("dilated", "phases")

# Default gain and slope of the activations StyleGAN uses.
ACTIVATIONS = {"linear": 1.0, "lrelu": float(np.sqrt(2.0))}
LRELU_SLOPE = 0.2


def bias_act(
    x: jax.Array,
    b: jax.Array | None,
    *,
    act: str = "linear",
    gain: float | None = None,
    clamp: float | None = None,
) -> jax.Array:
  """Adds a bias over the last axis, activates, scales and clamps.

  Args:
    x: `[..., channels]`.
    b: `[channels]` or None.
    act: 'linear' or 'lrelu' (slope 0.2).
    gain: multiplier after the activation; the activation's own gain
      (1 or sqrt(2)) when None.
    clamp: clamp the result to `[-clamp, clamp]`; None = no clamp.

  Returns:
    An array like `x`.
  """
  if act not in ACTIVATIONS:
    raise ValueError(f"unknown activation {act!r}")
  if b is not None:
    x = x + b.astype(x.dtype)
  if act == "lrelu":
    x = jnp.where(x >= 0, x, x * LRELU_SLOPE)
  gain = ACTIVATIONS[act] if gain is None else gain
  if gain != 1:
    x = x * gain
  if clamp is not None:
    x = jnp.clip(x, -clamp, clamp)
  return x


def _conv(x, w, *, padding, groups, lhs_dilation=(1, 1), precision=None):
  """A plain NHWC/HWIO convolution (correlation) with explicit padding."""
  return jax.lax.conv_general_dilated(
      x,
      w,
      window_strides=(1, 1),
      padding=padding,
      lhs_dilation=lhs_dilation,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=groups,
      precision=precision,
  )


def transposed_conv_phases(
    x: jax.Array, w: jax.Array, *, up: int, groups: int = 1, precision=None
) -> jax.Array:
  """The full transposed conv `y[up*i + t] += x[i] * w[t]`, phase by phase.

  Equal, up to rounding, to the lhs-dilated conv of `x` with the flipped `w`
  and padding `k - 1` (PyTorch's `conv_transpose2d` with stride `up`, no
  padding): output phase `a` of an axis (outputs `up*m + a`) only meets the
  taps `w[a], w[a + up], ...`, so it is a plain correlation of `x` with those
  taps reversed. Each of the `up ** 2` phases is one such conv on the input
  grid; no multiply by the inserted zeros.

  Args:
    x: `[batch, h, w, in_channels]`.
    w: HWIO `[kh, kw, in_channels / groups, out_channels]`.
    up: the stride of the transposed conv.
    groups: feature groups.
    precision: `jax.lax.Precision` of the convolutions.

  Returns:
    `[batch, up * (h - 1) + kh, up * (w - 1) + kw, out_channels]`.
  """
  batch, height, width, _ = x.shape
  kh, kw, _, out_ch = w.shape
  # Phase `a` has ceil((k - a) / up) taps; phase 0 the most. Every phase
  # has `height + rows - 1` output rows: a phase of `t` taps pads `t - 1`
  # rows before and `rows - 1` after, as the conv's own padding (no padded
  # copy of `x` per phase).
  rows, cols = -(-kh // up), -(-kw // up)
  out_h, out_w = height + rows - 1, width + cols - 1
  phases = []
  for a in range(up):
    for b in range(up):
      # Reversed: window row r of a phase meets tap a + up * (taps - 1 - r).
      k = w[a::up, b::up][::-1, ::-1]
      if k.shape[0] == 0 or k.shape[1] == 0:  # a phase no tap reaches
        phases.append(jnp.zeros((batch, out_h, out_w, out_ch), x.dtype))
        continue
      padding = ((k.shape[0] - 1, rows - 1), (k.shape[1] - 1, cols - 1))
      phases.append(
          _conv(x, k, padding=padding, groups=groups, precision=precision)
      )
  y = jnp.stack(phases, axis=3).reshape(batch, out_h, out_w, up, up, out_ch)
  y = y.transpose(0, 1, 3, 2, 4, 5).reshape(batch, up * out_h, up * out_w, -1)
  return y[:, : up * (height - 1) + kh, : up * (width - 1) + kw]


def conv2d_resample(
    x: jax.Array,
    w: jax.Array,
    *,
    f=None,
    up: int = 1,
    padding: int = 0,
    groups: int = 1,
    precision=None,
    filter_method: str = "slices",
    upsample_method: str = "dilated",
) -> jax.Array:
  """Convolution with optional FIR upsampling, as NVIDIA's `conv2d_resample`.

  For `up == 1` this is a correlation with `w` (`torch.nn.functional.conv2d`).
  For `up > 1` it is the official transposed-conv path: a true convolution of
  the zero-inserted input (lhs-dilated conv with the flipped kernel), then
  the FIR filter `f` with gain `up ** 2`.

  Args:
    x: `[batch, h, w, in_channels]`.
    w: HWIO kernel `[kh, kw, in_channels / groups, out_channels]`.
    f: FIR filter for upsampling (see `upfirdn2d.setup_filter`).
    up: integer upsampling factor.
    padding: padding with respect to the upsampled image.
    groups: feature groups.
    precision: `jax.lax.Precision` of the convolutions.
    filter_method: how the FIR filter is applied (`upfirdn2d.FILTER_METHODS`).
    upsample_method: how the transposed conv runs (`UPSAMPLE_METHODS`).

  Returns:
    `[batch, h * up, w * up, out_channels]` (for odd kernels with
    `padding = k // 2`).
  """
  kh, kw = w.shape[:2]
  if up == 1:
    return _conv(
        x,
        w,
        padding=((padding, padding), (padding, padding)),
        groups=groups,
        precision=precision,
    )
  taps = np.shape(f)[-1]
  # Official padding bookkeeping for the transposed-conv path.
  p0 = padding + (taps + up - 1) // 2
  p1 = padding + (taps - up) // 2
  px0, px1 = p0 - (kw - 1), p1 - (kw - up)
  py0, py1 = p0 - (kh - 1), p1 - (kh - up)
  errors.check_choice(upsample_method, UPSAMPLE_METHODS, "upsample_method")
  if upsample_method == "phases":
    x = transposed_conv_phases(x, w, up=up, groups=groups, precision=precision)
  else:
    x = _conv(
        x,
        jnp.flip(w, axis=(0, 1)),
        padding=((kh - 1, kh - 1), (kw - 1, kw - 1)),
        lhs_dilation=(up, up),
        groups=groups,
        precision=precision,
    )
  return upfirdn2d_lib.upfirdn2d(
      x,
      f,
      padding=(px0, px1, py0, py1),
      gain=up**2,
      precision=precision,
      method=filter_method,
  )


def modulated_conv2d(
    x: jax.Array,
    weight: jax.Array,
    styles: jax.Array,
    *,
    noise: jax.Array | None = None,
    up: int = 1,
    resample_filter=None,
    demodulate: bool = True,
    fused: bool = False,
    precision=None,
    filter_method: str = "slices",
    upsample_method: str = "dilated",
) -> jax.Array:
  """StyleGAN2 modulated (and demodulated) convolution, NHWC.

  Two formulations with the same result up to rounding: `fused` builds one
  kernel per sample and runs a grouped conv (`feature_group_count=batch`);
  the default scales the input by the styles, runs one shared-weight conv and
  scales the output by the demodulation coefficients (much faster on CPU and
  with large batches).

  Args:
    x: `[batch, h, w, in_channels]` in the compute dtype.
    weight: HWIO `[k, k, in_channels, out_channels]`, float32.
    styles: `[batch, in_channels]`, float32.
    noise: added after the conv (broadcastable to the output) or None.
    up: 1, or 2 for the upsampling conv.
    resample_filter: FIR filter used when `up > 1`.
    demodulate: normalise every output channel of every sample's kernel.
    fused: use the grouped-conv formulation.
    precision: `jax.lax.Precision` of the convolutions.
    filter_method: how the FIR filter is applied when `up > 1`
      (`upfirdn2d.FILTER_METHODS`).
    upsample_method: how the transposed conv runs when `up > 1`
      (`UPSAMPLE_METHODS`).

  Returns:
    `[batch, h * up, w * up, out_channels]` in the dtype of `x`.
  """
  batch = x.shape[0]
  kh, kw, in_ch, out_ch = weight.shape
  dtype = x.dtype
  if dtype != jnp.float32 and demodulate:
    # Pre-normalise to avoid overflow in reduced precision (as upstream
    # does for fp16); demodulation cancels both factors.
    w_max = jnp.max(jnp.abs(weight), axis=(0, 1, 2), keepdims=True)
    weight = weight * (1 / np.sqrt(in_ch * kh * kw) / w_max)
    styles = styles / jnp.max(jnp.abs(styles), axis=1, keepdims=True)
  padding = kh // 2
  conv_kwargs = dict(
      f=resample_filter,
      up=up,
      padding=padding,
      filter_method=filter_method,
      upsample_method=upsample_method,
  )
  if not fused:
    x = x * styles.astype(dtype)[:, None, None, :]
    x = conv2d_resample(
        x, weight.astype(dtype), precision=precision, **conv_kwargs
    )
    if demodulate:
      # sum_{k,i} (w[k,i,o] s[b,i])^2 = s^2 @ sum_k w^2, one small matmul.
      sq = jnp.sum(jnp.square(weight), axis=(0, 1))
      dcoefs = jax.lax.rsqrt(
          jnp.matmul(jnp.square(styles), sq, precision=precision) + 1e-8
      )
      x = x * dcoefs.astype(dtype)[:, None, None, :]
    if noise is not None:
      x = x + noise.astype(dtype)
    return x
  w = weight[None] * styles[:, None, None, :, None]  # [B, kh, kw, I, O]
  if demodulate:
    dcoefs = jax.lax.rsqrt(jnp.sum(jnp.square(w), axis=(1, 2, 3)) + 1e-8)
    w = w * dcoefs[:, None, None, None, :]
  h, wd = x.shape[1:3]
  x = x.transpose(1, 2, 0, 3).reshape(1, h, wd, batch * in_ch)
  w = w.transpose(1, 2, 3, 0, 4).reshape(kh, kw, in_ch, batch * out_ch)
  x = conv2d_resample(
      x, w.astype(dtype), groups=batch, precision=precision, **conv_kwargs
  )
  ho, wo = x.shape[1:3]
  x = x.reshape(ho, wo, batch, out_ch).transpose(2, 0, 1, 3)
  if noise is not None:
    x = x + noise.astype(dtype)
  return x
