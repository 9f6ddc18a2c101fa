"""On-disk cache of embeddings: one ``.npz`` per (model fingerprint, flip, files' paths/sizes/mtimes).

Evaluating again with other options (re-ranking, AP mode) reads the features instead of re-embedding.
An interrupted run (Ctrl-C, a crash, ``kill -9``) leaves what it embedded in ``KEY.partial.npz``; the
next run with the same key embeds only the rest. Written atomically, read with ``allow_pickle=False``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from reid.atomic import atomic_path
from reid.errors import DatasetError

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "~/.cache/reid/features"
CACHE_VERSION = 1
# While embedding, the work so far is saved at most this often beside the entry (``KEY.partial.npz``),
# and again when the run is interrupted, so the next run embeds only the rest.
PARTIAL_SAVE_SECONDS = 30.0


def cache_dir() -> Path:
    """The feature cache folder: ``$REID_CACHE`` when set, else ``~/.cache/reid/features``."""
    return Path(os.environ.get("REID_CACHE") or DEFAULT_CACHE_DIR).expanduser()


def feature_cache_key(fingerprint: str, flip: bool, paths: Sequence[str | Path]) -> str:
    """sha256 of (model fingerprint, flip, sorted (path, size, mtime) of the files)."""
    files = []
    for p in map(os.fspath, paths):  # plain os calls: pathlib.resolve() costs 100 us a file
        try:
            st = os.stat(p)
        except OSError as e:
            raise DatasetError(f"{p}: cannot read dataset file ({e.strerror or e})") from None
        files.append((os.path.abspath(p), st.st_size, st.st_mtime_ns))
    files.sort()
    doc = json.dumps({"v": CACHE_VERSION, "fingerprint": fingerprint, "flip": bool(flip), "files": files})
    return hashlib.sha256(doc.encode()).hexdigest()


@dataclass
class FeatureTable:
    """Features of distinct files: ``features[i]`` belongs to ``paths[i]``; ``failures`` did not decode."""

    paths: list[str]
    features: np.ndarray
    failures: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def of(cls, paths: Sequence[str | Path], features: np.ndarray,
           failures: Sequence[tuple[str | Path, str]] = ()) -> FeatureTable:
        """A table from ``reid.embed.embed_paths`` output (paths kept as strings, as the cache stores them)."""
        return cls([str(p) for p in paths], features, [(str(p), reason) for p, reason in failures])

    def covered(self) -> set[str]:
        """Every path the table accounts for: embedded or failed."""
        return set(self.paths) | {p for p, _ in self.failures}

    def rows(self, paths: Sequence[str | Path]) -> np.ndarray:
        """Row of each path (-1 for a file that failed to decode)."""
        where = {p: i for i, p in enumerate(self.paths)}
        return np.array([where.get(str(p), -1) for p in paths], dtype=np.int64)


def load_cached(path: Path) -> FeatureTable | None:
    """Read a cache entry; None (with a warning) when it is missing or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            table = FeatureTable(
                paths=[str(p) for p in z["paths"]],
                features=np.ascontiguousarray(z["features"], dtype=np.float32),
                failures=[(str(p), str(r)) for p, r in zip(z["failed_paths"], z["failed_reasons"], strict=True)],
            )
    except Exception as e:  # noqa: BLE001 - a corrupt cache entry is recomputed, never fatal
        log.warning("ignoring unreadable feature cache %s (%s)", path, e)
        return None
    if table.features.shape[0] != len(table.paths):
        log.warning("ignoring inconsistent feature cache %s", path)
        return None
    return table


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """Write arrays to ``path`` atomically (temp file in the same folder, then ``os.replace``); no pickles."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # a file object: np.savez would add ".npz" to a name
        np.savez(fh, **arrays)
    return path


def save_cached(path: Path, table: FeatureTable) -> None:
    """Write a cache entry atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_npz(path, {
        "features": table.features.astype(np.float32),
        "paths": np.array(table.paths, dtype=np.str_),
        "failed_paths": np.array([p for p, _ in table.failures], dtype=np.str_),
        "failed_reasons": np.array([r for _, r in table.failures], dtype=np.str_),
    })


def embed_files(
    model,
    paths: Sequence[str | Path],
    *,
    fingerprint: str,
    flip: bool = False,
    batch_size: int = 32,
    workers: int | None = None,
    device=None,
    use_cache: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[FeatureTable, str]:
    """Embed each distinct file once, through the cache; returns the table and "hit" | "miss" | "off"."""
    from reid.embed import embed_paths

    unique = list(dict.fromkeys(str(p) for p in paths))
    entry = cache_dir() / f"{feature_cache_key(fingerprint, flip, unique)}.npz" if use_cache else None
    cached = _cached(entry, unique)
    if cached is not None:
        return cached, "hit"
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, len(unique))

    partial = entry.with_name(entry.stem + ".partial.npz") if entry is not None else None
    parts = _resumed(partial, unique)
    already = parts[0].covered() if parts else set()
    if parts:
        log.info("resuming an interrupted embedding: %d of %d files done", len(already), len(unique))
        advance(len(already))
    todo = [p for p in unique if p not in already]
    saving, last_save = partial is not None, time.monotonic()

    def keep(batch_paths: list[Path], features: np.ndarray, failures: list[tuple[Path, str]]) -> None:
        nonlocal saving, last_save
        parts.append(FeatureTable.of(batch_paths, features, failures))
        if saving and time.monotonic() - last_save >= PARTIAL_SAVE_SECONDS:
            saving = _save_quietly(partial, _merge(parts))  # after one warning, no more tries this run
            last_save = time.monotonic()

    try:
        embed_paths(model, todo, batch_size=batch_size, workers=workers, device=device, flip=flip, progress=advance,
                    on_batch=keep)
    except BaseException:
        if saving and parts:
            _save_quietly(partial, _merge(parts))  # the next run starts from here
        raise
    table = _merge(parts) if parts else FeatureTable([], np.zeros((0, getattr(model, "embed_dim", 0)), np.float32))
    if entry is None:
        return table, "off"
    _store(entry, partial, table)
    return table, "miss"


def _cached(entry: Path | None, unique: list[str]) -> FeatureTable | None:
    """The cache entry's table when it covers exactly these files."""
    cached = load_cached(entry) if entry is not None else None
    if cached is None or cached.covered() != set(unique):
        return None
    log.info("feature cache hit: %s", entry)
    return cached


def _resumed(partial: Path | None, unique: list[str]) -> list[FeatureTable]:
    """What an interrupted run with the same key embedded (its ``.partial.npz``), when it covers only these files."""
    resumed = load_cached(partial) if partial is not None and partial.is_file() else None
    already = resumed.covered() if resumed is not None else set()
    return [resumed] if already and already <= set(unique) else []


def _store(entry: Path, partial: Path, table: FeatureTable) -> None:
    """Write the finished entry; the interrupted run's partial one is then spent."""
    if _save_quietly(entry, table):
        log.info("feature cache written: %s", entry)
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)


def _merge(parts: list[FeatureTable]) -> FeatureTable:
    return FeatureTable([p for t in parts for p in t.paths], np.concatenate([t.features for t in parts]),
                        [f for t in parts for f in t.failures])


def _save_quietly(path: Path, table: FeatureTable) -> bool:
    """save_cached; a read-only or full cache folder costs the next run time, not this one's result."""
    try:
        save_cached(path, table)
        return True
    except OSError as e:
        log.warning("could not write the feature cache %s (%s); set REID_CACHE to a writable folder", path, e)
        return False
