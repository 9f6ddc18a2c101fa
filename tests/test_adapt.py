"""reid adapt: pseudo-labels, proxy memory, the resumable adaptation run and its command."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from reid.errors import InputError
from reid.model import ModelConfig, build_model, load_checkpoint, save_checkpoint
from reid.train.adapt import AdaptConfig, adapt
from reid.train.pseudo_labels import Clusters, ProxyMemory, cluster_features

TINY = ModelConfig(input_size=(64, 32), output_stride=32, c_a=4, c_b=4, d_x=16, d_h=8, d_att=8, num_glimpses=1,
                   embed_dim=16)
FAST = AdaptConfig(epochs=2, batch_p=4, batch_k=2, views=2, k1=4, k2=2, min_samples=2, eps=0.7)


def blobs(seed=0, ids=5, per=6, dim=8, spread=0.05):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((ids, dim))
    x = np.repeat(centres, per, axis=0) + spread * rng.standard_normal((ids * per, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), np.repeat(np.arange(ids), per)


def test_clusters_recover_well_separated_identities():
    x, truth = blobs()
    found = cluster_features(x, k1=5, k2=2, min_samples=3)
    assert found.num_clusters == 5 and found.num_outliers == 0
    for c in range(5):  # each cluster is exactly one identity
        assert len(set(truth[found.labels == c])) == 1


def test_the_automatic_radius_follows_the_distances():
    from reid.train.pseudo_labels import auto_eps

    d = np.array([[0, 0.1, 0.2, 0.9], [0.1, 0, 0.3, 0.8], [0.2, 0.3, 0, 0.7], [0.9, 0.8, 0.7, 0]])
    assert auto_eps(d, rho=0.01) == pytest.approx((0.1 + 0.2 + 0.3 + 0.7) / 4)  # at least one pair per crop
    assert auto_eps(d, rho=0.9) == pytest.approx((0.1 + 0.2 + 0.3 + 0.7 + 0.8) / 5)  # 90% of the 6 pairs
    x, truth = blobs(spread=0.3)
    found = cluster_features(x, eps=None, k1=5, k2=2, min_samples=3)
    assert 0 < found.eps < 0.6 and found.num_clusters >= 1
    for c in range(found.num_clusters):  # what it clusters, it clusters right
        assert len(set(truth[found.labels == c])) == 1
    assert cluster_features(x, eps=0.4, k1=5, k2=2, min_samples=3).eps == 0.4


def test_each_cameras_mean_is_taken_away_before_clustering():
    from reid.train.pseudo_labels import centre_cameras

    rng = np.random.default_rng(0)
    ids, cams, per, dim = 4, 3, 3, 16
    person, camera = rng.standard_normal((ids, dim)), 3.0 * rng.standard_normal((cams, dim))
    pid, cam = np.repeat(np.arange(ids), cams * per), np.tile(np.repeat(np.arange(cams), per), ids)
    x = person[pid] + camera[cam] + 0.05 * rng.standard_normal((len(pid), dim))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # a camera's cast outweighs the person

    def purity(labels, truth):
        return all(len(set(truth[labels == c])) == 1 for c in range(labels.max() + 1))

    raw = cluster_features(x, eps=0.5, k1=8, k2=2, min_samples=2)
    assert purity(raw.labels, cam) and not purity(raw.labels, pid)  # the crops group by camera ...
    centred = cluster_features(x, eps=0.5, k1=8, k2=2, min_samples=2, cameras=cam + 1)
    assert centred.num_clusters == ids and centred.num_outliers == 0 and purity(centred.labels, pid)  # ... or person
    c = centre_cameras(x, cam)
    assert np.allclose(np.linalg.norm(c, axis=1), 1, atol=1e-5)
    one = cluster_features(x, eps=0.5, k1=8, k2=2, min_samples=2, cameras=np.ones(len(x), int))
    assert np.array_equal(one.labels, raw.labels)  # one camera: nothing between cameras to take away
    lonely = centre_cameras(x[: per + 1], np.array([0] * per + [1]))  # a camera's only crop is left as it is
    assert np.allclose(lonely[-1], x[per]) and np.isfinite(lonely).all()


def test_tracklets_are_must_links():
    x, truth = blobs(ids=4, per=5)
    tracks = np.full(len(x), -1)
    tracks[truth < 2] = 0  # two identities declared one tracklet: they must end in one cluster
    found = cluster_features(x, k1=4, k2=2, min_samples=3, tracklets=tracks)
    assert len(set(found.labels[truth < 2])) == 1 and found.labels[0] >= 0


def test_proxy_memory_loss_prefers_the_own_cluster_and_counts_every_camera_proxy():
    x, truth = blobs(ids=3, per=4)
    cams = np.tile([1, 2], 6)
    memory = ProxyMemory(x, Clusters(truth), cams, temperature=0.1)
    assert len(memory) == 6  # a proxy per (cluster, camera)
    f = torch.from_numpy(x)
    idx = torch.arange(len(x))
    right = memory.loss(f, idx)
    # each wrong cluster holds half of one person and half of another (a roll by a whole person, 4, would only
    # rename the clusters: the same loss up to rounding)
    wrong = ProxyMemory(x, Clusters(np.roll(truth, 2)), cams, temperature=0.1).loss(f, idx)
    assert right < wrong
    before = memory.memory.clone()
    memory.update(f[:1], idx[:1])
    moved = (memory.memory - before).norm(dim=1) > 0
    assert moved.sum() == 1 and torch.allclose(memory.memory.norm(dim=1), torch.ones(6))


@pytest.fixture
def gallery(tmp_path):
    from reid.synthetic import write_folder

    root = write_folder(tmp_path / "data", num_train_ids=0, num_test_ids=6, num_distractors=0, cameras=2,
                        images_per_cam=3, seed=3, size=(64, 32), with_train=False)
    return root / "gallery"


@pytest.fixture
def tiny_ckpt(tmp_path):
    return save_checkpoint(build_model(TINY), tmp_path / "tiny")  # ImageNet streams: real maps


def test_adapt_end_to_end_writes_a_usable_checkpoint(gallery, tiny_ckpt, tmp_path):
    seen = []
    result = adapt(gallery, tmp_path / "run", weights=tiny_ckpt, config=FAST, device="cpu", on_epoch=seen.append)
    assert result.epochs_done == 2 and [r["epoch"] for r in seen] == [1, 2]
    assert all({"clusters", "outliers", "loss"} <= set(r) for r in seen)
    adapted = load_checkpoint(result.checkpoint)
    original = load_checkpoint(tiny_ckpt)
    assert adapted.config == original.config
    changed = [k for k, v in adapted.state_dict().items() if not torch.equal(v, original.state_dict()[k])]
    assert changed and all(not k.startswith(("stream_a.", "stream_b.")) for k in changed)  # streams frozen
    assert (tmp_path / "run" / "adapt.jsonl").read_text().count("\n") == 2


def test_fine_tuning_trains_the_streams_too_without_a_stream_cache(gallery, tiny_ckpt, tmp_path):
    from dataclasses import replace

    config = replace(FAST, fine_tune=True)
    result = adapt(gallery, tmp_path / "run", weights=tiny_ckpt, config=config, device="cpu")
    assert result.epochs_done == 2 and all(r["steps"] > 0 for r in result.records)
    adapted, original = load_checkpoint(result.checkpoint).state_dict(), load_checkpoint(tiny_ckpt).state_dict()
    changed = {k.split(".")[0] for k, v in adapted.items() if not torch.equal(v, original[k])}
    assert {"stream_a", "stream_b"} <= changed and len(changed) > 2  # the streams and the head
    assert not (tmp_path / "run" / "cache").exists()
    again = adapt(gallery, tmp_path / "run", weights=tiny_ckpt, config=config, device="cpu")  # finished: kept
    assert again.epochs_done == 2 and len(again.records) == 2
    with pytest.raises(InputError, match="other crops or settings"):  # head-only settings are another run
        adapt(gallery, tmp_path / "run", weights=tiny_ckpt, config=FAST, device="cpu")


def test_an_epoch_whose_largest_cluster_holds_most_crops_learns_nothing(gallery, tiny_ckpt, tmp_path, monkeypatch):
    import reid.train.pseudo_labels as pseudo_labels

    def merged(feats, **_):  # one pseudo-identity of all crops but three, and a pair
        labels = np.zeros(len(feats), np.int64)
        labels[:2], labels[2] = 1, -1
        return Clusters(labels, 0.6)

    monkeypatch.setattr(pseudo_labels, "cluster_features", merged)  # adapt imports it when it runs
    seen = []
    result = adapt(gallery, tmp_path / "run", weights=tiny_ckpt, config=FAST, device="cpu", on_epoch=seen.append)
    crops = len(list(gallery.glob("*.jpg")))
    # ... and stops there: the model did not change, so every later epoch would find the same clusters
    assert [(r["clusters"], r["largest"], r["loss"], r["steps"]) for r in seen] == [(2, crops - 3, None, 0)]
    assert result.stopped_early and result.epochs_done == 1 < FAST.epochs
    adapted, original = load_checkpoint(result.checkpoint).state_dict(), load_checkpoint(tiny_ckpt).state_dict()
    assert all(torch.equal(v, original[k]) for k, v in adapted.items())

    from cli import app  # the command says so, and how to change it

    out = CliRunner().invoke(app, ["adapt", str(gallery), "--out", str(tmp_path / "cli"), "--weights", str(tiny_ckpt),
                                   "--epochs", "3", "--views", "2", "--device", "cpu"])
    assert out.exit_code == 0, out.output
    said = " ".join(out.stdout.split())  # Rich wraps the line
    assert "stopped after epoch 1" in said and "--eps" in said and "as it came in" in said


def test_adapt_resumes_after_an_interruption(gallery, tiny_ckpt, tmp_path):
    whole = adapt(gallery, tmp_path / "whole", weights=tiny_ckpt, config=FAST, device="cpu")

    def stop_after_first(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        adapt(gallery, tmp_path / "cut", weights=tiny_ckpt, config=FAST, device="cpu", on_epoch=stop_after_first)
    seen = []
    resumed = adapt(gallery, tmp_path / "cut", weights=tiny_ckpt, config=FAST, device="cpu", on_epoch=seen.append)
    assert [r["epoch"] for r in seen] == [2]  # epoch 1 was not run again
    a, b = load_checkpoint(whole.checkpoint).state_dict(), load_checkpoint(resumed.checkpoint).state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)
    with pytest.raises(InputError, match="other crops or settings"):
        adapt(gallery, tmp_path / "cut", weights=tiny_ckpt, config=AdaptConfig(epochs=3, views=2), device="cpu")


def test_adapt_refuses_an_empty_folder_and_a_folder_of_non_images(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no image files"):
        adapt(tmp_path / "empty", tmp_path / "run", config=FAST, device="cpu")
    junk = tmp_path / "junk"
    junk.mkdir()
    for i in range(3):
        (junk / f"{i}.jpg").write_text("not an image")
    with pytest.raises(InputError, match="0 decodable image"):
        adapt(junk, tmp_path / "run", config=FAST, device="cpu")


def test_adapt_command_one_line_errors_and_json(gallery, tiny_ckpt, tmp_path):
    import json

    from cli import app

    runner = CliRunner()
    (tmp_path / "empty").mkdir()
    bad = runner.invoke(app, ["adapt", str(tmp_path / "empty"), "--out", str(tmp_path / "r0")])
    assert bad.exit_code == 1 and bad.output.count("\n") == 1 and bad.output.startswith("error:")
    ok = runner.invoke(app, ["adapt", str(gallery), "--out", str(tmp_path / "r1"), "--weights", str(tiny_ckpt),
                             "--epochs", "1", "--views", "2", "--min-samples", "2", "--k1", "6", "--device", "cpu",
                             "--json"])
    assert ok.exit_code == 0, ok.output
    doc = json.loads(ok.stdout.strip().splitlines()[-1])
    assert doc["epochs_done"] == 1 and doc["crops"] == 36 and doc["checkpoint"].endswith("last")
    # --k1 is part of the run's settings: the same folder with another k1 is another run, refused in one line
    other = runner.invoke(app, ["adapt", str(gallery), "--out", str(tmp_path / "r1"), "--weights", str(tiny_ckpt),
                                "--epochs", "1", "--views", "2", "--min-samples", "2", "--k1", "7", "--device", "cpu"])
    assert other.exit_code == 1 and other.output.count("\n") == 1, other.output


def test_clustering_settings_are_the_configs():
    from reid.train.adapt import clustering

    paper = clustering(AdaptConfig())
    assert (paper["eps"], paper["k1"], paper["min_samples"]) == (0.6, 30, 4)
    mine = clustering(AdaptConfig(eps=0.45, k1=7, min_samples=3))
    assert (mine["eps"], mine["k1"], mine["min_samples"]) == (0.45, 7, 3)
    assert clustering(AdaptConfig(auto_eps=True))["eps"] is None  # the rho rule, in cluster_features


def test_a_tracklet_votes_its_crops_into_one_cluster_without_chaining_others():
    from reid.train.pseudo_labels import _vote

    labels = np.array([0, 0, 1, -1, 1, 2, 2, -1, -1, -1])
    tracks = np.array([5, 5, 5, 5, -1, -1, -1, 7, 7, -1])  # tracklet 5 mostly in cluster 0; 7 never clustered
    out = _vote(labels, tracks)
    assert len(set(out[:4])) == 1 and out[0] == out[1]  # the whole tracklet, its outlier too
    assert out[4] != out[0] and out[5] == out[6] != out[0]  # cluster 1's other crop is not pulled along
    assert out[7] == out[8] >= 0 and out[9] == -1  # a new cluster of its own; others stay outliers
    assert sorted(set(out[out >= 0].tolist())) == list(range(len(set(out[out >= 0].tolist()))))
