"""`reid model`: describes the network and prints its fingerprint."""

from __future__ import annotations

import json

from typer.testing import CliRunner

import cli
from reid.model import ModelConfig, build_model, model_fingerprint, save_checkpoint

runner = CliRunner()


def test_reid_model_prints_table_with_fingerprint():
    result = runner.invoke(cli.app, ["model"])
    assert result.exit_code == 0, result.output
    fp = model_fingerprint(build_model())
    assert fp in result.stdout
    assert "16 x 8" in result.stdout and "mobilenet_v2" in result.stdout and "FLOPs" in result.stdout


def test_reid_model_json_for_a_checkpoint(tmp_path):
    model = build_model(ModelConfig(input_size=(64, 32), d_x=32, d_h=16, num_classes=3), pretrained=False)
    save_checkpoint(model, tmp_path / "m.pt")
    result = runner.invoke(cli.app, ["model", "--weights", str(tmp_path / "m.pt"), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["fingerprint"] == model_fingerprint(model)
    assert info["grid"] == [4, 2] and info["dims"]["num_classes"] == 3
    assert info["flops_per_image"]["total"] == info["flops_per_image"]["streams"] + info["flops_per_image"]["head"]
    assert info["flops_per_image"]["head"] > 0
    assert info["parameters"]["total"] == sum(p.numel() for p in model.parameters())


def test_reid_model_bad_weights_is_one_line_error(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    result = runner.invoke(cli.app, ["model", "--weights", str(tmp_path / "bad.pt")])
    assert result.exit_code == 1
    assert "error:" in result.output and "Traceback" not in result.output


def test_command_list_gives_each_command_its_summary_on_one_line():
    result = runner.invoke(cli.app, ["--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith("│ ")]
    lines = {line.strip(" │").split(maxsplit=1)[0]: line for line in rows}
    docs = {c.name: c.callback.__doc__ for c in cli.app.registered_commands}
    for name in ("index", "query", "adapt", "train", "evaluate"):
        summary = " ".join(docs[name].split("\n\n")[0].split())  # a docstring's first paragraph spans lines
        assert summary in lines[name], (name, lines.get(name))
