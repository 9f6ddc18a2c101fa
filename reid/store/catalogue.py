"""The SQLite catalogue of an index: one row per image (path, content hash, ids, time, embedding).

It is the source of truth; the FAISS file beside it is derived from the ``embedding`` BLOBs.
Every write is one transaction that also updates ``meta`` (row count and an order-free digest
of the row ids), so a reader can tell in O(1) whether a FAISS file holds exactly these rows.
Row ids are never reused (AUTOINCREMENT) and a row's embedding is never updated in place: a
changed file gets a new row, so equal id sets mean equal vectors. Search filters become SQL over
indexed columns (:meth:`Catalogue.select`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
from pathlib import Path
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from reid.errors import StoreError
from reid.store.base import FileState, Filter, MediaState, Record, Tracklet
from reid.store.schema import now, prepare

log = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1
_RECORD_COLUMNS = ("path, sha256, bytes, mtime, pid, camid, source, time, camera, media, frame, x1, y1, x2, y2, "
                   "score, track")
_MEDIA_COLUMNS = ("path, sha256, bytes, mtime, camera, fps, frames, width, height, start, next_frame, next_track, "
                  "people, done, error")


def _row_values(r: Record) -> tuple:
    box = r.box if r.box is not None else (None,) * 4
    return (r.path, r.sha256, r.bytes, r.mtime, r.pid, r.camid, r.source, r.time, r.camera, r.media, r.frame,
            *box, r.score, r.track)


def _record(row: Sequence) -> Record:
    """A Record from the values of ``_RECORD_COLUMNS``."""
    x1, y1, x2, y2 = row[11:15]
    box = None if x1 is None else (x1, y1, x2, y2)
    return Record(*row[:11], box=box, score=row[15], track=row[16])


def id_digest(ids: np.ndarray | Sequence[int]) -> int:
    """An order-free 64-bit digest of a set of row ids (sum of splitmix64 hashes, mod 2^64)."""
    z = np.asarray(ids, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
        return int(z.sum(dtype=np.uint64)) & _MASK64


def _in(column: str, values: Iterable) -> tuple[str, list]:
    # One JSON parameter per set: no limit on its size, and the planner still uses the column's index.
    return f"{column} IN (SELECT value FROM json_each(?))", [json.dumps(sorted(values))]


def filter_sql(where: Filter) -> tuple[str, list]:
    """``where`` as an SQL condition on ``images`` and its parameters ("1" for no filter)."""
    clauses: list[str] = []
    args: list = []
    for column, values in (("camid", where.cameras), ("source", where.sources), ("pid", where.pids),
                           ("camera", where.camera_names)):
        if values is not None:
            sql, a = _in(column, values)
            clauses.append(sql)
            args += a
    if where.cameras_excluded:
        sql, a = _in("camid", where.cameras_excluded)
        clauses.append(f"(camid IS NULL OR NOT {sql})")
        args += a
    if where.since is not None:
        clauses.append("time >= ?")
        args.append(float(where.since))
    if where.until is not None:
        clauses.append("time <= ?")
        args.append(float(where.until))
    return (" AND ".join(clauses) or "1"), args


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
            prepare(self.conn, self.path, create=create)
        except sqlite3.DatabaseError as e:
            self.conn.close()
            raise StoreError(f"{self.path}: not a readable index catalogue ({e}); delete the index folder "
                             f"and index the gallery again") from None
        except BaseException:
            self.conn.close()
            raise

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
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
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
        self.set_many({"rows": str(rows), "id_digest": str(digest), "updated_at": now()})

    # --- rows -------------------------------------------------------------------------------

    def count(self, where: Filter | None = None) -> int:
        """Number of rows: from meta (kept in step with every write), or by SQL for a filter."""
        if where is None or where.is_empty:
            return int(self.get("rows") or 0)
        sql, args = filter_sql(where)
        return int(self.conn.execute(f"SELECT count(*) FROM images WHERE {sql}", args).fetchone()[0])

    def select(self, where: Filter) -> tuple[np.ndarray, bool]:
        """The row ids ``where`` lets through -> (ids int64, False); for a filter that only leaves out
        cameras, the (usually far fewer) ids it leaves out -> (ids, True)."""
        if where.only_excludes:
            sql, args = _in("camid", where.cameras_excluded)
            dropped = True
        else:
            sql, args = filter_sql(where)
            dropped = False
        # One comma-separated string parsed by NumPy: ~8x faster than a Python tuple per row (16k ids: ~1 ms).
        text = self.conn.execute(f"SELECT group_concat(id) FROM images WHERE {sql}", args).fetchone()[0]
        ids = np.fromstring(text, dtype=np.int64, sep=",") if text else np.empty(0, np.int64)
        return ids, dropped

    def states(self, under: str | None = None) -> dict[str, FileState]:
        """path -> FileState for every crop-file row (or for those whose path lies under the folder ``under``);
        rows cut from footage are the ``media`` table's business."""
        sql = "SELECT path, id, sha256, bytes, mtime FROM images WHERE media IS NULL"
        args: tuple = ()
        if under is not None:
            prefix = under.rstrip("/") + "/"
            sql += " AND substr(path, 1, ?) = ?"
            args = (len(prefix), prefix)
        return {p: FileState(i, s, b, m) for p, i, s, b, m in self.conn.execute(sql, args)}

    def embeddings_by_sha(self, shas: Iterable[str]) -> dict[str, bytes]:
        """sha256 -> a stored embedding BLOB of a file with that content (for copies and renames)."""
        found: dict[str, bytes] = {}
        shas = list(dict.fromkeys(shas))
        for s in range(0, len(shas), 500):
            chunk = shas[s : s + 500]
            q = f"SELECT sha256, embedding FROM images WHERE media IS NULL AND sha256 IN ({','.join('?' * len(chunk))})"
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
        stamp = now()
        with self.write() as c:
            for r, v in zip(records, vectors, strict=True):
                old = c.execute("SELECT id FROM images WHERE path = ?", (r.path,)).fetchone()
                if old is not None:
                    c.execute("DELETE FROM images WHERE id = ?", old)
                    removed.append(old[0])
                cur = c.execute(
                    f"INSERT INTO images({_RECORD_COLUMNS}, added_at, embedding) VALUES ({', '.join('?' * 19)})",
                    (*_row_values(r), stamp, v.tobytes()),
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
            c.execute("DELETE FROM media")
            self.set_many({**meta, "rows": "0", "id_digest": "0", "updated_at": now()})

    def ids(self) -> np.ndarray:
        """All row ids, ascending (int64)."""
        rows = self.conn.execute("SELECT id FROM images ORDER BY id").fetchall()
        return np.array([r[0] for r in rows], dtype=np.int64)

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
        bad = [(i, len(b) // 4) for i, b in rows if len(b) != 4 * dim]
        if bad:
            raise StoreError(f"{self.path}: row {bad[0][0]} holds an embedding of {bad[0][1]} values, "
                             f"the index dimension is {dim}; rebuild the index")
        ids = np.fromiter((i for i, _ in rows), dtype=np.int64, count=len(rows))
        vecs = np.frombuffer(b"".join(b for _, b in rows), dtype="<f4").reshape(len(rows), dim)
        return ids, vecs.astype(np.float32, copy=False)

    def records(self, ids: Iterable[int]) -> dict[int, Record]:
        """id -> Record for the given ids (missing ids are absent)."""
        ids = list(dict.fromkeys(int(i) for i in ids))
        found: dict[int, Record] = {}
        for s in range(0, len(ids), 500):
            part = ids[s : s + 500]
            q = f"SELECT id, {_RECORD_COLUMNS} FROM images WHERE id IN ({','.join('?' * len(part))})"
            found.update({r[0]: _record(r[1:]) for r in self.conn.execute(q, part)})
        return found

    def scan(self, where: Filter | None = None, chunk: int = 4096) -> Iterator[tuple[int, Record]]:
        """(id, Record) of every row ``where`` lets through, in id order, read in chunks."""
        sql, args = filter_sql(where or Filter())
        last = -1
        while True:
            rows = self.conn.execute(f"SELECT id, {_RECORD_COLUMNS} FROM images WHERE id > ? AND {sql} "
                                     f"ORDER BY id LIMIT ?", (last, *args, chunk)).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            yield from ((r[0], _record(r[1:])) for r in rows)

    def tracklets(self, keys: Iterable[tuple[str, int]]) -> dict[tuple[str, int], Tracklet]:
        """(source, track) -> span, one indexed lookup per key (a query asks for a page of them)."""
        found = {}
        for source, track in dict.fromkeys(keys):
            row = self.conn.execute("SELECT min(time), max(time), min(frame), max(frame), count(*) FROM images "
                                    "WHERE source = ? AND track = ?", (source, track)).fetchone()
            if row[4]:
                found[(source, track)] = Tracklet(*row)
        return found

    # --- media (footage progress) -----------------------------------------------------------

    def media_states(self) -> dict[str, MediaState]:
        """path -> MediaState of every video or frame indexing has started on."""
        rows = self.conn.execute(f"SELECT {_MEDIA_COLUMNS} FROM media").fetchall()
        return {r[0]: MediaState(*r[:13], done=bool(r[13]), error=r[14]) for r in rows}

    def save_media(self, m: MediaState) -> None:
        """Insert or replace one media row."""
        with self.write() as c:
            c.execute(f"INSERT OR REPLACE INTO media({_MEDIA_COLUMNS}, updated_at) VALUES ({', '.join('?' * 16)})",
                      (m.path, m.sha256, m.bytes, m.mtime, m.camera, m.fps, m.frames, m.width, m.height, m.start,
                       m.next_frame, m.next_track, m.people, int(m.done), m.error, now()))

    def remove_media(self, path: str, from_frame: int = 0) -> list[int]:
        """Delete the footage rows indexed from ``path`` (a video, or a folder of frames) at frame ``from_frame``
        or later (and, for 0, its media row); returns the ids removed."""
        with self.write() as c:
            removed = [r[0] for r in c.execute("DELETE FROM images WHERE source = ? AND media IS NOT NULL AND "
                                               "frame >= ? RETURNING id", (path, from_frame))]
            if from_frame <= 0:
                c.execute("DELETE FROM media WHERE path = ?", (path,))
            if removed:
                self._bump([], removed)
        return removed
