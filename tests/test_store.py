"""The gallery store with plain numpy vectors: catalogue, derived FAISS file, lock, kinds."""

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

from reid.errors import StoreError
from reid.store import VECTORS_NAME, GalleryStore, Record, VectorIndex, WriterLock, id_digest, resolve_kind
from reid.store import vectors as vectors_mod

DIM = 16


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def records(names, source="/g") -> list[Record]:
    return [Record(f"{source}/{n}", f"sha-{n}", 100, 1, i, 1 + i % 3, source) for i, n in enumerate(names)]


@pytest.fixture
def store(tmp_path):
    with GalleryStore.open(tmp_path / "idx", write=True) as s:
        s.bind_model(fingerprint="fp-a", source="default", dim=DIM)
        yield s


def test_search_is_exact_and_carries_row_fields(store):
    rng = np.random.default_rng(0)
    vecs = unit(rng, 50)
    ids = store.add(records([f"{i:03d}.jpg" for i in range(50)]), vecs)
    assert ids == list(range(1, 51)) and store.count() == 50
    queries = unit(rng, 3)
    hits = store.search(queries, 5)
    expected = np.argsort(-(queries @ vecs.T), axis=1)[:, :5]
    for q, row in enumerate(hits):
        assert [h.id - 1 for h in row] == expected[q].tolist()
        assert [h.score for h in row] == pytest.approx(np.sort(queries[q] @ vecs.T)[::-1][:5], abs=1e-5)
    best = store.search(vecs[7:8], 1)[0][0]
    assert (best.path, best.pid, best.camid) == ("/g/007.jpg", 7, 1 + 7 % 3)
    assert store.search(queries, 500)[0].__len__() == 50  # k larger than the gallery


def test_same_path_gets_a_new_row_and_the_old_vector_is_gone(store):
    rng = np.random.default_rng(1)
    a, b = unit(rng, 2)
    [first] = store.add(records(["x.jpg"]), a[None])
    [second] = store.add(records(["x.jpg"]), b[None])
    assert second > first and store.count() == 1
    [hit] = store.search(a[None], 5)[0]
    assert hit.id == second and hit.score == pytest.approx(float(a @ b), abs=1e-5)


def test_remove_and_counts_and_digest(store):
    rng = np.random.default_rng(2)
    store.add(records(["a.jpg", "b.jpg", "c.jpg"]), unit(rng, 3))
    assert store.remove(["/g/b.jpg", "/g/nope.jpg"]) == 1
    assert store.count() == 2
    assert int(store.meta["id_digest"]) == id_digest([1, 3]) == id_digest([3, 1])
    assert id_digest([1, 3]) != id_digest([1, 2])
    assert {h.path for h in store.search(unit(rng, 1), 10)[0]} == {"/g/a.jpg", "/g/c.jpg"}


def test_dimension_and_empty_index_errors(store):
    with pytest.raises(StoreError, match="empty"):
        store.search(np.zeros((1, DIM), np.float32), 3)
    with pytest.raises(StoreError, match="dimension 16"):
        store.add(records(["a.jpg"]), np.zeros((1, 8), np.float32))


def test_vectors_file_is_derived_saved_and_reloaded(store, tmp_path):
    rng = np.random.default_rng(3)
    vecs = unit(rng, 20)
    store.add(records([f"{i}.jpg" for i in range(20)]), vecs)
    assert store.vector_state().state == "missing"
    store.vectors()
    assert store.vector_state().state == "fresh"
    assert not [p for p in store.root.iterdir() if p.name.endswith(".tmp")]
    loaded = VectorIndex.load(store.root / VECTORS_NAME)
    assert sorted(loaded.ids().tolist()) == list(range(1, 21))


@pytest.mark.parametrize("damage", ["delete", "garbage", "truncate", "stale"])
def test_reader_repairs_a_missing_corrupt_or_stale_vectors_file(tmp_path, caplog, damage):
    rng = np.random.default_rng(4)
    vecs = unit(rng, 30)
    root = tmp_path / "idx"
    with GalleryStore.open(root, write=True) as s:
        s.bind_model(fingerprint="fp", source="default", dim=DIM)
        s.add(records([f"{i:02d}.jpg" for i in range(30)]), vecs)
        s.vectors()
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
        state = reader.vector_state().state
        assert state == {"delete": "missing", "garbage": "corrupt", "truncate": "corrupt", "stale": "stale"}[damage]
        with caplog.at_level(logging.WARNING, logger="reid.store.gallery"):
            got = reader.search(vecs[:4], 5)
        assert any(w in caplog.text for w in ("missing", "corrupt", "out of date"))
        assert reader.vector_state().state == "fresh"  # the reader saved the repaired file (lock was free)
        assert VectorIndex.load(root / VECTORS_NAME).ntotal == reader.count() == (31 if damage == "stale" else 30)
    if damage != "stale":
        assert [[h.id for h in r] for r in got] == [[h.id for h in r] for r in expected]


def test_reader_does_not_save_while_a_writer_holds_the_lock(tmp_path):
    rng = np.random.default_rng(5)
    root = tmp_path / "idx"
    with GalleryStore.open(root, write=True) as writer:
        writer.bind_model(fingerprint="fp", source="default", dim=DIM)
        writer.add(records(["a.jpg", "b.jpg"]), unit(rng, 2))
        with GalleryStore.open(root) as reader:
            assert len(reader.search(unit(rng, 1), 5)[0]) == 2  # repaired in memory
        assert not (root / VECTORS_NAME).exists()


def test_writer_lock_refuses_a_second_writer_and_names_the_holder(tmp_path):
    root = tmp_path / "idx"
    with GalleryStore.open(root, write=True):
        with pytest.raises(StoreError, match=rf"being written by process {os.getpid()}.*--wait"):
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


def test_model_binding_refuses_another_fingerprint_and_rebuild_clears(tmp_path):
    rng = np.random.default_rng(6)
    with GalleryStore.open(tmp_path / "idx", write=True) as s:
        s.bind_model(fingerprint="fp-a", source="/ckpt/a", dim=DIM)
        s.add(records(["a.jpg"]), unit(rng, 1))
        s.vectors()
        s.bind_model(fingerprint="fp-a", source="/ckpt/a-moved", dim=DIM)  # same weights elsewhere: fine
        with pytest.raises(StoreError, match=r"built with model /ckpt/a-moved.*--rebuild"):
            s.bind_model(fingerprint="fp-b", source="/ckpt/b", dim=DIM)
        s.bind_model(fingerprint="fp-b", source="/ckpt/b", dim=8, rebuild=True)
        assert s.count() == 0 and s.meta["fingerprint"] == "fp-b" and s.dim == 8
        assert not (s.root / VECTORS_NAME).exists()


def test_read_only_store_refuses_writes_and_missing_index_is_clear(tmp_path):
    with pytest.raises(StoreError, match="no index at .*reid index GALLERY --index"):
        GalleryStore.open(tmp_path / "nothing")
    GalleryStore.open(tmp_path / "idx", write=True).close()
    with GalleryStore.open(tmp_path / "idx") as r, pytest.raises(StoreError, match="read-only"):
        r.add(records(["a.jpg"]), np.zeros((1, DIM), np.float32))


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
        s.bind_model(fingerprint="fp", source="default", dim=dim, kind=kind)
        s.add(records([f"{i:05d}.jpg" for i in range(n)]), vecs)
        assert s.vectors().kind == kind
        exact = np.argsort(-(queries @ vecs.T), axis=1)[:, :10] + 1
        got = [[h.id for h in row] for row in s.search(queries, 10)]
        recall = np.mean([len(set(g) & set(e)) / 10 for g, e in zip(got, exact.tolist())])
        assert recall >= 0.9
        # Removing rows from an index kind that cannot remove in place rebuilds it.
        s.remove([f"/g/{i:05d}.jpg" for i in range(10)])
        assert s.vectors().ntotal == n - 10 and s.vector_state().state == "fresh"
        written = [[h.id for h in row] for row in s.search(queries, 10)]

    # Read back: memory-mapped (read-only buffers) and searched as it is; new rows give it buffers of its own.
    with GalleryStore.open(tmp_path / "idx") as r:
        assert r.vectors()._mapped is bool(vectors_mod._MMAP_READ)
        assert [[h.id for h in row] for row in r.search(queries, 10)] == written
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
    with GalleryStore.open(tmp_path / "idx", write=True) as w:
        w.bind_model(fingerprint="fp", source="default", dim=DIM)
        w.add(records([f"{i:02d}.jpg" for i in range(40)]), vecs)
        w.prefetch()  # a writer never prefetches
        assert w._prefetch is None
        expected = [[h.id for h in row] for row in w.search(vecs[:3], 4)]
    with GalleryStore.open(tmp_path / "idx") as r:
        r.prefetch()
        assert [[h.id for h in row] for row in r.search(vecs[:3], 4)] == expected

    def boom(path):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(VectorIndex, "load", staticmethod(boom))
    with GalleryStore.open(tmp_path / "idx") as r:
        r.prefetch()
        with pytest.raises(RuntimeError, match="disk on fire"):
            r.search(vecs[:1], 4)
