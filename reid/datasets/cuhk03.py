"""CUHK03 as its owners ship it: ``cuhk03_release/cuhk-03.mat`` plus the new-protocol config files.

New protocol (Zhong et al. 2017, 767 train / 700 test identities): ``cuhk03_new_protocol_config_{variant}.mat``
lists the files and 1-based train/query/gallery indices. Classic protocol (Li et al. 2014): one of the 20
``testsets`` splits of 100 identities; query = gallery = their images from both views, and the
single-gallery-shot metric samples the gallery. Identities are numbered 1..1467 across the five camera
pairs (pair offset + id in pair), as the config files' ``labels``; the camera is the view (1 or 2).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import scipy.io

from reid.datasets.base import PROTOCOL_CUHK03_CLASSIC, Dataset, Sample, list_images
from reid.datasets.cuhk03_extract import ensure_extracted, read_classic_info
from reid.errors import DatasetError, InputError

log = logging.getLogger(__name__)

VARIANTS = ("labeled", "detected")
PROTOCOLS = ("new", "classic")
MAT_RELPATH = Path("cuhk03_release") / "cuhk-03.mat"
_NAME = re.compile(r"^(\d)_(\d{3})_([12])_(\d{2})\.png$")


def config_name(variant: str) -> str:
    """File name of the new-protocol config for ``variant``."""
    return f"cuhk03_new_protocol_config_{variant}.mat"


def _expected() -> str:
    return (
        f"ROOT/{MAT_RELPATH} and ROOT/cuhk03_new_protocol_config_{{labeled,detected}}.mat side by side "
        "(or the same inside ROOT/cuhk03/)"
    )


def find_root(root: str | Path, variant: str, protocol: str) -> Path:
    """The folder holding CUHK03's files: ROOT or ROOT/cuhk03; DatasetError naming the layout otherwise."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DatasetError(f"cuhk03: dataset root {root} does not exist; expected {_expected()}")
    looked = []
    for base in (root, root / "cuhk03"):
        has_mat = (base / MAT_RELPATH).is_file()
        has_images = (base / f"images_{variant}").is_dir()
        if protocol == "classic":
            if has_mat:
                return base
            looked.append(f"{base} (missing {MAT_RELPATH})")
            continue
        has_cfg = (base / config_name(variant)).is_file()
        if has_cfg and (has_mat or has_images):
            return base
        missing = ([] if has_cfg else [config_name(variant)]) + ([] if has_mat or has_images else [str(MAT_RELPATH)])
        looked.append(f"{base} (missing {', '.join(missing)})")
    raise DatasetError(f"cuhk03: no dataset found under {root}; expected {_expected()}. Looked in: {'; '.join(looked)}")


def load_cuhk03(
    root: str | Path, variant: str = "labeled", protocol: str = "new", split: int = 0
) -> Dataset:
    """CUHK03 ``variant`` (labeled|detected) under ``protocol`` (new|classic; ``split`` 0..19 for classic)."""
    if variant not in VARIANTS:
        raise InputError(f"cuhk03: unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    if protocol not in PROTOCOLS:
        raise InputError(f"cuhk03: unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    base = find_root(root, variant, protocol)
    if protocol == "new":
        return _load_new(base, variant)
    return _load_classic(base, variant, split)


def _column(cfg: dict, key: str, path: Path) -> np.ndarray:
    if key not in cfg:
        raise DatasetError(f"{path}: no {key!r} field; is this a CUHK03 new-protocol config file?")
    return np.asarray(cfg[key]).reshape(-1)


def read_config(path: Path) -> dict:
    """The new-protocol config: filelist (names), labels, camId, and 0-based train/query/gallery indices."""
    try:
        cfg = scipy.io.loadmat(path)
    except Exception as e:  # scipy raises several types for a damaged file
        raise DatasetError(f"{path}: cannot read the config file ({e})") from None
    filelist = [str(np.asarray(x).reshape(-1)[0]) for x in _column(cfg, "filelist", path)]
    labels = _column(cfg, "labels", path).astype(np.int64)
    cams = _column(cfg, "camId", path).astype(np.int64)
    if not (len(filelist) == len(labels) == len(cams)):
        raise DatasetError(f"{path}: filelist, labels and camId have different lengths")
    out = {"filelist": filelist, "labels": labels, "camId": cams}
    for key in ("train_idx", "query_idx", "gallery_idx"):
        idx = _column(cfg, key, path).astype(np.int64) - 1
        if idx.size and (idx.min() < 0 or idx.max() >= len(filelist)):
            raise DatasetError(f"{path}: {key} points outside the {len(filelist)}-file list")
        out[key] = idx
    return out


def _load_new(base: Path, variant: str) -> Dataset:
    cfg_path = base / config_name(variant)
    cfg = read_config(cfg_path)
    images = ensure_extracted(base, variant)
    present = {p.name for p in list_images(images)}
    names, labels, cams = cfg["filelist"], cfg["labels"], cfg["camId"]

    def take(idx: np.ndarray) -> list[Sample]:
        return [Sample(images / names[i], int(labels[i]), int(cams[i])) for i in idx]

    needed = {names[i] for key in ("train_idx", "query_idx", "gallery_idx") for i in cfg[key]}
    missing = sorted(needed - present)
    if missing:
        raise DatasetError(
            f"cuhk03: {len(missing)} files listed in {cfg_path.name} are missing from {images} "
            f"(e.g. {missing[0]}); delete that folder to extract it again from {MAT_RELPATH}"
        )
    ds = Dataset(
        "cuhk03",
        take(cfg["train_idx"]),
        take(cfg["query_idx"]),
        take(cfg["gallery_idx"]),
        info={"root": str(base), "variant": variant, "protocol": "new"},
    )
    log.info("cuhk03 %s new protocol: %r", variant, ds)
    return ds


def _load_classic(base: Path, variant: str, split: int) -> Dataset:
    info = read_classic_info(base / MAT_RELPATH, variant)
    if not 0 <= split < len(info.testsets):
        raise InputError(f"cuhk03: split must be 0..{len(info.testsets) - 1} for the classic protocol, got {split}")
    offsets = np.concatenate([[0], np.cumsum(info.ids_per_pair)[:-1]]).astype(int)
    test_ids = set(info.testsets[split])
    images = ensure_extracted(base, variant)
    train, test = [], []
    for path in list_images(images):
        m = _NAME.match(path.name)
        if m is None:
            continue
        pair, pid, view = int(m.group(1)), int(m.group(2)), int(m.group(3))
        if not 1 <= pair <= len(offsets):
            raise DatasetError(f"{path}: camera pair {pair} is not in {MAT_RELPATH} ({len(offsets)} pairs)")
        sample = Sample(path, int(offsets[pair - 1]) + pid, view)
        (test if (pair, pid) in test_ids else train).append(sample)
    found = {(int(m.group(1)), int(m.group(2))) for p in test for m in [_NAME.match(p.path.name)]}
    if not test or len(found) < len(test_ids):
        raise DatasetError(
            f"cuhk03: {images} holds images of {len(found)} of the {len(test_ids)} test identities of "
            f"classic split {split}; delete that folder to extract it again from {MAT_RELPATH}"
        )
    ds = Dataset(
        "cuhk03",
        train,
        test,
        list(test),
        protocol=PROTOCOL_CUHK03_CLASSIC,
        info={"root": str(base), "variant": variant, "protocol": "classic", "split": split,
              "num_splits": len(info.testsets)},
    )
    log.info("cuhk03 %s classic split %d: %r", variant, split, ds)
    return ds
