"""`reid index / query / info / demo` end to end through the Typer app, with a tiny checkpoint."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

import cli
from reid.synthetic.render import render_person
from reid.model import ModelConfig, build_model, save_checkpoint
from reid.store import VECTORS_NAME, VectorIndex, WriterLock, open_gallery
from killed_run import reid_killed_after

SMALL = ModelConfig(input_size=(64, 32), output_stride=32, c_a=4, c_b=4, d_x=16, d_h=8, d_att=8, num_glimpses=1,
                    embed_dim=16)
runner = CliRunner()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return save_checkpoint(build_model(SMALL, pretrained=False), tmp_path_factory.mktemp("ckpt") / "small")


@pytest.fixture(scope="module")
def other_ckpt(tmp_path_factory) -> Path:
    return save_checkpoint(build_model(SMALL.replace(seed=1), pretrained=False), tmp_path_factory.mktemp("ckpt") / "b")


def person(pid: int, camid: int, seed: int = 0) -> np.ndarray:
    return render_person(pid, camid, np.random.default_rng([seed, pid, camid]), (128, 64))


def write_jpg(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


def make_gallery(root: Path, ids: int = 3, cams: int = 2) -> list[Path]:
    """ids x cams Market-named crops, some in a sub-folder."""
    return [write_jpg(root / (f"cam{c}" if c > 1 else "") / f"{p:04d}_c{c}s1_{p * 10 + c:06d}_01.jpg", person(p, c))
            for p in range(1, ids + 1) for c in range(1, cams + 1)]


def run(*args: str, env: dict | None = None):
    return runner.invoke(cli.app, [str(a) for a in args], env=env)


def index(gallery, idx, ckpt, *extra):
    return run("index", gallery, "--index", idx, "--weights", ckpt, "--workers", "0", "--json", *extra)


def summary(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def one_line_error(result, *fragments: str) -> str:
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def rows(idx: Path) -> list[tuple]:
    con = sqlite3.connect(idx / "catalogue.sqlite")
    try:
        return con.execute("SELECT id, path, sha256, pid, camid FROM images ORDER BY path").fetchall()
    finally:
        con.close()


# --- index ---------------------------------------------------------------------------------------


def test_index_then_second_run_embeds_nothing(tmp_path, ckpt, monkeypatch):
    files = make_gallery(tmp_path / "g")
    idx = tmp_path / "idx"
    first = summary(run("index", tmp_path / "g", "--index", idx, "--weights", ckpt, "--workers", "2", "--json"))
    assert (first["added"], first["unchanged"], first["rows"], first["failed"]) == (6, 0, 6, [])
    stored = rows(idx)
    assert [r[1] for r in stored] == sorted(str(f.resolve()) for f in files)
    assert {(r[3], r[4]) for r in stored} == {(p, c) for p in (1, 2, 3) for c in (1, 2)}

    import reid.embed

    calls = []
    monkeypatch.setattr(reid.embed, "embed_paths", lambda *a, **k: calls.append(a))
    second = summary(index(tmp_path / "g", idx, ckpt))
    assert (second["added"], second["updated"], second["unchanged"], second["rows"]) == (0, 0, 6, 6)
    assert calls == [] and rows(idx) == stored

    # The table form states the same counts.
    text = run("index", tmp_path / "g", "--index", idx, "--weights", ckpt, "--workers", "0")
    assert text.exit_code == 0 and "added 0, updated 0, reused 0, unchanged 6, pruned 0, failed 0" in text.stdout


def test_changed_file_is_re_embedded_and_touched_file_is_not(tmp_path, ckpt):
    files = make_gallery(tmp_path / "g")
    idx = tmp_path / "idx"
    summary(index(tmp_path / "g", idx, ckpt))
    before = {r[1]: r for r in rows(idx)}

    write_jpg(files[0], person(9, 1))  # new content
    st = files[1].stat()
    os.utime(files[1], ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # same content, new mtime
    got = summary(index(tmp_path / "g", idx, ckpt))
    assert (got["added"], got["updated"], got["unchanged"], got["rows"]) == (0, 1, 5, 6)
    after = {r[1]: r for r in rows(idx)}
    changed = str(files[0].resolve())
    assert after[changed][0] > max(r[0] for r in before.values())  # a new row id
    assert after[changed][2] != before[changed][2]
    assert after[str(files[1].resolve())] == before[str(files[1].resolve())]

    # A copy of an indexed file is added without the model (its embedding is reused).
    (tmp_path / "g" / "copy").mkdir()
    (tmp_path / "g" / "copy" / files[2].name).write_bytes(files[2].read_bytes())
    got = summary(index(tmp_path / "g", idx, ckpt))
    assert (got["added"], got["reused"], got["rows"]) == (0, 1, 7)


def test_prune_removes_rows_of_files_that_are_gone(tmp_path, ckpt):
    files = make_gallery(tmp_path / "g")
    other = make_gallery(tmp_path / "other", ids=1)
    idx = tmp_path / "idx"
    summary(index(tmp_path / "g", idx, ckpt))
    summary(index(tmp_path / "other", idx, ckpt))
    files[0].unlink()
    kept = summary(index(tmp_path / "g", idx, ckpt))
    assert (kept["pruned"], kept["rows"]) == (0, 8)
    pruned = summary(index(tmp_path / "g", idx, ckpt, "--prune"))
    assert (pruned["pruned"], pruned["rows"]) == (1, 7)
    paths = {r[1] for r in rows(idx)}
    assert str(files[0].resolve()) not in paths
    assert {str(f.resolve()) for f in other} <= paths  # another gallery's rows are not touched
    with open_gallery(idx) as s:
        assert s.verify().state == "fresh" and VectorIndex.load(idx / VECTORS_NAME).ntotal == 7


def test_resume_after_a_crash_mid_run(tmp_path, ckpt, monkeypatch):
    make_gallery(tmp_path / "g", ids=4)
    idx = tmp_path / "idx"
    from reid.store.catalogue import Catalogue

    real_add, calls = Catalogue.add, []

    def crash_after_first_batch(self, records, vectors):
        if calls:
            raise RuntimeError("simulated crash")
        calls.append(len(records))
        return real_add(self, records, vectors)

    monkeypatch.setattr(Catalogue, "add", crash_after_first_batch)
    crashed = index(tmp_path / "g", idx, ckpt, "--batch-size", "3")
    assert crashed.exit_code != 0 and isinstance(crashed.exception, RuntimeError)
    assert calls == [3] and len(rows(idx)) == 3
    monkeypatch.setattr(Catalogue, "add", real_add)

    resumed = summary(index(tmp_path / "g", idx, ckpt, "--batch-size", "3"))
    assert (resumed["added"], resumed["unchanged"], resumed["rows"]) == (5, 3, 8)
    stored = rows(idx)
    assert len({r[1] for r in stored}) == len(stored) == 8
    with open_gallery(idx) as s:
        assert s.verify().state == "fresh"


def test_resume_after_kill_9(tmp_path, ckpt):
    """A real `kill -9` in the middle of the run (after the second committed batch)."""
    make_gallery(tmp_path / "g", ids=4)
    idx = tmp_path / "idx"
    proc = reid_killed_after("reid.store.catalogue:Catalogue.add", 2, [
        "index", tmp_path / "g", "--index", idx, "--weights", ckpt, "--batch-size", "2", "--workers", "1"],
        timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert len(rows(idx)) == 4
    resumed = summary(index(tmp_path / "g", idx, ckpt))
    assert (resumed["added"], resumed["unchanged"], resumed["rows"]) == (4, 4, 8)
    with open_gallery(idx) as s:
        assert s.verify().state == "fresh" and VectorIndex.load(idx / VECTORS_NAME).ntotal == 8


def test_bad_files_are_reported_and_skipped_convertible_ones_indexed(tmp_path, ckpt):
    g = tmp_path / "g"
    make_gallery(g, ids=1, cams=1)
    (g / "zero.jpg").write_bytes(b"")
    good = cv2.imencode(".jpg", person(2, 1))[1].tobytes()
    (g / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (g / "notes.png").write_text("this is not an image")
    (g / "broken_link.jpg").symlink_to(g / "nowhere.jpg")
    gray = cv2.cvtColor(person(3, 1), cv2.COLOR_RGB2GRAY)
    cv2.imwrite(str(g / "gray.png"), gray)
    rgba = np.dstack([person(4, 1), np.full((128, 64), 200, np.uint8)])
    cv2.imwrite(str(g / "rgba.png"), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    cv2.imwrite(str(g / "deep16.png"), (person(5, 1).astype(np.uint16) * 257)[:, :, ::-1])
    cv2.imwrite(str(g / "HUGE.JPG"), cv2.resize(person(6, 1), (1500, 3000)))
    expected_failures = {"zero.jpg": "empty", "truncated.jpg": "truncated", "notes.png": "not",
                         "broken_link.jpg": "No such file"}
    if os.geteuid() != 0:  # root reads anything: the permission case needs a normal user
        write_jpg(g / "secret.jpg", person(7, 1)).chmod(0)
        expected_failures["secret.jpg"] = "ermission denied"

    got = summary(index(g, tmp_path / "idx", ckpt))
    reasons = {Path(f["path"]).name: f["reason"] for f in got["failed"]}
    assert set(reasons) == set(expected_failures)
    for name, word in expected_failures.items():
        assert word in reasons[name], (name, reasons[name])
    assert got["added"] == 5 and got["rows"] == 5  # the crop + gray, RGBA, 16-bit and huge (converted)

    text = run("index", g, "--index", tmp_path / "idx", "--weights", ckpt, "--workers", "0")
    assert text.exit_code == 0
    assert f"failed {len(expected_failures)}" in text.stdout
    assert "zero.jpg: empty file" in text.stdout


def test_a_second_writer_is_refused(tmp_path, ckpt):
    make_gallery(tmp_path / "g", ids=1)
    idx = tmp_path / "idx"
    idx.mkdir()
    lock = WriterLock(idx)
    lock.acquire()
    try:
        one_line_error(index(tmp_path / "g", idx, ckpt), "being written by process", "--wait")
        one_line_error(index(tmp_path / "g", idx, ckpt, "--wait", "0.2"), "after waiting 0.2 s")
    finally:
        lock.release()
    assert summary(index(tmp_path / "g", idx, ckpt))["added"] == 2


def test_an_index_of_another_model_is_refused_until_rebuild(tmp_path, ckpt, other_ckpt):
    make_gallery(tmp_path / "g", ids=2)
    idx = tmp_path / "idx"
    summary(index(tmp_path / "g", idx, ckpt))
    one_line_error(index(tmp_path / "g", idx, other_ckpt), "was built with the model", "--rebuild")
    rebuilt = summary(index(tmp_path / "g", idx, other_ckpt, "--rebuild"))
    assert (rebuilt["added"], rebuilt["rows"]) == (4, 4)
    # Without --weights, the index keeps using its own model.
    assert summary(run("index", tmp_path / "g", "--index", idx, "--workers", "0", "--json"))["unchanged"] == 4


def test_missing_gallery_is_one_line(tmp_path, ckpt):
    one_line_error(index(tmp_path / "nope", tmp_path / "idx", ckpt), "no such folder")
    assert not (tmp_path / "idx").exists()


# --- query ---------------------------------------------------------------------------------------


@pytest.fixture
def built(tmp_path, ckpt):
    files = make_gallery(tmp_path / "g", ids=3, cams=3)
    summary(index(tmp_path / "g", tmp_path / "idx", ckpt))
    return files, tmp_path / "idx"


def test_query_json_lines_parse_and_rank_the_image_itself_first(built, tmp_path):
    files, idx = built
    res = run("query", files[0], files[4], "--index", idx, "--json", "--top", "4")
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 2
    docs = [json.loads(ln) for ln in lines]
    assert [d["query"] for d in docs] == [str(files[0]), str(files[4])]
    for d, f in zip(docs, (files[0], files[4]), strict=True):
        assert [m["rank"] for m in d["matches"]] == [1, 2, 3, 4]
        assert set(d["matches"][0]) == {"rank", "score", "path", "camid", "pid"}
        assert d["matches"][0]["path"] == str(f.resolve()) and d["matches"][0]["score"] > 0.999
        scores = [m["score"] for m in d["matches"]]
        assert scores == sorted(scores, reverse=True)
    assert docs[0]["matches"][0]["pid"] == 1 and docs[0]["matches"][0]["camid"] == 1

    some = run("query", files[0], "--index", idx, "--json", "--min-score", "0.9999")
    assert [m["rank"] for m in json.loads(some.stdout)["matches"]] == [1]


def test_fused_query_ranks_by_the_mean_embedding_of_the_crops(built, tmp_path):
    files, idx = built
    res = run("query", files[0], files[1], "--index", idx, "--json", "--top", "5", "--fuse")
    assert res.exit_code == 0, res.output
    [doc] = [json.loads(line) for line in res.stdout.splitlines()]
    assert doc["query"] == [str(files[0]), str(files[1])]
    con = sqlite3.connect(idx / "catalogue.sqlite")
    stored = {p: np.frombuffer(b, "<f4") for p, b in con.execute("SELECT path, embedding FROM images")}
    con.close()
    mean = stored[str(files[0].resolve())] + stored[str(files[1].resolve())]
    mean /= np.linalg.norm(mean)
    expected = sorted((float(v @ mean) for v in stored.values()), reverse=True)[:5]
    assert [m["score"] for m in doc["matches"]] == pytest.approx(expected, abs=1e-5)
    for m in doc["matches"]:  # each score is its crop's cosine to the mean (the two query crops tie)
        assert m["score"] == pytest.approx(float(stored[m["path"]] @ mean), abs=1e-5)
    assert {m["path"] for m in doc["matches"][:2]} == {str(files[0].resolve()), str(files[1].resolve())}

    table = run("query", files[0], files[1], "--index", idx, "--top", "3", "--fuse", "--save", tmp_path / "f.jpg")
    assert table.exit_code == 0, table.output
    assert "2 crops of one person" in table.stdout and "(identity 1)" in table.stdout
    from reid.viz import rank_grid_shape

    assert cv2.imread(str(tmp_path / "f.jpg")).shape[:2] == rank_grid_shape(1, 3)


def test_query_table_and_picture(built, tmp_path):
    files, idx = built
    res = run("query", files[0], "--index", idx, "--top", "3", "--save", tmp_path / "result.jpg")
    assert res.exit_code == 0, res.output
    assert "rank" in res.stdout and "identity" in res.stdout and "1.0000" in res.stdout
    common = os.path.commonpath([str(f) for f in files])
    assert f"paths under {common}" in res.stdout and os.path.relpath(files[0], common) in res.stdout
    assert "picture written" in res.stderr
    pic = cv2.imread(str(tmp_path / "result.jpg"))
    from reid.viz import rank_grid_shape

    assert pic.shape[:2] == rank_grid_shape(1, 3)


def test_query_uses_env_index(built, tmp_path):
    files, idx = built
    res = run("query", files[0], "--json", env={"REID_INDEX": str(idx)})
    assert res.exit_code == 0 and json.loads(res.stdout)["matches"]


def test_query_errors_are_one_line_exit_1(built, tmp_path, ckpt):
    files, idx = built
    one_line_error(run("query", tmp_path / "missing.jpg", "--index", idx), "does not exist")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not really")
    one_line_error(run("query", tmp_path / "bad.jpg", "--index", idx), "bad.jpg")
    one_line_error(run("query", files[0], "--index", tmp_path / "no-index"), "no index at",
                   "; build one with `reid index GALLERY --index")
    (tmp_path / "empty").mkdir()
    summary(index(tmp_path / "empty", tmp_path / "empty-idx", ckpt))
    one_line_error(run("query", files[0], "--index", tmp_path / "empty-idx"), "is empty; add images with `reid index")
    one_line_error(run("query", files[0], "--index", idx, "--save", tmp_path / "out.txt"), "cannot write a picture")
    assert run("query", files[0], "--index", idx, "--top", "0").exit_code == 2  # usage error


def test_query_refuses_a_checkpoint_that_changed_since_indexing(built, tmp_path, ckpt, other_ckpt):
    files, idx = built
    moved = tmp_path / "ckpt-copy"
    import shutil

    shutil.copytree(ckpt, moved)
    summary(index(tmp_path / "g", tmp_path / "idx2", moved))
    shutil.rmtree(moved)
    shutil.copytree(other_ckpt, moved)  # same path, other weights
    torch_query = ("query", files[0], "--index", tmp_path / "idx2", "--runtime", "torch")
    one_line_error(run(*torch_query), "was built with the model", "--rebuild")
    # The export made when the gallery was indexed is the gallery's own model (kept by fingerprint), so the
    # default runtime still answers with the model the vectors come from.
    assert summary(run("query", files[0], "--index", tmp_path / "idx2", "--json"))["matches"][0]["score"] > 0.999
    shutil.rmtree(moved)
    one_line_error(run(*torch_query), "cannot be loaded")


@pytest.mark.parametrize("damage", ["delete", "corrupt"])
def test_query_rebuilds_a_missing_or_corrupt_faiss_file(built, damage, caplog):
    files, idx = built
    before = json.loads(run("query", files[2], "--index", idx, "--json").stdout)
    if damage == "delete":
        (idx / VECTORS_NAME).unlink()
    else:
        (idx / VECTORS_NAME).write_bytes(b"\x00" * 300)
    info = json.loads(run("info", "--index", idx, "--json").stdout)
    assert info["vectors"] == {"delete": "missing", "corrupt": "corrupt"}[damage]
    with caplog.at_level("WARNING"):
        after = run("query", files[2], "--index", idx, "--json")
    assert after.exit_code == 0
    assert "rebuilding it from the catalogue" in caplog.text
    assert json.loads(after.stdout) == before
    assert json.loads(run("info", "--index", idx, "--json").stdout)["vectors"] == "fresh"
    (idx / VECTORS_NAME).unlink()
    assert json.loads(run("info", "--index", idx, "--json", "--repair").stdout)["vectors"] == "fresh"


def test_info(built):
    files, idx = built
    info = json.loads(run("info", "--index", idx, "--json").stdout)
    assert (info["rows"], info["dim"], info["kind"], info["vector_kind"], info["vectors"]) == (9, 16, "auto", "flat",
                                                                                                "fresh")
    assert info["fingerprint"].startswith("abn-") and info["bytes_on_disk"] > 9 * 16 * 4
    text = run("info", "--index", idx)
    assert text.exit_code == 0
    for word in ("rows", "9", "dimension", "16", "flat", info["fingerprint"], "size on disk", "last update"):
        assert word in text.stdout
    assert run("info", "--index", idx.parent / "nothing").exit_code == 1


def test_kind_option_switches_the_vector_index(built, tmp_path, ckpt):
    files, idx = built
    got = summary(index(tmp_path / "g", idx, ckpt, "--kind", "hnsw"))
    assert got["unchanged"] == 9
    assert json.loads(run("info", "--index", idx, "--json").stdout)["vector_kind"] == "hnsw"
    res = run("query", files[0], "--index", idx, "--json", "--top", "1")
    assert json.loads(res.stdout)["matches"][0]["path"] == str(files[0].resolve())
    assert run("index", tmp_path / "g", "--index", idx, "--kind", "lsh").exit_code == 2


def test_demo_with_the_default_model(tmp_path):
    res = run("demo", tmp_path / "demo", "--identities", "3", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert "picture written" in res.stdout and (tmp_path / "demo" / "result.jpg").is_file()
    import re

    said = re.search(r"(\d+) of the (\d+) matches are the query's person", " ".join(res.stderr.split()))
    assert said and 0 <= int(said.group(1)) <= int(said.group(2)) == 8, res.stderr
    info = json.loads(run("info", "--index", tmp_path / "demo" / "index", "--json").stdout)
    assert info["model_source"] == "default" and info["dim"] == 512 and info["rows"] > 0


def test_a_file_that_became_undecodable_leaves_the_index(tmp_path, ckpt):
    files = make_gallery(tmp_path / "g", ids=2)
    idx = tmp_path / "idx"
    summary(index(tmp_path / "g", idx, ckpt))
    files[1].write_bytes(files[1].read_bytes()[:200])  # truncated in place
    got = summary(index(tmp_path / "g", idx, ckpt))
    assert [Path(f["path"]).name for f in got["failed"]] == [files[1].name]
    assert "truncated" in got["failed"][0]["reason"] and got["rows"] == 3
    assert str(files[1].resolve()) not in {r[1] for r in rows(idx)}


def test_the_program_entry_point_flushes_output_and_keeps_exit_codes(tmp_path, ckpt):
    """`reid` is ``cli:run``: after read-only commands it skips the interpreter's teardown (os._exit)."""
    gallery = make_gallery(tmp_path / "g", ids=2, cams=2)
    idx = tmp_path / "idx"
    assert index(tmp_path / "g", idx, ckpt).exit_code == 0

    def program(*args: str) -> subprocess.CompletedProcess:
        code = "import sys, cli; sys.argv = ['reid', *sys.argv[1:]]; cli.run()"
        return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=Path(cli.__file__).parent,
                              capture_output=True, text=True, timeout=120)

    ok = program("query", gallery[0], gallery[3], "--index", idx, "--top", "3", "--json")
    assert ok.returncode == 0, ok.stderr
    lines = [json.loads(line) for line in ok.stdout.splitlines()]  # every line arrived, whole
    assert [len(r["matches"]) for r in lines] == [3, 3] and lines[0]["matches"][0]["path"] == str(gallery[0])
    missing = program("query", tmp_path / "nope.jpg", "--index", idx)
    assert missing.returncode == 1 and missing.stderr.startswith("error:") and "does not exist" in missing.stderr
    usage = program("query", gallery[0], "--index", idx, "--top", "0")
    assert usage.returncode == 2 and "--top" in usage.stderr
    info = program("info", "--index", idx, "--json")
    assert info.returncode == 0 and json.loads(info.stdout)["rows"] == 4
    again = program("index", tmp_path / "g", "--index", idx, "--weights", ckpt, "--workers", "0", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["unchanged"] == 4  # a writer ends normally


def test_other_cameras_leaves_out_the_query_camera(built, tmp_path, monkeypatch):
    files, idx = built  # 3 identities x 3 cameras
    res = run("query", files[0], files[4], "--index", idx, "--json", "--top", "5", "--other-cameras")
    assert res.exit_code == 0, res.output
    docs = [json.loads(line) for line in res.stdout.splitlines()]
    for doc, cam in zip(docs, (1, 2), strict=True):
        assert len(doc["matches"]) == 5 and all(m["camid"] != cam for m in doc["matches"])
        assert [m["rank"] for m in doc["matches"]] == [1, 2, 3, 4, 5]
    everything = run("query", files[0], "--index", idx, "--json", "--top", "9", "--other-cameras")
    assert len(json.loads(everything.stdout)["matches"]) == 6  # the other two cameras' crops, no more

    fused = run("query", files[0], files[1], "--index", idx, "--json", "--top", "9", "--fuse", "--other-cameras")
    assert {m["camid"] for m in json.loads(fused.stdout)["matches"]} == {3}  # both query cameras left out

    import reid.model
    monkeypatch.setattr(reid.model, "load_model", lambda *a, **k: pytest.fail("loaded a model before checking"))
    renamed = tmp_path / "suspect.jpg"
    renamed.write_bytes(files[0].read_bytes())
    one_line_error(run("query", renamed, "--index", idx, "--other-cameras"), "--other-cameras", "suspect.jpg")
