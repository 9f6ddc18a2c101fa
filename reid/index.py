"""Keep a gallery in step with a folder of crops: walk, plan what is new or changed, embed, add.

A file is looked at again only when its (path, size, mtime) changed, and re-embedded only when
its sha256 changed too; content already in the gallery (a copy, a rename) reuses its stored
embedding. Rows are committed per embedded batch, so a run killed at any point loses at most one
batch, and the next run picks up where it stopped. The gallery's derived search structures are
synced at the end. Everything here goes through the ``reid.store.Gallery`` protocol.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable

import numpy as np

from reid.images import find_images, parse_market_name
from reid.store import FileState, Gallery, Record, open_gallery

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (images done, images to embed)


@dataclass
class IndexReport:
    """What one indexing run did."""

    found: int = 0
    added: int = 0  # new files, embedded
    updated: int = 0  # changed files, re-embedded
    reused: int = 0  # new or changed files whose content was already embedded (copies, renames)
    unchanged: int = 0
    pruned: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    rows: int = 0  # rows in the gallery afterwards
    seconds: float = 0.0
    embed_seconds: float = 0.0

    @property
    def embedded(self) -> int:
        """Images that went through the model."""
        return self.added + self.updated

    def to_dict(self) -> dict[str, object]:
        """JSON-able summary."""
        return {"found": self.found, "added": self.added, "updated": self.updated, "reused": self.reused,
                "unchanged": self.unchanged, "pruned": self.pruned, "rows": self.rows,
                "failed": [{"path": p, "reason": r} for p, r in self.failed],
                "seconds": round(self.seconds, 3), "embed_seconds": round(self.embed_seconds, 3)}


@dataclass(frozen=True)
class _Todo:
    record: Record
    replaces: bool  # the path has an older row (changed content)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _reason(path: str, message: str) -> str:
    return message[len(path) + 2 :] if message.startswith(path + ": ") else message


def _plan(gallery: Gallery, root: Path, files: list[Path], report: IndexReport
          ) -> tuple[list[_Todo], list[tuple[_Todo, np.ndarray]], dict[str, FileState]]:
    """Sort files into unchanged / reusable / to embed; record stat-only changes and failures."""
    under = str(root if root.is_dir() else root.parent)
    known = gallery.states(under)
    if not root.is_dir():  # a single file: leave its neighbours alone (prune included)
        known = {p: s for p, s in known.items() if p == str(root)}
    todo: list[_Todo] = []
    touches: list[tuple[str, int, int]] = []
    for f in files:
        path = str(f)
        try:
            st = f.stat()
            old = known.get(path)
            if old is not None and old.bytes == st.st_size and old.mtime == st.st_mtime_ns:
                report.unchanged += 1
                continue
            sha = sha256_file(f)
        except OSError as e:
            report.failed.append((path, e.strerror or str(e)))
            continue
        if old is not None and old.sha256 == sha:
            touches.append((path, st.st_size, st.st_mtime_ns))
            report.unchanged += 1
            continue
        pid, camid = parse_market_name(f.name)
        rec = Record(path, sha, st.st_size, st.st_mtime_ns, pid, camid, under if root.is_dir() else path,
                     time=st.st_mtime_ns / 1e9)  # a crop file's time: when it was written
        todo.append(_Todo(rec, old is not None))
    gallery.touch(touches)
    stored = gallery.embeddings_by_sha(t.record.sha256 for t in todo)
    reuse = [(t, stored[t.record.sha256]) for t in todo if t.record.sha256 in stored]
    return [t for t in todo if t.record.sha256 not in stored], reuse, known


def index_folder(gallery: Gallery, model, folder: str | os.PathLike, *, batch_size: int = 32,
                 workers: int | None = None, device=None, prune: bool = False, progress: Progress | None = None
                 ) -> IndexReport:
    """Embed the new and changed images under ``folder`` into ``gallery`` (opened for writing, model bound)."""
    from reid.embed import embed_paths

    t0 = time.perf_counter()
    report = IndexReport()
    root = Path(folder).expanduser().resolve()
    files = find_images(root)
    report.found = len(files)
    todo, reuse, known = _plan(gallery, root, files, report)

    if reuse:
        gallery.add([t.record for t, _ in reuse], np.stack([v for _, v in reuse]))
        report.reused = len(reuse)

    pending = {t.record.path: t for t in todo}
    done = 0

    def on_batch(paths: list[Path], feats: np.ndarray, failures: list[tuple[Path, str]]) -> None:
        nonlocal done
        items = [pending[str(p)] for p in paths]
        gallery.add([t.record for t in items], feats)
        for t in items:
            if t.replaces:
                report.updated += 1
            else:
                report.added += 1
        failed = [str(p) for p, _ in failures]
        # A known file that changed into something undecodable no longer belongs in the gallery.
        gallery.remove(p for p in failed if pending[p].replaces)
        report.failed.extend((str(p), _reason(str(p), r)) for p, r in failures)
        done += len(paths) + len(failures)
        if progress is not None:
            progress(done, len(todo))

    if progress is not None:
        progress(0, len(todo))
    if todo:
        t1 = time.perf_counter()
        embed_paths(model, [Path(t.record.path) for t in todo], batch_size=batch_size, workers=workers,
                    device=device, on_batch=on_batch)
        report.embed_seconds = time.perf_counter() - t1

    if prune:
        found = {str(f) for f in files}
        report.pruned = gallery.remove(p for p in known if p not in found)

    gallery.sync()  # bring the derived search structures up to date and make them durable
    report.rows = gallery.count()
    report.seconds = time.perf_counter() - t0
    for path, reason in report.failed:
        log.info("skipped %s: %s", path, reason)
    return report


def build_index(gallery: str | os.PathLike, index: str | os.PathLike, *, weights: str | None = None,
                batch_size: int = 32, workers: int | None = None, device: str = "auto", kind: str | None = None,
                prune: bool = False, rebuild: bool = False, wait: float = 0.0, runtime: str = "auto",
                progress: Progress | None = None) -> IndexReport:
    """``reid index``: open (or create) the gallery at ``index``, check its model, and index the folder ``gallery``.

    ``weights=None`` uses the model the gallery was built with (the default model for a new one).
    ``runtime``: torch, or the model's export on ONNX Runtime / OpenVINO (``reid.engine``; ``auto`` takes
    ONNX Runtime on a CPU). The export is made, checked against torch and cached here, so every later
    ``reid query`` on this gallery runs without torch.
    """
    from reid import engine
    from reid.model.identity import DEFAULT_SOURCE, ModelRef, model_source
    from reid.runtime import resolve_device

    root = Path(gallery).expanduser()
    find_images(root)  # fail fast on a missing folder, before creating anything
    use_torch = engine.wants_torch(runtime, device)
    dev = resolve_device(device if use_torch else "cpu")
    with open_gallery(index, write=True, wait=wait) as store:
        built_with = store.built_with()
        source = model_source(weights) if weights is not None else (built_with.source if built_with else DEFAULT_SOURCE)
        model, ref = ModelRef.load(source, dev)
        store.bind(ref, kind=kind, rebuild=rebuild)
        if not use_torch:
            model = engine.ensure_exported(model, ref.fingerprint, engine.exported_runtime(runtime))
        return index_folder(store, model, root, batch_size=batch_size, workers=workers, device=dev,
                            prune=prune, progress=progress)
