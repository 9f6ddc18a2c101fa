"""ONNX / OpenVINO export (reid.model.export) and the torch-free runtimes (reid.engine)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

import cli
from reid import engine
from reid.embed import embed_images
from reid.errors import CheckpointError
from reid.model import ModelConfig, build_model, model_fingerprint, save_checkpoint
from reid.model.export import agreement, check_crops, export_model
from reid.search import query_images

SMALL = ModelConfig(input_size=(64, 32), output_stride=32, c_a=4, c_b=4, d_x=16, d_h=8, d_att=8, num_glimpses=1,
                    embed_dim=16)
runner = CliRunner()


def crops_of_people(n: int = 6) -> list[np.ndarray]:
    """Synthetic pedestrians of several sizes (the exported model resizes them like the torch path)."""
    from reid.synthetic import render_person

    rng = np.random.default_rng(0)
    sizes = [(128, 64), (96, 48), (200, 90)]
    return [render_person(pid, pid % 3 + 1, rng, sizes[pid % 3]) for pid in range(1, n + 1)]


@pytest.fixture(scope="module")
def small():
    return build_model(SMALL)


def test_onnx_export_carries_its_contract_and_equals_torch(tmp_path, small):
    report = export_model(small, tmp_path / "m.onnx", "onnx")
    meta = engine.read_onnx_metadata(tmp_path / "m.onnx")
    assert meta["reid.fingerprint"] == model_fingerprint(small) == report["reid.fingerprint"]
    assert (meta["reid.input_size"], meta["reid.embed_dim"]) == ("64x32", "16")
    assert meta["reid.input"] == "float32 NCHW RGB in [0, 1]"
    assert report["cos_min"] >= 0.9999 and report["same_top5"]
    exported = engine.open_exported(tmp_path / "m.onnx", "onnx", fingerprint=meta["reid.fingerprint"])
    crops = crops_of_people() + list(check_crops(SMALL.input_size))
    a = agreement(embed_images(small, crops), exported.embed_images(crops))
    assert a["cos_min"] >= 0.9999 and a["same_top5"], a
    many = exported.embed_images(crops * 6, batch_size=7)  # batches of any size (dynamic batch axis)
    assert many.shape == (len(crops) * 6, 16) and np.allclose(many[: len(crops)], many[-len(crops):], atol=1e-6)


def test_the_default_network_exports_exactly(tmp_path):
    model = build_model()
    report = export_model(model, tmp_path / "default.onnx", "onnx")  # checked on synthetic + natural crops
    assert report["cos_min"] >= 0.9999 and report["same_top5"]
    exported = engine.open_exported(tmp_path / "default.onnx", "onnx", fingerprint=model_fingerprint(model))
    people = crops_of_people()
    a = agreement(embed_images(model, people), exported.embed_images(people))
    assert a["cos_min"] >= 0.9999 and a["same_top5"], a


def test_openvino_export_equals_torch(tmp_path, small):
    pytest.importorskip("openvino")
    report = export_model(small, tmp_path / "ir" / "m.xml", "openvino")
    assert report["files"] == [str(tmp_path / "ir" / "m.xml"), str(tmp_path / "ir" / "m.bin")]
    assert report["cos_min"] >= 0.9999 and report["same_top5"]
    exported = engine.open_exported(tmp_path / "ir" / "m.xml", "openvino", fingerprint=model_fingerprint(small))
    crops = crops_of_people()
    assert agreement(embed_images(small, crops), exported.embed_images(crops))["cos_min"] >= 0.9999
    assert sorted(p.name for p in (tmp_path / "ir").iterdir()) == ["m.bin", "m.xml"]  # no scratch left


def test_an_export_is_never_used_for_another_model(tmp_path, small, caplog):
    other = build_model(SMALL.replace(seed=3))
    export_model(small, tmp_path / "a.onnx", "onnx")
    fp_other = model_fingerprint(other)
    with pytest.raises(CheckpointError, match="never used for another model"):
        engine.open_exported(tmp_path / "a.onnx", "onnx", fingerprint=fp_other)
    # small's export planted in other's cache slot: refused with a warning, then rebuilt from other
    slot = engine.export_path(fp_other, "onnx")
    slot.parent.mkdir(parents=True, exist_ok=True)
    slot.write_bytes((tmp_path / "a.onnx").read_bytes())
    with caplog.at_level(logging.WARNING, logger="reid.engine"):
        assert engine.cached_embedder(fp_other) is None
    assert "unusable and will be rebuilt" in caplog.text
    rebuilt = engine.ensure_exported(other, fp_other)
    assert rebuilt.fingerprint == fp_other and engine.read_onnx_metadata(slot)["reid.fingerprint"] == fp_other


def test_a_corrupt_cached_export_is_rebuilt_with_a_warning(small, caplog):
    fp = model_fingerprint(small)
    first = engine.ensure_exported(small, fp)
    crops = crops_of_people(3)
    before = first.embed_images(crops)
    path = engine.export_path(fp, "onnx")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])  # truncated, as by a full disk
    with caplog.at_level(logging.WARNING, logger="reid.engine"):
        again = engine.ensure_exported(small, fp)
    assert "unusable and will be rebuilt" in caplog.text
    assert np.allclose(again.embed_images(crops), before, atol=1e-6)


def test_runtime_choice_and_its_errors():
    assert engine.wants_torch("torch", "cpu") and not engine.wants_torch("onnx", "cpu")
    assert engine.wants_torch("auto", "cuda") and not engine.wants_torch("auto", "cpu")
    with pytest.raises(Exception, match="runs on the CPU"):
        engine.wants_torch("onnx", "cuda")
    with pytest.raises(Exception, match="unknown runtime"):
        engine.wants_torch("tensorrt", "cpu")


def _gallery(root, n: int = 6) -> list:
    root.mkdir(parents=True, exist_ok=True)
    files = []
    for i, img in enumerate(crops_of_people(n)):
        f = root / f"{i + 1:04d}_c{i % 2 + 1}s1_{i:06d}_01.png"
        cv2.imwrite(str(f), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        files.append(f)
    return files


def test_torch_and_onnx_runtimes_index_and_rank_alike(tmp_path, small):
    ckpt = save_checkpoint(small, tmp_path / "ckpt")
    files = _gallery(tmp_path / "g")
    for runtime in ("torch", "onnx"):
        r = runner.invoke(cli.app, ["index", str(tmp_path / "g"), "--index", str(tmp_path / runtime), "--weights",
                                    str(ckpt), "--workers", "0", "--runtime", runtime, "--json"])
        assert r.exit_code == 0, r.output
    by_torch = query_images(files, tmp_path / "torch", top=4, runtime="torch")
    by_onnx = query_images(files, tmp_path / "onnx", top=4, runtime="onnx")
    for a, b in zip(by_torch, by_onnx, strict=True):
        assert [m.path for m in a.matches] == [m.path for m in b.matches]
        assert np.allclose([m.score for m in a.matches], [m.score for m in b.matches], atol=1e-4)
    r = runner.invoke(cli.app, ["query", str(files[0]), "--index", str(tmp_path / "onnx"), "--runtime", "onnx",
                                "--device", "cuda"])
    assert r.exit_code == 1 and "runs on the CPU" in r.stderr


def test_query_and_info_run_without_importing_torch(tmp_path, small):
    ckpt = save_checkpoint(small, tmp_path / "ckpt")
    files = _gallery(tmp_path / "g")
    r = runner.invoke(cli.app, ["index", str(tmp_path / "g"), "--index", str(tmp_path / "idx"), "--weights",
                                str(ckpt), "--workers", "0", "--json"])  # runtime auto: exports the model
    assert r.exit_code == 0, r.output
    code = (
        "import json, sys\n"
        "from typer.testing import CliRunner\n"
        "import cli\n"
        "q = CliRunner().invoke(cli.app, ['query', sys.argv[1], '--index', sys.argv[2], '--json', '--top', '2'])\n"
        "i = CliRunner().invoke(cli.app, ['info', '--index', sys.argv[2], '--json'])\n"
        "print(json.dumps({'codes': [q.exit_code, i.exit_code], 'query': q.stdout, 'torch': 'torch' in sys.modules}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(files[1]), str(tmp_path / "idx")], capture_output=True,
                         text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["codes"] == [0, 0], out.stderr
    assert not got["torch"]
    assert json.loads(got["query"])["matches"][0]["path"] == str(files[1].resolve())


def test_export_command(tmp_path, small):
    ckpt = save_checkpoint(small, tmp_path / "ckpt")
    r = runner.invoke(cli.app, ["export", str(tmp_path / "out" / "m.onnx"), "--weights", str(ckpt), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["reid.fingerprint"] == model_fingerprint(small) and doc["cos_min"] >= 0.9999
    assert engine.read_onnx_metadata(tmp_path / "out" / "m.onnx")["reid.input_size"] == "64x32"
    r = runner.invoke(cli.app, ["export", str(tmp_path / "m.onnx"), "--weights", str(tmp_path / "nothing")])
    assert r.exit_code == 1 and "does not exist" in r.stderr


def test_the_cache_keeps_an_optimised_copy_and_drops_a_damaged_one(small, caplog):
    fp = model_fingerprint(small)
    first = engine.ensure_exported(small, fp)
    crops = crops_of_people(3)
    before = first.embed_images(crops)
    copies = list(engine.export_path(fp, "onnx").parent.glob("model.ort-*.onnx"))
    assert len(copies) == 1
    again = engine.cached_embedder(fp)  # from the optimised copy: same metadata, same numbers
    assert again.fingerprint == fp and np.allclose(again.embed_images(crops), before, atol=1e-6)
    copies[0].write_bytes(b"not a model")
    with caplog.at_level(logging.WARNING, logger="reid.engine"):
        third = engine.cached_embedder(fp)
    assert "unreadable optimised copy" in caplog.text
    assert np.allclose(third.embed_images(crops), before, atol=1e-6)
    assert [p.stat().st_size > 100 for p in engine.export_path(fp, "onnx").parent.glob("model.ort-*.onnx")] == [True]


def test_auto_measures_the_bulk_runtime_once_per_machine_and_keeps_the_answer(monkeypatch, caplog):
    pytest.importorskip("openvino")
    model = build_model(ModelConfig(**{**SMALL.__dict__, "embed_dim": 12}))  # a fingerprint of its own
    fp = model_fingerprint(model)
    slot = engine.export_path(fp, "onnx").parent
    speeds = {"torch": 50.0, "onnx": 90.0, "openvino": 70.0}
    measured = []

    def measure(embedders, crops, rounds):
        measured.append(sorted(embedders))
        for embed in embedders.values():  # every candidate really runs
            assert embed(crops).shape == (len(crops), 12)
        return {name: speeds[name] for name in embedders}

    monkeypatch.setattr(engine, "_measure", measure)
    with caplog.at_level(logging.INFO, logger="reid.engine"):
        chosen = engine.bulk_runtime(model, fp)
    assert chosen == "onnx" and "runtime auto for bulk embedding on this machine: onnx" in caplog.text
    assert measured == [sorted(["torch", "onnx", "openvino"])]  # both exports made (each checked against torch)
    (entry,) = json.loads((slot / engine.CHOICE_FILE).read_text()).values()
    assert entry["runtime"] == "onnx" and entry["crops_per_s"] == speeds

    speeds.update(onnx=10.0)  # the answer is kept: later runs measure nothing
    assert engine.bulk_runtime(model, fp) == "onnx" and len(measured) == 1
    assert engine.bulk_embedder(model, fp, "auto").runtime == "onnx"

    (slot / engine.CHOICE_FILE).write_text("{not json")  # a damaged record is measured again
    assert engine.bulk_runtime(model, fp) == "openvino" and len(measured) == 2
    speeds.update(torch=100.0)
    (slot / engine.CHOICE_FILE).unlink()
    assert engine.bulk_embedder(model, fp, "auto") is model  # torch: the model itself ...
    assert (slot / "model.onnx").is_file()  # ... and the ONNX export kept for `reid query`
    assert engine.bulk_embedder(model, fp, "openvino").runtime == "openvino"  # an explicit runtime: no measuring
    assert len(measured) == 3


def test_the_measured_choice_is_per_machine(monkeypatch):
    model = build_model(ModelConfig(**{**SMALL.__dict__, "embed_dim": 10}))
    fp = model_fingerprint(model)
    slot = engine.export_path(fp, "onnx").parent
    slot.mkdir(parents=True, exist_ok=True)
    (slot / engine.CHOICE_FILE).write_text(json.dumps({"another machine": {"runtime": "openvino"}}))
    monkeypatch.setattr(engine, "_machine", lambda threads: "this machine")
    got = engine.bulk_runtime(model, fp, rounds=1)  # not the other machine's answer: measured here, for real
    record = json.loads((slot / engine.CHOICE_FILE).read_text())
    assert set(record) == {"another machine", "this machine"} and record["this machine"]["runtime"] == got
    assert all(v > 0 for v in record["this machine"]["crops_per_s"].values())
