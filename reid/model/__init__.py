"""AttentionBilinearNet, its config and its checkpoints (see reid.model.net for the architecture)."""

from reid.model.checkpoint import load_checkpoint, load_model, model_fingerprint, save_checkpoint
from reid.model.net import AttentionBilinearNet, ModelConfig, TrainOutput, build_model

__all__ = [
    "AttentionBilinearNet",
    "ModelConfig",
    "TrainOutput",
    "build_model",
    "load_checkpoint",
    "load_model",
    "model_fingerprint",
    "save_checkpoint",
]
