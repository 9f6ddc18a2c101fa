"""Optional paper-like streams: torchvision's VGG-16 and ResNet-50 trunks, ImageNet weights from a local file.

The paper correlates two different ImageNet CNNs; these are the classic pair. Their weights are not
packaged and nothing is ever downloaded: the user passes torchvision's own state-dict file (as
``torch.hub`` saves it, e.g. ``vgg16-397923af.pth``, ``resnet50-0676ba61.pth``) or a ``.safetensors``
file with the same keys. torchvision is imported only when one of these streams is built, so the
default model does not pay its import time.
"""

from __future__ import annotations

import logging
import os
import pickle  # only for its exception type: nothing here unpickles
from pathlib import Path

import torch
from torch import nn

from reid.errors import CheckpointError
from reid.model.streams import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

VGG16_FILES = ("vgg16-397923af.pth",)
RESNET50_FILES = ("resnet50-0676ba61.pth", "resnet50-11ad3fa6.pth")


def _expected(arch: str, files: tuple[str, ...]) -> str:
    return f"expected torchvision's {arch} state dict ({' or '.join(files)}) or a .safetensors file with its keys"


def require_weights_file(path: str | os.PathLike, arch: str, files: tuple[str, ...]) -> Path:
    """``path`` as a Path; CheckpointError when no such file exists."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{arch} weights file {path} does not exist; {_expected(arch, files)}")
    return path


def read_weights_file(path: str | os.PathLike, arch: str, files: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file or of a tensors-only torch file; never unpickles other objects."""
    path = require_weights_file(path, arch, files)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {path} (corrupt or truncated safetensors file: {e}); "
                                  f"{_expected(arch, files)}") from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refused to read {path}: torch.load(weights_only=True) rejects it (corrupt, or it holds pickled "
            f"objects other than tensors); {_expected(arch, files)}"
        ) from e
    except Exception as e:  # torch raises RuntimeError, EOFError... for files that are not torch files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read {path} ({first}); {_expected(arch, files)}") from e
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"{path} does not hold a flat state dict of tensors; {_expected(arch, files)}")
    return dict(state)


def load_torchvision_weights(stream: nn.Module, path: str | os.PathLike, *, arch: str, files: tuple[str, ...],
                             classifier: str) -> None:
    """Load a torchvision state dict into ``stream`` (whose keys are torchvision's) without its classifier.

    Every trunk tensor must be present with its shape; BatchNorm's ``num_batches_tracked`` counters
    may be absent (older torchvision files predate them) and keep their value.
    """
    state = {k: v for k, v in read_weights_file(path, arch, files).items() if not k.startswith(classifier)}
    expected = stream.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit torchvision's {arch}: {len(missing)} trunk tensors missing {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}; {_expected(arch, files)}"
        )
    wrong = [k for k, v in state.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        k = wrong[0]
        raise CheckpointError(
            f"{path} does not fit torchvision's {arch}: {k} has shape {tuple(state[k].shape)}, the trunk needs "
            f"{tuple(expected[k].shape)} ({len(wrong)} mismatched tensors); {_expected(arch, files)}"
        )
    stream.load_state_dict(state, strict=False)
    log.info("loaded %s weights from %s", arch, path)


class _ImageNetNormalised(nn.Module):
    """ImageNet mean/std as non-persistent buffers (never in place on the caller's tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class VGG16Stream(_ImageNetNormalised):
    """torchvision's VGG-16 ``features`` (13 convs, no BN); output stride 16 drops the last max-pool. 512 channels.

    Its max-pools floor odd sizes where the other streams round up, so ModelConfig only allows input
    sizes that are multiples of the output stride with this stream.
    """

    out_channels = 512

    def __init__(self, *, output_stride: int = 16, weights: str | os.PathLike | None = None) -> None:
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        if output_stride not in (16, 32):
            raise ValueError(f"output_stride must be 16 or 32, not {output_stride}")
        features = make_layers(cfgs["D"], batch_norm=False)
        for m in features.modules():  # torchvision VGG.__init__'s initialisation of these layers
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        if output_stride == 16:
            features = features[:30]  # without features.30, the last max-pool; keeps torchvision's indices and keys
        self.features = features
        if weights is not None:
            load_torchvision_weights(self, weights, arch="vgg16", files=VGG16_FILES, classifier="classifier.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: RGB in [0, 1], [B,3,H,W] -> [B,512,H/s,W/s] (H, W multiples of s)."""
        return self.features(self.normalise(x))


class ResNet50Stream(_ImageNetNormalised):
    """torchvision's ResNet-50 conv1..layer4 under torchvision's names; output stride 16 sets the last stride
    to 1 (layer4.0's 3x3 conv and its downsample). 2048 channels."""

    out_channels = 2048

    def __init__(self, *, output_stride: int = 16, weights: str | os.PathLike | None = None) -> None:
        super().__init__()
        from torchvision.models import resnet50

        if output_stride not in (16, 32):
            raise ValueError(f"output_stride must be 16 or 32, not {output_stride}")
        net = resnet50()
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        if output_stride == 16:
            self.layer4[0].conv2.stride = (1, 1)
            self.layer4[0].downsample[0].stride = (1, 1)
        if weights is not None:
            load_torchvision_weights(self, weights, arch="resnet50", files=RESNET50_FILES, classifier="fc.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: RGB in [0, 1], [B,3,H,W] -> [B,2048,H/s,W/s] (each stride-2 layer rounds up)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.normalise(x)))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))
