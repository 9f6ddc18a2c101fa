"""``reid adapt``: unsupervised adaptation of the network to a user's own cameras, from unlabeled crops
(a folder of crop files, or an index: its crop files and the people it found in footage, cut again from
their frames, each tracklet's crops must-linked into one cluster).

Cluster contrast on frozen streams: the two CNN streams run once per crop and view (a clean view and
a few augmented ones; ``reid.train.stream_cache``), so each epoch trains only the head (bilinear,
spatial LSTM, attention, embedding) and costs seconds, not the streams' hours on a CPU. Every epoch
re-clusters the current embeddings of the clean views (``reid.train.pseudo_labels``), builds a proxy
memory from the clusters (per camera when Market-style names give cameras), and trains on P x K
batches of pseudo-identities; outliers sit the epoch out. The checkpoint in ``OUT/last`` is saved
after every epoch (atomically, with the optimiser state) and is usable by ``--weights`` everywhere;
a run started again with the same inputs resumes after its last finished epoch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from reid.errors import CheckpointError, InputError

log = logging.getLogger(__name__)

STATE_FILE = "adapt_state.pt"
STATE_VERSION = 1
# An epoch whose largest pseudo-identity holds more than this share of the crops learns nothing: such a
# cluster is many people merged (a radius too large for the gallery), and training on it pulls them
# together. On a synthetic Market (322 crops, 40 identities) the default settings put 293 crops in one
# cluster, and training on such clusters lowered mAP 0.460 -> 0.113 (while Adam's L2 term still wore the
# LSTM's row counter down); on the index of vtest.avi (1,285 people) the largest cluster holds 17-19%.
MAX_CLUSTER_SHARE = 0.5


@dataclass(frozen=True)
class AdaptConfig:
    """Everything that decides what an adaptation run computes (saved with its state; resume needs the same)."""

    epochs: int = 12
    batch_p: int = 16
    batch_k: int = 4
    lr: float = 3.5e-4
    weight_decay: float = 5e-4
    views: int = 4  # cached views per crop: the clean one and views - 1 augmented ones
    # DBSCAN over k-reciprocal Jaccard distances, the Cluster Contrast settings. Smaller ones find clusters in
    # small galleries, where these put everyone in one cluster and nothing is learned, but on a held-out
    # synthetic Market (322 crops, 40 identities) training on those clusters lowered mAP from 0.284 to
    # 0.125 (radius 0.5, k1 10, 2 samples) and 0.119 (0.5, 10, 4): no smaller default until one helps there.
    eps: float = 0.6  # the radius
    auto_eps: bool = False  # instead: the mean distance of the closest share ``rho`` of pairs, each epoch
    rho: float = 1.6e-3
    min_samples: int = 4
    k1: int = 30
    k2: int = 6
    temperature: float = 0.05
    momentum: float = 0.2
    camera_aware: bool = True  # one proxy per cluster and camera (cameras known)
    # Cluster with each camera's mean feature taken away (cameras known, two or more): on a synthetic selection
    # world (seed 23: 488 crops searched, 40 people + 20 passers-by, 6 camera styles) adapting on them at
    # radius 0.5, k1 10, 2 samples took mAP 0.463 -> 0.535 with it and to 0.387 without (0.513 with the
    # settings below); see ``pseudo_labels.centre_cameras``.
    centre_cameras: bool = True
    # Train the CNN streams too: no stream cache, every step runs them forward and backward on fresh
    # augmentations (6-11x the time of head-only epochs on a CPU). On the seed-23 selection world with the
    # true identities as clusters, 12 epochs: 0.463 -> 0.821 mAP fine-tuned, 0.582 head-only.
    fine_tune: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_p", "batch_k", "views", "min_samples", "k1", "k2"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"`{name}` must be at least 1, got {getattr(self, name)}")
        if self.eps is not None and not 0.0 < self.eps < 1.0:
            raise InputError(f"`eps` must be within (0, 1), got {self.eps}")
        if not 0.0 < self.rho < 1.0:
            raise InputError(f"`rho` must be within (0, 1), got {self.rho}")


@dataclass
class AdaptResult:
    """What a run did: the checkpoint folder, epochs done (resumed ones included) and the log records."""

    out: Path
    checkpoint: Path
    crops: int
    failed: list[tuple[str, str]] = field(default_factory=list)
    epochs_done: int = 0
    records: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False  # an epoch learned nothing, so every later one would have found the same clusters


def clustering(config: AdaptConfig) -> dict[str, Any]:
    """The ``cluster_features`` options of ``config`` (``eps`` None there: the rho rule)."""
    return {"eps": None if config.auto_eps else config.eps, "rho": config.rho, "k1": config.k1,
            "min_samples": config.min_samples, "k2": config.k2}


@dataclass
class _Crops:
    """What adaptation learns from: one key (file path, or footage row path), crop, camera and tracklet each."""

    paths: list[str]
    crops: list[np.ndarray]
    failed: list[tuple[str, str]]
    cameras: np.ndarray | None = None  # int per crop, or None when not every crop names one
    tracklets: np.ndarray | None = None  # int per crop, -1 for a crop outside any tracklet
    digest: str = ""  # what the crops are, for the stream-map cache


def _is_index(gallery: Path) -> bool:
    from reid.store import CATALOGUE_NAME

    return (gallery / CATALOGUE_NAME).is_file()


def _cut_from_video(media: str, records: list, slots: list[int], crops: list) -> list[tuple[str, str]]:
    """Cut the people ``records`` of one video from its frames (one decoding pass) into ``crops[slots]``;
    returns the rows that could not be cut, with the reason."""
    from reid.errors import ReidError
    from reid.sources.video import FrameReader, probe

    wanted: dict[int, list[tuple[int, object]]] = {}
    for slot, r in zip(slots, records, strict=True):
        wanted.setdefault(r.frame, []).append((slot, r))
    try:
        for frame in FrameReader(media, probe(media), 0.0):
            for slot, r in wanted.pop(frame.index, []):
                x1, y1, x2, y2 = r.box
                crops[slot] = frame.image[y1:y2, x1:x2]
            if not wanted:
                break
    except ReidError as e:
        return [(r.path, str(e)) for left in wanted.values() for _, r in left]
    return [(r.path, f"{media}: frame {r.frame} is no longer there") for left in wanted.values() for _, r in left]


def _load_index(index: Path) -> _Crops:
    """The rows of an index: crop files decoded, footage rows cut from their frames (one pass per video)."""
    from reid.errors import ReidError
    from reid.images import decode_image
    from reid.store import open_gallery

    with open_gallery(index) as g:
        records = [r for _, r in g.scan()]
    if not records:
        raise InputError(f"{index}: the index holds no rows to adapt to")
    by_video: dict[str, list[int]] = {}
    crops: list[np.ndarray | None] = [None] * len(records)
    failed: list[tuple[str, str]] = []
    for i, r in enumerate(records):
        if r.media is not None and r.media == r.source:  # a person in a video: cut in one pass per video below
            by_video.setdefault(r.media, []).append(i)
            continue
        try:  # a crop file, or a person in a frame file
            img = decode_image(r.media or r.path)
            crops[i] = img if r.box is None else img[r.box[1] : r.box[3], r.box[0] : r.box[2]]
        except ReidError as e:
            failed.append((r.path, str(e)))
    for media, rows in by_video.items():
        failed += _cut_from_video(media, [records[i] for i in rows], rows, crops)
    keep = [i for i, c in enumerate(crops) if c is not None and c.size]
    if len(keep) < 2:
        raise InputError(f"{index}: {len(keep)} usable crop(s) of {len(records)} rows; adapting needs at least 2")
    records = [records[i] for i in keep]
    names = {name: k for k, name in enumerate(sorted({r.camera for r in records if r.camera is not None}))}
    cameras = None if any(r.camera is None for r in records) else np.array([names[r.camera] for r in records])
    keys = {t: k for k, t in enumerate(dict.fromkeys(r.tracklet for r in records if r.tracklet is not None))}
    tracklets = np.array([keys[r.tracklet] if r.tracklet is not None else -1 for r in records], np.int64)
    digest = hashlib.sha256(json.dumps([[r.path, r.sha256] for r in records]).encode()).hexdigest()
    return _Crops([r.path for r in records], [crops[i] for i in keep], failed, cameras,
                  tracklets if (tracklets >= 0).any() else None, digest)


def _load_crops(gallery: str | os.PathLike) -> tuple[list[str], list[np.ndarray], list[tuple[str, str]]]:
    """Decode every image under ``gallery``: (paths, crops, failures as (path, reason))."""
    from reid.images import decode_image, find_images
    from reid.errors import ReidError

    files = find_images(gallery)
    if not files:
        raise InputError(f"{gallery}: no image files to adapt to")
    paths, crops, failed = [], [], []
    for f in files:
        try:
            crops.append(decode_image(f))
            paths.append(str(f))
        except ReidError as e:
            failed.append((str(f), str(e)))
    if len(crops) < 2:
        raise InputError(f"{gallery}: {len(crops)} decodable image(s) of {len(files)}; adapting needs at least 2")
    return paths, crops, failed


def _cameras(paths: list[str]) -> np.ndarray | None:
    """Camera of every crop from Market-style names, or None unless all of them name one."""
    from reid.images import parse_market_name

    cams = [parse_market_name(Path(p).name)[1] for p in paths]
    return None if any(c is None for c in cams) else np.asarray(cams, np.int64)


def _view(crop: np.ndarray, view: int, seed: int, size: tuple[int, int]) -> np.ndarray:
    """View 0 is the crop itself; the others are seeded augmentations (flip, shift, erasing, light)."""
    from reid.train.transforms import TrainTransform

    if view == 0:
        return crop
    rng = np.random.default_rng([seed, view, crop.shape[0], crop.shape[1], int(crop[::7, ::7].sum())])
    x = TrainTransform(size=size)(crop, rng)  # float 3xHxW in [0, 1]
    x = x * rng.uniform(0.7, 1.3) + rng.uniform(-0.1, 0.1)  # exposure and offset: cameras differ in light
    return np.ascontiguousarray((np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).transpose(1, 2, 0))


def _data_key(data: _Crops, config: AdaptConfig, streams: str) -> str:
    h = hashlib.sha256(json.dumps([data.paths, config.views, config.seed, streams, *([data.digest] if data.digest
                                                                                      else [])]).encode())
    if not data.digest:  # crop files: their sizes and times say whether they changed
        for p in data.paths:
            st = os.stat(p)
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _load(gallery: Path) -> _Crops:
    """The crops of a folder (cameras from Market-style names) or of an index (cameras by name, tracklets)."""
    if gallery.is_dir() and _is_index(gallery):
        return _load_index(gallery)
    paths, crops, failed = _load_crops(gallery)
    return _Crops(paths, crops, failed, _cameras(paths))


def _batches(labels: np.ndarray, p: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """P x K batches over the inlier clusters, each crop about once per epoch (K drawn with replacement
    from clusters smaller than K)."""
    members = [np.flatnonzero(labels == c) for c in range(int(labels.max()) + 1)] if labels.max() >= 0 else []
    members = [m for m in members if len(m)]
    if not members:
        return []
    steps = max(1, math.ceil(int((labels >= 0).sum()) / (p * k)))
    out = []
    for _ in range(steps):
        chosen = rng.choice(len(members), size=min(p, len(members)), replace=False)
        out.append(np.concatenate([rng.choice(members[c], size=k, replace=len(members[c]) < k) for c in chosen]))
    return out


class _Run:
    """The run folder: ``last/`` (checkpoint + optimiser state), ``adapt.jsonl`` (one record per epoch), ``cache/``."""

    def __init__(self, out: Path, config: AdaptConfig, key: str) -> None:
        self.out, self.config, self.key = out, config, key
        self.last = out / "last"
        self.log_path = out / "adapt.jsonl"

    def resume_state(self) -> dict[str, Any] | None:
        """The saved state of an unfinished run with these inputs, None for a new run."""
        from reid.atomic import recover_dir

        recover_dir(self.last)
        path = self.last / STATE_FILE
        if not path.is_file():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure to read is a bad state file for the user
            raise CheckpointError(f"cannot read the adaptation state {path}: {type(e).__name__}: {e}") from e
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise CheckpointError(f"{path} is not an adaptation state this version of reid can resume")
        if state.get("key") != self.key or state.get("config") != asdict(self.config):
            raise InputError(f"{self.out} holds an adaptation run of other crops or settings; choose another "
                             f"output folder, or remove it to start again")
        return state

    def records(self) -> list[dict[str, Any]]:
        if not self.log_path.is_file():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]

    def save(self, model, optimizer, epoch: int, record: dict[str, Any], records: list[dict[str, Any]]) -> None:
        from reid.atomic import atomic_path
        from reid.train.state import save_model_dir

        state = {"version": STATE_VERSION, "key": self.key, "config": asdict(self.config), "epoch": epoch,
                 "optimizer": optimizer.state_dict()}
        save_model_dir(model, self.last, {STATE_FILE: state, "adapt.json": record})
        with atomic_path(self.log_path) as tmp:
            Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in [*records, record]))


def adapt(gallery: str | os.PathLike, out: str | os.PathLike, *, weights: str | os.PathLike | None = None,
          config: AdaptConfig | None = None, device: str = "auto",
          on_epoch: Callable[[dict[str, Any]], None] | None = None,
          progress: Callable[[str, int, int], None] | None = None) -> AdaptResult:
    """Adapt the model (the default network, or the checkpoint ``weights``) to the crops under ``gallery``.

    ``progress(stage, done, total)`` reports the one-off stream pass ("streams") and each epoch's steps
    ("epoch N"); ``on_epoch(record)`` sees each epoch's log record (clusters, outliers, loss).
    """
    from reid.embed import embed_images
    from reid.model.identity import ModelRef
    from reid.runtime import resolve_device
    from reid.train.pseudo_labels import ProxyMemory, cluster_features
    from reid.train.stream_cache import embed_maps, streams_fingerprint, tune_allocator

    config = config or AdaptConfig()
    out = Path(out).expanduser()
    data = _load(Path(gallery).expanduser())
    crops, failed = data.crops, data.failed
    for _, reason in failed:
        log.warning("skipped %s", reason)
    dev = resolve_device(device)
    model, start_ref = ModelRef.load(weights, dev)
    crops_key = _data_key(data, config, streams_fingerprint(model))  # what the cached stream maps hold
    run = _Run(out, config, f"{crops_key}-{start_ref.fingerprint}")
    state = run.resume_state()
    if state is not None:
        model, _ = ModelRef.load(run.last, dev)
    out.mkdir(parents=True, exist_ok=True)
    n = len(crops)
    maps, crops, params = _what_trains(model, crops, config, out / "cache", crops_key, dev, progress)
    cameras = data.cameras if config.camera_aware else None
    # Decoupled weight decay: an L2 term under Adam moves every parameter by about lr per step towards zero
    # however small its gradient, and the distilled head's closed-form weights are small (its BNNeck scales
    # ~0.03, the LSTM's pass-through ~0.006).
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    start, records = 0, []
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        start, records = int(state["epoch"]), run.records()[: int(state["epoch"])]
        log.info("resuming %s after epoch %d", out, start)
    clean = _ViewSlice(maps, n) if maps is not None else None
    tune_allocator()
    for epoch in range(start, config.epochs):
        t0 = time.perf_counter()
        feats = embed_maps(model, clean) if clean is not None else embed_images(model, crops, device=dev)
        clusters = cluster_features(feats, **clustering(config), tracklets=data.tracklets,
                                    cameras=data.cameras if config.centre_cameras else None)
        record: dict[str, Any] = {"epoch": epoch + 1, "clusters": clusters.num_clusters,
                                  "outliers": clusters.num_outliers, "eps": round(clusters.eps, 4),
                                  "loss": None, "steps": 0,
                                  "cluster_seconds": round(time.perf_counter() - t0, 2)}
        largest = clusters.largest
        record["largest"] = largest
        if clusters.num_clusters >= 2 and largest <= MAX_CLUSTER_SHARE * n:
            memory = ProxyMemory(feats, clusters, cameras, temperature=config.temperature, momentum=config.momentum,
                                 device=dev)
            rng = np.random.default_rng([config.seed, epoch])
            batches = _batches(clusters.labels, config.batch_p, config.batch_k, rng)
            model.train()
            features = (_fresh_views(model, crops, rng, config.seed, dev) if maps is None
                        else _cached_views(model, maps, rng, n, config.views, dev))
            losses = _train_epoch(model, features, memory, optimizer, batches, dev, progress, epoch)
            model.eval()
            record.update(loss=round(float(np.mean(losses)), 4), steps=len(batches), proxies=len(memory))
        else:
            log.warning("epoch %d: %d clusters among %d crops at radius %.3f, the largest of %d crops; nothing to "
                        "learn from (a smaller eps splits more, a larger one merges more)", epoch + 1,
                        clusters.num_clusters, n, clusters.eps, largest)
        record["seconds"] = round(time.perf_counter() - t0, 2)
        run.save(model, optimizer, epoch + 1, record, records)
        records.append(record)
        if on_epoch is not None:
            on_epoch(record)
        if not record["steps"]:  # the model is as it was, so the next epoch would cluster the same features
            log.info("stopping after epoch %d: nothing was learned, and later epochs would find the same clusters",
                     epoch + 1)  # the epoch's warning said why; the result says it stopped
            return AdaptResult(out, run.last, n, failed, epoch + 1, records, stopped_early=True)
    return AdaptResult(out, run.last, n, failed, config.epochs, records)


def _what_trains(model, crops: list[np.ndarray], config: AdaptConfig, cache: Path, key: str, dev, progress):
    """(stream maps or None, crops, trained parameters): head-only, the frozen streams' maps of every crop and
    view computed once (into ``cache``); ``fine_tune``, no maps, the crops at the model's size, every parameter."""
    from reid.images import resize_crop
    from reid.train.stream_cache import cached_stream_maps

    n, size = len(crops), tuple(model.config.input_size)
    if config.fine_tune:
        return None, [resize_crop(c, size) for c in crops], [p for p in model.parameters() if p.requires_grad]
    for p in model.backbone_parameters():
        p.requires_grad_(False)
    maps = cached_stream_maps(
        model, lambda i: _view(crops[i % n], i // n, config.seed, size), n * config.views, folder=cache,
        key=key, device=dev, progress=(lambda d, t: progress("streams", d, t)) if progress else None)
    return maps, crops, [p for p in model.head_parameters() if p.requires_grad]


def _cached_views(model, maps, rng, n: int, views: int, dev) -> Callable[[np.ndarray], torch.Tensor]:
    """Head-only: the pre-BN features of a random cached view of each crop of a batch."""
    def features(idx: np.ndarray) -> torch.Tensor:
        fa, fb = maps.batch(idx + n * rng.integers(0, views, size=len(idx)), dev)
        return model.head_from_streams(fa, fb).features
    return features


def _fresh_views(model, crops, rng, seed: int, dev) -> Callable[[np.ndarray], torch.Tensor]:
    """Fine-tuning: the pre-BN features of a fresh augmented view of each crop of a batch (crops already at the
    model's input size) through the whole network."""
    from reid.embed import to_model_input

    size = tuple(model.config.input_size)

    def features(idx: np.ndarray) -> torch.Tensor:
        views = rng.integers(1, 2**31 - 1, size=len(idx))  # a new augmentation every time (view 0 is the crop)
        x = np.stack([_view(crops[i], int(v), seed, size) for i, v in zip(idx, views, strict=True)])
        return model.forward_train(to_model_input(torch.from_numpy(x)).to(dev)).features
    return features


def _train_epoch(model, features: Callable[[np.ndarray], torch.Tensor], memory, optimizer, batches, dev, progress,
                 epoch: int) -> list[float]:
    """One epoch of P x K batches: ``features(idx)`` of each batch, contrast against the proxies."""
    losses = []
    for step, idx in enumerate(batches):
        f = F.normalize(model.bnneck(features(idx)), dim=1)
        index = torch.as_tensor(idx, device=dev)
        loss = memory.loss(f, index)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        memory.update(f, index)
        losses.append(loss.item())
        if progress is not None:
            progress(f"epoch {epoch + 1}", step + 1, len(batches))
    return losses


class _ViewSlice:
    """The first ``n`` rows of a StreamMaps (the clean views), with the same batch interface."""

    def __init__(self, maps, n: int) -> None:
        self.maps, self.n = maps, n

    def __len__(self) -> int:
        return self.n

    def batch(self, index, device="cpu"):
        return self.maps.batch(index, device)
