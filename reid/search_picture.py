"""The ``reid query --save`` picture: each query beside its ranked matches, with scores and match colours.

A match found in footage is drawn where it was seen: its frame, cut around its box (drawn), with the
camera and time written on it.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from collections.abc import Sequence

import cv2
import numpy as np

from reid.errors import ImageDecodeError, InputError
from reid.images import decode_image
from reid.search import QueryResult
from reid.viz import RankedItem, check_picture_path, rank_strip, save_image, stack_rows

log = logging.getLogger(__name__)


def match_status(query_pid: int | None, match_pid: int | None) -> str:
    """Tile colour: match / mismatch when both identities are known, junk for -1, unknown otherwise."""
    if match_pid == -1:
        return "junk"
    if query_pid is None or query_pid < 0 or match_pid is None:
        return "unknown"
    return "match" if match_pid == query_pid and query_pid > 0 else "mismatch"


def _crop(path: str) -> np.ndarray:
    try:
        return decode_image(path)
    except ImageDecodeError as e:  # the gallery file was moved or broken since it was indexed
        log.warning("drawing a blank tile: %s", e)
        return np.full((128, 64, 3), 200, np.uint8)


FOOTAGE_TILE = (192, 144)  # H, W of a match drawn on its frame


@functools.lru_cache(maxsize=64)
def _frame(media: str, index: int) -> np.ndarray:
    """The frame a footage match was cut from: a frame file, or frame ``index`` of a video."""
    from reid.images import IMAGE_EXTENSIONS
    from reid.sources.video import read_frame

    if Path(media).suffix.lower() in IMAGE_EXTENSIONS:
        return decode_image(media)
    return read_frame(media, index)


def frame_view(frame: np.ndarray, box: tuple[int, int, int, int], label: str, *,
               size: tuple[int, int] = FOOTAGE_TILE) -> np.ndarray:
    """The part of ``frame`` around ``box`` (its height x 1.5, the tile's aspect), the box drawn, ``label``
    written at the top (RGB uint8)."""
    fh, fw = frame.shape[:2]
    x1, y1, x2, y2 = box
    h = min(fh, max(int(1.5 * (y2 - y1)), 32))
    w = min(fw, int(h * size[1] / size[0]))
    cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
    left, top = min(max(0, cx - w // 2), fw - w), min(max(0, cy - h // 2), fh - h)
    view = np.ascontiguousarray(frame[top : top + h, left : left + w])
    scale = size[0] / h
    view = cv2.resize(view, (size[1], size[0]), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    p1 = (int((x1 - left) * scale), int((y1 - top) * scale))
    p2 = (int((x2 - left) * scale) - 1, int((y2 - top) * scale) - 1)
    cv2.rectangle(view, p1, p2, (255, 220, 0), 2)
    cv2.rectangle(view, (0, 0), (size[1], 14), (0, 0, 0), -1)
    cv2.putText(view, label, (3, 11), cv2.FONT_HERSHEY_SIMPLEX, 0.36, (255, 255, 255), 1, cv2.LINE_AA)
    return view


def _seen(m) -> np.ndarray:
    """A footage match on its frame; a blank tile (and a warning) when the video is gone or changed."""
    from reid.search import format_time

    try:
        frame = _frame(m.media, m.frame)
    except InputError as e:
        log.warning("drawing a blank tile: %s", e)
        return np.full((*FOOTAGE_TILE, 3), 200, np.uint8)
    return frame_view(frame, m.box, f"{m.camera or ''} {format_time(m.time)[11:]}".strip())


def _padded(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``image`` centred on white at the aspect of ``size`` (H, W), so a crop is not stretched into a frame tile."""
    h, w = image.shape[:2]
    want_w = max(w, int(round(h * size[1] / size[0])))
    want_h = max(h, int(round(want_w * size[0] / size[1])))
    out = np.full((want_h, want_w, 3), 255, np.uint8)
    top, left = (want_h - h) // 2, (want_w - w) // 2
    out[top : top + h, left : left + w] = image
    return out


def draw_results(results: Sequence[QueryResult], queries: Sequence[np.ndarray] | None = None, *,
                 size: tuple[int, int] | None = None) -> np.ndarray:
    """One row per query: the query crop, then its matches captioned ``#rank score`` (RGB uint8); tiles are
    128x64 crops, or frames cut around the box when a match came from footage."""
    footage = any(m.media is not None for r in results for m in r.matches)
    size = size or (FOOTAGE_TILE if footage else (128, 64))
    slots = max((len(r.matches) for r in results), default=0)
    rows = []
    for i, r in enumerate(results):
        query = queries[i] if queries is not None else decode_image(r.query)
        if footage:
            query = _padded(query, size)
        items = [RankedItem(_seen(m) if m.media is not None else _padded(_crop(m.path), size) if footage
                            else _crop(m.path), match_status(r.pid, m.pid), f"#{m.rank} {m.score:.3f}")
                 for m in r.matches]
        caption = f"{len(r.crops)} crops" if r.crops else Path(r.query).name[:14]
        rows.append(rank_strip(query, items, size=size, slots=slots, query_caption=caption))
    return stack_rows(rows)


def save_results(path: str | Path, results: Sequence[QueryResult],
                 queries: Sequence[np.ndarray] | None = None) -> Path:
    """Draw ``results`` and write the picture to ``path`` (format from the extension)."""
    return save_image(check_picture_path(path), draw_results(results, queries))
