"""Query images -> ranked gallery matches, with the very model the gallery was built with.

Works on any ``reid.store.Gallery``: filters (e.g. leaving out the query's own camera, a time range,
camera names) are pushed down into the gallery's search, one filter per query.

People found in footage come as tracklets: one walk past a camera is many rows. ``per_track`` (the
default when a match came from footage) collapses the hits of one tracklet into one answer, its best
crop with the tracklet's time span, so the top 10 are 10 different sightings rather than 10 frames of
one walk.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence

import numpy as np

from reid.errors import EmptyGalleryError, InputError
from reid.images import decode_image, parse_market_name
from reid.store import Filter, Gallery, Hit, Tracklet, open_gallery

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Match:
    """One ranked gallery image (for a person found in footage: where and when, and with ``per_track`` the
    span of its tracklet: first and last time and frame, and how many rows it holds)."""

    rank: int
    score: float
    path: str
    camid: int | None
    pid: int | None
    camera: str | None = None
    time: float | None = None
    media: str | None = None
    frame: int | None = None
    box: tuple[int, int, int, int] | None = None
    track: int | None = None
    span: Tracklet | None = None
    source: str | None = None  # the video or frames folder a footage match was found in

    @classmethod
    def of(cls, rank: int, hit: Hit, span: Tracklet | None = None) -> Match:
        """A match from a search hit (and its tracklet's span)."""
        r = hit.record
        return cls(rank, hit.score, r.path, r.camid, r.pid, r.camera, r.time, r.media, r.frame, r.box, r.track, span,
                   r.source if r.media is not None else None)

    def to_dict(self) -> dict[str, object]:
        """JSON-able form: rank, score, path, camid, pid; and for footage camera, time, source, media, frame,
        box, track (and the tracklet's first/last time and frame and its rows, when collapsed)."""
        d: dict[str, object] = {"rank": self.rank, "score": round(self.score, 6), "path": self.path,
                                "camid": self.camid, "pid": self.pid}
        if self.camera is not None:
            d["camera"] = self.camera
        if self.media is not None:
            d.update(time=self.time, source=self.source, media=self.media, frame=self.frame,
                     box=list(self.box or ()), track=self.track)
        if self.span is not None:
            d.update(first_time=self.span.first_time, last_time=self.span.last_time,
                     first_frame=self.span.first_frame, last_frame=self.span.last_frame, rows=self.span.rows)
        return d


@dataclass
class QueryResult:
    """The matches of one query image (identity and camera parsed from its name when Market-style).

    A fused query (several crops of one person, ranked by their mean embedding) lists every crop in
    ``crops``; ``query`` is then the first of them.
    """

    query: str
    matches: list[Match] = field(default_factory=list)
    pid: int | None = None
    camid: int | None = None
    crops: list[str] | None = None

    def to_dict(self) -> dict[str, object]:
        """``{"query": path, "matches": [...]}`` as printed by ``reid query --json`` (``"query"`` is the
        list of crops for a fused query)."""
        return {"query": self.crops if self.crops else self.query, "matches": [m.to_dict() for m in self.matches]}


def parse_time(text: str | None, what: str = "time") -> float | None:
    """Seconds since the epoch of an ISO 8601 date or date-time (UTC unless it names a zone), or of a
    plain number of seconds; None for None; a one-line InputError otherwise."""
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        stamp = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise InputError(f"{what} {text!r} is not a date-time (use ISO 8601, e.g. 2026-12-01T14:30:00)") from None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=dt.timezone.utc)
    return stamp.timestamp()


def format_time(seconds: float | None) -> str:
    """A stored time as ISO 8601 UTC to the second (``-`` for none)."""
    if seconds is None:
        return "-"
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def load_queries(paths: Sequence[str | os.PathLike]) -> list[np.ndarray]:
    """Decode every query image (uint8 RGB) up front; the first bad one raises a one-line InputError."""
    images = []
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise InputError(f"query image {path} does not exist")
        if path.is_dir():
            raise InputError(f"query image {path} is a folder; pass image files")
        images.append(decode_image(path))  # ImageDecodeError(InputError) says why it cannot be read
    return images


def require_cameras(paths: Sequence[str | os.PathLike]) -> None:
    """InputError unless every query names its camera (Market style), as ``other_cameras`` needs."""
    for p in paths:
        if parse_market_name(Path(p).name)[1] is None:
            raise InputError(f"`other_cameras` needs the query's camera, and {p} does not name one "
                             f"(Market-style names like 0002_c1s1_000451_03.jpg do)")


def require_rows(gallery: Gallery) -> None:
    """EmptyGalleryError unless the gallery holds at least one image (and knows its model)."""
    if gallery.count() == 0 or gallery.built_with() is None:
        raise EmptyGalleryError(gallery.location)


class Searcher:
    """An open gallery plus the model that built it (checked by fingerprint): the torch network, or its
    export on ONNX Runtime / OpenVINO (``reid.engine``; then torch is not even imported)."""

    def __init__(self, gallery: Gallery, model, device) -> None:
        self.gallery = gallery
        self.model = model
        self.device = device  # a torch.device, or None for an exported model

    @classmethod
    def open(cls, index: str | os.PathLike, *, device: str = "auto", runtime: str = "auto") -> Searcher:
        """Open a non-empty gallery read-only and load its model; StoreError when either is unusable."""
        gallery = open_gallery(index, prefetch=True)  # its vectors load while the model does
        try:
            require_rows(gallery)
            return cls.on(gallery, device, runtime)
        except BaseException:
            gallery.close()
            raise

    @classmethod
    def on(cls, gallery: Gallery, device: str = "auto", runtime: str = "auto") -> Searcher:
        """A searcher over an open gallery with the model its vectors come from (StoreError if it is gone or
        changed). A non-torch ``runtime`` (``auto`` on a CPU) uses the export cached for the gallery's model
        fingerprint, exporting it first when there is none."""
        from reid import engine

        built_with = gallery.built_with()
        if built_with is None:
            raise EmptyGalleryError(gallery.location)
        if not engine.wants_torch(runtime, device):
            fmt = engine.exported_runtime(runtime)
            exported = engine.cached_embedder(built_with.fingerprint, fmt)
            if exported is None:
                model, ref = _load_torch(built_with, gallery.location, "cpu")
                exported = engine.build_export(model, ref.fingerprint, fmt)
            return cls(gallery, exported, None)
        model, _ = _load_torch(built_with, gallery.location, device)
        return cls(gallery, model, next(model.parameters()).device)

    def close(self) -> None:
        """Close the gallery."""
        self.gallery.close()

    def __enter__(self) -> Searcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Embed decoded uint8 RGB images -> float32 [n, D], L2-normalised (the gallery's own embedding path)."""
        if self.device is None:
            return self.model.embed_images(images)
        from reid.embed import embed_images

        return embed_images(self.model, images, device=self.device)

    def query(self, paths: Sequence[str | os.PathLike], *, top: int = 10, min_score: float | None = None,
              images: Sequence[np.ndarray] | None = None, fuse: bool = False,
              other_cameras: bool = False, where: Filter | None = None,
              per_track: bool | None = None) -> list[QueryResult]:
        """Rank the gallery for each query image: best ``top`` matches scoring at least ``min_score``.

        ``fuse``: the images are crops of one person (a track, several cameras); rank the gallery once
        by their mean embedding, re-normalised (multi-shot query), and return one result.
        ``other_cameras``: leave out gallery crops from the query's own camera (the evaluation protocols
        do the same), so the same track does not fill the list; the camera comes from a Market-style
        name (``0002_c1s1_...``), and a query without one is an InputError.
        ``where``: a filter every match must pass (cameras, sources, time range, identities).
        ``per_track``: one answer per tracklet (its best crop and time span); None: when matches came
        from footage.
        """
        if top < 1:
            raise InputError(f"`top` must be at least 1, not {top}")
        names = [parse_market_name(Path(p).name) for p in paths]
        if other_cameras:
            require_cameras(paths)
        images = load_queries(paths) if images is None else images
        vectors = self.embed(images)
        base = where or Filter()
        filters = [base.excluding_cameras([cam]) if other_cameras else base for _, cam in names]
        if fuse:
            mean = vectors.mean(axis=0, keepdims=True)
            vectors = mean / max(float(np.linalg.norm(mean)), 1e-12)
            filters = [base.excluding_cameras(cam for _, cam in names) if other_cameras else base]
        hits = self.gallery.search(vectors, top, filters)
        if per_track is not False and any(h.record.tracklet for row in hits for h in row):
            hits = self._per_track(vectors, top, filters, hits)
        spans = self.gallery.tracklets({h.record.tracklet for row in hits for h in row if h.record.tracklet}) \
            if per_track is not False else {}
        results = []
        # Not strict: with ``fuse`` there is one row of hits for all the paths (one result).
        for p, (pid, camid), row in zip(paths, names, hits, strict=False):
            matches = [Match.of(r, h, spans.get(h.record.tracklet)) for r, h in enumerate(row, 1)
                       if min_score is None or h.score >= min_score]
            results.append(QueryResult(str(p), matches, pid, camid))
        if fuse:
            ids = {pid for pid, _ in names}
            results[0].pid = ids.pop() if len(ids) == 1 else None  # the crops' identity, when they agree
            results[0].camid = None
            results[0].crops = [str(p) for p in paths]
        return results


    def _per_track(self, vectors: np.ndarray, top: int, filters: list[Filter], first: list[list[Hit]]
                   ) -> list[list[Hit]]:
        """The best hit of each of the ``top`` best tracklets (a crop file counts as its own), per query:
        searched deeper (x8, then x4 each round) until ``top`` distinct sightings or every row is in."""
        rows = self.gallery.count()
        k, hits = top, first
        while True:
            collapsed = [_best_per_tracklet(row, top) for row in hits]
            if k >= rows or all(len(c) >= top for c in collapsed):
                return collapsed
            k = min(rows, k * (8 if k == top else 4))
            hits = self.gallery.search(vectors, k, filters)


def _best_per_tracklet(hits: Sequence[Hit], top: int) -> list[Hit]:
    """The first (best) hit of each tracklet, in rank order, at most ``top``."""
    seen: set = set()
    out: list[Hit] = []
    for h in hits:
        key = h.record.tracklet or ("", -h.id)
        if key not in seen:
            seen.add(key)
            out.append(h)
            if len(out) == top:
                break
    return out


def _load_torch(built_with, location: str, device):
    """The gallery's torch model on ``device`` (a name, or a torch.device)."""
    from reid.model.identity import load_built_with
    from reid.runtime import resolve_device

    return load_built_with(built_with, location, resolve_device(str(device)))


def query_images(paths: Sequence[str | os.PathLike], index: str | os.PathLike, *, top: int = 10,
                 min_score: float | None = None, device: str = "auto", runtime: str = "auto", fuse: bool = False,
                 other_cameras: bool = False, where: Filter | None = None, per_track: bool | None = None
                 ) -> list[QueryResult]:
    """``reid query``: check the gallery and the images first (cheap), then load the model and search."""
    if not paths:
        raise InputError("no query image given")
    if other_cameras:
        require_cameras(paths)  # before any loading
    from reid.engine import wants_torch

    wants_torch(runtime, device)  # an unknown runtime or a CPU runtime on CUDA fails before any loading
    # A missing or empty gallery fails before any decoding; its vectors load while the images decode
    # and the model loads.
    with open_gallery(index, prefetch=True) as gallery:
        require_rows(gallery)
        images = load_queries(paths)
        searcher = Searcher.on(gallery, device, runtime)
        return searcher.query(paths, top=top, min_score=min_score, images=images, fuse=fuse,
                              other_cameras=other_cameras, where=where, per_track=per_track)
