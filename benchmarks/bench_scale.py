"""The gallery at scale: Milvus against the embedded FAISS + SQLite store, through the same protocol, in one run.

Both backends get the same clustered 512-d vectors (``bench_index.clustered``: look-alike groups ->
identities -> images, like real embeddings) as rows with crop-file records, in batches of 10,000:

  insert      rows/s of ``Gallery.add`` (the embedded store: one SQLite transaction per batch; Milvus:
              gRPC inserts), then ``sync`` (the embedded store builds ``vectors.faiss``, IVF-PQ from 200k
              rows; Milvus flushes and builds its HNSW index)
  recall@10   against exact search (NumPy, the same vectors), 200 queries of other images of the same people
  latency     one query at a time, p50 / p95 over 200 queries (a camera filter inside the search, too)
  batch       queries/s in batches of 100

Milvus is the real standalone server of the ``milvus`` package (``tests/milvus_server.py`` starts one on
loopback with free ports), or ``--milvus milvus://HOST:PORT/COLLECTION`` for a running one (credentials
from ``REID_MILVUS_*``). The issue asks for 1M rows; a 2-core machine builds Milvus's HNSW over 1M x 512
for a long time, so pass ``--rows`` to size the run and say which size a figure is for.

The ``ray`` part: ``reid index`` of ``--crops`` synthetic crops (128x64 JPEGs) from the shell into a new
index, the local path against ``--ray`` (a local Ray cluster on this one node, started and stopped by the
command), the same model (``--weights``; default: the default network's architecture with ImageNet streams and
an untrained head, as fast as the trained one) and runtime (``--runtime``; the export is made once before, by a
warm-up run), in ``--rounds`` paired rounds: wall time with start-up (Ray's cluster and model workers included),
crops/s, and Ray's overhead over the local path (target <= 20%).

    python benchmarks/bench_scale.py [--parts store,ray] [--rows N] [--milvus LOCATION] [--skip-local]
                                     [--crops N] [--rounds R] [--runtime auto]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from bench_index import clustered, exact_top, write_crops  # noqa: E402

from reid.model.identity import ModelRef  # noqa: E402
from reid.store import Filter, Record, open_gallery  # noqa: E402

DIM = 512
BATCH = 10_000


def records(start: int, n: int) -> list[Record]:
    return [Record(f"/bench/{i:09d}.jpg", f"sha-{i}", 1000, 10**9 + i, i // 20, 1 + i % 6, "/bench",
                   time=1.7e9 + i) for i in range(start, start + n)]


def run_backend(name: str, location: str, vecs: np.ndarray, queries: np.ndarray, truth: np.ndarray) -> list[tuple]:
    n = len(vecs)
    with open_gallery(location, write=True) as g:
        g.bind(ModelRef("bench", f"bench-{DIM}", DIM), kind="auto", rebuild=True)
        t = time.perf_counter()
        for s in range(0, n, BATCH):
            g.add(records(s, min(BATCH, n - s)), vecs[s : s + BATCH])
        insert = time.perf_counter() - t
        t = time.perf_counter()
        g.sync()
        build = time.perf_counter() - t
        kind = g.info()["vector_kind"]
    with open_gallery(location) as g:
        g.search(queries[:2], 10)  # warm: load the index
        found = [[int(Path(h.path).stem) for h in row] for row in g.search(queries, 10)]  # the row number
        recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)])
        single, filtered = [], []
        for i, q in enumerate(queries):
            t = time.perf_counter()
            g.search(q[None], 10)
            single.append(time.perf_counter() - t)
            t = time.perf_counter()
            g.search(q[None], 10, Filter(cameras_excluded={1 + i % 6}))
            filtered.append(time.perf_counter() - t)
        t = time.perf_counter()
        for s in range(0, len(queries), 100):
            g.search(queries[s : s + 100], 10)
        batch = len(queries) / (time.perf_counter() - t)
    p = lambda xs, q: 1e3 * float(np.percentile(xs, q))  # noqa: E731
    return [(name, kind, f"{n / insert:,.0f} rows/s", f"{build:.1f} s", f"{recall:.3f}",
             f"{p(single, 50):.1f} / {p(single, 95):.1f} ms", f"{p(filtered, 50):.1f} ms", f"{batch:,.0f} q/s")]


def reid_index(gallery: Path, index: Path, *extra: str) -> tuple[float, dict]:
    """``reid index GALLERY --index INDEX --json EXTRA`` from the shell -> (wall seconds, its summary)."""
    reid = Path(sys.executable).with_name("reid")
    t = time.perf_counter()
    proc = subprocess.run([str(reid), "index", str(gallery), "--index", str(index), "--json", *extra],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"reid index {' '.join(extra)} failed:\n{proc.stderr[-2000:]}")
    return wall, json.loads(proc.stdout)


def bench_ray(n: int, rounds: int, runtime: str, weights: str | None) -> None:
    """``reid index`` of ``n`` crops: the local path against ``--ray`` on this node, in paired rounds."""
    with tempfile.TemporaryDirectory(prefix="reid-bench-ray-") as tmp:
        work = Path(tmp)
        model = weights or "the default architecture, untrained head"
        if weights is None:  # the default network's architecture, ImageNet streams, an untrained head
            from reid.model import build_model, save_checkpoint

            weights = str(save_checkpoint(build_model(), work / "model"))
        options = ("--runtime", runtime, "--weights", weights)
        os.environ["REID_CACHE_DIR"] = str(work / "cache")  # the export: made once, by the warm-up below
        write_crops(work / "warm", 8)
        reid_index(work / "warm", work / "warm-index", *options)
        t = time.perf_counter()
        write_crops(work / "gallery", n)
        print(f"{n:,} synthetic crops in {time.perf_counter() - t:.0f} s", flush=True)
        results: dict[str, list[tuple[float, dict]]] = {"local": [], "ray": []}
        for r in range(rounds):
            for name, extra in (("local", ()), ("ray", ("--ray",))):
                wall, summary = reid_index(work / "gallery", work / f"{name}-{r}", *options, *extra)
                assert summary["added"] == n, summary
                results[name].append((wall, summary))
                print(f"round {r + 1} {name}: {wall:.1f} s ({summary['embed_seconds']:.1f} s embedding)", flush=True)
    local = statistics.median(w for w, _ in results["local"])
    header = ("reid index", "wall (median)", "crops/s", "embedding step", "overhead")
    rows = []
    for name, runs in results.items():
        wall = statistics.median(w for w, _ in runs)
        embed = statistics.median(s["embed_seconds"] for _, s in runs)
        rows.append((name if name == "local" else "--ray (1 node)", f"{wall:.1f} s", f"{n / wall:.1f}",
                     f"{embed:.1f} s ({n / embed:.1f} crops/s)", "" if name == "local" else f"{wall / local - 1:+.1%}"))
    table(header, rows)
    print(f"\n{n:,} crops, --runtime {runtime}, model: {model}, {rounds} paired rounds; wall time from the shell, "
          f"start-up included (for --ray: the local cluster, the model workers and the shutdown; the embedding step "
          f"with --ray includes starting the cluster)")


def table(header: tuple, rows: list[tuple]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    print()
    for r in (header, tuple("-" * w for w in widths), *rows):
        print("  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=True)))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="store,ray", help="store (Milvus vs the embedded store), ray (reid index --ray)")
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--milvus", default=None, help="a running server's milvus://HOST:PORT/COLLECTION (else one is "
                                                  "started on loopback)")
    p.add_argument("--skip-local", action="store_true")
    p.add_argument("--crops", type=int, default=2000, help="crops `reid index` embeds in the ray part")
    p.add_argument("--rounds", type=int, default=1, help="paired rounds of the ray part")
    p.add_argument("--runtime", default="auto", help="--runtime of both runs in the ray part")
    p.add_argument("--weights", default=None, help="--weights of both runs in the ray part (default: the default "
                                                   "network's architecture with an untrained head)")
    args = p.parse_args(argv)
    parts = set(args.parts.split(","))
    if "store" in parts:
        bench_store(args)
    if "ray" in parts:
        bench_ray(args.crops, args.rounds, args.runtime, args.weights)


def bench_store(args) -> None:
    t = time.perf_counter()
    vecs = clustered(args.rows, seed=1, dim=DIM)
    queries = clustered(args.rows, seed=2, dim=DIM)[np.random.default_rng(3).choice(args.rows, 200, replace=False)]
    truth = exact_top(queries, vecs, 10)
    print(f"{args.rows:,} x {DIM} clustered vectors and exact top-10 of 200 queries in {time.perf_counter() - t:.0f} s",
          flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="reid-bench-scale-") as tmp:
        if not args.skip_local:
            rows += run_backend("embedded (SQLite + FAISS)", str(Path(tmp) / "local"), vecs, queries, truth)
            print("embedded store done", flush=True)
        if args.milvus:
            rows += run_backend("Milvus", args.milvus, vecs, queries, truth)
        else:
            import milvus_server

            reason = milvus_server.available()
            if reason:
                print(f"Milvus skipped: {reason}")
            else:
                with milvus_server.MilvusServer(Path(tmp) / "milvus") as server:
                    location = f"milvus://{milvus_server.HOST}:{server.port}/bench_scale"
                    os.environ.setdefault("REID_MILVUS_USER", milvus_server.USER)
                    os.environ.setdefault("REID_MILVUS_PASSWORD", milvus_server.PASSWORD)
                    rows += run_backend("Milvus 2.3.5 standalone", location, vecs, queries, truth)
    header = ("backend", "index", "insert", "sync/build", "recall@10", "1 query p50 / p95", "filtered p50", "batch")
    table(header, rows)
    print(f"\n{args.rows:,} rows; median figures of one run on this machine")


if __name__ == "__main__":
    main()
