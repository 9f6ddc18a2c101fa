"""Market-style loaders (Market-1501, DukeMTMC-reID, CUHK03-NP, folder) and ``load`` dispatch on synthetic trees."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from reid.datasets import DATASET_NAMES, DISTRACTOR_PID, JUNK_PID, Dataset, Sample, dataset_options, load
from reid.synthetic import (
    market1501_dataset,
    plan_market1501,
    write_cuhk03_np,
    write_dukemtmcreid,
    write_folder,
    write_market1501,
)
from reid.errors import DatasetError, InputError

TINY = dict(num_train_ids=4, num_test_ids=5, num_distractors=3, num_junk=2, size=(32, 16), seed=3)


@pytest.fixture(scope="module")
def market_tree(tmp_path_factory) -> Path:
    base = write_market1501(tmp_path_factory.mktemp("market"), **TINY)
    for folder in ("bounding_box_train", "query", "bounding_box_test"):
        (base / folder / "Thumbs.db").write_bytes(b"\x00not an image")  # Market ships these
    return base


def _copy_layout(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst)


@pytest.mark.parametrize("layout", ["v15", "market1501/v15", "root"])
def test_market1501_accepts_three_layouts(market_tree: Path, tmp_path: Path, layout: str):
    target = {
        "v15": tmp_path / "Market-1501-v15.09.15",
        "market1501/v15": tmp_path / "market1501" / "Market-1501-v15.09.15",
        "root": tmp_path,
    }[layout]
    if layout == "root":
        for folder in ("bounding_box_train", "query", "bounding_box_test"):
            _copy_layout(market_tree / folder, tmp_path / folder)
    else:
        _copy_layout(market_tree, target)
    ds = load("market1501", tmp_path)
    assert Path(ds.info["root"]) == target
    plan = plan_market1501(**{k: v for k, v in TINY.items() if k != "size"})
    folders = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
    for split, folder in folders.items():
        expected = [(p.pid, p.camid) for p in plan if p.folder == folder and p.pid != JUNK_PID]
        assert [(s.pid, s.camid) for s in ds.split(split)] == expected
    assert all(s.path.suffix == ".jpg" and s.path.is_file() for s in ds.gallery)
    assert all(s.path.parent == target / "bounding_box_test" for s in ds.gallery)


def test_market1501_drops_junk_keeps_distractors_and_real_ids(market_tree: Path):
    ds = load("market1501", market_tree.parent)
    assert not any(s.pid == JUNK_PID for split in ("train", "query", "gallery") for s in ds.split(split))
    assert sum(s.pid == DISTRACTOR_PID for s in ds.gallery) == TINY["num_distractors"]
    assert not any(s.pid == DISTRACTOR_PID for s in ds.query + ds.train)
    junk_files = list((market_tree / "bounding_box_test").glob("-1_c*.jpg"))
    assert len(junk_files) == TINY["num_junk"]
    # identities keep their real ids (no relabelling): train and test ids are disjoint subsets of 1..9
    train_ids, test_ids = {s.pid for s in ds.train}, {s.pid for s in ds.query}
    assert train_ids | test_ids == set(range(1, 10)) and not train_ids & test_ids
    assert ds.num_train_pids == 4 and ds.num_query_pids == 5 and ds.num_gallery_pids == 6  # 5 ids + distractors
    assert {s.camid for s in ds.gallery} <= set(range(1, 7))
    assert isinstance(ds.query[0], Sample) and isinstance(ds.query[0].path, Path)


def test_market1501_matches_the_no_write_variant(market_tree: Path):
    loaded = load("market1501", market_tree.parent)
    planned = market1501_dataset(market_tree.parent, **TINY)
    assert (planned.train, planned.query, planned.gallery) == (loaded.train, loaded.query, loaded.gallery)


def test_market1501_wrong_root_names_the_layout(tmp_path: Path):
    with pytest.raises(DatasetError) as e:
        load("market1501", tmp_path)
    msg = str(e.value)
    assert "Market-1501-v15.09.15" in msg and "bounding_box_train" in msg and str(tmp_path) in msg
    with pytest.raises(DatasetError, match="does not exist"):
        load("market1501", tmp_path / "nowhere")


def test_market1501_partial_layout_says_what_is_missing(market_tree: Path, tmp_path: Path):
    _copy_layout(market_tree, tmp_path / "Market-1501-v15.09.15")
    shutil.rmtree(tmp_path / "Market-1501-v15.09.15" / "query")
    with pytest.raises(DatasetError, match=r"Market-1501-v15.09.15 \(missing query\)"):
        load("market1501", tmp_path)


def test_market1501_rejects_foreign_names(market_tree: Path, tmp_path: Path):
    _copy_layout(market_tree, tmp_path / "Market-1501-v15.09.15")
    (tmp_path / "Market-1501-v15.09.15" / "query" / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(DatasetError, match="holiday.jpg.*Market-1501 naming"):
        load("market1501", tmp_path)


def test_dukemtmcreid(tmp_path: Path):
    base = write_dukemtmcreid(tmp_path, num_train_ids=3, num_test_ids=4, num_distractors=2, size=(32, 16))
    assert base == tmp_path / "DukeMTMC-reID"
    assert all("_f" in p.name for p in (base / "query").iterdir())
    ds = load("dukemtmcreid", tmp_path)
    assert ds.name == "dukemtmcreid"
    assert ds.num_train_pids == 3 and ds.num_query_pids == 4
    assert sum(s.pid == 0 for s in ds.gallery) == 2
    assert {s.camid for s in ds.train + ds.gallery} <= set(range(1, 9))
    assert load("dukemtmcreid", base).gallery == ds.gallery  # ROOT itself holding the folders
    with pytest.raises(DatasetError, match="DukeMTMC-reID"):
        load("dukemtmcreid", tmp_path / "DukeMTMC-reID" / "query")


@pytest.mark.parametrize("variant", ["labeled", "detected"])
def test_cuhk03_np(tmp_path: Path, variant: str):
    base = write_cuhk03_np(tmp_path, num_train_ids=3, num_test_ids=4, images_per_view=3, size=(32, 16))
    ds = load("cuhk03-np", tmp_path, variant=variant)
    assert ds.info["variant"] == variant and Path(ds.info["root"]) == base / variant
    assert (len(ds.train), len(ds.query), len(ds.gallery)) == (3 * 6, 4 * 2, 4 * 4)
    by_id: dict[int, set[int]] = {}
    for s in ds.query:
        by_id.setdefault(s.pid, set()).add(s.camid)
    assert all(cams == {1, 2} for cams in by_id.values()) and len(by_id) == 4
    assert all(s.path.suffix == ".png" for s in ds.query)
    assert load("cuhk03-np", base, variant=variant).query == ds.query  # ROOT = the cuhk03-np folder


def test_cuhk03_np_wrong_root_and_variant(tmp_path: Path):
    with pytest.raises(DatasetError, match=r"cuhk03-np/labeled/\{bounding_box_train,query,bounding_box_test\}"):
        load("cuhk03-np", tmp_path)
    with pytest.raises(InputError, match="variant"):
        load("cuhk03-np", tmp_path, variant="manual")


@pytest.mark.parametrize("with_train", [True, False])
def test_folder(tmp_path: Path, with_train: bool):
    root = write_folder(tmp_path / "set", num_train_ids=3, num_test_ids=4, num_distractors=2, cameras=3,
                        size=(32, 16), with_train=with_train)
    (root / "gallery" / "notes.txt").write_text("ignored")
    nested = root / "query" / "more"
    nested.mkdir()
    src = next((root / "query").glob("*.jpg"))
    shutil.copy(src, nested / ("0099" + src.name[4:]))  # searched recursively
    ds = load("folder", root)
    assert len(ds.train) == (len(list((root / "train").glob("*.jpg"))) if with_train else 0)
    assert 99 in {s.pid for s in ds.query}
    assert sum(s.pid == 0 for s in ds.gallery) == 2
    assert ds.num_train_pids == (3 if with_train else 0)


def test_folder_wrong_root(tmp_path: Path):
    (tmp_path / "query").mkdir()
    with pytest.raises(DatasetError, match=r"ROOT/query/ and ROOT/gallery/.*missing gallery"):
        load("folder", tmp_path)
    (tmp_path / "gallery").mkdir()
    with pytest.raises(DatasetError, match="needs images in both"):
        load("folder", tmp_path)


def test_load_dispatch_and_options(market_tree: Path):
    assert DATASET_NAMES == ("market1501", "dukemtmcreid", "cuhk03", "cuhk03-np", "folder")
    assert dataset_options("cuhk03") == {"variant": "labeled", "protocol": "new", "split": 0}
    assert dataset_options("market1501") == {}
    with pytest.raises(InputError, match="unknown dataset 'viper'.*market1501"):
        load("viper", market_tree)
    with pytest.raises(InputError, match="takes no option variant"):
        load("market1501", market_tree.parent, variant="labeled")
    ds = load("Market-1501", market_tree.parent, variant=None)  # unset CLI flags pass through
    assert isinstance(ds, Dataset) and ds.name == "market1501"


def test_describe_and_ids(market_tree: Path):
    ds = load("market1501", market_tree.parent)
    rows = {r["split"]: r for r in ds.describe()}
    assert rows["gallery"]["images"] == len(ds.gallery)
    assert rows["gallery"]["distractors"] == TINY["num_distractors"]
    assert rows["gallery"]["ids"] == 5 and rows["query"]["ids"] == 5 and rows["train"]["ids"] == 4
    pids, camids = ds.ids("query")
    assert pids.tolist() == [s.pid for s in ds.query] and camids.tolist() == [s.camid for s in ds.query]
    assert ds.paths("train") == [s.path for s in ds.train]
    assert "market1501" in repr(ds)
    with pytest.raises(ValueError):
        ds.split("test")
