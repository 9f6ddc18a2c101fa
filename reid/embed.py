"""Batched embedding of image files: decoding in worker processes overlaps the model's compute."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Sequence

import numpy as np
import torch

from reid.images import decode_crop, resize_crop
from reid.engine import ExportedEmbedder
from reid.errors import InputError
from reid.runtime import prepare_torch

log = logging.getLogger(__name__)


@dataclass
class EmbedResult:
    """Embeddings of the files that decoded, in input order, and the reasons the others did not."""

    features: np.ndarray  # float32 [n_ok, D], L2-normalised rows
    paths: list[Path]
    index: np.ndarray  # int64 [n_ok]: positions of ``paths`` in the input list
    failures: list[tuple[Path, str]] = field(default_factory=list)


class _Crops(torch.utils.data.Dataset):
    """Decodes one file per item; a failure is returned as a value so a batch never dies of one bad file."""

    def __init__(self, paths: Sequence[Path], size: tuple[int, int]):
        self.paths = list(paths)
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return i, *decode_crop(self.paths[i], self.size)


def _collate(items):
    ok = [(i, x) for i, x, _ in items if x is not None]
    failed = [(i, reason) for i, x, reason in items if x is None]
    idx = torch.tensor([i for i, _ in ok], dtype=torch.long)
    batch = torch.from_numpy(np.stack([x for _, x in ok])) if ok else None  # uint8 [B,H,W,3]
    return idx, batch, failed


def model_input_size(model: torch.nn.Module) -> tuple[int, int]:
    """The (H, W) crop size a model embeds (``model.input_size``)."""
    return tuple(model.input_size)


def to_model_input(batch: torch.Tensor) -> torch.Tensor:
    """uint8 crops [B,H,W,3] RGB -> float32 [B,3,H,W] in [0, 1]: the one conversion every embedding uses.

    Division by 255 rounds exactly as ``reid.images.to_unit_float`` does on the CPU (both are IEEE
    float32 divisions), so crops prepared either way give the model the same numbers.
    """
    return batch.permute(0, 3, 1, 2).float().div_(255.0)


def _mode(model: torch.nn.Module, count: int):
    """The network's inference mode for ``count`` crops: its fused copy costs ~0.1 s to build, which
    pays off over a batch, not for a crop or two."""
    from reid.model.net import AttentionBilinearNet

    if isinstance(model, AttentionBilinearNet):
        return model.run_mode(fused=count >= 8)
    return contextlib.nullcontext()


@torch.inference_mode()
def _forward(model: torch.nn.Module, x: torch.Tensor, flip: bool) -> torch.Tensor:
    """float [B,3,H,W] on the model's device -> L2-normalised embeddings (flip: sum with the mirrored crop)."""
    feats = model(x).float()
    if flip:
        feats = feats + model(x.flip(3)).float()
    return torch.nn.functional.normalize(feats, dim=1)


def _run(model: torch.nn.Module, batch: torch.Tensor, device: torch.device, flip: bool) -> torch.Tensor:
    """uint8 crops [B,H,W,3] (already resized) -> embeddings on the CPU."""
    if isinstance(model, ExportedEmbedder):  # ONNX Runtime / OpenVINO: the same numbers in, numpy out
        crops = batch.numpy()
        feats = model.embed_batch(crops)
        if flip:
            feats = feats + model.embed_batch(np.ascontiguousarray(crops[:, :, ::-1]))
        return torch.nn.functional.normalize(torch.from_numpy(feats), dim=1)
    return _forward(model, to_model_input(batch.to(device, non_blocking=True)), flip).cpu()


def _prepare(model: torch.nn.Module, device: torch.device | None) -> torch.device:
    prepare_torch()
    if isinstance(model, ExportedEmbedder):
        return torch.device("cpu")
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.to(device).eval()
    return device


def embed_batch(model: torch.nn.Module, crops: np.ndarray, *, device: torch.device | None = None,
                total: int | None = None) -> np.ndarray:
    """One batch of ``embed_paths``'s model calls: uint8 crops [B,H,W,3] already at the model's size ->
    float32 [B, D], L2-normalised. ``total``: how many crops the whole run embeds (the inference mode is
    chosen by it, as ``embed_paths`` chooses it by its file count), for callers that decode elsewhere and
    embed batch by batch (``reid.distributed``'s model workers)."""
    device = _prepare(model, device)
    with _mode(model, len(crops) if total is None else total):
        return _run(model, torch.from_numpy(np.ascontiguousarray(crops)), device, False).numpy()


def auto_workers(device: torch.device) -> int:
    """Decoding processes for ``workers=None``: none on a CPU of one or two cores, more with more.

    On two cores the model's two threads already use the machine, and worker processes only take
    turns with them: ``index_folder`` ran at ~86% of the model's speed with two workers and ~98%
    decoding in the main process (128x64 JPEGs, ``benchmarks/bench_index.py``). With CUDA the CPU
    is free for decoding.
    """
    cores = os.cpu_count() or 1
    if device.type == "cuda":
        return min(8, cores)
    return 0 if cores <= 2 else min(4, cores // 4)


def embed_arrays(
    model: torch.nn.Module,
    images: np.ndarray | torch.Tensor,
    *,
    batch_size: int = 32,
    device: torch.device | None = None,
    flip: bool = False,
) -> np.ndarray:
    """Embed prepared crops (float [N,3,H,W] in [0,1], already at the model's size) -> float32 [N, D], L2-normalised.

    For tensors made in memory (benchmarks, training batches); image files and decoded crops go
    through ``embed_paths`` / ``embed_images``.
    """
    if isinstance(model, ExportedEmbedder):
        raise InputError("embed_arrays takes a torch model; an exported one embeds uint8 crops (embed_images)")
    device = _prepare(model, device)
    images = torch.as_tensor(images, dtype=torch.float32)
    with _mode(model, len(images)):
        out = [_forward(model, images[s : s + batch_size].to(device), flip).cpu()
               for s in range(0, len(images), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, model.embed_dim), np.float32)


def embed_images(
    model: torch.nn.Module,
    images: Sequence[np.ndarray],
    *,
    batch_size: int = 32,
    device: torch.device | None = None,
    flip: bool = False,
) -> np.ndarray:
    """Embed decoded uint8 HxWx3 RGB images of any size -> float32 [N, D], L2-normalised.

    The same resize, conversion and model call as ``embed_paths``: a query crop and the same crop
    indexed from its file get the same embedding.
    """
    device = _prepare(model, device)
    size = model_input_size(model)
    out = []
    with _mode(model, len(images)):
        for s in range(0, len(images), batch_size):
            batch = np.stack([resize_crop(img, size) for img in images[s : s + batch_size]])
            out.append(_run(model, torch.from_numpy(batch), device, flip))
    return torch.cat(out).numpy() if out else np.zeros((0, model.embed_dim), np.float32)


def embed_paths(
    model: torch.nn.Module,
    paths: Sequence[str | os.PathLike],
    *,
    batch_size: int = 32,
    workers: int | None = None,
    device: torch.device | None = None,
    progress: Callable[[int], None] | None = None,
    flip: bool = False,
    on_batch: Callable[[list[Path], np.ndarray, list[tuple[Path, str]]], None] | None = None,
) -> EmbedResult:
    """Decode (in ``workers`` processes, ``None``: ``auto_workers``) and embed ``paths`` in batches; bad
    files become ``failures``.

    ``progress(n)`` is called with the number of images handled in each batch. ``on_batch(paths,
    features, failures)`` sees every batch as soon as it is embedded, so callers can persist work
    incrementally (an interrupted run then loses at most one batch).
    """
    paths = [Path(p) for p in paths]
    device = _prepare(model, device)
    if workers is None:
        workers = auto_workers(device)
    loader = torch.utils.data.DataLoader(
        _Crops(paths, model_input_size(model)),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers > 0 else None,
    )
    feats: list[np.ndarray] = []
    index: list[np.ndarray] = []
    failures: list[tuple[Path, str]] = []
    dim = model.embed_dim
    with _mode(model, len(paths)):
        for idx, batch, failed in loader:
            batch_failures = [(paths[i], reason) for i, reason in failed]
            for _, reason in batch_failures:
                log.warning("skipped %s", reason)
            failures.extend(batch_failures)
            f = _run(model, batch, device, flip).numpy() if batch is not None else np.zeros((0, dim), np.float32)
            if len(f):
                feats.append(f)
                index.append(idx.numpy())
            if on_batch is not None:
                on_batch([paths[i] for i in idx.tolist()], f, batch_failures)
            if progress is not None:
                progress(len(idx) + len(failed))
    index_arr = np.concatenate(index) if index else np.zeros(0, np.int64)
    return EmbedResult(
        features=np.concatenate(feats) if feats else np.zeros((0, dim), np.float32),
        paths=[paths[i] for i in index_arr.tolist()],
        index=index_arr,
        failures=failures,
    )
