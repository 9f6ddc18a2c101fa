"""Checkpoints: round trips, refusal of code-carrying pickles, clear errors for mismatches."""

from __future__ import annotations

import json
import os

import pytest
import torch

from reid.errors import CheckpointError
from reid.model import ModelConfig, build_model, load_checkpoint, model_fingerprint, save_checkpoint

SMALL = ModelConfig(input_size=(64, 32), c_a=8, c_b=6, d_x=24, d_h=10, d_att=12, num_glimpses=2, embed_dim=32)


def _trained_like(num_classes: int = 0):
    """A small model whose weights and BN statistics differ from a fresh build."""
    model = build_model(SMALL.replace(num_classes=num_classes), pretrained=False).train()
    with torch.no_grad():
        model.forward_train(torch.rand(4, 3, 64, 32))  # updates BN running stats
        model.fc.weight.mul_(1.5)
    return model.eval()


@pytest.mark.parametrize("name,num_classes", [("ckpt", 0), ("ckpt", 7), ("model.pt", 0), ("model.pt", 7)])
def test_round_trip_gives_identical_embeddings(tmp_path, name, num_classes):
    model = _trained_like(num_classes)
    path = save_checkpoint(model, tmp_path / name)
    if path.suffix == ".pt":
        assert path.is_file()
    else:
        assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    loaded = load_checkpoint(path)
    assert not loaded.training
    assert loaded.config == model.config
    assert (loaded.classifier is None) == (num_classes == 0)
    x = torch.rand(3, 3, 64, 32)
    with torch.inference_mode():
        assert torch.equal(loaded(x), model(x))
    assert model_fingerprint(loaded) == model_fingerprint(model)
    assert model_fingerprint(loaded) != model_fingerprint(build_model(model.config, pretrained=False))


def test_safetensors_file_inside_a_folder_loads(tmp_path):
    model = _trained_like()
    save_checkpoint(model, tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt" / "model.safetensors")
    assert model_fingerprint(loaded) == model_fingerprint(model)


class _Payload:
    """A pickled object whose unpickling would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_carrying_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    model = build_model(SMALL, pretrained=False)
    evil = tmp_path / "evil.pt"
    torch.save({"config": SMALL.to_dict(), "state_dict": model.state_dict(), "extra": _Payload(marker)}, evil)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(evil)
    assert not marker.exists(), "the pickled payload ran"
    # the payload is real: a plain unpickle would have run it (proves the test can fail)
    import pickle

    with open(tmp_path / "raw.pkl", "wb") as fh:
        pickle.dump(_Payload(marker), fh)
    with open(tmp_path / "raw.pkl", "rb") as fh:
        pickle.load(fh)
    assert marker.exists()


def test_config_mismatch_and_missing_keys_are_clear_errors(tmp_path):
    model = _trained_like()
    folder = save_checkpoint(model, tmp_path / "ckpt")
    doc = json.loads((folder / "config.json").read_text())
    doc["config"]["d_x"] = 40
    (folder / "config.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="does not match its config.*shape"):
        load_checkpoint(folder)

    state = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    torch.save({"config": SMALL.to_dict(), "state_dict": state}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="missing weights.*fc"):
        load_checkpoint(tmp_path / "partial.pt")

    torch.save({"config": {**SMALL.to_dict(), "wings": 2}, "state_dict": model.state_dict()}, tmp_path / "cfg.pt")
    with pytest.raises(CheckpointError, match="incompatible model config.*wings"):
        load_checkpoint(tmp_path / "cfg.pt")

    torch.save({"weights": model.state_dict()}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a reid checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_corrupt_or_missing_files_are_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    folder = save_checkpoint(build_model(SMALL, pretrained=False), tmp_path / "ckpt")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(folder)
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "junk.pt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(empty)


def test_saving_over_a_folder_replaces_it_whole_and_never_drops_other_files(tmp_path):
    first, second = build_model(SMALL, pretrained=False), build_model(SMALL.replace(seed=5), pretrained=False)
    folder = save_checkpoint(first, tmp_path / "ckpt")
    save_checkpoint(second, folder)  # over an earlier checkpoint: fine
    assert model_fingerprint(load_checkpoint(folder)) == model_fingerprint(second)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    (folder / "notes.txt").write_text("the analyst's notes")
    with pytest.raises(CheckpointError, match="notes.txt"):
        save_checkpoint(first, folder)
    assert (folder / "notes.txt").read_text() == "the analyst's notes"
    assert model_fingerprint(load_checkpoint(folder)) == model_fingerprint(second)
    with pytest.raises(CheckpointError, match="is a file"):
        save_checkpoint(first, folder / "notes.txt")
