"""Training images for the loop: decode + augment in DataLoader worker processes, P x K batches."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from reid.errors import DatasetError, ReidError
from reid.train.sampler import PKSampler, SampleRef
from reid.train.transforms import TrainTransform

log = logging.getLogger(__name__)


class TrainImages(torch.utils.data.Dataset):
    """Item ``(index, seed)`` -> (augmented image, label, index, failure reason or None)."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int], transform: TrainTransform) -> None:
        self.paths = [Path(p) for p in paths]
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, ref: SampleRef):
        from reid.images import decode_image

        i, seed = ref
        try:
            img = self.transform(decode_image(self.paths[i]), np.random.default_rng(seed))
            return img, int(self.labels[i]), i, None
        except ReidError as e:
            return None, int(self.labels[i]), i, str(e)


@dataclass
class Batch:
    """One training batch: images [B,3,H,W] float32, labels [B] int64, dataset positions [B]."""

    images: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor

    def pin_memory(self) -> Batch:
        """Page-locked copy (the DataLoader calls this when pin_memory=True, for async CUDA copies)."""
        return Batch(self.images.pin_memory(), self.labels.pin_memory(), self.index.pin_memory())


class _Collate:
    """Stack a batch; a training image that cannot be decoded stops training with its path."""

    def __call__(self, items) -> Batch | str:
        bad = [reason for img, _, _, reason in items if img is None]
        if bad:
            return bad[0]
        return Batch(
            images=torch.from_numpy(np.stack([img for img, _, _, _ in items])),
            labels=torch.tensor([lab for _, lab, _, _ in items], dtype=torch.long),
            index=torch.tensor([i for _, _, i, _ in items], dtype=torch.long),
        )


def _worker_init(_worker_id: int) -> None:
    # Decoding and augmenting one image is serial work; threads would fight the model for cores.
    torch.set_num_threads(1)
    import cv2

    cv2.setNumThreads(1)


def make_loader(
    dataset: TrainImages, sampler: PKSampler, *, workers: int, pin_memory: bool = False,
    start_method: str = "forkserver",
) -> torch.utils.data.DataLoader:
    """DataLoader over the sampler's batches; workers persist across epochs (sampler.set_epoch still applies).

    Workers start from a fresh server process by default: a worker forked from a parent that has
    already used OpenCV's thread pool can hang forever in its first cv2 call (seen with fork).
    """
    import multiprocessing

    context = multiprocessing.get_context(start_method) if workers > 0 else None
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=_Collate(),
        worker_init_fn=_worker_init if workers > 0 else None,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        pin_memory=pin_memory,
        multiprocessing_context=context,
        # The loader's own seed is unused (augmentation seeds come from the sampler); a private
        # generator keeps it from consuming the global torch RNG.
        generator=torch.Generator().manual_seed(0),
    )


def check_batch(batch: Batch | str) -> Batch:
    """Turn a collate failure message into a DatasetError."""
    if isinstance(batch, str):
        raise DatasetError(f"a training image cannot be decoded: {batch}; remove or replace the file")
    return batch
