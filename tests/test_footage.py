"""`reid index VIDEO` and `reid query` on footage, end to end: synthetic videos with ground truth, the
detector swapped for the truth (the real detector has its own tests), a tiny checkpoint."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

import cli
from reid.model import ModelConfig, build_model, save_checkpoint
from reid.sources import detector as detectors
from reid.sources.video import FrameReader, probe, read_frame, time_in_name
from reid.store import open_gallery
from reid.synthetic.video import TruthDetector, write_video

SMALL = ModelConfig(input_size=(64, 32), output_stride=32, c_a=4, c_b=4, d_x=16, d_h=8, d_att=8, num_glimpses=1,
                    embed_dim=16)
START = dt.datetime(2026, 12, 1, 14, 30, tzinfo=dt.timezone.utc).timestamp()
NAME = "2026-12-01_14-30-00.avi"
runner = CliRunner()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return save_checkpoint(build_model(SMALL, pretrained=False), tmp_path_factory.mktemp("ckpt") / "small")


class Counting(TruthDetector):
    """The truth detector, counting the frames it was shown (to see what a re-run decodes)."""

    seen: list[int] = []

    def detect_frames(self, frames):
        Counting.seen += [f.index for f in frames]
        return super().detect_frames(frames)


@pytest.fixture
def truth_detector(monkeypatch):
    """Register a `truth` detector that answers with the ground truth of whichever synthetic video it is shown."""
    truths: dict[tuple[int, int], object] = {}

    class ByFrameSize(Counting):
        def __init__(self, **_options):
            pass

        def detect_frames(self, frames):
            self.truth = truths[tuple(frames[0].image.shape[1::-1])]
            return super().detect_frames(frames)

    Counting.seen = []
    monkeypatch.setitem(detectors.DETECTORS, "truth", ByFrameSize)
    return truths


def make_video(path: Path, truths: dict, *, size=(320, 192), frames: int = 24, people: int = 3, seed: int = 0):
    truth = write_video(path, people=people, frames=frames, size=size, fps=10.0, seed=seed)
    truths[size] = truth
    return truth


def run(*args):
    return runner.invoke(cli.app, [str(a) for a in args])


def index(source, idx, ckpt, *extra):
    result = run("index", source, "--index", idx, "--weights", ckpt, "--runtime", "torch", "--detector", "truth",
                 "--json", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.output.strip().splitlines()[-1])


def footage_rows(idx: Path) -> list[tuple]:
    with sqlite3.connect(idx / "catalogue.sqlite") as con:
        return con.execute("SELECT media, frame, x1, y1, x2, y2, score, track, time, camera, path FROM images "
                           "WHERE media IS NOT NULL ORDER BY frame, path").fetchall()


def truth_count(truth) -> int:
    return sum(len(b) for b in truth.boxes.values())


def test_time_in_names_and_reader_basics(tmp_path):
    assert time_in_name(NAME) == START
    assert time_in_name("cam2_20261201T143000.mp4") == START
    assert time_in_name("lobby.mp4") is None and time_in_name("2026-13-45_99-00-00.avi") is None
    from reid.sources.video import camera_name

    assert camera_name("/f/lobby/0001_c3s1_000001_00.mp4") == "lobby"  # the folder first, as recorders lay it out
    assert camera_name("/0001_c3s1_000001_00.mp4") == "c3" and camera_name("/f/lobby/x.mp4", "gate") == "gate"
    truth = write_video(tmp_path / "v.avi", people=1, frames=9, size=(128, 96))
    info = probe(tmp_path / "v.avi")
    assert (info.frames, info.width, info.height, info.fps) == (9, 128, 96, 10.0)
    frames = list(FrameReader(tmp_path / "v.avi", info, 100.0, first=2, stride=3))
    assert [f.index for f in frames] == [2, 5, 8] and [f.time for f in frames] == [100.2, 100.5, 100.8]
    assert frames[0].image.shape == (96, 128, 3) and truth.frames == 9
    assert np.abs(read_frame(tmp_path / "v.avi", 5).astype(int) - frames[1].image).max() == 0


def test_people_in_a_video_are_stored_with_where_and_when(tmp_path, ckpt, truth_detector):
    video = tmp_path / "footage" / "lobby" / NAME
    truth = make_video(video, truth_detector)
    idx = tmp_path / "idx"
    report = index(tmp_path / "footage", idx, ckpt)
    n = truth_count(truth)
    assert (report["videos"], report["frames"], report["people"], report["rows"]) == (1, 24, n, n)
    assert report["failed"] == [] and report["no_people"] == []
    rows = footage_rows(idx)
    assert len(rows) == n
    for media, frame, x1, y1, x2, y2, score, track, when, camera, path in rows:
        assert media == str(video.resolve()) and camera == "lobby" and score == 1.0 and track >= 1
        assert when == pytest.approx(START + frame / 10.0)
        assert (x1, y1, x2, y2) in {(b.x1, b.y1, b.x2, b.y2) for b in truth.boxes[frame]}
        assert path.startswith(media + f"#frame={frame}&person=")
    # One tracklet per person, nearly: the tracker linked the walks.
    assert 3 <= report["tracklets"] <= 6


def test_query_answers_per_tracklet_with_time_span_and_filters(tmp_path, ckpt, truth_detector):
    video = tmp_path / "cams" / "lobby" / NAME
    truth = make_video(video, truth_detector)
    idx = tmp_path / "idx"
    index(video, idx, ckpt)
    box = truth.boxes[12][0]
    query = tmp_path / "q.png"
    cv2.imwrite(str(query), cv2.cvtColor(read_frame(video, 12)[box.y1 : box.y2, box.x1 : box.x2], cv2.COLOR_RGB2BGR))

    def matches(*extra) -> list[dict]:
        result = run("query", query, "--index", idx, "--runtime", "torch", "--json", "--top", "3", *extra)
        assert result.exit_code == 0, result.output
        return json.loads(result.output)["matches"]

    best = matches()
    tracks = [(m["media"], m["track"]) for m in best]
    assert len(set(tracks)) == len(tracks) == 3  # three different sightings, not three frames of one walk
    top = best[0]
    assert top["frame"] == 12 and top["box"] == [box.x1, box.y1, box.x2, box.y2] and top["camera"] == "lobby"
    assert top["score"] == pytest.approx(1.0, abs=1e-5) and top["time"] == pytest.approx(START + 1.2)
    assert top["first_frame"] <= 12 <= top["last_frame"] and top["rows"] >= 2
    assert top["first_time"] == pytest.approx(START + top["first_frame"] / 10)
    per_row = matches("--per-row")
    assert len({(m["media"], m["track"]) for m in per_row}) < 3  # neighbouring frames of the same walk
    assert matches("--camera", "garage") == [] and len(matches("--camera", "lobby")) == 3
    assert matches("--since", "2026-12-01T14:31:00") == []
    late = matches("--since", "2026-12-01T14:30:01.5")
    assert late and all(m["time"] >= START + 1.5 for m in late)
    assert all(m["time"] <= START + 0.5 for m in matches("--until", str(START + 0.5)))
    bad = run("query", query, "--index", idx, "--since", "yesterday")
    assert bad.exit_code == 1 and "not a date-time" in bad.output
    table = run("query", query, "--index", idx, "--runtime", "torch", "--top", "2")
    assert table.exit_code == 0 and "2026-12-01 14:30" in table.output and "track" in table.output
    picture = tmp_path / "seen.png"
    saved = run("query", query, "--index", idx, "--runtime", "torch", "--top", "2", "--save", picture)
    assert saved.exit_code == 0, saved.output
    image = cv2.imread(str(picture))
    assert image is not None and image.shape[0] >= 192


def test_a_processed_video_is_not_decoded_again(tmp_path, ckpt, truth_detector):
    video = tmp_path / "g" / NAME
    make_video(video, truth_detector, frames=12)
    idx = tmp_path / "idx"
    first = index(video, idx, ckpt)
    assert first["videos"] == 1 and len(Counting.seen) == 12
    Counting.seen = []
    again = index(tmp_path / "g", idx, ckpt)
    assert (again["videos"], again["videos_unchanged"], again["rows"]) == (0, 1, first["rows"])
    assert Counting.seen == []
    video.touch()  # new mtime, same content: hashed, not decoded
    assert index(video, idx, ckpt)["videos_unchanged"] == 1 and Counting.seen == []


def test_a_killed_run_resumes_where_it_stopped(tmp_path, ckpt, truth_detector, monkeypatch):
    video = tmp_path / "g" / NAME
    make_video(video, truth_detector, frames=40)
    clean = tmp_path / "clean"
    index(video, clean, ckpt, "--batch-size", "4")
    want = [r[:8] for r in footage_rows(clean)]

    from reid.store.catalogue import Catalogue

    real_add, calls = Catalogue.add, []

    def crash(self, records, vectors):
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C after the third stored chunk
        calls.append(len(records))
        return real_add(self, records, vectors)

    monkeypatch.setattr(Catalogue, "add", crash)
    idx = tmp_path / "idx"
    killed = run("index", video, "--index", idx, "--weights", ckpt, "--runtime", "torch", "--detector", "truth",
                 "--batch-size", "4")
    assert killed.exit_code != 0
    assert 0 < len(footage_rows(idx)) < len(want)
    monkeypatch.setattr(Catalogue, "add", real_add)
    Counting.seen = []
    resumed = index(video, idx, ckpt, "--batch-size", "4")
    assert resumed["videos_resumed"] == 1 and resumed["rows"] == len(want)
    assert min(Counting.seen) > 0  # the frames stored before the kill were not decoded again
    got = footage_rows(idx)
    assert [(r[0], r[1], *r[2:7]) for r in got] == [(r[0], r[1], *r[2:7]) for r in want]  # same people, no twins
    with open_gallery(idx) as g:
        assert g.verify().state == "fresh" and g.media_states()[str(video.resolve())].done


def test_corrupt_truncated_and_empty_videos_are_reported(tmp_path, ckpt, truth_detector):
    folder = tmp_path / "g"
    make_video(folder / "good.avi", truth_detector, frames=10)
    (folder / "garbage.mp4").write_bytes(np.random.default_rng(0).bytes(20_000))
    make_video(tmp_path / "whole.avi", truth_detector, size=(256, 160), frames=40, people=2, seed=1)
    data = (tmp_path / "whole.avi").read_bytes()
    (folder / "cut.avi").write_bytes(data[: len(data) // 2])
    make_video(folder / "nobody.avi", truth_detector, size=(192, 128), frames=6, people=0)
    report = index(folder, tmp_path / "idx", ckpt)
    failed = {Path(f["path"]).name: f["reason"] for f in report["failed"]}
    assert set(failed) == {"garbage.mp4", "cut.avi"}
    assert "cannot open" in failed["garbage.mp4"] or "no frame" in failed["garbage.mp4"]
    assert "truncated" in failed["cut.avi"] and "people found before it are kept" in failed["cut.avi"]
    assert [Path(p).name for p in report["no_people"]] == ["nobody.avi"]
    assert report["videos"] == 3 and report["people"] > 0
    text = run("index", folder, "--index", tmp_path / "idx", "--weights", ckpt, "--runtime", "torch",
               "--detector", "truth")
    assert text.exit_code == 0 and "garbage.mp4" in text.output  # reported again: it still cannot be read


def test_prune_drops_the_people_of_a_video_that_is_gone(tmp_path, ckpt, truth_detector):
    folder = tmp_path / "g"
    make_video(folder / "a.avi", truth_detector, frames=6)
    make_video(folder / "b.avi", truth_detector, size=(256, 160), frames=6, seed=2)
    idx = tmp_path / "idx"
    both = index(folder, idx, ckpt)
    (folder / "b.avi").unlink()
    pruned = index(folder, idx, ckpt, "--prune")
    assert pruned["pruned"] > 0 and pruned["rows"] == both["rows"] - pruned["pruned"]
    with open_gallery(idx) as g:
        assert list(g.media_states()) == [str((folder / "a.avi").resolve())]


def test_unknown_detector_and_bad_source_are_one_line_errors(tmp_path, ckpt):
    make_video(tmp_path / "v.avi", {}, frames=3)
    result = run("index", tmp_path / "v.avi", "--index", tmp_path / "idx", "--weights", ckpt, "--detector", "nope")
    assert result.exit_code == 1 and "unknown detector 'nope'" in result.output
    (tmp_path / "notes.txt").write_text("hello")
    result = run("index", tmp_path / "notes.txt", "--index", tmp_path / "idx", "--weights", ckpt)
    assert result.exit_code == 1 and "not a folder, an image" in result.output


def write_frames(folder: Path, video: Path, names) -> list[Path]:
    """The frames of ``video`` as image files named by ``names(i)``."""
    folder.mkdir(parents=True, exist_ok=True)
    cap, out, i = cv2.VideoCapture(str(video)), [], 0
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        out.append(folder / names(i))
        assert cv2.imwrite(str(out[-1]), bgr)
        i += 1
    cap.release()
    return out


def test_a_folder_of_full_frames_is_read_like_a_video(tmp_path, ckpt, truth_detector):
    truth = make_video(tmp_path / "v.avi", truth_detector, size=(512, 288), frames=15)
    stamp = dt.datetime(2026, 12, 1, 9, 0, tzinfo=dt.timezone.utc)
    names = lambda i: f"{(stamp + dt.timedelta(seconds=i)).strftime('%Y%m%d_%H%M%S')}.jpg"  # noqa: E731
    gate = tmp_path / "g" / "gate"
    gate.mkdir(parents=True)
    every = write_frames(tmp_path / "all", tmp_path / "v.avi", names)
    files = [f.rename(gate / f.name) for f in every[:12]]
    files[4].write_bytes(b"not a jpeg")  # a broken frame: skipped, reported
    idx = tmp_path / "idx"
    report = index(tmp_path / "g", idx, ckpt)  # landscape, 512 wide: taken for frames without --frames
    assert (report["frame_folders"], report["frames"], report["found"]) == (1, 11, 0)
    assert [Path(f["path"]).name for f in report["failed"]] == [files[4].name]
    assert report["people"] == sum(len(truth.boxes[i]) for i in range(12) if i != 4)
    rows = footage_rows(idx)
    assert {r[0] for r in rows} == {str(f.resolve()) for i, f in enumerate(files) if i != 4}  # media: the frame file
    assert all(r[9] == "gate" and r[8] == stamp.timestamp() + r[1] for r in rows)  # camera, time from the name
    with sqlite3.connect(idx / "catalogue.sqlite") as con:
        assert {r[0] for r in con.execute("SELECT source FROM images")} == {str((tmp_path / "g" / "gate").resolve())}
    assert report["tracklets"] <= 2 * len(truth.identities)
    # A camera writing on: new frames are read on from where the last run stopped, old ones not again.
    for f in every[12:]:
        f.rename(gate / f.name)
    Counting.seen = []
    again = index(tmp_path / "g", idx, ckpt)
    assert again["frames"] == 3 and sorted(Counting.seen) == [12, 13, 14]
    assert index(tmp_path / "g", idx, ckpt)["videos_unchanged"] == 1
    # With --crops the same images are crops: embedded whole, no detector.
    crops = index(tmp_path / "g", tmp_path / "idx2", ckpt, "--crops")
    assert (crops["added"], crops["frames"], len(crops["failed"])) == (14, 0, 1)


def test_adapt_learns_from_an_index_of_footage_with_tracklets_as_must_links(tmp_path, ckpt, truth_detector,
                                                                            monkeypatch):
    from reid.train import pseudo_labels
    from reid.train.adapt import AdaptConfig, adapt

    video = tmp_path / "g" / "lobby" / NAME
    make_video(video, truth_detector, frames=16)
    (tmp_path / "g" / "lobby" / "0001_c1s1_000001_00.jpg").write_bytes(cv2.imencode(".jpg", np.full(
        (64, 32, 3), 90, np.uint8))[1].tobytes())  # a crop file beside the video: adapted on too
    idx = tmp_path / "idx"
    report = index(tmp_path / "g", idx, ckpt)
    seen = {}
    real = pseudo_labels.cluster_features

    def spy(features, **options):
        seen["tracklets"] = options["tracklets"]
        seen["n"] = len(features)
        return real(features, **options)

    monkeypatch.setattr(pseudo_labels, "cluster_features", spy)
    config = AdaptConfig(epochs=1, batch_p=4, batch_k=2, views=2, k1=4, k2=2, min_samples=2, eps=0.7)
    start = save_checkpoint(build_model(SMALL), tmp_path / "imagenet")  # real stream maps (random ones underflow)
    result = adapt(idx, tmp_path / "run", weights=start, config=config, device="cpu")
    assert result.crops == seen["n"] == report["rows"] and result.failed == []
    tracklets = seen["tracklets"]
    assert (tracklets == -1).sum() == 1  # the crop file belongs to no tracklet
    assert len(set(tracklets[tracklets >= 0].tolist())) == report["tracklets"]
    from reid.model import load_checkpoint

    assert load_checkpoint(result.checkpoint).config == SMALL


def test_a_video_that_breaks_while_read_is_reported_and_the_others_go_on(tmp_path, ckpt, truth_detector,
                                                                         monkeypatch):
    from reid.sources import video as video_mod

    folder = tmp_path / "g"
    make_video(folder / "a.avi", truth_detector, frames=6)
    make_video(folder / "b.avi", truth_detector, size=(256, 160), frames=6, seed=2)
    real = video_mod.FrameReader.__iter__

    def gone(self):
        if self.path.name == "a.avi":
            raise video_mod.VideoError(f"{self.path}: no such video file")
        yield from real(self)

    monkeypatch.setattr(video_mod.FrameReader, "__iter__", gone)
    report = index(folder, tmp_path / "idx", ckpt)
    assert [Path(f["path"]).name for f in report["failed"]] == ["a.avi"] and report["videos"] == 1
    monkeypatch.setattr(video_mod.FrameReader, "__iter__", real)
    again = index(folder, tmp_path / "idx", ckpt)  # its progress was kept: read now, the other one skipped
    assert (again["videos"], again["videos_unchanged"], again["failed"]) == (1, 1, [])


def test_a_kill_9_mid_video_resumes_with_exactly_the_clean_runs_people(tmp_path, ckpt, truth_detector):
    from killed_run import reid_killed_after

    from reid.synthetic.video import truth_path

    video = tmp_path / "g" / NAME
    truth = make_video(video, truth_detector, frames=40)
    truth.save(truth_path(video))
    clean = tmp_path / "clean"
    index(video, clean, ckpt, "--batch-size", "4")
    idx = tmp_path / "idx"
    setup = f"""
        from reid.sources import detector
        from reid.synthetic.video import TruthDetector, VideoTruth
        truth = VideoTruth.load({str(truth_path(video))!r})
        detector.DETECTORS["truth"] = lambda **options: TruthDetector(truth)
    """
    # Killed after the third chunk's rows were stored, before its progress mark.
    proc = reid_killed_after("reid.store.catalogue:Catalogue.add", 3, [
        "index", video, "--index", idx, "--weights", ckpt, "--runtime", "torch", "--detector", "truth",
        "--batch-size", "4"], setup=setup)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert 0 < len(footage_rows(idx)) < len(footage_rows(clean))
    resumed = index(video, idx, ckpt, "--batch-size", "4")
    assert resumed["videos_resumed"] == 1
    assert [r[:7] for r in footage_rows(idx)] == [r[:7] for r in footage_rows(clean)]  # no twins, nothing lost
