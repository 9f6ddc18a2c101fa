"""The training loop: exact resume, checkpoints in the model format, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from reid.errors import CheckpointError, DatasetError, InputError
from reid.train import TrainConfig, train

TINY_MODEL = dict(input_size=(64, 32), d_x=32, d_h=16, d_att=16, embed_dim=32)


def _write_tiny(root: Path, seed: int = 0):
    """Market-named crops of 8 train and 6 test identities (two colour bands each), as a Dataset."""
    from reid.datasets.base import Dataset, Sample

    rng = np.random.default_rng(seed)

    def write(split, pids, n):
        samples = []
        for pid in pids:
            colours = np.random.default_rng(pid).integers(0, 255, size=(2, 3))
            for cam in (1, 2):
                for j in range(n):
                    img = np.zeros((64, 32, 3), np.uint8)
                    img[:32], img[32:] = colours[0], colours[1]
                    img = np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)
                    path = root / split / f"{pid:04d}_c{cam}s1_{j:06d}_00.jpg"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    cv2.imwrite(str(path), img[:, :, ::-1])
                    samples.append(Sample(path, pid, cam))
        return samples

    return Dataset("tiny", write("train", range(1, 9), 2), write("query", range(20, 26), 1),
                   write("gallery", range(20, 26), 2))


def _run(ds, out, *, epochs=3, on_event=None, resume=False, workers=0, eval_every=0):
    from reid.model import ModelConfig

    cfg = TrainConfig(epochs=epochs, batch_p=4, batch_k=2, lr=1e-3, warmup_epochs=1, eval_every=eval_every,
                      attention_entropy_weight=0.01)
    return train(ds, out, cfg, model_config=ModelConfig(**TINY_MODEL), pretrained=False, device="cpu",
                 workers=workers, resume=resume, deterministic=True, on_event=on_event)


class _Crash(Exception):
    pass


def test_resume_after_interruption_gives_identical_weights(tmp_path):
    ds = _write_tiny(tmp_path / "data")
    full = _run(ds, tmp_path / "full")

    def crash(kind, info):
        if kind == "step" and info["epoch"] == 2 and info["step"] == 2:
            raise _Crash

    with pytest.raises(_Crash):
        _run(ds, tmp_path / "cut", on_event=crash)
    state = torch.load(tmp_path / "cut/last/train_state.pt", weights_only=True)
    assert state["epoch"] == 1
    resumed = _run(ds, tmp_path / "cut", resume=True)
    assert resumed.epochs_done == full.epochs_done == 3
    a = load_file(tmp_path / "full/last/model.safetensors")
    b = load_file(tmp_path / "cut/last/model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log_a = [json.loads(x) for x in (tmp_path / "full/metrics.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (tmp_path / "cut/metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log_b] == [1, 2, 3]
    assert [r["loss"] for r in log_a] == [r["loss"] for r in log_b]
    # The checkpoint is an ordinary model checkpoint with a classifier over the 8 training ids.
    from reid.model import load_checkpoint

    model = load_checkpoint(tmp_path / "cut/last")
    assert model.config.num_classes == 8 and tuple(model.config.input_size) == (64, 32)


def test_workers_do_not_change_the_trajectory(tmp_path):
    ds = _write_tiny(tmp_path / "data")
    _run(ds, tmp_path / "w0", epochs=1, workers=0)
    _run(ds, tmp_path / "w2", epochs=1, workers=2)
    a = load_file(tmp_path / "w0/last/model.safetensors")
    b = load_file(tmp_path / "w2/last/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_errors_for_existing_run_missing_run_and_other_data(tmp_path):
    ds = _write_tiny(tmp_path / "data")
    _run(ds, tmp_path / "run", epochs=1)
    with pytest.raises(InputError, match="already holds a training run; pass --resume"):
        _run(ds, tmp_path / "run", epochs=1)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        _run(ds, tmp_path / "empty", epochs=1, resume=True)
    other = _write_tiny(tmp_path / "other", seed=1)
    other = type(other)("tiny", other.train[:-4], other.query, other.gallery)
    with pytest.raises(CheckpointError, match="was trained on"):
        _run(other, tmp_path / "run", epochs=2, resume=True)
    with pytest.raises(InputError, match="lower --batch-p"):
        train(ds, tmp_path / "big", TrainConfig(batch_p=9, batch_k=2), pretrained=False, device="cpu")
    empty = type(ds)("tiny", [], ds.query, ds.gallery)
    with pytest.raises(DatasetError, match="no training images"):
        train(empty, tmp_path / "none", TrainConfig(), pretrained=False, device="cpu")
    (tmp_path / "run/last/train_state.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="cannot read training state"):
        _run(ds, tmp_path / "run", epochs=2, resume=True)
