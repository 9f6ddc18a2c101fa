"""Dataset + model -> features (embedded once, cached) -> metrics -> a JSON-ready report.

Query and gallery images are embedded together, each distinct file once (CUHK03 classic uses the
same images as queries and gallery). Features are cached on disk per (model fingerprint, flip,
the files' paths/sizes/mtimes), so evaluating again with re-ranking or another AP mode is instant.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from reid.errors import DatasetError, InputError
from reid.feature_cache import (
    FeatureTable,
    embed_files,
    write_npz,
)

log = logging.getLogger(__name__)

RANKS = (1, 5, 10, 20)


# --- features of one evaluation split ----------------------------------------------------------


@dataclass
class FeatureSet:
    """Query and gallery features with identities, cameras and paths: all the metrics need."""

    query_features: np.ndarray
    gallery_features: np.ndarray
    query_pids: np.ndarray
    gallery_pids: np.ndarray
    query_camids: np.ndarray
    gallery_camids: np.ndarray
    query_paths: list[str]
    gallery_paths: list[str]


def _side(samples, table: FeatureTable) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    rows = table.rows([s.path for s in samples])
    keep = rows >= 0
    kept = [s for s, k in zip(samples, keep) if k]
    dim = table.features.shape[1] if table.features.ndim == 2 else 0
    feats = table.features[rows[keep]] if kept else np.zeros((0, dim), np.float32)
    return (
        feats,
        np.array([s.pid for s in kept], dtype=np.int64),
        np.array([s.camid for s in kept], dtype=np.int64),
        [str(s.path) for s in kept],
    )


def feature_set(dataset, table: FeatureTable) -> FeatureSet:
    """Pick a dataset's query and gallery rows out of the table (files that failed to decode dropped)."""
    qf, qp, qc, qpaths = _side(dataset.query, table)
    gf, gp, gc, gpaths = _side(dataset.gallery, table)
    if len(qpaths) == 0 or len(gpaths) == 0:
        raise DatasetError(
            f"{dataset.name}: no usable {'query' if not qpaths else 'gallery'} images "
            f"({len(table.failures)} files failed to decode); check the dataset files"
        )
    return FeatureSet(qf, gf, qp, gp, qc, gc, qpaths, gpaths)


def check_features_path(path: str | Path) -> Path:
    """Fail early (InputError) when ``path`` is not a ``.npz`` name in an existing folder."""
    path = Path(path)
    if path.suffix.lower() != ".npz":
        raise InputError(f"--save-features must name a .npz file, got {path}")
    if not path.parent.is_dir():
        raise InputError(f"cannot write {path}: folder {path.parent} does not exist; create it first")
    return path


def save_features(path: str | Path, sets: Sequence[FeatureSet], splits: Sequence[int] | None = None) -> Path:
    """Write features, ids, cameras and paths to an ``.npz`` anyone can recompute the metrics from.

    Several splits (CUHK03 classic) are concatenated with ``query_split`` / ``gallery_split`` naming each row's split.
    """
    path = check_features_path(path)
    arrays = {
        "query_features": np.concatenate([s.query_features for s in sets]).astype(np.float32),
        "gallery_features": np.concatenate([s.gallery_features for s in sets]).astype(np.float32),
        "query_pids": np.concatenate([s.query_pids for s in sets]),
        "gallery_pids": np.concatenate([s.gallery_pids for s in sets]),
        "query_camids": np.concatenate([s.query_camids for s in sets]),
        "gallery_camids": np.concatenate([s.gallery_camids for s in sets]),
        "query_paths": np.array([p for s in sets for p in s.query_paths], dtype=np.str_),
        "gallery_paths": np.array([p for s in sets for p in s.gallery_paths], dtype=np.str_),
    }
    if splits is not None:
        arrays["query_split"] = np.concatenate([np.full(len(s.query_paths), k) for s, k in zip(sets, splits)])
        arrays["gallery_split"] = np.concatenate([np.full(len(s.gallery_paths), k) for s, k in zip(sets, splits)])
    return write_npz(path, arrays)


# --- the evaluation ----------------------------------------------------------------------------


@dataclass
class Evaluation:
    """The report (JSON-ready), the features of each evaluated split, the mean CMC and re-ranked distances."""

    report: dict
    sets: list[FeatureSet]
    splits: list[int] | None
    cmc: np.ndarray
    distmat: np.ndarray | None = None  # re-ranked distances of sets[0], when re-ranking
    model: object = None  # the evaluated model (for attention pictures)


def load_datasets(name: str, root: str | Path, *, variant: str | None = None, protocol: str | None = None,
                  split: int | None = None) -> list[tuple[int | None, object]]:
    """The dataset(s) to evaluate: one, or every CUHK03 classic split when no ``split`` is given."""
    from reid.datasets import PROTOCOL_CUHK03_CLASSIC, load

    options = {k: v for k, v in {"variant": variant, "protocol": protocol, "split": split}.items() if v is not None}
    first = load(name, root, **options)
    if first.protocol != PROTOCOL_CUHK03_CLASSIC:
        return [(None, first)]
    if split is not None:
        return [(split, first)]
    count = first.info.get("num_splits")
    if count is None:
        from reid.datasets.cuhk03 import MAT_RELPATH
        from reid.datasets.cuhk03_extract import read_classic_info

        count = len(read_classic_info(Path(first.info["root"]) / MAT_RELPATH, first.info["variant"]).testsets)
    return [(0, first)] + [(s, load(name, root, **{**options, "split": s})) for s in range(1, int(count))]


def score(fs: FeatureSet, *, classic: bool, rerank: bool, ap: str, max_rank: int, seed: int, repeats: int):
    """Metrics of one split -> (RankingResult, re-ranked distance matrix or None)."""
    from reid import metrics

    ids = (fs.query_pids, fs.gallery_pids, fs.query_camids, fs.gallery_camids)
    distmat = None
    if rerank:
        from reid.rerank import re_rank

        distmat = re_rank(fs.query_features, fs.gallery_features)
    if classic:
        dist = distmat if distmat is not None else metrics.cosine_distance(fs.query_features, fs.gallery_features)
        return metrics.evaluate_cuhk03_classic(dist, *ids, max_rank=max_rank, repeats=repeats, seed=seed), distmat
    if distmat is not None:
        return metrics.evaluate_ranking(distmat, *ids, max_rank=max_rank, ap=ap), distmat
    return metrics.evaluate_features(fs.query_features, fs.gallery_features, *ids, max_rank=max_rank, ap=ap), None


def _summary(r) -> dict:
    """A RankingResult's numbers (mAP, mINP, rank-k, CMC, query counts) without its protocol labels."""
    return {k: v for k, v in r.to_dict().items() if k not in ("protocol", "ap", "seed", "repeats")}


def _aggregate(report: dict, summaries: list[dict], sets: list[FeatureSet], splits: list) -> None:
    """Several splits (CUHK03 classic): mean and std of each number, summed counts, per-split details."""
    for key in ("mAP", "mINP", *(f"rank{k}" for k in RANKS)):
        if key in summaries[0]:
            vals = np.array([s[key] for s in summaries], dtype=np.float64)
            report[key], report[f"{key}_std"] = float(vals.mean()), float(vals.std())
    cmcs = np.array([s["cmc"] for s in summaries], dtype=np.float64)
    report["cmc"], report["cmc_std"] = cmcs.mean(axis=0).tolist(), cmcs.std(axis=0).tolist()
    report["num_queries"] = sum(s["num_queries"] for s in summaries)
    report["num_valid_queries"] = sum(s["num_valid_queries"] for s in summaries)
    report["num_gallery"] = sum(len(fs.gallery_paths) for fs in sets)
    report["splits"] = [{"split": k, **s} for k, s in zip(splits, summaries)]


def evaluate(
    name: str,
    root: str | Path,
    *,
    weights: str | Path | None = None,
    model=None,
    variant: str | None = None,
    protocol: str | None = None,
    split: int | None = None,
    rerank: bool = False,
    ap: str = "standard",
    flip: bool = False,
    batch_size: int = 32,
    workers: int | None = None,
    device: str = "auto",
    use_cache: bool = True,
    max_rank: int = 50,
    seed: int = 0,
    repeats: int = 10,
    progress: Callable[[int, int], None] | None = None,
) -> Evaluation:
    """Evaluate a model on a dataset's standard protocol; see the module docstring for the flow."""
    from reid.datasets import PROTOCOL_CUHK03_CLASSIC
    from reid.metrics import AP_MODES
    from reid.model.identity import ModelRef
    from reid.runtime import resolve_device

    if ap not in AP_MODES:
        raise InputError(f"--ap must be one of {', '.join(AP_MODES)}, got {ap!r}")
    if batch_size < 1 or (workers is not None and workers < 0):
        raise InputError("--batch-size must be >= 1 and --workers >= 0")
    timings: dict[str, float] = {}
    t0 = tick = time.perf_counter()

    def lap(key: str) -> None:
        nonlocal tick
        now = time.perf_counter()
        timings[key] = round(now - tick, 4)
        tick = now

    datasets = load_datasets(name, root, variant=variant, protocol=protocol, split=split)
    lap("load_s")
    dev = resolve_device(device)
    model, ref = ModelRef.load(weights) if model is None else (model, ModelRef.of(model))
    fingerprint = ref.fingerprint
    lap("model_s")
    paths = [str(s.path) for _, d in datasets for s in (*d.query, *d.gallery)]
    table, cache = embed_files(model, paths, fingerprint=fingerprint, flip=flip, batch_size=batch_size,
                               workers=workers, device=dev, use_cache=use_cache, progress=progress)
    lap("embed_s")
    classic = datasets[0][1].protocol == PROTOCOL_CUHK03_CLASSIC
    sets, results, distmat = [], [], None
    for i, (_, d) in enumerate(datasets):
        fs = feature_set(d, table)
        r, dm = score(fs, classic=classic, rerank=rerank, ap=ap, max_rank=max_rank, seed=seed, repeats=repeats)
        sets.append(fs)
        results.append(r)
        distmat = dm if i == 0 else distmat
    lap("metric_s")
    timings["total_s"] = round(time.perf_counter() - t0, 4)

    summaries = [_summary(r) for r in results]
    first = datasets[0][1]
    report = {
        "dataset": first.name,
        "root": str(root),
        "protocol": first.info.get("protocol", "standard"),
        "variant": first.info.get("variant"),
        "split": datasets[0][0] if len(datasets) == 1 else None,
        "fingerprint": fingerprint,
        "weights": ref.source,
        "flip": flip,
        "rerank": rerank,
        "ap": "standard" if classic else ap,
        **summaries[0],
        "num_gallery": len(sets[0].gallery_paths),
        "num_images_embedded": len(table.paths),
        "num_images_failed": len(table.failures),
        "cache": cache,
        "timings": timings,
    }
    if classic:
        report.update(seed=seed, repeats=repeats)
    if len(results) > 1:
        _aggregate(report, summaries, sets, [k for k, _ in datasets])
    log.info("evaluated %s in %.1f s (embedding %.1f s, metrics %.1f s, cache %s)", name, timings["total_s"],
             timings["embed_s"], timings["metric_s"], cache)
    cmc = np.mean([np.asarray(r.cmc, dtype=np.float64) for r in results], axis=0)
    return Evaluation(report, sets, [k for k, _ in datasets] if classic else None, cmc, distmat, model)


def rank_picture(ev: Evaluation, *, num_queries: int = 8, top: int = 10, seed: int = 0,
                 attention: bool = False) -> np.ndarray:
    """Top-``top`` lists of ``num_queries`` queries sampled (seeded) from the first split; optional attention overlays."""
    from reid.viz import attention_painter, draw_rank_lists

    fs = ev.sets[0]
    rng = np.random.default_rng(seed)
    sel = np.sort(rng.choice(len(fs.query_paths), size=min(num_queries, len(fs.query_paths)), replace=False))
    if ev.distmat is not None:
        dist = ev.distmat[sel]
    else:
        from reid.metrics import cosine_distance

        dist = cosine_distance(fs.query_features[sel], fs.gallery_features)
    return draw_rank_lists([fs.query_paths[i] for i in sel], fs.gallery_paths, fs.query_pids[sel], fs.gallery_pids,
                           fs.query_camids[sel], fs.gallery_camids, dist, top=top,
                           paint=attention_painter(ev.model) if attention else None)
