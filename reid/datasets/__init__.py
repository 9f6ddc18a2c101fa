"""Re-id datasets read as their owners ship them: ``load(name, root, **options)`` -> ``Dataset``.

Names: market1501, dukemtmcreid, cuhk03 (variant="labeled"|"detected", protocol="new"|"classic",
split=0..19), cuhk03-np (variant=...), folder (query/, gallery/, optional train/ in Market naming).
"""

from __future__ import annotations

import inspect
from pathlib import Path

from reid.datasets.base import (
    DISTRACTOR_PID,
    JUNK_PID,
    PROTOCOL_CUHK03_CLASSIC,
    PROTOCOL_STANDARD,
    SPLITS,
    Dataset,
    Sample,
)
from reid.datasets.cuhk03 import load_cuhk03
from reid.datasets.folder import load_folder
from reid.datasets.market1501 import load_cuhk03_np, load_dukemtmcreid, load_market1501
from reid.errors import InputError

_LOADERS = {
    "market1501": load_market1501,
    "dukemtmcreid": load_dukemtmcreid,
    "cuhk03": load_cuhk03,
    "cuhk03-np": load_cuhk03_np,
    "folder": load_folder,
}
DATASET_NAMES: tuple[str, ...] = tuple(_LOADERS)

__all__ = [
    "DATASET_NAMES",
    "DISTRACTOR_PID",
    "JUNK_PID",
    "PROTOCOL_CUHK03_CLASSIC",
    "PROTOCOL_STANDARD",
    "SPLITS",
    "Dataset",
    "Sample",
    "dataset_options",
    "load",
]


def dataset_options(name: str) -> dict[str, object]:
    """The options ``load(name, ...)`` accepts, with their defaults (for help texts and validation)."""
    loader = _loader(name)
    params = list(inspect.signature(loader).parameters.values())[1:]
    return {p.name: p.default for p in params}


def _loader(name: str):
    key = name.lower().replace("_", "-")
    key = {"market-1501": "market1501", "dukemtmc-reid": "dukemtmcreid", "duke": "dukemtmcreid",
           "cuhk03np": "cuhk03-np"}.get(key, key)
    if key not in _LOADERS:
        raise InputError(f"unknown dataset {name!r}; expected one of: {', '.join(DATASET_NAMES)}")
    return _LOADERS[key]


def load(name: str, root: str | Path, **options) -> Dataset:
    """Load dataset ``name`` from ``root``; options are the loader's (e.g. variant, protocol, split for cuhk03).

    Options set to None are left out (the loader's default applies), so a CLI can pass its unset flags
    straight through.
    """
    loader = _loader(name)
    options = {k: v for k, v in options.items() if v is not None}
    accepted = dataset_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        allowed = ", ".join(accepted) if accepted else "none"
        raise InputError(f"dataset {name!r} takes no option {', '.join(unknown)} (its options: {allowed})")
    return loader(root, **options)
