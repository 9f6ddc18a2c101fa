"""Synthetic pedestrians: deterministic, identity learnable across cameras, cameras visibly different."""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from reid.datasets import load
from reid.synthetic.render import camera_of, identity_of, render_junk, render_person
from reid.synthetic import write_cuhk03_np, write_market1501


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _colour_feature(img: np.ndarray) -> np.ndarray:
    """A grey-world-normalised 8x8x8 RGB histogram of the crop's centre (where the person stands)."""
    h, w = img.shape[:2]
    centre = img[int(0.2 * h):int(0.8 * h), int(0.4 * w):int(0.6 * w)].astype(np.float32)
    centre = np.clip(centre / (img.reshape(-1, 3).mean(0) + 1.0) * 110.0, 0, 255).astype(np.uint8)
    hist = cv2.calcHist([centre], [0, 1, 2], None, [8, 8, 8], [0, 256] * 3).reshape(-1)
    f = np.sqrt(hist / hist.sum())
    return f / np.linalg.norm(f)


@pytest.mark.parametrize("size", [(128, 64), (256, 128), (24, 12)])
def test_render_person_shape_and_determinism(size):
    a = render_person(7, 2, np.random.default_rng(11), size)
    b = render_person(7, 2, np.random.default_rng(11), size)
    c = render_person(7, 2, np.random.default_rng(12), size)
    assert a.shape == (*size, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.std() > 10  # a picture, not a flat fill


def test_identities_are_diverse_and_seeded():
    """Many people look different; another world seed re-dresses them; cameras have their own light."""
    def look(pid: int, world: int) -> tuple:
        ident = identity_of(pid, world)
        return (tuple((ident.upper // 40).astype(int)), tuple((ident.lower // 40).astype(int)), ident.pattern,
                ident.bag, round(ident.height, 2))

    looks = [look(pid, 0) for pid in range(1, 201)]
    assert len(set(looks)) > 190
    assert sum(look(pid, 0) != look(pid, 1) for pid in range(1, 201)) > 190
    gains = {camera_of(cam, 0).gain for cam in range(1, 7)}
    assert len(gains) == 6
    assert camera_of(1, 0).gain != camera_of(1, 3).gain


def test_writers_are_deterministic_for_a_seed(tmp_path: Path):
    kw = dict(num_train_ids=3, num_test_ids=3, num_distractors=2, num_junk=2, size=(32, 16))
    a = _digest(write_market1501(tmp_path / "a", seed=4, **kw))
    b = _digest(write_market1501(tmp_path / "b", seed=4, **kw))
    c = _digest(write_market1501(tmp_path / "c", seed=5, **kw))
    assert a == b
    assert a != c
    np_a = _digest(write_cuhk03_np(tmp_path / "na", num_train_ids=2, num_test_ids=2, size=(32, 16)))
    np_b = _digest(write_cuhk03_np(tmp_path / "nb", num_train_ids=2, num_test_ids=2, size=(32, 16)))
    assert np_a == np_b


def test_file_formats(tmp_path: Path):
    base = write_market1501(tmp_path, num_train_ids=1, num_test_ids=2, size=(32, 16))
    jpg = next((base / "query").iterdir()).read_bytes()
    assert jpg[:3] == b"\xff\xd8\xff"  # JPEG, like the real Market-1501
    np_base = write_cuhk03_np(tmp_path, num_train_ids=1, num_test_ids=1, size=(32, 16))
    png = next((np_base / "labeled" / "query").iterdir()).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_identity_is_learnable_from_colour_across_cameras(tmp_path: Path):
    """Same person in another camera is closer (colour histogram) than other people, far above chance."""
    n_ids = 30
    write_market1501(tmp_path, num_train_ids=0, num_test_ids=n_ids, num_distractors=0, num_junk=0,
                     images_per_cam=1, seed=2)
    ds = load("market1501", tmp_path)
    samples = ds.gallery
    feats = np.stack([_colour_feature(cv2.cvtColor(cv2.imread(str(s.path)), cv2.COLOR_BGR2RGB)) for s in samples])
    pids, cams = ds.ids("gallery")
    sim = feats @ feats.T
    other_cam = cams[:, None] != cams[None, :]
    same = (pids[:, None] == pids[None, :]) & other_cam
    diff = (pids[:, None] != pids[None, :]) & other_cam
    # AUC: chance that a same-person pair is more similar than a two-person pair (both across cameras)
    pos, neg = np.sort(sim[same]), np.sort(sim[diff])
    auc = float(np.searchsorted(neg, pos).mean() / len(neg))
    assert auc > 0.68, auc
    hits = []
    for i in range(len(samples)):
        cand = np.where(cams != cams[i])[0]
        hits.append(pids[cand[np.argmax(sim[i, cand])]] == pids[i])
    rank1 = float(np.mean(hits))
    assert 5 / n_ids < rank1 < 0.9, rank1  # learnable, yet far from solved by colour alone


def test_cameras_differ():
    """One person, same pose seed, two cameras: the pictures differ; and cameras shift colours consistently."""
    a = render_person(3, 1, np.random.default_rng(0)).astype(np.float32)
    b = render_person(3, 4, np.random.default_rng(0)).astype(np.float32)
    assert np.abs(a - b).mean() > 10
    means = {}
    for cam in (1, 2, 3, 4, 5, 6):
        imgs = [render_person(pid, cam, np.random.default_rng(pid)) for pid in range(1, 41)]
        means[cam] = np.mean([im.reshape(-1, 3).mean(0) for im in imgs], axis=0)
    spread = np.ptp(np.stack(list(means.values())), axis=0)
    assert spread.max() > 15  # camera light/background moves the average colour by many grey levels


def test_difficulty_zero_shows_the_true_clothing_colour():
    """Without nuisances every camera shows the identity's own torso colour; with them it shifts."""
    pid = next(p for p in range(1, 500) if identity_of(p).pattern == "plain" and identity_of(p).bag == "none"
               and 80 < identity_of(p).upper.mean() < 170)
    upper = identity_of(pid).upper
    for cam in (1, 3, 5):
        img = render_person(pid, cam, np.random.default_rng(cam), difficulty=0.0)
        torso = img[33:44, 28:36].reshape(-1, 3).astype(np.float32).mean(0)
        assert np.abs(torso - upper).max() < 3, (cam, torso, upper)
    shifted = [render_person(pid, cam, np.random.default_rng(cam))[33:44, 28:36].reshape(-1, 3).mean(0)
               for cam in (1, 2, 3, 4, 5, 6)]
    assert max(np.abs(c - upper).max() for c in shifted) > 15


def test_render_junk_is_a_crop_of_someone():
    img = render_junk(np.random.default_rng(3), 2, (128, 64))
    assert img.shape == (128, 64, 3) and img.dtype == np.uint8
    assert not np.array_equal(img, render_junk(np.random.default_rng(4), 2, (128, 64)))
