"""The ``reid query --save`` picture: each query beside its ranked matches, with scores and match colours."""

from __future__ import annotations

import logging
from pathlib import Path
from collections.abc import Sequence

import numpy as np

from reid.errors import ImageDecodeError
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


def draw_results(results: Sequence[QueryResult], queries: Sequence[np.ndarray] | None = None, *,
                 size: tuple[int, int] = (128, 64)) -> np.ndarray:
    """One row per query: the query crop, then its matches captioned ``#rank score`` (RGB uint8)."""
    slots = max((len(r.matches) for r in results), default=0)
    rows = []
    for i, r in enumerate(results):
        query = queries[i] if queries is not None else decode_image(r.query)
        items = [RankedItem(_crop(m.path), match_status(r.pid, m.pid), f"#{m.rank} {m.score:.3f}")
                 for m in r.matches]
        caption = f"{len(r.crops)} crops" if r.crops else Path(r.query).name[:14]
        rows.append(rank_strip(query, items, size=size, slots=slots, query_caption=caption))
    return stack_rows(rows)


def save_results(path: str | Path, results: Sequence[QueryResult],
                 queries: Sequence[np.ndarray] | None = None) -> Path:
    """Draw ``results`` and write the picture to ``path`` (format from the extension)."""
    return save_image(check_picture_path(path), draw_results(results, queries))
