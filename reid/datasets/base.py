"""What every loader returns: ``Sample`` lists for train / query / gallery, plus shared folder scanning."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from reid.errors import DatasetError
from reid.images import IMAGE_EXTENSIONS, parse_market_name

log = logging.getLogger(__name__)

SPLITS = ("train", "query", "gallery")

# How a dataset is scored: the Market-1501 rule (same id + same camera ignored) or CUHK03's classic
# single-gallery-shot protocol (one sampled gallery image per identity, averaged over repeats).
PROTOCOL_STANDARD = "standard"
PROTOCOL_CUHK03_CLASSIC = "cuhk03-classic"

JUNK_PID = -1  # badly detected boxes: never part of any split
DISTRACTOR_PID = 0  # people outside the protocol: kept in the gallery as negatives


class Sample(NamedTuple):
    """One image: its path, identity (real dataset id, not relabelled) and camera (numbered as the owner does)."""

    path: Path
    pid: int
    camid: int


@dataclass(frozen=True)
class Dataset:
    """A loaded dataset: three lists of samples (query and gallery may be the same list, as in CUHK03 classic)."""

    name: str
    train: list[Sample]
    query: list[Sample]
    gallery: list[Sample]
    protocol: str = PROTOCOL_STANDARD
    info: dict = field(default_factory=dict)  # loader options and provenance (variant, split, root, ...)

    def split(self, which: str) -> list[Sample]:
        """The samples of ``train``, ``query`` or ``gallery``."""
        if which not in SPLITS:
            raise ValueError(f"unknown split {which!r}; expected one of {SPLITS}")
        return getattr(self, which)

    def ids(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        """(pids int64 [n], camids int64 [n]) of a split, in sample order (what the metrics take)."""
        samples = self.split(which)
        pids = np.fromiter((s.pid for s in samples), dtype=np.int64, count=len(samples))
        camids = np.fromiter((s.camid for s in samples), dtype=np.int64, count=len(samples))
        return pids, camids

    def paths(self, which: str) -> list[Path]:
        """The image paths of a split, in sample order."""
        return [s.path for s in self.split(which)]

    @property
    def num_train_pids(self) -> int:
        """Distinct identities in the training split."""
        return _count_pids(self.train)

    @property
    def num_query_pids(self) -> int:
        """Distinct identities among the queries."""
        return _count_pids(self.query)

    @property
    def num_gallery_pids(self) -> int:
        """Distinct identities in the gallery, distractors (id 0) counted as one."""
        return _count_pids(self.gallery)

    def describe(self) -> list[dict]:
        """One row per split (images, identities, cameras, distractors): the summary the CLI prints."""
        rows = []
        for which in SPLITS:
            samples = self.split(which)
            pids = {s.pid for s in samples}
            rows.append(
                {
                    "split": which,
                    "images": len(samples),
                    "ids": len(pids - {DISTRACTOR_PID}),
                    "cameras": len({s.camid for s in samples}),
                    "distractors": sum(1 for s in samples if s.pid == DISTRACTOR_PID),
                }
            )
        return rows

    def __repr__(self) -> str:
        counts = ", ".join(f"{r['split']}={r['images']} img/{r['ids']} ids" for r in self.describe())
        return f"Dataset({self.name!r}, {counts}, protocol={self.protocol!r})"


def _count_pids(samples: Iterable[Sample]) -> int:
    return len({s.pid for s in samples})


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder`` (by extension, case-insensitive), sorted by name.

    Non-image files that datasets ship (Market-1501's ``Thumbs.db``) are ignored.
    """
    with os.scandir(folder) as it:
        names = [
            e.name
            for e in it
            if not e.name.startswith(".")
            and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
            and e.is_file()
        ]
    names.sort()
    return [folder / n for n in names]


def samples_from_paths(
    paths: Sequence[Path], *, keep_distractors: bool, where: str
) -> list[Sample]:
    """Samples from Market-named files (``0002_c1s1_000451_03.jpg``): junk (-1) dropped, distractors (0) kept if asked.

    Raises DatasetError on a name that does not follow the naming (the folder is not what it claims).
    """
    samples = []
    dropped = 0
    for p in paths:
        pid, camid = parse_market_name(p.name)
        if pid is None:
            raise DatasetError(
                f"{p}: file name does not follow Market-1501 naming 'PID_cCAM...' "
                f"(e.g. 0002_c1s1_000451_03.jpg); {where} must hold only such images"
            )
        if pid == JUNK_PID or (pid == DISTRACTOR_PID and not keep_distractors):
            dropped += 1
            continue
        samples.append(Sample(p, pid, camid))
    if dropped:
        log.debug("%s: dropped %d junk/distractor images", where, dropped)
    return samples


def market_splits(
    train_dir: Path | None, query_dir: Path, gallery_dir: Path
) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """Read the three Market-style folders (``bounding_box_train``, ``query``, ``bounding_box_test``)."""
    train = (
        samples_from_paths(list_images(train_dir), keep_distractors=False, where=str(train_dir))
        if train_dir is not None
        else []
    )
    query = samples_from_paths(list_images(query_dir), keep_distractors=False, where=str(query_dir))
    gallery = samples_from_paths(list_images(gallery_dir), keep_distractors=True, where=str(gallery_dir))
    return train, query, gallery


def find_layout(
    root: Path, candidates: Sequence[Path], required: Sequence[str], *, dataset: str, expected: str
) -> Path:
    """The first candidate folder holding every ``required`` entry; DatasetError naming the layout otherwise."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DatasetError(f"{dataset}: dataset root {root} does not exist; expected {expected}")
    for cand in candidates:
        if all((cand / r).exists() for r in required):
            return cand
    looked = []
    for cand in candidates:
        missing = [r for r in required if not (cand / r).exists()]
        looked.append(f"{cand} (missing {', '.join(missing)})")
    raise DatasetError(
        f"{dataset}: no dataset found under {root}; expected {expected}. Looked in: {'; '.join(looked)}"
    )
