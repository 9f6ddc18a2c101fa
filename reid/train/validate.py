"""Validation during training: embed the dataset's query and gallery, then score with ``reid evaluate``'s scorer."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from reid.errors import DatasetError

log = logging.getLogger(__name__)


def validate(
    model: torch.nn.Module,
    dataset: Any,
    *,
    device: torch.device,
    workers: int | None = None,
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """``Score.summary()`` of ``model`` on ``dataset.query`` x ``dataset.gallery`` under the dataset's protocol.

    Each distinct file is embedded once (CUHK03 classic queries are gallery images too); ``seed`` seeds
    the CUHK03 classic draws. Nothing is cached: the weights change between validations.
    """
    from reid.embed import embed_paths
    from reid.evaluation.feature_cache import FeatureTable
    from reid.evaluation.scorer import FeatureSet, ScoreOptions, score

    if not dataset.query or not dataset.gallery:
        raise DatasetError(f"dataset {dataset.name!r} has no query/gallery split to evaluate on; "
                           "train it with `eval_every=0`")
    paths = list(dict.fromkeys(str(s.path) for s in (*dataset.query, *dataset.gallery)))
    emb = embed_paths(model, paths, batch_size=batch_size, workers=workers, device=device, progress=progress)
    if emb.failures:
        log.warning("evaluation skipped %d undecodable images", len(emb.failures))
    features = FeatureSet.from_table(dataset, FeatureTable.of(emb.paths, emb.features, emb.failures))
    return score(features, protocol=dataset.protocol, options=ScoreOptions(seed=seed)).summary()
