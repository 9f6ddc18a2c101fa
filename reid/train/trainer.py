"""The training loop: P x K batches, CE + triplet, warm-up schedule, atomic checkpoints, exact resume."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
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
from reid.train.data import TrainImages, check_batch, make_loader
from reid.train.losses import LossWeights, reid_loss
from reid.train.sampler import PKSampler, relabel_pids
from reid.train.schedule import lr_factor
from reid.train.state import (
    STATE_VERSION,
    MetricsLog,
    load_state,
    read_json,
    recover_dir,
    rng_state,
    save_model_dir,
    set_rng_state,
    write_json_atomic,
)
from reid.train.transforms import TrainTransform

log = logging.getLogger(__name__)

RUN_FILE = "train.json"
# Changing these on --resume changes what is being trained: refused rather than silently mixed.
_FIXED_ON_RESUME = ("batch_p", "batch_k", "seed")

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


def dataset_identity(dataset: Any) -> dict[str, Any]:
    """Name, size and a digest of the training list (file names + ids), to refuse resuming on other data."""
    h = hashlib.sha256()
    for s in dataset.train:
        h.update(f"{Path(s.path).name}\t{s.pid}\t{s.camid}\n".encode())
    return {
        "name": dataset.name,
        "train_images": len(dataset.train),
        "train_ids": len({s.pid for s in dataset.train}),
        "train_digest": h.hexdigest()[:16],
    }


def _describe(ident: Any) -> str:
    if not isinstance(ident, dict):
        return "an unknown dataset"
    return (f"{ident.get('name')}: {ident.get('train_images')} images of {ident.get('train_ids')} identities, "
            f"digest {ident.get('train_digest')}")


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
    groups = [
        {"params": list(model.backbone_parameters()), "lr": cfg.lr * cfg.backbone_lr_mult,
         "base_lr": cfg.lr * cfg.backbone_lr_mult, "name": "backbone"},
        {"params": [p for p in model.head_parameters() if p.requires_grad], "lr": cfg.lr,
         "base_lr": cfg.lr, "name": "head"},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _lr_at(cfg: TrainConfig, progress: float) -> float:
    return lr_factor(progress, epochs=cfg.epochs, schedule=cfg.schedule, warmup_epochs=cfg.warmup_epochs,
                     warmup_factor=cfg.warmup_factor, milestones=cfg.milestones, gamma=cfg.gamma,
                     min_factor=cfg.min_lr_factor)


class _Run:
    """State of one training process (kept in one object so the loop below reads top to bottom)."""

    def __init__(self, out: Path, cfg: TrainConfig, dataset: Any, resume: bool) -> None:
        self.out, self.cfg, self.dataset = out, cfg, dataset
        self.last_dir, self.best_dir = out / "last", out / "best"
        self.metrics = MetricsLog(out / "metrics.jsonl")
        recover_dir(self.last_dir)
        recover_dir(self.best_dir)
        if resume:
            self._check_resumable()
        elif self.last_dir.exists():
            raise InputError(
                f"{out} already holds a training run; pass --resume to continue it or choose another --out"
            )

    def _check_resumable(self) -> None:
        if not self.last_dir.exists():
            raise CheckpointError(f"nothing to resume in {self.out}: no last/ checkpoint (run without --resume)")
        saved = read_json(self.out / RUN_FILE) if (self.out / RUN_FILE).exists() else None
        if saved is None:
            raise CheckpointError(f"{self.out} has no {RUN_FILE}; it was not written by reid train")
        ident = dataset_identity(self.dataset)
        if saved.get("dataset") != ident:
            raise CheckpointError(
                f"the checkpoint in {self.out} was trained on {_describe(saved.get('dataset'))}, not on this "
                f"dataset ({_describe(ident)}); resume with the same dataset or choose another --out"
            )
        old = TrainConfig.from_dict(saved.get("config", {}))
        for key in _FIXED_ON_RESUME:
            if getattr(old, key) != getattr(self.cfg, key):
                raise CheckpointError(
                    f"the run in {self.out} used {key}={getattr(old, key)}, not {getattr(self.cfg, key)}; "
                    f"resume with the same value or choose another --out"
                )
        changed = {k: (v, getattr(self.cfg, k)) for k, v in old.to_dict().items()
                   if v != self.cfg.to_dict()[k] and k not in ("epochs", "eval_every")}
        if changed:
            log.warning("resuming with changed settings (old -> new): %s", changed)

    def write_run_file(self, model_config: dict[str, Any]) -> None:
        """Record config and data identity (before the first checkpoint, so resume can check them)."""
        self.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.out / RUN_FILE, {
            "config": self.cfg.to_dict(), "dataset": dataset_identity(self.dataset),
            "dataset_info": {k: str(v) for k, v in getattr(self.dataset, "info", {}).items()},
            "model_config": model_config,
        })


def train(
    dataset: Any,
    out: str | Path,
    config: TrainConfig = TrainConfig(),
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

    ``model_config`` (a ``reid.model.ModelConfig``; num_classes is set from the data) defaults to
    the default model; ``stream_weights`` ({"a": path, "b": path}) gives the ImageNet weights files of
    vgg16 / resnet50 streams when a run starts (a resumed run reads its checkpoint). ``resume``
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
        return _train(dataset, Path(out), config, model_config=model_config, pretrained=pretrained,
                      stream_weights=stream_weights, device=device, workers=workers, resume=resume,
                      max_seconds=max_seconds, eval_batch_size=eval_batch_size, on_event=on_event)
    finally:
        torch.use_deterministic_algorithms(previous)


def _train(dataset: Any, out: Path, config: TrainConfig, *, model_config: Any, pretrained: bool,
           stream_weights: dict[str, str | Path | None] | None, device: str | torch.device, workers: int | None,
           resume: bool, max_seconds: float | None, eval_batch_size: int, on_event: Event | None) -> TrainResult:
    from reid.model import ModelConfig, build_model, load_checkpoint
    from reid.model.net import check_stream_weights
    from reid.runtime import prepare_torch, resolve_device

    if not resume:  # a stream option that cannot work fails before any work on the data
        check_stream_weights(model_config or ModelConfig(), pretrained=pretrained, stream_weights=stream_weights)
    emit = on_event or (lambda kind, info: None)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    prepare_torch()
    precision = resolve_precision(config.precision, dev)
    if not dataset.train:
        raise DatasetError(f"dataset {dataset.name!r} has no training images; it cannot be trained on")
    run = _Run(out, config, dataset, resume)
    labels, pid_list = relabel_pids([s.pid for s in dataset.train])
    sampler = PKSampler(labels, config.batch_p, config.batch_k, seed=config.seed)

    mc = (model_config or ModelConfig()).replace(num_classes=len(pid_list))
    state: dict[str, Any] | None = None
    if resume:
        model = load_checkpoint(run.last_dir)
        if model.config.to_dict() != mc.to_dict() and model_config is not None:
            raise CheckpointError(
                f"the checkpoint in {run.last_dir} has a different model config than asked for; "
                f"resume without model options or choose another --out"
            )
        if model.config.num_classes != len(pid_list):
            raise CheckpointError(
                f"the checkpoint in {run.last_dir} classifies {model.config.num_classes} identities but the "
                f"dataset has {len(pid_list)}; resume with the same dataset or choose another --out"
            )
        state = load_state(run.last_dir)
        mc = model.config
        run.write_run_file(mc.to_dict())  # the settings in force from now on (e.g. more --epochs)
    else:
        _seed_everything(config.seed)
        model = build_model(mc, pretrained=pretrained, stream_weights=stream_weights)
        run.write_run_file(mc.to_dict())
        run.metrics.path.unlink(missing_ok=True)
    model.to(dev)
    optimizer = _make_optimizer(model, config)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    start_epoch, best_map, best_epoch = 0, None, None
    if state is not None:
        try:
            optimizer.load_state_dict(state["optimizer"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            sampler.load_state_dict(state["sampler"])
            set_rng_state(state["rng"])
            start_epoch, best_map, best_epoch = int(state["epoch"]), state.get("best_map"), state.get("best_epoch")
        except (KeyError, ValueError, TypeError, RuntimeError, InputError) as e:
            raise CheckpointError(
                f"the training state in {run.last_dir} does not fit this model and settings ({e}); "
                f"choose another --out to start a new run"
            ) from e
        run.metrics.truncate_after(start_epoch)
        log.info("resuming %s after epoch %d", out, start_epoch)

    transform = TrainTransform(size=tuple(mc.input_size), flip_p=config.flip_p, erase_p=config.erase_p)
    images = TrainImages([s.path for s in dataset.train], labels, transform)
    if workers is None:
        from reid.embed import auto_workers

        workers = auto_workers(dev)  # none on a 1-2 core CPU: 39 vs 35-37 img/s with 2 (128x64, steady epochs)
    loader = make_loader(images, sampler, workers=workers, pin_memory=dev.type == "cuda")
    weights = LossWeights(ce=config.ce_weight, triplet=config.triplet_weight, margin=config.margin,
                          label_smoothing=config.label_smoothing,
                          attention_entropy=config.attention_entropy_weight)
    emit("start", {"epochs": config.epochs, "start_epoch": start_epoch, "num_ids": len(pid_list),
                   "num_images": len(dataset.train), "precision": precision, "device": str(dev),
                   "batch_size": sampler.batch_size, "steps": len(sampler)})
    t_start, total_images, total_train_s = time.perf_counter(), 0, 0.0
    last_record: dict[str, Any] = {}
    epoch, stopped_early = start_epoch, False
    while epoch < config.epochs:
        t_epoch = time.perf_counter()
        record = _train_epoch(model, loader, sampler, optimizer, scaler, config, weights, dev, precision, epoch, emit)
        total_images, total_train_s = total_images + record["images"], total_train_s + record["train_seconds"]
        epoch += 1
        # With a time budget, the epoch after which another one would not fit is the last one.
        elapsed = time.perf_counter() - t_start
        out_of_time = max_seconds is not None and elapsed + (time.perf_counter() - t_epoch) > max_seconds
        final = epoch == config.epochs or out_of_time
        if config.eval_every and (epoch % config.eval_every == 0 or final):
            record.update(_evaluate(model, dataset, dev, workers, eval_batch_size, config.seed, emit, epoch))
        best = "mAP" in record and (best_map is None or record["mAP"] > best_map)
        if best:
            best_map, best_epoch = record["mAP"], epoch
        _save(run, model, optimizer, scaler, sampler, epoch, best_map, best_epoch, record, best)
        last_record = record
        emit("epoch", record)
        if out_of_time and epoch < config.epochs:
            stopped_early = True
            log.info("time budget of %.0f s reached after epoch %d", max_seconds, epoch)
            break
    result = TrainResult(out=out, epochs_done=epoch, best_map=best_map, best_epoch=best_epoch, last=last_record,
                         images_per_s=total_images / max(total_train_s, 1e-9), stopped_early=stopped_early)
    emit("end", dataclasses.asdict(result))
    return result


def _train_epoch(model, loader, sampler, optimizer, scaler, config, weights, dev, precision, epoch, emit):
    """One pass over the sampler's batches of ``epoch``; returns the epoch's record (mean losses, lr, img/s)."""
    t_epoch = time.perf_counter()
    sampler.set_epoch(epoch)
    model.train()
    # The streams run in fp32 under autocast unless allowed: inference must match fp32 embeddings, but
    # training them in mixed precision (AMP on CUDA) is fine; the mode ends with the epoch, before any evaluation.
    with model.run_mode(streams_autocast=precision != "fp32"):
        _set_backbone_frozen(model, epoch < config.freeze_backbone_epochs)
        steps, sums, n_images = len(sampler), {}, 0
        for step, batch in enumerate(loader):
            batch = check_batch(batch)
            factor = _lr_at(config, epoch + step / steps)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            x = batch.images.to(dev, non_blocking=True)
            y = batch.labels.to(dev, non_blocking=True)
            with _autocast(dev, precision):
                output = model.forward_train(x)
            loss, parts = reid_loss(output.features, output.logits, output.attention, y, weights)
            if not math.isfinite(parts["loss"]):
                raise InputError(f"the loss became {parts['loss']} at epoch {epoch + 1}; lower --lr")
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            n_images += len(y)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            dt = time.perf_counter() - t_epoch
            emit("step", {"epoch": epoch + 1, "step": step + 1, "steps": steps, "lr": optimizer.param_groups[-1]["lr"],
                          "images_per_s": n_images / max(dt, 1e-9), **parts})
    train_s = time.perf_counter() - t_epoch
    return {
        "epoch": epoch + 1, "lr": optimizer.param_groups[-1]["lr"], "images": n_images,
        "images_per_s": round(n_images / max(train_s, 1e-9), 2), "train_seconds": round(train_s, 2),
        **{k: v / max(steps, 1) for k, v in sums.items()},
    }


def _evaluate(model, dataset, dev, workers, batch_size, seed, emit, epoch) -> dict[str, Any]:
    from reid.train.validate import evaluate_model

    emit("eval_start", {"epoch": epoch, "images": len(dataset.query) + len(dataset.gallery)})
    t = time.perf_counter()
    metrics = evaluate_model(model, dataset, device=dev, workers=workers, batch_size=batch_size, seed=seed)
    metrics["eval_seconds"] = round(time.perf_counter() - t, 2)
    emit("eval", {"epoch": epoch, **metrics})
    return metrics


def _save(run: _Run, model, optimizer, scaler, sampler, epoch, best_map, best_epoch, record, best) -> None:
    """Metrics line first, then the checkpoint: a crash between them is undone by truncate_after on resume."""
    run.metrics.append(record)
    state = {
        "version": STATE_VERSION, "epoch": epoch, "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {}, "sampler": sampler.state_dict(),
        "rng": rng_state(), "best_map": best_map, "best_epoch": best_epoch,
    }
    save_model_dir(model, run.last_dir, {"train_state.pt": state, "metrics.json": record})
    if best:
        save_model_dir(model, run.best_dir, {"metrics.json": record})
    log.info("epoch %d saved to %s%s", epoch, run.last_dir, " (new best)" if best else "")


def load_run_config(out: str | Path) -> TrainConfig | None:
    """The TrainConfig recorded in ``out/train.json`` (None when there is no run there)."""
    path = Path(out) / RUN_FILE
    return TrainConfig.from_dict(read_json(path).get("config", {})) if path.exists() else None


def run_summary(out: str | Path) -> dict[str, Any]:
    """train.json plus the metrics log of a run folder, for display."""
    out = Path(out)
    return {"run": json.loads((out / RUN_FILE).read_text()), "metrics": MetricsLog(out / "metrics.jsonl").records()}
