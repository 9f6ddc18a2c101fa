"""A synthetic CUHK03 as its owners ship it: ``cuhk03_release/cuhk-03.mat`` (MATLAB v7.3) + new-protocol configs.

The .mat file follows the real one's layout: ``labeled`` and ``detected`` are 5 x 1 cells (camera pairs)
of M x 10 cells of H x W x 3 uint8 images (columns 1-5 view 1, 6-10 view 2; missing images are empty
cells), and ``testsets`` is a 20 x 1 cell of N x 2 double [pair, id] test lists. The config files have
the real files' fields, shapes and dtypes: ``camId`` uint8, ``filelist`` cell of names, ``labels``
uint16, and 1-based ``train_idx``/``query_idx``/``gallery_idx`` (column vectors).
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import scipy.io

from reid.datasets.cuhk03_extract import image_name
from reid.datasets.matlab import write_mat73
from reid.synthetic.render import render_person
from reid.errors import InputError

log = logging.getLogger(__name__)

VIEW_SLOTS = 5


def _detected_from(labeled: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A detector's box of the same person: shifted, loosened or cut, at a slightly different size."""
    h, w = labeled.shape[:2]
    pad = int(0.15 * h)
    big = cv2.copyMakeBorder(labeled, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    ch = int(h * rng.uniform(0.85, 1.15))
    cw = int(w * rng.uniform(0.85, 1.2))
    y0 = int(np.clip(pad + rng.normal(0, 0.06) * h, 0, big.shape[0] - ch))
    x0 = int(np.clip(pad + (w - cw) / 2 + rng.normal(0, 0.08) * w, 0, big.shape[1] - cw))
    return np.ascontiguousarray(big[y0:y0 + ch, x0:x0 + cw])


def _config(names: list[str], labels: list[int], cams: list[int], test_ids: set[int],
            rng: np.random.Generator) -> dict:
    """The new-protocol config of one variant: one query per view per test identity, rest of test in the gallery."""
    n = len(names)
    idx_dtype = np.uint16 if n < 2**16 else np.uint32
    train, query, gallery = [], [], []
    by_id_view: dict[tuple[int, int], list[int]] = {}
    for i, (lab, cam) in enumerate(zip(labels, cams, strict=True)):
        if lab in test_ids:
            by_id_view.setdefault((lab, cam), []).append(i)
        else:
            train.append(i)
    for members in by_id_view.values():
        q = int(rng.choice(members))
        query.append(q)
        gallery += [i for i in members if i != q]
    filelist = np.empty((n, 1), dtype=object)
    for i, name in enumerate(names):
        filelist[i, 0] = np.array([name])

    def col(values, dtype) -> np.ndarray:
        return np.asarray(values, dtype=dtype).reshape(-1, 1)

    def idx(values) -> np.ndarray:  # 1-based, ascending, as in the real files
        return col(sorted(i + 1 for i in values), idx_dtype)

    return {
        "camId": col(cams, np.uint8),
        "filelist": filelist,
        "labels": col(labels, np.uint16),
        "query_idx": idx(query),
        "gallery_idx": idx(gallery),
        "train_idx": idx(train),
    }


def _classic_testsets(ids_per_pair: tuple[int, ...], classic_test_ids: int, num_splits: int,
                      rng: np.random.Generator) -> np.ndarray:
    """The classic ``testsets`` cell: per split, ``classic_test_ids`` sorted (pair, id) rows from the first
    three pairs, or from all pairs when those three hold too few."""
    pool = [(p, i) for p in (1, 2, 3) if p <= len(ids_per_pair) for i in range(1, ids_per_pair[p - 1] + 1)]
    if len(pool) < classic_test_ids:
        pool = [(p, i) for p, m in enumerate(ids_per_pair, start=1) for i in range(1, m + 1)]
    if not 1 <= classic_test_ids <= len(pool):
        raise InputError(f"classic_test_ids must be between 1 and {len(pool)}")
    testsets = np.empty((num_splits, 1), dtype=object)
    for s in range(num_splits):
        pick = sorted(pool[i] for i in rng.choice(len(pool), size=classic_test_ids, replace=False))
        testsets[s, 0] = np.asarray(pick, dtype=np.float64)
    return testsets


def write_cuhk03(
    root: str | Path, *, ids_per_pair: tuple[int, ...] = (12, 8, 4, 3, 3), images_per_view: tuple[int, int] = (2, 5),
    num_test_ids: int | None = None, classic_test_ids: int = 10, num_splits: int = 20, seed: int = 0,
    size: tuple[int, int] = (160, 64), difficulty: float = 1.0,
) -> Path:
    """Write ``ROOT/cuhk03/`` with ``cuhk03_release/cuhk-03.mat`` and both new-protocol config files; returns it.

    Identities are numbered across pairs as in the real data (pair offset + id in pair); the new
    protocol tests ``num_test_ids`` of them (default: the real 700/1467 share), the classic splits draw
    ``classic_test_ids`` each from the first three pairs (as the real ``testsets`` do) when they suffice.
    """
    lo, hi = images_per_view
    if not 1 <= lo <= hi <= VIEW_SLOTS or min(ids_per_pair, default=0) < 1:
        raise InputError("write_cuhk03 needs 1 <= images_per_view <= 5 and at least one id per camera pair")
    total = sum(ids_per_pair)
    num_test_ids = round(total * 700 / 1467) if num_test_ids is None else num_test_ids
    if not 1 <= num_test_ids < total:
        raise InputError(f"num_test_ids must be between 1 and {total - 1}")
    base = Path(root) / "cuhk03"
    (base / "cuhk03_release").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed & 0xFFFFFFFF, 0xC03])
    offsets = np.concatenate([[0], np.cumsum(ids_per_pair)[:-1]]).astype(int)
    cells = {v: np.empty((len(ids_per_pair), 1), dtype=object) for v in ("labeled", "detected")}
    files: dict[str, list[tuple[str, int, int]]] = {"labeled": [], "detected": []}
    k = 0
    for p, m in enumerate(ids_per_pair, start=1):
        pair_cells = {v: np.full((m, 2 * VIEW_SLOTS), None, dtype=object) for v in cells}
        for pid in range(1, m + 1):
            label = int(offsets[p - 1]) + pid
            for view in (1, 2):
                count = int(rng.integers(lo, hi + 1))
                for slot in range(count):
                    col = (view - 1) * VIEW_SLOTS + slot
                    img_rng = np.random.default_rng([seed & 0xFFFFFFFF, 0xC03, k])
                    k += 1
                    hw = (int(size[0] * img_rng.uniform(0.85, 1.15)), int(size[1] * img_rng.uniform(0.85, 1.15)))
                    # Each camera pair has its own two cameras: 2 * (pair - 1) + view.
                    img = render_person(label, 2 * (p - 1) + view, img_rng, hw, world_seed=seed, difficulty=difficulty)
                    name = image_name(p, pid, view, col + 1)
                    pair_cells["labeled"][pid - 1, col] = img
                    files["labeled"].append((name, label, view))
                    # The detector misses a box now and then (never a view's only one).
                    if slot > 0 and img_rng.random() < 0.05:
                        continue
                    pair_cells["detected"][pid - 1, col] = _detected_from(img, img_rng)
                    files["detected"].append((name, label, view))
        for v in cells:
            cells[v][p - 1, 0] = pair_cells[v]
    testsets = _classic_testsets(ids_per_pair, classic_test_ids, num_splits, rng)
    write_mat73(base / "cuhk03_release" / "cuhk-03.mat",
                {"detected": cells["detected"], "labeled": cells["labeled"], "testsets": testsets}, compress=True)
    test_ids = {int(x) for x in rng.choice(np.arange(1, total + 1), size=num_test_ids, replace=False)}
    for v in ("labeled", "detected"):
        entries = sorted(files[v])
        cfg = _config([e[0] for e in entries], [e[1] for e in entries], [e[2] for e in entries], test_ids, rng)
        scipy.io.savemat(base / f"cuhk03_new_protocol_config_{v}.mat", cfg, do_compression=True, oned_as="column")
    log.info("synthetic CUHK03: %d labeled / %d detected images in %s", len(files["labeled"]),
             len(files["detected"]), base)
    return base
