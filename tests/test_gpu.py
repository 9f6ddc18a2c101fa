"""The CUDA paths, checked against the CPU: embedding (fp32 on the device, TF32 off, whatever autocast
``reid.embed`` opens), decoding workers with pinned memory, AMP training and resume, index + query,
evaluation.

Skipped without CUDA (``-m gpu`` selects them on a machine that has it). ``REID_TEST_DEVICE=cpu`` runs
the same checks on the CPU, which is how their code is kept working on machines without a GPU.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

pytestmark = pytest.mark.gpu
DEVICE = os.environ.get("REID_TEST_DEVICE", "cuda")
TINY = dict(input_size=(64, 32), output_stride=32, c_a=4, c_b=4, d_x=16, d_h=8, d_att=8, num_glimpses=1, embed_dim=16)


def crops(n: int, size: tuple[int, int] = (256, 128)) -> np.ndarray:
    """n synthetic pedestrians (3 identities, several cameras) as float [n,3,H,W] in [0,1]."""
    from reid.synthetic.render import render_person
    from reid.images import preprocess

    return np.stack([preprocess(render_person(i % 3 + 1, i % 4 + 1, np.random.default_rng(i), (128, 64)), size)
                     for i in range(n)])


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_default_model_embeds_as_on_the_cpu():
    from reid.embed import embed_arrays
    from reid.model import build_model

    x = crops(12)
    cpu = embed_arrays(build_model(), x, device=torch.device("cpu"))
    dev = embed_arrays(build_model(), x, device=torch.device(DEVICE))
    assert cosines(cpu, dev).min() >= 0.999  # DESIGN: any precision, if it matches fp32 this closely
    top = lambda f: np.argsort(-(f @ f.T), axis=1, kind="stable")[:, :3]  # noqa: E731
    assert (top(cpu) == top(dev)).mean() >= 0.95


def test_embed_paths_decodes_in_workers_into_pinned_memory(tmp_path):
    from reid.embed import embed_paths
    from reid.model import ModelConfig, build_model

    paths = []
    for i, img in enumerate(crops(10, (128, 64))):
        p = tmp_path / f"{i:04d}_c1s1_000000_01.jpg"
        cv2.imwrite(str(p), cv2.cvtColor((img.transpose(1, 2, 0) * 255).round().astype(np.uint8), cv2.COLOR_RGB2BGR))
        paths.append(p)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    model = build_model(ModelConfig(**TINY), pretrained=False)
    got = embed_paths(model, [*paths, tmp_path / "broken.jpg"], batch_size=4, workers=2, device=torch.device(DEVICE))
    ref = embed_paths(build_model(ModelConfig(**TINY), pretrained=False), paths, batch_size=4, workers=0,
                      device=torch.device("cpu"))
    assert [p.name for p, _ in got.failures] == ["broken.jpg"]
    assert got.paths == ref.paths and cosines(got.features, ref.features).min() >= 0.999


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_amp_training_runs_saves_and_resumes(tmp_path, precision):
    from reid.datasets import load
    from reid.synthetic import write_market1501
    from reid.model import ModelConfig, load_checkpoint
    from reid.train import TrainConfig, train

    if DEVICE == "cpu" and precision == "fp16":
        pytest.skip("fp16 training needs CUDA")
    write_market1501(tmp_path / "data", num_train_ids=8, num_test_ids=6, num_distractors=2, num_junk=1, cameras=2,
                     images_per_cam=2, seed=0, size=(64, 32))
    ds = load("market1501", tmp_path / "data")
    cfg = TrainConfig(epochs=2, batch_p=4, batch_k=2, lr=1e-3, warmup_epochs=1, eval_every=2, precision=precision)
    model_config = ModelConfig(input_size=(64, 32), d_x=32, d_h=16, d_att=16, embed_dim=32)
    first = train(ds, tmp_path / "run", cfg, model_config=model_config, pretrained=False, device=DEVICE, workers=2)
    assert first.epochs_done == 2 and np.isfinite(first.last["loss"]) and 0.0 <= first.best_map <= 1.0
    more = train(ds, tmp_path / "run", cfg.replace(epochs=3), device=DEVICE, workers=2, resume=True)
    assert more.epochs_done == 3 and np.isfinite(more.last["loss"])
    model = load_checkpoint(tmp_path / "run" / "last")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_index_and_query_on_the_device(tmp_path):
    import cli
    from reid.model import ModelConfig, build_model, save_checkpoint

    ckpt = save_checkpoint(build_model(ModelConfig(**TINY), pretrained=False), tmp_path / "ckpt")
    gallery = tmp_path / "g"
    gallery.mkdir()
    for i, img in enumerate(crops(9, (128, 64))):
        rgb = (img.transpose(1, 2, 0) * 255).round().astype(np.uint8)
        name = f"{i % 3 + 1:04d}_c{i % 4 + 1}s1_{i:06d}_01.jpg"
        cv2.imwrite(str(gallery / name), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    runner = CliRunner()
    built = runner.invoke(cli.app, ["index", str(gallery), "--index", str(tmp_path / "idx"), "--weights", str(ckpt),
                                    "--device", DEVICE, "--json"])
    assert built.exit_code == 0, built.output
    assert json.loads(built.stdout)["added"] == 9
    query = sorted(gallery.iterdir())[4]
    found = runner.invoke(cli.app, ["query", str(query), "--index", str(tmp_path / "idx"), "--device", DEVICE,
                                    "--json"])
    assert found.exit_code == 0, found.output
    top = json.loads(found.stdout)["matches"][0]
    assert Path(top["path"]).name == query.name and top["score"] > 0.999


def test_evaluation_scores_as_on_the_cpu(tmp_path):
    from reid.synthetic import write_market1501
    from reid.evaluation.evaluate import EvalOptions, evaluate
    from reid.model import ModelConfig, build_model

    write_market1501(tmp_path / "data", num_train_ids=2, num_test_ids=6, num_distractors=2, num_junk=1, cameras=2,
                     images_per_cam=2, seed=1, size=(64, 32))
    model = build_model(ModelConfig(**TINY), pretrained=False)
    cpu = evaluate("market1501", tmp_path / "data", EvalOptions(device="cpu", use_cache=False), model=model).report
    dev = evaluate("market1501", tmp_path / "data", EvalOptions(device=DEVICE, use_cache=False), model=model).report
    assert dev["mAP"] == pytest.approx(cpu["mAP"], abs=0.02) and dev["num_queries"] == cpu["num_queries"]
