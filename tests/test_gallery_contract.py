"""The contract of the ``reid.store.Gallery`` protocol, run on every backend.

A backend joins by adding one location factory to ``BACKENDS`` (``tmp_path -> location string``,
skipping when its server cannot be reached); every test below then runs on it too. The tests use
only ``open_gallery`` and the protocol's methods.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from reid.errors import EmptyGalleryError, GalleryNotFoundError, ModelMismatchError, StoreError
from reid.model.identity import ModelRef
from reid.store import FileState, Filter, Gallery, Hit, MediaState, Record, Tracklet, open_gallery

DIM = 16
MODEL = ModelRef("default", "fp-contract", DIM)
N = 60


def _local(tmp_path) -> str:
    return str(tmp_path / "gallery")


def _milvus(tmp_path) -> str:
    """A new collection on the session's Milvus server (tests/milvus_server.py), which starts on first use."""
    import milvus_server

    reason = milvus_server.available()
    if reason:
        pytest.skip(reason)
    return milvus_server.location(tmp_path.name)


BACKENDS = [pytest.param(_local, id="local"), pytest.param(_milvus, id="milvus")]


@pytest.fixture(params=BACKENDS)
def location(request, tmp_path) -> str:
    return request.param(tmp_path)


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def row(i: int) -> Record:
    """Row i: identity i % 7, camera 1 + i % 3 (none for every tenth), two sources, time 1000 + i (none for every
    tenth)."""
    blank = i % 10 == 9
    source = "/g1" if i < N // 2 else "/g2"
    return Record(f"{source}/{i:03d}.jpg", f"sha-{i}", 100 + i, 10**9 + i, i % 7, None if blank else 1 + i % 3,
                  source, time=None if blank else 1000.0 + i, camera=None if blank else f"c{1 + i % 3}")


ROWS = [row(i) for i in range(N)]
VECTORS = unit(np.random.default_rng(0), N)
QUERIES = unit(np.random.default_rng(1), 4)


@pytest.fixture
def gallery(location):
    with open_gallery(location, write=True) as g:
        g.bind(MODEL)
        yield g


@pytest.fixture
def filled(gallery):
    ids = gallery.add(ROWS, VECTORS)
    return gallery, dict(zip(ids, range(N), strict=True))  # id -> row number


def allows(f: Filter, r: Record) -> bool:
    """The meaning of a Filter, by brute force."""
    return ((not f.cameras_excluded or r.camid not in f.cameras_excluded)
            and (f.cameras is None or r.camid in f.cameras)
            and (f.sources is None or r.source in f.sources)
            and (f.pids is None or r.pid in f.pids)
            and (f.since is None or (r.time is not None and r.time >= f.since))
            and (f.until is None or (r.time is not None and r.time <= f.until))
            and (f.camera_names is None or r.camera in f.camera_names))


NO_FILTER = Filter()  # frozen; a module-level default rather than a call in the signature (B008)


def expected_top(q: np.ndarray, k: int, f: Filter = NO_FILTER) -> list[int]:
    """Row numbers of the exact top-k among the rows ``f`` lets through."""
    ok = np.array([allows(f, r) for r in ROWS])
    order = np.argsort(-(VECTORS @ q))
    return [int(i) for i in order if ok[i]][:k]


def test_the_embedded_store_implements_the_protocol(gallery):
    assert isinstance(gallery, Gallery) and isinstance(gallery.location, str)


def test_a_new_gallery_knows_its_model_and_refuses_another(location):
    with open_gallery(location, write=True) as g:
        assert g.built_with() is None and g.count() == 0
        g.bind(MODEL)
        assert g.built_with() == MODEL
        with pytest.raises(EmptyGalleryError):
            g.search(QUERIES, 3)
        g.add(ROWS[:3], VECTORS[:3])
        other = ModelRef("/ckpt/other", "fp-other", 8)
        with pytest.raises(ModelMismatchError) as e:
            g.bind(other)
        assert e.value.built_with == MODEL and e.value.given == other
        g.bind(MODEL)  # the same model again is fine
        g.bind(other, rebuild=True)  # drops every row
        assert g.built_with() == other and g.count() == 0
    with open_gallery(location) as g:  # stored with the gallery
        assert g.built_with() == other


def test_add_get_count_and_exact_search(filled):
    g, rownum = filled
    assert g.count() == N and len(rownum) == N
    assert g.get(list(rownum)[:5] + [10**9]) == {i: ROWS[rownum[i]] for i in list(rownum)[:5]}
    hits = g.search(QUERIES, 5)
    assert len(hits) == len(QUERIES)
    for q, found in zip(QUERIES, hits, strict=True):
        assert all(isinstance(h, Hit) for h in found)
        assert [rownum[h.id] for h in found] == expected_top(q, 5)
        assert [h.score for h in found] == pytest.approx(np.sort(VECTORS @ q)[::-1][:5].tolist(), abs=1e-5)
        assert [h.record for h in found] == [ROWS[rownum[h.id]] for h in found]
    assert len(g.search(QUERIES[:1], N + 50)[0]) == N  # k beyond the gallery
    with pytest.raises(StoreError, match="dimension"):
        g.add(ROWS[:1], np.zeros((1, DIM // 2), np.float32))
    with pytest.raises(StoreError, match="dimension"):
        g.search(np.zeros((1, DIM // 2), np.float32), 3)


def test_same_path_replaces_its_row_and_remove_deletes(filled):
    g, rownum = filled
    new = unit(np.random.default_rng(5), 1)
    [rid] = g.add([ROWS[0]], new)
    assert rid not in rownum and g.count() == N  # a new row id, the old row gone
    [top] = g.search(new, 1)[0]
    assert top.id == rid and top.score == pytest.approx(1.0, abs=1e-5)
    assert all(h.id != next(i for i, n in rownum.items() if n == 0) for h in g.search(VECTORS[:1], N)[0])
    assert g.remove([ROWS[1].path, ROWS[2].path, "/nowhere.jpg"]) == 2
    assert g.count() == N - 2
    assert {h.path for h in g.search(QUERIES[:1], N)[0]} == {r.path for r in ROWS} - {ROWS[1].path, ROWS[2].path}


FILTERS = {
    "other cameras": Filter(cameras_excluded={1}),
    "two cameras excluded": Filter(cameras_excluded={1, 2}),
    "one camera": Filter(cameras={2}),
    "source": Filter(sources={"/g2"}),
    "since": Filter(since=1040.0),
    "until": Filter(until=1012.5),
    "time range": Filter(since=1010.0, until=1030.0),
    "identity": Filter(pids={3}),
    "camera names": Filter(camera_names={"c2", "c9"}),
    "identities, other cameras": Filter(pids={3, 5}, cameras_excluded={1}),
    "everything at once": Filter(cameras_excluded={3}, sources={"/g1", "/g2"}, since=1001, until=1050, pids={0, 1, 2}),
    "nothing passes": Filter(cameras=set()),
}


@pytest.mark.parametrize("name", FILTERS)
def test_each_filter_is_applied_inside_the_search(filled, name):
    g, rownum = filled
    f = FILTERS[name]
    passing = sum(allows(f, r) for r in ROWS)
    assert g.count(f) == passing
    for k in (1, 5, N):
        hits = g.search(QUERIES, k, f)
        for q, found in zip(QUERIES, hits, strict=True):
            assert [rownum[h.id] for h in found] == expected_top(q, k, f)  # k hits whenever k rows pass
            assert len(found) == min(k, passing) and all(allows(f, h.record) for h in found)


def test_each_query_can_have_its_own_filter(filled):
    g, rownum = filled
    filters = [FILTERS["other cameras"], Filter(), FILTERS["identity"], FILTERS["other cameras"]]
    hits = g.search(QUERIES, 4, filters)
    for q, f, found in zip(QUERIES, filters, hits, strict=True):
        assert [rownum[h.id] for h in found] == expected_top(q, 4, f)
    with pytest.raises(ValueError, match="filters for"):
        g.search(QUERIES, 4, filters[:2])


def test_file_states_touch_and_reuse_by_content(filled):
    g, rownum = filled
    states = g.states("/g1")
    assert set(states) == {r.path for r in ROWS if r.source == "/g1"}
    first = states[ROWS[0].path]
    assert isinstance(first, FileState) and (first.sha256, first.bytes, first.mtime) == ("sha-0", 100, 10**9)
    assert rownum[first.id] == 0
    assert set(g.states()) == {r.path for r in ROWS} and g.states("/g") == {}  # a folder, not a prefix
    g.touch([(ROWS[0].path, 555, 123)])
    assert (g.states("/g1")[ROWS[0].path].bytes, g.states("/g1")[ROWS[0].path].mtime) == (555, 123)
    reuse = g.embeddings_by_sha(["sha-4", "sha-nope"])
    assert set(reuse) == {"sha-4"} and np.allclose(reuse["sha-4"], VECTORS[4])


def test_sync_verify_and_info(filled, location):
    g, _ = filled
    g.sync()
    assert g.verify().state == "fresh"
    info = g.info()
    assert {"index", "rows", "dim", "fingerprint", "model_source", "kind", "vector_kind", "vectors"} <= set(info)
    assert (info["rows"], info["dim"], info["fingerprint"], info["model_source"], info["vectors"]) == (
        N, DIM, MODEL.fingerprint, MODEL.source, "fresh")


def test_read_only_refuses_writes_and_a_missing_gallery_is_clear(filled, location, tmp_path):
    with pytest.raises(GalleryNotFoundError, match="no index at"):
        open_gallery(_local(tmp_path / "nothing-here"))
    with open_gallery(location) as reader:  # while the writer holds the gallery open
        assert reader.count() == N
        for write in (lambda: reader.add(ROWS[:1], VECTORS[:1]), lambda: reader.remove([ROWS[0].path]),
                      lambda: reader.bind(MODEL), lambda: reader.touch([(ROWS[0].path, 1, 1)])):
            with pytest.raises(StoreError, match="read-only"):
                write()


def test_reopen_after_a_crash_keeps_every_committed_row(location):
    """A writer killed (SIGKILL) after two committed batches, with derived state synced after the first only."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        import numpy as np
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_gallery_contract import MODEL, ROWS, VECTORS
        from reid.store import open_gallery
        g = open_gallery({location!r}, write=True)
        g.bind(MODEL)
        g.add(ROWS[:40], VECTORS[:40])
        g.sync()
        g.add(ROWS[40:], VECTORS[40:])
        g.remove([ROWS[0].path])
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    with open_gallery(location) as g:
        assert g.built_with() == MODEL and g.count() == N - 1
        assert g.verify().state != "fresh"  # the last batch never reached the derived state
        hits = g.search(VECTORS[45:46], 1)[0]  # searching repairs it
        assert hits[0].path == ROWS[45].path and hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert ROWS[0].path not in {h.path for h in g.search(VECTORS[:1], N)[0]}
    with open_gallery(location, write=True) as g:  # the dead writer's lock is gone
        g.sync()
        assert g.verify().state == "fresh" and g.count() == N - 1


def test_filters_are_values():
    a = Filter(cameras_excluded=[1, 2], pids=(3,))
    assert a == Filter(cameras_excluded={2, 1}, pids={3}) and hash(a) == hash(Filter(cameras_excluded={1, 2}, pids=[3]))
    assert Filter().is_empty and not a.is_empty
    assert Filter(cameras_excluded={1}).only_excludes and not a.only_excludes
    assert a.excluding_cameras([4]).cameras_excluded == {1, 2, 4}


VIDEO = "/footage/lobby.avi"


def seen(frame: int, person: int, track: int) -> Record:
    """Person ``person`` of frame ``frame`` of VIDEO (10 fps from t=5000), on tracklet ``track``."""
    return Record(f"{VIDEO}#frame={frame}&person={person}", "sha-video", 4096, 7, None, None, VIDEO,
                  time=5000.0 + frame / 10, camera="lobby", media=VIDEO, frame=frame,
                  box=(10 * person, 20, 10 * person + 40, 120), score=0.5 + person / 10, track=track)


def test_footage_rows_progress_and_tracklets(gallery):
    people = [seen(f, p, 1 + p) for f in range(0, 20, 2) for p in range(2)]
    gallery.add(people, unit(np.random.default_rng(2), len(people)))
    gallery.add(ROWS[:3], VECTORS[:3])
    state = MediaState(VIDEO, "sha-video", 4096, 7, "lobby", 10.0, 20, 640, 480, 5000.0, next_frame=20, next_track=3,
                       people=len(people), done=True)
    gallery.save_media(state)
    assert gallery.media_states() == {VIDEO: state}
    stored = {r.path: r for r in gallery.get(range(1, 100)).values()}
    assert stored[people[5].path] == people[5]  # every provenance field comes back
    assert people[5].tracklet == (VIDEO, people[5].track) and ROWS[0].tracklet is None
    assert VIDEO not in gallery.states() and set(gallery.states()) == {r.path for r in ROWS[:3]}  # crop files only
    assert gallery.embeddings_by_sha(["sha-video"]) == {}  # a crop of a video is not a copy of a file
    assert gallery.count(Filter(camera_names={"lobby"})) == len(people)
    spans = gallery.tracklets([(VIDEO, 1), (VIDEO, 2), (VIDEO, 99)])
    assert spans == {(VIDEO, 1): Tracklet(5000.0, 5001.8, 0, 18, 10), (VIDEO, 2): Tracklet(5000.0, 5001.8, 0, 18, 10)}
    # Resume: the rows from frame 10 on go (they were stored after the last progress mark), the rest stay.
    assert gallery.remove_media(VIDEO, 10) == 10 and gallery.count() == 13
    assert gallery.media_states() == {VIDEO: state}
    assert gallery.remove_media(VIDEO) == 10 and gallery.media_states() == {} and gallery.count() == 3
