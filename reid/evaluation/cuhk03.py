"""The CUHK03 classic single-gallery-shot metric, with reproducible (seeded) sampling.

For each query and each repeat, one valid gallery item is drawn per identity (torchreid's
``eval_cuhk03``); the CMC is averaged over repeats and valid queries. mAP and mINP use all valid
gallery items, as torchreid does. The draw is defined exactly, so any implementation can reproduce it:
``rng = np.random.default_rng(seed)``; for each repeat, ``u = rng.random((num_queries, num_ids))``
(``num_ids`` = distinct gallery identities other than -1, ascending); identity ``p`` of query ``q``
contributes its ``floor(u[q, p] * n)``-th valid item in gallery-index order, where ``n`` counts them
(for the query's own identity only items from other cameras are valid).
"""

from __future__ import annotations

import logging

import numpy as np

from reid.errors import InputError
from reid.evaluation._ranks import MatchRanker, as_ids, build_protocol
from reid.evaluation.ranking import RankingResult, as_distmat, check_options, summarise

log = logging.getLogger(__name__)

# Queries are sampled in blocks of about this many (query, identity) draws, bounding memory.
_DRAW_BLOCK = 1 << 22


def check_sampling(repeats: int, seed: int) -> tuple[int, int]:
    """Validate the draws' ``repeats`` and ``seed``; returns them as ints."""
    if isinstance(repeats, bool) or int(repeats) != repeats or repeats < 1:
        raise InputError(f"`repeats` must be a positive integer, got {repeats!r}")
    if isinstance(seed, bool) or int(seed) != seed or seed < 0:
        raise InputError(f"`seed` must be a non-negative integer, got {seed!r}")
    return int(repeats), int(seed)


def evaluate_cuhk03_classic(
    distmat,
    q_pids,
    g_pids,
    q_camids,
    g_camids,
    *,
    max_rank: int = 50,
    repeats: int = 10,
    seed: int = 0,
) -> RankingResult:
    """Single-gallery-shot CMC (one sampled gallery item per identity, ``repeats`` draws) + mAP/mINP.

    Same validity rules as evaluate_ranking (same identity + same camera and identity -1 ignored)
    and the same tie rule (equal distances ordered by gallery index). Seeded: equal inputs and seed
    give equal results; the seed and repeats are reported in the result.
    """
    max_rank = check_options(max_rank)
    repeats, seed = check_sampling(repeats, seed)
    d = as_distmat(distmat)
    protocol = build_protocol(q_pids, g_pids, q_camids, g_camids, shape=d.shape)
    ranker = MatchRanker(protocol)
    ranker.add(0, d)
    full = summarise(protocol, ranker.result(), max_rank)  # mAP, mINP over all valid items

    gp = as_ids(g_pids, "g_pids")
    qp = as_ids(q_pids, "q_pids")
    usable = np.flatnonzero(gp != -1)
    by_id = usable[np.argsort(gp[usable], kind="stable")]
    ids, id_first, id_count = np.unique(gp[by_id], return_index=True, return_counts=True)
    m = protocol.matches_per_query
    valid = np.flatnonzero(m > 0)
    own = np.searchsorted(ids, qp[valid])  # valid queries' identities are gallery identities
    nv, num_ids = valid.shape[0], ids.shape[0]

    hist = np.zeros(num_ids + 1, dtype=np.int64)
    rng = np.random.default_rng(seed)
    step = max(1, _DRAW_BLOCK // max(1, num_ids))
    for _ in range(repeats):
        for a in range(0, protocol.num_queries, step):
            u = rng.random((min(step, protocol.num_queries - a), num_ids))
            sel = (valid >= a) & (valid < a + u.shape[0])
            if not sel.any():
                continue
            q, u, own_q = valid[sel], u[valid[sel] - a], own[sel]
            pick = np.minimum((u * id_count).astype(np.int64), id_count - 1)
            chosen = by_id[id_first + pick]
            mq = m[q]
            own_pick = np.minimum((u[np.arange(q.shape[0]), own_q] * mq).astype(np.int64), mq - 1)
            match_col = protocol.match_col[protocol.match_start[q] + own_pick]
            chosen[np.arange(q.shape[0]), own_q] = match_col
            dist = d[q[:, None], chosen]
            dm = dist[np.arange(q.shape[0]), own_q][:, None]
            before = (dist < dm) | ((dist == dm) & (chosen < match_col[:, None]))
            before[np.arange(q.shape[0]), own_q] = False
            hist += np.bincount(before.sum(axis=1), minlength=num_ids + 1)
    cmc_full = np.cumsum(hist) / float(nv * repeats)
    cmc = np.ones(max_rank)
    cmc[: min(max_rank, cmc_full.shape[0])] = cmc_full[:max_rank]
    log.debug("CUHK03 classic: %d valid queries, %d identities, %d repeats, seed %d", nv, num_ids, repeats, seed)
    return RankingResult(
        cmc=cmc,
        mAP=full.mAP,
        mINP=full.mINP,
        num_queries=protocol.num_queries,
        num_valid_queries=nv,
        protocol="cuhk03-classic",
        seed=seed,
        repeats=repeats,
        query_ap=full.query_ap,
        query_first_rank=full.query_first_rank,
    )
