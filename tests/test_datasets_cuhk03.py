"""CUHK03: v7.3 ``cuhk-03.mat`` layout, once-only atomic extraction, new and classic protocols."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io

import reid.datasets.cuhk03_extract as extract
from reid.datasets import PROTOCOL_CUHK03_CLASSIC, load
from reid.synthetic import write_cuhk03
from reid.errors import DatasetError, InputError
from reid.images import decode_image

IDS_PER_PAIR = (6, 4, 3, 2, 2)
NAME = re.compile(r"^([1-5])_(\d{3})_([12])_(\d{2})\.png$")


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    """A pristine synthetic CUHK03 folder (never extracted into); tests copy it."""
    return write_cuhk03(tmp_path_factory.mktemp("cuhk03"), ids_per_pair=IDS_PER_PAIR, images_per_view=(1, 4),
                        num_test_ids=8, classic_test_ids=5, num_splits=20, size=(40, 20), seed=5)


@pytest.fixture
def root(release: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "data" / "cuhk03"
    shutil.copytree(release, dst)
    return dst


def torchreid_style_read(mat_path: Path, variant: str) -> dict[str, np.ndarray]:
    """Read cuhk-03.mat the way readers written for the real file do (torchreid's recipe)."""
    out = {}
    with h5py.File(mat_path, "r") as mat:
        for campid, camp_ref in enumerate(mat[variant][0]):
            camp = mat[camp_ref][:].T
            for pid in range(camp.shape[0]):
                for imgid, img_ref in enumerate(camp[pid, :]):
                    img = mat[img_ref][:].T
                    if img.size == 0 or img.ndim < 3:
                        continue
                    view = 1 if imgid < 5 else 2
                    out[f"{campid + 1:01d}_{pid + 1:03d}_{view:01d}_{imgid + 1:02d}.png"] = img
    return out


def test_mat_file_has_matlab_v73_layout(release: Path):
    mat_path = release / "cuhk03_release" / "cuhk-03.mat"
    head = mat_path.read_bytes()[:128]
    assert head.startswith(b"MATLAB 7.3 MAT-file") and head[126:128] == b"IM"
    assert h5py.is_hdf5(mat_path)
    with h5py.File(mat_path, "r") as f:
        assert f.userblock_size == 512
        assert sorted(f.keys()) == ["#refs#", "detected", "labeled", "testsets"]
        assert f["labeled"].shape == (1, 5) and f["labeled"].attrs["MATLAB_class"] == b"cell"
        assert f["testsets"].shape == (1, 20)
        camp = f[f["labeled"][0, 0]]
        assert camp.shape == (10, IDS_PER_PAIR[0]) and camp.attrs["MATLAB_class"] == b"cell"
        img = f[camp[0, 0]]
        assert img.ndim == 3 and img.shape[0] == 3 and img.dtype == np.uint8  # 3 x W x H (transposed)
        assert img.attrs["MATLAB_class"] == b"uint8"
        split = f[f["testsets"][0, 0]][:].T
        assert split.shape == (5, 2) and split.dtype == np.float64
        assert set(split[:, 0]) <= {1.0, 2.0, 3.0}  # classic test ids come from the first three pairs
        empties = [r for r in camp[:].reshape(-1) if f[r].attrs.get("MATLAB_empty", 0)]
        assert empties and all(f[r][:].ndim < 3 for r in empties)


def test_config_files_have_the_real_fields(release: Path):
    real = scipy.io.loadmat(Path(__file__).parent / "data/protocols/CUHK03/cuhk03_new_protocol_config_labeled.mat")
    for variant in ("labeled", "detected"):
        ours = scipy.io.loadmat(release / f"cuhk03_new_protocol_config_{variant}.mat")
        keys = sorted(k for k in real if not k.startswith("__"))
        assert sorted(k for k in ours if not k.startswith("__")) == keys
        for k in keys:
            assert ours[k].dtype == real[k].dtype and ours[k].ndim == 2 and ours[k].shape[1] == 1, k
        assert ours["filelist"][0, 0].dtype.kind == "U" and ours["filelist"][0, 0][0] == "1_001_1_01.png"


@pytest.mark.parametrize("variant", ["labeled", "detected"])
def test_extraction_names_counts_and_pixels(root: Path, variant: str):
    ds = load("cuhk03", root.parent, variant=variant)  # ROOT/cuhk03 found one level down
    folder = root / f"images_{variant}"
    files = sorted(p.name for p in folder.glob("*.png"))
    expected = torchreid_style_read(root / "cuhk03_release" / "cuhk-03.mat", variant)
    assert files == sorted(expected)
    assert all(NAME.match(n) for n in files)
    for name in files[:: max(1, len(files) // 10)]:
        assert np.array_equal(decode_image(folder / name), expected[name])  # RGB, lossless
    cfg = scipy.io.loadmat(root / f"cuhk03_new_protocol_config_{variant}.mat")
    assert files == [str(x[0]) for x in cfg["filelist"].reshape(-1)]
    assert len(ds.train) + len(ds.query) + len(ds.gallery) == len(files)


def test_extraction_runs_once(root: Path, monkeypatch):
    load("cuhk03", root)
    folder = root / "images_labeled"
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}
    assert ".extracted.json" in before

    def boom(*a, **k):
        raise AssertionError("extracted a second time")

    monkeypatch.setattr(extract, "_extract_into", boom)
    load("cuhk03", root)
    load("cuhk03", root, protocol="classic", split=2)
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()} == before


def test_interrupted_extraction_is_redone_cleanly(root: Path, monkeypatch):
    real_write = extract._write_png
    calls = {"n": 0}

    def failing_write(path, rgb):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-way
        real_write(path, rgb)

    monkeypatch.setattr(extract, "_write_png", failing_write)
    with pytest.raises(KeyboardInterrupt):
        load("cuhk03", root)
    assert not (root / "images_labeled").exists()
    assert not (root / ".images_labeled.partial").exists()
    monkeypatch.setattr(extract, "_write_png", real_write)
    # a process killed outright leaves its temp folder behind: the next run starts over
    stale = root / ".images_labeled.partial"
    stale.mkdir()
    (stale / "1_001_1_01.png").write_bytes(b"half")
    ds = load("cuhk03", root)
    assert not stale.exists()
    files = sorted(p.name for p in (root / "images_labeled").glob("*.png"))
    assert files == sorted(torchreid_style_read(root / "cuhk03_release" / "cuhk-03.mat", "labeled"))
    assert all(decode_image(s.path).shape[2] == 3 for s in ds.query)


@pytest.mark.parametrize("variant", ["labeled", "detected"])
def test_new_protocol(root: Path, variant: str):
    ds = load("cuhk03", root, variant=variant, protocol="new")
    assert ds.protocol == "standard" and ds.info["variant"] == variant
    train_ids, test_ids = {s.pid for s in ds.train}, {s.pid for s in ds.query}
    assert len(test_ids) == 8 and len(train_ids) == sum(IDS_PER_PAIR) - 8 and not train_ids & test_ids
    assert {s.pid for s in ds.gallery} == test_ids
    cams: dict[int, list[int]] = {}
    for s in ds.query:
        cams.setdefault(s.pid, []).append(s.camid)
    assert all(sorted(c) == [1, 2] for c in cams.values())
    assert not {s.path for s in ds.query} & {s.path for s in ds.gallery}
    offsets = np.concatenate([[0], np.cumsum(IDS_PER_PAIR)[:-1]])
    for s in ds.train + ds.query + ds.gallery:
        pair, pid, view, _ = map(int, NAME.match(s.path.name).groups())
        assert s.pid == offsets[pair - 1] + pid and s.camid == view and s.path.is_file()


@pytest.mark.parametrize("split", [0, 7, 19])
def test_classic_protocol(root: Path, split: int):
    ds = load("cuhk03", root, variant="detected", protocol="classic", split=split)
    assert ds.protocol == PROTOCOL_CUHK03_CLASSIC and ds.info["split"] == split and ds.info["num_splits"] == 20
    assert ds.query == ds.gallery
    with h5py.File(root / "cuhk03_release" / "cuhk-03.mat", "r") as f:
        test = f[f["testsets"][0, split]][:].T.astype(int)
    offsets = np.concatenate([[0], np.cumsum(IDS_PER_PAIR)[:-1]])
    test_ids = {int(offsets[p - 1] + i) for p, i in test}
    assert {s.pid for s in ds.query} == test_ids
    assert {s.camid for s in ds.query} == {1, 2}
    assert {s.pid for s in ds.train} == set(range(1, sum(IDS_PER_PAIR) + 1)) - test_ids
    all_files = {p.name for p in (root / "images_detected").glob("*.png")}
    assert {s.path.name for s in ds.train + ds.query} == all_files
    with pytest.raises(InputError, match="split must be 0..19"):
        load("cuhk03", root, protocol="classic", split=20)


def test_real_config_files_reproduce_the_real_protocol(tmp_path: Path):
    """The real new-protocol files, with placeholder images named after their filelist (the loader never decodes)."""
    src = Path(__file__).parent / "data" / "protocols" / "CUHK03"
    expected = {"labeled": (7368, 1400, 5328), "detected": (7365, 1400, 5332)}
    for variant, counts in expected.items():
        shutil.copy(src / f"cuhk03_new_protocol_config_{variant}.mat", tmp_path)
        folder = tmp_path / f"images_{variant}"
        folder.mkdir()
        config = scipy.io.loadmat(src / f"cuhk03_new_protocol_config_{variant}.mat")
        names = [str(x[0]) for x in config["filelist"].reshape(-1)]
        for n in names:
            (folder / n).touch()
        ds = load("cuhk03", tmp_path, variant=variant)
        assert (len(ds.train), len(ds.query), len(ds.gallery)) == counts
        assert ds.num_train_pids == 767 and ds.num_query_pids == 700 and ds.num_gallery_pids == 700
        assert min(s.pid for s in ds.train) >= 1 and max(s.pid for s in ds.train + ds.query) <= 1467
        cams: dict[int, list[int]] = {}
        for s in ds.query:
            cams.setdefault(s.pid, []).append(s.camid)
        assert len(cams) == 700 and all(sorted(c) == [1, 2] for c in cams.values())
        assert {s.pid for s in ds.train}.isdisjoint(cams)


def test_wrong_root_names_the_layout(tmp_path: Path):
    with pytest.raises(DatasetError) as e:
        load("cuhk03", tmp_path)
    msg = str(e.value)
    assert "cuhk03_release/cuhk-03.mat" in msg and "cuhk03_new_protocol_config_" in msg
    assert str(tmp_path / "cuhk03") in msg
    with pytest.raises(DatasetError, match=r"missing cuhk03_release/cuhk-03.mat"):
        load("cuhk03", tmp_path, protocol="classic")
    with pytest.raises(InputError, match="variant"):
        load("cuhk03", tmp_path, variant="manual")
    with pytest.raises(InputError, match="protocol"):
        load("cuhk03", tmp_path, protocol="old")


def test_missing_images_and_bad_mat(root: Path):
    load("cuhk03", root)
    victim = sorted((root / "images_labeled").glob("*.png"))[3]
    victim.unlink()
    with pytest.raises(DatasetError, match=f"1 files listed .* missing .*{victim.name}"):
        load("cuhk03", root)
    shutil.rmtree(root / "images_detected", ignore_errors=True)
    mat = root / "cuhk03_release" / "cuhk-03.mat"
    scipy.io.savemat(mat, {"labeled": np.zeros((2, 2))})  # a v5 file where v7.3 belongs
    with pytest.raises(DatasetError, match="not a MATLAB v7.3"):
        load("cuhk03", root, variant="detected")
    assert not (root / "images_detected").exists()
