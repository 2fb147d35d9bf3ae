"""Upsample, FIR-filter and downsample 2D images (NHWC), in pure `jax.lax`.

The same operation as `upfirdn2d` of NVIDIA's StyleGAN code (reference
implementation in `torch_utils/ops/upfirdn2d.py` of NVlabs/stylegan3), with
the image in NHWC layout:

  1. upsample by inserting `up - 1` zeros after every pixel;
  2. pad (or crop, for negative amounts) by `padding`;
  3. convolve every channel with the FIR filter `f` (a true convolution unless
     `flip_filter`), scaled by `gain`;
  4. keep every `down`-th pixel.

Steps 1-2 are one `lax.pad` (interior padding inserts the zeros). Steps 3-4
are, for a concrete filter, a weighted sum of shifted strided slices with the
taps as constants (`method='slices'`, the default: one fused elementwise
loop; two 1D passes for a separable filter), or depthwise
`lax.conv_general_dilated` calls (`method='conv'`, also used for a traced
filter). XLA:CPU runs depthwise grouped convs very slowly: the slices are ~40x
faster at StyleGAN2-256 sizes (docs/stylegan2.md, "Speed work"). The method is
an argument, not a module setting, so that it is part of what a jitted caller
traces. Either way the op is jit-able, differentiable and runs on any backend.
"""

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from synthdistill_jax import errors

# The low-pass filter of StyleGAN2 (binomial, [1,3,3,1]).
DEFAULT_FILTER = (1, 3, 3, 1)


def setup_filter(
    f: Sequence[float] = DEFAULT_FILTER,
    *,
    normalize: bool = True,
    separable: bool = False,
) -> np.ndarray:
  """Builds a FIR filter the way NVIDIA's `upfirdn2d.setup_filter` does.

  Args:
    f: 1D taps (or a 2D array).
    normalize: scale the filter to sum 1.
    separable: keep a 1D filter 1D (applied along both axes) instead of
      taking the outer product. Both give the same result up to rounding.

  Returns:
    float32 numpy filter, 1D `[taps]` or 2D `[taps, taps]`.
  """
  f = np.asarray(f, np.float32)
  if f.ndim == 0:
    f = f[np.newaxis]
  if f.ndim == 1 and not separable:
    f = np.outer(f, f)
  if normalize:
    # A separable 1D filter is applied twice, so it is normalised on its own.
    f = f / f.sum()
  return f.astype(np.float32)


def _parse_padding(padding) -> tuple[int, int, int, int]:
  """`padding` as (x0, x1, y0, y1), as in the official op."""
  if isinstance(padding, int):
    return padding, padding, padding, padding
  padding = tuple(int(p) for p in padding)
  if len(padding) == 2:
    px, py = padding
    return px, px, py, py
  if len(padding) == 4:
    return padding
  raise ValueError(f"padding must have 1, 2 or 4 entries, got {padding}")


# How the filter is applied: 'slices' (a weighted sum of shifted, strided
# slices, the default: XLA:CPU runs depthwise grouped convs an order of
# magnitude slower) or 'conv' (depthwise `feature_group_count` convs).
FILTER_METHODS = ("slices", "conv")


def _depthwise(x: jax.Array, k: jax.Array, strides, precision) -> jax.Array:
  """Applies the same `[kh, kw]` kernel to every channel of NHWC `x`."""
  channels = x.shape[-1]
  kernel = jnp.broadcast_to(k[:, :, None, None], k.shape + (1, channels))
  return jax.lax.conv_general_dilated(
      x,
      kernel,
      window_strides=strides,
      padding="VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=channels,
      precision=precision,
  )


def weighted_window_sum(x: jax.Array, weight, kh: int, kw: int, strides):
  """`sum_ij weight(i, j) * x[:, i::sy, j::sx, :]` over a `kh x kw` window.

  A depthwise VALID correlation written as shifted strided slices: XLA fuses
  the slices and the weighted sum into one elementwise loop, and its
  gradient is pads and adds (XLA:CPU runs depthwise grouped convs an order
  of magnitude slower). Accumulates in float32 at least, as the conv does
  for bfloat16, and returns `x.dtype`.

  Args:
    x: `[batch, h, w, channels]`, already padded.
    weight: `weight(i, j)` gives the tap's multiplier (a scalar, or
      per-channel `[channels]`), or None for a zero tap (skipped).
    kh: window height.
    kw: window width.
    strides: `(sy, sx)`.

  Returns:
    `[batch, (h - kh) // sy + 1, (w - kw) // sx + 1, channels]`.
  """
  sy, sx = strides
  b, h, w, c = x.shape
  out_h, out_w = (h - kh) // sy + 1, (w - kw) // sx + 1
  acc = jnp.promote_types(x.dtype, jnp.float32)
  shape = (b, out_h, out_w, c)
  xa = jax.lax.convert_element_type(x, acc)
  out = None
  # `lax` ops, not `jnp` operators: a depthwise conv's forward and input
  # gradient are 2 x k*k of these per layer, and each `jnp` operator costs a
  # nested jit's tracing machinery (the TinyFaR-A step: 15 % less tracing).
  for i in range(kh):
    for j in range(kw):
      tap_weight = weight(i, j)
      if tap_weight is None:
        continue
      tap = jax.lax.slice(
          xa,
          (0, i, j, 0),
          (b, i + sy * (out_h - 1) + 1, j + sx * (out_w - 1) + 1, c),
          (1, sy, sx, 1),
      )
      tap_weight = jax.lax.convert_element_type(tap_weight, acc)
      dims = () if tap_weight.ndim == 0 else (3,)
      term = jax.lax.mul(tap, jax.lax.broadcast_in_dim(tap_weight, shape, dims))
      out = term if out is None else jax.lax.add(out, term)
  if out is None:
    return jnp.zeros(shape, x.dtype)
  return jax.lax.convert_element_type(out, x.dtype)


def _filter(x, k, strides, precision, method):
  """Applies kernel `k` to every channel with `method` (see `upfirdn2d`)."""
  if method == "slices" and not isinstance(k, jax.core.Tracer):
    k = np.asarray(k, np.float32)
    return weighted_window_sum(
        x,
        lambda i, j: None if k[i, j] == 0 else k[i, j],
        k.shape[0],
        k.shape[1],
        strides,
    )
  return _depthwise(x, jnp.asarray(k, x.dtype), strides, precision)


def upfirdn2d(
    x: jax.Array,
    f,
    *,
    up: int = 1,
    down: int = 1,
    padding=0,
    flip_filter: bool = False,
    gain: float = 1.0,
    precision=None,
    method: str = "slices",
) -> jax.Array:
  """Pad, upsample, filter and downsample a batch of NHWC images.

  Args:
    x: `[batch, height, width, channels]`.
    f: FIR filter, 1D (separable) or 2D `[fh, fw]`; None = identity.
    up: integer upsampling factor (both axes).
    down: integer downsampling factor (both axes).
    padding: int, `(px, py)` or `(x0, x1, y0, y1)`; negative values crop.
      Counted on the upsampled image, as in the official op.
    flip_filter: False = convolution, True = correlation.
    gain: overall gain of the filter (`up ** 2` keeps the signal level when
      upsampling).
    precision: `jax.lax.Precision` of the filter convolution.
    method: 'slices' (shifted-slice sums with the taps as constants) or
      'conv' (depthwise grouped convs); a traced filter always takes 'conv'.

  Returns:
    `[batch, out_h, out_w, channels]` with
    `out = (in * up + pad0 + pad1 - taps + down) // down`.
  """
  errors.check_choice(method, FILTER_METHODS, "method")
  if f is None:
    f = np.ones([1, 1], np.float32)
  if not isinstance(f, jax.core.Tracer):
    # A concrete filter stays numpy: its taps become compile-time constants.
    f = np.asarray(f, np.float32)
  xp = np if isinstance(f, np.ndarray) else jnp
  if f.ndim not in (1, 2):
    raise ValueError(f"filter must be 1D or 2D, got shape {f.shape}")
  px0, px1, py0, py1 = _parse_padding(padding)
  if up > 1 or any((px0, px1, py0, py1)):
    # Interior padding inserts the zeros; the trailing `up - 1` zeros after
    # the last pixel are part of the upsampled image in the official op.
    zero = jnp.zeros((), x.dtype)
    config = [
        (0, 0, 0),
        (py0, py1 + up - 1, up - 1),
        (px0, px1 + up - 1, up - 1),
        (0, 0, 0),
    ]
    x = jax.lax.pad(x, zero, config)
  f = f * np.float32(gain ** (f.ndim / 2))
  if not flip_filter:
    f = xp.flip(f, axis=tuple(range(f.ndim)))
  if f.ndim == 2:
    return _filter(x, f, (down, down), precision, method)
  x = _filter(x, f[None, :], (1, down), precision, method)
  return _filter(x, f[:, None], (down, 1), precision, method)


def upsample2d(
    x: jax.Array,
    f,
    *,
    up: int = 2,
    gain: float | None = None,
    precision=None,
    method: str = "slices",
) -> jax.Array:
  """Upsamples NHWC images by `up` with the FIR filter `f` (official pads).

  Args:
    x: `[batch, height, width, channels]`.
    f: FIR filter, 1D (separable) or 2D.
    up: integer factor.
    gain: filter gain, `up ** 2` by default.
    precision: `jax.lax.Precision` of the filter convolution.
    method: how the filter is applied (see `upfirdn2d`).

  Returns:
    `[batch, height * up, width * up, channels]`.
  """
  taps = np.shape(f)[-1]
  padding = ((taps + up - 1) // 2, (taps - up) // 2)
  return upfirdn2d(
      x,
      f,
      up=up,
      padding=(padding[0], padding[1], padding[0], padding[1]),
      gain=up**2 if gain is None else gain,
      precision=precision,
      method=method,
  )
