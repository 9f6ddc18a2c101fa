"""AttentionBilinearNet: our reconstruction of Wu & Wang 2017, "Where to Focus: Deep Attention-based
Spatially Recurrent Bilinear Networks for Fine-Grained Visual Recognition" (arXiv 1709.05769).

The paper gives the architecture only in outline, so every size below is our choice (a config field):
two CNN streams (MobileNetV2, EfficientNet-Lite0; optionally torchvision's VGG-16 or ResNet-50 with
weights from a local file) -> per-location bilinear pooling -> 2-D spatial LSTM
(two scan directions) -> soft attention over locations (K glimpses) -> linear -> BatchNorm1d (BNNeck).
``forward`` returns L2-normalised embeddings; ``forward_train`` adds the pre-BN feature and logits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from pathlib import Path
from dataclasses import dataclass
from typing import Any, NamedTuple
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from reid.errors import CheckpointError, InputError
from reid.model.attention import LocationAttention
from reid.model.bilinear import LocalBilinear
from reid.model.fusion import fuse_for_inference, tensor_signature
from reid.model.spatial_lstm import SpatialLSTM2d
from reid.model.streams import StreamA, StreamB, grid_size
from reid.model.torchvision_streams import (RESNET50_FILES, VGG16_FILES, ResNet50Stream, VGG16Stream,
                                            require_weights_file)

log = logging.getLogger(__name__)

ARCH = "attention-bilinear-v1"
PACKAGED_STREAMS = ("mobilenet_v2", "efficientnet_lite0")  # ImageNet weights ship with the dependencies
FILE_STREAMS = ("vgg16", "resnet50")  # torchvision trunks; ImageNet weights only from a file the user has
STREAMS = PACKAGED_STREAMS + FILE_STREAMS


@dataclass(frozen=True)
class ModelConfig:
    """Every architectural choice of AttentionBilinearNet; saved as JSON beside the weights."""

    arch: str = ARCH
    input_size: tuple[int, int] = (256, 128)  # (H, W) of the crops the model is built for
    stream_a: str = "mobilenet_v2"
    stream_b: str = "efficientnet_lite0"
    output_stride: int = 16  # 16 = last stride set to 1 (16x8 grid at 256x128); 32 = as in ImageNet
    # Channels after the 1x1 reductions: a wide stream A and a narrow stream B keep the most of what the
    # streams' pools know in c_a * c_b = 1024 bilinear products (reid.train.distill measured 32x32, 64x64,
    # 128x8, 128x16, 256x16 and 256x4 on held-out synthetic and natural crops; 256x4 scored best for its cost).
    c_a: int = 256  # stream A channels after the 1x1 reduction
    c_b: int = 4  # stream B channels after the 1x1 reduction
    # Local bilinear feature after the shared projection (LSTM input). 248 of the LSTM's 2 x 128 units carry
    # it; the shipped head uses one spare unit to count grid rows, which lets the glimpses attend to stripes.
    d_x: int = 248
    d_h: int = 128  # spatial LSTM hidden size per scan direction
    lstm_directions: int = 2
    d_att: int = 128  # attention hidden size
    # K. The shipped head's 4 glimpses start as the 4 horizontal stripes of the grid (reid.train.distill
    # measured 1, 2, 4 and 8 stripes on held-out synthetic and natural crops; 4 scored best on both).
    num_glimpses: int = 4
    # The LSTM's last unit counts grid rows (a fixed positional unit, reid.model.spatial_lstm); the shipped
    # head's glimpses read it to attend to stripes. Configs saved without this field had no counter.
    row_counter: bool = True
    embed_dim: int = 512  # D
    num_classes: int = 0  # identities of the training classifier; 0 = none
    seed: int = 0  # seeds the head's initialisation (and the streams' when not pretrained)

    def __post_init__(self) -> None:
        self._check_streams()
        self._check_geometry()
        for name in ("c_a", "c_b", "d_x", "d_h", "d_att", "num_glimpses", "embed_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        if self.lstm_directions not in (1, 2):
            raise ValueError("lstm_directions must be 1 or 2")
        if self.num_classes < 0:
            raise ValueError("num_classes must be >= 0")

    def _check_streams(self) -> None:
        """ValueError unless arch is this version's and the two streams are known and different."""
        if self.arch != ARCH:
            raise ValueError(f"unknown architecture {self.arch!r}; this version builds {ARCH!r}")
        for role, name in (("a", self.stream_a), ("b", self.stream_b)):
            if name not in STREAMS:
                raise ValueError(f"unknown stream_{role} {name!r}; expected one of: {', '.join(STREAMS)}")
        if self.stream_a == self.stream_b:
            raise ValueError(f"stream_a and stream_b are both {self.stream_a!r}; the model correlates two "
                             f"different CNNs, so choose two different streams")

    def _check_geometry(self) -> None:
        """ValueError unless output_stride and input_size fit each other (and a vgg16 stream)."""
        if self.output_stride not in (16, 32):
            raise ValueError(f"output_stride must be 16 or 32, not {self.output_stride}")
        if len(self.input_size) != 2 or min(self.input_size) < self.output_stride:
            raise ValueError(f"input_size must be (H, W), each at least {self.output_stride}")
        if "vgg16" in (self.stream_a, self.stream_b) and any(v % self.output_stride for v in self.input_size):
            h, w = self.input_size
            raise ValueError(f"with a vgg16 stream, input_size {h}x{w} must be a multiple of output_stride "
                             f"{self.output_stride} on both sides (VGG's max-pools round odd sizes down, the "
                             f"other streams round up, so their grids would differ)")

    @property
    def grid(self) -> tuple[int, int]:
        """(Gh, Gw) of the local-feature grid at input_size."""
        return grid_size(self.input_size, self.output_stride)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["input_size"] = list(self.input_size)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of to_dict; ValueError on unknown fields or invalid values."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config fields: {', '.join(unknown)}")
        d = dict(d)
        d.setdefault("row_counter", False)  # saved before the field existed: no counter
        if "input_size" in d:
            d["input_size"] = tuple(int(v) for v in d["input_size"])
        return cls(**d)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (e.g. num_classes for training)."""
        return dataclasses.replace(self, **changes)


class TrainOutput(NamedTuple):
    """What training needs from one forward pass."""

    features: torch.Tensor  # [B, D] pre-BN feature (triplet loss)
    logits: torch.Tensor | None  # [B, num_classes], or None when num_classes == 0
    attention: torch.Tensor  # [B, K, Gh, Gw], each map sums to 1


class AttentionBilinearNet(nn.Module):
    """Two CNN streams -> per-location bilinear -> 2-D spatial LSTM -> attention -> BNNeck embedding."""

    def __init__(self, config: ModelConfig, *, pretrained: bool = True,
                 stream_weights: Mapping[str, str | os.PathLike | None] | None = None) -> None:
        super().__init__()
        self.config = config
        weights = dict(stream_weights or {})
        self.stream_a = make_stream("a", config.stream_a, output_stride=config.output_stride, pretrained=pretrained,
                                    weights=weights.get("a"))
        self.stream_b = make_stream("b", config.stream_b, output_stride=config.output_stride, pretrained=pretrained,
                                    weights=weights.get("b"))
        self.bilinear = LocalBilinear(self.stream_a.out_channels, self.stream_b.out_channels,
                                      c_a=config.c_a, c_b=config.c_b, d_x=config.d_x)
        self.lstm = SpatialLSTM2d(config.d_x, config.d_h, directions=config.lstm_directions,
                                  row_counter=config.row_counter)
        self.attention = LocationAttention(config.d_x, self.lstm.out_dim, d_att=config.d_att,
                                           glimpses=config.num_glimpses)
        self.fc = nn.Linear(config.num_glimpses * self.lstm.out_dim, config.embed_dim)
        self.bnneck = nn.BatchNorm1d(config.embed_dim)
        self.bnneck.bias.requires_grad_(False)  # BNNeck: no shift, so the BN output stays centred
        self.classifier = nn.Linear(config.embed_dim, config.num_classes, bias=False) if config.num_classes else None
        self.channels_last = True
        # Modes, changed only through ``run_mode``: at inference the CNN layers run from a fused copy
        # (never saved); and reduced precision changes the embeddings too much with these weights
        # (benchmarks/bench_model.py against fp32: bf16 cosine >= 0.86 only, fp16 >= 0.996, rankings
        # change), so the streams run in float32 even under a caller's autocast unless training asks.
        self._fused = True
        self._streams_autocast = False
        self.__dict__["_folded"] = None  # (signature, folded front); kept out of the module tree

    @contextlib.contextmanager
    def run_mode(self, *, fused: bool | None = None, streams_autocast: bool | None = None) -> Iterator[None]:
        """Within the block: ``fused`` - inference through the BN-folded, ReLU-fused copy of the CNN
        layers (default on; it costs ~0.1 s to build, worth it over a batch, not for a crop or two);
        ``streams_autocast`` - let a caller's autocast reach the streams (mixed-precision training).
        ``None`` leaves a mode as it is; both are restored on exit."""
        saved = self._fused, self._streams_autocast
        if fused is not None:
            self._fused = bool(fused)
        if streams_autocast is not None:
            self._streams_autocast = bool(streams_autocast)
        try:
            yield
        finally:
            self._fused, self._streams_autocast = saved

    def _front(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        """(stream_a, stream_b, bilinear): the trained modules, or their fused copy (reid.model.fusion) at inference."""
        if self.training or torch.is_grad_enabled() or not self._fused:
            return self.stream_a, self.stream_b, self.bilinear
        front = nn.ModuleDict({"a": self.stream_a, "b": self.stream_b, "bilinear": self.bilinear})
        sig = tensor_signature(front)
        cached = self.__dict__["_folded"]
        if cached is None or cached[0] != sig:
            folded = fuse_for_inference(front)
            if self.channels_last:
                folded = folded.to(memory_format=torch.channels_last)
            cached = self.__dict__["_folded"] = (sig, folded)
        f = cached[1]
        return f["a"], f["b"], f["bilinear"]

    @property
    def embed_dim(self) -> int:
        """D, the length of an embedding."""
        return self.config.embed_dim

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) of the crops the network embeds (``reid.embed`` resizes to it)."""
        return tuple(self.config.input_size)

    def init_head(self, generator: torch.Generator) -> None:
        """Initialise everything after the streams from a seeded generator (same weights in every process)."""
        with torch.no_grad():
            for m in self.head_modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", generator=generator)
                elif isinstance(m, nn.Linear):
                    if m is self.classifier:
                        nn.init.normal_(m.weight, std=0.001, generator=generator)
                    elif m is self.fc:
                        nn.init.kaiming_normal_(m.weight, mode="fan_out", generator=generator)
                    else:
                        nn.init.xavier_uniform_(m.weight, generator=generator)
                    if m.bias is not None:
                        m.bias.zero_()
                elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                    m.reset_running_stats()
                    m.weight.fill_(1.0)
                    m.bias.zero_()
                elif isinstance(m, SpatialLSTM2d):
                    m.reset_parameters(generator)

    def head_modules(self) -> Iterator[nn.Module]:
        """Every module after the two streams."""
        for part in (self.bilinear, self.lstm, self.attention, self.fc, self.bnneck, self.classifier):
            if part is not None:
                yield from part.modules()

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the two CNN streams (to freeze them or give them their own learning rate)."""
        yield from self.stream_a.parameters()
        yield from self.stream_b.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters after the streams: bilinear, LSTM, attention, embedding, BNNeck, classifier."""
        backbone = {id(p) for p in self.backbone_parameters()}
        return (p for p in self.parameters() if id(p) not in backbone)

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-BN feature [B,D] and attention [B,K,Gh,Gw] of a batch of RGB crops in [0, 1]."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a batch [B,3,H,W], got {tuple(x.shape)}")
        x = x.float()
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        stream_a, stream_b, bilinear = self._front()
        with contextlib.nullcontext() if self._streams_autocast else torch.autocast(x.device.type, enabled=False):
            local = bilinear(stream_a(x), stream_b(x)).float()  # [B,Gh,Gw,d_x]
        return self._recurrent_head(local)

    def _recurrent_head(self, local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Local bilinear features [B,Gh,Gw,d_x] -> pre-BN feature [B,D] and attention [B,K,Gh,Gw]."""
        b, gh, gw, _ = local.shape
        # The recurrent head always runs in float32 (a small part of the cost).
        with torch.autocast(local.device.type, enabled=False):
            states = self.lstm(local)  # [B,Gh,Gw,dirs*d_h]
            z, alpha = self.attention(local.view(b, gh * gw, -1), states.view(b, gh * gw, -1))
            f = self.fc(z)
        return f, alpha.view(b, -1, gh, gw)

    def head_from_streams(self, fa: torch.Tensor, fb: torch.Tensor) -> TrainOutput:
        """The head alone, on the two streams' local maps: fa = ``stream_a(x)`` [B,Ca,Gh,Gw] and fb =
        ``stream_b(x)`` [B,Cb,Gh,Gw] (any float dtype, e.g. float16 from a cache; computed in float32).

        ``forward_train(x)`` is ``head_from_streams(stream_a(x), stream_b(x))``; the embedding ``forward``
        returns is ``F.normalize(bnneck(features))``. Head-only training runs the frozen streams once per
        crop and this many times (``reid.train.stream_cache``).
        """
        if fa.dim() != 4 or fb.dim() != 4 or fa.shape[0] != fb.shape[0]:
            raise ValueError(f"expected stream maps [B,C,Gh,Gw] with one batch size, got {tuple(fa.shape)} and "
                             f"{tuple(fb.shape)}")
        with torch.autocast(fa.device.type, enabled=False):
            local = self.bilinear(fa.float(), fb.float()).float()  # [B,Gh,Gw,d_x]
        f, alpha = self._recurrent_head(local)
        logits = self.classifier(self.bnneck(f)) if self.classifier is not None else None
        return TrainOutput(features=f, logits=logits, attention=alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B,3,H,W] RGB in [0, 1] -> [B, D] L2-normalised embeddings (the BNNeck output)."""
        f, _ = self._features(x)
        return F.normalize(self.bnneck(f), dim=1)

    def forward_train(self, x: torch.Tensor) -> TrainOutput:
        """Pre-BN features (triplet), identity logits (None without a classifier) and attention maps."""
        f, alpha = self._features(x)
        logits = self.classifier(self.bnneck(f)) if self.classifier is not None else None
        return TrainOutput(features=f, logits=logits, attention=alpha)

    def attention_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Attention over grid locations [B,K,Gh,Gw]; each map sums to 1."""
        return self._features(x)[1]


def check_stream_weights(config: ModelConfig, *, pretrained: bool,
                         stream_weights: Mapping[str, str | os.PathLike | None] | None) -> None:
    """The checks build_model makes on its stream options before it builds anything (callers run them
    early to fail before other work): ``stream_weights`` keys, and each stream's file against its kind."""
    unknown = sorted(set(stream_weights or {}) - {"a", "b"})
    if unknown:
        raise InputError(f"stream_weights keys are 'a' and 'b', not {', '.join(map(repr, unknown))}")
    weights = dict(stream_weights or {})
    for role, name in (("a", config.stream_a), ("b", config.stream_b)):
        _check_stream(role, name, pretrained=pretrained, weights=weights.get(role))


def _check_stream(role: str, name: str, *, pretrained: bool, weights: str | os.PathLike | None) -> None:
    """Refuse a weights file for a packaged stream or an untrained model, and a file stream without one."""
    if name in PACKAGED_STREAMS:
        if weights is not None:
            raise InputError(f"`stream_weights['{role}']` applies to {' / '.join(FILE_STREAMS)} streams only; stream "
                             f"{role} is {name}, whose ImageNet weights are packaged")
        return
    if name not in FILE_STREAMS:
        raise ValueError(f"unknown stream {name!r}; expected one of: {', '.join(STREAMS)}")
    files = VGG16_FILES if name == "vgg16" else RESNET50_FILES
    if not pretrained and weights is not None:
        raise InputError(f"`stream_weights['{role}']` was given for an untrained model (`pretrained=False`); "
                         f"drop one of the two")
    if weights is not None:
        require_weights_file(weights, name, files)
    if pretrained and weights is None:
        raise CheckpointError(
            f"stream {role} ({name}) has no packaged weights and nothing is downloaded: give its ImageNet "
            f"weights as a local file, `stream_weights['{role}']` PATH, e.g. torchvision's {' or '.join(files)}, "
            f"or build it untrained, `pretrained=False`"
        )


def make_stream(role: str, name: str, *, output_stride: int, pretrained: bool,
                weights: str | os.PathLike | None = None) -> nn.Module:
    """Stream ``role`` ("a" or "b") of kind ``name``; vgg16 / resnet50 take their ImageNet weights from ``weights``
    (a local file: nothing is downloaded)."""
    _check_stream(role, name, pretrained=pretrained, weights=weights)
    if name == "mobilenet_v2":
        return StreamA(output_stride=output_stride, pretrained=pretrained)
    if name == "efficientnet_lite0":
        return StreamB(output_stride=output_stride, pretrained=pretrained)
    cls = VGG16Stream if name == "vgg16" else ResNet50Stream
    return cls(output_stride=output_stride, weights=weights)


DEFAULT_HEAD_NAME = "default_head.safetensors"


def default_head_path():
    """The shipped head of the default network (``python -m reid.train.distill`` wrote it; its JSON says how)."""
    import importlib.resources

    return importlib.resources.files("reid.model") / "weights" / DEFAULT_HEAD_NAME


def uses_default_head(config: ModelConfig, *, pretrained: bool) -> bool:
    """The shipped head fits the default config on the packaged ImageNet streams (any classifier size)."""
    return pretrained and config.replace(num_classes=0) == ModelConfig()


def load_default_head(model: AttentionBilinearNet, path: str | os.PathLike | None = None) -> None:
    """Load the shipped head (or ``path``, a head file ``reid.train.distill`` wrote) into a default-config
    model: every tensor after the streams, every key matched (a training classifier, which the shipped head
    has none of, keeps its seeded start)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    shipped = path is None
    path = default_head_path() if shipped else Path(path)
    try:
        state = load(path.read_bytes())
    except (OSError, SafetensorError, ValueError) as e:
        hint = ("reinstall reid, or rebuild it with `python -m reid.train.distill --out reid/model/weights`"
                if shipped else "give a head file that `python -m reid.train.distill --out DIR` wrote")
        raise CheckpointError(f"the default network's trained head {path} is missing or unreadable ({e}); "
                              f"{hint}") from e
    expected = {k: v for k, v in model.state_dict().items()
                if not k.startswith(("stream_a.", "stream_b.", "classifier."))}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    shapes = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        raise CheckpointError(f"the default network's trained head {path} does not match the default config "
                              f"({len(missing)} missing {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, "
                              f"{len(shapes)} of another shape {shapes[:3]}); rebuild it with reid.train.distill")
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(state[k])


def build_model(config: ModelConfig | None = None, pretrained: bool = True,
                stream_weights: Mapping[str, str | os.PathLike | None] | None = None, *,
                trained_head: bool = True) -> AttentionBilinearNet:
    """Build the network in eval mode; streams from ImageNet weights, head seeded by config.seed.

    The default network (default config, pretrained streams; a training classifier of any size) gets the
    shipped trained head instead (``reid/model/weights/default_head.safetensors``, trained by
    ``reid.train.distill`` without real labels) unless ``trained_head=False``, which gives the seeded head
    that recipe starts from.
    The default streams' weights are packaged; a vgg16 / resnet50 stream reads them from a local file
    given as ``stream_weights={"a": path, "b": path}`` (None or absent for a packaged stream).
    """
    config = config or ModelConfig()
    check_stream_weights(config, pretrained=pretrained, stream_weights=stream_weights)  # both before building either
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # the streams' own init when not pretrained
        model = AttentionBilinearNet(config, pretrained=pretrained, stream_weights=stream_weights)
    model.init_head(torch.Generator().manual_seed(config.seed))
    if trained_head and uses_default_head(config, pretrained=pretrained):
        load_default_head(model)
    model = model.to(memory_format=torch.channels_last)
    log.debug("built %s grid=%s pretrained=%s", config.arch, config.grid, pretrained)
    return model.eval()
