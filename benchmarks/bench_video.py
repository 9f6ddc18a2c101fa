"""Footage end to end: ``reid index vtest.avi`` against its own stages, tracklets, and sightings found again.

On OpenCV's sample ``vtest.avi`` (real pedestrians, evaluation only; fetched as
``benchmarks/vtest_tracklets.py`` does), in one run on the same frames:

  decode alone      OpenCV decoding of every ``--stride``-th frame
  detector alone    the person detector on those decoded frames (one after another)
  embedder alone    the model (``--runtime``) on the crops the detector found, batches of 32
  end to end        ``reid.index.build_index`` on the video: decode, detect, embed, track, store (the
                    stages overlap in threads); target: within 1.15x of detector + embedder alone

Then the index is asked for people: for each identity of the benchmark's conservative tracklets
(``vtest_tracklets``: an early query segment and a later gallery segment of one walk, after a gap), its
first query crop is searched for sightings after its own segment (``--since`` one second after the
segment's last frame, as an analyst asks "where did this person go next?") with ``--per-track`` (top 5)
and with ``--per-row``; an answer is the person's own later sighting when it (or, per track, its
tracklet after ``--since``) holds a box of that identity's gallery segment (same frame, IoU >= 0.5).
Everyone else on screen after that time is a distractor. (vtest.avi has no identity labels across
walks, so a person's other walks cannot be scored.)

A second table scores the tracker against ground truth on synthetic videos (``reid.synthetic.video``,
the detector replaced by the truth, embeddings from the default model): purity, coverage and tracklets
per person for a few appearance gates (``max_cosine_distance``), the numbers its default is chosen on.

    OMP_NUM_THREADS=2 python benchmarks/bench_video.py [--data DIR] [--stride N] [--runtime onnx|torch]
        [--queries N] [--skip-synthetic]
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vtest_tracklets import DEFAULT_DATA, build_tracklets, fetch_vtest  # noqa: E402

from reid.images import decode_image  # noqa: E402
from reid.index import FootageOptions, _embedder, build_index  # noqa: E402
from reid.sources.detector import Detection, make_detector  # noqa: E402
from reid.sources.footage import _crop  # noqa: E402
from reid.sources.video import FrameReader, probe, start_time  # noqa: E402


def _table(title: str, header: tuple[str, ...], rows: list[tuple]) -> None:
    print(f"\n{title}")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    for r in (header, tuple("-" * w for w in widths), *rows):
        print("  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=True)))


def _model(runtime: str):
    from reid import engine
    from reid.model.identity import DEFAULT_SOURCE, ModelRef

    model, ref = ModelRef.load(DEFAULT_SOURCE, "cpu")
    if runtime != "torch":
        model = engine.ensure_exported(model, ref.fingerprint, engine.exported_runtime(runtime))
    return model


def stages(video: Path, stride: int, runtime: str, work: Path) -> tuple[list[tuple], Path]:
    """Time decode, detector, embedder alone and end to end on the same frames; returns rows and the index."""
    info = probe(video)
    t0 = time.perf_counter()
    frames = list(FrameReader(video, info, start_time(video, info), stride=stride))
    decode = time.perf_counter() - t0
    options = FootageOptions(stride=stride)
    detector = make_detector(options.detector, score_threshold=options.score_threshold,
                             min_height=options.min_height)
    detector.detect(frames[0].image)  # warm-up (first call allocates)
    t0 = time.perf_counter()
    found = [detector.detect(f.image) for f in frames]
    detect = time.perf_counter() - t0
    crops = [_crop(f.image, d)[1] for f, dets in zip(frames, found, strict=True) for d in dets]
    embed = _embedder(_model(runtime), 32, None)
    embed(crops[:32])  # warm-up
    t0 = time.perf_counter()
    for s in range(0, len(crops), 32):
        embed(crops[s : s + 32])
    embedding = time.perf_counter() - t0
    index = work / "index"
    report = build_index(video, index, runtime=runtime, device="cpu", footage=options)
    n, c = len(frames), len(crops)
    total = detect + embedding
    rows = [("decode alone", f"{decode:.1f}", f"{n / decode:.1f}", "-", ""),
            ("detector alone", f"{detect:.1f}", f"{n / detect:.1f}", f"{c / detect:.1f}",
             f"{1000 * detect / n:.0f} ms/frame"),
            ("embedder alone", f"{embedding:.1f}", f"{n / embedding:.1f}", f"{c / embedding:.1f}", runtime),
            ("detector + embedder", f"{total:.1f}", f"{n / total:.1f}", f"{c / total:.1f}", "sum of the stages"),
            ("end to end (reid index)", f"{report.seconds:.1f}", f"{n / report.seconds:.1f}",
             f"{report.people / report.seconds:.1f}",
             f"{report.seconds / total:.2f}x the sum (target <= 1.15x); {report.seconds / max(detect, embedding):.2f}x "
             f"the slower stage")]
    print(f"{video.name}: {n} frames (stride {stride}), {c} detections alone, {report.people} people stored in "
          f"{report.tracklets} tracklets by the end-to-end run")
    return rows, index


def _iou(a, b) -> float:
    x1, y1, x2, y2 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0, x2 - x1) * max(0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def sightings(index: Path, data: Path, queries: int, runtime: str) -> list[tuple]:
    """For each identity's first query crop: is its own later sighting among the top 5 after its segment?"""
    from reid.search import Searcher
    from reid.store import Filter

    ts = build_tracklets(data, stride=1)
    gallery_boxes: dict[int, dict[int, list]] = {}
    for c in ts.gallery:
        if c.pid > 0:
            gallery_boxes.setdefault(c.pid, {}).setdefault(c.frame, []).append(c.box)
    first: dict[int, object] = {}
    last_frame: dict[int, int] = {}
    for c in ts.query:
        first.setdefault(c.pid, c)
        last_frame[c.pid] = max(last_frame.get(c.pid, c.frame), c.frame)
    pids = [p for p in sorted(first) if p in gallery_boxes][:queries]
    con = sqlite3.connect(index / "catalogue.sqlite")
    fps, start = con.execute("SELECT fps, start FROM media").fetchone()

    def shows(pid: int, rows: list[tuple]) -> bool:
        return any(_iou(box, (x1, y1, x2, y2)) >= 0.5 for f, x1, y1, x2, y2 in rows
                   for box in gallery_boxes[pid].get(f, []))

    out = []
    with Searcher.open(index, runtime=runtime, device="cpu") as s:
        for per_track in (True, False):
            found = distinct = 0
            for pid in pids:
                crop = first[pid]
                since = start + (last_frame[pid] + fps) / fps
                result = s.query([crop.path], top=5, images=[decode_image(ts.root / crop.path)],
                                 where=Filter(since=since), per_track=per_track)[0]
                hit = False
                for m in result.matches:
                    rows = con.execute("SELECT frame, x1, y1, x2, y2 FROM images WHERE source = ? AND track = ? "
                                       "AND time >= ?", (m.source, m.track, since)).fetchall() if per_track \
                        else [(m.frame, *m.box)]
                    hit = hit or shows(pid, rows)
                found += hit
                distinct += len({m.track for m in result.matches})
            out.append(("--per-track" if per_track else "--per-row", len(pids), f"{found}/{len(pids)}",
                        f"{distinct / max(len(pids), 1):.1f}"))
    return out


def synthetic_tracking(gates: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6), videos: int = 3) -> list[tuple]:
    """Tracker purity/coverage/fragmentation on synthetic videos (truth boxes, default-model embeddings,
    computed once; only the tracker runs per gate)."""
    from reid.sources.tracker import Tracker, score_tracking
    from reid.synthetic.video import write_video

    embed = _embedder(_model("onnx"), 32, None)
    worlds = []
    with tempfile.TemporaryDirectory(prefix="reid-bench-video-") as tmp:
        for seed in range(videos):
            path = Path(tmp) / f"synthetic{seed}.avi"
            truth = write_video(path, people=6, frames=80, size=(640, 360), seed=100 + seed)
            frames = []
            for f in FrameReader(path, probe(path), 0.0):
                boxes = truth.boxes[f.index]
                dets = [Detection(b.x1, b.y1, b.x2, b.y2, 1.0) for b in boxes]
                vecs = embed([_crop(f.image, d)[1] for d in dets]) if dets else np.zeros((0, 1), np.float32)
                frames.append((dets, vecs, [b.identity for b in boxes]))
            worlds.append(frames)
    out = []
    for gate in gates:
        scores = []
        for frames in worlds:
            tracker, ids, who = Tracker(max_cosine_distance=gate), [], []
            for dets, vecs, identities in frames:
                ids += tracker.update(dets, vecs)
                who += identities
            scores.append(score_tracking(ids, who))
        out.append((f"{gate:.2f}", f"{np.mean([s.purity for s in scores]):.3f}",
                    f"{np.mean([s.coverage for s in scores]):.3f}",
                    f"{np.mean([s.fragmentation for s in scores]):.2f}"))
    return out


def main(argv: list[str] | None = None) -> None:
    import torch

    torch.set_flush_denormal(True)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--stride", type=int, default=2)
    p.add_argument("--runtime", default="onnx", choices=["onnx", "openvino", "torch"])
    p.add_argument("--queries", type=int, default=12)
    p.add_argument("--skip-synthetic", action="store_true")
    p.add_argument("--index", type=Path, default=None,
                   help="answer the queries on this existing index of vtest.avi (skips the timing table)")
    args = p.parse_args(argv)
    video = fetch_vtest(args.data.expanduser())
    with tempfile.TemporaryDirectory(prefix="reid-bench-video-") as tmp:
        index = args.index
        if index is None:
            rows, index = stages(video, args.stride, args.runtime, Path(tmp))
            _table("stages and end to end", ("run", "seconds", "frames/s", "crops/s", "note"), rows)
        _table("the person's own later sighting in the top 5 (--since after the query's segment)",
               ("answers", "queries", "found in top 5", "distinct tracklets in top 5"),
               sightings(index, args.data.expanduser(), args.queries, args.runtime))
    if not args.skip_synthetic:
        print("\nscoring the tracker on synthetic videos ...", flush=True)
        _table("tracker on synthetic videos (truth boxes, default-model embeddings; 3 videos x 6 people x 80 frames)",
               ("max_cosine_distance", "purity", "coverage", "tracklets per person"), synthetic_tracking())


if __name__ == "__main__":
    main()
