"""Select ``reid adapt``'s clustering settings on a synthetic selection world, never on a benchmark set.

The world is seed 23 (``write_market1501(40, 40, 20 distractors, 0 junk, 6 cameras, 2 per camera)``),
which neither ``bench_quality.py`` (seed 11) nor vtest.avi share. The shipped model embeds the crops an
analyst would adapt on (query + gallery, labels hidden); each row clusters them with
``reid.train.pseudo_labels.cluster_features`` and scores the clusters against the hidden identities:
pairwise precision / recall of same-cluster pairs (outliers pair with nobody), adjusted Rand index, the
number of clusters, outliers and the largest cluster's share of the crops (``reid adapt`` skips an epoch
whose largest cluster holds over half). Clustering only: no training, about a minute on 2 cores.

    python benchmarks/select_clustering.py [--work ~/.cache/reid-bench/select] [--k1 5,10,20,30]
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reid.train.pseudo_labels import cluster_features  # noqa: E402


def pair_scores(labels: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Precision and recall of the same-cluster pairs against the true same-person pairs (outliers: none)."""
    same_cluster = (labels[:, None] == labels[None, :]) & (labels[:, None] >= 0)
    same_person = truth[:, None] == truth[None, :]
    off = ~np.eye(len(labels), dtype=bool)
    predicted, actual = same_cluster & off, same_person & off
    hits = float((predicted & actual).sum())
    return hits / max(float(predicted.sum()), 1.0), hits / max(float(actual.sum()), 1.0)


def main(argv: list[str] | None = None) -> None:
    from sklearn.metrics import adjusted_rand_score

    from reid.datasets import load
    from reid.embed import embed_paths
    from reid.model import build_model
    from reid.synthetic import write_market1501

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path.home() / ".cache" / "reid-bench" / "select")
    p.add_argument("--eps", default="0.4,0.5,0.6")
    p.add_argument("--k1", default="5,10,20,30")
    p.add_argument("--min-samples", default="2,4")
    args = p.parse_args(argv)

    import torch
    torch.set_flush_denormal(True)
    root = args.work / "market-select-23"
    if not (root / ".done").exists():
        write_market1501(root, num_train_ids=40, num_test_ids=40, num_distractors=20, num_junk=0, cameras=6,
                         images_per_cam=2, seed=23)
        (root / ".done").touch()
    ds = load("market1501", root)
    samples = [*ds.query, *ds.gallery]
    t = time.perf_counter()
    res = embed_paths(build_model(), [s.path for s in samples], batch_size=32)
    if res.failures:
        raise SystemExit(f"{len(res.failures)} crops failed to decode")
    feats = res.features
    # Distractors (pid 0) are each somebody else: a negative id apiece, so they pair with nobody.
    truth = np.array([s.pid if s.pid > 0 else -1 - i for i, s in enumerate(samples)])
    cams = np.array([s.camid for s in samples])
    people, passers = len(set(truth[truth > 0].tolist())), int((truth < 0).sum())
    print(f"{len(samples)} crops of {people} people (+ {passers} passers-by) in {len(set(cams.tolist()))} cameras, "
          f"embedded in {time.perf_counter() - t:.1f} s (shipped model)\n")
    print(f"{'centred':>7s} {'eps':>4s} {'k1':>3s} {'min':>3s} | {'prec':>5s} {'recall':>6s} {'ARI':>5s} | "
          f"{'clusters':>8s} {'outliers':>8s} {'largest':>7s}")
    grid = itertools.product((True, False), [float(x) for x in args.eps.split(",")],
                             [int(x) for x in args.k1.split(",")], [int(x) for x in args.min_samples.split(",")])
    for centred, eps, k1, min_samples in grid:
        c = cluster_features(feats, eps=eps, k1=k1, min_samples=min_samples, cameras=cams if centred else None)
        prec, rec = pair_scores(c.labels, truth)
        kept = c.labels >= 0
        ari = adjusted_rand_score(truth[kept], c.labels[kept]) if c.num_clusters else 0.0
        print(f"{'yes' if centred else 'no':>7s} {eps:4.2f} {k1:3d} {min_samples:3d} | {prec:5.2f} {rec:6.2f} "
              f"{ari:5.2f} | {c.num_clusters:8d} {c.num_outliers:8d} {c.largest / len(c.labels):7.2f}", flush=True)


if __name__ == "__main__":
    main()
