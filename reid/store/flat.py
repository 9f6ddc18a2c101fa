"""Exact inner-product search over rows held in NumPy (the ``flat`` kind), optionally over a subset.

The product runs over a NumPy copy of the vectors, not over FAISS's own buffer: NumPy asks for
transparent huge pages for large arrays and FAISS's ``malloc`` does not, and a memory-bound scan of
100k x 512 floats took 13.5 ms over 4 KiB pages against 7.0 ms over huge pages
(``benchmarks/bench_index.py``). A filter arrives as a mask over the rows: a mask keeping few rows
scores only those (a gather), one keeping most scores all rows and sets the dropped ones to -inf,
so a filtered search costs what an unfiltered one does and never asks for more than ``k``.
"""

from __future__ import annotations

import faiss
import numpy as np

# Exact search scores at most this many query x gallery similarities at a time (bounded memory).
_FLAT_BLOCK = 1 << 25
# A mask keeping at most 1/SUBSET_SHARE of the rows is searched by gathering the kept rows first.
SUBSET_SHARE = 8


class FlatRows:
    """The rows of an exact index in NumPy: a float32 matrix and its int64 ids, growing by doubling."""

    def __init__(self, dim: int, vectors: np.ndarray | None = None, ids: np.ndarray | None = None) -> None:
        self.dim = dim
        self._xb = np.empty((0, dim), np.float32) if vectors is None else vectors
        self._ids = np.empty(0, np.int64) if ids is None else ids
        self.n = len(self._ids)

    @property
    def vectors(self) -> np.ndarray:
        """float32 [n, dim], a view (do not modify)."""
        return self._xb[: self.n]

    @property
    def ids(self) -> np.ndarray:
        """int64 [n], a view (do not modify)."""
        return self._ids[: self.n]

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Append rows (amortised O(1) per row)."""
        need = self.n + len(ids)
        if need > len(self._ids):
            cap = max(need, 2 * len(self._ids), 1024)
            xb, idv = np.empty((cap, self.dim), np.float32), np.empty(cap, np.int64)
            xb[: self.n], idv[: self.n] = self.vectors, self.ids
            self._xb, self._ids = xb, idv
        self._xb[self.n : need], self._ids[self.n : need] = vectors, ids
        self.n = need

    def remove(self, ids: np.ndarray) -> None:
        """Drop the rows of these ids, keeping the order of the others."""
        keep = np.flatnonzero(~np.isin(self.ids, ids))
        self._xb[: len(keep)], self._ids[: len(keep)] = self.vectors[keep], self.ids[keep]
        self.n = len(keep)

    def to_faiss(self) -> faiss.IndexIDMap2:
        """The same rows as a FAISS ``IndexIDMap2(IndexFlatIP)`` (a copy)."""
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        index.add_with_ids(self.vectors, self.ids)
        return index

    @classmethod
    def from_faiss(cls, index: faiss.IndexIDMap2) -> FlatRows:
        """Copy the rows out of a FAISS flat index (into huge-page backed NumPy memory)."""
        inner = faiss.downcast_index(index.index)
        n, dim = int(index.ntotal), int(index.d)
        xb = np.array(faiss.rev_swig_ptr(inner.get_xb(), n * dim), np.float32).reshape(n, dim) if n else None
        return cls(dim, xb, faiss.vector_to_array(index.id_map).astype(np.int64))


def empty_result(nq: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores [nq, 0], ids [nq, 0]): what a search that finds nothing returns."""
    return np.zeros((nq, 0), np.float32), np.zeros((nq, 0), np.int64)


def top_k(queries: np.ndarray, xb: np.ndarray, ids: np.ndarray, k: int, keep: np.ndarray | None = None
          ) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` of ``queries @ xb.T`` among the rows ``keep`` (bool [n]) lets through
    -> (scores float32 [nq, k'], ids int64 [nq, k']), k' = min(k, rows kept)."""
    drop = None
    if keep is not None:
        kept = int(np.count_nonzero(keep))
        if kept * SUBSET_SHARE <= len(ids):
            pos = np.flatnonzero(keep)
            return top_k(queries, xb[pos], ids[pos], k)
        drop = np.flatnonzero(~keep)
    else:
        kept = len(ids)
    k = min(int(k), kept)
    if k <= 0 or len(queries) == 0:
        return empty_result(len(queries))
    out_s = np.empty((len(queries), k), np.float32)
    out_i = np.empty((len(queries), k), np.int64)
    step = max(1, _FLAT_BLOCK // max(len(ids), 1))
    for s in range(0, len(queries), step):
        sims = queries[s : s + step] @ xb.T  # BLAS gemv/gemm on all cores
        if drop is not None and len(drop):
            sims[:, drop] = -np.inf
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < sims.shape[1] else \
            np.broadcast_to(np.arange(sims.shape[1]), sims.shape).copy()
        top_s = np.take_along_axis(sims, top, axis=1)
        order = np.argsort(-top_s, axis=1, kind="stable")
        out_s[s : s + step] = np.take_along_axis(top_s, order, axis=1)
        out_i[s : s + step] = ids[np.take_along_axis(top, order, axis=1)]
    return out_s, out_i
