"""Keep a gallery in step with a folder of crops and footage: walk, plan what is new or changed, embed, add.

A file is looked at again only when its (path, size, mtime) changed, and re-embedded only when
its sha256 changed too; content already in the gallery (a copy, a rename) reuses its stored
embedding. Rows are committed per embedded batch, so a run killed at any point loses at most one
batch, and the next run picks up where it stopped. The gallery's derived search structures are
synced at the end. Everything here goes through the ``reid.store.Gallery`` protocol.

Video files (under the folder, or given themselves) go through ``reid.sources.footage``: people are
detected, embedded and tracked, and stored with where and when they were seen. Each video's progress
is stored with its rows (``Gallery.save_media`` after each chunk of frames), so a killed run resumes at
the first frame it had not stored, and a video read to the end is not decoded again until its content
changes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable

import numpy as np

from reid.errors import InputError
from reid.images import IMAGE_EXTENSIONS, find_images, parse_market_name
from reid.store import FileState, Gallery, MediaState, Record, open_gallery

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (images done, images to embed)
EmbedPaths = Callable[..., object]  # reid.embed.embed_paths, or a stand-in with its signature (reid.distributed)


@dataclass
class IndexReport:
    """What one indexing run did."""

    found: int = 0
    added: int = 0  # new files, embedded
    updated: int = 0  # changed files, re-embedded
    reused: int = 0  # new or changed files whose content was already embedded (copies, renames)
    unchanged: int = 0
    pruned: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    rows: int = 0  # rows in the gallery afterwards
    seconds: float = 0.0
    embed_seconds: float = 0.0
    videos: int = 0  # videos read this run (to the end, or to where they broke)
    videos_unchanged: int = 0  # read to the end before, same content
    videos_resumed: int = 0  # picked up where an interrupted run stopped
    frame_folders: int = 0  # folders of full frames read this run
    frames: int = 0  # frames processed (every --stride-th)
    people: int = 0  # people found in footage and stored (one row each)
    tracklets: int = 0  # tracklets those people were linked into
    no_people: list[str] = field(default_factory=list)  # videos read without finding anyone

    @property
    def embedded(self) -> int:
        """Images that went through the model."""
        return self.added + self.updated

    def to_dict(self) -> dict[str, object]:
        """JSON-able summary."""
        return {"found": self.found, "added": self.added, "updated": self.updated, "reused": self.reused,
                "unchanged": self.unchanged, "pruned": self.pruned, "rows": self.rows,
                "failed": [{"path": p, "reason": r} for p, r in self.failed],
                "seconds": round(self.seconds, 3), "embed_seconds": round(self.embed_seconds, 3),
                "videos": self.videos, "videos_unchanged": self.videos_unchanged,
                "videos_resumed": self.videos_resumed, "frame_folders": self.frame_folders, "frames": self.frames,
                "people": self.people,
                "tracklets": self.tracklets, "no_people": self.no_people}


@dataclass(frozen=True)
class _Todo:
    record: Record
    replaces: bool  # the path has an older row (changed content)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _reason(path: str, message: str) -> str:
    return message[len(path) + 2 :] if message.startswith(path + ": ") else message


def _plan(gallery: Gallery, root: Path, files: list[Path], report: IndexReport
          ) -> tuple[list[_Todo], list[tuple[_Todo, np.ndarray]], dict[str, FileState]]:
    """Sort files into unchanged / reusable / to embed; record stat-only changes and failures."""
    under = str(root if root.is_dir() else root.parent)
    known = gallery.states(under)
    if not root.is_dir():  # a single file: leave its neighbours alone (prune included)
        known = {p: s for p, s in known.items() if p == str(root)}
    todo: list[_Todo] = []
    touches: list[tuple[str, int, int]] = []
    for f in files:
        path = str(f)
        try:
            st = f.stat()
            old = known.get(path)
            if old is not None and old.bytes == st.st_size and old.mtime == st.st_mtime_ns:
                report.unchanged += 1
                continue
            sha = sha256_file(f)
        except OSError as e:
            report.failed.append((path, e.strerror or str(e)))
            continue
        if old is not None and old.sha256 == sha:
            touches.append((path, st.st_size, st.st_mtime_ns))
            report.unchanged += 1
            continue
        pid, camid = parse_market_name(f.name)
        rec = Record(path, sha, st.st_size, st.st_mtime_ns, pid, camid, under if root.is_dir() else path,
                     time=st.st_mtime_ns / 1e9)  # a crop file's time: when it was written
        todo.append(_Todo(rec, old is not None))
    gallery.touch(touches)
    stored = gallery.embeddings_by_sha(t.record.sha256 for t in todo)
    reuse = [(t, stored[t.record.sha256]) for t in todo if t.record.sha256 in stored]
    return [t for t in todo if t.record.sha256 not in stored], reuse, known


def index_folder(gallery: Gallery, model, folder: str | os.PathLike, *, batch_size: int = 32,
                 workers: int | None = None, device=None, prune: bool = False, progress: Progress | None = None,
                 sync: bool = True, files: list[Path] | None = None, embed: EmbedPaths | None = None) -> IndexReport:
    """Embed the new and changed images under ``folder`` into ``gallery`` (opened for writing, model bound);
    ``sync``: bring the gallery's search structures up to date at the end (a caller with more to add
    does that once itself); ``files``: the crop files under ``folder`` (default: every image there);
    ``embed``: what decodes and embeds the files to embed (default ``reid.embed.embed_paths``; it hands each
    batch to ``on_batch``, which stores it)."""
    from reid.embed import embed_paths

    t0 = time.perf_counter()
    report = IndexReport()
    root = Path(folder).expanduser().resolve()
    files = find_images(root) if files is None else files
    report.found = len(files)
    todo, reuse, known = _plan(gallery, root, files, report)

    if reuse:
        gallery.add([t.record for t, _ in reuse], np.stack([v for _, v in reuse]))
        report.reused = len(reuse)

    pending = {t.record.path: t for t in todo}
    done = 0

    def on_batch(paths: list[Path], feats: np.ndarray, failures: list[tuple[Path, str]]) -> None:
        nonlocal done
        items = [pending[str(p)] for p in paths]
        gallery.add([t.record for t in items], feats)
        for t in items:
            if t.replaces:
                report.updated += 1
            else:
                report.added += 1
        failed = [str(p) for p, _ in failures]
        # A known file that changed into something undecodable no longer belongs in the gallery.
        gallery.remove(p for p in failed if pending[p].replaces)
        report.failed.extend((str(p), _reason(str(p), r)) for p, r in failures)
        done += len(paths) + len(failures)
        if progress is not None:
            progress(done, len(todo))

    if progress is not None:
        progress(0, len(todo))
    if todo:
        t1 = time.perf_counter()
        (embed or embed_paths)(model, [Path(t.record.path) for t in todo], batch_size=batch_size, workers=workers,
                               device=device, on_batch=on_batch)
        report.embed_seconds = time.perf_counter() - t1

    if prune:
        found = {str(f) for f in files}
        report.pruned = gallery.remove(p for p in known if p not in found)

    if sync:
        _finish(gallery, report, t0)
    return report


def _finish(gallery: Gallery, report: IndexReport, t0: float) -> None:
    gallery.sync()  # bring the derived search structures up to date and make them durable
    report.rows = gallery.count()
    report.seconds = time.perf_counter() - t0
    for path, reason in report.failed:
        log.info("skipped %s: %s", path, reason)


@dataclass(frozen=True)
class FootageOptions:
    """How people are found in footage (``reid index`` options)."""

    detector: str = "ssdlite"
    score_threshold: float = 0.6  # detector score a person needs
    min_height: float = 32.0  # pixels; smaller people are too small to re-identify
    stride: int = 1  # process every n-th frame
    camera: str | None = None  # camera name for every video; default: its folder's name, else a Market name
    frames: bool | None = None  # image folders hold full frames (True), crops (False), or look (None)
    max_age: int = 30  # processed frames a lost tracklet may be picked up again
    max_cosine_distance: float = 0.5  # appearance gate of the tracker (1 - cosine); bench_video.py chose it

    def __post_init__(self) -> None:
        if self.stride < 1:
            raise InputError(f"--stride must be at least 1, not {self.stride}")


def _embedder(model, batch_size: int, device) -> Callable[[list[np.ndarray]], np.ndarray]:
    """RGB crops -> embeddings through ``reid.embed.embed_images``, the torch model's or its export's (the
    same path, and numbers, as a query's)."""
    from reid.embed import embed_images

    return lambda images: embed_images(model, images, batch_size=batch_size, device=device)


def _media_record(state: MediaState, person) -> Record:
    media = person.media or state.path  # a frame file, or the video itself
    _, camid = parse_market_name(Path(media).name)
    return Record(f"{media}#frame={person.frame}&person={person.person}", state.sha256, state.bytes, state.mtime,
                  None, camid, state.path, time=person.time, camera=state.camera, media=media, frame=person.frame,
                  box=person.box, score=person.score, track=person.track)


def _start_video(gallery: Gallery, path: Path, known: MediaState | None, options: FootageOptions,
                 report: IndexReport) -> MediaState | None:
    """The state to read ``path`` from, given its stored one (``known``): None when it is done and unchanged;
    a fresh state for a new or changed video; the stored one (its rows past the last stored frame dropped)
    to resume."""
    from reid.sources.video import camera_name, probe, start_time

    st = path.stat()
    if known is not None and known.done and (known.bytes, known.mtime) == (st.st_size, st.st_mtime_ns):
        report.videos_unchanged += 1
        return None
    sha = sha256_file(path)
    if known is not None and known.sha256 == sha:
        known = dataclasses.replace(known, bytes=st.st_size, mtime=st.st_mtime_ns)
        if known.done:  # touched, not changed
            gallery.save_media(known)
            report.videos_unchanged += 1
            return None
        gallery.remove_media(known.path, known.next_frame)  # rows stored after the last progress mark
        report.videos_resumed += 1
        return known
    if known is not None:  # new content under an old name: its old people go
        gallery.remove_media(known.path)
    info = probe(path)
    state = MediaState(str(path), sha, st.st_size, st.st_mtime_ns, camera_name(path, options.camera), info.fps,
                       info.frames, info.width, info.height, start_time(path, info))
    gallery.save_media(state)
    return state


class _Listing:
    """A running sha256 of a frames folder's sorted (name, size, mtime) entries: ``digest(n)`` covers the
    first ``n``, so a re-run can tell that the frames it already processed are still the same files."""

    def __init__(self, files: list[Path]) -> None:
        self.files, self.at, self.hash = files, 0, hashlib.sha256()

    def digest(self, n: int) -> str:
        n = min(n, len(self.files))
        if n < self.at:
            raise ValueError("a listing digest only moves forward")
        for f in self.files[self.at : n]:
            st = f.stat()
            self.hash.update(f"{f.name}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        self.at = n
        return self.hash.copy().hexdigest()


def _start_folder(gallery: Gallery, folder: Path, files: list[Path], known: MediaState | None,
                  options: FootageOptions, report: IndexReport) -> tuple[MediaState, _Listing] | None:
    """Like ``_start_video`` for a folder of full frames: frames are processed in name order, so frames
    added after a run (a camera writing on) are read on from where it stopped; a change to a frame already
    processed starts the folder over."""
    from reid.sources.video import camera_name

    listing = _Listing(files)
    if known is not None and listing.digest(known.next_frame) == known.sha256:
        if known.done and known.next_frame >= len(files):
            report.videos_unchanged += 1
            return None
        gallery.remove_media(known.path, known.next_frame)  # rows stored after the last progress mark
        if not known.done:
            report.videos_resumed += 1
        return dataclasses.replace(known, frames=len(files), done=False), listing
    if known is not None:  # a frame it had processed changed or went: start the folder over
        gallery.remove_media(known.path)
        listing = _Listing(files)
    st = folder.stat()
    state = MediaState(str(folder), listing.digest(0), 0, st.st_mtime_ns, camera_name(files[0], options.camera),
                       None, len(files), None, None, None)
    gallery.save_media(state)
    return state, listing


def _read(gallery: Gallery, state: MediaState, frames, detector, embed, options: FootageOptions, batch_size: int,
          report: IndexReport, progress: Callable[[int], None], listing: _Listing | None = None) -> MediaState:
    """Detect, embed, track and store the people of ``frames`` (a FrameReader or FolderFrames that starts at
    ``state.next_frame``), recording the progress after each stored chunk."""
    from reid.sources.footage import people_in_frames
    from reid.sources.tracker import Tracker

    tracker = Tracker(first_id=state.next_track, max_age=options.max_age,
                      max_cosine_distance=options.max_cosine_distance)
    first_track = state.next_track
    for chunk in people_in_frames(frames, detector, embed, tracker, stride=options.stride, batch_size=batch_size):
        if chunk.people:
            gallery.add([_media_record(state, p) for p in chunk.people], chunk.vectors)
        state = dataclasses.replace(state, next_frame=chunk.next_frame, next_track=chunk.next_track,
                                    people=state.people + len(chunk.people),
                                    sha256=listing.digest(chunk.next_frame) if listing else state.sha256)
        gallery.save_media(state)
        report.frames += chunk.frames
        report.people += len(chunk.people)
        progress(chunk.frames)
    if listing is not None:  # every frame file up to the end was looked at, read or not
        state = dataclasses.replace(state, next_frame=max(state.next_frame, len(listing.files)),
                                    sha256=listing.digest(len(listing.files)))
        report.failed.extend((p, _reason(p, r)) for p, r in frames.failed)
    state = dataclasses.replace(state, done=True, error=frames.stopped)
    gallery.save_media(state)
    report.tracklets += state.next_track - first_track
    return state


def _plan_footage(gallery: Gallery, videos: list[Path], folders: dict[Path, list[Path]], options: FootageOptions,
                  report: IndexReport) -> list[tuple[MediaState, object, _Listing | None]]:
    """(state, frames, listing) for every video and frames folder with frames to process; the unreadable
    ones reported."""
    from reid.errors import ReidError
    from reid.sources.video import FolderFrames, FrameReader, VideoInfo

    stored = gallery.media_states()  # once: one query for every video and folder of the run
    jobs: list[tuple[MediaState, object, _Listing | None]] = []
    for path in videos:
        try:
            state = _start_video(gallery, path, stored.get(str(path)), options, report)
        except (OSError, ReidError) as e:
            report.failed.append((str(path), _reason(str(path), getattr(e, "strerror", None) or str(e))))
            continue
        if state is not None:
            info = VideoInfo(state.fps or 25.0, state.frames or 0, state.width or 0, state.height or 0)
            jobs.append((state, FrameReader(path, info, state.start or 0.0, first=state.next_frame,
                                            stride=options.stride), None))
    for folder, files in folders.items():
        started = _start_folder(gallery, folder, files, stored.get(str(folder)), options, report)
        if started is not None:
            state, listing = started
            jobs.append((state, FolderFrames(files, first=state.next_frame, stride=options.stride), listing))
    return jobs


def index_footage(gallery: Gallery, model, videos: list[Path], *, folders: dict[Path, list[Path]] | None = None,
                  options: FootageOptions | None = None, detector=None, batch_size: int = 32, device=None,
                  report: IndexReport | None = None, progress: Progress | None = None) -> IndexReport:
    """Find, embed, track and store the people of ``videos`` and of ``folders`` (folder -> its frame files
    in order) in ``gallery`` (opened for writing, model bound).

    A video that cannot be read is reported in ``report.failed`` and the others go on; one that breaks
    part-way keeps the people found before (reported with the reason); a frame file that cannot be read
    is skipped and reported; a source without people is listed in ``report.no_people``. ``detector``
    defaults to ``options.detector`` (made only when there are frames to look at).
    """
    options = options or FootageOptions()
    report = report if report is not None else IndexReport()
    jobs = _plan_footage(gallery, videos, folders or {}, options, report)
    if jobs and detector is None:
        from reid.sources.detector import make_detector

        detector = make_detector(options.detector, score_threshold=options.score_threshold,
                                 min_height=options.min_height)
    embed = _embedder(model, batch_size, device)
    total = sum(max(0, (s.frames or 0) - s.next_frame + options.stride - 1) // options.stride for s, _, _ in jobs)
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, max(total, done))

    from reid.errors import ReidError

    for state, frames, listing in jobs:
        try:
            state = _read(gallery, state, frames, detector, embed, options, batch_size, report, advance, listing)
        except ReidError as e:  # e.g. the file went away meanwhile: its progress so far is kept for the next run
            report.failed.append((state.path, _reason(state.path, str(e))))
            continue
        if listing is None:
            report.videos += 1
        else:
            report.frame_folders += 1
        if state.error:
            report.failed.append((state.path, f"{state.error}; the {state.people} people found before it are kept"))
        if state.people == 0:
            report.no_people.append(state.path)
    return report


def _media_under(gallery: Gallery, root: Path) -> list[str]:
    prefix = str(root).rstrip("/") + "/"
    return [p for p in gallery.media_states() if p.startswith(prefix) or p == str(root)]


@dataclass
class _Sources:
    crops: list[Path]
    videos: list[Path]
    folders: dict[Path, list[Path]]  # folders of full frames -> their frame files, in name order


def _sources(root: Path, frames: bool | None) -> _Sources:
    """Sort what lies at ``root`` into crop files, videos and folders of full frames (``frames``: every image
    folder holds frames; None: those whose images look like camera frames). InputError for what is neither."""
    from reid.images import walk_files
    from reid.sources.video import VIDEO_EXTENSIONS, is_video, looks_like_frames

    if not root.exists():
        raise InputError(f"{root}: no such folder or file")
    if root.is_file():
        if is_video(root):
            return _Sources([], [root], {})
        if root.suffix.lower() in IMAGE_EXTENSIONS:
            return _Sources([root], [], {})
        raise InputError(f"{root}: not a folder, an image ({', '.join(IMAGE_EXTENSIONS)}) or a video "
                         f"({', '.join(VIDEO_EXTENSIONS)})")
    by_folder: dict[Path, list[Path]] = {}
    videos: list[Path] = []
    for f in walk_files(root, IMAGE_EXTENSIONS + VIDEO_EXTENSIONS):  # one walk of the tree for both
        if is_video(f):
            videos.append(f)
        else:
            by_folder.setdefault(f.parent, []).append(f)
    crops: list[Path] = []
    folders: dict[Path, list[Path]] = {}
    for folder, files in by_folder.items():
        if frames if frames is not None else looks_like_frames(files):
            folders[folder] = files
        else:
            crops += files
    return _Sources(crops, videos, folders)


def build_index(gallery: str | os.PathLike, index: str | os.PathLike, *, weights: str | None = None,
                batch_size: int = 32, workers: int | None = None, device: str = "auto", kind: str | None = None,
                prune: bool = False, rebuild: bool = False, wait: float = 0.0, runtime: str = "auto",
                footage: FootageOptions | None = None, progress: Progress | None = None,
                frame_progress: Progress | None = None, crop_embedder: Callable[..., EmbedPaths] | None = None
                ) -> IndexReport:
    """``reid index``: open (or create) the gallery at ``index``, check its model, and index ``gallery``: a
    folder of crops and videos, a video file or a crop file.

    ``weights=None`` uses the model the gallery was built with (the default model for a new one).
    ``runtime``: torch, or the model's export on ONNX Runtime / OpenVINO (``reid.engine``; ``auto`` takes
    the fastest on a CPU, ``engine.bulk_runtime``). The ONNX export is made, checked against torch and cached
    here, so every later ``reid query`` on this gallery runs without torch. ``footage``: how people are found in videos.
    ``progress(done, total)`` counts crop files, ``frame_progress`` video frames. ``crop_embedder(ref)``: given
    the gallery's ``ModelRef``, what decodes and embeds the crop files in place of ``reid.embed.embed_paths``
    (``reid.distributed``: Ray Data); the planning and the writes stay here, footage is read in this process.
    """
    from reid import engine
    from reid.model.identity import DEFAULT_SOURCE, ModelRef, model_source
    from reid.runtime import resolve_device

    root = Path(gallery).expanduser().resolve()
    footage = footage or FootageOptions()
    found = _sources(root, footage.frames)  # fail fast on a missing or unreadable source, before creating anything
    use_torch = engine.wants_torch(runtime, device)
    dev = resolve_device(device if use_torch else "cpu")
    with open_gallery(index, write=True, wait=wait) as store:
        built_with = store.built_with()
        source = model_source(weights) if weights is not None else (built_with.source if built_with else DEFAULT_SOURCE)
        model, ref = ModelRef.load(source, dev)
        store.bind(ref, kind=kind, rebuild=rebuild)
        if not use_torch:  # auto: the fastest runtime here, measured once per model and machine
            model = engine.bulk_embedder(model, ref.fingerprint, runtime)
        t0 = time.perf_counter()
        report = IndexReport()
        if found.crops or (prune and root.is_dir()):
            report = index_folder(store, model, root, batch_size=batch_size, workers=workers, device=dev,
                                  prune=prune, progress=progress, sync=False, files=found.crops,
                                  embed=crop_embedder(ref) if crop_embedder is not None else None)
        if found.videos or found.folders:
            if crop_embedder is not None:
                log.warning("%d videos and %d frame folders are indexed in this process: Ray embeds crop files only",
                            len(found.videos), len(found.folders))
            index_footage(store, model, found.videos, folders=found.folders, options=footage, batch_size=batch_size,
                          device=dev, report=report, progress=frame_progress)
        if prune and root.is_dir():
            kept = {str(v) for v in found.videos} | {str(f) for f in found.folders}
            for path in _media_under(store, root):
                if path not in kept:
                    report.pruned += store.remove_media(path)
        _finish(store, report, t0)
        return report
