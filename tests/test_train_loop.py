"""The training loop: exact resume, checkpoints in the model format, clear errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reid.errors import CheckpointError, DatasetError, InputError
from reid.train import TrainConfig, train

TINY_MODEL = dict(input_size=(64, 32), d_x=32, d_h=16, d_att=16, embed_dim=32)


def _write_tiny(root: Path, seed: int = 0, num_train_ids: int = 8):
    """A small synthetic Market-1501 (8 train / 6 test identities, 2 cameras, 64x32 crops), loaded."""
    from reid.datasets import load
    from reid.synthetic import write_market1501

    write_market1501(root, num_train_ids=num_train_ids, num_test_ids=6, num_distractors=2, num_junk=1, cameras=2,
                     images_per_cam=2, seed=seed, size=(64, 32))
    return load("market1501", root)


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
    assert model.config.num_classes == ds.num_train_pids == 8 and tuple(model.config.input_size) == (64, 32)


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
    with pytest.raises(InputError, match="already holds a training run; continue it with `resume=True`"):
        _run(ds, tmp_path / "run", epochs=1)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        _run(ds, tmp_path / "empty", epochs=1, resume=True)
    other = _write_tiny(tmp_path / "other", seed=1, num_train_ids=9)
    with pytest.raises(CheckpointError, match="was trained on"):
        _run(other, tmp_path / "run", epochs=2, resume=True)
    with pytest.raises(InputError, match="P=9 identities.*has 8; lower `batch_p`"):
        train(ds, tmp_path / "big", TrainConfig(batch_p=9, batch_k=2), pretrained=False, device="cpu")
    empty = dataclasses.replace(ds, train=[])
    with pytest.raises(DatasetError, match="no training images"):
        train(empty, tmp_path / "none", TrainConfig(), pretrained=False, device="cpu")
    (tmp_path / "run/last/train_state.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="cannot read training state"):
        _run(ds, tmp_path / "run", epochs=2, resume=True)


def test_validation_scores_with_the_scorer_of_reid_evaluate(tmp_path):
    from reid.evaluation.evaluate import EvalOptions, evaluate
    from reid.model import ModelConfig, build_model
    from reid.train.validate import validate

    ds = _write_tiny(tmp_path / "data")
    model = build_model(ModelConfig(**TINY_MODEL), pretrained=False)
    got = validate(model, ds, device=torch.device("cpu"), workers=0, batch_size=32)
    options = EvalOptions(batch_size=32, workers=0, device="cpu", use_cache=False)
    report = evaluate("market1501", tmp_path / "data", options, model=model).report
    assert set(got) == {"mAP", "mINP", "rank1", "rank5", "rank10", "rank20", "cmc", "num_queries", "num_valid_queries"}
    assert got == {k: report[k] for k in got}
    with pytest.raises(DatasetError, match="no query/gallery split to evaluate on; train it with `eval_every=0`"):
        validate(model, dataclasses.replace(ds, query=[]), device=torch.device("cpu"), workers=0)


@pytest.mark.slow
def test_short_training_lowers_loss_and_raises_map(tmp_path):
    from reid.datasets import load
    from reid.synthetic import write_market1501
    from reid.model import ModelConfig, build_model
    from reid.train.validate import validate

    write_market1501(tmp_path / "data", num_train_ids=16, num_test_ids=12, num_distractors=4, num_junk=2,
                     cameras=3, images_per_cam=2, size=(128, 64))
    ds = load("market1501", tmp_path / "data")
    mc = ModelConfig(input_size=(128, 64), d_x=64, d_h=32, d_att=32, embed_dim=128)
    before = validate(build_model(mc, pretrained=True), ds, device=torch.device("cpu"), workers=0)
    cfg = TrainConfig(epochs=16, batch_p=8, batch_k=4, lr=3e-3, backbone_lr_mult=0.3, warmup_epochs=1, eval_every=16)
    result = train(ds, tmp_path / "run", cfg, model_config=mc, pretrained=True, device="cpu", workers=0)
    records = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < 0.8 * records[0]["loss"]
    assert result.last["mAP"] > 1.5 * before["mAP"], (before, result.last)
    assert (tmp_path / "run/best/model.safetensors").is_file()
