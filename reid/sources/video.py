"""Footage in, frames out: find video files and folders of full frames, read their frames (every n-th)
with a time for each, and name the camera they came from (``--camera``, else the folder, else a
Market-style name).

Decoding is OpenCV's (``cv2.VideoCapture``: whatever its FFmpeg build reads: mp4, avi, mkv, mov, ...).
Frames are numbered from 0 in decoding order; a resumed read skips to its start with ``grab`` (decode
without conversion) rather than a container seek, which is not frame-exact for every codec.

A frame's time is the recording's start plus its position (``index / fps``). The start is a date and
time written in the file's name (``cam1_2026-12-01_14-30-00.mp4``, ``20261201T143000.avi``, ...) or,
without one, the file's mtime less the video's duration (a recorder closes the file when it stops).
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from reid.errors import InputError
from reid.images import parse_market_name

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".wmv", ".webm", ".ts", ".mts",
                    ".flv", ".3gp")

# A date and a time in a file name: 2026-12-01_14-30-00, 2026-12-01T14:30:00, 20261201_143000, 20261201T143000.
_STAMP = re.compile(r"(?<!\d)(\d{4})-?(\d{2})-?(\d{2})[T_ -]?(\d{2})[-:.]?(\d{2})[-:.]?(\d{2})(?!\d)")


class VideoError(InputError):
    """A video that cannot be opened or read (the message says which and why)."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame: its number in the video (or position in its folder), its time (seconds since the
    epoch), RGB pixels, and for a frame read from an image file, that file."""

    index: int
    time: float
    image: np.ndarray
    path: str | None = None


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about a video (frame count may be approximate or 0 for some formats)."""

    fps: float
    frames: int
    width: int
    height: int

    @property
    def duration(self) -> float:
        """Seconds, from the stated frame count."""
        return self.frames / self.fps if self.fps > 0 else 0.0


def is_video(path: str | os.PathLike) -> bool:
    """True for a file name with a video extension (case-insensitive)."""
    return os.path.splitext(str(path))[1].lower() in VIDEO_EXTENSIONS


def time_in_name(name: str) -> float | None:
    """Seconds since the epoch of the date and time in a file name (read as UTC), or None."""
    m = _STAMP.search(name)
    if m is None:
        return None
    try:
        stamp = dt.datetime(*(int(g) for g in m.groups()), tzinfo=dt.timezone.utc)
    except ValueError:  # 2026-13-45 ...: digits, not a date
        return None
    return stamp.timestamp()


def camera_name(path: str | os.PathLike, camera: str | None = None) -> str | None:
    """The camera a file came from: ``camera`` when given, else the name of the folder it lies in (one folder
    per camera is how recorders lay footage out), else a Market-style name's camera (``c3``)."""
    if camera:
        return camera
    path = Path(path)
    if path.parent.name:
        return path.parent.name
    camid = parse_market_name(path.name)[1]
    return f"c{camid}" if camid is not None else None


def _open(path: Path) -> cv2.VideoCapture:
    if not path.is_file():
        raise VideoError(f"{path}: no such video file")
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        cap.release()
        raise VideoError(f"{path}: OpenCV cannot open it as a video (corrupt, or a codec its FFmpeg lacks)")
    return cap


def probe(path: str | os.PathLike) -> VideoInfo:
    """Frame rate, frame count and size of a video; VideoError when it cannot be opened or its first
    frame cannot be decoded."""
    path = Path(path)
    cap = _open(path)
    try:
        ok, first = cap.read()
        if not ok or first is None:
            raise VideoError(f"{path}: no frame could be decoded (corrupt or empty video)")
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        frames = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        return VideoInfo(fps if 0 < fps < 1000 else 25.0, max(frames, 0), first.shape[1], first.shape[0])
    finally:
        cap.release()


def start_time(path: str | os.PathLike, info: VideoInfo) -> float:
    """Time of frame 0: from the file's name, else its mtime less the video's duration."""
    path = Path(path)
    named = time_in_name(path.name)
    return named if named is not None else path.stat().st_mtime - info.duration


class FrameReader:
    """Iterate a video's frames ``start, start + stride, ...`` as ``Frame``s.

    After the iteration, ``stopped`` says why it ended early, if it did: a decoder error, or a video
    that ends well before the frame count its container states (truncated file).
    """

    def __init__(self, path: str | os.PathLike, info: VideoInfo, start: float, *, first: int = 0,
                 stride: int = 1) -> None:
        if stride < 1:
            raise InputError(f"--stride must be at least 1, not {stride}")
        if first < 0:
            raise InputError(f"first frame must not be negative, not {first}")
        self.path, self.info, self.start, self.first, self.stride = Path(path), info, start, first, stride
        self.stopped: str | None = None
        self.read = 0  # frames decoded (processed ones), for progress

    def __iter__(self) -> Iterator[Frame]:
        cap = _open(self.path)
        try:
            index = 0
            while True:
                want = index >= self.first and (index - self.first) % self.stride == 0
                try:
                    ok = cap.grab()
                    image = cap.retrieve()[1] if ok and want else None
                except cv2.error as e:
                    self.stopped = f"decoding stopped at frame {index}: {str(e).strip().splitlines()[-1]}"
                    return
                if not ok:
                    self._check_end(index)
                    return
                if want:
                    if image is None:
                        self.stopped = f"frame {index} could not be decoded"
                        return
                    self.read += 1
                    yield Frame(index, self.start + index / self.info.fps, cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
                index += 1
        finally:
            cap.release()

    def _check_end(self, index: int) -> None:
        # Containers state an approximate count; a shortfall of more than a few frames is a cut-off file.
        stated = self.info.frames
        if stated and index < stated - max(2, stated // 100):
            self.stopped = f"the video ends at frame {index} of the {stated} its container states (truncated?)"


def read_frame(path: str | os.PathLike, index: int) -> np.ndarray:
    """Frame ``index`` of a video as RGB (for drawing a match where it was seen); VideoError when the video
    is gone or shorter now. Seeks (OpenCV's FFmpeg backend decodes on from the key frame before it)."""
    path = Path(path)
    cap = _open(path)
    try:
        if index > 0:
            cap.set(cv2.CAP_PROP_POS_FRAMES, index)
        ok, image = cap.read()
    finally:
        cap.release()
    if not ok or image is None:
        raise VideoError(f"{path}: frame {index} cannot be read")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


# --- folders of full frames ------------------------------------------------------------------------

FRAME_MIN_WIDTH = 480  # a landscape image at least this wide is a camera frame, not a person crop


def looks_like_frames(images: list[Path], sample: int = 3) -> bool:
    """True when a folder's images are camera frames rather than crops: its first few readable ones are
    landscape and at least ``FRAME_MIN_WIDTH`` wide (person crops are portrait and small)."""
    sizes = []
    for path in images[:sample]:
        header = cv2.imread(str(path), cv2.IMREAD_REDUCED_GRAYSCALE_8)  # cheap: decodes at 1/8 scale
        if header is not None:
            sizes.append((header.shape[1] * 8, header.shape[0] * 8))
    return bool(sizes) and all(w >= h and w >= FRAME_MIN_WIDTH for w, h in sizes)


def frame_time(path: Path) -> float:
    """When a frame file was taken: a time in its name, else its mtime."""
    named = time_in_name(path.name)
    return named if named is not None else path.stat().st_mtime


class FolderFrames:
    """Iterate a sorted list of full-frame image files ``start, start + stride, ...`` as ``Frame``s (index:
    position in the list); a file that cannot be read is skipped and listed in ``failed``."""

    def __init__(self, files: list[Path], *, first: int = 0, stride: int = 1) -> None:
        if stride < 1:
            raise InputError(f"--stride must be at least 1, not {stride}")
        self.files, self.first, self.stride = files, first, stride
        self.failed: list[tuple[str, str]] = []
        self.stopped: str | None = None  # a folder never stops early; a bad file is skipped

    def __iter__(self) -> Iterator[Frame]:
        from reid.images import decode_image

        for index in range(self.first, len(self.files), self.stride):
            path = self.files[index]
            try:
                image = decode_image(path)
                when = frame_time(path)
            except (InputError, OSError) as e:
                self.failed.append((str(path), str(e)))
                continue
            yield Frame(index, when, image, str(path))
