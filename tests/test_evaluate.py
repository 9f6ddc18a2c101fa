import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from reid.evaluation import feature_cache as fc
from reid import viz
from reid.datasets import load
from reid.synthetic import write_cuhk03_np, write_market1501
from reid.synthetic.cuhk03 import write_cuhk03
from reid.errors import DatasetError
from reid.evaluation import evaluate_cuhk03_classic, evaluate_ranking
from reid.model import ModelConfig, build_model, save_checkpoint

TINY = ModelConfig(input_size=(64, 32), c_a=8, c_b=8, d_x=32, d_h=16, d_att=16, num_glimpses=1, embed_dim=32)
FAST = ["--workers", "0", "--batch-size", "32", "--device", "cpu"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(build_model(TINY, pretrained=False), path)
    return path


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    root = tmp_path_factory.mktemp("market")
    write_market1501(root, num_train_ids=2, num_test_ids=8, num_distractors=4, num_junk=3, cameras=3,
                     images_per_cam=2, size=(64, 32))
    return root


@pytest.fixture(scope="module")
def cuhk03(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuhk03")
    write_cuhk03(root, ids_per_pair=(6, 4, 3), images_per_view=(1, 2), classic_test_ids=5, num_splits=3,
                 size=(64, 32))
    return root


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REID_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def run(*args):
    result = CliRunner().invoke(app, ["evaluate", *map(str, args)])
    return result


def run_json(*args):
    result = run(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _assert_same(report, result, tol=1e-6):
    assert report["mAP"] == pytest.approx(result.mAP, abs=tol)
    assert report["mINP"] == pytest.approx(result.mINP, abs=tol)
    assert np.allclose(report["cmc"], result.cmc, atol=tol)
    assert report["num_valid_queries"] == result.num_valid_queries


def _no_embedding(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("embed_paths called although the features are cached")

    monkeypatch.setattr("reid.embed.embed_paths", boom)


def test_market_json_equals_metrics_from_saved_features_then_cache_hit(tmp_path, market, weights, monkeypatch):
    feats, plot, ranks = tmp_path / "f.npz", tmp_path / "cmc.png", tmp_path / "ranks.jpg"
    rep = run_json("market1501", "--root", market, "--weights", weights, *FAST, "--save-features", feats,
                   "--plot", plot, "--ranks", ranks, "--ranks-queries", "3")
    ds = load("market1501", market)
    assert rep["cache"] == "miss" and rep["dataset"] == "market1501" and rep["protocol"] == "standard"
    assert rep["num_queries"] == len(ds.query) and rep["num_gallery"] == len(ds.gallery)
    assert len(rep["cmc"]) == 50 and rep["rank1"] == rep["cmc"][0] and rep["rank10"] == rep["cmc"][9]
    assert rep["fingerprint"].startswith("abn-") and set(rep["timings"]) >= {"embed_s", "metric_s", "total_s"}

    with np.load(feats, allow_pickle=False) as z:
        npz = {k: z[k] for k in z.files}
    assert npz["query_paths"].tolist() == [str(s.path) for s in ds.query]
    assert npz["gallery_pids"].tolist() == [s.pid for s in ds.gallery]
    assert npz["query_camids"].tolist() == [s.camid for s in ds.query]
    ids = (npz["query_pids"], npz["gallery_pids"], npz["query_camids"], npz["gallery_camids"])
    dist = 1.0 - npz["query_features"] @ npz["gallery_features"].T
    _assert_same(rep, evaluate_ranking(dist, *ids, max_rank=50))

    cmc_img = cv2.imread(str(plot))
    assert cmc_img is not None and cmc_img.shape == (480, 640, 3)
    rank_img = cv2.imread(str(ranks))
    assert rank_img is not None and rank_img.shape[:2] == viz.rank_grid_shape(3, 10)

    # Second run, other options: the features come from the cache, nothing is embedded.
    _no_embedding(monkeypatch)
    from reid.evaluation.rerank import re_rank

    rep2 = run_json("market1501", "--root", market, "--weights", weights, *FAST, "--rerank", "--ap", "trapezoid")
    assert rep2["cache"] == "hit" and rep2["rerank"] and rep2["ap"] == "trapezoid"
    rr = re_rank(npz["query_features"], npz["gallery_features"])
    _assert_same(rep2, evaluate_ranking(rr, *ids, max_rank=50, ap="trapezoid"), tol=1e-5)

    # Same queries and lists with the model's attention painted over every crop.
    ranks_att = tmp_path / "ranks_att.jpg"
    assert run_json("market1501", "--root", market, "--weights", weights, *FAST, "--ranks", ranks_att,
                    "--ranks-queries", "3", "--attention")["cache"] == "hit"
    att_img = cv2.imread(str(ranks_att))
    assert att_img.shape == rank_img.shape and np.abs(att_img.astype(int) - rank_img).mean() > 5


def test_table_output_and_flip_is_a_separate_cache_entry(market, weights, cache):
    result = run("market1501", "--root", market, "--weights", weights, *FAST)
    assert result.exit_code == 0, result.output
    for label in ("mAP", "rank-1", "rank-20", "mINP", "queries", "gallery images", "cache miss"):
        assert label in result.stdout
    assert "cache hit" in run("market1501", "--root", market, "--weights", weights, *FAST).stdout
    assert "cache miss" in run("market1501", "--root", market, "--weights", weights, *FAST, "--flip").stdout
    assert len(list(cache.glob("*.npz"))) == 2 and not list(cache.glob(".*"))


def test_cuhk03_new_protocol(tmp_path, cuhk03, weights):
    feats = tmp_path / "f.npz"
    rep = run_json("cuhk03", "--root", cuhk03, "--weights", weights, *FAST, "--variant", "detected",
                   "--save-features", feats)
    assert rep["protocol"] == "new" and rep["variant"] == "detected"
    ds = load("cuhk03", cuhk03, variant="detected")
    assert rep["num_queries"] == len(ds.query) and rep["num_gallery"] == len(ds.gallery)
    with np.load(feats, allow_pickle=False) as z:
        dist = 1.0 - z["query_features"] @ z["gallery_features"].T
        ids = (z["query_pids"], z["gallery_pids"], z["query_camids"], z["gallery_camids"])
        _assert_same(rep, evaluate_ranking(dist, *ids, max_rank=50))


def test_cuhk03_classic_all_splits_mean_std_and_each_image_embedded_once(tmp_path, cuhk03, weights, monkeypatch):
    import reid.embed

    calls = []
    real = reid.embed.embed_paths
    monkeypatch.setattr("reid.embed.embed_paths", lambda m, p, **k: calls.append(list(p)) or real(m, p, **k))
    feats = tmp_path / "f.npz"
    rep = run_json("cuhk03", "--root", cuhk03, "--weights", weights, *FAST, "--protocol", "classic",
                   "--save-features", feats, "--seed", "3")
    assert rep["protocol"] == "classic" and rep["seed"] == 3 and len(rep["splits"]) == 3
    splits = [load("cuhk03", cuhk03, protocol="classic", split=s) for s in range(3)]
    unique = {str(s.path) for d in splits for s in d.query + d.gallery}
    assert len(calls) == 1 and sorted(calls[0]) == sorted(unique) and len(calls[0]) == len(unique)
    assert rep["num_images_embedded"] == len(unique) < sum(len(d.query) + len(d.gallery) for d in splits)

    maps, cmcs = [], []
    with np.load(feats, allow_pickle=False) as z:
        for s in range(3):
            q, g = z["query_split"] == s, z["gallery_split"] == s
            dist = 1.0 - z["query_features"][q] @ z["gallery_features"][g].T
            r = evaluate_cuhk03_classic(dist, z["query_pids"][q], z["gallery_pids"][g], z["query_camids"][q],
                                        z["gallery_camids"][g], max_rank=50, repeats=10, seed=3)
            assert rep["splits"][s]["mAP"] == pytest.approx(r.mAP, abs=1e-6)
            maps.append(r.mAP)
            cmcs.append(r.cmc)
    assert rep["mAP"] == pytest.approx(np.mean(maps), abs=1e-6)
    assert rep["mAP_std"] == pytest.approx(np.std(maps), abs=1e-6)
    assert np.allclose(rep["cmc"], np.mean(cmcs, axis=0), atol=1e-6)

    one = run_json("cuhk03", "--root", cuhk03, "--weights", weights, *FAST, "--protocol", "classic",
                   "--split", "1", "--seed", "3")
    assert one["split"] == 1 and "splits" not in one
    assert one["mAP"] == pytest.approx(rep["splits"][1]["mAP"], abs=1e-6)


def test_cuhk03_np(tmp_path, weights):
    write_cuhk03_np(tmp_path, num_train_ids=2, num_test_ids=6, images_per_view=2, size=(64, 32))
    feats = tmp_path / "f.npz"
    rep = run_json("cuhk03-np", "--root", tmp_path, "--weights", weights, *FAST, "--variant", "labeled",
                   "--save-features", feats)
    assert rep["num_queries"] == 12
    with np.load(feats, allow_pickle=False) as z:
        dist = 1.0 - z["query_features"] @ z["gallery_features"].T
        ids = (z["query_pids"], z["gallery_pids"], z["query_camids"], z["gallery_camids"])
        _assert_same(rep, evaluate_ranking(dist, *ids, max_rank=50))


def test_wrong_root_exits_1_with_one_line(tmp_path, weights):
    result = run("market1501", "--root", tmp_path / "nowhere", "--weights", weights, *FAST)
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and result.stderr.endswith("\n")
    assert result.stderr.startswith("error: ") and "Market-1501-v15.09.15" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--variant", "labeled"], "variant"),
        (["--ap", "median"], "--ap"),
        (["--plot", "cmc.gif"], "use one of"),
        (["--save-features", "feats.txt"], ".npz"),
        (["--attention"], "--ranks"),
    ],
)
def test_bad_options_exit_1_before_any_work(market, weights, args, needle, monkeypatch):
    _no_embedding(monkeypatch)
    result = run("market1501", "--root", market, "--weights", weights, *FAST, *args)
    assert result.exit_code == 1, result.output
    assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_undecodable_gallery_file_is_skipped_and_counted(tmp_path, weights):
    base = write_market1501(tmp_path, num_train_ids=0, num_test_ids=4, num_distractors=2, num_junk=0, cameras=2,
                            images_per_cam=2, size=(64, 32))
    victim = sorted((base / "bounding_box_test").iterdir())[-1]
    victim.write_bytes(b"\xff\xd8 broken")
    rep = run_json("market1501", "--root", tmp_path, "--weights", weights, *FAST)
    ds = load("market1501", tmp_path)
    assert rep["num_images_failed"] == 1 and rep["num_gallery"] == len(ds.gallery) - 1


# --- the cache itself --------------------------------------------------------------------------


def test_cache_key_depends_on_model_flip_and_file_contents(tmp_path):
    a, b = tmp_path / "a.jpg", tmp_path / "b.jpg"
    a.write_bytes(b"1")
    b.write_bytes(b"22")
    key = fc.feature_cache_key("m1", False, [a, b])
    assert key == fc.feature_cache_key("m1", False, [b, a])  # order-free
    assert key != fc.feature_cache_key("m2", False, [a, b])
    assert key != fc.feature_cache_key("m1", True, [a, b])
    assert key != fc.feature_cache_key("m1", False, [a])
    b.write_bytes(b"333")  # size changes
    resized = fc.feature_cache_key("m1", False, [a, b])
    assert resized != key
    st = os.stat(a)
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same size, touched
    assert fc.feature_cache_key("m1", False, [a, b]) != resized
    with pytest.raises(DatasetError):
        fc.feature_cache_key("m1", False, [tmp_path / "gone.jpg"])


def test_cache_roundtrip_and_corrupt_entry_is_ignored(tmp_path, caplog):
    table = fc.FeatureTable(["x.jpg", "y.jpg"], np.arange(8, dtype=np.float32).reshape(2, 4), [("z.jpg", "broken")])
    path = tmp_path / "k.npz"
    fc.save_cached(path, table)
    back = fc.load_cached(path)
    assert back.paths == table.paths and np.array_equal(back.features, table.features)
    assert back.failures == table.failures and back.rows(["y.jpg", "z.jpg"]).tolist() == [1, -1]
    path.write_bytes(b"PK\x03\x04 not really a zip")
    assert fc.load_cached(path) is None and "ignoring unreadable feature cache" in caplog.text
    assert fc.load_cached(tmp_path / "missing.npz") is None


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("REID_CACHE", str(tmp_path / "c"))
    assert fc.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("REID_CACHE")
    assert fc.cache_dir() == Path("~/.cache/reid/features").expanduser()


def test_unwritable_cache_warns_but_evaluates(market, weights, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file-not-folder"
    blocker.write_text("x")
    monkeypatch.setenv("REID_CACHE", str(blocker / "cache"))
    result = run("market1501", "--root", market, "--weights", weights, *FAST, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["cache"] == "miss" and "could not write the feature cache" in caplog.text


def test_an_interrupted_embedding_resumes_where_it_stopped(market, cache, tmp_path, monkeypatch):
    import reid.embed

    model = build_model(TINY, pretrained=False)
    files = sorted(str(p) for p in Path(market).rglob("*.jpg"))
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    files.append(str(tmp_path / "broken.jpg"))
    fp = "m-resume"
    whole, _ = fc.embed_files(model, files, fingerprint=fp, batch_size=4, workers=0, use_cache=False)

    monkeypatch.setattr(fc, "PARTIAL_SAVE_SECONDS", 0.0)  # save after every batch
    real = reid.embed.embed_paths
    asked: list[list[str]] = []

    def interrupted(model, paths, *, on_batch, **kw):
        asked.append([str(p) for p in paths])
        seen = []

        def stop_after_two(*args):
            on_batch(*args)
            seen.append(1)
            if len(seen) == 2:
                raise KeyboardInterrupt

        return real(model, paths, on_batch=stop_after_two, **kw)

    monkeypatch.setattr(reid.embed, "embed_paths", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fc.embed_files(model, files, fingerprint=fp, batch_size=4, workers=0)
    [partial] = cache.glob("*.partial.npz")
    assert len(fc.load_cached(partial).paths) == 8

    def counting(model, paths, **kw):
        asked.append([str(p) for p in paths])
        return real(model, paths, **kw)

    monkeypatch.setattr(reid.embed, "embed_paths", counting)
    done = []
    table, state = fc.embed_files(model, files, fingerprint=fp, batch_size=4, workers=0,
                                  progress=lambda n, total: done.append((n, total)))
    assert state == "miss" and asked[-1] == files[8:]  # only what the first run did not reach
    assert done[:2] == [(8, len(files)), (12, len(files))] and done[-1] == (len(files), len(files))
    assert not list(cache.glob("*.partial.npz")) and len(list(cache.glob("*.npz"))) == 1
    assert [p for p, _ in table.failures] == [files[-1]]
    rows, ref = table.rows(whole.paths), whole.rows(whole.paths)
    assert (rows >= 0).all() and np.allclose(table.features[rows], whole.features[ref], atol=1e-6)
    assert fc.embed_files(model, files, fingerprint=fp, batch_size=4, workers=0)[1] == "hit"


def test_runtime_onnx_gives_torchs_numbers_in_its_own_cache_entry(market, tmp_path):
    path = save_checkpoint(build_model(TINY), tmp_path / "imagenet")  # ImageNet streams: an export worth checking
    torch_rep = run_json("market1501", "--root", market, "--weights", path, *FAST)
    onnx_rep = run_json("market1501", "--root", market, "--weights", path, *FAST, "--runtime", "onnx")
    assert onnx_rep["cache"] == "miss"  # not torch's features from the cache
    assert onnx_rep["mAP"] == pytest.approx(torch_rep["mAP"], abs=0.02)
    assert onnx_rep["cmc"][0] == pytest.approx(torch_rep["cmc"][0], abs=0.05)
    assert run_json("market1501", "--root", market, "--weights", path, *FAST, "--runtime", "onnx")["cache"] == "hit"
