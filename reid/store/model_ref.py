"""Which model an index's vectors come from: ``default`` (the packaged network) or a checkpoint path."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_SOURCE = "default"


def model_source(weights: str | os.PathLike | None) -> str:
    """The source string an index records: ``default`` or the checkpoint's absolute, resolved path."""
    if weights is None or str(weights) == DEFAULT_SOURCE:
        return DEFAULT_SOURCE
    return str(Path(weights).expanduser().resolve())


def load_model(source: str, device=None):
    """Build the default model or load a checkpoint (CheckpointError when unusable), in eval mode."""
    from reid.model import load_model as build_or_load

    model = build_or_load(source)
    if device is not None:
        model = model.to(device)
    return model.eval()


def fingerprint(model) -> str:
    """The model fingerprint every index records (config + weights)."""
    from reid.model import model_fingerprint

    return model_fingerprint(model)
