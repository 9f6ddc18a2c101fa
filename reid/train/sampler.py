"""P x K identity sampling: every batch holds P distinct identities with K images each.

The batch plan of an epoch is a pure function of ``(seed, epoch)``, so resuming a run needs
only the epoch number, and worker processes receive a per-sample augmentation seed with each
index (augmentation is then independent of the number of workers).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np

from reid.errors import DatasetError, InputError

log = logging.getLogger(__name__)

# An item handed to the dataset: (position in the training list, augmentation seed).
SampleRef = tuple[int, int]


def relabel_pids(pids: Sequence[int]) -> tuple[np.ndarray, list[int]]:
    """Map identities to contiguous labels 0..n-1 (sorted by pid); returns (labels, pid of each label)."""
    pids_arr = np.asarray(pids, dtype=np.int64)
    if pids_arr.size == 0:
        raise DatasetError("the dataset has no training images; a train split is needed to train")
    unique, labels = np.unique(pids_arr, return_inverse=True)
    return labels.astype(np.int64), [int(p) for p in unique]


class PKSampler:
    """Batch sampler yielding lists of ``(index, seed)``: P identities x K images per batch.

    Each epoch shuffles every identity's images and cuts them into chunks of K (identities
    with fewer than K images are sampled with replacement to K), then draws P identities at
    a time among those with chunks left, so an epoch visits roughly every image once.
    """

    def __init__(self, labels: Sequence[int], p: int, k: int, *, seed: int = 0) -> None:
        labels_arr = np.asarray(labels, dtype=np.int64)
        if p < 1 or k < 1:
            raise InputError(f"`batch_p` and `batch_k` must be at least 1 (got P={p}, K={k})")
        if labels_arr.size == 0:
            raise DatasetError("the dataset has no training images; a train split is needed to train")
        self.p, self.k, self.seed = int(p), int(k), int(seed)
        self.labels = labels_arr
        self._by_label = [np.flatnonzero(labels_arr == lab) for lab in np.unique(labels_arr)]
        if p > len(self._by_label):
            raise InputError(
                f"a batch of P={p} identities needs at least {p} training identities but the dataset "
                f"has {len(self._by_label)}; lower `batch_p`"
            )
        if k == 1:
            log.warning("K=1: batch-hard triplet loss finds no positive pairs; use `batch_k` >= 2")
        self.epoch = 0
        self._plan: list[list[SampleRef]] | None = None
        self._plan_epoch = -1

    @property
    def batch_size(self) -> int:
        """Images per batch (P x K)."""
        return self.p * self.k

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose (deterministic) batch plan ``__iter__`` yields."""
        self.epoch = int(epoch)

    def state_dict(self) -> dict[str, int]:
        """The sampler's whole state: plans depend only on these numbers."""
        return {"epoch": self.epoch, "seed": self.seed, "p": self.p, "k": self.k}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore the epoch (seed, P and K must match the ones this sampler was built with)."""
        for key in ("seed", "p", "k"):
            if int(state[key]) != getattr(self, key):
                raise InputError(f"sampler state has {key}={state[key]} but this sampler uses {getattr(self, key)}")
        self.set_epoch(int(state["epoch"]))

    def plan(self, epoch: int | None = None) -> list[list[SampleRef]]:
        """The list of batches of ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else int(epoch)
        if self._plan is not None and self._plan_epoch == epoch:
            return self._plan
        rng = np.random.default_rng([self.seed, epoch, 0x5EED])
        chunks: list[list[np.ndarray]] = []
        for idx in self._by_label:
            pool = rng.choice(idx, size=self.k, replace=True) if len(idx) < self.k else rng.permutation(idx)
            n_chunks = len(pool) // self.k
            chunks.append([pool[i * self.k : (i + 1) * self.k] for i in range(n_chunks)])
        remaining = np.array([len(c) for c in chunks])
        batches: list[list[int]] = []
        while int((remaining > 0).sum()) >= self.p:
            avail = np.flatnonzero(remaining > 0)
            chosen = rng.choice(avail, size=self.p, replace=False)
            batch: list[int] = []
            for lab in chosen:
                remaining[lab] -= 1
                batch.extend(int(i) for i in chunks[lab][remaining[lab]])
            batches.append(batch)
        seeds = rng.integers(0, 2**31 - 1, size=(len(batches), self.p * self.k))
        plan = [[(i, int(s)) for i, s in zip(b, row, strict=True)] for b, row in zip(batches, seeds, strict=True)]
        self._plan, self._plan_epoch = plan, epoch
        return plan

    def __iter__(self) -> Iterator[list[SampleRef]]:
        yield from self.plan()

    def __len__(self) -> int:
        return len(self.plan())
