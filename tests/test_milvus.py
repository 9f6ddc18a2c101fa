"""Milvus-specific behaviour of ``reid.store.milvus`` (the shared behaviour is in test_gallery_contract.py).

Server tests run on the session's real Milvus 2.3.5 standalone server (tests/milvus_server.py, loopback only);
they are skipped when the ``milvus`` package is not installed. The TLS tests (last) start a second server,
one-way TLS with a throwaway CA made by the openssl command (skipped without it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from reid.errors import GalleryBusyError, GalleryNotFoundError, StoreError
from reid.model.identity import ModelRef
from reid.store import Filter, MediaState, Record, open_gallery

pytest.importorskip("pymilvus", reason="pymilvus is not installed (pip install '.[milvus]')")

from reid.store.milvus import NULL_INT, MilvusLocation, filter_expr  # noqa: E402

DIM = 8
MODEL = ModelRef("default", "fp-milvus", DIM)


def unit(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def crop(i: int) -> Record:
    return Record(f"/g/{i:03d}.jpg", f"sha-{i}", 10 + i, 10**9 + i, i % 5, 1 + i % 2, "/g", time=100.0 + i,
                  camera=f"c{1 + i % 2}")


@pytest.fixture
def location(milvus_server, request) -> str:
    import milvus_server as ms

    return ms.location(request.node.name)


# --- no server needed ---------------------------------------------------------------------


@pytest.mark.parametrize("text", ["milvus://", "milvus://host/coll", "milvus://host:port/coll", "milvus://host:19530",
                                  "milvus://host:19530/", "milvus://host:19530/1abc", "milvus://host:19530/a-b",
                                  "milvus://host:99999/coll", "milvus://host:19530/coll/extra",
                                  "milvus://host:19530/coll?x=1", "milvus://host:19530/reid_meta"])
def test_bad_locations_are_one_line_store_errors(text):
    with pytest.raises(StoreError, match="Milvus location") as e:
        open_gallery(text)
    assert "\n" not in str(e.value)


def test_credentials_in_the_location_are_refused_without_echoing_them():
    with pytest.raises(StoreError, match="REID_MILVUS_TOKEN") as e:
        open_gallery("milvus://root:hunter2-secret@127.0.0.1:19530/coll")
    assert "hunter2" not in str(e.value)


def test_locations_parse():
    assert MilvusLocation.parse("milvus://127.0.0.1:19530/gallery_1") == MilvusLocation("127.0.0.1", 19530, "gallery_1")
    assert str(MilvusLocation.parse("milvus://[::1]:1/_g")) == "milvus://[::1]:1/_g"


def test_filters_become_expressions():
    assert filter_expr(None) == "" and filter_expr(Filter()) == ""
    assert filter_expr(Filter(cameras=set())) is None and filter_expr(Filter(camera_names={""})) is None
    assert filter_expr(Filter(cameras_excluded={2, 1})) == "camid not in [1, 2]"
    assert filter_expr(Filter(sources={'/a "b"'}, since=1, until=2.5)) == (
        'source in ["/a \\"b\\""] and time >= 1.0 and time <= 2.5')


def test_a_local_gallery_does_not_import_pymilvus(tmp_path):
    script = (f"import sys; from reid.store import open_gallery; g = open_gallery({str(tmp_path / 'g')!r}, "
              "write=True); g.close(); assert 'pymilvus' not in sys.modules and 'reid.store.milvus' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]


def test_an_unreachable_server_is_one_line_without_the_secret(monkeypatch):
    import milvus_server as ms

    [port] = ms.free_ports(1)
    monkeypatch.setenv("REID_MILVUS_TOKEN", "tok-Secret-4242")
    monkeypatch.setenv("REID_MILVUS_TIMEOUT", "2")
    with pytest.raises(StoreError) as e:
        open_gallery(f"milvus://127.0.0.1:{port}/nothing")
    text = str(e.value)
    assert f"milvus://127.0.0.1:{port}/nothing" in text and "\n" not in text and "Secret-4242" not in text


# --- on the session's server ----------------------------------------------------------------


def test_a_wrong_password_is_one_line_without_the_secret(milvus_server, monkeypatch):
    monkeypatch.setenv("REID_MILVUS_PASSWORD", "wrong-Secret-777")
    loc = f"milvus://127.0.0.1:{milvus_server.port}/whatever"
    with pytest.raises(StoreError) as e:
        open_gallery(loc, write=True)
    text = str(e.value)
    assert loc in text and "\n" not in text and "Secret-777" not in text


def test_a_token_opens_the_gallery_and_a_wrong_one_is_one_line(milvus_server, monkeypatch):
    monkeypatch.delenv("REID_MILVUS_USER", raising=False)
    monkeypatch.delenv("REID_MILVUS_PASSWORD", raising=False)
    monkeypatch.setenv("REID_MILVUS_TOKEN", "root:Milvus")  # Milvus's user:password token
    loc = f"milvus://127.0.0.1:{milvus_server.port}/token_gallery"
    with open_gallery(loc, write=True) as g:
        g.bind(MODEL)
        g.add([crop(0)], unit(1))
        assert g.count() == 1
    monkeypatch.setenv("REID_MILVUS_TOKEN", "root:wrong-Secret-999")
    with pytest.raises(StoreError) as e:
        open_gallery(loc)
    text = str(e.value)
    assert loc in text and "\n" not in text and "Secret-999" not in text


def test_read_only_opens_refuse_writes_and_missing_collections(location):
    with pytest.raises(GalleryNotFoundError):
        open_gallery(location)
    with open_gallery(location, write=True) as g:
        g.bind(MODEL)
        g.add([crop(0)], unit(1))
    state = MediaState("/v.avi", "s", 1, 1, None, None, None, None, None, None)
    with open_gallery(location) as reader:
        assert reader.count() == 1
        for write in (lambda: reader.add([crop(1)], unit(1)), lambda: reader.remove([crop(0).path]),
                      lambda: reader.bind(MODEL), lambda: reader.touch([(crop(0).path, 1, 1)]),
                      lambda: reader.save_media(state), lambda: reader.remove_media("/v.avi")):
            with pytest.raises(StoreError, match="read-only"):
                write()


def test_a_second_writer_is_refused_while_the_first_holds_the_lease(location):
    with open_gallery(location, write=True) as g:
        with pytest.raises(GalleryBusyError, match="being written by process"):
            open_gallery(location, write=True)
        g.bind(MODEL)
    with open_gallery(location, write=True) as g:  # released on close
        assert g.built_with() == MODEL


def test_deleted_rows_never_come_back(location):
    vectors = unit(20, 3)
    with open_gallery(location, write=True) as g:
        g.bind(MODEL)
        g.add([crop(i) for i in range(20)], vectors)
        for i in range(0, 20, 2):
            assert g.remove([crop(i).path]) == 1
            hits = g.search(vectors[i : i + 1], 20)[0]
            assert crop(i).path not in {h.path for h in hits}  # read right after the delete
            assert g.count() == 20 - (i // 2 + 1)
            replaced = g.add([crop(i + 1)], vectors[i : i + 1])  # a replaced row is gone as well
            assert [h.id for h in g.search(vectors[i : i + 1], 20)[0] if h.path == crop(i + 1).path] == replaced


def test_reopening_keeps_rows_model_and_never_reuses_ids(location):
    rows = [crop(i) for i in range(5)]
    blank = Record("/g/none.jpg", "sha-n", 1, 2, None, None, "/g")  # every nullable field None
    negative = Record("/g/neg.jpg", "sha-m", 1, 2, -1, 0, "/g", time=0.0, camera="x", media="/v", frame=0,
                      box=(0, 0, 0, 0), score=0.0, track=0)
    with open_gallery(location, write=True) as g:
        g.bind(MODEL, kind="flat")
        first = g.add([*rows, blank, negative], unit(7))
        g.remove([rows[4].path])
    with open_gallery(location) as g:
        assert g.built_with() == MODEL and g.count() == 6
        got = g.get(first)
        assert got == {i: r for i, r in zip(first, [*rows, blank, negative], strict=True) if r is not rows[4]}
        assert g.info()["kind"] == "flat" and g.info()["vector_kind"] == "flat"
    with open_gallery(location, write=True) as g:
        again = g.add([rows[4]], unit(1))
        assert min(again) > max(first) and NULL_INT not in again


# --- the commands, end to end --------------------------------------------------------------


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    from reid.model import ModelConfig, build_model, save_checkpoint

    config = ModelConfig(input_size=(64, 32), output_stride=32, c_a=4, c_b=4, d_x=16, d_h=8, d_att=8,
                         num_glimpses=1, embed_dim=16)
    return save_checkpoint(build_model(config, pretrained=False), tmp_path_factory.mktemp("ckpt") / "small")


def _crops(root, ids: int = 6, cams: int = 2):
    import cv2

    from reid.synthetic.render import render_person

    root.mkdir(parents=True, exist_ok=True)
    for p in range(1, ids + 1):
        for c in range(1, cams + 1):
            img = render_person(p, c, np.random.default_rng([p, c]), (128, 64))
            cv2.imwrite(str(root / f"{p:04d}_c{c}s1_{p * 10 + c:06d}_01.jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return sorted(root.glob("*.jpg"))


def _cli(*args):
    import json

    from typer.testing import CliRunner

    import cli

    result = CliRunner().invoke(cli.app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.strip().splitlines()]


def test_index_query_and_info_on_milvus_match_the_embedded_store(location, small_ckpt, tmp_path):
    files = _crops(tmp_path / "g")
    common = ("--weights", small_ckpt, "--workers", "0", "--runtime", "torch", "--json")
    milvus = _cli("index", tmp_path / "g", "--index", location, *common)[0]
    local = _cli("index", tmp_path / "g", "--index", tmp_path / "local", *common)[0]
    assert milvus["added"] == local["added"] == len(files) and milvus["rows"] == len(files)
    again = _cli("index", tmp_path / "g", "--index", location, *common)[0]
    assert (again["added"], again["unchanged"]) == (0, len(files))  # incremental, by content hash
    queries = files[:3]
    q = ("query", *queries, "--top", "10", "--runtime", "torch", "--json")
    on_milvus, on_local = _cli(*q, "--index", location), _cli(*q, "--index", tmp_path / "local")
    for a, b in zip(on_milvus, on_local, strict=True):
        assert [m["path"] for m in a["matches"]] == [m["path"] for m in b["matches"]]  # the same top-10
        assert np.allclose([m["score"] for m in a["matches"]], [m["score"] for m in b["matches"]], atol=1e-5)
    info = _cli("info", "--index", location, "--json")[0]
    assert info["rows"] == len(files) and info["index"].startswith("milvus://") and info["fingerprint"]
    from typer.testing import CliRunner

    import cli

    table = CliRunner().invoke(cli.app, ["info", "--index", location])
    assert table.exit_code == 0 and "milvus://" in table.output and str(len(files)) in table.output


def test_a_kill_9_mid_index_into_milvus_resumes_without_duplicates(location, small_ckpt, tmp_path):
    from killed_run import reid_killed_after

    files = _crops(tmp_path / "g", ids=5)
    proc = reid_killed_after("reid.store.milvus:MilvusGallery.add", 2, [
        "index", tmp_path / "g", "--index", location, "--weights", small_ckpt, "--batch-size", "3", "--workers", "0",
        "--runtime", "torch"])
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    resumed = _cli("index", tmp_path / "g", "--index", location, "--weights", small_ckpt, "--workers", "0",
                   "--runtime", "torch", "--json", "--wait", "60")[0]
    assert (resumed["added"], resumed["unchanged"], resumed["rows"]) == (len(files) - 6, 6, len(files))
    with open_gallery(location) as g:
        paths = [r.path for _, r in g.scan()]
    assert sorted(paths) == sorted(str(f) for f in files)  # every file once


def test_people_from_a_video_into_milvus_answer_per_tracklet(location, small_ckpt, tmp_path, monkeypatch):
    import cv2

    from reid.sources import detector
    from reid.sources.video import read_frame
    from reid.synthetic.video import TruthDetector, write_video

    video = tmp_path / "lobby" / "2026-12-01_14-30-00.avi"
    truth = write_video(video, people=3, frames=16, size=(320, 192), fps=10.0)
    monkeypatch.setitem(detector.DETECTORS, "truth", lambda **options: TruthDetector(truth))
    common = ("--weights", small_ckpt, "--runtime", "torch", "--detector", "truth", "--json")
    first = _cli("index", video, "--index", location, *common)[0]
    people = sum(len(b) for b in truth.boxes.values())
    assert (first["videos"], first["people"], first["rows"]) == (1, people, people)
    assert _cli("index", video, "--index", location, *common)[0]["videos_unchanged"] == 1  # progress kept in Milvus
    box = truth.boxes[8][0]
    query = tmp_path / "q.png"
    cv2.imwrite(str(query), cv2.cvtColor(read_frame(video, 8)[box.y1 : box.y2, box.x1 : box.x2], cv2.COLOR_RGB2BGR))
    [result] = _cli("query", query, "--index", location, "--runtime", "torch", "--json", "--top", "3")
    tracks = [(m["source"], m["track"]) for m in result["matches"]]
    assert len(set(tracks)) == len(tracks) == 3 and result["matches"][0]["frame"] == 8
    top = result["matches"][0]
    assert top["camera"] == "lobby" and top["first_frame"] <= 8 <= top["last_frame"] and top["rows"] >= 2


# --- on a one-way TLS server of its own (last: the module's fixture stops it at the end) ------------


def _openssl(*args: str) -> None:
    proc = subprocess.run(["openssl", *args], capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]


def _tls_files(folder: Path) -> dict[str, Path]:
    """A throwaway CA, a server certificate it signs for 127.0.0.1 / localhost (SAN) and its key, and a second
    CA that signed nothing (EC P-256, one day), made with the openssl command."""
    folder.mkdir(parents=True)
    f = {name: folder / name for name in ("ca.pem", "ca.key", "server.pem", "server.key", "other-ca.pem")}
    key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    ca = ("-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    _openssl("req", "-x509", *key, "-keyout", str(f["ca.key"]), "-out", str(f["ca.pem"]), "-days", "1",
             "-subj", "/CN=reid test CA", *ca)
    _openssl("req", "-x509", *key, "-keyout", str(folder / "other-ca.key"), "-out", str(f["other-ca.pem"]),
             "-days", "1", "-subj", "/CN=reid other CA", *ca)
    _openssl("req", "-new", *key, "-keyout", str(f["server.key"]), "-out", str(folder / "server.csr"),
             "-subj", "/CN=127.0.0.1")
    (folder / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
                                       "keyUsage=critical,digitalSignature,keyEncipherment\n"
                                       "extendedKeyUsage=serverAuth\n")
    _openssl("x509", "-req", "-in", str(folder / "server.csr"), "-CA", str(f["ca.pem"]), "-CAkey", str(f["ca.key"]),
             "-set_serial", "1", "-days", "1", "-extfile", str(folder / "server.ext"), "-out", str(f["server.pem"]))
    return f


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """A second Milvus server, one-way TLS (Milvus 2.3: common.security.tlsMode 1), for this module only;
    yields (server, the TLS files)."""
    import shutil

    import milvus_server as ms

    reason = ms.available() or (None if shutil.which("openssl") else "the openssl command is not installed")
    if reason:
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("milvus-tls")
    files = _tls_files(folder / "tls")
    server = ms.MilvusServer(folder / "server", ca=files["ca.pem"], extra={
        "common.security.tlsMode": 1, "tls.serverPemPath": files["server.pem"],
        "tls.serverKeyPath": files["server.key"], "tls.caPemPath": files["ca.pem"]})
    server.start()  # stops the server itself when it does not come up
    try:
        yield server, files
    finally:
        server.stop()


def store_and_find(location: str) -> str:
    """Open ``location`` for writing, bind, add a row, find it and count it: "ok", or the StoreError's message.
    Run by ``_in_fresh_interpreter``."""
    try:
        with open_gallery(location, write=True) as g:
            g.bind(MODEL)
            [rid] = g.add([crop(0)], unit(1))
            hits = g.search(unit(1), 1)[0]
            assert [h.id for h in hits] == [rid] and g.count() == 1 and g.get([rid]) == {rid: crop(0)}
    except StoreError as e:
        return f"StoreError: {e}"
    return "ok"


def _in_fresh_interpreter(location: str, *envs: dict[str, str]) -> list[tuple[str, float]]:
    """``store_and_find(location)`` under each environment in turn, in a new Python process: pymilvus shares one
    connection per address and credentials, whatever its TLS settings, so a connection made here (the server's
    readiness check) or by an earlier successful case would be reused. Failed connections are not kept."""
    tests = str(Path(__file__).parent)
    script = ("import json, os, sys, time; sys.path.insert(0, sys.argv[1]); import test_milvus as t\n"
              "for env in json.loads(sys.argv[3]):\n"
              "    os.environ.update(env); start = time.monotonic(); result = t.store_and_find(sys.argv[2])\n"
              "    print(json.dumps([result, time.monotonic() - start]), flush=True)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("REID_MILVUS_")}
    env |= {"REID_MILVUS_USER": "root", "REID_MILVUS_PASSWORD": "Milvus"}
    proc = subprocess.run([sys.executable, "-c", script, tests, location, json.dumps(envs)], env=env,
                          capture_output=True, timeout=180)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    return [tuple(json.loads(line)) for line in proc.stdout.decode().splitlines()]


def test_tls_with_the_ca_file_stores_and_finds_rows(tls_server):
    server, files = tls_server
    location = f"milvus://127.0.0.1:{server.port}/tls_gallery"
    [(result, _)] = _in_fresh_interpreter(location, {"REID_MILVUS_CA": str(files["ca.pem"])})
    assert result == "ok"


def test_tls_servers_refuse_plain_and_unknown_ca_clients_in_one_line(tls_server, tmp_path):
    server, files = tls_server
    location = f"milvus://127.0.0.1:{server.port}/tls_refused"
    cases = [{"REID_MILVUS_TIMEOUT": "3"}, {"REID_MILVUS_CA": str(files["other-ca.pem"])},
             {"REID_MILVUS_CA": str(tmp_path / "missing.pem")}]  # in turn: plain, a CA that signed nothing, no file
    results = _in_fresh_interpreter(location, *cases)
    assert len(results) == 3
    for result, seconds in results:
        assert result.startswith("StoreError: ") and location in result and "\n" not in result, result
        assert seconds < 20, (result, seconds)  # fails fast (REID_MILVUS_TIMEOUT 3), never hangs
    assert "missing.pem" in results[2][0]
