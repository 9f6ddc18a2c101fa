"""Frames in, tracked and embedded people out: the footage pipeline behind ``reid index VIDEO``.

Three stages overlap, each in its own thread, so the slowest sets the pace: decoding (OpenCV), person
detection (OpenCV DNN) and, in the caller's thread, embedding the crops (torch or the exported model)
and linking them into tracklets. OpenCV and the model both release the GIL while they compute. The
bounded queues between the stages hold a few frames each, so memory stays flat on hour-long videos.

Frames are handed on in ``Chunk``s of whole frames (at least ``batch_size`` crops, or ``max_frames``
frames without enough people), each with the frame the next chunk starts at: a caller that stores a
chunk and then that number can resume exactly there after a kill.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from reid.sources.detector import Detection, PersonDetector
from reid.sources.tracker import Tracker
from reid.sources.video import Frame

Embed = Callable[[Sequence[np.ndarray]], np.ndarray]  # RGB crops -> float32 [n, D], L2-normalised

_DONE = object()


@dataclass(frozen=True, slots=True)
class Person:
    """One person found in one frame: where, when, how sure, and the tracklet it was linked to."""

    frame: int
    time: float
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 in frame pixels (x2, y2 exclusive)
    score: float
    track: int
    person: int  # position among the frame's detections (best score first)
    media: str | None = None  # the frame's own file, for frames read from image files


@dataclass(frozen=True)
class Chunk:
    """People of consecutive processed frames, their embeddings, and where a resumed run would start."""

    people: list[Person]
    vectors: np.ndarray
    frames: int  # frames processed in this chunk
    next_frame: int
    next_track: int


class _Stage(threading.Thread):
    """A daemon thread mapping items of ``source`` through ``work`` into a bounded queue; an exception it
    meets is handed on through the queue and raised in the consumer."""

    def __init__(self, name: str, source: Iterable, work: Callable, size: int, stop: threading.Event) -> None:
        super().__init__(name=name, daemon=True)
        self.source, self.work, self.stop = source, work, stop
        self.out: queue.Queue = queue.Queue(maxsize=size)

    def _put(self, item: object) -> bool:
        while not self.stop.is_set():
            try:
                self.out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run(self) -> None:
        try:
            for item in self.source:
                if not self._put(self.work(item)):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            self._put(e)
            return
        self._put(_DONE)

    def __iter__(self) -> Iterator:
        while True:
            item = self.out.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


def detect_frame(detector: PersonDetector, frame: Frame) -> list[Detection]:
    """A frame's people: a detector that wants frame numbers (a ground-truth one) gets the ``Frame``."""
    if hasattr(detector, "detect_frames"):
        return detector.detect_frames([frame])[0]
    return detector.detect(frame.image)


def _crop(image: np.ndarray, d: Detection) -> tuple[tuple[int, int, int, int], np.ndarray]:
    h, w = image.shape[:2]
    x1, y1, x2, y2 = d.box()
    x1, y1, x2, y2 = max(0, x1), max(0, y1), min(w, x2), min(h, y2)
    return (x1, y1, x2, y2), image[y1:y2, x1:x2]


def people_in_frames(frames: Iterable[Frame], detector: PersonDetector, embed: Embed, tracker: Tracker, *,
                     stride: int = 1, batch_size: int = 32, max_frames: int = 16) -> Iterator[Chunk]:
    """Detect, embed and track the people of ``frames`` (in order), chunk by chunk."""
    stop = threading.Event()
    reader = _Stage("reid-decode", frames, lambda f: f, 8, stop)
    finder = _Stage("reid-detect", reader, lambda f: (f, detect_frame(detector, f)), 4, stop)
    reader.start()
    finder.start()
    try:
        pending: list[tuple[Frame, list[Detection]]] = []
        crops = 0
        for frame, dets in finder:
            pending.append((frame, dets))
            crops += len(dets)
            if crops >= batch_size or len(pending) >= max_frames:
                yield _chunk(pending, embed, tracker, stride)
                pending, crops = [], 0
        if pending:
            yield _chunk(pending, embed, tracker, stride)
    finally:
        stop.set()
        finder.join(timeout=5)
        reader.join(timeout=5)


def _chunk(pending: list[tuple[Frame, list[Detection]]], embed: Embed, tracker: Tracker, stride: int) -> Chunk:
    cut = [[_crop(frame.image, d) for d in dets] for frame, dets in pending]
    images = [img for frame_cuts in cut for _, img in frame_cuts]
    vectors = embed(images) if images else np.zeros((0, 0), np.float32)
    people: list[Person] = []
    at = 0
    for (frame, dets), frame_cuts in zip(pending, cut, strict=True):
        ids = tracker.update(dets, vectors[at : at + len(dets)])
        for k, (d, (box, _), track) in enumerate(zip(dets, frame_cuts, ids, strict=True)):
            people.append(Person(frame.index, frame.time, box, float(d.score), int(track), k, frame.path))
        at += len(dets)
    return Chunk(people, vectors, len(pending), pending[-1][0].index + stride, tracker.next_id)
