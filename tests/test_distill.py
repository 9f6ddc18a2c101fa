"""The shipped default head: head-only training from cached stream maps, the distillation recipe, loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from reid.errors import CheckpointError, InputError
from reid.model import ModelConfig, build_model, model_fingerprint
from reid.model.net import load_default_head
from reid.train.distill import (DistillConfig, distill, head_state, relational_kl, save_head,
                                within_camera_map)
from reid.train.stream_cache import (compute_stream_maps, embed_from_streams, embed_maps, open_stream_maps,
                                     streams_fingerprint)

SMALL = ModelConfig(input_size=(64, 32), c_a=8, c_b=6, d_x=18, d_h=10, d_att=12, num_glimpses=2, embed_dim=32)
TINY = DistillConfig(identities=12, cameras=3, natural=12, steps_pooled=40, steps=6, ids_per_batch=4, views_per_id=2,
                     natural_per_batch=4, eval_ids=4, eval_natural=12, lr_pooled=5e-3, stripes=2)


def _crops(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (48 + 8 * (i % 3), 24, 3), dtype=np.uint8) for i in range(n)]


def test_head_from_streams_is_forward_without_the_streams():
    model = build_model(SMALL.replace(num_classes=3)).eval()
    x = torch.rand(3, 3, 64, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model.forward_train(x)
        out = model.head_from_streams(model.stream_a(x).half(), model.stream_b(x).half())  # a float16 cache
        emb = embed_from_streams(model, model.stream_a(x), model.stream_b(x))
        assert torch.allclose(out.features, ref.features, atol=2e-3)
        assert out.logits.shape == (3, 3) and out.attention.shape == ref.attention.shape
        assert torch.allclose(emb, model(x), atol=5e-5)  # two float32 paths: rounding only
    with pytest.raises(ValueError, match="stream maps"):
        model.head_from_streams(torch.zeros(2, 8, 4), torch.zeros(2, 8, 4))


def test_stripe_head_computes_the_stripe_pooled_fit_and_attends_to_its_stripes():
    """transfer_to_head: the whole head (LSTM row counter, stripe glimpses) equals the stage-1 student."""
    from reid.train.distill import PooledHead, _embed, fit_pooled_head, transfer_to_head
    from reid.train.stream_cache import StreamMaps, stripe_rows

    torch.manual_seed(0)
    model = build_model(SMALL.replace(input_size=(128, 32), num_glimpses=4), pretrained=False)  # grid 8 x 2
    model.train()
    fa, fb = torch.rand(96, model.stream_a.out_channels, 8, 2), torch.rand(96, model.stream_b.out_channels, 8, 2)
    maps = StreamMaps(fa.numpy(), fb.numpy(), np.concatenate([fa.mean((2, 3)), fb.mean((2, 3))], 1))
    targets = np.random.default_rng(0).normal(size=(96, 32)).astype(np.float32)
    pooled = PooledHead(model, stripes=4)
    fit_pooled_head(pooled, maps, targets, sample=96)
    with torch.no_grad():
        model.bilinear.eval()
        local = model.bilinear(fa[:32], fb[:32])
    transfer_to_head(model, pooled, local, torch.Generator().manual_seed(0))
    model.eval()
    pooled.eval()
    with torch.no_grad():
        out = model.head_from_streams(fa[:16], fb[:16])
        student = _embed(pooled.bnneck, pooled(fa[:16], fb[:16]))
        whole = _embed(model.bnneck, out.features)
    assert float((student * whole).sum(1).min()) > 0.99
    rows = out.attention.sum(3)  # [B, K, Gh]: attention mass per grid row
    for g, r in enumerate(stripe_rows(8, 4)):
        assert float(rows[:, g, r].sum(1).min()) > 0.99, (g, rows[0, g])
    with pytest.raises(ValueError, match="stripes need"):  # no spare LSTM unit for the row counter
        transfer_to_head(build_model(SMALL.replace(d_x=20), pretrained=False), PooledHead(model, stripes=2), local,
                         torch.Generator())


def test_stripe_pools_split_the_grid_rows():
    from reid.train.stream_cache import StreamMaps, stripe_rows

    assert stripe_rows(16, 4) == [slice(0, 4), slice(4, 8), slice(8, 12), slice(12, 16)]
    assert [r.stop - r.start for r in stripe_rows(7, 3)] == [2, 3, 2]
    with pytest.raises(InputError):
        stripe_rows(4, 5)
    a = np.zeros((1, 2, 4, 1), np.float32)
    a[0, 0, :2] = 1.0  # channel 0 lights the top half, channel 1 the bottom half
    a[0, 1, 2:] = 1.0
    maps = StreamMaps(a, a.copy(), np.concatenate([a.mean((2, 3)), a.mean((2, 3))], 1))
    f = maps.pooled_features("a", stripes=2)
    assert np.allclose(f, np.array([[1, 0, 0, 1]]) / np.sqrt(2))  # stripes top to bottom, then L2
    assert np.allclose(maps.pooled_features("ab", stripes=2), np.array([[1, 0, 1, 0, 0, 1, 0, 1]]) / 2)
    assert np.allclose(maps.pooled_features("b"), np.array([[1, 1]]) / np.sqrt(2))  # one stripe: the whole grid
    for stripes in (1, 2):
        with pytest.raises(InputError, match="pooled part"):
            maps.pooled_features("c", stripes)


def test_stream_maps_cache_round_trip_and_refuses_other_crops(tmp_path):
    from reid.embed import embed_images

    model = build_model(SMALL)
    crops = _crops(5)
    maps = compute_stream_maps(model, crops, batch_size=2, folder=tmp_path / "c", key="five")
    assert maps.a.dtype == np.float16 and maps.a.shape == (5, model.stream_a.out_channels, 4, 2)
    assert maps.pooled.dtype == np.float32 and maps.pooled.shape == (5, sum(maps.channels))
    again = open_stream_maps(tmp_path / "c", key="five", model=model)
    assert again is not None and np.array_equal(np.asarray(again.a), maps.a)
    assert np.array_equal(again.pooled, maps.pooled)
    assert open_stream_maps(tmp_path / "c", key="six", model=model) is None
    other = build_model(SMALL.replace(output_stride=32))  # other streams: other maps
    assert streams_fingerprint(other) != streams_fingerprint(model)
    assert streams_fingerprint(build_model(SMALL.replace(c_a=4))) == streams_fingerprint(model)  # the head is not in it
    assert open_stream_maps(tmp_path / "c", key="five", model=other) is None
    with pytest.raises(InputError, match="float32"):  # untrained streams' maps are ~1e-8: float16 would zero them
        compute_stream_maps(build_model(SMALL, pretrained=False), crops)
    exact = compute_stream_maps(build_model(SMALL, pretrained=False), crops, dtype=np.float32)
    assert exact.a.dtype == np.float32 and np.abs(exact.a).max() > 0
    # the head on cached maps embeds as the whole network does (float16 maps: cosine ~1)
    got, ref = embed_maps(model, maps), embed_images(model, crops)
    assert got.shape == ref.shape and (got * ref).sum(1).min() > 0.999
    assert np.allclose(maps.pooled_features("ab").dot(maps.pooled_features("ab").T).diagonal(), 1, atol=1e-5)


def test_relational_kl_is_zero_for_the_teachers_own_geometry():
    t = torch.nn.functional.normalize(torch.randn(6, 5), dim=1)
    assert relational_kl(t, t, 0.1).abs() < 1e-6
    assert relational_kl(torch.nn.functional.normalize(torch.randn(6, 5), dim=1), t, 0.1) > 1e-3


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    torch.set_num_threads(2)
    cache = tmp_path_factory.mktemp("distill-cache")
    return cache, distill(TINY, cache=cache, config=SMALL)


def test_within_camera_map_ranks_each_crop_against_its_own_camera_only():
    deg = np.radians([0, 90, 10, 100, 0, 50])
    feats = np.stack([np.cos(deg), np.sin(deg)], 1) * np.array([[1], [2], [1], [3], [1], [1]])  # scale is ignored
    pids = np.array([1, 1, 2, 2, 1, 3])
    cams = np.array([1, 1, 1, 1, 2, 2])  # camera 2: person 1's crop has no mate there, person 3 is alone
    # crop 0 ranks 2, 1, 3 (its mate 2nd: AP 1/2); crop 1: 3, 2, 0 (1/3); crop 2: 0, 1, 3 (1/3); crop 3: 1, 2, 0 (1/2)
    assert within_camera_map(feats, pids, cams) == pytest.approx((1 / 2 + 1 / 3 + 1 / 3 + 1 / 2) / 4)
    assert within_camera_map(np.repeat(np.eye(2), 2, axis=0), np.array([1, 1, 2, 2]), np.ones(4, int)) == 1.0


def test_tiny_distillation_lowers_its_loss_and_reports_figures(tiny_run):
    _, (model, report) = tiny_run
    pooled = [h for h in report["history"] if h["stage"] == "pooled"]
    head = [h for h in report["history"] if h["stage"] == "head"]
    assert pooled and head
    first, last = pooled[0], pooled[-1]
    assert last["loss"] < first["loss"] and last["cos"] < first["cos"], (first, last)
    assert {"stream A pooled", "streams A+B pooled", "teacher", "seeded head", "trained head"} <= set(report["figures"])
    for fig in report["figures"].values():
        assert 0 <= fig["mAP"] <= 1 and 0 <= fig["knn_natural"] <= 1 and 0 <= fig["within_camera_mAP"] <= 1
    assert report["figures"]["teacher"]["knn_natural"] == 1.0
    assert not model.training
    assert set(head_state(model)) == {k for k in model.state_dict() if not k.startswith(("stream_a.", "stream_b."))}


def test_tiny_distillation_is_deterministic_for_its_seed(tiny_run):
    cache, (model, _) = tiny_run
    again, _ = distill(TINY, cache=cache, config=SMALL)  # from the cached maps: the same crops
    a, b = head_state(model), head_state(again)
    assert all(torch.equal(a[k], b[k]) for k in a)
    other, _ = distill(TINY.replace(seed=1), cache=cache / "other", config=SMALL)
    assert not torch.equal(head_state(other)["fc.weight"], a["fc.weight"])


def test_saved_head_records_its_recipe_fingerprint_and_environment(tiny_run, tmp_path):
    _, (model, report) = tiny_run
    path = save_head(model, report, tmp_path / "weights", "python -m reid.train.distill --out weights")
    doc = json.loads(path.with_suffix(".json").read_text())
    assert doc["fingerprint"] == model_fingerprint(model) and doc["bytes"] == path.stat().st_size
    assert doc["recipe"] == TINY.to_dict() and doc["figures"] == report["figures"]
    env = doc["environment"]
    assert env["numpy"] == np.__version__ and env["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert env["torch_cpu_capability"] and env["cpu"] is not None
    fresh = build_model(SMALL, trained_head=False)  # what bench_quality.py --head FILE does with a candidate
    load_default_head(fresh, path)
    assert model_fingerprint(fresh) == model_fingerprint(model)
    with pytest.raises(CheckpointError, match="does not match"):
        load_default_head(build_model(SMALL.replace(embed_dim=16), trained_head=False), path)


# --- the shipped head -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_pair():
    return build_model(), build_model(trained_head=False)


def test_shipped_head_loads_with_every_key_matched(default_pair):
    from safetensors.torch import load_file

    from reid.model.net import default_head_path

    trained, seeded = default_pair
    path = default_head_path()
    state = load_file(str(path))
    head_keys = {k for k in trained.state_dict() if not k.startswith(("stream_a.", "stream_b."))}
    assert set(state) == head_keys
    live = trained.state_dict()
    assert all(torch.equal(live[k], v) for k, v in state.items())
    assert not torch.equal(seeded.fc.weight, trained.fc.weight)
    assert path.stat().st_size < 8 * 2**20  # a few MB: the streams ship in their own packages
    doc = json.loads(path.with_suffix(".json").read_text())
    assert doc["fingerprint"] == model_fingerprint(trained)
    assert {"recipe", "seed", "date", "figures", "command"} <= set(doc)


def test_default_fingerprint_is_stable_and_new(default_pair):
    from reid.errors import ModelMismatchError
    from reid.model.identity import ModelRef

    trained, seeded = default_pair
    fp = model_fingerprint(trained)
    assert model_fingerprint(build_model()) == fp
    assert model_fingerprint(seeded) != fp
    with pytest.raises(ModelMismatchError):  # a gallery indexed with the old seeded default is refused
        ModelRef.of(trained, "default").require_same(ModelRef.of(seeded, "default"), "indexes/default")


def test_only_the_default_config_gets_the_shipped_head(default_pair):
    trained, seeded = default_pair
    training = build_model(ModelConfig(num_classes=7))  # what `reid train` starts from: shipped head, new classifier
    live, ref = training.state_dict(), trained.state_dict()
    assert all(torch.equal(live[k], ref[k]) for k in ref)
    assert training.classifier is not None and training.classifier.weight.shape == (7, 512)
    other = build_model(ModelConfig(seed=1))
    assert not torch.equal(other.fc.weight, trained.fc.weight) and not torch.equal(other.fc.weight, seeded.fc.weight)
    untrained = build_model(pretrained=False)  # no ImageNet streams: the head would not fit them
    assert not torch.equal(untrained.fc.weight, trained.fc.weight)


def test_a_missing_or_foreign_head_file_is_a_clear_error(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    import reid.model.net as net
    from reid.errors import CheckpointError

    monkeypatch.setattr(net, "default_head_path", lambda: tmp_path / "absent.safetensors")
    with pytest.raises(CheckpointError, match="missing or unreadable"):
        build_model()
    save_file({"fc.weight": torch.zeros(3, 3)}, str(tmp_path / "foreign.safetensors"))
    monkeypatch.setattr(net, "default_head_path", lambda: tmp_path / "foreign.safetensors")
    with pytest.raises(CheckpointError, match="does not match the default config"):
        build_model()
    assert build_model(trained_head=False) is not None  # the seeded head needs no file
