"""The SQLite catalogue of an index: one row per image (path, content hash, ids, embedding).

It is the source of truth; the FAISS file beside it is derived from the ``embedding`` BLOBs.
Every write is one transaction that also updates ``meta`` (row count and an order-free digest
of the row ids), so a reader can tell in O(1) whether a FAISS file holds exactly these rows.
Row ids are never reused (AUTOINCREMENT) and a row's embedding is never updated in place: a
changed file gets a new row, so equal id sets mean equal vectors.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from reid.errors import StoreError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL UNIQUE,          -- absolute, under a resolved gallery root
    sha256 TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    mtime INTEGER NOT NULL,             -- st_mtime_ns
    pid INTEGER,
    camid INTEGER,
    source TEXT NOT NULL,               -- the gallery root the file was indexed from
    added_at TEXT NOT NULL,
    embedding BLOB NOT NULL             -- float32 little-endian, meta.dim values
);
CREATE INDEX IF NOT EXISTS images_sha256 ON images(sha256);
"""

_MASK64 = (1 << 64) - 1


def id_digest(ids: np.ndarray | Sequence[int]) -> int:
    """An order-free 64-bit digest of a set of row ids (sum of splitmix64 hashes, mod 2^64)."""
    z = np.asarray(ids, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
        return int(z.sum(dtype=np.uint64)) & _MASK64


@dataclass(frozen=True)
class Record:
    """What the catalogue keeps about one image file, besides its embedding."""

    path: str
    sha256: str
    bytes: int
    mtime: int
    pid: int | None
    camid: int | None
    source: str


@dataclass(frozen=True)
class FileState:
    """The stored identity of a file: enough to tell whether it changed since it was indexed."""

    id: int
    sha256: str
    bytes: int
    mtime: int


@dataclass(frozen=True)
class Row:
    """The part of a row a search result shows."""

    id: int
    path: str
    pid: int | None
    camid: int | None


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class Catalogue:
    """An open ``catalogue.sqlite`` (WAL mode); writes must happen under the index's writer lock."""

    def __init__(self, path: Path, *, create: bool = False) -> None:
        self.path = Path(path)
        if not create and not self.path.exists():
            raise StoreError(f"{self.path}: no catalogue here")
        try:
            self.conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL survives a killed process
            if create:
                self.conn.executescript(_SCHEMA)
            version = self.get("schema_version")
            if version is None and create:
                self.set_many({"schema_version": str(SCHEMA_VERSION), "rows": "0", "id_digest": "0",
                               "created_at": _now(), "updated_at": _now()})
            elif version != str(SCHEMA_VERSION):
                raise StoreError(f"{self.path}: catalogue schema version {version!r}, this reid reads "
                                 f"{SCHEMA_VERSION}; rebuild the index with `reid index GALLERY --rebuild`")
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path}: not a readable index catalogue ({e}); delete the index folder "
                             f"and run `reid index` again") from None

    def close(self) -> None:
        """Close the connection (idempotent)."""
        self.conn.close()

    # --- transactions -------------------------------------------------------------------------

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One immediate write transaction: committed on success, rolled back on any exception."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: every query inside sees the same committed state (WAL snapshot)."""
        self.conn.execute("BEGIN")
        try:
            yield self.conn
        finally:
            self.conn.execute("COMMIT")

    # --- meta -------------------------------------------------------------------------------

    def get(self, key: str) -> str | None:
        """One meta value, or None."""
        try:
            row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        except sqlite3.OperationalError:  # no meta table: not one of our catalogues
            return None
        return None if row is None else row[0]

    def meta(self) -> dict[str, str]:
        """All meta values."""
        return dict(self.conn.execute("SELECT key, value FROM meta").fetchall())

    def set_many(self, values: dict[str, str]) -> None:
        """Set meta values (inside the caller's transaction when there is one)."""
        self.conn.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                              [(k, str(v)) for k, v in values.items()])

    def _bump(self, added: Iterable[int], removed: Iterable[int]) -> None:
        added, removed = list(added), list(removed)
        m = self.meta()
        rows = int(m.get("rows", 0)) + len(added) - len(removed)
        digest = (int(m.get("id_digest", 0)) + id_digest(added) - id_digest(removed)) & _MASK64
        self.set_many({"rows": str(rows), "id_digest": str(digest), "updated_at": _now()})

    # --- rows -------------------------------------------------------------------------------

    def count(self) -> int:
        """Number of rows, as recorded in meta (kept in step with every write)."""
        return int(self.get("rows") or 0)

    def states(self, under: str | None = None) -> dict[str, FileState]:
        """path -> FileState for every row (or for rows whose path lies under the folder ``under``)."""
        sql = "SELECT path, id, sha256, bytes, mtime FROM images"
        args: tuple = ()
        if under is not None:
            prefix = under.rstrip("/") + "/"
            sql += " WHERE substr(path, 1, ?) = ?"
            args = (len(prefix), prefix)
        return {p: FileState(i, s, b, m) for p, i, s, b, m in self.conn.execute(sql, args)}

    def embeddings_by_sha(self, shas: Iterable[str]) -> dict[str, bytes]:
        """sha256 -> a stored embedding BLOB of a file with that content (for copies and renames)."""
        found: dict[str, bytes] = {}
        shas = list(dict.fromkeys(shas))
        for s in range(0, len(shas), 500):
            chunk = shas[s : s + 500]
            q = f"SELECT sha256, embedding FROM images WHERE sha256 IN ({','.join('?' * len(chunk))})"
            found.update(self.conn.execute(q, chunk).fetchall())
        return found

    def add(self, records: Sequence[Record], vectors: np.ndarray) -> list[int]:
        """Insert rows (replacing any row of the same path) in one transaction; returns the new ids."""
        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        if len(records) != len(vectors):
            raise ValueError(f"{len(records)} records but {len(vectors)} vectors")
        if not records:
            return []
        added, removed = [], []
        now = _now()
        with self.write() as c:
            for r, v in zip(records, vectors):
                old = c.execute("SELECT id FROM images WHERE path = ?", (r.path,)).fetchone()
                if old is not None:
                    c.execute("DELETE FROM images WHERE id = ?", old)
                    removed.append(old[0])
                cur = c.execute(
                    "INSERT INTO images(path, sha256, bytes, mtime, pid, camid, source, added_at, embedding)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (r.path, r.sha256, r.bytes, r.mtime, r.pid, r.camid, r.source, now, v.tobytes()),
                )
                added.append(cur.lastrowid)
            self._bump(added, removed)
        return added

    def touch(self, stats: Sequence[tuple[str, int, int]]) -> None:
        """Record a new (bytes, mtime) for files whose content (sha256) did not change."""
        if stats:
            with self.write() as c:
                c.executemany("UPDATE images SET bytes = ?, mtime = ? WHERE path = ?",
                              [(b, m, p) for p, b, m in stats])

    def remove(self, paths: Iterable[str]) -> list[int]:
        """Delete the rows of these paths in one transaction; returns the ids removed."""
        paths = list(paths)
        removed: list[int] = []
        if not paths:
            return removed
        with self.write() as c:
            for p in paths:
                row = c.execute("DELETE FROM images WHERE path = ? RETURNING id", (p,)).fetchone()
                if row is not None:
                    removed.append(row[0])
            self._bump([], removed)
        return removed

    def clear(self, meta: dict[str, str]) -> None:
        """Drop every row and set new meta (a rebuild with another model), in one transaction."""
        with self.write() as c:
            c.execute("DELETE FROM images")
            self.set_many({**meta, "rows": "0", "id_digest": "0", "updated_at": _now()})

    def ids(self) -> np.ndarray:
        """All row ids, ascending (int64)."""
        cur = self.conn.execute("SELECT id FROM images ORDER BY id")
        return np.fromiter((r[0] for r in cur), dtype=np.int64)

    def vectors(self, ids: np.ndarray | None = None, *, dim: int, chunk: int = 65536
                ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (ids int64 [n], vectors float32 [n, dim]) chunks, for all rows or for the given ids."""
        if ids is None:
            last = -1
            while True:
                rows = self.conn.execute("SELECT id, embedding FROM images WHERE id > ? ORDER BY id LIMIT ?",
                                         (last, chunk)).fetchall()
                if not rows:
                    return
                last = rows[-1][0]
                yield self._unpack(rows, dim)
        else:
            ids = np.asarray(ids, dtype=np.int64)
            for s in range(0, len(ids), 500):
                part = ids[s : s + 500].tolist()
                rows = self.conn.execute(
                    f"SELECT id, embedding FROM images WHERE id IN ({','.join('?' * len(part))})", part
                ).fetchall()
                if rows:
                    yield self._unpack(rows, dim)

    def _unpack(self, rows: list[tuple[int, bytes]], dim: int) -> tuple[np.ndarray, np.ndarray]:
        bad = [i for i, b in rows if len(b) != 4 * dim]
        if bad:
            raise StoreError(f"{self.path}: row {bad[0]} holds an embedding of {len(rows[0][1]) // 4} values, "
                             f"the index dimension is {dim}; rebuild with `reid index GALLERY --rebuild`")
        ids = np.fromiter((i for i, _ in rows), dtype=np.int64, count=len(rows))
        vecs = np.frombuffer(b"".join(b for _, b in rows), dtype="<f4").reshape(len(rows), dim)
        return ids, vecs.astype(np.float32, copy=False)

    def rows(self, ids: Iterable[int]) -> dict[int, Row]:
        """id -> Row for the given ids (missing ids are absent)."""
        ids = list(dict.fromkeys(int(i) for i in ids))
        found: dict[int, Row] = {}
        for s in range(0, len(ids), 500):
            part = ids[s : s + 500]
            q = f"SELECT id, path, pid, camid FROM images WHERE id IN ({','.join('?' * len(part))})"
            found.update({r[0]: Row(*r) for r in self.conn.execute(q, part)})
        return found
