"""MobileNetV2 and EfficientNet-Lite0 in plain PyTorch, with torchvision's and timm's parameter names.

Written here instead of imported because torchvision + timm cost about two seconds of import time,
which is most of a one-shot ``reid query``. The module trees (and so every state-dict key) are
those of torchvision's ``mobilenet_v2().features`` and timm's ``tf_efficientnet_lite0``, so weights
and checkpoints move freely between them; the streams' tests check the ImageNet behaviour.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def pad_same(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int],
             dilation: tuple[int, int] = (1, 1)) -> torch.Tensor:
    """TensorFlow "same" padding: output = ceil(input / stride), the odd pixel padded at the end."""
    pads = []
    for size, k, s, d in zip(x.shape[-2:], kernel, stride, dilation, strict=True):
        pads.append(max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0))
    ph, pw = pads
    if ph or pw:
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
    return x


class Conv2dSame(nn.Conv2d):
    """A strided conv with TensorFlow "same" padding computed from the input size at run time."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm followed by an activation, one module (timm's layout: the BN's keys, no extra ones)."""

    def __init__(self, channels: int, *, eps: float, act: bool) -> None:
        super().__init__(channels, eps=eps)
        self.drop = nn.Identity()
        self.act = nn.ReLU6(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


# --- MobileNetV2 (torchvision layout) ------------------------------------------------------------


def _conv_bn_relu6(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True),
    )


class MobileNetV2Block(nn.Module):
    """torchvision's InvertedResidual: [1x1 expand] -> 3x3 depthwise -> 1x1 linear projection (+ skip)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [_conv_bn_relu6(cin, hidden, kernel=1)]
        layers += [_conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


# (expansion t, channels c, repeats n, first stride s), as in the MobileNetV2 paper.
_MOBILENET_V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                        (6, 160, 3, 2), (6, 320, 1, 1))


def mobilenet_v2_trunk(init: bool = True) -> nn.Sequential:
    """The 19 layers of torchvision's ``mobilenet_v2().features`` (width 1.0); ``init=False`` when weights
    are loaded next (He initialisation of every conv is a noticeable part of a one-shot query)."""
    layers: list[nn.Module] = [_conv_bn_relu6(3, 32, stride=2)]
    cin = 32
    for t, c, n, s in _MOBILENET_V2_STAGES:
        for i in range(n):
            layers.append(MobileNetV2Block(cin, c, s if i == 0 else 1, t))
            cin = c
    layers.append(_conv_bn_relu6(cin, 1280, kernel=1))
    trunk = nn.Sequential(*layers)
    if init:
        _init(trunk)
    return trunk


# --- EfficientNet-Lite0 (timm tf_efficientnet_lite0 layout) --------------------------------------

_TF_BN_EPS = 1e-3


def _tf_conv(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """timm's padding='same': static symmetric padding at stride 1, run-time TF padding when strided."""
    if stride == 1:
        return nn.Conv2d(cin, cout, kernel, 1, (kernel - 1) // 2, groups=groups, bias=False)
    return Conv2dSame(cin, cout, kernel, stride, 0, groups=groups, bias=False)


class DepthwiseSeparable(nn.Module):
    """timm's DepthwiseSeparableConv (EfficientNet stage 0): depthwise -> BN-ReLU6 -> 1x1 -> BN."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.conv_dw = _tf_conv(cin, cin, kernel, stride, groups=cin)
        self.bn1 = BatchNormAct2d(cin, eps=_TF_BN_EPS, act=True)
        self.conv_pw = _tf_conv(cin, cout, 1)
        self.bn2 = BatchNormAct2d(cout, eps=_TF_BN_EPS, act=False)
        self.has_skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv_pw(self.bn1(self.conv_dw(x))))
        return x + y if self.has_skip else y


class InvertedResidual(nn.Module):
    """timm's InvertedResidual without squeeze-excitation (the Lite variants drop it)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.conv_pw = _tf_conv(cin, hidden, 1)
        self.bn1 = BatchNormAct2d(hidden, eps=_TF_BN_EPS, act=True)
        self.conv_dw = _tf_conv(hidden, hidden, kernel, stride, groups=hidden)
        self.bn2 = BatchNormAct2d(hidden, eps=_TF_BN_EPS, act=True)
        self.conv_pwl = _tf_conv(hidden, cout, 1)
        self.bn3 = BatchNormAct2d(cout, eps=_TF_BN_EPS, act=False)
        self.has_skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))
        y = self.bn3(self.conv_pwl(y))
        return x + y if self.has_skip else y


# (kernel, stride, expansion, channels, repeats) per stage of EfficientNet-B0 / Lite0.
_LITE0_STAGES = ((3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3), (5, 1, 6, 112, 3),
                 (5, 2, 6, 192, 4), (3, 1, 6, 320, 1))


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (ReLU6, no squeeze-excitation, fixed stem/head) as an ImageNet classifier."""

    def __init__(self, num_classes: int = 1000, *, init: bool = True) -> None:
        super().__init__()
        self.conv_stem = _tf_conv(3, 32, 3, stride=2)
        self.bn1 = BatchNormAct2d(32, eps=_TF_BN_EPS, act=True)
        stages, cin = [], 32
        for k, s, e, c, n in _LITE0_STAGES:
            blocks = []
            for i in range(n):
                stride = s if i == 0 else 1
                blocks.append(DepthwiseSeparable(cin, c, k, stride) if e == 1
                              else InvertedResidual(cin, c, k, stride, e))
                cin = c
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.conv_head = _tf_conv(cin, 1280, 1)
        self.bn2 = BatchNormAct2d(1280, eps=_TF_BN_EPS, act=True)
        self.classifier = nn.Linear(1280, num_classes)
        if init:
            _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised image [B,3,H,W] -> class logits [B, num_classes]."""
        x = self.bn2(self.conv_head(self.blocks(self.bn1(self.conv_stem(x)))))
        return self.classifier(x.mean((2, 3)))


def _init(module: nn.Module) -> None:
    """He-normal convs, unit BNs, small linear layers (what the random-weight streams start from)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
