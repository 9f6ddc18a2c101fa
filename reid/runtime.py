"""Process-wide runtime choices: device selection and CPU numerics."""

from __future__ import annotations

import logging

from reid.errors import InputError

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto"):
    """Map ``auto|cpu|cuda`` (or ``cuda:N``) to a ``torch.device``; ``auto`` picks CUDA when present."""
    import torch

    name = (name or "auto").lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("`device` cuda was asked for but no CUDA device is available; use the CPU")
    if name != "cpu" and not name.startswith("cuda"):
        raise InputError(f"unknown device {name!r}; expected one of: auto, cpu, cuda")
    prepare_torch()
    if name.startswith("cuda"):
        # TF32 convolutions round like fp16, which the packaged MobileNetV2 weights do not survive
        # (embeddings drift from the CPU's); keep GPU embeddings comparable with CPU ones.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return torch.device(name)


def prepare_torch() -> None:
    """Flush denormal floats to zero: random-weight CNNs otherwise run 30-50x slower on CPU."""
    import torch

    torch.set_flush_denormal(True)
