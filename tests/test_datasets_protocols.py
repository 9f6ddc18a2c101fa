"""The Market-1501 loader reproduces the real protocol on a tree mirroring the owners' id/camera lists."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io

from reid.datasets import load
from reid.synthetic import market1501_dataset, write_market1501

PROTOCOLS = Path(__file__).parent / "data" / "protocols" / "Market-1501"


def _real(name: str, key: str) -> np.ndarray:
    return scipy.io.loadmat(PROTOCOLS / name)[key].reshape(-1).astype(np.int64)


def _check_real_market(ds) -> None:
    assert (len(ds.train), len(ds.query), len(ds.gallery)) == (12936, 3368, 15913)
    assert ds.num_train_pids == 751 and ds.num_query_pids == 750
    assert len({s.pid for s in ds.gallery} - {0}) == 750
    assert sum(s.pid == 0 for s in ds.gallery) == 2798
    assert not any(s.pid == -1 for s in ds.gallery)
    # exactly the owners' lists, in file-name order, junk removed from the test list
    for split, (ids, cams) in {
        "train": ("train_label.mat:label", "train_cam.mat:cam"),
        "query": ("queryID.mat:queryID", "queryCam.mat:queryCAM"),
        "gallery": ("testID.mat:testID", "testCam.mat:testCAM"),
    }.items():
        pid, cam = _real(*ids.split(":")), _real(*cams.split(":"))
        keep = pid != -1
        got_pid, got_cam = ds.ids(split)
        assert np.array_equal(got_pid, pid[keep]) and np.array_equal(got_cam, cam[keep]), split


def test_market1501_real_structure_with_placeholder_files(tmp_path: Path):
    base = write_market1501(tmp_path, mirror_real=True, content="empty")
    assert len(list((base / "bounding_box_test").iterdir())) == 19732
    assert len(list((base / "bounding_box_test").glob("-1_*"))) == 3819
    ds = load("market1501", tmp_path)
    _check_real_market(ds)
    planned = market1501_dataset(tmp_path, mirror_real=True)
    assert (planned.train, planned.query, planned.gallery) == (ds.train, ds.query, ds.gallery)


def test_market1501_real_structure_without_writing():
    _check_real_market(market1501_dataset("/nonexistent", mirror_real=True))


@pytest.mark.slow
def test_market1501_real_structure_with_tiny_jpegs(tmp_path: Path):
    base = write_market1501(tmp_path, mirror_real=True, size=(16, 8))
    assert (base / "query").glob("*.jpg").__next__().read_bytes()[:2] == b"\xff\xd8"
    _check_real_market(load("market1501", tmp_path))
