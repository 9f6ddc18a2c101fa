"""Real pedestrian tracklets from OpenCV's sample video ``vtest.avi``: an evaluation set, never training data.

The video (768x576, 10 fps, 795 frames, one fixed camera over a plaza) ships in Debian's ``opencv-doc``
package; it is fetched with ``apt-get download`` into the data folder when absent. The packaged SSDLite
person detector runs on every ``stride``-th frame; a deliberately conservative IoU + constant-velocity
tracker links boxes into tracklets. A track takes a box only when that box fits its predicted box (IoU,
height) clearly better than any other box does, and no other track wants it; it ends on any ambiguity
(a second box or a second track nearly as close) or after ``max_gap`` frames without a fitting box, and
short tracks are dropped. Crops cut by the frame border or overlapped by another person are not written
(the track goes on through them).

Each long tracklet is split in time into a re-id pair: an early query segment (camera 1, a few crops) and a
later gallery segment (camera 2), with a gap between them, so the person has moved and turned and no
near-duplicate of a query frame is in its gallery. Tracklets too short to split are gallery distractors
(identity 0). Crops are written Market-style (``PPPP_cCs1_FFFFFF_00.jpg``) under ``query/`` and
``bounding_box_test/`` with a ``manifest.json``; detections and tracklets are cached, so a second run is
instant.

Identities are tracks, not people: purity is bought with fragmentation, and vtest.avi has a small cast
who cross the plaza again and again, so one person is often several identities (and distractors).
``TrackletSet.cooccurring`` gives the clean comparison: each query track against the tracks on screen
at the same time as it, which are certainly other people (``benchmarks/bench_quality.py``, protocol A).

    python benchmarks/vtest_tracklets.py [--data DIR] [--stride N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)

DEFAULT_DATA = Path("~/.cache/reid-bench/vtest")
VIDEO_NAME = "vtest.avi"
DEB_PACKAGE = "opencv-doc"
DEB_MEMBER = "./usr/share/doc/opencv-doc/examples/data/vtest.avi"
VERSION = 2  # of the tracker and the split below: part of every cache key


@dataclass(frozen=True)
class TrackConfig:
    """Every knob of detection, tracking, crop filtering and splitting (all in frames / pixels)."""

    stride: int = 1  # run the detector on every stride-th frame
    cache_score: float = 0.3  # detections cached at this score; weaker ones are never seen
    track_score: float = 0.5  # boxes that take part in tracking (and in every ambiguity test)
    crop_score: float = 0.6  # boxes good enough to be written as crops
    match_iou: float = 0.3  # IoU with the predicted box needed to continue a track
    ambiguity: float = 0.4  # a match must beat the runner-up box (and track) by this factor in IoU
    start_overlap: float = 0.3  # a box covered more than this by another starts no track
    max_height_ratio: float = 1.25  # box height may change by at most this factor between matches
    max_gap: int = 10  # frames a track may go undetected before it ends
    border: int = 3  # crops closer than this to the frame edge are cut by it
    overlap: float = 0.1  # crops whose area is covered more than this by another box are occluded
    min_height: int = 56  # smallest crop height written
    min_crops: int = 6  # tracks with fewer clean crops are dropped
    min_span: int = 40  # tracks spanning fewer frames are gallery distractors, not query/gallery pairs
    query_frac: float = 0.25  # the query segment: the first quarter of a track's span
    gallery_frac: float = 0.6  # the gallery segment starts at 60% of the span...
    min_gap: int = 15  # ...and at least this many frames after the query segment ends
    queries_per_track: int = 3
    gallery_every: int = 4  # one gallery crop every this many frames
    distractors: bool = True

    def key(self) -> str:
        text = json.dumps({"version": VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:10]


@dataclass
class Crop:
    path: str  # relative to the tracklet set's root
    pid: int
    camid: int
    track: int
    frame: int
    box: list[int]
    score: float


@dataclass
class TrackletSet:
    """The query and gallery crops of one tracklet build, with what it took to make them."""

    root: Path
    query: list[Crop]
    gallery: list[Crop]
    spans: dict[int, tuple[int, int]] = field(default_factory=dict)  # track -> (first frame, last frame)
    stats: dict = field(default_factory=dict)

    def paths(self, side: str) -> list[Path]:
        return [self.root / c.path for c in getattr(self, side)]

    def cooccurring(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(query rows, gallery rows) per query track: its own gallery crops and those of every track seen
        at the same time as it. Two tracks on screen together are two people (the tracker never gives one
        box to two tracks), so these negatives are certain; a track from another time may be the same
        person come back (people in vtest.avi walk the plaza again and again) and is left out."""
        q_tracks = np.array([c.track for c in self.query])
        g_tracks = np.array([c.track for c in self.gallery])
        groups = []
        for t in np.unique(q_tracks):
            a, b = self.spans[int(t)]
            near = [u for u, (c, d) in self.spans.items() if c <= b and d >= a]
            groups.append((np.flatnonzero(q_tracks == t), np.flatnonzero(np.isin(g_tracks, near))))
        return groups

    def labels(self, side: str) -> tuple[np.ndarray, np.ndarray]:
        crops = getattr(self, side)
        return np.array([c.pid for c in crops], np.int64), np.array([c.camid for c in crops], np.int64)


# --- the video -----------------------------------------------------------------------------------


def fetch_vtest(data_dir: str | os.PathLike = DEFAULT_DATA) -> Path:
    """``data_dir/vtest.avi``, extracted from Debian's opencv-doc package (``apt-get download``) if absent."""
    data_dir = Path(data_dir).expanduser()
    video = data_dir / VIDEO_NAME
    if video.is_file():
        return video
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise RuntimeError(f"{video} is missing and this machine has no apt-get/dpkg-deb to fetch it; copy "
                           f"vtest.avi (OpenCV's samples/data) there by hand")
    data_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=".fetch-") as tmp:
        log.info("downloading %s with apt-get into %s", DEB_PACKAGE, tmp)
        run = subprocess.run(["apt-get", "download", DEB_PACKAGE], cwd=tmp, capture_output=True, text=True)
        if run.returncode != 0 and os.geteuid() == 0:  # package lists may be missing: update once and retry
            subprocess.run(["apt-get", "update"], capture_output=True, text=True)
            run = subprocess.run(["apt-get", "download", DEB_PACKAGE], cwd=tmp, capture_output=True, text=True)
        debs = sorted(Path(tmp).glob(f"{DEB_PACKAGE}_*.deb"))
        if run.returncode != 0 or not debs:
            last = (run.stderr or run.stdout).strip().splitlines()[-1:] or ["no .deb downloaded"]
            raise RuntimeError(f"apt-get download {DEB_PACKAGE} failed: {last[0]}")
        with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(debs[0])], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL) as proc:  # it complains of the pipe we stop reading
            with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
                for member in tar:
                    if member.name == DEB_MEMBER and member.isfile():
                        part = video.with_suffix(".part")
                        with tar.extractfile(member) as src, open(part, "wb") as dst:
                            shutil.copyfileobj(src, dst)
                        os.replace(part, video)
                        break
            proc.stdout.close()
    if not video.is_file():
        raise RuntimeError(f"{debs[0].name} holds no {DEB_MEMBER}")
    return video


def read_frames(video: Path, stride: int = 1):
    """(frame index, uint8 RGB frame) for every stride-th frame of the video."""
    cap = cv2.VideoCapture(str(video))
    if not cap.isOpened():
        raise RuntimeError(f"{video}: OpenCV cannot open it")
    try:
        i = 0
        while True:
            ok, bgr = cap.read()
            if not ok:
                return
            if i % stride == 0:
                yield i, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            i += 1
    finally:
        cap.release()


def detect_video(video: Path, cache: Path, config: TrackConfig) -> dict:
    """Detections of every stride-th frame, cached in ``cache`` (boxes as [x1, y1, x2, y2, score])."""
    if cache.is_file():
        return json.loads(cache.read_text())
    from reid.sources import SSDLiteDetector

    detector = SSDLiteDetector(score_threshold=config.cache_score, min_height=16, min_width=6)
    frames: dict[str, list] = {}
    size = None
    spent = 0.0
    t0 = time.perf_counter()
    for i, rgb in read_frames(video, config.stride):
        size = rgb.shape[1], rgb.shape[0]
        t = time.perf_counter()
        found = detector.detect(rgb)
        spent += time.perf_counter() - t
        frames[str(i)] = [[round(d.x1, 1), round(d.y1, 1), round(d.x2, 1), round(d.y2, 1), round(d.score, 4)]
                          for d in found]
    out = {"video": str(video), "size": size, "stride": config.stride, "score": config.cache_score,
           "frames": frames, "detector_ms_per_frame": 1000 * spent / max(1, len(frames)),
           "decode_and_detect_s": time.perf_counter() - t0}
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".part")
    tmp.write_text(json.dumps(out))
    os.replace(tmp, cache)
    return out


# --- the tracker ---------------------------------------------------------------------------------


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in a [N,4] with every box in b [M,4] (x1, y1, x2, y2)."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def covered_fraction(boxes: np.ndarray) -> np.ndarray:
    """For each box, the largest share of its area that any other box of the frame covers."""
    n = len(boxes)
    if n < 2:
        return np.zeros(n)
    x1 = np.maximum(boxes[:, None, 0], boxes[None, :, 0])
    y1 = np.maximum(boxes[:, None, 1], boxes[None, :, 1])
    x2 = np.minimum(boxes[:, None, 2], boxes[None, :, 2])
    y2 = np.minimum(boxes[:, None, 3], boxes[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    np.fill_diagonal(inter, 0)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return (inter / np.maximum(area[:, None], 1e-9)).max(axis=1)


@dataclass
class _Track:
    frames: list[int] = field(default_factory=list)
    boxes: list[np.ndarray] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    clean: list[bool] = field(default_factory=list)

    def predict(self, frame: int) -> np.ndarray:
        """The last box moved on at the mean velocity of its last few steps."""
        last = self.boxes[-1]
        k = max(0, len(self.frames) - 4)
        df = self.frames[-1] - self.frames[k]
        if df <= 0:
            return last
        v = (last - self.boxes[k]) / df
        centre = ((v[0] + v[2]) / 2, (v[1] + v[3]) / 2)
        return last + (frame - self.frames[-1]) * np.array([centre[0], centre[1], centre[0], centre[1]])


def track(detections: dict, config: TrackConfig, ends: Counter | None = None) -> list[_Track]:
    """Link per-frame boxes into pure tracklets: continue a track only on an unambiguous match.

    ``ends`` (optional) counts why tracks ended: a gap, two boxes close to it, a box another track claims.
    """
    ends = Counter() if ends is None else ends
    width, height = detections["size"]
    active: list[_Track] = []
    finished: list[_Track] = []
    for key in sorted(detections["frames"], key=int):
        f = int(key)
        rows = np.array(detections["frames"][key], np.float64).reshape(-1, 5)
        rows = rows[rows[:, 4] >= config.track_score]
        boxes, scores = rows[:, :4], rows[:, 4]
        covered = covered_fraction(boxes)
        preds = np.array([t.predict(f) for t in active]).reshape(-1, 4)
        iou = iou_matrix(preds, boxes)
        best_det, iou1, iou2 = _best_two(iou)  # per track: its best box, that IoU, the runner-up's
        best_track, tiou1, tiou2 = _best_two(iou.T)  # per box: its best track, ...
        taken = np.zeros(len(boxes), bool)
        survivors = []
        for ti, t in enumerate(active):
            d = best_det[ti]
            h_ratio = (boxes[d, 3] - boxes[d, 1]) / max(1e-9, t.boxes[-1][3] - t.boxes[-1][1]) if len(boxes) else 0.0
            if iou1[ti] < config.match_iou or not 1 / config.max_height_ratio <= h_ratio <= config.max_height_ratio:
                # Nothing that fits: the person was missed (a neighbour or a part of them may be in view);
                # the track waits up to max_gap frames and takes no box.
                if f - t.frames[-1] <= config.max_gap:
                    survivors.append(t)
                else:
                    finished.append(t)
                    ends["gap"] += 1
                continue
            reason = ("two boxes" if iou2[ti] > config.ambiguity * iou1[ti] else
                      "shared box" if best_track[d] != ti or tiou2[d] > config.ambiguity * tiou1[d] else None)
            if reason is None:
                t.frames.append(f)
                t.boxes.append(boxes[d])
                t.scores.append(float(scores[d]))
                t.clean.append(_clean(boxes[d], scores[d], covered[d], width, height, config))
                taken[d] = True
                survivors.append(t)
            else:  # stop here rather than risk following the wrong person
                finished.append(t)
                ends[reason] += 1
        for d in np.flatnonzero(~taken):
            # A box that someone's track also claimed, or one in a crowd, starts nothing until it stands alone.
            if tiou1[d] >= config.match_iou or covered[d] > config.start_overlap:
                continue
            survivors.append(_Track([f], [boxes[d]], [float(scores[d])],
                                    [_clean(boxes[d], scores[d], covered[d], width, height, config)]))
        active = survivors
    finished += active
    ends["video end"] += len(active)
    return [t for t in finished if sum(t.clean) >= config.min_crops]


def _best_two(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: the column of the largest value, that value, and the second largest (0 when none)."""
    rows, cols = m.shape
    if cols == 0:
        return np.zeros(rows, int), np.zeros(rows), np.zeros(rows)
    order = np.argsort(-m, axis=1)
    first = m[np.arange(rows), order[:, 0]]
    second = m[np.arange(rows), order[:, 1]] if cols > 1 else np.zeros(rows)
    return order[:, 0], first, second


def _clean(box: np.ndarray, score: float, covered: float, width: int, height: int, config: TrackConfig) -> bool:
    x1, y1, x2, y2 = box
    inside = (x1 >= config.border and y1 >= config.border
              and x2 <= width - config.border and y2 <= height - config.border)
    return bool(inside and score >= config.crop_score and covered <= config.overlap and y2 - y1 >= config.min_height)


# --- the split and the crops ---------------------------------------------------------------------


def split_tracks(tracks: list[_Track], config: TrackConfig) -> list[tuple[int, str, int, int, np.ndarray, float]]:
    """(pid, side, track, frame, box, score) of every crop to write; pid 0 for distractor tracks."""
    out = []
    tracks = sorted(tracks, key=lambda t: t.frames[0])
    pid = 0
    for ti, t in enumerate(tracks):
        clean = [(f, b, s) for f, b, s, c in zip(t.frames, t.boxes, t.scores, t.clean, strict=True) if c]
        first, last = clean[0][0], clean[-1][0]
        span = last - first
        q_end = first + config.query_frac * span
        g_start = max(first + config.gallery_frac * span, q_end + config.min_gap)
        query = [c for c in clean if c[0] <= q_end]
        gallery = _every(config.gallery_every, [c for c in clean if c[0] >= g_start])
        if span >= config.min_span and query and gallery:
            pid += 1
            picks = np.unique(np.linspace(0, len(query) - 1, config.queries_per_track).round().astype(int))
            out += [(pid, "query", ti, f, b, s) for f, b, s in (query[i] for i in picks)]
            out += [(pid, "gallery", ti, f, b, s) for f, b, s in gallery]
        elif config.distractors:
            out += [(0, "gallery", ti, f, b, s) for f, b, s in _every(config.gallery_every, clean)]
    return out


def _every(step: int, crops: list) -> list:
    """Crops at least ``step`` frames apart, from the first."""
    kept, next_frame = [], None
    for c in crops:
        if next_frame is None or c[0] >= next_frame:
            kept.append(c)
            next_frame = c[0] + step
    return kept


def build_tracklets(data_dir: str | os.PathLike = DEFAULT_DATA, stride: int = 1,
                    config: TrackConfig | None = None) -> TrackletSet:
    """Fetch, detect, track, split and write the crops (each step cached); the set as a TrackletSet."""
    config = config or TrackConfig(stride=stride)
    data_dir = Path(data_dir).expanduser()
    root = data_dir / f"tracklets_s{config.stride}_{config.key()}"
    manifest = root / "manifest.json"
    if manifest.is_file():
        return _load(root, json.loads(manifest.read_text()))
    t0 = time.perf_counter()
    video = fetch_vtest(data_dir)
    dets = detect_video(video, data_dir / f"detections_s{config.stride}_score{config.cache_score}.json", config)
    ends: Counter = Counter()
    tracks = sorted(track(dets, config, ends), key=lambda t: t.frames[0])  # the numbering of split_tracks
    crops = split_tracks(tracks, config)
    wanted: dict[int, list] = {}
    for c in crops:
        wanted.setdefault(c[3], []).append(c)
    tmp = Path(tempfile.mkdtemp(dir=data_dir, prefix=".tracklets-"))
    (tmp / "query").mkdir()
    (tmp / "bounding_box_test").mkdir()
    entries: dict[str, list[dict]] = {"query": [], "gallery": []}
    for f, rgb in read_frames(video, 1):
        for pid, side, ti, frame, box, score in wanted.get(f, []):
            x1, y1, x2, y2 = (int(v) for v in (np.floor(box[0]), np.floor(box[1]), np.ceil(box[2]), np.ceil(box[3])))
            cam = 1 if side == "query" else 2
            name = f"{pid:04d}_c{cam}s1_{frame:06d}_{ti % 100:02d}.jpg"
            rel = f"{'query' if side == 'query' else 'bounding_box_test'}/{name}"
            bgr = cv2.cvtColor(np.ascontiguousarray(rgb[y1:y2, x1:x2]), cv2.COLOR_RGB2BGR)
            cv2.imwrite(str(tmp / rel), bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
            entries[side].append(asdict(Crop(rel, pid, cam, ti, frame, [x1, y1, x2, y2], round(float(score), 4))))
    pids = {e["pid"] for e in entries["query"]}
    stats = {
        "video": str(video), "frames_detected": len(dets["frames"]), "stride": config.stride,
        "detector_ms_per_frame": round(dets["detector_ms_per_frame"], 1),
        "detections_per_frame": round(float(np.mean([sum(r[4] >= config.crop_score for r in v)
                                                      for v in dets["frames"].values()])), 2),
        "tracks_kept": len(tracks), "track_ends": dict(ends), "identities": len(pids),
        "distractor_tracks": len({e["track"] for e in entries["gallery"] if e["pid"] == 0}),
        "query_crops": len(entries["query"]), "gallery_crops": len(entries["gallery"]),
        "build_s": round(time.perf_counter() - t0, 1), "config": asdict(config), "version": VERSION,
    }
    spans = {str(i): [t.frames[0], t.frames[-1]] for i, t in enumerate(tracks)}
    (tmp / "manifest.json").write_text(json.dumps({"stats": stats, "spans": spans, **entries}, indent=1))
    if root.exists():
        shutil.rmtree(root)
    os.replace(tmp, root)
    return _load(root, json.loads(manifest.read_text()))


def _load(root: Path, manifest: dict) -> TrackletSet:
    return TrackletSet(root, [Crop(**e) for e in manifest["query"]], [Crop(**e) for e in manifest["gallery"]],
                       {int(k): (a, b) for k, (a, b) in manifest["spans"].items()}, manifest["stats"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="data folder (default %(default)s)")
    parser.add_argument("--stride", type=int, default=1, help="run the detector on every N-th frame")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cv2.setNumThreads(2)
    t = time.perf_counter()
    ts = build_tracklets(args.data, stride=args.stride)
    s = ts.stats
    print(f"{ts.root}\n{s['identities']} identities from {s['tracks_kept']} tracklets "
          f"({s['distractor_tracks']} distractor tracklets); {s['query_crops']} query / {s['gallery_crops']} gallery "
          f"crops; detector {s['detector_ms_per_frame']} ms/frame on {s['frames_detected']} frames, "
          f"{s['detections_per_frame']} people/frame; built in {s['build_s']} s, "
          f"loaded in {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()
