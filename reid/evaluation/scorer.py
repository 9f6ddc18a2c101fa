"""The one scorer: query and gallery features with their ids -> metrics under a dataset's protocol.

``reid evaluate`` and validation during training both score through ``score``: the same cosine
distance (``cosine_distance`` / ``evaluate_features``), the same protocol constants (the dataset's
``protocol``), and one report shape (``Score.summary``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from reid.errors import DatasetError, InputError
from reid.evaluation.cuhk03 import check_sampling, evaluate_cuhk03_classic
from reid.evaluation.feature_cache import FeatureTable
from reid.evaluation.ranking import RankingResult, check_options, cosine_distance, evaluate_features, evaluate_ranking

log = logging.getLogger(__name__)

# RankingResult.to_dict keys that label how a result was computed; the report states those once itself.
_LABELS = ("protocol", "ap", "seed", "repeats")


@dataclass
class FeatureSet:
    """Query and gallery features with identities, cameras and paths: all the metrics need."""

    query_features: np.ndarray
    gallery_features: np.ndarray
    query_pids: np.ndarray
    gallery_pids: np.ndarray
    query_camids: np.ndarray
    gallery_camids: np.ndarray
    query_paths: list[str]
    gallery_paths: list[str]

    @classmethod
    def from_table(cls, dataset, table: FeatureTable) -> FeatureSet:
        """A dataset's query and gallery rows picked out of ``table`` (files that failed to decode dropped)."""
        qf, qp, qc, qpaths = _side(dataset.query, table)
        gf, gp, gc, gpaths = _side(dataset.gallery, table)
        if not qpaths or not gpaths:
            raise DatasetError(
                f"{dataset.name}: no usable {'query' if not qpaths else 'gallery'} images "
                f"({len(table.failures)} files failed to decode); check the dataset files"
            )
        return cls(qf, gf, qp, gp, qc, gc, qpaths, gpaths)

    @property
    def ids(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(query pids, gallery pids, query camids, gallery camids), in the metrics' argument order."""
        return self.query_pids, self.gallery_pids, self.query_camids, self.gallery_camids


def _side(samples, table: FeatureTable) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    rows = table.rows([s.path for s in samples])
    keep = rows >= 0
    kept = [s for s, k in zip(samples, keep, strict=True) if k]
    dim = table.features.shape[1] if table.features.ndim == 2 else 0
    feats = table.features[rows[keep]] if kept else np.zeros((0, dim), np.float32)
    return (
        feats,
        np.array([s.pid for s in kept], dtype=np.int64),
        np.array([s.camid for s in kept], dtype=np.int64),
        [str(s.path) for s in kept],
    )


@dataclass(frozen=True)
class ScoreOptions:
    """How features are scored: re-ranking, AP definition, CMC length, and CUHK03 classic sampling."""

    rerank: bool = False
    ap: str = "standard"
    max_rank: int = 50
    seed: int = 0  # CUHK03 classic: seed of the single-gallery-shot draws
    repeats: int = 10  # CUHK03 classic: draws averaged

    def __post_init__(self) -> None:
        check_options(self.max_rank, self.ap)
        check_sampling(self.repeats, self.seed)


@dataclass(frozen=True, eq=False)
class Score:
    """The metrics of one query x gallery split, and its re-ranked distances when re-ranking was asked for."""

    result: RankingResult
    distmat: np.ndarray | None = None

    def summary(self) -> dict:
        """The report's numbers: mAP, mINP, rank-1/5/10/20, the CMC and the query counts (JSON-ready)."""
        return {k: v for k, v in self.result.to_dict().items() if k not in _LABELS}


def score(fs: FeatureSet, *, protocol: str, options: ScoreOptions = ScoreOptions()) -> Score:
    """Metrics of ``fs`` under ``protocol`` (a dataset's: ``reid.datasets.PROTOCOL_*``)."""
    from reid.datasets.base import PROTOCOL_CUHK03_CLASSIC, PROTOCOL_STANDARD

    if protocol not in (PROTOCOL_STANDARD, PROTOCOL_CUHK03_CLASSIC):
        raise InputError(f"unknown protocol {protocol!r}; expected {PROTOCOL_STANDARD} or {PROTOCOL_CUHK03_CLASSIC}")
    o = options
    distmat = None
    if o.rerank:
        from reid.evaluation.rerank import re_rank

        distmat = re_rank(fs.query_features, fs.gallery_features)
    if protocol == PROTOCOL_CUHK03_CLASSIC:
        dist = distmat if distmat is not None else cosine_distance(fs.query_features, fs.gallery_features)
        result = evaluate_cuhk03_classic(dist, *fs.ids, max_rank=o.max_rank, repeats=o.repeats, seed=o.seed)
    elif distmat is not None:
        result = evaluate_ranking(distmat, *fs.ids, max_rank=o.max_rank, ap=o.ap)
    else:
        result = evaluate_features(fs.query_features, fs.gallery_features, *fs.ids, max_rank=o.max_rank, ap=o.ap)
    return Score(result, distmat)
