"""The embedded gallery backend with plain numpy vectors: catalogue, schema migration, derived FAISS file,
lock, kinds, filtered search inside each kind. The backend-neutral behaviour is in test_gallery_contract.py."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from reid.errors import ModelMismatchError, StoreError
from reid.model.identity import ModelRef
from reid.store import VECTORS_NAME, Filter, GalleryStore, Record, VectorIndex, WriterLock, id_digest, resolve_kind
from reid.store import vectors as vectors_mod

DIM = 16


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def records(names, source="/g") -> list[Record]:
    return [Record(f"{source}/{n}", f"sha-{n}", 100, 1, i, 1 + i % 3, source, time=1000.0 + i)
            for i, n in enumerate(names)]


def meta(root, key: str) -> str | None:
    con = sqlite3.connect(root / "catalogue.sqlite")
    try:
        row = con.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]
    finally:
        con.close()


@pytest.fixture
def store(tmp_path):
    with GalleryStore.open(tmp_path / "idx", write=True) as s:
        s.bind(ModelRef("default", "fp-a", DIM))
        yield s


def test_remove_and_counts_and_digest(store):
    rng = np.random.default_rng(2)
    store.add(records(["a.jpg", "b.jpg", "c.jpg"]), unit(rng, 3))
    assert store.remove(["/g/b.jpg", "/g/nope.jpg"]) == 1
    assert store.count() == 2
    assert int(meta(store.root, "id_digest")) == id_digest([1, 3]) == id_digest([3, 1])
    assert id_digest([1, 3]) != id_digest([1, 2])
    assert {h.path for h in store.search(unit(rng, 1), 10)[0]} == {"/g/a.jpg", "/g/c.jpg"}


def test_vectors_file_is_derived_saved_and_reloaded(store, tmp_path):
    rng = np.random.default_rng(3)
    vecs = unit(rng, 20)
    store.add(records([f"{i}.jpg" for i in range(20)]), vecs)
    assert store.verify().state == "missing"
    assert store.sync().state == "missing"  # what it found
    assert store.verify().state == "fresh"
    assert not [p for p in store.root.iterdir() if p.name.endswith(".tmp")]
    loaded = VectorIndex.load(store.root / VECTORS_NAME)
    assert sorted(loaded.ids().tolist()) == list(range(1, 21))


@pytest.mark.parametrize("damage", ["delete", "garbage", "truncate", "stale"])
def test_reader_repairs_a_missing_corrupt_or_stale_vectors_file(tmp_path, caplog, damage):
    rng = np.random.default_rng(4)
    vecs = unit(rng, 30)
    root = tmp_path / "idx"
    with GalleryStore.open(root, write=True) as s:
        s.bind(ModelRef("default", "fp", DIM))
        s.add(records([f"{i:02d}.jpg" for i in range(30)]), vecs)
        s.sync()
        expected = s.search(vecs[:4], 5)
        path = root / VECTORS_NAME
        if damage == "delete":
            path.unlink()
        elif damage == "garbage":
            path.write_bytes(b"not a faiss index" * 100)
        elif damage == "truncate":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        else:  # rows committed after the file was written (e.g. a run killed before its final save)
            s.add(records(["late.jpg"]), unit(rng, 1))
    with GalleryStore.open(root) as reader:
        state = reader.verify().state
        assert state == {"delete": "missing", "garbage": "corrupt", "truncate": "corrupt", "stale": "stale"}[damage]
        with caplog.at_level(logging.WARNING, logger="reid.store.local"):
            got = reader.search(vecs[:4], 5)
        assert any(w in caplog.text for w in ("missing", "corrupt", "out of date"))
        assert reader.verify().state == "fresh"  # the reader saved the repaired file (lock was free)
        assert VectorIndex.load(root / VECTORS_NAME).ntotal == reader.count() == (31 if damage == "stale" else 30)
    if damage != "stale":
        assert [[h.id for h in r] for r in got] == [[h.id for h in r] for r in expected]


def test_reader_does_not_save_while_a_writer_holds_the_lock(tmp_path):
    rng = np.random.default_rng(5)
    root = tmp_path / "idx"
    with GalleryStore.open(root, write=True) as writer:
        writer.bind(ModelRef("default", "fp", DIM))
        writer.add(records(["a.jpg", "b.jpg"]), unit(rng, 2))
        with GalleryStore.open(root) as reader:
            assert len(reader.search(unit(rng, 1), 5)[0]) == 2  # repaired in memory
        assert not (root / VECTORS_NAME).exists()


def test_writer_lock_refuses_a_second_writer_and_names_the_holder(tmp_path):
    root = tmp_path / "idx"
    with GalleryStore.open(root, write=True):
        with pytest.raises(StoreError, match=rf"being written by process {os.getpid()}; wait for it to finish$"):
            GalleryStore.open(root, write=True)
        with pytest.raises(StoreError, match="after waiting 0.3 s"):
            GalleryStore.open(root, write=True, wait=0.3)
        with GalleryStore.open(root) as reader:  # readers are never blocked
            assert reader.count() == 0
    GalleryStore.open(root, write=True).close()  # released on close


def test_lock_dies_with_a_killed_holder(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        from reid.store import WriterLock
        lock = WriterLock({str(tmp_path)!r}); lock.acquire()
        print("locked", flush=True); time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        assert not WriterLock(tmp_path).try_acquire()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        lock = WriterLock(tmp_path)
        assert lock.try_acquire()
        lock.release()
    finally:
        proc.kill()


def test_a_rebuild_with_another_model_drops_the_vectors_file(tmp_path):
    with GalleryStore.open(tmp_path / "idx", write=True) as s:
        s.bind(ModelRef("/ckpt/a", "fp-a", DIM))
        s.add(records(["a.jpg"]), unit(np.random.default_rng(6), 1))
        s.sync()
        s.bind(ModelRef("/ckpt/a-moved", "fp-a", DIM))  # same weights elsewhere: the rows stay
        assert s.count() == 1 and meta(s.root, "model_source") == "/ckpt/a-moved"
        assert (s.root / VECTORS_NAME).exists()
        with pytest.raises(ModelMismatchError, match=r"built with the model /ckpt/a-moved .*not with /ckpt/b"):
            s.bind(ModelRef("/ckpt/b", "fp-b", DIM))
        s.bind(ModelRef("/ckpt/b", "fp-b", 8), rebuild=True)
        assert s.count() == 0 and meta(s.root, "dim") == "8" and not (s.root / VECTORS_NAME).exists()


def test_a_catalogue_that_is_not_sqlite_is_a_store_error(tmp_path):
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "catalogue.sqlite").write_bytes(b"\x00garbage" * 1000)
    with pytest.raises(StoreError, match="not a readable index catalogue"):
        GalleryStore.open(tmp_path / "idx")


def test_rows_are_plain_sqlite(store):
    store.add(records(["a.jpg"]), unit(np.random.default_rng(7), 1))
    con = sqlite3.connect(store.root / "catalogue.sqlite")
    path, blob = con.execute("SELECT path, embedding FROM images").fetchone()
    assert path == "/g/a.jpg" and len(blob) == 4 * DIM
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()


def test_resolve_kind():
    assert resolve_kind("auto", 10) == "flat"
    assert resolve_kind("auto", vectors_mod.AUTO_ANN_ROWS) == vectors_mod.AUTO_ANN_KIND
    assert resolve_kind("hnsw", 10) == "hnsw"
    assert resolve_kind("ivfpq", 100) == "flat"  # too few rows to train
    with pytest.raises(StoreError, match="unknown index kind"):
        resolve_kind("lsh", 10)


def clustered(rng, n, dim, clusters):
    centres = unit(rng, clusters, dim)
    v = centres[rng.integers(0, clusters, n)] + 0.35 * rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_approximate_kinds_find_the_exact_neighbours(tmp_path, kind, monkeypatch):
    monkeypatch.setattr(vectors_mod, "IVFPQ_MIN_ROWS", 2000)
    rng = np.random.default_rng(8)
    n, dim = 4000, 32
    vecs = clustered(rng, n, dim, 100)
    queries = clustered(rng, 20, dim, 100)
    with GalleryStore.open(tmp_path / "idx", write=True) as s:
        s.bind(ModelRef("default", "fp", dim), kind=kind)
        s.add(records([f"{i:05d}.jpg" for i in range(n)]), vecs)
        s.sync()
        assert s.info()["vector_kind"] == kind
        exact = np.argsort(-(queries @ vecs.T), axis=1)[:, :10] + 1
        got = [[h.id for h in row] for row in s.search(queries, 10)]
        recall = np.mean([len(set(g) & set(e)) / 10 for g, e in zip(got, exact.tolist(), strict=True)])
        assert recall >= 0.9
        # Removing rows from an index kind that cannot remove in place rebuilds it.
        s.remove([f"/g/{i:05d}.jpg" for i in range(10)])
        s.sync()
        assert VectorIndex.load(tmp_path / "idx" / VECTORS_NAME).ntotal == n - 10 and s.verify().state == "fresh"
        written = [[h.id for h in row] for row in s.search(queries, 10)]

        # Filters inside the approximate search: FAISS's selector for a large subset, exact scoring of a small one.
        monkeypatch.setattr(vectors_mod, "ANN_EXACT_MAX", 500)
        kept = np.arange(10, n)  # row i has id i + 1, camera 1 + i % 3, identity i
        for f, rows in ((Filter(cameras_excluded={1}), kept[kept % 3 != 0]),  # 2,660 rows: selector
                        (Filter(pids=range(100, 400, 3)), np.arange(100, 400, 3))):  # 100 rows: exact
            want = rows[np.argsort(-(queries @ vecs[rows].T), axis=1)[:, :10]] + 1
            hits = s.search(queries, 10, f)
            assert all(len(row) == 10 for row in hits)
            got = [[h.id for h in row] for row in hits]
            assert all(set(g) <= set((rows + 1).tolist()) for g in got)
            recall = np.mean([len(set(g) & set(e)) / 10 for g, e in zip(got, want.tolist(), strict=True)])
            assert recall >= (0.9 if len(rows) > 500 else 1.0), (f, recall)
        filtered = [[h.id for h in row] for row in s.search(queries, 10, Filter(cameras_excluded={1}))]

    # Read back: memory-mapped (read-only buffers) and searched as it is; new rows give it buffers of its own.
    with GalleryStore.open(tmp_path / "idx") as r:
        assert r._index()._mapped is bool(vectors_mod._MMAP_READ)
        assert [[h.id for h in row] for row in r.search(queries, 10)] == written
        assert [[h.id for h in row] for row in r.search(queries, 10, Filter(cameras_excluded={1}))] == filtered
    vi = VectorIndex.load(tmp_path / "idx" / VECTORS_NAME)
    before = vi.search(queries, 10)[1]
    vi.add(np.array([99_999]), queries[:1])
    assert not vi._mapped and vi.ntotal == n - 9 and vi.search(queries[:1], 1)[1][0, 0] == 99_999
    (tmp_path / "idx" / VECTORS_NAME).unlink()  # the added-to copy no longer needs the file
    assert (vi.search(queries[1:], 10)[1] == before[1:]).mean() > 0.9


def test_a_killed_save_leaves_no_temporary_file_behind(tmp_path):
    root = tmp_path / "idx"
    root.mkdir()
    (root / f".{VECTORS_NAME}.12345.tmp").write_bytes(b"half a file")
    GalleryStore.open(root, write=True).close()
    assert not list(root.glob("*.tmp")) and not list(root.glob(".*.tmp"))


def test_flat_rows_grow_shrink_and_round_trip_through_the_faiss_file(tmp_path):
    import faiss

    rng = np.random.default_rng(11)
    vecs, queries = unit(rng, 3000, 32), unit(rng, 5, 32)
    ids = np.arange(10, 3010)
    vi = VectorIndex.empty("flat", 32)
    for s in range(0, 3000, 700):  # several growths of the buffer
        vi.add(ids[s : s + 700], vecs[s : s + 700])
    gone = ids[::3]
    assert vi.remove(gone) and vi.ntotal == 2000
    kept = ~np.isin(ids, gone)
    assert (vi.ids() == ids[kept]).all() and vi.digest() == id_digest(ids[kept])

    reference = faiss.IndexFlatIP(32)
    reference.add(vecs[kept])
    ref_s, ref_pos = reference.search(queries, 7)
    scores, found = vi.search(queries, 7)
    assert (found == ids[kept][ref_pos]).all() and np.allclose(scores, ref_s, atol=1e-5)

    vi.save(tmp_path / VECTORS_NAME)
    loaded = VectorIndex.load(tmp_path / VECTORS_NAME)  # memory-mapped until searched twice
    assert loaded.kind == "flat" and loaded.ntotal == 2000 and loaded.digest() == vi.digest()
    mapped_s, mapped_i = loaded.search(queries, 7)  # FAISS's scan over the mapped file
    assert loaded._rows is None and np.array_equal(mapped_i, found) and np.allclose(mapped_s, scores, atol=1e-5)
    copied_s, copied_i = loaded.search(queries, 7)  # now over a NumPy copy
    assert loaded._rows is not None and np.array_equal(copied_i, found) and np.allclose(copied_s, scores, atol=1e-5)
    loaded.add(np.array([5000]), queries[:1])  # a loaded index grows like a new one
    assert loaded.search(queries[:1], 1)[1][0, 0] == 5000
    (tmp_path / VECTORS_NAME).unlink()  # its rows live in its own memory now
    assert loaded.ntotal == 2001 and loaded.search(queries[1:2], 7)[1][0].tolist() == found[1].tolist()


@pytest.mark.gpu
def test_flat_search_on_gpu_matches_cpu():
    import faiss

    if faiss.get_num_gpus() == 0:
        pytest.skip("this FAISS build sees no GPU")
    rng = np.random.default_rng(9)
    vecs, queries = unit(rng, 5000, 64), unit(rng, vectors_mod.GPU_MIN_QUERIES, 64)
    vi = VectorIndex.empty("flat", 64)
    vi.add(np.arange(100, 5100), vecs)
    vi.search(queries[:1], 10)
    assert vi._gpu is None  # a single query stays on the CPU
    gpu_s, gpu_i = vi.search(queries, 10)
    assert vi._gpu is not None
    cpu_s, cpu_i = vi._search_flat_cpu(queries, 10)
    assert (gpu_i == cpu_i).all() and np.allclose(gpu_s, cpu_s, atol=1e-4)


def test_ivf_lists_follow_the_gallery_size():
    vi = VectorIndex.empty("ivfpq", DIM, 20_000)
    assert vi.nlist == vectors_mod.ivf_lists(20_000) == 128
    assert vi.train_size() == 128 * vectors_mod.IVFPQ_TRAIN_PER_LIST
    assert not vi.outgrown(40_000) and vi.outgrown(400_000)  # re-trained once lists should be 4x more
    assert vectors_mod.ivf_lists(1_000_000) == 1024
    assert not VectorIndex.empty("flat", DIM).outgrown(10**9)


def test_prefetch_loads_vectors_in_the_background_and_reraises_its_errors(tmp_path, monkeypatch):
    rng = np.random.default_rng(10)
    vecs = unit(rng, 40)
    with GalleryStore.open(tmp_path / "idx", write=True, prefetch=True) as w:
        assert w._prefetch is None  # a writer never prefetches
        w.bind(ModelRef("default", "fp", DIM))
        w.add(records([f"{i:02d}.jpg" for i in range(40)]), vecs)
        expected = [[h.id for h in row] for row in w.search(vecs[:3], 4)]
    with GalleryStore.open(tmp_path / "idx", prefetch=True) as r:
        assert r._prefetch is not None
        assert [[h.id for h in row] for row in r.search(vecs[:3], 4)] == expected

    def boom(path):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(VectorIndex, "load", staticmethod(boom))
    with GalleryStore.open(tmp_path / "idx", prefetch=True) as r, pytest.raises(RuntimeError, match="disk on fire"):
        r.search(vecs[:1], 4)


@pytest.mark.parametrize("order", ["ascending", "shuffled"])
def test_flat_filters_on_every_search_path(tmp_path, order):
    """The mapped file (FAISS + selector), NumPy rows with most rows kept (-inf mask), with few kept (gather)."""
    rng = np.random.default_rng(12)
    vecs, queries = unit(rng, 3000, 32), unit(rng, 3, 32)
    ids = np.arange(10, 3010) if order == "ascending" else rng.permutation(3000) + 10
    vi = VectorIndex.empty("flat", 32)
    vi.add(ids, vecs)
    vi.save(tmp_path / VECTORS_NAME)

    def brute(keep_ids, k):
        ok = np.isin(ids, keep_ids)
        sims = queries @ vecs[ok].T
        return ids[ok][np.argsort(-sims, axis=1)[:, :k]], -np.sort(-sims, axis=1)[:, :k]

    many, few = ids[ids % 4 != 0], ids[ids % 50 == 0]
    assert (vi.mask(ids[ids % 4 == 0], dropped=True) == np.isin(ids, many)).all()
    assert (vi.mask(np.append(few, [1, 99_999])) == np.isin(ids, few)).all()  # ids it does not hold: ignored
    mapped = VectorIndex.load(tmp_path / VECTORS_NAME)
    for index in (mapped, vi, vi):  # the first search of the loaded file scans the mapped file
        for keep_ids in (many, few):
            want_i, want_s = brute(keep_ids, 7)
            got_s, got_i = index.search(queries, 7, index.mask(keep_ids))
            assert np.array_equal(got_i, want_i) and np.allclose(got_s, want_s, atol=1e-5)
    assert mapped._rows is not None  # later searches copied the rows into NumPy
    assert vi.search(queries, 500, vi.mask(few))[1].shape == (3, len(few))  # k beyond what passes
    assert vi.search(queries, 5, vi.mask(np.array([], np.int64)))[1].shape == (3, 0)


V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE images (id INTEGER PRIMARY KEY AUTOINCREMENT, path TEXT NOT NULL UNIQUE, sha256 TEXT NOT NULL,
    bytes INTEGER NOT NULL, mtime INTEGER NOT NULL, pid INTEGER, camid INTEGER, source TEXT NOT NULL,
    added_at TEXT NOT NULL, embedding BLOB NOT NULL);
CREATE INDEX images_sha256 ON images(sha256);
"""


def test_a_version_1_catalogue_is_upgraded_on_open(tmp_path, caplog):
    root = tmp_path / "idx"
    root.mkdir()
    vecs = unit(np.random.default_rng(13), 6)
    con = sqlite3.connect(root / "catalogue.sqlite")
    con.executescript(V1_SCHEMA)
    con.executemany("INSERT INTO images(path, sha256, bytes, mtime, pid, camid, source, added_at, embedding)"
                    " VALUES (?, ?, 1, ?, ?, ?, '/g', 'then', ?)",
                    [(f"/g/{i}.jpg", f"s{i}", (1_700_000_000 + 60 * i) * 10**9, i, 1 + i % 2, vecs[i].tobytes())
                     for i in range(6)])
    con.executemany("INSERT INTO meta VALUES (?, ?)", [
        ("schema_version", "1"), ("rows", "6"), ("id_digest", str(id_digest(range(1, 7)))), ("fingerprint", "fp"),
        ("model_source", "default"), ("dim", str(DIM)), ("kind", "auto"), ("metric", "inner_product")])
    con.commit()
    con.close()
    old = VectorIndex.empty("flat", DIM)
    old.add(np.arange(1, 7), vecs)
    old.save(root / VECTORS_NAME)

    with caplog.at_level(logging.WARNING), GalleryStore.open(root) as g:  # a reader upgrades it too
        assert "from schema 1 to 3" in caplog.text
        assert g.info()["schema_version"] == 3 and g.verify().state == "fresh"  # same rows: vectors.faiss stays
        records = list(g.get(range(1, 7)).values())
        assert [r.time for r in records] == [1_700_000_000.0 + 60 * i for i in range(6)]
        assert [r.camera for r in records] == [f"c{1 + i % 2}" for i in range(6)]  # v3: the camera by name
        assert g.count(Filter(camera_names={"c2"})) == 3 and g.media_states() == {}
        assert all(r.media is None and r.box is None and r.tracklet is None for r in records)
        since = Filter(since=1_700_000_000 + 150)
        assert g.count(since) == 3
        assert sorted(h.id for h in g.search(vecs[:1], 6, since)[0]) == [4, 5, 6]
    con = sqlite3.connect(root / "catalogue.sqlite")
    indexes = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    con.close()
    assert {"images_camid", "images_pid", "images_source", "images_time", "images_camera", "images_footage"} <= indexes
    caplog.clear()
    GalleryStore.open(root).close()
    assert "upgrading" not in caplog.text  # once


def test_a_catalogue_from_a_newer_reid_is_refused(store):
    con = sqlite3.connect(store.root / "catalogue.sqlite")
    con.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match="schema version 99 is newer than this reid reads"):
        GalleryStore.open(store.root)


def test_locations_pick_the_backend(tmp_path):
    from reid.store import open_gallery

    with open_gallery(f"file://{tmp_path / 'idx'}", write=True) as g:
        assert isinstance(g, GalleryStore) and g.location == str(tmp_path / "idx")
    with pytest.raises(StoreError, match="no gallery backend for s3:// locations"):
        open_gallery("s3://bucket/reid")
