"""PyTorch re-statements of the face networks, for export only.

Their `state_dict()` keys, order and shapes equal the reference code's, so
`load_state_dict(strict=True)` accepts checkpoints of:

* insightface `arcface_torch/backbones/iresnet.py` (`iresnet18` ... `200`);
* insightface `arcface_torch/backbones/mobilefacenet.py` (`get_mbf`);
* SynthDistill's `LightNetwork`: timm 0.6 `tinynet_a/b/c` (`num_classes=0`)
  under `cnn.` plus `fc = Linear(1280, 512)`.

timm itself is not used (its torchvision dependency does not import with
every torch build); the TinyNet block shapes come from
`synthdistill_jax.models.tinynet.build_block_specs`, the same table the Flax
model uses, and the golden cases check both against the official outputs.
Constructor arguments are the Flax models' (`model.json` kwargs), so
`create(arch, **kwargs)` builds the twin of a saved JAX model. Inputs are
NCHW float32, normalised as each network expects.
"""

from typing import Any, Sequence

import torch
from torch import nn

from synthdistill_jax.models import iresnet as flax_iresnet
from synthdistill_jax.models import tinynet as flax_tinynet

# Flax-only constructor arguments that change nothing in eval-mode PyTorch.
_IGNORED = ("dtype", "dropout", "remat")


def _conv(cin, cout, kernel, stride=1, padding=0, groups=1, bias=False):
  return nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=bias)


# ----------------------------------------------------------------------------
# IResNet (insightface).


class IBasicBlock(nn.Module):
  """BN -> conv3x3 -> BN -> PReLU -> conv3x3 (stride) -> BN, + shortcut."""

  def __init__(self, cin: int, cout: int, stride: int, eps: float):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(cin, eps=eps)
    self.conv1 = _conv(cin, cout, 3, 1, 1)
    self.bn2 = nn.BatchNorm2d(cout, eps=eps)
    self.prelu = nn.PReLU(cout)
    self.conv2 = _conv(cout, cout, 3, stride, 1)
    self.bn3 = nn.BatchNorm2d(cout, eps=eps)
    self.downsample = None
    if stride != 1 or cin != cout:
      self.downsample = nn.Sequential(
          _conv(cin, cout, 1, stride), nn.BatchNorm2d(cout, eps=eps)
      )

  def forward(self, x):
    out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
    shortcut = x if self.downsample is None else self.downsample(x)
    return out + shortcut


class IResNet(nn.Module):
  """insightface IResNet; head BN2d -> flatten (C,H,W) -> Linear -> BN1d."""

  def __init__(
      self,
      layers: Sequence[int],
      widths: Sequence[int] = (64, 128, 256, 512),
      embedding_size: int = 512,
      bn_eps: float = 1e-5,
      input_size: int = 112,
  ):
    super().__init__()
    self.conv1 = _conv(3, widths[0], 3, 1, 1)
    self.bn1 = nn.BatchNorm2d(widths[0], eps=bn_eps)
    self.prelu = nn.PReLU(widths[0])
    cin = widths[0]
    for stage, (blocks, width) in enumerate(zip(layers, widths), 1):
      stage_blocks = []
      for i in range(blocks):
        stage_blocks.append(IBasicBlock(cin, width, 2 if i == 0 else 1, bn_eps))
        cin = width
      setattr(self, f"layer{stage}", nn.Sequential(*stage_blocks))
    self.bn2 = nn.BatchNorm2d(cin, eps=bn_eps)
    side = input_size // 16
    self.fc = nn.Linear(cin * side * side, embedding_size)
    self.features = nn.BatchNorm1d(embedding_size, eps=bn_eps)

  def forward(self, x):
    x = self.prelu(self.bn1(self.conv1(x)))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    x = torch.flatten(self.bn2(x), 1)
    return self.features(self.fc(x))


# ----------------------------------------------------------------------------
# MobileFaceNet (insightface `mbf`).


class ConvBlock(nn.Module):
  """`layers = Sequential(conv, BN[, PReLU])` (upstream ConvBlock/LinearBlock)."""

  def __init__(
      self,
      cin,
      cout,
      kernel=1,
      stride=1,
      padding=0,
      groups=1,
      linear=False,
      eps=1e-5,
  ):
    super().__init__()
    parts = [
        _conv(cin, cout, kernel, stride, padding, groups),
        nn.BatchNorm2d(cout, eps=eps),
    ]
    if not linear:
      parts.append(nn.PReLU(cout))
    self.layers = nn.Sequential(*parts)

  def forward(self, x):
    return self.layers(x)


class DepthWise(nn.Module):
  """1x1 -> depth-wise 3x3 (stride) -> linear 1x1, optional residual."""

  def __init__(self, cin, cout, groups, stride, residual, eps):
    super().__init__()
    self.residual = residual
    self.layers = nn.Sequential(
        ConvBlock(cin, groups, eps=eps),
        ConvBlock(groups, groups, 3, stride, 1, groups=groups, eps=eps),
        ConvBlock(groups, cout, linear=True, eps=eps),
    )

  def forward(self, x):
    y = self.layers(x)
    return x + y if self.residual else y


class Residual(nn.Module):
  """`num_blocks` residual DepthWise blocks."""

  def __init__(self, channels, num_blocks, groups, eps):
    super().__init__()
    self.layers = nn.Sequential(
        *[
            DepthWise(channels, channels, groups, 1, True, eps)
            for _ in range(num_blocks)
        ]
    )

  def forward(self, x):
    return self.layers(x)


class GDC(nn.Module):
  """dw 7x7 linear block, flatten, Linear (no bias), BatchNorm1d."""

  def __init__(self, embedding_size, eps):
    super().__init__()
    self.layers = nn.Sequential(
        ConvBlock(512, 512, 7, groups=512, linear=True, eps=eps),
        nn.Flatten(),
        nn.Linear(512, embedding_size, bias=False),
        nn.BatchNorm1d(embedding_size, eps=eps),
    )

  def forward(self, x):
    return self.layers(x)


class MobileFaceNet(nn.Module):
  """insightface `get_mbf(fp16=False, num_features, blocks, scale)`."""

  def __init__(
      self,
      num_features: int = 512,
      blocks: Sequence[int] = (1, 4, 6, 2),
      scale: int = 2,
      bn_eps: float = 1e-5,
  ):
    super().__init__()
    c1, c2, eps = 64 * scale, 128 * scale, bn_eps
    stem = [ConvBlock(3, c1, 3, 2, 1, eps=eps)]
    if blocks[0] == 1:
      stem.append(ConvBlock(c1, c1, 3, 1, 1, groups=64, eps=eps))
    else:
      stem.append(Residual(c1, blocks[0], 128, eps))
    # Upstream's inner widths (128, 256, 512) do not follow `scale`.
    self.layers = nn.ModuleList(
        stem
        + [
            DepthWise(c1, c1, 128, 2, False, eps),
            Residual(c1, blocks[1], 128, eps),
            DepthWise(c1, c2, 256, 2, False, eps),
            Residual(c2, blocks[2], 256, eps),
            DepthWise(c2, c2, 512, 2, False, eps),
            Residual(c2, blocks[3], 256, eps),
        ]
    )
    self.conv_sep = ConvBlock(c2, 512, eps=eps)
    self.features = GDC(num_features, eps)

  def forward(self, x):
    for layer in self.layers:
      x = layer(x)
    return self.features(self.conv_sep(x))


# ----------------------------------------------------------------------------
# TinyFaR: timm TinyNet (EfficientNet-B0 blocks) + fc.


class SqueezeExcite(nn.Module):
  """timm SE: mean -> conv_reduce -> SiLU -> conv_expand -> sigmoid gate."""

  def __init__(self, channels, reduced):
    super().__init__()
    self.conv_reduce = nn.Conv2d(channels, reduced, 1, bias=True)
    self.conv_expand = nn.Conv2d(reduced, channels, 1, bias=True)

  def forward(self, x):
    s = x.mean((2, 3), keepdim=True)
    s = self.conv_expand(nn.functional.silu(self.conv_reduce(s)))
    return x * torch.sigmoid(s)


def _same_padding(kernel, stride):
  # timm's symmetric PyTorch padding: ((stride - 1) + (kernel - 1)) // 2.
  return ((stride - 1) + (kernel - 1)) // 2


class EfficientNetBlock(nn.Module):
  """timm `DepthwiseSeparableConv` ('ds') or `InvertedResidual` ('ir')."""

  def __init__(self, spec: flax_tinynet.BlockSpec, eps: float):
    super().__init__()
    self.spec = spec
    pad = _same_padding(spec.kernel, spec.stride)
    mid = spec.mid_chs
    dw = _conv(mid, mid, spec.kernel, spec.stride, pad, groups=mid)
    if spec.kind == "ds":
      self.conv_dw = dw
      self.bn1 = nn.BatchNorm2d(spec.mid_chs, eps=eps)
      self.se = SqueezeExcite(spec.mid_chs, spec.se_chs)
      self.conv_pw = _conv(spec.mid_chs, spec.out_chs, 1)
      self.bn2 = nn.BatchNorm2d(spec.out_chs, eps=eps)
    else:
      self.conv_pw = _conv(spec.in_chs, spec.mid_chs, 1)
      self.bn1 = nn.BatchNorm2d(spec.mid_chs, eps=eps)
      self.conv_dw = dw
      self.bn2 = nn.BatchNorm2d(spec.mid_chs, eps=eps)
      self.se = SqueezeExcite(spec.mid_chs, spec.se_chs)
      self.conv_pwl = _conv(spec.mid_chs, spec.out_chs, 1)
      self.bn3 = nn.BatchNorm2d(spec.out_chs, eps=eps)

  def forward(self, x):
    silu = nn.functional.silu
    if self.spec.kind == "ds":
      y = self.se(silu(self.bn1(self.conv_dw(x))))
      y = self.bn2(self.conv_pw(y))
    else:
      y = silu(self.bn1(self.conv_pw(x)))
      y = self.se(silu(self.bn2(self.conv_dw(y))))
      y = self.bn3(self.conv_pwl(y))
    return y + x if self.spec.has_skip else y


class TinyNet(nn.Module):
  """timm `tinynet_*` with `num_classes=0`: pooled head features."""

  def __init__(self, module: flax_tinynet.TinyFaR):
    super().__init__()
    eps = module.bn_eps
    self.conv_stem = _conv(3, module.stem_size, 3, 2, 1)
    self.bn1 = nn.BatchNorm2d(module.stem_size, eps=eps)
    specs = module.block_specs()
    self.blocks = nn.Sequential(
        *[
            nn.Sequential(*[EfficientNetBlock(s, eps) for s in stage])
            for stage in specs
        ]
    )
    last = specs[-1][-1].out_chs
    self.conv_head = _conv(last, module.head_features(), 1)
    self.bn2 = nn.BatchNorm2d(module.head_features(), eps=eps)

  def forward(self, x):
    silu = nn.functional.silu
    x = self.blocks(silu(self.bn1(self.conv_stem(x))))
    return silu(self.bn2(self.conv_head(x))).mean((2, 3))


class LightNetwork(nn.Module):
  """SynthDistill's student: `fc(cnn(x))`."""

  def __init__(self, module: flax_tinynet.TinyFaR):
    super().__init__()
    self.cnn = TinyNet(module)
    self.fc = nn.Linear(module.head_features(), module.embedding_size)

  def forward(self, x):
    return self.fc(self.cnn(x))


# ----------------------------------------------------------------------------


def create(arch: str, **kwargs: Any) -> nn.Module:
  """The PyTorch twin of `synthdistill_jax.models.create_model(arch, **kw)`.

  Args:
    arch: 'iresnet18' ... 'iresnet200', 'mobilefacenet', 'tinyfar_a/b/c'.
    **kwargs: the Flax model's constructor arguments (from `model.json`).

  Returns:
    The module in eval mode, float32, with uninitialised weights: load a
    state dict into it.
  """
  kwargs = {k: v for k, v in kwargs.items() if k not in _IGNORED}
  if arch in flax_iresnet.STAGE_BLOCKS:
    layers = kwargs.pop("layers", flax_iresnet.STAGE_BLOCKS[arch])
    model = IResNet(layers, **kwargs)
  elif arch == "mobilefacenet":
    model = MobileFaceNet(**kwargs)
  elif arch in flax_tinynet.ARCHS:
    model = LightNetwork(flax_tinynet.create(arch, **kwargs))
  else:
    raise ValueError(f"no PyTorch export for architecture {arch!r}")
  return model.eval()
