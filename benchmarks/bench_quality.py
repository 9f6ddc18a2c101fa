"""Re-id quality on real pedestrians: the vtest.avi tracklets, the shipped model against training-free baselines.

DESIGN "Quality": no labeled real re-id data can be had here, so quality is measured on real tracklets
from OpenCV's ``vtest.avi`` (``benchmarks/vtest_tracklets.py``: query = an early segment of each track,
gallery = a later one, after a gap; short tracks are distractors). Evaluation data only: nothing is ever
trained or tuned on it. Every row is measured in the same run on the same crops:

  hsv histogram     per horizontal stripe joint HSV histograms, sqrt-normalised (Hellinger)
  stream A pooled   the model's own MobileNetV2 stream (ImageNet), average-pooled local features
  streams A+B       both streams average-pooled, each L2-normalised, concatenated
  seeded head       ``build_model(trained_head=False)``: the head before ``reid.train.distill`` fitted it
  default model     ``reid.model.build_model()`` embeddings through ``reid.embed.embed_paths``
  + reid adapt      ``reid.train.adapt`` from the default on the table's own crops, labels hidden (synthetic
                    table: on its training crops, and on the crops searched, query + gallery; ``--fine-tune``
                    also with the streams trained)
  + adapt on index  (``--footage-adapt``) the analyst's way: ``reid index vtest.avi`` (detector, tracker),
                    then ``reid adapt`` on that index: every person it found, each tracklet one cluster
  + reid train      (synthetic table) ``reid.train.train`` with labels, default recipe

Two protocols, one table: (A) each query track against its own later crops and those of every track on
screen at the same time: those are certainly other people, so the labels are clean; (B) every query
against the gallery crops of all identities (no distractor tracks), Market-style, where some "negatives"
are the same person walking past again (vtest.avi has a small cast who cross the plaza repeatedly),
which caps every method's score and punishes the better ones most.

Each baseline is a plain function ``(list of uint8 RGB crops) -> float32 [N, D]`` L2-normalised rows, so
more rows (trained checkpoints, ``reid adapt``) can be added to ``rows()``. Metrics: Market-1501 protocol
(``reid.evaluation.evaluate_features``; query camera 1, gallery camera 2, distractors identity 0).

A second table does the same on a synthetic Market-1501 (``reid.synthetic``, a world seed of its own):
``reid adapt`` with the labels hidden (cameras from the names) on its training crops and on the crops
searched (query + gallery, as an analyst adapts to the footage searched), and ``reid train`` on the
training crops with the labels.

    OMP_NUM_THREADS=2 python benchmarks/bench_quality.py [--data DIR] [--stride N] [--adapt-epochs N]
        [--synthetic-ids N] [--train-epochs N] [--skip-vtest] [--footage-adapt] [--fine-tune] [--head FILE]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from collections.abc import Callable, Sequence

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vtest_tracklets import DEFAULT_DATA, TrackletSet, build_tracklets  # noqa: E402

from reid.images import decode_image, resize_crop  # noqa: E402
from reid.evaluation import evaluate_features  # noqa: E402

INPUT_SIZE = (256, 128)
Features = Callable[[Sequence[np.ndarray]], np.ndarray]


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def hsv_histogram(crops: Sequence[np.ndarray], stripes: int = 6, bins: tuple[int, int, int] = (8, 4, 4)) -> np.ndarray:
    """Joint HSV histograms of ``stripes`` horizontal stripes of each crop (at 256x128), each stripe
    L1-normalised, square-rooted (Hellinger), all concatenated and L2-normalised."""
    out = []
    for crop in crops:
        hsv = cv2.cvtColor(resize_crop(crop, INPUT_SIZE), cv2.COLOR_RGB2HSV)  # H in [0, 180)
        feats = []
        for band in np.array_split(hsv, stripes, axis=0):
            h = cv2.calcHist([np.ascontiguousarray(band)], [0, 1, 2], None, list(bins), [0, 180, 0, 256, 0, 256])
            h = h.ravel() / max(1.0, float(h.sum()))
            feats.append(np.sqrt(h))
        out.append(np.concatenate(feats))
    return _unit(np.stack(out)) if out else np.zeros((0, stripes * int(np.prod(bins))), np.float32)


def _batches(crops: Sequence[np.ndarray], batch_size: int = 32):
    """Float [B,3,256,128] RGB in [0, 1] batches of the crops, resized as ``reid.embed`` resizes them."""
    for s in range(0, len(crops), batch_size):
        x = np.stack([resize_crop(c, INPUT_SIZE) for c in crops[s : s + batch_size]])
        yield torch.from_numpy(x).permute(0, 3, 1, 2).float().div_(255.0)


@torch.inference_mode()
def pooled_streams(model: torch.nn.Module, crops: Sequence[np.ndarray], streams: str = "a") -> np.ndarray:
    """Average-pooled local features of the model's stream A (``"a"``) or of both (``"ab"``: each pool
    L2-normalised, then concatenated), L2-normalised."""
    model.eval()
    out = []
    for x in _batches(crops):
        parts = [torch.nn.functional.normalize(getattr(model, f"stream_{s}")(x).mean(dim=(2, 3)), dim=1)
                 for s in streams]
        out.append(torch.cat(parts, dim=1).numpy())
    return _unit(np.concatenate(out))


def default_model_paths(model: torch.nn.Module, paths: Sequence[Path]) -> np.ndarray:
    """The shipped path: ``reid.embed.embed_paths`` (decode, resize, embed) on the crop files."""
    from reid.embed import embed_paths

    res = embed_paths(model, paths, batch_size=32)
    if res.failures:
        raise RuntimeError(f"{len(res.failures)} crops failed to decode, e.g. {res.failures[0]}")
    return res.features


def rows(model: torch.nn.Module, extra: Sequence[tuple[str, torch.nn.Module]] = ()
         ) -> list[tuple[str, Features | torch.nn.Module]]:
    """(name, features of crops) for each row; a model instead: embedded from the crop files."""
    from reid.model import build_model

    return [
        ("hsv histogram (6 stripes, 8x4x4)", hsv_histogram),
        ("stream A pooled (MobileNetV2)", lambda crops: pooled_streams(model, crops, "a")),
        ("streams A+B pooled", lambda crops: pooled_streams(model, crops, "ab")),
        ("seeded head (trained_head=False)", build_model(trained_head=False)),
        ("default model (build_model)", model),
        *extra,
    ]


def head_model(path: Path) -> torch.nn.Module:
    """The default network with the head in ``path`` instead of the shipped one (a candidate from
    ``reid.train.distill``, compared with the shipped head in the same run)."""
    from reid.model import build_model
    from reid.model.net import load_default_head

    model = build_model(trained_head=False)
    load_default_head(model, path)
    return model.eval()


def adapt_to(folder: Path, out: Path, epochs: int, camera_aware: bool, fine_tune: bool = False) -> torch.nn.Module:
    """``reid adapt`` from the default model on every crop under ``folder``, labels hidden; a finished run
    in ``out`` is reused."""
    from reid.model import load_checkpoint
    from reid.train.adapt import AdaptConfig, adapt

    t = time.perf_counter()
    config = AdaptConfig(epochs=epochs, camera_aware=camera_aware, centre_cameras=camera_aware, fine_tune=fine_tune)
    result = adapt(folder, out, config=config, device="cpu",
                   on_epoch=lambda r: print(f"  adapt epoch {r['epoch']}: {r['clusters']} clusters, "
                                            f"{r['outliers']} outliers, loss {r['loss']}", flush=True))
    print(f"reid adapt: {result.crops} crops, {result.epochs_done} epochs, {time.perf_counter() - t:.0f} s")
    return load_checkpoint(result.checkpoint)


def adapt_on_index(data: Path, video: Path, epochs: int, fine_tune: bool = False) -> torch.nn.Module:
    """``reid index VIDEO --stride 2`` into ``data/footage-index`` (kept), then ``reid adapt`` on that index:
    the people the detector and tracker found, a tracklet's crops one cluster (must-links)."""
    from reid.index import FootageOptions, build_index

    index = data / "footage-index"
    t = time.perf_counter()
    report = build_index(video, index, device="cpu", footage=FootageOptions(stride=2))
    print(f"reid index {video.name} --stride 2: {report.people} people in {report.tracklets} tracklets "
          f"({report.videos_unchanged} video(s) already indexed), {time.perf_counter() - t:.0f} s")
    return adapt_to(index, data / f"adapt-index-vote-{'ft-' if fine_tune else ''}{epochs}", epochs,
                    camera_aware=False, fine_tune=fine_tune)


def evaluate_cooccurring(qf: np.ndarray, gf: np.ndarray, ts: TrackletSet, max_rank: int = 10) -> dict:
    """Each query track against its own gallery crops and those of the tracks on screen with it (certain
    negatives, ``TrackletSet.cooccurring``); mAP / CMC over all queries."""
    (q_pids, q_cams), (g_pids, g_cams) = ts.labels("query"), ts.labels("gallery")
    aps, firsts, sizes = [], [], []
    for qi, gi in ts.cooccurring():
        r = evaluate_features(qf[qi], gf[gi], q_pids[qi], g_pids[gi], q_cams[qi], g_cams[gi], max_rank=max_rank)
        ok = r.query_first_rank >= 0
        aps.append(r.query_ap[ok])
        firsts.append(r.query_first_rank[ok])
        sizes.append(len(gi))
    ap, first = np.concatenate(aps), np.concatenate(firsts)
    return {"mAP": float(ap.mean()), "rank1": float((first < 1).mean()), "rank5": float((first < 5).mean()),
            "valid": int(len(ap)), "gallery": float(np.mean(sizes))}


def evaluate_all(qf: np.ndarray, gf: np.ndarray, ts: TrackletSet, max_rank: int = 10) -> dict:
    """Every query against the gallery crops of all identities (distractor tracks left out): every other
    track is a negative, although some are the same person at another time (noisy labels; kept for
    comparison with figures measured this way)."""
    (q_pids, q_cams), (g_pids, g_cams) = ts.labels("query"), ts.labels("gallery")
    keep = g_pids > 0
    r = evaluate_features(qf, gf[keep], q_pids, g_pids[keep], q_cams, g_cams[keep], max_rank=max_rank)
    return {"mAP": r.mAP, "rank1": r.rank(1), "rank5": r.rank(5), "valid": r.num_valid_queries,
            "gallery": float(keep.sum())}


def row_features(row: Features | torch.nn.Module, q_paths: Sequence[Path], g_paths: Sequence[Path]
                 ) -> tuple[np.ndarray, np.ndarray, float]:
    """Query and gallery features of one row, and the seconds they took."""
    t = time.perf_counter()
    if isinstance(row, torch.nn.Module):
        qf, gf = default_model_paths(row, q_paths), default_model_paths(row, g_paths)
    else:
        qf, gf = row([decode_image(p) for p in q_paths]), row([decode_image(p) for p in g_paths])
    return qf, gf, time.perf_counter() - t


def evaluate(ts: TrackletSet, model: torch.nn.Module,
             extra: Sequence[tuple[str, torch.nn.Module]] = ()) -> list[dict]:
    """Features of every row on the same crops, scored under both protocols."""
    results = []
    for name, row in rows(model, extra):
        qf, gf, spent = row_features(row, ts.paths("query"), ts.paths("gallery"))
        results.append({"name": name, "dim": qf.shape[1], "s": spent,
                        "co": evaluate_cooccurring(qf, gf, ts), "all": evaluate_all(qf, gf, ts)})
    return results


def synthetic_market(work: Path, model: torch.nn.Module, *, ids: int, adapt_epochs: int, train_epochs: int,
                     fine_tune: bool = False, heads: Sequence[tuple[str, torch.nn.Module]] = ()) -> None:
    """The second table: a synthetic Market-1501 (``reid.synthetic``, its own world seed), every row on its
    query x gallery; ``reid adapt`` on the training crops with their labels hidden (cameras from the names:
    camera-aware proxies), ``reid train`` on them with labels and the default recipe."""
    from reid.datasets import load
    from reid.model import load_checkpoint
    from reid.synthetic import write_market1501
    from reid.train import TrainConfig, train

    root = work / f"market-{ids}"
    if not (root / ".done").exists():
        write_market1501(root, num_train_ids=ids, num_test_ids=ids, num_distractors=ids // 2, num_junk=0, cameras=6,
                         images_per_cam=2, seed=11)
        (root / ".done").touch()
    ds = load("market1501", root)
    extra = list(heads)
    if adapt_epochs:
        train_dir = Path(ds.train[0].path).parent
        extra.append((f"+ reid adapt on train ({adapt_epochs} ep)",
                      adapt_to(train_dir, work / f"adapt-v3-{ids}-{adapt_epochs}", adapt_epochs, camera_aware=True)))
        # The analyst's way, as in the vtest table: adapt to the crops searched (query + gallery), labels hidden.
        searched = work / f"market-{ids}-searched"
        for sample in (*ds.query, *ds.gallery):
            dest = searched / Path(sample.path).parent.name / Path(sample.path).name
            if not dest.exists():
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(sample.path, dest)
        extra.append((f"+ reid adapt on searched ({adapt_epochs} ep)",
                      adapt_to(searched, work / f"adapt-searched-{ids}-{adapt_epochs}", adapt_epochs,
                               camera_aware=True)))
        if fine_tune:
            extra.append((f"+ adapt --fine-tune on searched ({adapt_epochs})",
                          adapt_to(searched, work / f"adapt-searched-ft-{ids}-{adapt_epochs}", adapt_epochs,
                                   camera_aware=True, fine_tune=True)))
    if train_epochs:
        t = time.perf_counter()
        run = work / f"train-{ids}-{train_epochs}"
        train(ds, run, TrainConfig(epochs=train_epochs, eval_every=0), device="cpu", resume=(run / "last").exists())
        print(f"reid train: {train_epochs} epochs, {time.perf_counter() - t:.0f} s")
        extra.append((f"default + reid train ({train_epochs} ep, labels)", load_checkpoint(run / "last")))
    print(f"\nsynthetic Market-1501 ({root}): {len(ds.train)} training crops of {ds.num_train_pids} identities, "
          f"{len(ds.query)} queries, {len(ds.gallery)} gallery crops")
    print(f"{'method':40s} {'dim':>4s} | {'mAP':>6s} {'rank-1':>6s} {'rank-5':>6s} | {'time s':>6s}")
    q = [s.path for s in ds.query]
    g = [s.path for s in ds.gallery]
    qp, qc = np.array([s.pid for s in ds.query]), np.array([s.camid for s in ds.query])
    gp, gc = np.array([s.pid for s in ds.gallery]), np.array([s.camid for s in ds.gallery])
    for name, row in rows(model, extra):
        qf, gf, spent = row_features(row, q, g)
        r = evaluate_features(qf, gf, qp, gp, qc, gc)
        print(f"{name:40s} {qf.shape[1]:4d} | {r.mAP:6.3f} {r.rank(1):6.3f} {r.rank(5):6.3f} | {spent:6.1f}",
              flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="vtest data folder (default %(default)s)")
    parser.add_argument("--stride", type=int, default=1, help="detector on every N-th frame (default 1)")
    parser.add_argument("--adapt-epochs", type=int, default=12, help="reid adapt epochs; 0 = no adapt row")
    parser.add_argument("--synthetic-ids", type=int, default=100,
                        help="identities of the synthetic Market-1501 table (train and test each); 0 = no table")
    parser.add_argument("--train-epochs", type=int, default=8,
                        help="reid train epochs (default recipe) for its labeled row; 0 = no such row")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "reid-bench" / "synthetic",
                        help="folder of the synthetic table's data and runs (reused; default %(default)s)")
    parser.add_argument("--skip-vtest", action="store_true", help="only the synthetic table")
    parser.add_argument("--fine-tune", action="store_true",
                        help="also `reid adapt --fine-tune` (streams trained) on the synthetic table's searched crops "
                             "and, with --footage-adapt, on the vtest index")
    parser.add_argument("--head", type=Path, action="append", default=[],
                        help="also a row for the default network with this head file (a default_head.safetensors "
                             "that `python -m reid.train.distill --out DIR` wrote); repeatable")
    parser.add_argument("--footage-adapt", action="store_true",
                        help="also a row adapted on `reid index vtest.avi --stride 2` (tracklets as must-links)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    torch.set_flush_denormal(True)
    cv2.setNumThreads(2)

    t0 = time.perf_counter()
    from reid.model import build_model

    model = build_model()
    args.heads = [(f"head {p.parent.name}"[:40], head_model(p)) for p in args.head]
    if not args.skip_vtest:
        vtest_table(args, model)
    if args.synthetic_ids:
        synthetic_market(args.work, model, ids=args.synthetic_ids, adapt_epochs=args.adapt_epochs,
                         train_epochs=args.train_epochs, fine_tune=args.fine_tune, heads=args.heads)
    print(f"\ntotal {time.perf_counter() - t0:.1f} s")


def vtest_table(args: argparse.Namespace, model: torch.nn.Module) -> None:
    """The first table: every row on the vtest.avi tracklets, both protocols."""
    t0 = time.perf_counter()
    ts = build_tracklets(args.data, stride=args.stride)
    s = ts.stats
    t_data = time.perf_counter() - t0
    n_ids = len(set(ts.labels("query")[0].tolist()))
    n_distractors = int((ts.labels("gallery")[0] == 0).sum())
    print(f"vtest.avi tracklets ({ts.root}): {n_ids} identities, {len(ts.query)} queries, {len(ts.gallery)} gallery "
          f"crops ({n_distractors} from {s['distractor_tracks']} distractor tracklets); detector "
          f"{s['detector_ms_per_frame']} ms/frame over {s['frames_detected']} frames; data ready in {t_data:.1f} s "
          f"(first build {s['build_s']} s)")
    # One real camera: the query/gallery split is not a camera change, so no camera-aware proxies.
    extra = [(f"default + reid adapt ({args.adapt_epochs} ep, no labels)",
              adapt_to(ts.root, Path(args.data) / "adapt-run-v2", args.adapt_epochs, camera_aware=False))
             ] if args.adapt_epochs else []
    if args.footage_adapt and args.adapt_epochs:
        extra.append((f"default + adapt on its index ({args.adapt_epochs} ep)",
                      adapt_on_index(Path(args.data), Path(s["video"]), args.adapt_epochs)))
        if args.fine_tune:
            extra.append((f"+ adapt --fine-tune on its index ({args.adapt_epochs})",
                          adapt_on_index(Path(args.data), Path(s["video"]), args.adapt_epochs, fine_tune=True)))
    results = evaluate(ts, model, [*args.heads, *extra])
    co, al = results[0]["co"], results[0]["all"]
    print(f"\nA: each query track against the tracks on screen with it (certain negatives; {co['valid']} queries, "
          f"{co['gallery']:.0f} gallery crops each on average)\nB: against the gallery crops of all identities "
          f"({al['valid']} queries, {al['gallery']:.0f} crops, no distractors; other tracks may be the same person at "
          f"another time)\n")
    print(f"{'method':40s} {'dim':>4s} | {'A mAP':>6s} {'rank-1':>6s} {'rank-5':>6s} | {'B mAP':>6s} {'rank-1':>6s} "
          f"{'rank-5':>6s} | {'time s':>6s}")
    for r in results:
        a, b = r["co"], r["all"]
        print(f"{r['name']:40s} {r['dim']:4d} | {a['mAP']:6.3f} {a['rank1']:6.3f} {a['rank5']:6.3f} | "
              f"{b['mAP']:6.3f} {b['rank1']:6.3f} {b['rank5']:6.3f} | {r['s']:6.1f}")


if __name__ == "__main__":
    main()
