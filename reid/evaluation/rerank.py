"""k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with k-reciprocal
Encoding", CVPR 2017) that scales: blockwise top-k neighbours and sparse matrices, never an N x N array.

It computes what the authors' ``re_ranking`` code computes, over all N = queries + gallery items:

- original distance: the squared Euclidean distance of L2-normalised features, ``d2 = 2 - 2 cos``
  (clipped at 0), each row divided by its maximum over all N items (the authors' ``original_dist /
  max`` on their symmetric matrix);
- ``N(i, k)``: the k nearest items of i, i itself included (ties: lower index first);
- ``R(i)``: the k-reciprocal set with k = k1 + 1; each candidate c in R(i) adds its half set
  ``R_half(c)`` (k = round(k1 / 2) + 1, numpy rounding) when ``|R_half(c) & R(i)| > 2/3 |R_half(c)|``;
- V: row i holds ``exp(-original)`` over that expanded set, normalised to sum 1 (sparse);
  local query expansion replaces row i by the mean of the rows of its k2 nearest items;
- Jaccard distance ``1 - sum(min(V_i, V_j)) / (2 - sum(min(V_i, V_j)))``, via inverted lists (only
  pairs sharing a non-zero column contribute);
- final = jaccard * (1 - lambda) + original * lambda, for query rows and gallery columns.

Differences from the authors' code, on purpose: V is float32, not float16 (their memory trick; ours is
sparse), and ties among neighbours are broken by index instead of by an unstable sort.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import sparse

from reid.errors import InputError
from reid.evaluation._ranks import float32_order_keys
from reid.evaluation.ranking import unit_rows

log = logging.getLogger(__name__)

# Rows of the similarity matrix are computed this many entries at a time (64 MiB in float32).
BLOCK_ELEMENTS = 1 << 24
# The Jaccard step expands (query, column, gallery item) triples in chunks of about this many.
TRIPLE_CHUNK = 1 << 22
# ... and at most this many query x gallery entries at a time.
ROW_CHUNK_ELEMENTS = 1 << 21
_U64 = np.uint64


def re_rank(q_feats, g_feats, *, k1: int = 20, k2: int = 6, lambda_value: float = 0.3) -> np.ndarray:
    """Re-ranked query x gallery distance (float32, smaller = closer) of the two feature sets."""
    k1, k2 = _positive_int(k1, "k1"), _positive_int(k2, "k2")
    if not 0.0 <= float(lambda_value) <= 1.0:
        raise InputError(f"lambda_value must be within [0, 1], got {lambda_value!r}")
    q = unit_rows(q_feats, "query features")
    g = unit_rows(g_feats, "gallery features")
    if q.shape[1] != g.shape[1]:
        raise InputError(f"query features have {q.shape[1]} dims but gallery features have {g.shape[1]}")
    nq, ng = q.shape[0], g.shape[0]
    if nq == 0 or ng == 0:
        return np.zeros((nq, ng), dtype=np.float32)
    x = np.concatenate([q, g]).astype(np.float32, copy=False)
    knn, row_max, final, ks = _neighbours_for(x, nq, k1, k2)
    # final holds the query x gallery cosine similarities; turn them into the original distance.
    final *= np.float32(-2.0)
    final += np.float32(2.0)
    np.maximum(final, np.float32(0.0), out=final)
    final /= row_max[:nq, None]
    if float(lambda_value) == 1.0:
        return final
    _blend_jaccard(_encoding(x, knn, row_max, ks), nq, final, float(lambda_value))
    return final


def jaccard_distances(features, *, k1: int = 20, k2: int = 6) -> np.ndarray:
    """N x N k-reciprocal Jaccard distance (float32) among one set of features: the re-ranking encoding
    of every item against every other, as cluster-contrast adaptation clusters on (dense: N up to ~20k)."""
    k1, k2 = _positive_int(k1, "k1"), _positive_int(k2, "k2")
    x = unit_rows(features, "features").astype(np.float32, copy=False)
    n = x.shape[0]
    if n == 0:
        return np.zeros((0, 0), dtype=np.float32)
    knn, row_max, _, ks = _neighbours_for(x, 0, k1, k2)
    v = _encoding(x, knn, row_max, ks)
    out = np.zeros((n, n), dtype=np.float32)
    _blend_jaccard(sparse.vstack([v, v]).tocsr(), n, out, 0.0)  # every row against every row
    return np.clip(out, 0.0, 1.0, out=out)  # rounding leaves -1e-7 on the diagonal


def _neighbours_for(x: np.ndarray, nq: int, k1: int, k2: int):
    """Neighbour lists for re-ranking parameters k1, k2 -> (knn, row_max, query x gallery sims, ks)."""
    n = x.shape[0]
    ks = (min(k1 + 1, n), min(int(np.around(k1 / 2)) + 1, n), min(k2, n), k2)  # main, half, expansion, k2
    knn, row_max, sims = _neighbours(x, nq, max(ks[0], ks[2]))
    return knn, row_max, sims, ks


def _encoding(x: np.ndarray, knn: np.ndarray, row_max: np.ndarray, ks) -> sparse.csr_matrix:
    """V: the k-reciprocal encoding of every item, with local query expansion unless k2 is 1."""
    k_main, k_half, k_qe, k2 = ks
    v = _expanded_weights(x, knn, row_max, k_main, k_half)
    if k2 != 1:
        v = _query_expansion(knn, k_qe, x.shape[0]) @ v
    return v.tocsr()


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _neighbours(x: np.ndarray, nq: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Over blocks of x @ x.T (each pair computed once: the matrix is symmetric), the k nearest items
    of each row (nearest first, ties by lower index), each row's largest squared distance (1 where
    all are 0), and the query x gallery similarities."""
    n = x.shape[0]
    id_bits = max(1, int(n).bit_length())
    if id_bits > 26:
        raise InputError(f"re-ranking supports fewer than 2^26 items in all, got {n}")
    step = max(1, min(n, BLOCK_ELEMENTS // n))
    floor = _initial_floor(x, k, step)
    best_id = np.full((n, k), n, dtype=np.int64)  # id n: no neighbour yet
    best_sim = np.full((n, k), -np.inf, dtype=np.float32)
    row_min = np.full(n, np.inf, dtype=np.float32)
    qg = np.empty((nq, n - nq), dtype=np.float32)
    for a in range(0, n, step):
        b = min(n, a + step)
        s = x[a:b] @ x[a:].T  # this block's rows against every item from a on
        if a < nq:
            qg[a : min(b, nq)] = s[: min(b, nq) - a, nq - a :]
        np.minimum(row_min[a:b], s.min(axis=1), out=row_min[a:b])
        # Only entries at or above a lower bound of the row's final k-th best can be neighbours.
        r, c = _nonzero(s >= np.maximum(floor[a:b], best_sim[a:b, -1])[:, None])
        _merge(best_id, best_sim, a + r, a + c, s[r, c], id_bits)
        if b < n:  # the same similarities seen from the later items' side
            right = s[:, b - a :]
            np.minimum(row_min[b:], right.min(axis=0), out=row_min[b:])
            r, c = _nonzero(right >= np.maximum(floor[b:], best_sim[b:, -1])[None, :])
            _merge(best_id, best_sim, b + c, a + r, right[r, c], id_bits)
    row_max = np.maximum(2.0 - 2.0 * row_min, 0.0)
    row_max[row_max == 0] = 1.0
    return best_id, row_max, qg


def _nonzero(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.nonzero of a sparse 2-D mask, several times faster through the flat index."""
    flat = np.flatnonzero(mask)
    return flat // mask.shape[1], flat % mask.shape[1]


def _initial_floor(x: np.ndarray, k: int, step: int) -> np.ndarray:
    """Each row's k-th largest similarity to an evenly spread subset of the items: a lower bound of
    its k-th largest over all items, which prunes the candidates of the first blocks."""
    n = x.shape[0]
    cols = np.unique(np.linspace(0, n - 1, min(n, 512)).astype(np.int64))
    if cols.shape[0] < 4 * k:
        return np.full(n, -np.inf, dtype=np.float32)
    sub = x[cols]
    floor = np.empty(n, dtype=np.float32)
    for a in range(0, n, step):
        floor[a : a + step] = np.partition(x[a : a + step] @ sub.T, cols.shape[0] - k, axis=1)[:, -k]
    # The blocks recompute these products with other BLAS kernels, whose rounding differs by a few ulps:
    # lower the bound by far more than that so a row's own k-th neighbour is never pruned.
    floor -= np.float32(1e-4)
    return floor


def _merge(best_id: np.ndarray, best_sim: np.ndarray, owner, ids, sims, id_bits: int) -> None:
    """Fold candidate neighbours (owner row, item id, similarity) into the running top k of their rows."""
    if owner.size == 0:
        return
    k = best_id.shape[1]
    rows = np.unique(owner)
    chunk = (1 << (32 - id_bits)) - 1  # keeps (row, similarity, id) keys within 64 bits
    for lo in range(0, rows.shape[0], chunk):
        part = rows[lo : lo + chunk]
        sel = slice(None) if part.shape[0] == rows.shape[0] else (owner >= part[0]) & (owner <= part[-1])
        local = np.searchsorted(part, owner[sel])
        all_rows = np.concatenate([np.repeat(np.arange(part.shape[0]), k), local])
        all_ids = np.concatenate([best_id[part].ravel(), ids[sel]])
        all_sims = np.concatenate([best_sim[part].ravel(), sims[sel]])
        keys = all_rows.astype(_U64) << _U64(32 + id_bits)
        keys |= float32_order_keys(-all_sims).astype(_U64) << _U64(id_bits)
        keys |= all_ids.astype(_U64)
        order = np.argsort(keys)
        counts = np.bincount(all_rows, minlength=part.shape[0])
        pick = order[(np.cumsum(counts) - counts)[:, None] + np.arange(k)]
        best_id[part] = all_ids[pick]
        best_sim[part] = all_sims[pick]


def _neighbour_matrix(knn: np.ndarray, k: int, n: int) -> sparse.csr_matrix:
    """N x N 0/1 matrix whose row i marks the k nearest items of i."""
    rows = np.repeat(np.arange(n), k)
    return sparse.csr_matrix((np.ones(n * k, dtype=np.float32), (rows, knn[:, :k].ravel())), shape=(n, n))


def _reciprocal(knn: np.ndarray, k: int, n: int) -> sparse.csr_matrix:
    """R[i, j] = 1 when j is among the k nearest of i and i among the k nearest of j."""
    a = _neighbour_matrix(knn, k, n)
    return a.multiply(a.T).tocsr()


def _expanded_weights(x, knn, row_max, k_main: int, k_half: int) -> sparse.csr_matrix:
    """V: Gaussian-kernel weights over each item's expanded k-reciprocal set, rows summing to 1."""
    n = x.shape[0]
    r = _reciprocal(knn, k_main, n)
    h = _reciprocal(knn, k_half, n)
    half_size = np.diff(h.indptr)
    overlap = (r @ h.T).multiply(r).tocoo()  # |R_half(c) & R(i)| for each c in R(i)
    keep = overlap.data > (2.0 / 3.0) * half_size[overlap.col]
    chosen = sparse.csr_matrix(
        (np.ones(int(keep.sum()), dtype=np.float32), (overlap.row[keep], overlap.col[keep])), shape=(n, n)
    )
    support = (r + chosen @ h).tocsr()
    support.sum_duplicates()
    support.sort_indices()
    rows = np.repeat(np.arange(n), np.diff(support.indptr))
    cols = support.indices
    sims = np.empty(cols.shape[0], dtype=np.float32)
    step = 1 << 16
    for a in range(0, cols.shape[0], step):
        sims[a : a + step] = np.einsum("ij,ij->i", x[rows[a : a + step]], x[cols[a : a + step]])
    dist = np.maximum(2.0 - 2.0 * sims.astype(np.float64), 0.0) / row_max[rows]
    weight = np.exp(-dist)
    total = np.add.reduceat(weight, support.indptr[:-1]) if weight.size else np.zeros(n)
    weight /= np.repeat(total, np.diff(support.indptr))
    log.debug("k-reciprocal sets: %.1f items per row after expansion", cols.shape[0] / n)
    return sparse.csr_matrix((weight.astype(np.float32), cols.copy(), support.indptr.copy()), shape=(n, n))


def _query_expansion(knn: np.ndarray, k: int, n: int) -> sparse.csr_matrix:
    """Row i averages the V rows of the k nearest items of i (local query expansion)."""
    q = _neighbour_matrix(knn, k, n)
    q.data[:] = 1.0 / k
    return q


def _blend_jaccard(v: sparse.csr_matrix, nq: int, out: np.ndarray, lam: float) -> None:
    """out[q, g] = jaccard(q, g) * (1 - lam) + out[q, g] * lam, over inverted lists of V's columns."""
    ng = out.shape[1]
    vg = v[nq:].tocsc()  # column k -> gallery items with V[j, k] != 0
    vg.sort_indices()
    col_count = np.diff(vg.indptr)
    vq = v[:nq]
    per_query = np.bincount(
        np.repeat(np.arange(nq), np.diff(vq.indptr)), weights=col_count[vq.indices], minlength=nq
    )
    max_rows = max(1, ROW_CHUNK_ELEMENTS // ng)
    bounds = [0]
    acc = 0.0
    for i, t in enumerate(per_query):
        if i > bounds[-1] and (acc + t > TRIPLE_CHUNK or i - bounds[-1] >= max_rows):
            bounds.append(i)
            acc = 0.0
        acc += t
    bounds.append(nq)
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        lo, hi = vq.indptr[a], vq.indptr[b]
        cols, vals = vq.indices[lo:hi], vq.data[lo:hi]
        qrow = np.repeat(np.arange(b - a), np.diff(vq.indptr[a : b + 1]))
        cnt = col_count[cols]
        pos = np.arange(int(cnt.sum()), dtype=np.int64) + np.repeat(vg.indptr[cols] - (np.cumsum(cnt) - cnt), cnt)
        shared = np.minimum(np.repeat(vals, cnt), vg.data[pos])
        target = np.repeat(qrow, cnt) * ng + vg.indices[pos]
        min_sum = np.bincount(target, weights=shared, minlength=(b - a) * ng).reshape(b - a, ng)
        jaccard = 1.0 - min_sum / (2.0 - min_sum)
        out[a:b] = jaccard * (1.0 - lam) + out[a:b] * lam
