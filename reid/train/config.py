"""Training settings: the frozen TrainConfig saved with every run, and precision selection."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from reid.errors import InputError
from reid.train.schedule import SCHEDULES

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training trajectory (saved in ``train.json`` and checked on resume)."""

    epochs: int = 60
    batch_p: int = 16
    batch_k: int = 4
    # Sized for this model from runs of 8 epochs on a 40-identity synthetic set (README "Training recipe"):
    # head lr 3.5e-4 (BoT's ResNet-50 setting) x1.06 the untrained mAP, 1e-3 x1.28, 3e-3 x1.48, 1e-2 x1.66;
    # with the classifier at 10x the head's rate 1e-3 x1.42, 3e-3 x1.85, 6e-3 x1.88.
    lr: float = 3e-3
    backbone_lr_mult: float = 0.1
    classifier_lr_mult: float = 10.0  # the identity classifier's lr / head lr (it starts from nothing)
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: int = 5
    warmup_max_fraction: float = 0.1  # the warm-up never takes more than this share of the run
    warmup_factor: float = 0.01
    milestones: tuple[int, ...] = (40, 70)
    gamma: float = 0.1
    min_lr_factor: float = 0.01
    freeze_backbone_epochs: int = 0
    margin: float = 0.3
    label_smoothing: float = 0.1
    ce_weight: float = 1.0
    triplet_weight: float = 1.0
    attention_entropy_weight: float = 0.0
    erase_p: float = 0.5
    flip_p: float = 0.5
    seed: int = 0
    eval_every: int = 10
    precision: str = "auto"

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise InputError(f"`epochs` must be at least 1 (got {self.epochs})")
        if self.lr <= 0:
            raise InputError(f"`lr` must be positive (got {self.lr})")
        if self.schedule not in SCHEDULES:
            raise InputError(f"unknown `schedule` {self.schedule!r}; expected one of: {', '.join(SCHEDULES)}")
        if self.precision not in PRECISIONS:
            raise InputError(f"unknown `precision` {self.precision!r}; expected one of: {', '.join(PRECISIONS)}")
        if not 0.0 <= self.warmup_max_fraction <= 1.0:
            raise InputError(f"`warmup_max_fraction` must be within [0, 1], got {self.warmup_max_fraction}")
        if self.eval_every < 0:
            raise InputError(f"`eval_every` must be >= 0 (0 = never evaluate), got {self.eval_every}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of ``to_dict``; unknown keys are ignored (written by a newer version)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        # Runs saved before these options existed trained without them: resume them as they were.
        kw.setdefault("warmup_max_fraction", 1.0)
        kw.setdefault("classifier_lr_mult", 1.0)
        if "milestones" in kw:
            kw["milestones"] = tuple(int(m) for m in kw["milestones"])
        return cls(**kw)

    @property
    def warmup(self) -> float:
        """Epochs of linear warm-up actually run: ``warmup_epochs``, at most ``warmup_max_fraction`` of the run
        (a BoT-style 5-epoch warm-up would otherwise be most of a short run)."""
        return min(float(self.warmup_epochs), self.warmup_max_fraction * self.epochs)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` -> bf16 autocast on CUDA GPUs that have it, else fp16 (with a grad scaler); fp32 on CPU.

    On CPU, bf16 autocast made training *slower* even with AMX (measured on the 2-core Xeon with
    AMX-BF16, interleaved fp32/bf16 steps, batch 32: 0.87x at 128x64 and 0.68x at 256x128; the
    backward passes of the depthwise convolutions dominate), so ``auto`` keeps fp32 there;
    ``bf16`` can still be asked for explicitly.
    """
    if name == "fp16" and device.type != "cuda":
        raise InputError("`precision` fp16 needs CUDA; on CPU use bf16 or fp32")
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"
