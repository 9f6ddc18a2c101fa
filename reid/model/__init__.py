"""AttentionBilinearNet, its config and its checkpoints (see reid.model.net for the architecture).

The names below load on first use (PEP 562), so the torch-free parts of the package (``reid.model.identity``)
import without torch: ``reid query`` on an exported model never loads it.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "AttentionBilinearNet": "reid.model.net",
    "ModelConfig": "reid.model.net",
    "TrainOutput": "reid.model.net",
    "build_model": "reid.model.net",
    "load_checkpoint": "reid.model.checkpoint",
    "load_model": "reid.model.checkpoint",
    "model_fingerprint": "reid.model.checkpoint",
    "save_checkpoint": "reid.model.checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'reid.model' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
