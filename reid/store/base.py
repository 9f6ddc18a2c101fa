"""The ``Gallery`` protocol: what any gallery backend offers, and the plain values it speaks in.

A backend stores rows (one per crop: a ``Record`` plus its embedding), answers top-k inner-product
searches with metadata filters applied inside the search (``Filter``), knows the file states that
incremental indexing compares against, and records the model its vectors come from (a
``reid.model.identity.ModelRef``). The embedded SQLite + FAISS store (``reid.store.local``)
implements it; a distributed vector engine implements the same methods. Nothing here imports a
backend, FAISS or SQLite.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Protocol, runtime_checkable
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

if TYPE_CHECKING:
    from reid.model.identity import ModelRef


def _frozen(values: Iterable | None) -> frozenset | None:
    return None if values is None else frozenset(values)


@dataclass(frozen=True)
class Filter:
    """Which rows a search (or count) may return; every field left at its default lets every row through.

    - ``cameras_excluded``: leave out rows of these cameras (rows without a camera stay in);
    - ``cameras``, ``sources``, ``pids``: only rows whose camera / source / identity is one of these
      (rows without the value are left out);
    - ``since``, ``until``: only rows whose ``time`` (seconds since the epoch) lies in ``[since, until]``;
    - ``camera_names``: only rows whose camera name (``Record.camera``) is one of these.

    Sets may be given as any iterable; they are stored as frozensets, so filters are hashable and a
    batch of queries can be grouped by filter.
    """

    cameras_excluded: frozenset[int] = frozenset()
    cameras: frozenset[int] | None = None
    sources: frozenset[str] | None = None
    since: float | None = None
    until: float | None = None
    pids: frozenset[int] | None = None
    camera_names: frozenset[str] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "cameras_excluded", frozenset(self.cameras_excluded or ()))
        for name in ("cameras", "sources", "pids", "camera_names"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))

    @property
    def is_empty(self) -> bool:
        """True when the filter lets every row through."""
        return self == _NO_FILTER

    @property
    def only_excludes(self) -> bool:
        """True when the filter does nothing but leave out cameras (a backend may then look up what it drops)."""
        return bool(self.cameras_excluded) and Filter(cameras_excluded=self.cameras_excluded) == self

    def excluding_cameras(self, cameras: Iterable[int]) -> Filter:
        """This filter, also leaving out ``cameras``."""
        return replace(self, cameras_excluded=self.cameras_excluded | frozenset(cameras))


_NO_FILTER = Filter()


@dataclass(frozen=True)
class Record:
    """What a gallery keeps about one row besides its embedding.

    ``path``, ``sha256``, ``bytes`` and ``mtime`` (``st_mtime_ns``) identify the file it came from;
    ``source`` is the gallery root it was indexed from; ``time`` (seconds since the epoch) is when
    the crop was taken (for a crop file: its mtime). New provenance fields get defaults, so existing
    callers keep working.

    A person found in footage also has its ``camera`` name, the ``media`` (video or full frame) it was
    cut from, its ``frame`` number there, its ``box`` (x1, y1, x2, y2 in frame pixels, x2/y2
    exclusive), the detector's ``score`` and its ``track`` (tracklet id, unique within its ``source``:
    the video, or the folder of full frames); ``path`` is then ``MEDIA#frame=N&person=K`` and
    ``sha256``/``bytes``/``mtime`` are the media's.
    """

    path: str
    sha256: str
    bytes: int
    mtime: int
    pid: int | None
    camid: int | None
    source: str
    time: float | None = None
    camera: str | None = None
    media: str | None = None
    frame: int | None = None
    box: tuple[int, int, int, int] | None = None
    score: float | None = None
    track: int | None = None

    @property
    def tracklet(self) -> tuple[str, int] | None:
        """(source, track) for a person found in footage: the key that groups one walk's rows."""
        return None if self.media is None or self.track is None else (self.source, self.track)


RECORD_FIELDS = tuple(f.name for f in fields(Record))


@dataclass(frozen=True)
class FileState:
    """The stored identity of a file: enough to tell whether it changed since it was indexed."""

    id: int
    sha256: str
    bytes: int
    mtime: int


@dataclass(frozen=True)
class MediaState:
    """How far indexing got through one video (or full-frame image): enough to skip it when it is done,
    resume it after a kill, and restart it when its content changed."""

    path: str
    sha256: str
    bytes: int
    mtime: int
    camera: str | None
    fps: float | None
    frames: int | None
    width: int | None
    height: int | None
    start: float | None  # time of frame 0, seconds since the epoch
    next_frame: int = 0  # every frame before this one is processed and its people stored
    next_track: int = 1  # tracklet id a resumed run numbers on from
    people: int = 0  # detections stored so far
    done: bool = False
    error: str | None = None


@dataclass(frozen=True)
class Tracklet:
    """The span of one tracklet (the rows of one ``(source, track)``): first and last time and frame, rows."""

    first_time: float | None
    last_time: float | None
    first_frame: int
    last_frame: int
    rows: int


@dataclass(frozen=True)
class Hit:
    """One search result: the row id, its similarity (cosine) and its record."""

    id: int
    score: float
    record: Record = field(repr=False)

    @property
    def path(self) -> str:
        """The crop's file."""
        return self.record.path

    @property
    def pid(self) -> int | None:
        """Identity, when known."""
        return self.record.pid

    @property
    def camid(self) -> int | None:
        """Camera, when known."""
        return self.record.camid


@dataclass(frozen=True)
class SyncState:
    """How a gallery's derived search structures relate to its rows: ``fresh``, ``stale``, ``missing`` or
    ``corrupt``, with details and, where known, the concrete index kind they are."""

    state: str
    detail: str = ""
    kind: str | None = None


def per_query(where: Filter | Sequence[Filter] | None, n: int) -> list[Filter]:
    """One filter per query from ``None`` (no filter), one filter for all, or a filter per query."""
    if where is None:
        return [_NO_FILTER] * n
    if isinstance(where, Filter):
        return [where] * n
    where = list(where)
    if len(where) != n:
        raise ValueError(f"{len(where)} filters for {n} queries")
    return where


def group_by_filter(filters: Sequence[Filter]) -> dict[Filter, np.ndarray]:
    """filter -> the query positions that use it (a backend searches each group in one call)."""
    groups: dict[Filter, list[int]] = {}
    for i, f in enumerate(filters):
        groups.setdefault(f, []).append(i)
    return {f: np.asarray(ix, dtype=np.int64) for f, ix in groups.items()}


@runtime_checkable
class Gallery(Protocol):
    """A gallery of embedded crops. Open one with ``reid.store.open_gallery(location)``.

    Writes (``bind``, ``add``, ``remove``, ``touch``) need a gallery opened with ``write=True``;
    a row's embedding is never changed in place (a changed file gets a new row).
    """

    @property
    def location(self) -> str:
        """Where the gallery lives (a folder, a URI), for messages."""
        ...

    def built_with(self) -> ModelRef | None:
        """The model the stored vectors come from; None before the first ``bind``."""
        ...

    def bind(self, model: ModelRef, *, kind: str | None = None, rebuild: bool = False) -> None:
        """Record the model of a new gallery (or, with ``rebuild``, drop every row and start over with it);
        ``ModelMismatchError`` for any other model. ``kind`` asks for a search structure
        (``auto``, ``flat``, ``hnsw``, ``ivfpq``; backends map it to theirs)."""
        ...

    def add(self, records: Sequence[Record], vectors: np.ndarray) -> list[int]:
        """Store rows with their embeddings (float32 [n, dim]) atomically; a row of the same path is
        replaced. Returns the new row ids."""
        ...

    def remove(self, paths: Iterable[str]) -> int:
        """Delete the rows of these paths; returns how many existed."""
        ...

    def search(self, queries: np.ndarray, k: int, where: Filter | Sequence[Filter] | None = None
               ) -> list[list[Hit]]:
        """Top-``k`` rows by cosine similarity for each query (float32 [nq, dim]), best first, among the
        rows that ``where`` lets through (one filter for all queries, or one per query). Fewer than
        ``k`` hits when fewer rows qualify."""
        ...

    def get(self, ids: Iterable[int]) -> dict[int, Record]:
        """id -> Record for the ids that exist."""
        ...

    def count(self, where: Filter | None = None) -> int:
        """Number of rows (that ``where`` lets through)."""
        ...

    def scan(self, where: Filter | None = None) -> Iterator[tuple[int, Record]]:
        """(id, Record) of every row (that ``where`` lets through), in id order."""
        ...

    def states(self, under: str | None = None) -> dict[str, FileState]:
        """path -> stored file state, for every row or for rows whose path lies under the folder ``under``."""
        ...

    def embeddings_by_sha(self, shas: Iterable[str]) -> dict[str, np.ndarray]:
        """sha256 -> a stored embedding of a file with that content (copies and renames need no model)."""
        ...

    def touch(self, stats: Sequence[tuple[str, int, int]]) -> None:
        """Record new (path, bytes, mtime) of files whose content is unchanged."""
        ...

    def tracklets(self, keys: Iterable[tuple[str, int]]) -> dict[tuple[str, int], Tracklet]:
        """(source, track) -> the tracklet's span, for the keys that have rows."""
        ...

    def media_states(self) -> dict[str, MediaState]:
        """path -> progress of every video (or full frame) indexing has started on."""
        ...

    def save_media(self, state: MediaState) -> None:
        """Record a video's progress (replacing its previous state)."""
        ...

    def remove_media(self, path: str, from_frame: int = 0) -> int:
        """Delete the rows found in the video (or frames folder) ``path`` at frame ``from_frame`` or later
        (all of them, and its progress, for 0); returns how many rows went."""
        ...

    def sync(self) -> SyncState:
        """Bring derived search structures up to date with the rows and make them durable; returns the
        state found before."""
        ...

    def verify(self) -> SyncState:
        """The state of the derived search structures, changing nothing."""
        ...

    def info(self) -> dict[str, object]:
        """A JSON-able description; every backend gives at least ``index`` (the location), ``rows``,
        ``dim``, ``fingerprint``, ``model_source``, ``kind``, ``vector_kind`` and ``vectors`` (the
        ``verify`` state)."""
        ...

    def close(self) -> None:
        """Release connections and locks (idempotent)."""
        ...

    def __enter__(self) -> Gallery: ...

    def __exit__(self, *exc: object) -> None: ...
