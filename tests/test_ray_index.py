"""`reid index --ray`: crop files decoded and embedded on Ray Data, the same rows and vectors as the local path.

One local Ray cluster (2 CPUs, loopback) serves the whole module; `reid index --ray` finds Ray initialised in
this process and uses that cluster, leaving it running.
"""

from __future__ import annotations

import importlib.util
import json
import sqlite3
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

import cli
from reid.model import ModelConfig, build_model, save_checkpoint
from reid.synthetic.render import render_person

SMALL = ModelConfig(input_size=(64, 32), output_stride=32, c_a=4, c_b=4, d_x=16, d_h=8, d_att=8, num_glimpses=1,
                    embed_dim=16)
runner = CliRunner()

# Ray Data reads its own deprecated settings when it ships its context to the workers.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="Ray is not installed (pip install -e '.[ray]'); CI installs it with [dev]")


@pytest.fixture(scope="module")
def ray_cluster():
    """The module's local Ray cluster, started as `reid index --ray` starts one."""
    from reid.distributed import import_ray, start_local

    ray = import_ray(local=True)
    start_local(ray, num_cpus=2)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return save_checkpoint(build_model(SMALL, pretrained=False), tmp_path_factory.mktemp("ckpt") / "small")


def write_crops(root: Path, ids: range, cams: int = 2) -> list[Path]:
    """Market-named synthetic crops, some in a sub-folder."""
    out = []
    for p in ids:
        for c in range(1, cams + 1):
            path = root / (f"cam{c}" if c > 1 else "") / f"{p:04d}_c{c}s1_{p * 10 + c:06d}_01.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            rgb = render_person(p, c, np.random.default_rng([p, c]), (128, 64))
            assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
            out.append(path)
    return out


def index(gallery: Path, idx: Path, ckpt: Path, *extra: str) -> dict:
    result = runner.invoke(cli.app, [str(a) for a in ("index", gallery, "--index", idx, "--weights", ckpt,
                                                      "--workers", "0", "--json", *extra)])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def vectors(idx: Path) -> dict[str, tuple[int | None, int | None, np.ndarray]]:
    con = sqlite3.connect(idx / "catalogue.sqlite")
    try:
        got = con.execute("SELECT path, pid, camid, embedding FROM images").fetchall()
    finally:
        con.close()
    return {p: (pid, camid, np.frombuffer(e, np.float32)) for p, pid, camid, e in got}


@needs_ray
@pytest.mark.parametrize("runtime", ["auto", "torch"])
def test_ray_gives_the_local_path_s_rows_and_vectors(tmp_path, ckpt, ray_cluster, runtime):
    write_crops(tmp_path / "g", range(1, 6))
    local = index(tmp_path / "g", tmp_path / "local", ckpt, "--runtime", runtime)
    on_ray = index(tmp_path / "g", tmp_path / "ray", ckpt, "--runtime", runtime, "--ray", "--batch-size", "4")
    assert (on_ray["added"], on_ray["rows"], on_ray["failed"]) == (10, 10, []) == (local["added"], local["rows"], [])
    a, b = vectors(tmp_path / "local"), vectors(tmp_path / "ray")
    assert sorted(a) == sorted(b)
    for path in a:
        assert a[path][:2] == b[path][:2]
        cos = float(a[path][2] @ b[path][2]) / float(np.linalg.norm(a[path][2]) * np.linalg.norm(b[path][2]))
        assert cos >= 0.99999, (path, cos)


@needs_ray
def test_ray_resumes_and_embeds_only_new_files(tmp_path, ckpt, ray_cluster, monkeypatch):
    g, idx = tmp_path / "g", tmp_path / "idx"
    write_crops(g, range(1, 4))
    first = index(g, idx, ckpt, "--ray")
    assert (first["added"], first["rows"]) == (6, 6)
    stored = vectors(idx)

    import reid.distributed

    embedded: list[list[str]] = []
    real = reid.distributed.run_pipeline
    monkeypatch.setattr(reid.distributed, "run_pipeline",
                        lambda *a, **k: (embedded.append(sorted(k["paths"])), real(*a, **k))[1])
    second = index(g, idx, ckpt, "--ray")
    assert (second["added"], second["unchanged"], second["rows"]) == (0, 6, 6) and embedded == []

    new = write_crops(g, range(4, 6))
    third = index(g, idx, ckpt, "--ray")
    assert (third["added"], third["unchanged"], third["rows"]) == (4, 6, 10)
    assert embedded == [sorted(str(p.resolve()) for p in new)]
    after = vectors(idx)
    assert all(np.array_equal(after[p][2], v[2]) for p, v in stored.items())  # the old rows are untouched


@needs_ray
def test_ray_skips_and_reports_a_corrupt_file_as_the_local_path_does(tmp_path, ckpt, ray_cluster):
    g = tmp_path / "g"
    write_crops(g, range(1, 3))
    good = (g / "0001_c1s1_000011_01.jpg").read_bytes()
    (g / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (g / "notes.png").write_text("this is not an image")
    local = index(g, tmp_path / "local", ckpt)
    on_ray = index(g, tmp_path / "ray", ckpt, "--ray")
    assert on_ray["failed"] == local["failed"] and len(on_ray["failed"]) == 2
    assert (on_ray["added"], on_ray["rows"]) == (4, 4)
    assert {Path(f["path"]).name for f in on_ray["failed"]} == {"truncated.jpg", "notes.png"}
    assert any("truncated" in f["reason"] for f in on_ray["failed"])


def test_without_ray_installed_ray_is_one_line_exit_1(tmp_path, ckpt, monkeypatch):
    write_crops(tmp_path / "g", range(1, 2), cams=1)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    result = runner.invoke(cli.app, ["index", str(tmp_path / "g"), "--index", str(tmp_path / "idx"), "--weights",
                                     str(ckpt), "--ray"])
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "--ray needs Ray" in lines[0], result.stderr
    assert "pip install" in lines[0]
    assert not (tmp_path / "idx").exists()  # refused before anything was made


def test_ray_actors_needs_ray(tmp_path, ckpt):
    result = runner.invoke(cli.app, ["index", str(tmp_path), "--index", str(tmp_path / "idx"), "--ray-actors", "2"])
    assert result.exit_code == 2 and "--ray" in result.output


class _FakeRay:
    """What ``reid.distributed._plan_workers`` asks a cluster."""

    def __init__(self, gpus: int, nodes: list[int]) -> None:
        self.gpus, self.cpus = gpus, nodes

    def cluster_resources(self) -> dict:
        return {"CPU": float(sum(self.cpus)), **({"GPU": float(self.gpus)} if self.gpus else {})}

    def nodes(self) -> list[dict]:
        return [{"Alive": True, "Resources": {"CPU": float(c)}} for c in self.cpus] + [{"Alive": False}]


def test_model_workers_take_a_gpu_each_where_there_are_gpus_else_a_node_each():
    from reid.distributed import RayOptions, _plan_workers
    from reid.errors import InputError

    gpu = _plan_workers(_FakeRay(2, [16, 16]), RayOptions(), "auto", "auto")
    assert (gpu.actors, gpu.gpus, gpu.runtime, gpu.device) == (2, 1, "torch", "cuda")
    assert _plan_workers(_FakeRay(2, [16]), RayOptions(actors=1), "torch", "cuda").actors == 1
    for runtime, device in (("onnx", "auto"), ("auto", "cpu")):  # a CPU runtime, or the CPU asked for
        cpu = _plan_workers(_FakeRay(2, [16, 8]), RayOptions(), runtime, device)
        assert (cpu.actors, cpu.gpus, cpu.threads, cpu.runtime, cpu.device) == (2, 0, 8, runtime, "cpu")
    assert _plan_workers(_FakeRay(0, [2]), RayOptions(), "auto", "auto").threads == 2  # this machine: 1 actor, 2 cores
    assert _plan_workers(_FakeRay(0, [16]), RayOptions(actors=4), "auto", "auto").threads == 4
    with pytest.raises(InputError, match="no GPU"):
        _plan_workers(_FakeRay(0, [16]), RayOptions(), "auto", "cuda")


def test_cluster_addresses_on_this_machine_and_unreachable_ones():
    import socket

    from reid.distributed import check_reachable, on_this_machine
    from reid.errors import InputError

    assert on_this_machine("auto") and on_this_machine("127.0.0.1:6379") and on_this_machine("ray://localhost:10001")
    assert not on_this_machine("head.example:6379") and not on_this_machine("ray://10.0.0.5:10001")
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(InputError, match=f"cannot reach the Ray cluster at ray://127.0.0.1:{port}"):
        check_reachable(f"ray://127.0.0.1:{port}", timeout=2)


def test_a_local_cluster_that_misses_rays_start_up_window_is_tried_once_more(caplog):
    from reid.distributed import start_local
    from reid.errors import ReidError

    class FakeRay:  # Ray's own failure: a bare Exception when the raylet does not register within 30 s
        def __init__(self, failures):
            self.failures, self.inits, self.shutdowns = failures, 0, 0

        def init(self, **kwargs):
            self.inits += 1
            assert kwargs["_node_ip_address"] == "127.0.0.1"
            if self.inits <= self.failures:
                raise Exception("The current node timed out during startup.")

        def shutdown(self):
            self.shutdowns += 1

    once = FakeRay(failures=1)
    start_local(once, num_cpus=1)
    assert (once.inits, once.shutdowns) == (2, 1) and "trying once more" in caplog.text
    never = FakeRay(failures=2)
    with pytest.raises(ReidError, match="^the local Ray cluster did not start: The current node timed out"):
        start_local(never, num_cpus=1)
    assert (never.inits, never.shutdowns) == (2, 2)
