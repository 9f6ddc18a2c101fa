"""Training: P x K sampling, augmentation, CE + triplet losses, the loop with exact resume."""

from reid.train.config import PRECISIONS, TrainConfig, resolve_precision
from reid.train.loop import TrainResult, load_run_config, train

__all__ = ["PRECISIONS", "TrainConfig", "TrainResult", "load_run_config", "resolve_precision", "train"]
