"""Benchmark: Market-size evaluation and re-ranking, with their baselines measured in the same run.

The id/camera structure is the real Market-1501 one (queryID, queryCam, testID, testCam .mat files;
gallery id -1 dropped -> 3,368 x 15,913); the features are synthetic with identity structure
(per-identity centre + per-camera offset + noise, L2-normalised, 512-D) tuned to a realistic
difficulty (rank-1 ~0.9, mAP ~0.7). Targets (DESIGN.md): evaluate_ranking <= 0.3 s and >= 3x faster
than np.argsort of the same matrix; identical metrics to a plain reference; evaluate_features on
3,368 x 500,000 under 4 GiB peak; re-ranking <= 15 s and <= 2 GiB peak. Peak memory is the maximum
resident set size of a fresh subprocess (everything included: interpreter, libraries, features).

    python benchmarks/bench_metrics.py [--protocols DIR] [--repeats 3] [--skip-big] [--skip-rerank]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import scipy.io

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DIM, NOISE, CAMERA = 512, 1.35, 0.75
GIB = 1 << 30


def default_protocols() -> Path:
    local = ROOT / "tests" / "data" / "protocols" / "Market-1501"
    return local if local.is_dir() else Path("/work/shared/data/protocols/Market-1501")


def load_market_ids(folder: Path):
    """(q_pids, q_cams, g_pids, g_cams) of the real Market-1501 protocol, gallery junk (-1) dropped."""

    def read(name: str) -> np.ndarray:
        mat = scipy.io.loadmat(str(folder / f"{name}.mat"))
        return next(v for k, v in mat.items() if not k.startswith("__")).ravel().astype(np.int64)

    q_pids, q_cams, g_pids, g_cams = (read(n) for n in ("queryID", "queryCam", "testID", "testCam"))
    keep = g_pids != -1
    return q_pids, q_cams, g_pids[keep], g_cams[keep]


def synthetic_features(pids, cams, rng, centres, offsets, out=None) -> np.ndarray:
    """Identity centre (or, for distractors 0, a private random one) + camera offset + noise, normalised."""
    x = out if out is not None else np.empty((len(pids), DIM), dtype=np.float32)
    step = 1 << 13  # small chunks: generating must not dominate the peak memory we measure
    for a in range(0, len(pids), step):
        p, c = pids[a : a + step], cams[a : a + step]
        chunk = rng.standard_normal((len(p), DIM), dtype=np.float32) * np.float32(NOISE)
        chunk += offsets[c]
        real = p > 0
        chunk[real] += centres[p[real]]
        chunk[~real] += rng.standard_normal((int((~real).sum()), DIM), dtype=np.float32)
        chunk /= np.linalg.norm(chunk, axis=1, keepdims=True)
        x[a : a + len(p)] = chunk
    return x


def market_features(folder: Path, seed: int = 0, extra_distractors: int = 0):
    q_pids, q_cams, g_pids, g_cams = load_market_ids(folder)
    if extra_distractors:
        rng_ids = np.random.default_rng(seed + 1)
        g_pids = np.concatenate([g_pids, np.zeros(extra_distractors, dtype=np.int64)])
        g_cams = np.concatenate([g_cams, rng_ids.integers(1, 7, extra_distractors)])
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((int(max(q_pids.max(), g_pids.max())) + 1, DIM), dtype=np.float32)
    offsets = rng.standard_normal((int(max(q_cams.max(), g_cams.max())) + 1, DIM), dtype=np.float32)
    offsets *= np.float32(CAMERA)
    q = synthetic_features(q_pids, q_cams, rng, centres, offsets)
    g = synthetic_features(g_pids, g_cams, rng, centres, offsets)
    return q, g, q_pids, g_pids, q_cams, g_cams


def reference_ranking(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50):
    """The plain implementation: stable argsort of each row, masks, cumulative sums."""
    cmcs, aps, inps = [], [], []
    for i in range(distmat.shape[0]):
        order = np.argsort(distmat[i], kind="stable")
        same = g_pids[order] == q_pids[i]
        junk = (g_pids[order] == -1) | (same & (g_camids[order] == q_camids[i]))
        hits = same[~junk]
        if not hits.any():
            continue
        where = np.flatnonzero(hits)
        cmc = np.zeros(max_rank)
        if where[0] < max_rank:
            cmc[where[0] :] = 1.0
        cmcs.append(cmc)
        aps.append(np.mean(np.arange(1, where.size + 1) / (where + 1.0)))
        inps.append(where.size / (where[-1] + 1.0))
    return np.mean(cmcs, axis=0), float(np.mean(aps)), float(np.mean(inps))


def best_of(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def maxrss_bytes() -> int:
    """Peak resident set size of this process (VmHWM: unlike ru_maxrss, not inherited through fork+exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(kind: str, folder: Path) -> None:
    """Run one measured job in this fresh process and print its numbers as JSON."""
    from reid.evaluation import evaluate_features, evaluate_ranking

    extra = 500_000 - 15_913 if kind == "big" else 0
    q, g, qp, gp, qc, gc = market_features(folder, extra_distractors=extra)
    before = maxrss_bytes()
    t = time.perf_counter()
    if kind == "big":
        r = evaluate_features(q, g, qp, gp, qc, gc)
        elapsed, peak = time.perf_counter() - t, maxrss_bytes()
        info = {"mAP": r.mAP, "rank1": r.rank(1), "gallery": int(g.shape[0])}
    else:
        from reid.evaluation.rerank import re_rank

        d = re_rank(q, g)
        elapsed, peak = time.perf_counter() - t, maxrss_bytes()
        r = evaluate_ranking(d, qp, gp, qc, gc)
        base = evaluate_features(q, g, qp, gp, qc, gc)
        info = {"mAP": r.mAP, "rank1": r.rank(1), "mAP_before": base.mAP, "rank1_before": base.rank(1)}
    print(json.dumps({"seconds": elapsed, "rss_before": before, "rss_peak": peak, **info}))


def run_child(kind: str, folder: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--protocols", str(folder)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"child {kind} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--protocols", type=Path, default=default_protocols(),
                    help="folder with the Market-1501 .mat files (queryID, queryCam, testID, testCam)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-big", action="store_true", help="skip the 3,368 x 500,000 memory run")
    ap.add_argument("--skip-rerank", action="store_true", help="skip the re-ranking run")
    ap.add_argument("--child", choices=("big", "rerank"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.protocols)
        return

    from reid.evaluation import cosine_distance, evaluate_ranking

    q, g, qp, gp, qc, gc = market_features(args.protocols)
    d = cosine_distance(q, g)
    print(f"Market-size matrix {d.shape[0]:,} x {d.shape[1]:,} (float32), protocols from {args.protocols}")
    t_ours, r = best_of(lambda: evaluate_ranking(d, qp, gp, qc, gc), args.repeats)
    t_sort, _ = best_of(lambda: np.argsort(d, axis=1), args.repeats)
    t_trap, _ = best_of(lambda: evaluate_ranking(d, qp, gp, qc, gc, ap="trapezoid"), args.repeats)
    t_ref, (cmc, mAP, mINP) = best_of(lambda: reference_ranking(d, qp, gp, qc, gc), 1)
    same = np.allclose(r.cmc, cmc, rtol=0, atol=1e-12) and abs(r.mAP - mAP) < 1e-12 and abs(r.mINP - mINP) < 1e-12
    print(f"metrics: rank-1 {r.rank(1):.4f}  mAP {r.mAP:.4f}  mINP {r.mINP:.4f}  "
          f"({r.num_valid_queries} valid queries); identical to the reference: {same}")
    rows = [
        ("evaluate_ranking (ours)", t_ours, "<= 0.3 s"),
        ("evaluate_ranking ap=trapezoid", t_trap, ""),
        ("np.argsort(distmat, axis=1) alone", t_sort, "baseline"),
        ("plain reference (argsort loop)", t_ref, ""),
    ]
    print(f"\n{'step':38s} {'seconds':>9s} {'argsort / it':>13s}  target")
    for name, t, target in rows:
        print(f"{name:38s} {t:9.3f} {t_sort / t:12.1f}x  {target}")
    print(f"speed-up over np.argsort: {t_sort / t_ours:.1f}x (target >= 3x); "
          f"over the reference: {t_ref / t_ours:.0f}x")
    if not same:
        raise SystemExit("metrics differ from the reference")

    if not args.skip_big:
        b = run_child("big", args.protocols)
        print(f"\nevaluate_features 3,368 x {b['gallery']:,} (D={DIM}): {b['seconds']:.1f} s, "
              f"peak RSS {b['rss_peak'] / GIB:.2f} GiB (target < 4 GiB; "
              f"{b['rss_before'] / GIB:.2f} GiB before evaluating: features + libraries); mAP {b['mAP']:.4f}")
    if not args.skip_rerank:
        rr = run_child("rerank", args.protocols)
        print(f"\nre_rank 3,368 + 15,913 (D={DIM}, k1=20, k2=6, lambda=0.3): {rr['seconds']:.1f} s (target <= 15 s), "
              f"peak RSS {rr['rss_peak'] / GIB:.2f} GiB (target <= 2 GiB; {rr['rss_before'] / GIB:.2f} GiB before)")
        print(f"  mAP {rr['mAP_before']:.4f} -> {rr['mAP']:.4f}, rank-1 {rr['rank1_before']:.4f} -> {rr['rank1']:.4f}")
    print("\n(timings on a shared CPU are noisy; ratios are measured within this run)")


if __name__ == "__main__":
    main()
