"""Market-1501, DukeMTMC-reID and CUHK03-NP: three folders of Market-named images, read as their owners ship them."""

from __future__ import annotations

import logging
from pathlib import Path

from reid.datasets.base import Dataset, find_layout, market_splits
from reid.errors import DatasetError, InputError

log = logging.getLogger(__name__)

MARKET_FOLDERS = ("bounding_box_train", "query", "bounding_box_test")
MARKET_DIR = "Market-1501-v15.09.15"
DUKE_DIR = "DukeMTMC-reID"
CUHK03_NP_DIR = "cuhk03-np"
CUHK03_VARIANTS = ("labeled", "detected")

_THREE = "{bounding_box_train,query,bounding_box_test}"


def _load_three(name: str, base: Path, info: dict) -> Dataset:
    train, query, gallery = market_splits(
        base / "bounding_box_train", base / "query", base / "bounding_box_test"
    )
    if not query or not gallery:
        raise DatasetError(
            f"{name}: {base} has an empty query/ or bounding_box_test/ folder "
            f"({len(query)} queries, {len(gallery)} gallery images); the download may be incomplete"
        )
    log.info("%s from %s: %d train, %d query, %d gallery", name, base, len(train), len(query), len(gallery))
    return Dataset(name, train, query, gallery, info={"root": str(base), **info})


def load_market1501(root: str | Path) -> Dataset:
    """Market-1501 from ``ROOT/Market-1501-v15.09.15/``, ``ROOT/market1501/Market-1501-v15.09.15/`` or ROOT itself.

    Junk (-1) is dropped everywhere; distractors (0) stay in the gallery; identities keep their real ids.
    """
    root = Path(root).expanduser()
    base = find_layout(
        root,
        [root / MARKET_DIR, root / "market1501" / MARKET_DIR, root],
        MARKET_FOLDERS,
        dataset="market1501",
        expected=f"ROOT/{MARKET_DIR}/{_THREE} (or ROOT/market1501/{MARKET_DIR}/..., or ROOT/{_THREE})",
    )
    return _load_three("market1501", base, {})


def load_dukemtmcreid(root: str | Path) -> Dataset:
    """DukeMTMC-reID from ``ROOT/DukeMTMC-reID/``, ``ROOT/dukemtmc-reid/DukeMTMC-reID/`` or ROOT itself."""
    root = Path(root).expanduser()
    base = find_layout(
        root,
        [root / DUKE_DIR, root / "dukemtmc-reid" / DUKE_DIR, root],
        MARKET_FOLDERS,
        dataset="dukemtmcreid",
        expected=f"ROOT/{DUKE_DIR}/{_THREE} (or ROOT/dukemtmc-reid/{DUKE_DIR}/..., or ROOT/{_THREE})",
    )
    return _load_three("dukemtmcreid", base, {})


def load_cuhk03_np(root: str | Path, variant: str = "labeled") -> Dataset:
    """CUHK03-NP (Zhong et al.'s re-packing of the new protocol) from ``ROOT/cuhk03-np/{labeled,detected}/``.

    Also accepted: ``ROOT/{labeled,detected}/`` (ROOT is the cuhk03-np folder) or ROOT itself holding the
    three folders of one variant.
    """
    if variant not in CUHK03_VARIANTS:
        raise InputError(f"cuhk03-np: unknown variant {variant!r}; expected one of {', '.join(CUHK03_VARIANTS)}")
    root = Path(root).expanduser()
    base = find_layout(
        root,
        [root / CUHK03_NP_DIR / variant, root / variant, root],
        MARKET_FOLDERS,
        dataset="cuhk03-np",
        expected=f"ROOT/{CUHK03_NP_DIR}/{variant}/{_THREE} (or ROOT/{variant}/..., or ROOT/{_THREE})",
    )
    return _load_three("cuhk03-np", base, {"variant": variant})
