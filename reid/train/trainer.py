"""The trainer: P x K batches, CE + triplet, warm-up schedule, atomic checkpoints, exact resume.

``Trainer`` owns one run's model, optimiser, grad scaler, sampler, loader and run folder; its state
(epoch, best score so far, optimiser / scaler / sampler / RNG states) is saved with every checkpoint
and restored on resume, so a resumed run continues bit for bit. ``train`` is the one-call entry.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reid.errors import CheckpointError, DatasetError, InputError
from reid.train.config import TrainConfig, resolve_precision
from reid.train.data import Batch, TrainImages, check_batch, make_loader
from reid.train.losses import LossWeights, reid_loss
from reid.train.sampler import PKSampler, relabel_pids
from reid.train.schedule import lr_factor
from reid.train.state import STATE_VERSION, RunFolder, load_state, rng_state, set_rng_state
from reid.train.transforms import TrainTransform

log = logging.getLogger(__name__)

Event = Callable[[str, dict[str, Any]], None]


@dataclass
class TrainResult:
    """What a run produced: epochs done, best evaluation, last epoch's record, throughput."""

    out: Path
    epochs_done: int
    best_map: float | None
    best_epoch: int | None
    last: dict[str, Any] = field(default_factory=dict)
    images_per_s: float = 0.0
    stopped_early: bool = False


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _set_backbone_frozen(model: torch.nn.Module, frozen: bool) -> None:
    """Stop gradients into the CNN streams and keep their BatchNorm statistics fixed."""
    backbone = {id(p) for p in model.backbone_parameters()}
    for p in model.backbone_parameters():
        p.requires_grad_(not frozen)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and any(id(p) in backbone for p in m.parameters()):
            m.train(not frozen and model.training)


def _make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # Its own group only when its rate differs (runs saved before this option resume with their two groups).
    classifier = {id(p) for p in model.classifier.parameters()} \
        if model.classifier is not None and cfg.classifier_lr_mult != 1.0 else set()
    groups = [
        {"params": list(model.backbone_parameters()), "lr": cfg.lr * cfg.backbone_lr_mult,
         "base_lr": cfg.lr * cfg.backbone_lr_mult, "name": "backbone"},
        {"params": [p for p in model.head_parameters() if p.requires_grad and id(p) not in classifier], "lr": cfg.lr,
         "base_lr": cfg.lr, "name": "head"},
        {"params": [p for p in model.head_parameters() if p.requires_grad and id(p) in classifier],
         "lr": cfg.lr * cfg.classifier_lr_mult, "base_lr": cfg.lr * cfg.classifier_lr_mult, "name": "classifier"},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, weight_decay=cfg.weight_decay)


class Trainer:
    """One training run: model, optimiser, grad scaler, P x K sampler, loader, run folder and progress.

    ``Trainer.create`` starts a run or reopens one to resume; ``fit`` trains the epochs left. Each
    epoch is ``train_epoch`` (one ``step`` per batch), then ``evaluate`` when due, then ``save``.
    """

    def __init__(self, run: RunFolder, model: torch.nn.Module, sampler: PKSampler, *, device: torch.device,
                 precision: str, workers: int | None = None, eval_batch_size: int = 64,
                 on_event: Event | None = None) -> None:
        from reid.embed import auto_workers

        cfg = run.config
        self.run, self.config, self.dataset, self.sampler = run, cfg, run.dataset, sampler
        self.device, self.precision = device, precision
        self.model = model.to(device)
        self.optimizer = _make_optimizer(model, cfg)
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        # auto: none on a 1-2 core CPU (39 vs 35-37 img/s with 2 at 128x64, steady epochs)
        self.workers = auto_workers(device) if workers is None else workers
        self.eval_batch_size = eval_batch_size
        self.emit: Event = on_event or (lambda kind, info: None)
        self.loss_weights = LossWeights(ce=cfg.ce_weight, triplet=cfg.triplet_weight, margin=cfg.margin,
                                        label_smoothing=cfg.label_smoothing,
                                        attention_entropy=cfg.attention_entropy_weight)
        transform = TrainTransform(size=tuple(model.config.input_size), flip_p=cfg.flip_p, erase_p=cfg.erase_p)
        images = TrainImages([s.path for s in self.dataset.train], sampler.labels, transform)
        self.loader = make_loader(images, sampler, workers=self.workers, pin_memory=device.type == "cuda")
        self.epoch = 0  # epochs done
        self.best_map: float | None = None
        self.best_epoch: int | None = None

    @classmethod
    def create(
        cls,
        dataset: Any,
        out: str | Path,
        config: TrainConfig | None = None,
        *,
        model_config: Any = None,
        pretrained: bool = True,
        stream_weights: dict[str, str | Path | None] | None = None,
        device: str | torch.device = "auto",
        workers: int | None = None,
        resume: bool = False,
        eval_batch_size: int = 64,
        on_event: Event | None = None,
    ) -> Trainer:
        """A new run in ``out`` (refused when one is there), or, with ``resume``, the run there where it stopped.

        The options are ``train``'s. Settings that cannot work fail before any work on the data.
        """
        from reid.model import ModelConfig, build_model
        from reid.model.net import check_stream_weights
        from reid.runtime import prepare_torch, resolve_device

        config = config or TrainConfig()
        if not resume:
            check_stream_weights(model_config or ModelConfig(), pretrained=pretrained, stream_weights=stream_weights)
        dev = device if isinstance(device, torch.device) else resolve_device(device)
        prepare_torch()
        precision = resolve_precision(config.precision, dev)
        if not dataset.train:
            raise DatasetError(f"dataset {dataset.name!r} has no training images; it cannot be trained on")
        out = Path(out)
        run = RunFolder(out, config, dataset, resume=resume)
        labels, pid_list = relabel_pids([s.pid for s in dataset.train])
        sampler = PKSampler(labels, config.batch_p, config.batch_k, seed=config.seed)
        mc = (model_config or ModelConfig()).replace(num_classes=len(pid_list))
        if resume:
            model, state = _reopen(run, mc, asked=model_config is not None), load_state(run.last_dir)
        else:
            _seed_everything(config.seed)
            model, state = build_model(mc, pretrained=pretrained, stream_weights=stream_weights), None
        run.write_run_file(model.config.to_dict())  # on resume: the settings in force from now on (e.g. more epochs)
        if state is None:
            run.metrics.path.unlink(missing_ok=True)
        trainer = cls(run, model, sampler, device=dev, precision=precision, workers=workers,
                      eval_batch_size=eval_batch_size, on_event=on_event)
        if state is not None:
            trainer.load_state_dict(state)
            run.metrics.truncate_after(trainer.epoch)
            log.info("resuming %s after epoch %d", out, trainer.epoch)
        return trainer

    # --- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything besides the weights that the next epoch depends on (tensors, numbers, strings only)."""
        return {
            "version": STATE_VERSION, "epoch": self.epoch, "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "sampler": self.sampler.state_dict(), "rng": rng_state(), "best_map": self.best_map,
            "best_epoch": self.best_epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()``'s output; CheckpointError when it does not fit this run."""
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            self.sampler.load_state_dict(state["sampler"])
            set_rng_state(state["rng"])
            self.epoch = int(state["epoch"])
            self.best_map, self.best_epoch = state.get("best_map"), state.get("best_epoch")
        except (KeyError, ValueError, TypeError, RuntimeError, InputError) as e:
            raise CheckpointError(
                f"the training state in {self.run.last_dir} does not fit this model and settings ({e}); "
                f"choose another `out` folder to start a new run"
            ) from e

    # --- the run -----------------------------------------------------------------------------

    def fit(self, max_seconds: float | None = None) -> TrainResult:
        """Train the epochs left; with ``max_seconds``, stop after the epoch past which another would not fit."""
        cfg = self.config
        self.emit("start", {"epochs": cfg.epochs, "start_epoch": self.epoch, "num_ids": self.model.config.num_classes,
                            "num_images": len(self.dataset.train), "precision": self.precision,
                            "device": str(self.device), "batch_size": self.sampler.batch_size,
                            "steps": len(self.sampler)})
        t_start, images, train_s = time.perf_counter(), 0, 0.0
        record: dict[str, Any] = {}
        stopped_early = False
        while self.epoch < cfg.epochs:
            t_epoch = time.perf_counter()
            record = self.train_epoch()
            images, train_s = images + record["images"], train_s + record["train_seconds"]
            # With a time budget, the epoch after which another one would not fit is the last one.
            elapsed = time.perf_counter() - t_start
            out_of_time = max_seconds is not None and elapsed + (time.perf_counter() - t_epoch) > max_seconds
            if cfg.eval_every and (self.epoch % cfg.eval_every == 0 or self.epoch == cfg.epochs or out_of_time):
                record.update(self.evaluate())
            self.save(record)
            self.emit("epoch", record)
            if out_of_time and self.epoch < cfg.epochs:
                stopped_early = True
                log.info("time budget of %.0f s reached after epoch %d", max_seconds, self.epoch)
                break
        result = TrainResult(out=self.run.out, epochs_done=self.epoch, best_map=self.best_map,
                             best_epoch=self.best_epoch, last=record, images_per_s=images / max(train_s, 1e-9),
                             stopped_early=stopped_early)
        self.emit("end", dataclasses.asdict(result))
        return result

    def train_epoch(self) -> dict[str, Any]:
        """One pass over the sampler's batches of the next epoch; returns its record (mean losses, lr, img/s)."""
        t_epoch = time.perf_counter()
        epoch, model = self.epoch, self.model
        self.sampler.set_epoch(epoch)
        model.train()
        # The streams run in fp32 under autocast unless allowed: inference must match fp32 embeddings, but
        # training them in mixed precision (AMP on CUDA) is fine; the mode ends with the epoch, before any evaluation.
        with model.run_mode(streams_autocast=self.precision != "fp32"):
            _set_backbone_frozen(model, epoch < self.config.freeze_backbone_epochs)
            steps, sums, n_images = len(self.sampler), {}, 0
            for step, batch in enumerate(self.loader):
                batch = check_batch(batch)
                self._set_lr(epoch + step / steps)
                parts = self.step(batch)
                n_images += len(batch.labels)
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v
                dt = time.perf_counter() - t_epoch
                self.emit("step", {"epoch": epoch + 1, "step": step + 1, "steps": steps, "lr": self._lr(),
                                   "images_per_s": n_images / max(dt, 1e-9), **parts})
        train_s = time.perf_counter() - t_epoch
        self.epoch += 1
        return {
            "epoch": self.epoch, "lr": self._lr(), "images": n_images,
            "images_per_s": round(n_images / max(train_s, 1e-9), 2), "train_seconds": round(train_s, 2),
            **{k: v / max(steps, 1) for k, v in sums.items()},
        }

    def step(self, batch: Batch) -> dict[str, float]:
        """One optimiser step on ``batch``; returns the loss and its parts."""
        x = batch.images.to(self.device, non_blocking=True)
        y = batch.labels.to(self.device, non_blocking=True)
        with _autocast(self.device, self.precision):
            output = self.model.forward_train(x)
        loss, parts = reid_loss(output.features, output.logits, output.attention, y, self.loss_weights)
        if not math.isfinite(parts["loss"]):
            raise InputError(f"the loss became {parts['loss']} at epoch {self.epoch + 1}; lower `lr`")
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        return parts

    def evaluate(self) -> dict[str, Any]:
        """Score the model now on the dataset's query x gallery (the scorer of ``reid evaluate``)."""
        from reid.train.validate import validate

        self.emit("eval_start", {"epoch": self.epoch, "images": len(self.dataset.query) + len(self.dataset.gallery)})
        t = time.perf_counter()
        metrics = validate(self.model, self.dataset, device=self.device, workers=self.workers,
                           batch_size=self.eval_batch_size, seed=self.config.seed)
        metrics["eval_seconds"] = round(time.perf_counter() - t, 2)
        self.emit("eval", {"epoch": self.epoch, **metrics})
        return metrics

    def save(self, record: dict[str, Any]) -> None:
        """Log the epoch's record and checkpoint the model and state (and ``best/`` on a new best mAP)."""
        best = "mAP" in record and (self.best_map is None or record["mAP"] > self.best_map)
        if best:
            self.best_map, self.best_epoch = record["mAP"], self.epoch
        self.run.save(self.model, self.state_dict(), record, best=best)
        log.info("epoch %d saved to %s%s", self.epoch, self.run.last_dir, " (new best)" if best else "")

    def _lr(self) -> float:
        return next(g["lr"] for g in self.optimizer.param_groups if g.get("name") == "head")

    def _set_lr(self, progress: float) -> None:
        cfg = self.config
        factor = lr_factor(progress, epochs=cfg.epochs, schedule=cfg.schedule, warmup_epochs=cfg.warmup,
                           warmup_factor=cfg.warmup_factor, milestones=cfg.milestones, gamma=cfg.gamma,
                           min_factor=cfg.min_lr_factor)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor


def _reopen(run: RunFolder, mc: Any, *, asked: bool) -> torch.nn.Module:
    """The model of ``run``'s last checkpoint, checked against the model asked for and the data's identities."""
    from reid.model import load_checkpoint

    model = load_checkpoint(run.last_dir)
    if asked and model.config.to_dict() != mc.to_dict():
        raise CheckpointError(
            f"the checkpoint in {run.last_dir} has a different model config than asked for; "
            f"resume without `model_config` or choose another `out` folder"
        )
    if model.config.num_classes != mc.num_classes:
        raise CheckpointError(
            f"the checkpoint in {run.last_dir} classifies {model.config.num_classes} identities but the "
            f"dataset has {mc.num_classes}; resume with the same dataset or choose another `out` folder"
        )
    return model


def train(
    dataset: Any,
    out: str | Path,
    config: TrainConfig | None = None,
    *,
    model_config: Any = None,
    pretrained: bool = True,
    stream_weights: dict[str, str | Path | None] | None = None,
    device: str | torch.device = "auto",
    workers: int | None = None,
    resume: bool = False,
    max_seconds: float | None = None,
    eval_batch_size: int = 64,
    deterministic: bool = False,
    on_event: Event | None = None,
) -> TrainResult:
    """Train an AttentionBilinearNet on ``dataset.train``; checkpoints, metrics and state go to ``out``.

    ``config`` defaults to ``TrainConfig()``; ``model_config`` (a ``reid.model.ModelConfig``; num_classes
    is set from the data) defaults to the default model; ``stream_weights`` ({"a": path, "b": path}) gives
    the ImageNet weights files of vgg16 / resnet50 streams when a run starts (a resumed run reads its
    checkpoint). ``resume``
    continues the run in ``out`` from its last epoch. ``max_seconds`` ends training after the epoch
    past which another one would not fit. ``deterministic`` turns on
    ``torch.use_deterministic_algorithms`` for the run. ``workers=None`` picks the decoding/augmenting
    processes as ``reid.embed.auto_workers`` does. ``on_event(kind, info)`` receives "start",
    "step", "eval_start", "eval", "epoch" and "end" events (for progress displays). Loader workers
    start with forkserver, so scripts calling this need the usual ``if __name__ == "__main__":`` guard.
    """
    previous = torch.are_deterministic_algorithms_enabled()
    if deterministic:
        torch.use_deterministic_algorithms(True)
    try:
        trainer = Trainer.create(dataset, out, config, model_config=model_config, pretrained=pretrained,
                                 stream_weights=stream_weights, device=device, workers=workers, resume=resume,
                                 eval_batch_size=eval_batch_size, on_event=on_event)
        return trainer.fit(max_seconds)
    finally:
        torch.use_deterministic_algorithms(previous)
