"""``reid evaluate``: dataset + model -> features (embedded once, cached) -> scores -> a JSON-ready report.

Query and gallery images are embedded together, each distinct file once (CUHK03 classic uses the
same images as queries and gallery). Features are cached on disk per (model fingerprint, flip,
the files' paths/sizes/mtimes), so evaluating again with re-ranking or another AP mode is instant.
The three steps are ``embed``, ``reid.evaluation.scorer.score`` and ``make_report``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from reid.errors import InputError
from reid.evaluation.feature_cache import FeatureTable, embed_files, write_npz
from reid.evaluation.scorer import FeatureSet, Score, ScoreOptions, score

if TYPE_CHECKING:
    from reid.datasets import Dataset
    from reid.model.identity import ModelRef

log = logging.getLogger(__name__)

RANKS = (1, 5, 10, 20)


@dataclass(frozen=True)
class EvalOptions:
    """What an evaluation is asked besides the dataset and the model: which split(s), how to embed, how to score."""

    variant: str | None = None  # cuhk03 / cuhk03-np: labeled or detected
    protocol: str | None = None  # cuhk03: new or classic
    split: int | None = None  # cuhk03 classic: one split (default: all of them, mean and std)
    flip: bool = False
    batch_size: int = 32
    workers: int | None = None
    device: str = "auto"
    use_cache: bool = True
    scoring: ScoreOptions = field(default_factory=ScoreOptions)
    runtime: str = "torch"  # torch (the reference numbers), or the model's export: onnx, openvino, auto

    def __post_init__(self) -> None:
        if self.batch_size < 1 or (self.workers is not None and self.workers < 0):
            raise InputError(f"`batch_size` must be >= 1 and `workers` >= 0, got {self.batch_size} and {self.workers}")

    def replace(self, **changes) -> EvalOptions:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


@dataclass(eq=False)
class Evaluation:
    """Everything one evaluation produced: its datasets, model identity, features and scores; ``report`` sums it up."""

    root: str
    datasets: list[tuple[int | None, Dataset]]  # (CUHK03 classic split or None, its dataset)
    ref: ModelRef  # the evaluated model's identity
    options: EvalOptions
    table: FeatureTable
    cache: str  # "hit" | "miss" | "off"
    sets: list[FeatureSet]
    scores: list[Score]
    timings: dict[str, float]
    model: object = None  # the evaluated model (for attention pictures)

    @property
    def classic(self) -> bool:
        """True for the CUHK03 classic protocol (sampled single-gallery-shot CMC, one score per split)."""
        from reid.datasets import PROTOCOL_CUHK03_CLASSIC

        return self.datasets[0][1].protocol == PROTOCOL_CUHK03_CLASSIC

    @property
    def splits(self) -> list[int] | None:
        """The CUHK03 classic split of each feature set (None for other protocols)."""
        return [k for k, _ in self.datasets] if self.classic else None

    @property
    def cmc(self) -> np.ndarray:
        """The CMC, averaged over the splits."""
        return np.mean([np.asarray(s.result.cmc, dtype=np.float64) for s in self.scores], axis=0)

    @property
    def distmat(self) -> np.ndarray | None:
        """The re-ranked distances of the first split, when re-ranking."""
        return self.scores[0].distmat

    @cached_property
    def report(self) -> dict:
        """The JSON-ready report (see ``make_report``)."""
        return make_report(self)


# --- the steps ---------------------------------------------------------------------------------


def load_datasets(name: str, root: str | Path, *, variant: str | None = None, protocol: str | None = None,
                  split: int | None = None) -> list[tuple[int | None, Dataset]]:
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


def embed(model, fingerprint: str, datasets: list[tuple[int | None, Dataset]], options: EvalOptions,
          progress: Callable[[int, int], None] | None = None) -> tuple[FeatureTable, str]:
    """Features of every query and gallery file of ``datasets`` (each file once, through the cache)."""
    from reid.runtime import resolve_device

    from reid import engine

    paths = [str(s.path) for _, d in datasets for s in (*d.query, *d.gallery)]
    device = options.device
    if not engine.wants_torch(options.runtime, device):
        model, device = engine.bulk_embedder(model, fingerprint, options.runtime), "cpu"
        if isinstance(model, engine.ExportedEmbedder):  # its features agree with torch's to 1e-4, not bit for bit
            fingerprint = f"{fingerprint}+{model.runtime}"  # so they have cache entries of their own
    return embed_files(model, paths, fingerprint=fingerprint, flip=options.flip, batch_size=options.batch_size,
                       workers=options.workers, device=resolve_device(device), use_cache=options.use_cache,
                       progress=progress)


def make_report(ev: Evaluation) -> dict:
    """What was evaluated, how, the scores (mean and std over CUHK03 classic splits), cache state and timings."""
    first, o = ev.datasets[0][1], ev.options
    summaries = [s.summary() for s in ev.scores]
    report = {
        "dataset": first.name,
        "root": ev.root,
        "protocol": first.info.get("protocol", "standard"),
        "variant": first.info.get("variant"),
        "split": ev.datasets[0][0] if len(ev.datasets) == 1 else None,
        "fingerprint": ev.ref.fingerprint,
        "weights": ev.ref.source,
        "flip": o.flip,
        "rerank": o.scoring.rerank,
        "ap": "standard" if ev.classic else o.scoring.ap,
        **summaries[0],
        "num_gallery": len(ev.sets[0].gallery_paths),
        "num_images_embedded": len(ev.table.paths),
        "num_images_failed": len(ev.table.failures),
        "cache": ev.cache,
        "timings": ev.timings,
    }
    if ev.classic:
        report.update(seed=o.scoring.seed, repeats=o.scoring.repeats)
    if len(summaries) > 1:
        _aggregate(report, summaries, ev.sets, [k for k, _ in ev.datasets])
    return report


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
    report["splits"] = [{"split": k, **s} for k, s in zip(splits, summaries, strict=True)]


class _Laps:
    """Seconds spent in each step, keyed by name, plus the total."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._start = self._tick = time.perf_counter()

    def __call__(self, key: str) -> None:
        now = time.perf_counter()
        self.timings[key] = round(now - self._tick, 4)
        self._tick = now

    def done(self) -> dict[str, float]:
        self.timings["total_s"] = round(time.perf_counter() - self._start, 4)
        return self.timings


def evaluate(
    name: str,
    root: str | Path,
    options: EvalOptions = EvalOptions(),
    *,
    weights: str | Path | None = None,
    model=None,
    progress: Callable[[int, int], None] | None = None,
) -> Evaluation:
    """Evaluate a model (``model``, or loaded from ``weights``) on a dataset's standard protocol.

    embed -> score -> report; ``progress(done, total)`` follows the embedding. ``options.runtime`` other than
    torch embeds with the model's checked export (``reid.engine``); the torch model stays the evaluation's
    model (rank pictures, attention).
    """
    from reid.model.identity import ModelRef

    laps = _Laps()
    datasets = load_datasets(name, root, variant=options.variant, protocol=options.protocol, split=options.split)
    laps("load_s")
    model, ref = ModelRef.load(weights) if model is None else (model, ModelRef.of(model))
    laps("model_s")
    table, cache = embed(model, ref.fingerprint, datasets, options, progress)
    laps("embed_s")
    protocol = datasets[0][1].protocol
    sets = [FeatureSet.from_table(d, table) for _, d in datasets]
    scores = [score(fs, protocol=protocol, options=options.scoring) for fs in sets]
    laps("metric_s")
    ev = Evaluation(str(root), datasets, ref, options, table, cache, sets, scores, laps.done(), model)
    t = ev.timings
    log.info("evaluated %s in %.1f s (embedding %.1f s, metrics %.1f s, cache %s)", name, t["total_s"], t["embed_s"],
             t["metric_s"], cache)
    return ev


# --- what else the CLI writes ------------------------------------------------------------------


def check_features_path(path: str | Path) -> Path:
    """Fail early (InputError) when ``path`` is not a ``.npz`` name in an existing folder."""
    path = Path(path)
    if path.suffix.lower() != ".npz":
        raise InputError(f"features are saved as .npz, not {path}")
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
        pairs = list(zip(sets, splits, strict=True))
        arrays["query_split"] = np.concatenate([np.full(len(s.query_paths), k) for s, k in pairs])
        arrays["gallery_split"] = np.concatenate([np.full(len(s.gallery_paths), k) for s, k in pairs])
    return write_npz(path, arrays)


def rank_picture(ev: Evaluation, *, num_queries: int = 8, top: int = 10, seed: int = 0,
                 attention: bool = False) -> np.ndarray:
    """Top-``top`` lists of ``num_queries`` queries sampled (seeded) from the first split, optionally with
    attention overlays."""
    from reid.evaluation.ranking import cosine_distance
    from reid.viz import attention_painter, draw_rank_lists

    fs = ev.sets[0]
    rng = np.random.default_rng(seed)
    sel = np.sort(rng.choice(len(fs.query_paths), size=min(num_queries, len(fs.query_paths)), replace=False))
    dist = ev.distmat[sel] if ev.distmat is not None else cosine_distance(fs.query_features[sel], fs.gallery_features)
    return draw_rank_lists([fs.query_paths[i] for i in sel], fs.gallery_paths, fs.query_pids[sel], fs.gallery_pids,
                           fs.query_camids[sel], fs.gallery_camids, dist, top=top,
                           paint=attention_painter(ev.model) if attention else None)
