"""``GalleryStore``: one index folder behind a narrow interface (add, search, remove, count, verify).

The folder holds ``catalogue.sqlite`` (the truth), ``vectors.faiss`` (derived, replaced
atomically) and ``writer.lock``. Anything that embeds, queries or evaluates talks to this class
only, so a gallery that outgrows one machine can move to a distributed vector engine behind the
same methods.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from reid.errors import StoreError
from reid.store.catalogue import Catalogue, FileState, Record
from reid.store.lock import WriterLock
from reid.store.vectors import KINDS, VectorIndex, resolve_kind

log = logging.getLogger(__name__)

CATALOGUE_NAME = "catalogue.sqlite"
VECTORS_NAME = "vectors.faiss"


@dataclass(frozen=True)
class Hit:
    """One search result: catalogue row id, similarity (cosine) and what the row says."""

    id: int
    score: float
    path: str
    pid: int | None
    camid: int | None


@dataclass(frozen=True)
class VectorState:
    """How ``vectors.faiss`` relates to the catalogue: fresh, stale, missing or corrupt (+ details)."""

    state: str
    detail: str = ""
    kind: str | None = None


class GalleryStore:
    """An open index folder. Open with ``write=True`` to hold the writer lock for add/remove."""

    def __init__(self, root: Path, catalogue: Catalogue, lock: WriterLock | None) -> None:
        self.root = root
        self.catalogue = catalogue
        self.lock = lock
        self._vectors: VectorIndex | None = None
        self._changed = False  # rows added/removed by this process: a stale FAISS file is expected
        self._prefetch: threading.Thread | None = None
        self._prefetched: VectorIndex | BaseException | None = None

    @classmethod
    def open(cls, root: str | Path, *, write: bool = False, wait: float = 0.0) -> "GalleryStore":
        """Open an index folder; ``write`` creates it if needed and takes the writer lock (waiting ``wait`` s)."""
        root = Path(root).expanduser().absolute()
        if not write:
            if not (root / CATALOGUE_NAME).is_file():
                raise StoreError(f"no index at {root}; build one with `reid index GALLERY --index {root}`")
            return cls(root, Catalogue(root / CATALOGUE_NAME), None)
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

    def close(self) -> None:
        """Close the catalogue and release the writer lock."""
        if self._prefetch is not None:
            self._prefetch.join()
        self.catalogue.close()
        if self.lock is not None:
            self.lock.release()

    def __enter__(self) -> "GalleryStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the model the vectors come from ----------------------------------------------------

    @property
    def meta(self) -> dict[str, str]:
        """The catalogue's meta table (fingerprint, model_source, dim, kind, rows, ...)."""
        return self.catalogue.meta()

    @property
    def dim(self) -> int | None:
        """Embedding dimension, once a model is bound."""
        d = self.catalogue.get("dim")
        return int(d) if d else None

    def bind_model(self, *, fingerprint: str, source: str, dim: int, kind: str | None = None,
                   rebuild: bool = False) -> None:
        """Record the model of a new index (or of a ``rebuild``); refuse vectors from any other model."""
        self._need_writer()
        if kind is not None and kind not in KINDS:
            raise StoreError(f"unknown index kind {kind!r}; expected one of: {', '.join(KINDS)}")
        meta = self.meta
        current = meta.get("fingerprint")
        if current is None or rebuild:
            if rebuild and current is not None:
                log.warning("rebuilding %s: dropping %s rows embedded by %s", self.root, meta.get("rows"),
                            meta.get("model_source"))
            self.catalogue.clear({"fingerprint": fingerprint, "model_source": source, "dim": str(dim),
                                  "metric": "inner_product", "kind": kind or meta.get("kind") or "auto"})
            (self.root / VECTORS_NAME).unlink(missing_ok=True)
            self._vectors = None
            return
        if current != fingerprint:
            raise StoreError(
                f"index {self.root} was built with model {meta.get('model_source')} (fingerprint "
                f"{current[:12]}), not {source} ({fingerprint[:12]}); pass --weights "
                f"{meta.get('model_source')!s} to use its model, or --rebuild to re-embed the gallery with this one")
        updates = {}
        if source != meta.get("model_source"):
            updates["model_source"] = source
        if kind is not None and kind != meta.get("kind"):
            updates["kind"] = kind
        if updates:
            with self.catalogue.write():
                self.catalogue.set_many(updates)

    # --- the narrow interface ---------------------------------------------------------------

    def add(self, records: Sequence[Record], vectors: np.ndarray) -> list[int]:
        """Store rows with their embeddings (one transaction; a row of the same path is replaced)."""
        self._need_writer()
        vectors = np.asarray(vectors, dtype=np.float32)
        dim = self.dim
        if dim is None:
            raise StoreError(f"index {self.root} has no model bound yet")
        if len(records) and (vectors.ndim != 2 or vectors.shape[1] != dim):
            raise StoreError(f"vectors of shape {vectors.shape} do not fit index {self.root} (dimension {dim})")
        self._vectors, self._changed = None, True
        return self.catalogue.add(records, vectors)

    def remove(self, paths: Iterable[str]) -> int:
        """Delete the rows of these paths; returns how many existed."""
        self._need_writer()
        self._vectors, self._changed = None, True
        return len(self.catalogue.remove(paths))

    def count(self) -> int:
        """Number of images in the index."""
        return self.catalogue.count()

    def search(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """Top-``k`` rows by cosine similarity for each query vector (float32 [nq, dim])."""
        dim = self.dim
        if dim is None or self.count() == 0:
            raise StoreError(f"index {self.root} is empty; add images with `reid index GALLERY --index {self.root}`")
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != dim:
            raise StoreError(f"query vectors of shape {queries.shape} do not fit index {self.root} (dimension {dim})")
        scores, ids = self.vectors().search(queries, k)
        rows = self.catalogue.rows(ids[ids >= 0].tolist())
        return [[Hit(int(i), float(s), rows[i].path, rows[i].pid, rows[i].camid)
                 for s, i in zip(srow, irow) if i in rows]
                for srow, irow in zip(scores, ids)]

    def verify(self, repair: bool = True) -> VectorState:
        """Check ``vectors.faiss`` against the catalogue; with ``repair``, bring it up to date and save it."""
        state = self.vector_state()
        if repair and state.state != "fresh":
            self._vectors = None
            self.vectors()
        return state

    # --- files the catalogue knows ----------------------------------------------------------

    def states(self, under: str | None = None) -> dict[str, FileState]:
        """path -> stored (id, sha256, bytes, mtime), optionally only under a folder."""
        return self.catalogue.states(under)

    def embeddings_by_sha(self, shas: Iterable[str]) -> dict[str, np.ndarray]:
        """sha256 -> stored embedding of a file with that content (copies and renames need no model)."""
        return {s: np.frombuffer(b, dtype="<f4").astype(np.float32)
                for s, b in self.catalogue.embeddings_by_sha(shas).items()}

    def touch(self, stats: Sequence[tuple[str, int, int]]) -> None:
        """Record new (path, bytes, mtime) of files whose content is unchanged."""
        self._need_writer()
        self.catalogue.touch(stats)

    # --- the derived FAISS file -------------------------------------------------------------

    def vector_state(self) -> VectorState:
        """Compare ``vectors.faiss`` with the catalogue without changing anything."""
        path = self.root / VECTORS_NAME
        with self.catalogue.snapshot():
            rows, digest = self.count(), int(self.catalogue.get("id_digest") or 0)
            kind = resolve_kind(self.catalogue.get("kind") or "auto", rows)
        if not path.exists():
            return VectorState("fresh" if rows == 0 else "missing", "no vectors.faiss")
        try:
            vi = VectorIndex.load(path)
        except StoreError as e:
            return VectorState("corrupt", str(e))
        if vi.ntotal != rows or vi.digest() != digest:
            return VectorState("stale", f"it holds {vi.ntotal} rows, the catalogue {rows}", vi.kind)
        if vi.kind != kind or vi.dim != self.dim or vi.outgrown(rows):
            return VectorState("stale", f"it is a {vi.kind} index of {vi.ntotal} rows, the gallery wants {kind}",
                               vi.kind)
        return VectorState("fresh", "", vi.kind)

    def prefetch(self) -> None:
        """Start loading the FAISS index in a background thread (FAISS releases the GIL), e.g. while
        a model loads; ``vectors()`` then waits for it. Read-only stores only."""
        if self._vectors is not None or self._prefetch is not None or self.lock is not None:
            return

        def load() -> None:
            try:
                with GalleryStore.open(self.root) as own:  # an SQLite connection is not shared across threads
                    self._prefetched = own.vectors()
            except BaseException as e:  # noqa: BLE001 - re-raised by vectors() in the caller's thread
                self._prefetched = e

        self._prefetch = threading.Thread(target=load, name="reid-vectors", daemon=True)
        self._prefetch.start()

    def vectors(self) -> VectorIndex:
        """The FAISS index, loaded, or updated/rebuilt from the catalogue when it is missing, stale or corrupt.

        The repaired file is saved when this process holds (or can take) the writer lock. After
        this process changed rows, staleness is expected and reported as info, not as a warning.
        """
        if self._vectors is not None:
            return self._vectors
        if self._prefetch is not None:
            self._prefetch.join()
            got, self._prefetch, self._prefetched = self._prefetched, None, None
            if isinstance(got, BaseException):
                raise got
            self._vectors = got
            return got
        path = self.root / VECTORS_NAME
        warn = log.info if self._changed else log.warning
        with self.catalogue.snapshot():
            rows, digest = self.count(), int(self.catalogue.get("id_digest") or 0)
            dim = self.dim or 0
            kind = resolve_kind(self.catalogue.get("kind") or "auto", rows)
            vi: VectorIndex | None = None
            if path.exists():
                try:
                    vi = VectorIndex.load(path)
                except StoreError as e:
                    log.warning("%s; rebuilding it from the catalogue (%d rows)", e, rows)
            elif rows:
                warn("%s is missing; rebuilding it from the catalogue (%d rows)", path, rows)
            if vi is not None and (vi.kind != kind or vi.dim != dim or vi.outgrown(rows)):
                log.info("rebuilding %s as %s for %d rows (it is %s with %d)", path, kind, rows, vi.kind, vi.ntotal)
                vi = None
            if vi is not None and vi.ntotal == rows and vi.digest() == digest:
                self._vectors = vi
                return vi
            if vi is not None:
                warn("%s is out of date (%d rows, the catalogue %d); updating it from the catalogue",
                     path, vi.ntotal, rows)
                vi = self._update(vi, dim)
            if vi is None:
                vi = self._build(kind, dim, rows)
        self._save(vi, digest)
        self._vectors = vi
        return vi

    def _update(self, vi: VectorIndex, dim: int) -> VectorIndex | None:
        held, wanted = vi.ids(), self.catalogue.ids()
        extra = np.setdiff1d(held, wanted, assume_unique=True)
        missing = np.setdiff1d(wanted, held, assume_unique=True)
        if len(extra) and not vi.remove(extra):
            return None
        for ids, vecs in self.catalogue.vectors(missing, dim=dim):
            vi.add(ids, vecs)
        return vi

    def _build(self, kind: str, dim: int, rows: int) -> VectorIndex:
        vi = VectorIndex.empty(kind, dim, rows)
        want = vi.train_size()
        if want:
            ids = self.catalogue.ids()
            sample = np.sort(np.random.default_rng(0).choice(ids, size=min(want, len(ids)), replace=False))
            log.info("training the %s quantizers on %d of %d vectors", kind, len(sample), rows)
            vi.train(np.concatenate([v for _, v in self.catalogue.vectors(sample, dim=dim)]))
        for ids, vecs in self.catalogue.vectors(dim=dim):
            vi.add(ids, vecs)
        return vi

    def _save(self, vi: VectorIndex, digest: int) -> None:
        lock = self.lock if self.lock is not None and self.lock.held else WriterLock(self.root)
        mine = lock is not self.lock
        if mine and not lock.try_acquire():
            log.info("not saving the repaired %s: another process is writing the index", VECTORS_NAME)
            return
        try:
            # Another writer may have committed between our snapshot and the lock: save only a match.
            if int(self.catalogue.get("id_digest") or 0) == digest and vi.digest() == digest:
                vi.save(self.root / VECTORS_NAME)
        finally:
            if mine:
                lock.release()

    def _need_writer(self) -> None:
        if self.lock is None or not self.lock.held:
            raise StoreError(f"index {self.root} was opened read-only; open it with write=True to change it")

    # --- reporting --------------------------------------------------------------------------

    def info(self) -> dict[str, object]:
        """Rows, dimension, kinds, model, size on disk, dates and the state of the FAISS file."""
        meta = self.meta
        rows = int(meta.get("rows", 0))
        state = self.vector_state()
        size = sum(p.stat().st_size for p in self.root.iterdir() if p.is_file())
        return {
            "index": str(self.root),
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
        }
