"""The embedded gallery backend: one index folder, an implementation of ``reid.store.base.Gallery``.

The folder holds ``catalogue.sqlite`` (the truth), ``vectors.faiss`` (derived, replaced
atomically) and ``writer.lock``. Nothing outside ``reid.store`` reads these files: callers go
through the ``Gallery`` methods, so a gallery that outgrows one machine moves to another backend
behind the same methods.

``vectors.faiss`` is judged against the catalogue by one rule (:meth:`GalleryStore._assess`), used
both by ``verify`` (report) and by every load (repair): missing or corrupt -> rebuilt from the
catalogue's BLOBs; of another kind or dimension, or outgrown -> rebuilt; holding other rows -> updated
in place. A repaired file is saved when this process holds, or can take, the writer lock.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from reid.errors import EmptyGalleryError, GalleryNotFoundError, ModelMismatchError, StoreError
from reid.store.base import FileState, Filter, Hit, MediaState, Record, SyncState, Tracklet, group_by_filter, per_query
from reid.store.catalogue import Catalogue
from reid.store.lock import WriterLock
from reid.store.vectors import KINDS, VectorIndex, resolve_kind

if TYPE_CHECKING:
    from reid.model.identity import ModelRef

log = logging.getLogger(__name__)

CATALOGUE_NAME = "catalogue.sqlite"
VECTORS_NAME = "vectors.faiss"


@dataclass(frozen=True)
class _Wanted:
    """What ``vectors.faiss`` must hold to be fresh, read in one catalogue snapshot."""

    rows: int
    digest: int
    dim: int
    kind: str


class GalleryStore:
    """An open index folder (the ``Gallery`` protocol). Open with ``write=True`` to hold the writer lock."""

    def __init__(self, root: Path, catalogue: Catalogue, lock: WriterLock | None) -> None:
        self._root = root
        self._catalogue = catalogue
        self._lock = lock
        self._vectors: VectorIndex | None = None
        self._changed = False  # rows added/removed by this process: a stale FAISS file is expected
        self._prefetch: threading.Thread | None = None
        self._prefetched: VectorIndex | BaseException | None = None

    @classmethod
    def open(cls, root: str | Path, *, write: bool = False, wait: float = 0.0, prefetch: bool = False) -> GalleryStore:
        """Open an index folder. ``write`` creates it if needed and takes the writer lock (waiting ``wait`` s);
        ``prefetch`` (read-only) starts loading ``vectors.faiss`` in the background, e.g. while a model loads."""
        root = Path(root).expanduser().absolute()
        if not write:
            if not (root / CATALOGUE_NAME).is_file():
                raise GalleryNotFoundError(str(root))
            store = cls(root, Catalogue(root / CATALOGUE_NAME), None)
            if prefetch:
                store._start_prefetch()
            return store
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create the index folder {root}: {e.strerror or e}") from None
        lock = WriterLock(root)
        lock.acquire(wait)
        try:
            for tmp in root.glob(f".{VECTORS_NAME}.*.tmp"):  # left by a save that was killed
                tmp.unlink()
            return cls(root, Catalogue(root / CATALOGUE_NAME, create=True), lock)
        except BaseException:
            lock.release()
            raise

    @property
    def root(self) -> Path:
        """The index folder."""
        return self._root

    @property
    def location(self) -> str:
        """The index folder, as a string."""
        return str(self._root)

    def close(self) -> None:
        """Close the catalogue and release the writer lock (idempotent)."""
        if self._prefetch is not None:
            self._prefetch.join()
        self._catalogue.close()
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> GalleryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the model the vectors come from ----------------------------------------------------

    def built_with(self) -> ModelRef | None:
        """The model the vectors come from (None before the first ``bind``)."""
        meta = self._catalogue.meta()
        if not meta.get("fingerprint"):
            return None
        from reid.model.identity import DEFAULT_SOURCE, ModelRef

        return ModelRef(meta.get("model_source") or DEFAULT_SOURCE, meta["fingerprint"], int(meta["dim"]))

    def bind(self, model: ModelRef, *, kind: str | None = None, rebuild: bool = False) -> None:
        """Record the model of a new index (or of a ``rebuild``); ModelMismatchError for any other model."""
        self._need_writer()
        if kind is not None and kind not in KINDS:
            raise StoreError(f"unknown index kind {kind!r}; expected one of: {', '.join(KINDS)}")
        meta = self._catalogue.meta()
        current = meta.get("fingerprint")
        if current is None or rebuild:
            if rebuild and current is not None:
                log.warning("rebuilding %s: dropping %s rows embedded by %s", self._root, meta.get("rows"),
                            meta.get("model_source"))
            self._catalogue.clear({"fingerprint": model.fingerprint, "model_source": model.source,
                                   "dim": str(model.dim), "metric": "inner_product",
                                   "kind": kind or meta.get("kind") or "auto"})
            (self._root / VECTORS_NAME).unlink(missing_ok=True)
            self._vectors = None
            return
        if current != model.fingerprint:
            raise ModelMismatchError(self.location, built_with=self.built_with(), given=model)
        updates = {}
        if model.source != meta.get("model_source"):
            updates["model_source"] = model.source  # the same weights, moved
        if kind is not None and kind != meta.get("kind"):
            updates["kind"] = kind
        if updates:
            with self._catalogue.write():
                self._catalogue.set_many(updates)

    def _dim(self) -> int | None:
        d = self._catalogue.get("dim")
        return int(d) if d else None

    # --- rows ---------------------------------------------------------------------------------

    def add(self, records: Sequence[Record], vectors: np.ndarray) -> list[int]:
        """Store rows with their embeddings (one transaction; a row of the same path is replaced)."""
        self._need_writer()
        vectors = np.asarray(vectors, dtype=np.float32)
        dim = self._dim()
        if dim is None:
            raise StoreError(f"index {self._root} has no model bound yet")
        if len(records) and (vectors.ndim != 2 or vectors.shape[1] != dim):
            raise StoreError(f"vectors of shape {vectors.shape} do not fit index {self._root} (dimension {dim})")
        self._vectors, self._changed = None, True
        return self._catalogue.add(records, vectors)

    def remove(self, paths: Iterable[str]) -> int:
        """Delete the rows of these paths; returns how many existed."""
        self._need_writer()
        self._vectors, self._changed = None, True
        return len(self._catalogue.remove(paths))

    def scan(self, where: Filter | None = None) -> Iterator[tuple[int, Record]]:
        """(id, Record) of every row (that ``where`` lets through), in id order."""
        return self._catalogue.scan(where)

    def tracklets(self, keys: Iterable[tuple[str, int]]) -> dict[tuple[str, int], Tracklet]:
        """(media, track) -> the tracklet's span, for the keys that have rows."""
        return self._catalogue.tracklets(keys)

    def media_states(self) -> dict[str, MediaState]:
        """path -> progress of every video (or full frame) indexing has started on."""
        return self._catalogue.media_states()

    def save_media(self, state: MediaState) -> None:
        """Record a video's progress (replacing its previous state)."""
        self._need_writer()
        self._catalogue.save_media(state)

    def remove_media(self, path: str, from_frame: int = 0) -> int:
        """Delete the rows cut from ``path`` at ``from_frame`` or later (and its progress, for 0)."""
        self._need_writer()
        removed = self._catalogue.remove_media(path, from_frame)
        if removed:
            self._vectors, self._changed = None, True
        return len(removed)

    def get(self, ids: Iterable[int]) -> dict[int, Record]:
        """id -> Record for the ids that exist."""
        return self._catalogue.records(ids)

    def count(self, where: Filter | None = None) -> int:
        """Number of rows (that ``where`` lets through)."""
        return self._catalogue.count(where)

    def search(self, queries: np.ndarray, k: int, where: Filter | Sequence[Filter] | None = None
               ) -> list[list[Hit]]:
        """Top-``k`` rows by cosine similarity per query vector (float32 [nq, dim]) among those ``where``
        lets through: the filter's row ids come from SQLite and mask the vector search itself."""
        if k < 1:
            raise ValueError(f"k must be at least 1, not {k}")
        dim = self._dim()
        if dim is None or self.count() == 0:
            raise EmptyGalleryError(self.location)
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != dim:
            raise StoreError(f"query vectors of shape {queries.shape} do not fit index {self._root} (dimension {dim})")
        filters = per_query(where, len(queries))
        vi = self._index()
        found: list[tuple[np.ndarray, np.ndarray]] = [(np.empty(0, np.float32), np.empty(0, np.int64))] * len(queries)
        for f, at in group_by_filter(filters).items():
            keep = None if f.is_empty else vi.mask(*self._catalogue.select(f))
            scores, ids = vi.search(queries[at], k, keep)
            for j, q in enumerate(at):
                found[q] = (scores[j], ids[j])
        records = self._catalogue.records(int(i) for _, ids in found for i in ids if i >= 0)
        return [[Hit(int(i), float(s), records[int(i)]) for s, i in zip(scores, ids, strict=True) if int(i) in records]
                for scores, ids in found]

    # --- files the catalogue knows ----------------------------------------------------------

    def states(self, under: str | None = None) -> dict[str, FileState]:
        """path -> stored (id, sha256, bytes, mtime), optionally only under a folder."""
        return self._catalogue.states(under)

    def embeddings_by_sha(self, shas: Iterable[str]) -> dict[str, np.ndarray]:
        """sha256 -> stored embedding of a file with that content (copies and renames need no model)."""
        return {s: np.frombuffer(b, dtype="<f4").astype(np.float32)
                for s, b in self._catalogue.embeddings_by_sha(shas).items()}

    def touch(self, stats: Sequence[tuple[str, int, int]]) -> None:
        """Record new (path, bytes, mtime) of files whose content is unchanged."""
        self._need_writer()
        self._catalogue.touch(stats)

    # --- the derived FAISS file -------------------------------------------------------------

    def verify(self) -> SyncState:
        """Compare ``vectors.faiss`` with the catalogue without changing anything."""
        with self._catalogue.snapshot():
            return self._assess()[0]

    def sync(self) -> SyncState:
        """Bring ``vectors.faiss`` up to date with the catalogue and save it; returns the state found."""
        self._join_prefetch()
        self._vectors, state = self._load()
        return state

    def _assess(self) -> tuple[SyncState, VectorIndex | None, _Wanted]:
        """The one freshness rule, inside the caller's catalogue snapshot -> (state, the loaded index when
        it can be updated in place, what a fresh index holds)."""
        cat = self._catalogue
        rows = cat.count()
        want = _Wanted(rows, int(cat.get("id_digest") or 0), self._dim() or 0,
                       resolve_kind(cat.get("kind") or "auto", rows))
        path = self._root / VECTORS_NAME
        if not path.exists():
            return SyncState("fresh" if rows == 0 else "missing", f"no {VECTORS_NAME}"), None, want
        try:
            vi = VectorIndex.load(path)
        except StoreError as e:
            return SyncState("corrupt", str(e)), None, want
        if vi.kind != want.kind or vi.dim != want.dim or vi.outgrown(rows):
            return SyncState("stale", f"it is a {vi.kind} index of {vi.ntotal} rows, the gallery wants {want.kind}",
                             vi.kind), None, want
        if vi.ntotal != rows or vi.digest() != want.digest:
            return SyncState("stale", f"it holds {vi.ntotal} rows, the catalogue {rows}", vi.kind), vi, want
        return SyncState("fresh", "", vi.kind), vi, want

    def _start_prefetch(self) -> None:
        """Load the FAISS index in a background thread (FAISS releases the GIL); ``_index`` waits for it."""
        if self.count() == 0 or self._dim() is None:
            return  # nothing to load; the search will refuse the empty gallery

        def load() -> None:
            try:
                with GalleryStore.open(self._root) as own:  # an SQLite connection is not shared across threads
                    self._prefetched = own._index()
            except BaseException as e:  # noqa: BLE001 - re-raised by _join_prefetch() in the caller's thread
                self._prefetched = e

        self._prefetch = threading.Thread(target=load, name="reid-vectors", daemon=True)
        self._prefetch.start()

    def _join_prefetch(self) -> VectorIndex | None:
        if self._prefetch is None:
            return None
        self._prefetch.join()
        got, self._prefetch, self._prefetched = self._prefetched, None, None
        if isinstance(got, BaseException):
            raise got
        return got

    def _index(self) -> VectorIndex:
        """The FAISS index: the prefetched or cached one, else loaded (and repaired when not fresh)."""
        if self._vectors is None:
            self._vectors = self._join_prefetch()
        if self._vectors is None:
            self._vectors, _ = self._load()
        return self._vectors

    def _load(self) -> tuple[VectorIndex | None, SyncState]:
        """Load ``vectors.faiss``, update or rebuild it from the catalogue when it is not fresh, save it.

        After this process changed rows, staleness is expected and logged as info, not as a warning.
        None (nothing to build) for a gallery without a model.
        """
        warn = log.info if self._changed else log.warning
        path = self._root / VECTORS_NAME
        with self._catalogue.snapshot():
            state, vi, want = self._assess()
            if state.state != "fresh" and want.dim == 0:
                return None, state
            if state.state == "corrupt":
                log.warning("%s; rebuilding it from the catalogue (%d rows)", state.detail, want.rows)
            elif state.state == "missing":
                warn("%s is missing; rebuilding it from the catalogue (%d rows)", path, want.rows)
            elif state.state == "stale" and vi is None:
                log.info("rebuilding %s: %s", path, state.detail)
            elif state.state == "stale":
                warn("%s is out of date (%d rows, the catalogue %d); updating it from the catalogue",
                     path, vi.ntotal, want.rows)
                vi = self._update(vi, want.dim)
            if vi is None:
                vi = self._build(want)
        if state.state != "fresh" or not path.exists():
            self._save(vi, want.digest)
        return vi, state

    def _update(self, vi: VectorIndex, dim: int) -> VectorIndex | None:
        held, wanted = vi.ids(), self._catalogue.ids()
        extra = np.setdiff1d(held, wanted, assume_unique=True)
        missing = np.setdiff1d(wanted, held, assume_unique=True)
        if len(extra) and not vi.remove(extra):
            return None
        for ids, vecs in self._catalogue.vectors(missing, dim=dim):
            vi.add(ids, vecs)
        return vi

    def _build(self, want: _Wanted) -> VectorIndex:
        vi = VectorIndex.empty(want.kind, want.dim, want.rows)
        size = vi.train_size()
        if size:
            ids = self._catalogue.ids()
            sample = np.sort(np.random.default_rng(0).choice(ids, size=min(size, len(ids)), replace=False))
            log.info("training the %s quantizers on %d of %d vectors", want.kind, len(sample), want.rows)
            vi.train(np.concatenate([v for _, v in self._catalogue.vectors(sample, dim=want.dim)]))
        for ids, vecs in self._catalogue.vectors(dim=want.dim):
            vi.add(ids, vecs)
        return vi

    def _save(self, vi: VectorIndex, digest: int) -> None:
        lock = self._lock if self._lock is not None and self._lock.held else WriterLock(self._root)
        mine = lock is not self._lock
        if mine and not lock.try_acquire():
            log.info("not saving the repaired %s: another process is writing the index", VECTORS_NAME)
            return
        try:
            # Another writer may have committed between our snapshot and the lock: save only a match.
            if int(self._catalogue.get("id_digest") or 0) == digest and vi.digest() == digest:
                vi.save(self._root / VECTORS_NAME)
        finally:
            if mine:
                lock.release()

    def _need_writer(self) -> None:
        if self._lock is None or not self._lock.held:
            raise StoreError(f"index {self._root} was opened read-only; open it with write=True to change it")

    # --- reporting --------------------------------------------------------------------------

    def info(self) -> dict[str, object]:
        """Rows, dimension, kinds, model, size on disk, dates and the state of the FAISS file."""
        meta = self._catalogue.meta()
        rows = int(meta.get("rows", 0))
        state = self.verify()
        size = sum(p.stat().st_size for p in self._root.iterdir() if p.is_file())
        media = self._catalogue.media_states()
        return {
            "index": str(self._root),
            "rows": rows,
            "dim": int(meta["dim"]) if meta.get("dim") else None,
            "kind": meta.get("kind", "auto"),
            "vector_kind": state.kind or resolve_kind(meta.get("kind", "auto"), rows),
            "vectors": state.state,
            "fingerprint": meta.get("fingerprint"),
            "model_source": meta.get("model_source"),
            "metric": meta.get("metric"),
            "bytes_on_disk": size,
            "created_at": meta.get("created_at"),
            "updated_at": meta.get("updated_at"),
            "schema_version": int(meta.get("schema_version", 0)),
            "footage": {"sources": len(media), "done": sum(m.done for m in media.values()),
                        "people": sum(m.people for m in media.values())},
        }
