"""Ranks of the true matches in each query's gallery ordering, found by counting instead of sorting rows.

The gallery order of a query is ascending distance, ties broken by gallery index: exactly the order
``np.argsort(row, kind="stable")`` gives. The rank of a true match is the number of *valid* gallery items
(not junk, not same identity + same camera) before it in that order. Every metric (CMC, AP, mINP)
follows from these ranks, and only items closer than a query's farthest true match can change them:
so each block of rows is compared once against that threshold, and only the few items below it are
ordered (as packed ``row | distance | column`` integer keys, which makes the tie rule exact).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from reid.errors import InputError

log = logging.getLogger(__name__)

# A block whose candidates (valid items no farther than the query's farthest true match) exceed this
# share of its entries is ranked by sorting its rows' values instead: at that density sorting is cheaper.
DENSE_FRACTION = 0.2
# Rows are ranked in sub-blocks of about this many entries, so each pass over them stays in cache.
SUBBLOCK_ELEMENTS = 1 << 20
METHODS = ("auto", "candidates", "sort")

_U64 = np.uint64


def float32_order_keys(values: np.ndarray) -> np.ndarray:
    """Map float32 values to uint32 keys in the same order (-0.0 and +0.0 get the same key; no NaN)."""
    v = np.asarray(values, dtype=np.float32) + np.float32(0.0)  # the addition folds -0.0 into +0.0
    bits = v.view(np.uint32)
    return np.where(bits >> np.uint32(31), ~bits, bits | np.uint32(0x80000000))


def as_ids(values, name: str, length: int | None = None) -> np.ndarray:
    """Identity or camera labels as a 1-D int64 array; InputError when they are not integers."""
    a = np.asarray(values)
    if a.ndim != 1:
        a = a.reshape(-1) if a.ndim == 2 and 1 in a.shape else a
    if a.ndim != 1:
        raise InputError(f"{name} must be a 1-D array of integer labels, got shape {a.shape}")
    if a.dtype.kind == "f" and a.size and not np.array_equal(a, np.round(a)):
        raise InputError(f"{name} must hold integer labels, got non-integral floats")
    if a.dtype.kind not in "iubf":
        raise InputError(f"{name} must hold integer labels, got dtype {a.dtype}")
    if length is not None and a.shape[0] != length:
        raise InputError(f"{name} has {a.shape[0]} entries but the distance matrix needs {length}")
    return a.astype(np.int64)


@dataclass(frozen=True)
class Protocol:
    """Who matches whom under the Market-1501 rules, as pair lists sorted by query then gallery index.

    ``match_*``: true matches (same identity, other camera, identity not -1). ``ignore_*``: same identity
    and same camera (neither a match nor a negative). ``junk_cols``: gallery items with identity -1,
    ignored for every query. ``*_start[q]:*_start[q+1]`` is query q's slice of a pair list.
    """

    num_queries: int
    num_gallery: int
    match_row: np.ndarray
    match_col: np.ndarray
    match_start: np.ndarray
    ignore_row: np.ndarray
    ignore_col: np.ndarray
    ignore_start: np.ndarray
    junk_cols: np.ndarray

    @property
    def matches_per_query(self) -> np.ndarray:
        """Number of true matches of each query."""
        return np.diff(self.match_start)


def build_protocol(q_pids, g_pids, q_camids, g_camids, shape: tuple[int, int] | None = None) -> Protocol:
    """Pair every query with its true matches and ignored items (vectorised: no per-query Python loop)."""
    nq, ng = shape if shape is not None else (None, None)
    q_pids = as_ids(q_pids, "q_pids", nq)
    q_camids = as_ids(q_camids, "q_camids", q_pids.shape[0])
    g_pids = as_ids(g_pids, "g_pids", ng)
    g_camids = as_ids(g_camids, "g_camids", g_pids.shape[0])
    nq, ng = q_pids.shape[0], g_pids.shape[0]

    junk = g_pids == -1
    usable = np.flatnonzero(~junk)
    by_pid = usable[np.argsort(g_pids[usable], kind="stable")]  # ascending gallery index within a pid
    sorted_pids = g_pids[by_pid]
    lo = np.searchsorted(sorted_pids, q_pids, "left")
    cnt = np.searchsorted(sorted_pids, q_pids, "right") - lo
    rows = np.repeat(np.arange(nq, dtype=np.int64), cnt)
    first = np.cumsum(cnt) - cnt
    cols = by_pid[np.arange(rows.shape[0], dtype=np.int64) + np.repeat(lo - first, cnt)]
    same_cam = g_camids[cols] == q_camids[rows]
    bounds = np.arange(nq + 1, dtype=np.int64)
    m_row, i_row = rows[~same_cam], rows[same_cam]
    return Protocol(
        num_queries=nq,
        num_gallery=ng,
        match_row=m_row,
        match_col=cols[~same_cam],
        match_start=np.searchsorted(m_row, bounds),
        ignore_row=i_row,
        ignore_col=cols[same_cam],
        ignore_start=np.searchsorted(i_row, bounds),
        junk_cols=np.flatnonzero(junk),
    )


class MatchRanker:
    """Fills in, one block of query rows at a time, the rank of every true match of a protocol."""

    def __init__(self, protocol: Protocol, method: str = "auto") -> None:
        if method not in METHODS:
            raise InputError(f"unknown ranking method {method!r}; expected one of: {', '.join(METHODS)}")
        self.protocol = protocol
        self.method = method
        self.ranks = np.full(protocol.match_row.shape[0], -1, dtype=np.int64)
        self._done = np.zeros(protocol.num_queries, dtype=bool)
        self._col_bits = max(1, int(protocol.num_gallery - 1).bit_length())
        if self._col_bits > 31:
            raise InputError(f"galleries above 2^31 items are not supported (got {protocol.num_gallery})")
        # Packed keys are row | 32-bit distance | column in 64 bits: that bounds the rows per sub-block.
        max_rows = (1 << (32 - self._col_bits)) - 1
        self._sub_rows = max(1, min(max_rows, SUBBLOCK_ELEMENTS // max(1, protocol.num_gallery)))
        self.dense_blocks = 0
        self.candidate_blocks = 0

    def add(self, row0: int, block: np.ndarray) -> None:
        """Rank the true matches of queries ``row0 .. row0 + len(block) - 1`` from their distance rows."""
        p = self.protocol
        if block.ndim != 2 or block.shape[1] != p.num_gallery or row0 < 0 or row0 + block.shape[0] > p.num_queries:
            raise InputError(f"distance block of shape {block.shape} at row {row0} does not fit a "
                             f"{p.num_queries} x {p.num_gallery} protocol")
        for a in range(0, block.shape[0], self._sub_rows):
            self._rank_rows(row0 + a, block[a : a + self._sub_rows])
        self._done[row0 : row0 + block.shape[0]] = True

    def result(self) -> np.ndarray:
        """The rank (0-based, among valid items) of each true match, in ``protocol.match_row`` order."""
        if not self._done.all():
            missing = np.flatnonzero(~self._done)
            raise RuntimeError(f"distance rows of {missing.size} queries were never added (first: {missing[0]})")
        return self.ranks

    def _rank_rows(self, r0: int, d: np.ndarray) -> None:
        p = self.protocol
        nb = d.shape[0]
        if d.dtype == np.float16:
            d = d.astype(np.float32)
        elif d.dtype not in (np.float32, np.float64):
            d = d.astype(np.float64)
        if np.isnan(d.max(initial=-np.inf)):
            bad = r0 + int(np.flatnonzero(np.isnan(d).any(axis=1))[0])
            raise InputError(f"the distance matrix holds NaN (first in query row {bad}); "
                             "check the features for NaN or zero vectors")
        s, e = p.match_start[r0], p.match_start[r0 + nb]
        if s == e:
            return
        rows = p.match_row[s:e] - r0
        cols = p.match_col[s:e]
        t = d[rows, cols]
        i0, i1 = p.ignore_start[r0], p.ignore_start[r0 + nb]
        irows, icols = p.ignore_row[i0:i1] - r0, p.ignore_col[i0:i1]
        ranks = None
        if d.dtype == np.float32 and self.method != "sort":
            ranks = self._by_candidates(d, rows, cols, t, irows, icols)
        if ranks is None:
            ranks = self._by_sorting(d, rows, cols, t, irows, icols)
            self.dense_blocks += 1
        else:
            self.candidate_blocks += 1
        self.ranks[s:e] = ranks

    def _by_candidates(self, d, rows, cols, t, irows, icols) -> np.ndarray | None:
        """Order only the valid items no farther than each row's farthest match (float32 rows)."""
        nb, ng = d.shape
        starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
        dmax = np.full(nb, -np.inf, dtype=np.float32)
        dmax[rows[starts]] = np.maximum.reduceat(t, starts)
        mask = d <= dmax[:, None]
        if self.protocol.junk_cols.size:
            mask[:, self.protocol.junk_cols] = False
        mask[irows, icols] = False
        if self.method == "auto" and np.count_nonzero(mask) > DENSE_FRACTION * mask.size:
            return None
        flat = np.flatnonzero(mask)
        crow = flat // ng
        keys = self._keys(crow, d.reshape(-1)[flat], flat - crow * ng)
        keys.sort()
        pos = np.searchsorted(keys, self._keys(rows, t, cols))
        row_first = np.searchsorted(keys, np.arange(nb, dtype=_U64) << _U64(32 + self._col_bits))
        return pos - row_first[rows]

    def _keys(self, rows: np.ndarray, values: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Pack (row, distance, column) into uint64 keys whose integer order is the gallery order."""
        keys = rows.astype(_U64) << _U64(32 + self._col_bits)
        keys |= float32_order_keys(values).astype(_U64) << _U64(self._col_bits)
        keys |= cols.astype(_U64)
        return keys

    def _by_sorting(self, d, rows, cols, t, irows, icols) -> np.ndarray:
        """Sort each row's values (invalid items pushed to +inf), then count below each match."""
        junk = self.protocol.junk_cols
        w = np.array(d, copy=True)
        if junk.size:
            w[:, junk] = np.inf
        w[irows, icols] = np.inf
        w.sort(axis=1)
        lo = np.empty(t.shape[0], dtype=np.int64)
        hi = np.empty_like(lo)
        bounds = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1], True])
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            lo[a:b] = np.searchsorted(w[rows[a]], t[a:b], "left")
            hi[a:b] = np.searchsorted(w[rows[a]], t[a:b], "right")
        # A match tied with other items (float32 ties are common): add the valid ones of lower index.
        for k in np.flatnonzero(hi - lo > 1):
            r, c, v = rows[k], cols[k], t[k]
            row = d[r]
            ties = np.count_nonzero(row[:c] == v)
            ties -= np.count_nonzero(row[junk[: np.searchsorted(junk, c)]] == v)
            ignored = icols[irows == r]
            ties -= np.count_nonzero(row[ignored[ignored < c]] == v)
            lo[k] += ties
        return lo
