"""Training: P x K sampling, augmentation, CE + triplet losses, the trainer with exact resume."""

from reid.train.config import PRECISIONS, TrainConfig, resolve_precision
from reid.train.state import load_run_config
from reid.train.trainer import Trainer, TrainResult, train

__all__ = ["PRECISIONS", "TrainConfig", "TrainResult", "Trainer", "load_run_config", "resolve_precision", "train"]
