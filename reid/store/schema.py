"""The catalogue's SQLite schema, its version and the migrations from older versions (run on open).

Version 1: ``images`` without ``time``. Version 2 adds ``time`` (REAL seconds since the epoch; for a
crop file its mtime, which version 1 rows already hold as ``mtime`` in ns) and indexes on the
columns that search filters use, so a filter is an index lookup rather than a scan of the
embedding-laden rows.
"""

from __future__ import annotations

import datetime as dt
import logging
import sqlite3
from pathlib import Path

from reid.errors import StoreError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2

# Columns that filters select on; each has an index.
_FILTER_INDEXES = """
CREATE INDEX IF NOT EXISTS images_camid ON images(camid);
CREATE INDEX IF NOT EXISTS images_pid ON images(pid);
CREATE INDEX IF NOT EXISTS images_source ON images(source);
CREATE INDEX IF NOT EXISTS images_time ON images(time);
"""

_TABLES = """
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
    embedding BLOB NOT NULL,            -- float32 little-endian, meta.dim values
    time REAL                           -- when the crop was taken, s since the epoch (v2, last: where ALTER puts it)
);
CREATE INDEX IF NOT EXISTS images_sha256 ON images(sha256);
""" + _FILTER_INDEXES


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


# _STEPS[v] turns a version-v catalogue into version v + 1, inside the caller's transaction.
_STEPS = {1: _to_v2}


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
