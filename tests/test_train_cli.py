"""`reid train`: one-line errors with exit code 1, and a short run through the command."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cli import app
from reid.synthetic import write_market1501

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, ["train", *map(str, args)])


def _one_line_error(result, *fragments):
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output


@pytest.fixture
def tiny_market(tmp_path):
    write_market1501(tmp_path / "data", num_train_ids=6, num_test_ids=4, num_distractors=2, num_junk=1,
                     cameras=2, images_per_cam=2, size=(64, 32))
    return tmp_path / "data"


def test_wrong_root(tmp_path):
    result = invoke("market1501", "--root", tmp_path / "nowhere", "--out", tmp_path / "run")
    _one_line_error(result, "Market-1501")


def test_unknown_dataset(tmp_path):
    _one_line_error(invoke("imagenet", "--root", tmp_path), "unknown dataset")


def test_dataset_without_training_identities(tmp_path):
    write_market1501(tmp_path / "data", num_train_ids=0, num_test_ids=4, cameras=2, size=(64, 32))
    result = invoke("market1501", "--root", tmp_path / "data", "--out", tmp_path / "run", "--no-pretrained")
    _one_line_error(result, "no training images")


def test_batch_larger_than_the_data(tiny_market, tmp_path):
    result = invoke("market1501", "--root", tiny_market, "--out", tmp_path / "run", "--batch-p", 7, "--no-pretrained")
    _one_line_error(result, "P=7", "has 6", "lower --batch-p")


def test_bad_options(tiny_market, tmp_path):
    _one_line_error(invoke("market1501", "--root", tiny_market, "--input-size", "big"), "--input-size")
    _one_line_error(invoke("market1501", "--root", tiny_market, "--schedule", "linear"), "unknown --schedule")
    _one_line_error(invoke("market1501", "--root", tiny_market, "--milestones", "a,b"), "--milestones")
    _one_line_error(invoke("market1501", "--root", tiny_market, "--precision", "fp8"), "unknown --precision")


def test_resume_errors(tiny_market, tmp_path):
    _one_line_error(invoke("market1501", "--root", tiny_market, "--out", tmp_path / "run", "--resume"),
                    "nothing to resume")
    # A run on one dataset cannot be resumed on another (different identities).
    from reid.datasets import load
    from reid.model import ModelConfig
    from reid.train import TrainConfig, train

    write_market1501(tmp_path / "other", num_train_ids=5, num_test_ids=4, cameras=2, size=(64, 32), seed=3)
    train(load("market1501", tmp_path / "other"), tmp_path / "run", TrainConfig(epochs=1, batch_p=2, batch_k=2,
          eval_every=0), model_config=ModelConfig(input_size=(64, 32), d_x=16, d_h=8, d_att=8, embed_dim=16),
          pretrained=False, device="cpu", workers=0)
    result = invoke("market1501", "--root", tiny_market, "--out", tmp_path / "run", "--resume")
    _one_line_error(result, "was trained on", "choose another --out")
    result = invoke("market1501", "--root", tmp_path / "other", "--out", tmp_path / "run", "--epochs", 2)
    _one_line_error(result, "already holds a training run", "--resume")
    result = invoke("market1501", "--root", tmp_path / "other", "--out", tmp_path / "run", "--resume",
                    "--batch-k", 3)
    _one_line_error(result, "batch_k=2", "not 3")


def test_train_command_runs_and_resumes(tiny_market, tmp_path):
    run = tmp_path / "run"
    common = ["market1501", "--root", tiny_market, "--out", run, "--batch-p", 3, "--batch-k", 2,
              "--input-size", "64x32", "--no-pretrained", "--workers", 0, "--eval-every", 0, "--json"]
    result = invoke(*common, "--epochs", 1)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["epochs_done"] == 1 and summary["last"]["epoch"] == 1 and summary["images_per_s"] > 0
    assert (run / "last" / "model.safetensors").is_file()
    # --resume keeps the recorded settings and runs only the missing epoch.
    result = invoke(*common, "--epochs", 2, "--resume")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["epochs_done"] == 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert json.loads((run / "train.json").read_text())["config"]["epochs"] == 2


def test_train_help_lists_the_stream_options():
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for option in ("--stream-a ", "--stream-b ", "--stream-a-weights", "--stream-b-weights", "vgg16", "resnet50"):
        assert option in result.output, option


def test_stream_option_errors(tiny_market, tmp_path):
    run = tmp_path / "run"
    common = ["market1501", "--root", tiny_market, "--out", run]
    _one_line_error(invoke(*common, "--stream-a", "resnet50"), "--stream-a-weights PATH", "nothing is downloaded")
    assert not run.exists()
    _one_line_error(invoke(*common, "--stream-a", "efficientnet_lite0"), "both 'efficientnet_lite0'", "two different")
    _one_line_error(invoke(*common, "--stream-b", "vgg16", "--input-size", "72x40", "--no-pretrained"),
                    "input_size 72x40 must be a multiple of output_stride 16")
    _one_line_error(invoke(*common, "--stream-b", "alexnet"), "unknown stream_b 'alexnet'")
    _one_line_error(invoke(*common, "--stream-a-weights", tmp_path / "w.pth"), "stream a is mobilenet_v2")
    _one_line_error(invoke(*common, "--stream-b", "resnet50", "--stream-b-weights", tmp_path / "none.pth"),
                    "none.pth does not exist", "resnet50-0676ba61.pth")


def test_train_starts_a_resnet50_stream_from_its_weights_file(tiny_market, tmp_path):
    import torch
    from torchvision.models import resnet50

    from reid.model import load_checkpoint

    torch.manual_seed(5)
    state = resnet50().state_dict()
    torch.save(state, tmp_path / "resnet50-11ad3fa6.pth")
    run = tmp_path / "run"
    result = invoke("market1501", "--root", tiny_market, "--out", run, "--batch-p", 3, "--batch-k", 2,
                    "--input-size", "64x32", "--stream-a", "resnet50", "--stream-a-weights",
                    tmp_path / "resnet50-11ad3fa6.pth", "--freeze-backbone-epochs", 1, "--epochs", 1,
                    "--workers", 0, "--eval-every", 0, "--json")
    assert result.exit_code == 0, result.output
    model = load_checkpoint(run / "last")
    assert (model.config.stream_a, model.config.stream_b) == ("resnet50", "efficientnet_lite0")
    assert json.loads((run / "train.json").read_text())["model_config"]["stream_a"] == "resnet50"
    trunk = model.stream_a.state_dict()
    assert len(trunk) == len(state) - 2  # all but fc
    for k, v in trunk.items():  # the backbone was frozen for the one epoch: still exactly the file's weights
        assert torch.equal(v, state[k]), k
