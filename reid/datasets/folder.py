"""A generic dataset folder: ``query/`` and ``gallery/`` (optional ``train/``) of Market-named images."""

from __future__ import annotations

import logging
from pathlib import Path

from reid.datasets.base import Dataset, find_layout, samples_from_paths
from reid.errors import DatasetError
from reid.images import find_images

log = logging.getLogger(__name__)


def load_folder(root: str | Path) -> Dataset:
    """A folder holding ``query/`` and ``gallery/`` (optionally ``train/``), searched recursively.

    Names follow Market-1501 (``PID_cCAM...``): junk (-1) dropped, distractors (0) kept in the gallery only.
    """
    root = Path(root).expanduser()
    base = find_layout(
        root,
        [root],
        ("query", "gallery"),
        dataset="folder",
        expected="ROOT/query/ and ROOT/gallery/ (optional ROOT/train/) holding Market-named images "
        "like 0002_c1s1_000451_03.jpg",
    )
    train_dir = base / "train"
    train = (
        samples_from_paths(find_images(train_dir), keep_distractors=False, where=str(train_dir))
        if train_dir.is_dir()
        else []
    )
    query = samples_from_paths(find_images(base / "query"), keep_distractors=False, where=str(base / "query"))
    gallery = samples_from_paths(
        find_images(base / "gallery"), keep_distractors=True, where=str(base / "gallery")
    )
    if not query or not gallery:
        raise DatasetError(
            f"folder: {base} needs images in both query/ and gallery/ "
            f"(found {len(query)} queries, {len(gallery)} gallery images)"
        )
    log.info("folder %s: %d train, %d query, %d gallery", base, len(train), len(query), len(gallery))
    return Dataset("folder", train, query, gallery, info={"root": str(base)})
