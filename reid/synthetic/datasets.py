"""Small synthetic datasets written in the exact layouts of Market-1501, DukeMTMC-reID, CUHK03(-NP) and folder.

Tests, benchmarks and the demo use them; nothing needs the real images. Every writer is deterministic
for its ``seed`` (each image has its own generator seeded by (seed, image index)). ``mirror_real=True``
reproduces the real Market-1501 identity/camera lists (shipped as the owners' .mat files), and
``market1501_dataset`` returns the same Sample lists without writing anything (for metric benchmarks).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import scipy.io

from reid.datasets.base import Dataset, samples_from_paths
from reid.datasets.market1501 import CUHK03_NP_DIR, DUKE_DIR, MARKET_DIR
from reid.synthetic.render import render_junk, render_person
from reid.errors import InputError

log = logging.getLogger(__name__)


PROTOCOL_DIR = Path(__file__).parent.parent / "datasets" / "protocols" / "market1501"
CONTENTS = ("image", "empty")
_MARKET_FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}


@dataclass(frozen=True)
class PlannedImage:
    """One file to write: its folder (relative), name, identity and camera."""

    folder: str
    name: str
    pid: int
    camid: int


def _market_name(pid: int, camid: int, frame: int) -> str:
    # Market-1501 writes junk as "-1_c1s1_...", everyone else with four digits: "0002_c1s1_000451_03.jpg".
    # The sequence number grows with the frame counter, so sorted names keep the planned order.
    p = "-1" if pid == -1 else f"{pid:04d}"
    return f"{p}_c{camid}s{1 + min(5, frame // 8000)}_{frame:06d}_01.jpg"


def _duke_name(pid: int, camid: int, frame: int) -> str:
    return f"{pid:04d}_c{camid}_f{frame:07d}.jpg"


def _real_market_lists(protocol_dir: Path = PROTOCOL_DIR) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The real (pid, camid) lists of Market-1501's three folders, in file-name order."""
    def col(name: str, key: str) -> np.ndarray:
        return scipy.io.loadmat(protocol_dir / name)[key].reshape(-1).astype(np.int64)

    return {
        "train": (col("train_label.mat", "label"), col("train_cam.mat", "cam")),
        "query": (col("queryID.mat", "queryID"), col("queryCam.mat", "queryCAM")),
        "gallery": (col("testID.mat", "testID"), col("testCam.mat", "testCAM")),
    }


def _structure(
    *, num_train_ids: int, num_test_ids: int, num_distractors: int, num_junk: int, cameras: int,
    images_per_cam: int, seed: int,
) -> dict[str, list[tuple[int, int]]]:
    """(pid, camid) lists per split: each identity in >= 2 cameras; test ids get one query per camera."""
    if num_train_ids < 0 or num_test_ids < 1 or cameras < 1 or images_per_cam < 1:
        raise InputError("synthetic dataset needs num_test_ids >= 1, cameras >= 1 and images_per_cam >= 1")
    rng = np.random.default_rng([seed & 0xFFFFFFFF, 0x57])
    ids = rng.permutation(np.arange(1, num_train_ids + num_test_ids + 1))
    train_ids, test_ids = sorted(ids[:num_train_ids]), sorted(ids[num_train_ids:])
    out: dict[str, list[tuple[int, int]]] = {"train": [], "query": [], "gallery": []}

    def cams_of() -> list[int]:
        k = int(rng.integers(min(2, cameras), cameras + 1))
        return sorted(int(c) for c in rng.choice(np.arange(1, cameras + 1), size=k, replace=False))

    for pid in train_ids:
        out["train"] += [(int(pid), c) for c in cams_of() for _ in range(images_per_cam)]
    for pid in test_ids:
        cams = cams_of()
        out["query"] += [(int(pid), c) for c in cams]
        out["gallery"] += [(int(pid), c) for c in cams for _ in range(images_per_cam)]
    extra = [(-1, int(c)) for c in rng.integers(1, cameras + 1, num_junk)]
    extra += [(0, int(c)) for c in rng.integers(1, cameras + 1, num_distractors)]
    out["gallery"] = sorted(extra) + out["gallery"]
    return out


def plan_market1501(
    *, num_train_ids: int = 20, num_test_ids: int = 20, num_distractors: int = 10, num_junk: int = 5,
    cameras: int = 6, images_per_cam: int = 2, seed: int = 0, mirror_real: bool = False, naming: str = "market",
) -> list[PlannedImage]:
    """The files a synthetic Market-1501 (or Duke-named) tree holds, without writing them.

    ``mirror_real=True`` takes the real Market-1501 lists (12,936 train, 3,368 query, 19,732 test files
    including 3,819 junk and 2,798 distractors) and ignores the size arguments.
    """
    if mirror_real:
        lists = {k: list(zip(p.tolist(), c.tolist(), strict=True)) for k, (p, c) in _real_market_lists().items()}
    else:
        lists = _structure(num_train_ids=num_train_ids, num_test_ids=num_test_ids, num_distractors=num_distractors,
                           num_junk=num_junk, cameras=cameras, images_per_cam=images_per_cam, seed=seed)
    namer = _duke_name if naming == "duke" else _market_name
    plan, frame = [], 0
    for split, folder in _MARKET_FOLDERS.items():
        for pid, camid in lists[split]:
            frame += 1  # a global counter keeps names unique and sorted like the lists
            plan.append(PlannedImage(folder, namer(pid, camid, frame), pid, camid))
    return plan


def write_images(
    base: Path, plan: Sequence[PlannedImage], *, seed: int, size: tuple[int, int], difficulty: float = 1.0,
    content: str = "image", ext: str = ".jpg",
) -> None:
    """Render and write every planned image under ``base`` (``content="empty"`` writes zero-byte files)."""
    if content not in CONTENTS:
        raise InputError(f"content must be one of {CONTENTS}, got {content!r}")
    for folder in sorted({p.folder for p in plan}):
        (base / folder).mkdir(parents=True, exist_ok=True)
    params = [cv2.IMWRITE_JPEG_QUALITY, 92] if ext == ".jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 1]
    for i, item in enumerate(plan):
        path = base / item.folder / item.name
        if content == "empty":
            path.touch()
            continue
        rng = np.random.default_rng([seed & 0xFFFFFFFF, i])
        if item.pid == -1:
            img = render_junk(rng, item.camid, size, world_seed=seed, difficulty=difficulty)
        else:
            # Each distractor image is a different passer-by.
            pid = item.pid if item.pid > 0 else 10**6 + i
            img = render_person(pid, item.camid, rng, size, world_seed=seed, difficulty=difficulty)
        ok, buf = cv2.imencode(ext, cv2.cvtColor(img, cv2.COLOR_RGB2BGR), params)
        if not ok:
            raise InputError(f"{path}: cannot encode the synthetic image")
        path.write_bytes(buf.tobytes())


def write_market1501(
    root: str | Path, *, num_train_ids: int = 20, num_test_ids: int = 20, num_distractors: int = 10,
    num_junk: int = 5, cameras: int = 6, images_per_cam: int = 2, seed: int = 0, size: tuple[int, int] = (128, 64),
    mirror_real: bool = False, difficulty: float = 1.0, content: str = "image",
) -> Path:
    """A synthetic ``ROOT/Market-1501-v15.09.15/{bounding_box_train,query,bounding_box_test}`` of JPEGs.

    Returns the Market-1501-v15.09.15 folder. With ``mirror_real=True`` it holds the real file counts,
    identities (junk -1 and distractors 0 included) and cameras; use a tiny ``size`` to write it fast.
    """
    base = Path(root) / MARKET_DIR
    plan = plan_market1501(num_train_ids=num_train_ids, num_test_ids=num_test_ids, num_distractors=num_distractors,
                           num_junk=num_junk, cameras=cameras, images_per_cam=images_per_cam, seed=seed,
                           mirror_real=mirror_real)
    for folder in _MARKET_FOLDERS.values():  # all three, even when one is empty (num_train_ids=0)
        (base / folder).mkdir(parents=True, exist_ok=True)
    write_images(base, plan, seed=seed, size=size, difficulty=difficulty, content=content)
    log.info("synthetic Market-1501: %d files in %s", len(plan), base)
    return base


def market1501_dataset(root: str | Path = ".", **options) -> Dataset:
    """The Dataset ``load("market1501", root)`` would return for ``write_market1501(root, **options)``, nothing written.

    For metric benchmarks at the real Market-1501 size: ``market1501_dataset(mirror_real=True)``.
    """
    for key in ("size", "difficulty", "content"):  # how images look does not change the lists
        options.pop(key, None)
    base = Path(root) / MARKET_DIR
    plan = plan_market1501(**options)
    by_split = {
        split: samples_from_paths([base / p.folder / p.name for p in plan if p.folder == folder],
                                  keep_distractors=split == "gallery", where=folder)
        for split, folder in _MARKET_FOLDERS.items()
    }
    return Dataset("market1501", by_split["train"], by_split["query"], by_split["gallery"],
                   info={"root": str(base), "synthetic": True})


def write_dukemtmcreid(
    root: str | Path, *, num_train_ids: int = 20, num_test_ids: int = 20, num_distractors: int = 10,
    cameras: int = 8, images_per_cam: int = 2, seed: int = 0, size: tuple[int, int] = (128, 64),
    difficulty: float = 1.0, content: str = "image",
) -> Path:
    """A synthetic ``ROOT/DukeMTMC-reID/`` (Duke names like ``0001_c2_f0046182.jpg``, 8 cameras, no junk)."""
    base = Path(root) / DUKE_DIR
    plan = plan_market1501(num_train_ids=num_train_ids, num_test_ids=num_test_ids, num_distractors=num_distractors,
                           num_junk=0, cameras=cameras, images_per_cam=images_per_cam, seed=seed, naming="duke")
    for folder in _MARKET_FOLDERS.values():
        (base / folder).mkdir(parents=True, exist_ok=True)
    write_images(base, plan, seed=seed, size=size, difficulty=difficulty, content=content)
    return base


def write_folder(
    root: str | Path, *, num_train_ids: int = 10, num_test_ids: int = 10, num_distractors: int = 5,
    cameras: int = 4, images_per_cam: int = 2, seed: int = 0, size: tuple[int, int] = (128, 64),
    with_train: bool = True, difficulty: float = 1.0,
) -> Path:
    """A generic dataset folder ``ROOT/{query,gallery[,train]}`` of Market-named JPEGs; returns ROOT."""
    base = Path(root)
    rename = {"bounding_box_train": "train", "query": "query", "bounding_box_test": "gallery"}
    plan = [
        PlannedImage(rename[p.folder], p.name, p.pid, p.camid)
        for p in plan_market1501(num_train_ids=num_train_ids if with_train else 0, num_test_ids=num_test_ids,
                                 num_distractors=num_distractors, num_junk=0, cameras=cameras,
                                 images_per_cam=images_per_cam, seed=seed)
    ]
    write_images(base, plan, seed=seed, size=size, difficulty=difficulty)
    return base


def write_cuhk03_np(
    root: str | Path, *, num_train_ids: int = 20, num_test_ids: int = 20, images_per_view: int = 3, seed: int = 0,
    size: tuple[int, int] = (160, 64), difficulty: float = 1.0,
) -> Path:
    """A synthetic ``ROOT/cuhk03-np/{labeled,detected}/{bounding_box_train,query,bounding_box_test}`` of PNGs.

    Two cameras (views); one query per view per test identity, the rest in the gallery (as in CUHK03-NP).
    Returns the cuhk03-np folder.
    """
    base = Path(root) / CUHK03_NP_DIR
    rng = np.random.default_rng([seed & 0xFFFFFFFF, 0x4E50])
    ids = rng.permutation(np.arange(1, num_train_ids + num_test_ids + 1))
    test = set(ids[num_train_ids:].tolist())
    for v, variant in enumerate(("labeled", "detected")):
        plan = []
        for pid in sorted(ids.tolist()):
            for view in (1, 2):
                for k in range(1, images_per_view + 1):
                    if pid not in test:  # noqa: SIM108 - a nested ternary would read worse than this if/else
                        folder = "bounding_box_train"
                    else:
                        folder = "query" if k == 1 else "bounding_box_test"
                    plan.append(PlannedImage(folder, f"{pid:04d}_c{view}_{k}.png", pid, view))
        # Detected boxes are the same people, framed less well: a little more nuisance.
        write_images(base / variant, plan, seed=seed, size=size, difficulty=difficulty * (1.0 + 0.25 * v), ext=".png")
    return base

