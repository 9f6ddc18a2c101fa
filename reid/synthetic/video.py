"""Synthetic surveillance video: the renderer's pedestrians walking over one camera's static scene, with the truth.

For tests and demos of indexing people from video. ``write_video`` writes a real file (``cv2.VideoWriter``)
and returns where every identity is in every frame (``VideoTruth``); ``TruthDetector`` replays those
boxes as a detector would, so tracking and indexing can be scored without a detection model.

The seed fixes the world (identities and camera, as in ``reid.synthetic.render``) and the walks. Each
person's figure is drawn by the renderer twice, on black and on white, from the same random state: the
two drawings give the exact coverage (alpha) of every pixel, anti-aliased edges included, so the figure
composites onto the scene without a halo and its box is exactly where its pixels are. A person keeps one
view (front or back) and cycles through a few poses (one renderer draw each: stride, small shifts),
walks at a constant velocity plus a little jitter and turns back (in about a second) at the frame edges, where up to
``_OUTSIDE`` of it leaves the frame; everyone keeps about the same pace, evenly spaced along the way, so
overlaps are mostly quick crossings. Nearer people (feet lower in the frame) hide farther ones. The
camera's light and blur are the same in every frame; sensor noise is fresh in each.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from reid.errors import InputError
from reid.sources.detector import Detection
from reid.synthetic.render import Camera, _background, _camera_optics, _draw_person, camera_of, identity_of

_CAMID = 1
_DIFFICULTY = 0.5  # the renderer's nuisance scale: moderate light, blur, noise and pose jitter
_POSES = 4  # figure draws per person, cycled while walking
_STEP_S = 0.3  # seconds per pose (one walking step)
_HEIGHT = (0.45, 0.52)  # figure canvas height, fraction of the frame height (the body fills ~70-95% of it)
_SPEED = (0.06, 0.14)  # horizontal speed, fraction of the frame width per second
_DRIFT = 0.03  # at most this vertical speed, fraction of the frame height per second
_TURN_S = 1.0  # seconds to turn back at a frame edge
_JITTER_PX = 0.4  # per-frame position jitter (std, pixels)
_OUTSIDE = 0.3  # share of the figure's width that may leave the frame before it turns back
MIN_VISIBLE = 0.5  # a person is in the truth of a frame when at least this share of it is visible


@dataclass(frozen=True)
class TruthBox:
    """One person in one frame: integer box clipped to the frame (x2, y2 exclusive) and its visible share."""

    identity: int
    x1: int
    y1: int
    x2: int
    y2: int
    visible: float = 1.0  # inside the frame and not hidden by nearer people, share of the figure's pixels


@dataclass(frozen=True)
class VideoTruth:
    """Where each identity is in each frame of a synthetic video (every frame index has a list, maybe empty)."""

    fps: float
    size: tuple[int, int]  # (width, height)
    frames: int
    boxes: dict[int, list[TruthBox]]

    @property
    def identities(self) -> list[int]:
        return sorted({b.identity for boxes in self.boxes.values() for b in boxes})

    def save(self, path: str | os.PathLike) -> None:
        """Write the truth as JSON (see ``truth_path`` for where it goes next to its video)."""
        doc = {"fps": self.fps, "size": list(self.size), "frames": self.frames,
               "boxes": {str(k): [{"identity": b.identity, "box": [b.x1, b.y1, b.x2, b.y2], "visible": b.visible}
                                  for b in v] for k, v in self.boxes.items()}}
        Path(path).write_text(json.dumps(doc, separators=(",", ":")))

    @classmethod
    def load(cls, path: str | os.PathLike) -> VideoTruth:
        """Read what ``save`` wrote."""
        try:
            doc = json.loads(Path(path).read_text())
            boxes = {int(k): [TruthBox(int(b["identity"]), *map(int, b["box"]), float(b["visible"])) for b in v]
                     for k, v in doc["boxes"].items()}
            return cls(float(doc["fps"]), (int(doc["size"][0]), int(doc["size"][1])), int(doc["frames"]), boxes)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"{path}: not a synthetic video truth file ({e})") from None


def truth_path(video: str | os.PathLike) -> Path:
    """Where a video's truth lives: ``walk.avi`` -> ``walk.truth.json``."""
    video = Path(video)
    return video.with_name(video.stem + ".truth.json")


@dataclass(frozen=True)
class _Sprite:
    colour: np.ndarray  # float32 HxWx3, premultiplied by alpha (the drawing on black)
    alpha: np.ndarray  # float32 HxW coverage in [0, 1]
    box: tuple[int, int, int, int]  # the figure (alpha >= 0.5) in sprite pixels, x2/y2 exclusive
    mass: float  # alpha summed: the figure's size for the visible share


def _sprite(pid: int, cam: Camera, world_seed: int, pose: int, height: int) -> _Sprite:
    """One pose of identity ``pid``, drawn on black and on white from the same random state to get its alpha."""
    ident = identity_of(pid, world_seed)
    drawings = []
    for fill in (0, 255):
        canvas = np.full((height, height // 2, 3), fill, np.uint8)
        _draw_person(canvas, ident, cam, np.random.default_rng([world_seed & 0xFFFFFFFF, 0x51DE, pid, pose]),
                     _DIFFICULTY)
        drawings.append(canvas.astype(np.float32))
    on_black, on_white = drawings
    # drawn = alpha * person + (1 - alpha) * fill, so white minus black is 255 * (1 - alpha) in every channel
    alpha = np.clip(1.0 - (on_white - on_black).mean(axis=2) / 255.0, 0.0, 1.0).astype(np.float32)
    ys, xs = np.nonzero(alpha >= 0.5)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    return _Sprite(on_black, alpha, box, float(alpha.sum()))


def _bounce(p: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Positions ``p`` folded into [lo, hi]: walking at constant speed and turning back at the ends."""
    span = hi - lo
    q = np.mod(p - lo, 2.0 * span)
    return lo + np.where(q <= span, q, 2.0 * span - q)


@dataclass(frozen=True)
class _Walker:
    pid: int
    sprites: list[_Sprite]
    xy: np.ndarray  # (frames, 2) integer top-left of the sprite canvas in each frame
    pose_frames: int
    pose_offset: int

    def sprite(self, t: int) -> _Sprite:
        return self.sprites[((t + self.pose_offset) // self.pose_frames) % len(self.sprites)]


def _walker(pid: int, cam: Camera, world_seed: int, size: tuple[int, int], frames: int, fps: float, phase: float,
            pace: float, rng: np.random.Generator) -> _Walker:
    """Identity ``pid`` walking at ``pace`` pixels a frame from ``phase`` (share of a round trip across the frame)."""
    w, h = size
    height = int(round(rng.uniform(*_HEIGHT) * h))
    view = replace(cam, back_view=1.0 if rng.random() < cam.back_view else 0.0)  # one view for all poses
    sprites = [_sprite(pid, view, world_seed, k, height) for k in range(_POSES)]
    sw = height // 2
    lo_x, hi_x = -_OUTSIDE * sw, w - (1.0 - _OUTSIDE) * sw
    lo_y, hi_y = 0.0, float(h - height)
    turn = max(1, round(_TURN_S * fps / 2))
    t = np.arange(-turn, frames + turn)
    x = _bounce(lo_x + phase * 2.0 * (hi_x - lo_x) + pace * t, lo_x, hi_x)
    y = _bounce(rng.uniform(lo_y, hi_y) + rng.uniform(-_DRIFT, _DRIFT) * h / fps * t, lo_y, hi_y)
    # A moving average turns the instant reversals at the edges into a slow-down and a walk back (constant
    # deceleration over _TURN_S); the straight stretches stay as they are.
    kernel = np.full(2 * turn + 1, 1.0 / (2 * turn + 1))
    path = np.stack([np.convolve(x, kernel, mode="valid"), np.convolve(y, kernel, mode="valid")], axis=1)
    xy = np.round(path + rng.normal(0.0, _JITTER_PX, (frames, 2))).astype(np.int64)
    pose_frames = max(1, round(_STEP_S * fps))
    return _Walker(pid, sprites, xy, pose_frames, int(rng.integers(_POSES * pose_frames)))


def _walkers(people: int, cam: Camera, world_seed: int, size: tuple[int, int], frames: int, fps: float,
             rng: np.random.Generator) -> list[_Walker]:
    """Everyone at about one pace, spread evenly over the round trip, so that people going the same way
    rarely overlap for long (a slow overtaking would hide someone for most of the video); crossings with
    those coming the other way are quick."""
    pace = rng.uniform(*_SPEED) * size[0] / fps
    slots = rng.permutation(people)
    return [_walker(pid, cam, world_seed, size, frames, fps, (slot + rng.uniform(-0.15, 0.15)) / people,
                    pace * rng.uniform(0.85, 1.15), rng) for pid, slot in enumerate(slots, start=1)]


def _compose(t: int, walkers: Sequence[_Walker], background: np.ndarray) -> tuple[np.ndarray, list[TruthBox]]:
    """Frame ``t`` (float32, before the camera's optics) and its truth in identity order.

    People are laid down nearest first, each under those already there (``through`` is what still shows),
    so one pass gives both the picture and how much of each person is visible.
    """
    h, w = background.shape[:2]
    placed = [(wk, wk.sprite(t), int(wk.xy[t, 0]), int(wk.xy[t, 1])) for wk in walkers]
    placed.sort(key=lambda p: -(p[3] + p[1].box[3]))  # feet lower in the frame = nearer the camera
    colour = np.zeros((h, w, 3), np.float32)
    through = np.ones((h, w), np.float32)  # how much of what lies behind still shows at each pixel
    truth = []
    for wk, sp, x, y in placed:
        sh, sw = sp.alpha.shape
        fx1, fy1, fx2, fy2 = max(x, 0), max(y, 0), min(x + sw, w), min(y + sh, h)
        if fx1 >= fx2 or fy1 >= fy2:
            continue
        a = sp.alpha[fy1 - y:fy2 - y, fx1 - x:fx2 - x]
        shown = through[fy1:fy2, fx1:fx2]
        visible = float((a * shown).sum()) / sp.mass
        colour[fy1:fy2, fx1:fx2] += shown[..., None] * sp.colour[fy1 - y:fy2 - y, fx1 - x:fx2 - x]
        shown *= 1.0 - a
        bx1, by1, bx2, by2 = sp.box
        box = (max(x + bx1, 0), max(y + by1, 0), min(x + bx2, w), min(y + by2, h))
        if visible >= MIN_VISIBLE and box[0] < box[2] and box[1] < box[3]:
            truth.append(TruthBox(wk.pid, *box, visible=round(visible, 4)))
    colour += through[..., None] * background
    return colour, sorted(truth, key=lambda b: b.identity)


def _check_options(people: int, frames: int, size: tuple[int, int], fps: float, fourcc: str) -> None:
    if people < 0 or frames < 1:
        raise InputError(f"a synthetic video needs people >= 0 and frames >= 1, not {people} and {frames}")
    if len(size) != 2 or min(size) < 64:
        raise InputError(f"video size (width, height) must be at least 64x64, not {size}")
    if not fps > 0:
        raise InputError(f"fps must be positive, not {fps}")
    if len(fourcc) != 4:
        raise InputError(f"fourcc must be four characters (e.g. 'MJPG'), not {fourcc!r}")


def write_video(path: str | os.PathLike, *, people: int = 4, frames: int = 60, size: tuple[int, int] = (480, 288),
                fps: float = 10.0, seed: int = 0, fourcc: str = "MJPG") -> VideoTruth:
    """Write ``frames`` frames of ``people`` walking people (identities 1..people) to ``path``; return the truth.

    ``size`` is (width, height). MJPG in an .avi is what every OpenCV build writes; the file is opened
    back with ``cv2.VideoCapture`` before returning, so a codec that writes nothing readable fails here.
    """
    _check_options(people, frames, size, fps, fourcc)
    size = (int(size[0]), int(size[1]))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cam = camera_of(_CAMID, seed, _DIFFICULTY)
    stream = np.random.SeedSequence([seed & 0xFFFFFFFF, 0x71DE0])
    scene_seq, walk_seq, noise_seq, optics_seq = stream.spawn(4)  # independent: people do not move the scene
    background = _background(size[1], size[0], cam, np.random.default_rng(scene_seq), _DIFFICULTY).astype(np.float32)
    walkers = _walkers(people, cam, seed, size, frames, fps, np.random.default_rng(walk_seq))
    noise_rng = np.random.default_rng(noise_seq)
    still = replace(cam, noise=0.0)  # light and blur fixed for the video; the noise is added per frame below
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), float(fps), size)
    if not writer.isOpened():
        raise InputError(f"cannot write the video {path} with fourcc {fourcc!r} (does OpenCV have that codec for "
                         f"{path.suffix or 'no extension'}? MJPG in .avi always works)")
    truth: dict[int, list[TruthBox]] = {}
    spread = max(1, round(cam.noise * 3**0.5))  # uniform integer noise of the camera's std (cheaper than normal)
    try:
        for t in range(frames):
            colour, truth[t] = _compose(t, walkers, background)
            img = _camera_optics(cv2.convertScaleAbs(colour), still, np.random.default_rng(optics_seq), _DIFFICULTY)
            noise = noise_rng.integers(-spread, spread + 1, img.shape, dtype=np.int16)
            writer.write(cv2.cvtColor(cv2.add(img, noise, dtype=cv2.CV_8U), cv2.COLOR_RGB2BGR))
    finally:
        writer.release()
    _check_readable(path, fourcc)
    return VideoTruth(float(fps), size, frames, truth)


def _check_readable(path: Path, fourcc: str) -> None:
    cap = cv2.VideoCapture(str(path))
    try:
        ok = cap.isOpened() and cap.read()[0]
    finally:
        cap.release()
    if not ok:
        raise InputError(f"OpenCV wrote {path} with fourcc {fourcc!r} but cannot read it back; use MJPG in .avi")


class IndexedFrame(Protocol):
    """A decoded video frame: its number in the video and the RGB uint8 HxWx3 picture."""

    index: int
    image: np.ndarray


class TruthDetector:
    """A "detector" that finds exactly the truth boxes of a synthetic video, so tracking is scored on its own."""

    name = "truth"

    def __init__(self, truth: VideoTruth) -> None:
        self.truth = truth

    def _boxes(self, frame_index: int) -> list[TruthBox]:
        if frame_index not in self.truth.boxes:
            raise InputError(f"frame {frame_index} is not in the synthetic video's truth "
                             f"({self.truth.frames} frames)")
        return self.truth.boxes[frame_index]

    def detect_frames(self, frames: Sequence[IndexedFrame]) -> list[list[Detection]]:
        """The truth boxes of each frame (score 1.0, in identity order); frames must match the truth's size."""
        out = []
        for f in frames:
            if tuple(f.image.shape[1::-1]) != self.truth.size:
                raise InputError(f"frame {f.index} is {f.image.shape[1]}x{f.image.shape[0]}, the synthetic video's "
                                 f"truth is for {self.truth.size[0]}x{self.truth.size[1]}")
            out.append([Detection(float(b.x1), float(b.y1), float(b.x2), float(b.y2), 1.0)
                        for b in self._boxes(f.index)])
        return out

    def identity_of_box(self, frame_index: int, detection: Detection) -> int:
        """The identity of a box this detector returned for frame ``frame_index``."""
        for b in self._boxes(frame_index):
            if (b.x1, b.y1, b.x2, b.y2) == (detection.x1, detection.y1, detection.x2, detection.y2):
                return b.identity
        raise InputError(f"{detection} is not a truth box of frame {frame_index}")
