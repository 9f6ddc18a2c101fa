"""Periodic evaluation during training: embed the dataset's query/gallery, score with reid.metrics."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from reid.errors import DatasetError

log = logging.getLogger(__name__)


def evaluate_model(
    model: torch.nn.Module,
    dataset: Any,
    *,
    device: torch.device,
    workers: int | None = None,
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """mAP, rank-1/5/10 and mINP of ``model`` on ``dataset.query`` x ``dataset.gallery`` (cosine)."""
    from reid.embed import embed_paths
    from reid.metrics import evaluate_cuhk03_classic, evaluate_features

    if not dataset.query or not dataset.gallery:
        raise DatasetError(f"dataset {dataset.name!r} has no query/gallery split to evaluate on; use --eval-every 0")
    same = dataset.query is dataset.gallery or [s.path for s in dataset.query] == [s.path for s in dataset.gallery]
    q = embed_paths(model, [s.path for s in dataset.query], batch_size=batch_size, workers=workers,
                    device=device, progress=progress)
    g = q if same else embed_paths(model, [s.path for s in dataset.gallery], batch_size=batch_size,
                                   workers=workers, device=device, progress=progress)
    if q.failures or g.failures:
        log.warning("evaluation skipped %d undecodable images", len(q.failures) + len(g.failures))
    q_pids = np.array([dataset.query[i].pid for i in q.index], dtype=np.int64)
    q_cams = np.array([dataset.query[i].camid for i in q.index], dtype=np.int64)
    g_pids = np.array([dataset.gallery[i].pid for i in g.index], dtype=np.int64)
    g_cams = np.array([dataset.gallery[i].camid for i in g.index], dtype=np.int64)
    if getattr(dataset, "protocol", "standard") == "cuhk03-classic":
        distmat = 1.0 - q.features @ g.features.T
        result = evaluate_cuhk03_classic(distmat, q_pids, g_pids, q_cams, g_cams, seed=seed)
    else:
        result = evaluate_features(q.features, g.features, q_pids, g_pids, q_cams, g_cams)
    cmc = np.asarray(result.cmc, dtype=np.float64)

    def rank(k: int) -> float:
        return float(cmc[min(k, len(cmc)) - 1]) if len(cmc) else 0.0

    return {
        "mAP": float(result.mAP),
        "rank1": rank(1),
        "rank5": rank(5),
        "rank10": rank(10),
        "mINP": float(result.mINP),
        "num_valid_queries": int(result.num_valid_queries),
    }
