"""The optional torchvision streams (VGG-16, ResNet-50): grids, weights from a local file, errors, checkpoints.

Weight files are written here from torchvision's randomly initialised models; nothing is downloaded.
Inputs are tiny (64x32) so VGG-16 stays cheap.
"""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import cli
from reid.errors import CheckpointError, InputError
from reid.model import ModelConfig, build_model, load_checkpoint, model_fingerprint, save_checkpoint
from reid.model.fusion import ConvAct
from reid.model.net import make_stream
from reid.model.streams import StreamA, grid_size
from reid.model.torchvision_streams import ResNet50Stream, VGG16Stream, load_torchvision_weights

tvm = pytest.importorskip("torchvision.models")

SMALL = dict(input_size=(64, 32), c_a=8, c_b=8, d_x=16, d_h=8, d_att=8, num_glimpses=1, embed_dim=16)


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory):
    """torchvision's resnet50 state dict (fc included), as torch.hub stores it."""
    torch.manual_seed(7)
    state = tvm.resnet50().state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet50-0676ba61.pth"
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """torchvision's vgg16 feature tensors under their keys plus the last classifier layer.

    classifier.0 and .3 (400 MB) are left out to keep the test fast; test_full_vgg16_file (slow) writes them.
    """
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(8)
    state = {f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()}
    state["classifier.6.weight"] = torch.randn(1000, 4096)
    state["classifier.6.bias"] = torch.randn(1000)
    path = tmp_path_factory.mktemp("weights") / "vgg16-397923af.pth"
    torch.save(state, path)
    return path, state


def _randomise_batchnorm(model: nn.Module, seed: int) -> None:
    """Non-trivial BN statistics and affine parameters, so folding them is actually exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)


# --- shapes and grids --------------------------------------------------------------------------


@pytest.mark.parametrize("cls, channels", [(VGG16Stream, 512), (ResNet50Stream, 2048)])
@pytest.mark.parametrize("stride", [16, 32])
def test_paper_stream_gives_the_configured_grid(cls, channels, stride):
    stream = cls(output_stride=stride).eval()
    assert stream.out_channels == channels
    with torch.inference_mode():
        y = stream(torch.rand(2, 3, 64, 32))
    assert y.shape == (2, channels, *grid_size((64, 32), stride))
    assert y.shape[2:] == ((4, 2) if stride == 16 else (2, 1))
    if cls is VGG16Stream:  # the last max-pool goes at stride 16 only
        assert sum(isinstance(m, nn.MaxPool2d) for m in stream.features) == (4 if stride == 16 else 5)
    else:
        assert stream.layer4[0].conv2.stride == ((1, 1) if stride == 16 else (2, 2))
        assert stream.layer4[0].downsample[0].stride == stream.layer4[0].conv2.stride


def test_resnet50_rounds_odd_sizes_up_like_the_default_streams():
    x = torch.rand(1, 3, 72, 40)  # 72 -> 36 -> 18 -> 9 -> 5, 40 -> 20 -> 10 -> 5 -> 3
    with torch.inference_mode():
        r = ResNet50Stream(output_stride=16).eval()(x)
        a = StreamA(output_stride=16, pretrained=False).eval()(x)
    assert r.shape[2:] == a.shape[2:] == grid_size((72, 40), 16) == (5, 3)
    assert ModelConfig(input_size=(72, 40), stream_a="resnet50").grid == (5, 3)


def test_model_config_accepts_the_four_streams_and_refuses_bad_combinations():
    assert ModelConfig(stream_a="vgg16", stream_b="resnet50", input_size=(64, 32)).grid == (4, 2)
    assert ModelConfig(stream_a="efficientnet_lite0", stream_b="mobilenet_v2").stream_a == "efficientnet_lite0"
    with pytest.raises(ValueError, match="both 'resnet50'.*two different"):
        ModelConfig(stream_a="resnet50", stream_b="resnet50")
    with pytest.raises(ValueError, match="unknown stream_b 'vgg19'.*vgg16, resnet50"):
        ModelConfig(stream_b="vgg19")
    with pytest.raises(ValueError, match="vgg16 stream, input_size 72x40 must be a multiple of output_stride 16"):
        ModelConfig(stream_a="vgg16", input_size=(72, 40))
    with pytest.raises(ValueError, match="multiple of output_stride 32"):
        ModelConfig(stream_b="vgg16", input_size=(64, 48), output_stride=32)
    assert ModelConfig(stream_b="vgg16", input_size=(64, 48)).grid == (4, 3)  # 48 is a multiple of 16


# --- weights from a local file -----------------------------------------------------------------


def test_resnet50_file_loads_exactly_those_weights(resnet_file):
    path, state = resnet_file
    model = build_model(ModelConfig(stream_a="resnet50", **SMALL), stream_weights={"a": path})
    trunk = model.stream_a.state_dict()
    assert len(trunk) == len(state) - 2  # everything but fc.weight / fc.bias
    for k, v in trunk.items():
        assert torch.equal(v, state[k]), k
    assert torch.equal(model.stream_a.layer3[2].conv2.weight, state["layer3.2.conv2.weight"])
    fresh = build_model(ModelConfig(stream_a="resnet50", **SMALL), pretrained=False)
    assert not torch.equal(fresh.stream_a.conv1.weight, state["conv1.weight"])


def test_vgg16_file_loads_and_drops_the_classifier(vgg_file):
    path, state = vgg_file
    stream = VGG16Stream(output_stride=16, weights=path)
    assert set(stream.state_dict()) == {k for k in state if k.startswith("features.")}
    assert torch.equal(stream.features[28].weight, state["features.28.weight"])
    assert torch.equal(stream.features[0].bias, state["features.0.bias"])


def test_safetensors_file_is_read_too(resnet_file, tmp_path):
    from safetensors.torch import save_file

    path, state = resnet_file
    trunk = {k: v.contiguous() for k, v in state.items() if not k.startswith("fc.")}
    trunk = {k: v for k, v in trunk.items() if not k.endswith("num_batches_tracked")}  # optional counters
    save_file(trunk, str(tmp_path / "r50.safetensors"))
    stream = ResNet50Stream(weights=tmp_path / "r50.safetensors")
    assert torch.equal(stream.layer4[2].bn3.running_var, state["layer4.2.bn3.running_var"])


class _NotATensor:
    pass


def _bad_file_error(stream: nn.Module, path, arch: str, files: tuple[str, ...], classifier: str) -> str:
    with pytest.raises(CheckpointError) as e:
        load_torchvision_weights(stream, path, arch=arch, files=files, classifier=classifier)
    message = str(e.value)
    assert "\n" not in message and files[0] in message, message
    return message


def test_bad_weight_files_are_one_line_checkpoint_errors(resnet_file, vgg_file, tmp_path):
    path, state = resnet_file
    stream = ResNet50Stream()
    before = stream.conv1.weight.clone()
    args = ("resnet50", ("resnet50-0676ba61.pth", "resnet50-11ad3fa6.pth"), "fc.")

    missing = dict(state)
    del missing["layer2.0.conv1.weight"]
    torch.save(missing, tmp_path / "missing.pth")
    error = _bad_file_error(stream, tmp_path / "missing.pth", *args)
    assert "1 trunk tensors missing ['layer2.0.conv1.weight']" in error

    wrong = dict(state, **{"layer1.0.conv1.weight": torch.zeros(64, 64, 3, 3)})
    torch.save(wrong, tmp_path / "wrong.pth")
    assert "layer1.0.conv1.weight has shape (64, 64, 3, 3), the trunk needs (64, 64, 1, 1)" in \
        _bad_file_error(stream, tmp_path / "wrong.pth", *args)

    with open(tmp_path / "object.pth", "wb") as f:
        pickle.dump(_NotATensor(), f, protocol=2)
    assert "refused to read" in _bad_file_error(stream, tmp_path / "object.pth", *args)

    torch.save([state["conv1.weight"]], tmp_path / "list.pth")
    assert "flat state dict of tensors" in _bad_file_error(stream, tmp_path / "list.pth", *args)

    assert "does not exist" in _bad_file_error(stream, tmp_path / "nowhere.pth", *args)
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    assert "safetensors" in _bad_file_error(stream, tmp_path / "bad.safetensors", *args)

    # a VGG-16 file is not a ResNet-50 file
    assert "unexpected ['features.0.weight'" in _bad_file_error(stream, vgg_file[0], *args)
    assert torch.equal(stream.conv1.weight, before)  # nothing was half-loaded


def test_file_streams_need_a_file_when_pretrained():
    with pytest.raises(CheckpointError, match=r"stream a \(resnet50\).*nothing is downloaded.*`stream_weights\['a'\]`"):
        build_model(ModelConfig(stream_a="resnet50", **SMALL))
    with pytest.raises(CheckpointError, match=r"`stream_weights\['b'\]` PATH.*vgg16-397923af\.pth.*`pretrained=False`"):
        build_model(ModelConfig(stream_b="vgg16", **SMALL), stream_weights={"a": None})


def test_stream_weight_options_that_cannot_apply_are_refused(resnet_file):
    path, _ = resnet_file
    with pytest.raises(InputError, match="stream a is mobilenet_v2, whose ImageNet weights are packaged"):
        build_model(ModelConfig(**SMALL), stream_weights={"a": path})
    with pytest.raises(InputError, match="untrained model"):
        build_model(ModelConfig(stream_b="resnet50", **SMALL), pretrained=False, stream_weights={"b": path})
    with pytest.raises(InputError, match="keys are 'a' and 'b', not 'c'"):
        build_model(ModelConfig(**SMALL), stream_weights={"c": path})
    with pytest.raises(CheckpointError, match="does not exist"):
        make_stream("b", "resnet50", output_stride=16, pretrained=True, weights=path.parent / "none.pth")


# --- seeding, checkpoints, fusion --------------------------------------------------------------


def test_untrained_file_streams_are_seeded_by_the_config():
    torch.manual_seed(123)  # the global generator is not what seeds them
    first = build_model(ModelConfig(stream_a="resnet50", stream_b="vgg16", seed=4, **SMALL), pretrained=False)
    second = build_model(ModelConfig(stream_a="resnet50", stream_b="vgg16", seed=4, **SMALL), pretrained=False)
    assert torch.equal(first.stream_a.conv1.weight, second.stream_a.conv1.weight)
    assert torch.equal(first.stream_b.features[0].weight, second.stream_b.features[0].weight)


@pytest.fixture(scope="module")
def paper_model():
    model = build_model(ModelConfig(stream_a="vgg16", stream_b="resnet50", num_classes=3, **SMALL), pretrained=False)
    _randomise_batchnorm(model, seed=3)
    return model


@pytest.fixture(scope="module")
def paper_checkpoint(paper_model, tmp_path_factory):
    return save_checkpoint(paper_model, tmp_path_factory.mktemp("ckpt") / "paper")


def test_checkpoint_round_trip_without_weight_files(paper_model, paper_checkpoint):
    x = torch.rand(2, 3, 64, 32, generator=torch.Generator().manual_seed(0))
    loaded = load_checkpoint(paper_checkpoint)  # builds untrained streams, then loads every tensor
    assert (loaded.config.stream_a, loaded.config.stream_b) == ("vgg16", "resnet50")
    assert isinstance(loaded.stream_a, VGG16Stream) and isinstance(loaded.stream_b, ResNet50Stream)
    expected = paper_model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())
    with torch.inference_mode():
        assert torch.equal(loaded(x), paper_model(x))


def test_fused_inference_equals_the_trained_layers_for_paper_streams(paper_model):
    x = torch.rand(2, 3, 64, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fused = paper_model(x)
        fused_a, fused_b, _ = paper_model._front()
        with paper_model.run_mode(fused=False):
            plain = paper_model(x)
            ref_a, ref_b = paper_model.stream_a(x), paper_model.stream_b(x)
        assert fused_b is not paper_model.stream_b
        assert not any(isinstance(m, nn.BatchNorm2d) for m in fused_b.modules())  # every BN folded
        # Bottleneck calls its one ReLU three times: it must stay a ReLU, not be fused into conv3
        assert type(fused_b.layer1[0].relu) is nn.ReLU
        if torch.backends.mkldnn.is_available():  # VGG's conv + ReLU pairs run as one oneDNN call
            assert sum(isinstance(m, ConvAct) and m.attr == "relu" for m in fused_a.modules()) == 13
        for got, ref in ((fused_a(x), ref_a), (fused_b(x), ref_b)):  # float rounding, relative to the scale
            assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert torch.allclose(fused, plain, atol=1e-5)


def test_reid_model_describes_a_paper_stream_checkpoint(paper_model, paper_checkpoint):
    import json

    runner = CliRunner()
    result = runner.invoke(cli.app, ["model", "--weights", str(paper_checkpoint), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["streams"] == {"a": "vgg16 (512 ch, ImageNet mean/std)", "b": "resnet50 (2048 ch, ImageNet mean/std)"}
    assert info["fingerprint"] == model_fingerprint(paper_model) and info["grid"] == [4, 2]
    result = runner.invoke(cli.app, ["model", "--stream-a", "resnet50"])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and result.output.startswith("error:")
    assert "--stream-a-weights" in result.output
    result = runner.invoke(cli.app, ["model", "--weights", str(paper_checkpoint), "--stream-b", "vgg16"])
    assert result.exit_code == 1 and "carries its own model config" in result.output


@pytest.mark.slow
def test_full_vgg16_file(tmp_path):
    """torchvision's whole vgg16 state dict (553 MB, classifier included) loads into the stream."""
    torch.manual_seed(9)
    state = tvm.vgg16().state_dict()
    torch.save(state, tmp_path / "vgg16-397923af.pth")
    stream = VGG16Stream(output_stride=32, weights=tmp_path / "vgg16-397923af.pth")
    assert set(stream.state_dict()) == {k for k in state if k.startswith("features.")}
    assert torch.equal(stream.features[10].weight, state["features.10.weight"])
