"""The catalogue's SQLite schema, its version and the migrations from older versions (run on open).

Version 1: ``images`` without ``time``. Version 2 adds ``time`` (REAL seconds since the epoch; for a
crop file its mtime, which version 1 rows already hold as ``mtime`` in ns) and indexes on the
columns that search filters use, so a filter is an index lookup rather than a scan of the
embedding-laden rows. Version 3 adds where a person was found in footage: ``camera`` (a name),
``media`` (the video or full frame the crop was cut from; NULL for a crop file), ``frame``, the box
``x1, y1, x2, y2`` (frame pixels), the detector's ``score`` and the ``track`` (tracklet id within its
source: the video or the folder of frames); and the ``media`` table, one row per video or frames
folder with its progress, so a killed run resumes and a processed video is not decoded again.
"""

from __future__ import annotations

import datetime as dt
import logging
import sqlite3
from pathlib import Path

from reid.errors import StoreError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3

# Columns that filters select on; each has an index.
_FILTER_INDEXES = """
CREATE INDEX IF NOT EXISTS images_camid ON images(camid);
CREATE INDEX IF NOT EXISTS images_pid ON images(pid);
CREATE INDEX IF NOT EXISTS images_source ON images(source);
CREATE INDEX IF NOT EXISTS images_time ON images(time);
"""

_FOOTAGE_INDEXES = """
CREATE INDEX IF NOT EXISTS images_camera ON images(camera);
CREATE INDEX IF NOT EXISTS images_footage ON images(source, track);
"""

# One row per video (or folder of full frames) indexing has started on; crop files have none.
_MEDIA = """
CREATE TABLE IF NOT EXISTS media (
    path TEXT PRIMARY KEY,              -- absolute
    sha256 TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    mtime INTEGER NOT NULL,             -- st_mtime_ns
    camera TEXT,
    fps REAL,
    frames INTEGER,                     -- as the container states it (may be approximate)
    width INTEGER,
    height INTEGER,
    start REAL,                         -- time of frame 0, s since the epoch
    next_frame INTEGER NOT NULL,        -- every frame before it is processed and its people stored
    next_track INTEGER NOT NULL,        -- the tracklet id a resumed run numbers on from
    people INTEGER NOT NULL,            -- detections stored so far
    done INTEGER NOT NULL,              -- 1: read to the end (or to where it broke, see error)
    error TEXT,                         -- why decoding stopped early, if it did
    updated_at TEXT NOT NULL
);
"""

# Columns version 3 adds to ``images``, in order (ALTER TABLE appends them; a new catalogue has them last too).
FOOTAGE_COLUMNS = (("camera", "TEXT"), ("media", "TEXT"), ("frame", "INTEGER"), ("x1", "INTEGER"),
                   ("y1", "INTEGER"), ("x2", "INTEGER"), ("y2", "INTEGER"), ("score", "REAL"), ("track", "INTEGER"))

_TABLES = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL UNIQUE,          -- absolute (a crop cut from footage: MEDIA#frame=N&person=K)
    sha256 TEXT NOT NULL,               -- of the file (for footage: of the media)
    bytes INTEGER NOT NULL,
    mtime INTEGER NOT NULL,             -- st_mtime_ns
    pid INTEGER,
    camid INTEGER,
    source TEXT NOT NULL,               -- the gallery root (or media file) it was indexed from
    added_at TEXT NOT NULL,
    embedding BLOB NOT NULL,            -- float32 little-endian, meta.dim values
    time REAL,                          -- when the crop was taken, s since the epoch (v2)
""" + ",\n".join(f"    {name} {kind}" for name, kind in FOOTAGE_COLUMNS) + """  -- v3
);
CREATE INDEX IF NOT EXISTS images_sha256 ON images(sha256);
""" + _FILTER_INDEXES + _FOOTAGE_INDEXES + _MEDIA


def now() -> str:
    """UTC now, ISO 8601 to the second (``created_at`` / ``updated_at``)."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _run(conn: sqlite3.Connection, script: str) -> None:
    # Statement by statement: ``executescript`` would first commit the caller's transaction.
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


def _to_v2(conn: sqlite3.Connection) -> None:
    conn.execute("ALTER TABLE images ADD COLUMN time REAL")
    conn.execute("UPDATE images SET time = mtime / 1e9")
    _run(conn, _FILTER_INDEXES)


def _to_v3(conn: sqlite3.Connection) -> None:
    for name, kind in FOOTAGE_COLUMNS:
        conn.execute(f"ALTER TABLE images ADD COLUMN {name} {kind}")
    conn.execute("UPDATE images SET camera = 'c' || camid WHERE camid IS NOT NULL")
    _run(conn, _FOOTAGE_INDEXES + _MEDIA)


# _STEPS[v] turns a version-v catalogue into version v + 1, inside the caller's transaction.
_STEPS = {1: _to_v2, 2: _to_v3}


def _version(conn: sqlite3.Connection) -> str | None:
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.OperationalError:  # no meta table: empty, or not one of our catalogues
        return None
    return None if row is None else row[0]


def prepare(conn: sqlite3.Connection, path: Path, *, create: bool) -> None:
    """Create the schema in a new catalogue (``create``), or bring an older one up to ``SCHEMA_VERSION``.

    StoreError for a file that is not a catalogue, one newer than this reid reads, or one that needs
    an upgrade it cannot write.
    """
    version = _version(conn)
    if version is None:
        if not create:
            raise StoreError(f"{path}: not an index catalogue (no schema version)")
        conn.execute("BEGIN IMMEDIATE")
        try:
            _run(conn, _TABLES)
            stamp = now()
            conn.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                             [("schema_version", str(SCHEMA_VERSION)), ("rows", "0"), ("id_digest", "0"),
                              ("created_at", stamp), ("updated_at", stamp)])
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return
    try:
        number = int(version)
    except ValueError:
        raise StoreError(f"{path}: catalogue schema version {version!r} is not a number") from None
    if number > SCHEMA_VERSION:
        raise StoreError(f"{path}: catalogue schema version {number} is newer than this reid reads ({SCHEMA_VERSION}); "
                         f"use a newer reid")
    if number < SCHEMA_VERSION:
        _migrate(conn, path, number)


def _migrate(conn: sqlite3.Connection, path: Path, number: int) -> None:
    """Run the steps from ``number`` to ``SCHEMA_VERSION`` in one transaction (all or nothing)."""
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as e:
        raise StoreError(f"{path}: cannot upgrade the catalogue from schema {number} to {SCHEMA_VERSION} "
                         f"({e})") from None
    try:
        current = int(_version(conn) or number)  # another process may have upgraded it meanwhile
        if current < SCHEMA_VERSION:
            log.warning("upgrading the catalogue %s from schema %d to %d (once)", path, current, SCHEMA_VERSION)
        for v in range(current, SCHEMA_VERSION):
            _STEPS[v](conn)
        conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
    except sqlite3.OperationalError as e:
        conn.execute("ROLLBACK")
        raise StoreError(f"{path}: cannot upgrade the catalogue from schema {number} to {SCHEMA_VERSION} "
                         f"({e})") from None
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
