"""CMC, mAP and mINP under the Market-1501 protocol, from a distance matrix or from features."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from reid.errors import InputError
from reid.evaluation._ranks import MatchRanker, Protocol, build_protocol

log = logging.getLogger(__name__)

AP_MODES = ("standard", "trapezoid")
# evaluate_features computes distances in query blocks of about this many entries (128 MiB in float32).
BLOCK_ELEMENTS = 1 << 25
_NORM_TOLERANCE = 1e-4
_REPORTED_RANKS = (1, 5, 10, 20)


@dataclass(frozen=True, eq=False)
class RankingResult:
    """Metrics of one query x gallery evaluation; ``cmc[k-1]`` is the CMC at rank k.

    ``query_ap`` and ``query_first_rank`` are per query (NaN / -1 for queries without a valid match);
    ``seed`` and ``repeats`` are set by the CUHK03 classic (sampled) metric.
    """

    cmc: np.ndarray
    mAP: float
    mINP: float
    num_queries: int
    num_valid_queries: int
    ap: str = "standard"
    protocol: str = "market1501"
    seed: int | None = None
    repeats: int | None = None
    query_ap: np.ndarray | None = field(default=None, repr=False)
    query_first_rank: np.ndarray | None = field(default=None, repr=False)

    @property
    def num_invalid_queries(self) -> int:
        """Queries left out because the gallery holds no valid true match for them."""
        return self.num_queries - self.num_valid_queries

    def rank(self, k: int) -> float:
        """CMC at rank ``k`` (1-based)."""
        if not 1 <= k <= len(self.cmc):
            raise InputError(f"rank {k} is outside 1..{len(self.cmc)} (the max_rank of this evaluation)")
        return float(self.cmc[k - 1])

    def to_dict(self) -> dict:
        """JSON-ready summary: mAP, mINP, rank-1/5/10/20, the whole CMC, counts and the protocol."""
        out = {
            "protocol": self.protocol,
            "ap": self.ap,
            "mAP": float(self.mAP),
            "mINP": float(self.mINP),
            **{f"rank{k}": float(self.cmc[k - 1]) for k in _REPORTED_RANKS if k <= len(self.cmc)},
            "cmc": [float(v) for v in self.cmc],
            "num_queries": int(self.num_queries),
            "num_valid_queries": int(self.num_valid_queries),
        }
        if self.seed is not None:
            out.update(seed=int(self.seed), repeats=int(self.repeats))
        return out


def check_options(max_rank: int, ap: str = "standard") -> int:
    """Validate ``max_rank`` and ``ap``; returns max_rank as an int."""
    if ap not in AP_MODES:
        raise InputError(f"`ap` must be one of {', '.join(AP_MODES)}, got {ap!r}")
    if isinstance(max_rank, bool) or int(max_rank) != max_rank or max_rank < 1:
        raise InputError(f"max_rank must be a positive integer, got {max_rank!r}")
    return int(max_rank)


def as_distmat(distmat) -> np.ndarray:
    """A 2-D real-valued numpy view of ``distmat`` (numpy array, list, or CPU tensor)."""
    d = np.asarray(distmat)
    if d.ndim != 2:
        raise InputError(f"the distance matrix must be 2-D (queries x gallery), got shape {d.shape}")
    if d.dtype.kind not in "fiub":
        raise InputError(f"the distance matrix must hold real numbers, got dtype {d.dtype}")
    return d


def summarise(protocol: Protocol, ranks: np.ndarray, max_rank: int, ap: str = "standard") -> RankingResult:
    """CMC / mAP / mINP from the ranks of the true matches (0-based, among each query's valid items)."""
    p = protocol
    m = p.matches_per_query
    valid = m > 0
    num_valid = int(valid.sum())
    if num_valid == 0:
        raise InputError(f"none of the {p.num_queries} queries has a true match in the gallery (same identity, "
                         "other camera): check that query and gallery identities and cameras are right")
    order = np.lexsort((ranks, p.match_row))
    r = ranks[order].astype(np.float64)
    starts = p.match_start[:-1][valid]
    nth = np.arange(r.shape[0], dtype=np.float64) - np.repeat(p.match_start[:-1], m) + 1.0  # 1-based
    precision = nth / (r + 1.0)
    if ap == "standard":
        per_match = precision
    else:  # compute_AP.m: trapezoids between the precision before and at each true match
        before = np.where(r > 0, (nth - 1.0) / np.maximum(r, 1.0), 1.0)
        per_match = (before + precision) / 2.0
    query_ap = np.full(p.num_queries, np.nan)
    query_ap[valid] = np.add.reduceat(per_match, starts) / m[valid]
    first = ranks[order][starts]
    last = r[starts + m[valid] - 1]
    query_first = np.full(p.num_queries, -1, dtype=np.int64)
    query_first[valid] = first
    hist = np.bincount(np.minimum(first, max_rank), minlength=max_rank + 1)[:max_rank]
    cmc = np.cumsum(hist) / num_valid
    if num_valid < p.num_queries:
        log.info("%d of %d queries have no valid match and are left out", p.num_queries - num_valid, p.num_queries)
    return RankingResult(
        cmc=cmc,
        mAP=float(np.mean(query_ap[valid])),
        mINP=float(np.mean(m[valid] / (last + 1.0))),
        num_queries=p.num_queries,
        num_valid_queries=num_valid,
        ap=ap,
        query_ap=query_ap,
        query_first_rank=query_first,
    )


def evaluate_ranking(
    distmat,
    q_pids,
    g_pids,
    q_camids,
    g_camids,
    *,
    max_rank: int = 50,
    ap: str = "standard",
    method: str = "auto",
) -> RankingResult:
    """Market-1501 protocol metrics of a query x gallery distance matrix (smaller = closer).

    For each query, gallery items of the same identity and camera, and items of identity -1, are
    ignored; identity 0 (distractors) stays as negatives. Ties are ordered by gallery index (a stable
    argsort). ``ap="trapezoid"`` reproduces the official MATLAB ``compute_AP.m``. ``method`` only picks
    the algorithm ("auto", "candidates", "sort"); every method gives identical results.
    """
    max_rank = check_options(max_rank, ap)
    d = as_distmat(distmat)
    protocol = build_protocol(q_pids, g_pids, q_camids, g_camids, shape=d.shape)
    ranker = MatchRanker(protocol, method)
    ranker.add(0, d)
    log.debug("ranked %d true matches (%d sub-blocks by candidates, %d by sorting)",
              protocol.match_row.shape[0], ranker.candidate_blocks, ranker.dense_blocks)
    return summarise(protocol, ranker.result(), max_rank, ap)


def unit_rows(feats, name: str) -> np.ndarray:
    """Features as float32 rows of unit L2 norm; copied and normalised only when they are not already."""
    x = np.asarray(feats)
    if x.ndim != 2:
        raise InputError(f"{name} must be a 2-D array (items x dims), got shape {x.shape}")
    x = np.asarray(x, dtype=np.float32)
    norms = np.empty(x.shape[0], dtype=np.float32)
    step = max(1, (1 << 22) // max(1, x.shape[1]))
    for a in range(0, x.shape[0], step):
        c = x[a : a + step]
        norms[a : a + step] = np.sqrt(np.einsum("ij,ij->i", c, c))
    if not np.isfinite(norms).all():
        bad = int(np.flatnonzero(~np.isfinite(norms))[0])
        raise InputError(f"{name} hold NaN or infinite values (first bad row {bad})")
    if x.shape[0] == 0 or np.abs(norms - 1.0).max() <= _NORM_TOLERANCE:
        return x
    if (norms == 0).any():
        bad = int(np.flatnonzero(norms == 0)[0])
        raise InputError(f"{name}: row {bad} is all zeros, and a zero feature has no direction")
    log.info("%s are not L2-normalised: normalising a copy", name)
    return x / norms[:, None]


def _cosine_block(q: np.ndarray, g: np.ndarray) -> np.ndarray:
    s = q @ g.T
    np.subtract(np.float32(1.0), s, out=s)
    return s


def _block_rows(num_queries: int, num_gallery: int, block_size: int | None) -> int:
    if block_size is None:
        return max(1, min(max(1, num_queries), BLOCK_ELEMENTS // max(1, num_gallery)))
    if isinstance(block_size, bool) or int(block_size) != block_size or block_size < 1:
        raise InputError(f"block_size must be a positive integer, got {block_size!r}")
    return int(block_size)


def _check_dims(q: np.ndarray, g: np.ndarray) -> None:
    if q.shape[1] != g.shape[1]:
        raise InputError(f"query features have {q.shape[1]} dims but gallery features have {g.shape[1]}: "
                         "they must come from the same model")


def cosine_distance(q_feats, g_feats, *, block_size: int | None = None) -> np.ndarray:
    """Full float32 cosine distance ``1 - q.g`` of (normalised) features, computed as evaluate_features does."""
    q, g = unit_rows(q_feats, "query features"), unit_rows(g_feats, "gallery features")
    _check_dims(q, g)
    out = np.empty((q.shape[0], g.shape[0]), dtype=np.float32)
    step = _block_rows(q.shape[0], g.shape[0], block_size)
    for a in range(0, q.shape[0], step):
        out[a : a + step] = _cosine_block(q[a : a + step], g)
    return out


def evaluate_features(
    q_feats,
    g_feats,
    q_pids,
    g_pids,
    q_camids,
    g_camids,
    *,
    max_rank: int = 50,
    ap: str = "standard",
    block_size: int | None = None,
    method: str = "auto",
) -> RankingResult:
    """evaluate_ranking on the cosine distance of the features, computed block by block of queries.

    The full query x gallery matrix is never held: memory is the features plus one block of
    ``block_size`` query rows (default: about 128 MiB of distances).
    """
    max_rank = check_options(max_rank, ap)
    q, g = unit_rows(q_feats, "query features"), unit_rows(g_feats, "gallery features")
    _check_dims(q, g)
    protocol = build_protocol(q_pids, g_pids, q_camids, g_camids, shape=(q.shape[0], g.shape[0]))
    ranker = MatchRanker(protocol, method)
    step = _block_rows(q.shape[0], g.shape[0], block_size)
    for a in range(0, q.shape[0], step):
        ranker.add(a, _cosine_block(q[a : a + step], g))
    return summarise(protocol, ranker.result(), max_rank, ap)
