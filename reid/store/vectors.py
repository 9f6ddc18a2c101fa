"""The derived vector index (``vectors.faiss``): a FAISS ``IndexIDMap2`` whose ids are catalogue row ids.

Kinds: ``flat`` (exact inner product, the default), ``hnsw`` and ``ivfpq`` (approximate, for
galleries of hundreds of thousands of crops and more; ``ivfpq`` re-scores its candidates exactly
with ``IndexRefineFlat``). ``auto`` picks by gallery size. Embeddings are L2-normalised, so the
inner product is the cosine similarity.

Exact search on CPU does not go through ``IndexFlat.search``: for one query FAISS skips BLAS
(``queries x dim < distance_compute_blas_threshold``) and scans on one core, ~2x slower than a
BLAS matrix-vector product. A flat index therefore keeps its rows in NumPy (``reid.store.flat``);
FAISS is its file format, read zero-copy from a memory map and written on save. The copy is made on
the second search: a one-shot query scans the mapped file with FAISS instead.

Filters arrive as a mask over the stored rows (:meth:`VectorIndex.mask`) and are applied inside
the search: the NumPy scan skips the dropped rows, FAISS kinds get an ``IDSelectorBitmap`` in their
search parameters, and a mask keeping only a few rows is searched exactly over those rows.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from collections.abc import Iterator

import faiss
import numpy as np

from reid.atomic import atomic_path
from reid.errors import StoreError
from reid.store.catalogue import id_digest
from reid.store.flat import FlatRows, empty_result, top_k

log = logging.getLogger(__name__)

KINDS = ("auto", "flat", "hnsw", "ivfpq")

# ``auto``: exact search up to this many rows (one query costs ~7 ms per 100k rows at 512-d on
# 2 cores, memory-bound), the approximate kind below from there on.
AUTO_ANN_ROWS = 200_000
AUTO_ANN_KIND = "ivfpq"

# IVF-PQ needs enough rows to train its coarse quantizer and 256-centroid sub-quantizers.
IVFPQ_MIN_ROWS = 10_000
IVFPQ_TRAIN_PER_LIST = 64  # training sample = lists x this (FAISS warns below 39)
# Lists probed per query: an eighth of them (at least 64). Recall@10 is limited by the probing, not
# by the PQ codes (re-scored exactly); 1/16 gave 0.89 on weakly clustered 1M vectors (bench --spread 1.2).
IVFPQ_PROBE_FRACTION = 8
IVFPQ_NPROBE_MIN = 64
IVFPQ_REFINE = 16  # exact re-scoring of k x this PQ candidates
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 64
HNSW_EF_SEARCH = 128

# A filtered approximate search that keeps at most this many rows scores them exactly instead
# (gathered from the index's stored vectors; ~4 ms at 512-d): graph and list probing lose recall when
# few rows qualify, and a small subset is cheap to scan.
ANN_EXACT_MAX = 8192
# Approximate search of fewer queries than this runs on one OpenMP thread: a single IVF/HNSW query is
# sub-millisecond work, and on a busy 2-core machine two threads waiting on each other made one
# query at 1M rows take 15 ms instead of 0.3 ms (benchmarks/bench_index.py).
ANN_SINGLE_THREAD_BELOW = 16
# Exact search moves to the GPU (when FAISS sees one) only for a batch of at least this many queries:
# the GPU copy of the rows and FAISS's GPU resources are made on first use, which costs far more than
# the ~7 ms a single query takes per 100k rows on the CPU, so a one-shot `reid query` stays on the CPU.
GPU_MIN_QUERIES = 64
GPU_MAX_K = 2048  # FAISS's GPU k-selection limit
# The first search of a loaded flat index (up to this many queries) runs FAISS's own scan over the
# memory-mapped file (~40 ms at 100k rows, faults included) instead of first copying the rows into
# NumPy (~0.1-0.2 s, then ~7 ms a query): a one-shot `reid query` ends there. Later searches copy.
MAPPED_SEARCH_MAX_QUERIES = 8


@contextlib.contextmanager
def _omp_threads(n: int) -> Iterator[None]:
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def resolve_kind(kind: str, rows: int) -> str:
    """The concrete index kind for a requested kind (``auto`` or explicit) and a gallery size."""
    if kind not in KINDS:
        raise StoreError(f"unknown index kind {kind!r}; expected one of: {', '.join(KINDS)}")
    if kind == "auto":
        return "flat" if rows < AUTO_ANN_ROWS else AUTO_ANN_KIND
    if kind == "ivfpq" and rows < IVFPQ_MIN_ROWS:
        return "flat"  # too few rows to train; exact search is fast at this size anyway
    return kind


def ivf_lists(rows: int) -> int:
    """Number of IVF lists for a gallery size: ~sqrt(n), a power of two, 64..65536."""
    return int(min(65536, max(64, 1 << int(np.round(np.log2(np.sqrt(max(rows, 1))))))))


def _pq_subquantizers(dim: int) -> int:
    """8 dimensions per 4-bit code (64 bytes at 512-d), but at least 16 codes for small dimensions."""
    for m in range(max(1, dim // 8, min(dim, 16)), 0, -1):
        if dim % m == 0:
            return m
    return 1


# Read indexes zero-copy from a memory map: a query touches only what it scans (reading a 1M-row
# IVF-PQ index with its 2 GB of exact vectors took 1.5 s, mapping it 0.05 s). A FAISS build without
# the flag reads the file into its own buffers instead.
_MMAP_READ = getattr(faiss, "IO_FLAG_MMAP_IFC", 0)


def _kind_of(index: faiss.Index) -> str:
    inner = faiss.downcast_index(index.index)
    if isinstance(inner, faiss.IndexFlat):
        return "flat"
    if isinstance(inner, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(inner, faiss.IndexRefine):
        return "ivfpq"
    raise StoreError(f"unsupported vector index type {type(inner).__name__}")


class VectorIndex:
    """A FAISS id-mapped index with the project's kinds, tuned search parameters and atomic saving.

    The ``flat`` kind keeps its rows in :class:`FlatRows` once it is searched twice or changed; until then
    a loaded flat index stays the memory-mapped FAISS object (cheap for ``reid info``, state checks and
    a one-shot query).
    """

    def __init__(self, index: faiss.IndexIDMap2 | None, rows: FlatRows | None = None) -> None:
        self.index = index
        self._rows = rows
        self.kind = "flat" if index is None else _kind_of(index)
        self._gpu = None
        self._ids: np.ndarray | None = None
        self._searched = False
        self._mapped = False  # an approximate index whose buffers are a memory-mapped file (read-only)
        if index is not None:
            self._tune()

    @classmethod
    def empty(cls, kind: str, dim: int, rows_hint: int = 0) -> VectorIndex:
        """A new, empty index of a concrete kind; ``ivfpq`` must be ``train``ed before ``add``."""
        ip = faiss.METRIC_INNER_PRODUCT
        if kind == "flat":
            return cls(None, FlatRows(dim))
        if kind == "hnsw":
            inner = faiss.IndexHNSWFlat(dim, HNSW_M, ip)
            inner.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        elif kind == "ivfpq":
            # 4-bit fast-scan PQ: trains in seconds (8-bit PQ takes minutes on 2 cores) and scans with
            # SIMD lookups; the exact re-scoring of k x IVFPQ_REFINE candidates restores the ranking.
            spec = f"IVF{ivf_lists(rows_hint)},PQ{_pq_subquantizers(dim)}x4fs,RFlat"
            inner = faiss.index_factory(dim, spec, ip)
        else:
            raise StoreError(f"cannot build an index of kind {kind!r}")
        return cls(faiss.IndexIDMap2(inner))

    @classmethod
    def load(cls, path: Path) -> VectorIndex:
        """Read a saved index; StoreError when the file is unreadable or not one of ours."""
        def read(flags: int) -> faiss.Index:
            try:
                return faiss.read_index(str(path), flags)
            except RuntimeError as e:
                raise StoreError(f"{path}: corrupt vector index ({str(e).strip().splitlines()[-1][:120]})") from None

        try:
            index = read(_MMAP_READ)
        except StoreError:
            if not _MMAP_READ:
                raise
            index = read(0)  # a file system that cannot map files; a corrupt file raises again here
        if not isinstance(index, faiss.IndexIDMap2):
            raise StoreError(f"{path}: not an id-mapped vector index ({type(index).__name__})")
        vi = cls(index)
        vi._mapped = vi.kind != "flat" and bool(_MMAP_READ)
        return vi

    def save(self, path: Path) -> None:
        """Write to a temporary file, fsync it, then atomically replace ``path`` (and fsync the folder)."""
        index = self.index if self._rows is None else self._rows.to_faiss()
        with atomic_path(path) as tmp:
            faiss.write_index(index, str(tmp))

    def _own(self) -> faiss.Index:
        """The FAISS index with buffers of its own (a mapped one is copied first), ready to change."""
        if self._mapped:
            self.index = faiss.deserialize_index(faiss.serialize_index(self.index))
            self._mapped = False
            self._tune()
        return self.index

    def _flat(self) -> FlatRows:
        if self._rows is None:
            self._rows = FlatRows.from_faiss(self.index)
            self.index = self._ids = None  # unmaps the file
        return self._rows

    def _tune(self) -> None:
        inner = faiss.downcast_index(self.index.index)
        if self.kind == "hnsw":
            inner.hnsw.efSearch = HNSW_EF_SEARCH
        elif self.kind == "ivfpq":
            inner.k_factor = IVFPQ_REFINE
            ivf = faiss.extract_index_ivf(inner)
            ivf.nprobe = min(ivf.nlist, max(IVFPQ_NPROBE_MIN, ivf.nlist // IVFPQ_PROBE_FRACTION))

    # --- contents ---------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        """Vector dimension."""
        return self._rows.dim if self._rows is not None else int(self.index.d)

    @property
    def ntotal(self) -> int:
        """Number of vectors."""
        return self._rows.n if self._rows is not None else int(self.index.ntotal)

    @property
    def nlist(self) -> int:
        """IVF lists of an ``ivfpq`` index (0 for other kinds)."""
        if self.kind != "ivfpq":
            return 0
        return int(faiss.extract_index_ivf(faiss.downcast_index(self.index.index)).nlist)

    def outgrown(self, rows: int) -> bool:
        """True when the gallery grew so much since training that the IVF lists should be re-trained."""
        return self.kind == "ivfpq" and ivf_lists(rows) >= 4 * self.nlist

    @property
    def is_trained(self) -> bool:
        """False for an IVF-PQ index that still needs ``train``."""
        return self.index is None or bool(self.index.is_trained)

    def train_size(self) -> int:
        """How many sample vectors ``train`` wants (0 when the kind needs no training)."""
        if self.is_trained:
            return 0
        return self.nlist * IVFPQ_TRAIN_PER_LIST

    def train(self, sample: np.ndarray) -> None:
        """Train the coarse and product quantizers on a sample of the gallery."""
        if self.index is not None:
            self._own().train(np.ascontiguousarray(sample, dtype=np.float32))

    def ids(self) -> np.ndarray:
        """The row ids held, in storage order (int64; do not modify)."""
        if self._rows is not None:
            return self._rows.ids
        if self._ids is None:
            self._ids = faiss.vector_to_array(self.index.id_map).astype(np.int64, copy=False)
        return self._ids

    def digest(self) -> int:
        """Order-free digest of the ids held (compare with the catalogue's ``id_digest``)."""
        return id_digest(self.ids())

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors under the given ids."""
        self._gpu = self._ids = None
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if self.kind == "flat":
            self._flat().add(ids, vectors)
        else:
            self._own().add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray) -> bool:
        """Remove ids in place; False when the kind cannot remove (the caller then rebuilds)."""
        if self.kind != "flat":
            return False
        self._gpu = None
        self._flat().remove(np.asarray(ids, dtype=np.int64))
        return True

    # --- search -----------------------------------------------------------------------------

    def mask(self, ids: np.ndarray, dropped: bool = False) -> np.ndarray:
        """bool [ntotal] over the stored rows: True for rows whose id is in ``ids`` (or, with ``dropped``,
        for every row whose id is not); ids the index does not hold are ignored."""
        held = self.ids()
        ids = np.asarray(ids, dtype=np.int64)
        keep = np.full(len(held), dropped, bool)
        if len(held) == 0 or len(ids) == 0:
            return keep
        order = None if bool(np.all(held[1:] > held[:-1])) else np.argsort(held, kind="stable")
        at = np.searchsorted(held, ids, sorter=order)
        ok = at < len(held)
        pos = at[ok] if order is None else order[at[ok]]
        pos = pos[held[pos] == ids[ok]]
        keep[pos] = not dropped
        return keep

    def search(self, queries: np.ndarray, k: int, keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product among the rows ``keep`` (a :meth:`mask`, None for all) lets through
        -> (scores float32 [nq, k'], ids int64 [nq, k']), k' = min(k, rows kept); an approximate kind may
        pad a row with id -1 where it found fewer."""
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        kept = self.ntotal if keep is None else int(np.count_nonzero(keep))
        k = min(int(k), kept)
        if k <= 0 or len(queries) == 0:
            return empty_result(len(queries))
        if self.kind != "flat":
            if keep is not None and kept <= ANN_EXACT_MAX:  # few rows qualify: score them exactly
                pos = np.flatnonzero(keep)
                return top_k(queries, self._stored_vectors(pos), self.ids()[pos], k)
            with _omp_threads(1 if len(queries) < ANN_SINGLE_THREAD_BELOW else faiss.omp_get_max_threads()):
                if keep is None:
                    return self.index.search(queries, k)
                return self._search_selected(queries, k, keep)
        if keep is None and (self._gpu is not None or len(queries) >= GPU_MIN_QUERIES) and k <= GPU_MAX_K \
                and faiss.get_num_gpus() > 0:
            return self._search_gpu(queries, k)  # pragma: no cover - needs a CUDA build and device
        if self._rows is None and not self._searched and len(queries) <= MAPPED_SEARCH_MAX_QUERIES:
            self._searched = True  # a one-shot query: search the mapped file as it is, copy nothing
            return self.index.search(queries, k) if keep is None else self._search_selected(queries, k, keep)
        return self._search_flat_cpu(queries, k, keep)

    def _search_flat_cpu(self, queries: np.ndarray, k: int, keep: np.ndarray | None = None
                         ) -> tuple[np.ndarray, np.ndarray]:
        rows = self._flat()
        return top_k(queries, rows.vectors, rows.ids, k, keep)

    def _search_selected(self, queries: np.ndarray, k: int, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """FAISS's own search of the inner index with an ``IDSelectorBitmap`` over storage positions."""
        bits = np.packbits(keep, bitorder="little")
        sel = faiss.IDSelectorBitmap(len(keep), faiss.swig_ptr(bits))
        inner = faiss.downcast_index(self.index.index)
        if self.kind == "hnsw":
            params = faiss.SearchParametersHNSW(sel=sel, efSearch=inner.hnsw.efSearch)
            base = None
        elif self.kind == "ivfpq":
            base = faiss.SearchParametersIVF(sel=sel, nprobe=faiss.extract_index_ivf(inner).nprobe)
            params = faiss.IndexRefineSearchParameters(k_factor=inner.k_factor, base_index_params=base)
        else:
            params, base = faiss.SearchParameters(sel=sel), None
        scores, pos = inner.search(queries, k, params=params)
        del params, base, sel, bits  # alive until here: FAISS holds raw pointers to them
        held = self.ids()
        return scores, np.where(pos >= 0, held[np.clip(pos, 0, None)], -1)

    def _stored_vectors(self, pos: np.ndarray) -> np.ndarray:
        """float32 [len(pos), dim] of an approximate index's exact vectors at storage positions ``pos``."""
        inner = faiss.downcast_index(self.index.index)
        flat = faiss.downcast_index(inner.storage if self.kind == "hnsw" else inner.refine_index)
        n, dim = int(flat.ntotal), int(flat.d)
        return faiss.rev_swig_ptr(flat.get_xb(), n * dim).reshape(n, dim)[pos]

    def _search_gpu(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
        rows = self._flat()
        if self._gpu is None:
            res = faiss.StandardGpuResources()
            flat = faiss.IndexFlatIP(rows.dim)
            flat.add(rows.vectors)
            self._gpu = (res, faiss.index_cpu_to_gpu(res, 0, flat))
        scores, pos = self._gpu[1].search(queries, k)
        return scores, np.where(pos >= 0, rows.ids[np.clip(pos, 0, None)], -1)
