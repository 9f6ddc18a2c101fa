"""Synthetic surveillance video (reid.synthetic.video) and the DeepSORT tracker over it (reid.sources.tracker).

Appearance vectors here are colour histograms of the crops: cheap, and enough to link people over a
few frames; the re-id network is never loaded.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

from reid.errors import InputError
from reid.sources.detector import Detection
from reid.sources.tracker import Tracker, TrackingScore, score_tracking
from reid.synthetic.video import TruthBox, TruthDetector, VideoTruth, truth_path, write_video


@dataclass(frozen=True)
class _Frame:
    index: int
    image: np.ndarray


def _read(path: Path) -> list[_Frame]:
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        frames.append(_Frame(len(frames), cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))
    cap.release()
    return frames


def _colour_embedding(image: np.ndarray, d: Detection) -> np.ndarray:
    """Hue-saturation and value histograms of the crop, square-rooted and L2-normalised."""
    x1, y1, x2, y2 = d.box()
    hsv = cv2.cvtColor(np.ascontiguousarray(image[y1:y2, x1:x2]), cv2.COLOR_RGB2HSV)
    hs = cv2.calcHist([hsv], [0, 1], None, [12, 4], [0, 180, 0, 256]).ravel()
    v = cv2.calcHist([hsv], [2], None, [8], [0, 256]).ravel()
    f = np.sqrt(np.concatenate([hs, v]))
    return (f / np.linalg.norm(f)).astype(np.float32)


def _track(frames: list[_Frame], detector: TruthDetector, tracker: Tracker) -> TrackingScore:
    assigned, truth = [], []
    for frame, dets in zip(frames, detector.detect_frames(frames), strict=True):
        embeds = np.stack([_colour_embedding(frame.image, d) for d in dets]) if dets else np.zeros((0, 56))
        assigned += tracker.update(dets, embeds)
        truth += [detector.identity_of_box(frame.index, d) for d in dets]
    return score_tracking(assigned, truth)


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> tuple[Path, VideoTruth, list[_Frame]]:
    path = tmp_path_factory.mktemp("video") / "walk.avi"
    truth = write_video(path, people=4, frames=60, size=(480, 288), fps=10.0, seed=0)
    return path, truth, _read(path)


def test_video_reads_back_with_its_truth(video):
    path, truth, frames = video
    cap = cv2.VideoCapture(str(path))
    assert cap.get(cv2.CAP_PROP_FPS) == pytest.approx(10.0)
    cap.release()
    assert len(frames) == truth.frames == 60
    assert all(f.image.shape == (288, 480, 3) and f.image.dtype == np.uint8 for f in frames)
    assert truth.size == (480, 288) and truth.fps == 10.0
    assert sorted(truth.boxes) == list(range(60))
    assert truth.identities == [1, 2, 3, 4]


def test_same_seed_same_video(tmp_path):
    kw = dict(people=3, frames=12, size=(320, 192))
    a = write_video(tmp_path / "a.avi", seed=5, **kw)
    b = write_video(tmp_path / "b.avi", seed=5, **kw)
    c = write_video(tmp_path / "c.avi", seed=6, **kw)
    assert a == b and a != c
    assert (tmp_path / "a.avi").read_bytes() == (tmp_path / "b.avi").read_bytes()
    a.save(truth_path(tmp_path / "a.avi"))
    assert truth_path(tmp_path / "a.avi") == tmp_path / "a.truth.json"
    assert VideoTruth.load(tmp_path / "a.truth.json") == a


def test_people_are_pedestrian_sized_inside_the_frame_and_move_smoothly(video):
    _, truth, _ = video
    for pid in truth.identities:
        track = [(t, b) for t in range(truth.frames) for b in truth.boxes[t] if b.identity == pid]
        assert len(track) >= 0.75 * truth.frames  # in view (and not hidden) most of the time
        for _, b in track:
            assert 0 <= b.x1 < b.x2 <= 480 and 0 <= b.y1 < b.y2 <= 288
            assert 90 <= b.y2 - b.y1 <= 150 and 20 <= b.x2 - b.x1 <= 80
            assert 0.5 <= b.visible <= 1.0
        for (t0, b0), (t1, b1) in zip(track, track[1:], strict=False):
            if t1 == t0 + 1:
                step = max(abs(b1.x1 + b1.x2 - b0.x1 - b0.x2), abs(b1.y1 + b1.y2 - b0.y1 - b0.y2)) / 2
                assert step <= 14, (pid, t0, b0, b1)
        x = [(b.x1 + b.x2) / 2 for _, b in track]
        assert max(x) - min(x) > 100  # walking, not standing


def test_boxes_hold_the_people(tmp_path):
    kw = dict(frames=10, size=(320, 192), seed=3)
    truth = write_video(tmp_path / "people.avi", people=3, **kw)
    write_video(tmp_path / "empty.avi", people=0, **kw)  # the same scene: people do not move its random draws
    for a, b in zip(_read(tmp_path / "people.avi"), _read(tmp_path / "empty.avi"), strict=True):
        diff = np.abs(a.image.astype(np.int16) - b.image.astype(np.int16)).mean(axis=2)
        outside = np.ones(diff.shape, bool)
        for box in truth.boxes[a.index]:
            outside[box.y1:box.y2, box.x1:box.x2] = False
            if box.visible == 1.0:
                assert diff[box.y1:box.y2, box.x1:box.x2].mean() > 15
        assert diff[outside].mean() < 4


def test_truth_detector_replays_the_truth(video):
    _, truth, frames = video
    detector = TruthDetector(truth)
    assert detector.name == "truth"
    found = detector.detect_frames(frames[10:13])
    for frame, dets in zip(frames[10:13], found, strict=True):
        boxes = truth.boxes[frame.index]
        assert [(d.x1, d.y1, d.x2, d.y2) for d in dets] == [(b.x1, b.y1, b.x2, b.y2) for b in boxes]
        assert all(d.score == 1.0 for d in dets)
        assert [detector.identity_of_box(frame.index, d) for d in dets] == [b.identity for b in boxes]
    with pytest.raises(InputError, match="frame 60"):
        detector.detect_frames([_Frame(60, frames[0].image)])
    with pytest.raises(InputError, match="320x192"):
        detector.detect_frames([_Frame(0, np.zeros((192, 320, 3), np.uint8))])
    with pytest.raises(InputError, match="not a truth box"):
        detector.identity_of_box(0, Detection(0, 0, 5, 5, 1.0))


@pytest.mark.parametrize("stride", [1, 2])
def test_tracking_the_synthetic_video_keeps_people_apart(video, stride):
    _, truth, frames = video
    score = _track(frames[::stride], TruthDetector(truth), Tracker())
    assert score.identities == 4
    assert score.purity >= 0.95
    assert score.coverage >= 0.9
    assert score.fragmentation <= 1.5


def _box(x: float, y: float = 10.0) -> Detection:
    return Detection(x, y, x + 40, y + 120, 0.9)


_RED, _BLUE = np.eye(2, dtype=np.float32)


def test_every_detection_gets_an_id_from_the_first_frame():
    tracker = Tracker(first_id=100)
    assert tracker.next_id == 100
    assert tracker.update([_box(0), _box(200)], np.stack([_RED, _BLUE])) == [100, 101]
    assert tracker.next_id == 102
    assert tracker.update([_box(203), _box(2)], np.stack([_BLUE, _RED])) == [101, 100]  # order given is kept
    assert tracker.update([_box(6), _box(206), _box(400)], np.stack([_RED, _BLUE, _RED])) == [100, 101, 102]


def test_empty_frames_age_the_tracks():
    def run(empty_frames: int) -> int:
        tracker = Tracker(max_age=2)
        for x in (0, 2, 4):
            (pid,) = tracker.update([_box(x)], _RED[None])
        for _ in range(empty_frames):
            assert tracker.update([], np.zeros((0, 2), np.float32)) == []
        (again,) = tracker.update([_box(6)], _RED[None])
        return again == pid

    assert run(2)  # missed in max_age frames: found again
    assert not run(3)  # lost for longer: a new tracklet


@pytest.mark.parametrize("option", [
    {"max_age": 0}, {"max_age": 2.5}, {"n_init": 1}, {"max_iou_distance": 1.0}, {"max_iou_distance": "0.5"},
    {"max_cosine_distance": 0.0}, {"max_cosine_distance": float("nan")}, {"first_id": 0}, {"first_id": True},
    {"nn_budget": 0},
])
def test_bad_tracker_options(option):
    with pytest.raises(InputError, match=next(iter(option))):
        Tracker(**option)


def test_bad_tracker_input():
    tracker = Tracker()
    with pytest.raises(InputError, match="one embedding row per detection"):
        tracker.update([_box(0), _box(100)], _RED[None])
    with pytest.raises(InputError, match="without area"):
        tracker.update([Detection(5, 5, 5, 50, 0.9)], _RED[None])
    with pytest.raises(InputError, match="non-zero"):
        tracker.update([_box(0)], np.zeros((1, 2), np.float32))


def test_tracker_loads_no_network():
    code = ("import sys, numpy as np\n"
            "from reid.sources.detector import Detection\n"
            "from reid.sources.tracker import Tracker\n"
            "assert Tracker().update([Detection(0, 0, 40, 120, 1.0)], np.ones((1, 4), np.float32)) == [1]\n"
            "loaded = [m for m in sys.modules if m == 'torch' or m.startswith('deep_sort_realtime.embedder')]\n"
            "assert not loaded, loaded\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_score_tracking():
    score = score_tracking([1, 1, 1, 2, 2, 3], [7, 7, 8, 8, 8, 8])
    assert score == TrackingScore(purity=5 / 6, coverage=4 / 6, fragmentation=2.0, tracklets=3, identities=2)
    assert score_tracking([4, 4, 5], [1, 1, 2]).purity == 1.0
    with pytest.raises(InputError):
        score_tracking([1, 2], [1])
    with pytest.raises(InputError):
        score_tracking([], [])


def test_write_video_rejects_what_it_cannot_write(tmp_path):
    with pytest.raises(InputError, match="64x64"):
        write_video(tmp_path / "tiny.avi", size=(32, 32))
    with pytest.raises(InputError, match="cannot write"):
        write_video(tmp_path / "walk.nosuchformat", frames=2)
    assert TruthBox(1, 0, 0, 2, 2).visible == 1.0
