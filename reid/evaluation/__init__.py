"""Re-id evaluation: CMC, mAP and mINP from the ranks of the true matches, re-ranking, the feature cache,
the one scorer (``reid evaluate`` and training validation) and the evaluate flow.

Modules: ``ranking`` / ``cuhk03`` / ``_ranks`` (the metrics), ``rerank`` (k-reciprocal re-ranking),
``feature_cache`` (embeddings on disk), ``scorer`` (features + ids -> metrics under a dataset's
protocol), ``evaluate`` (dataset + model -> features -> scores -> report).

Market-1501 protocol (also CUHK03 new protocol, CUHK03-NP, DukeMTMC-reID): for each query, gallery
items with the same identity and the same camera are ignored, identity -1 (junk) is ignored, identity
0 (distractors) stays as negatives. Smaller distance = closer; equal distances are ordered by gallery
index (the order of a stable argsort), in every code path. Queries without a valid true match are left
out of every metric and counted in ``num_queries - num_valid_queries``. CMC always has ``max_rank``
entries, saturating when the gallery is smaller.
"""

from reid.evaluation.cuhk03 import evaluate_cuhk03_classic
from reid.evaluation.ranking import (
    AP_MODES,
    RankingResult,
    cosine_distance,
    evaluate_features,
    evaluate_ranking,
)
from reid.evaluation.scorer import FeatureSet, Score, ScoreOptions, score

__all__ = [
    "AP_MODES",
    "FeatureSet",
    "RankingResult",
    "Score",
    "ScoreOptions",
    "cosine_distance",
    "evaluate_cuhk03_classic",
    "evaluate_features",
    "evaluate_ranking",
    "score",
]
