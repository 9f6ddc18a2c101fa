"""Benchmark: `reid evaluate market1501` at the real Market-1501 size, split into embedding and metric time.

Writes (once) a synthetic Market-1501 tree with the real file counts, identities and cameras
(3,368 queries, 19,732 gallery files of which 15,913 are kept), tiny images, then runs the
evaluation twice: cold (every image embedded; cache off) and warm (features from the cache, only
the metrics run). Baselines measured in the same run:
  - the model alone on pre-decoded tensors (img/s) -> pipeline embedding throughput as a share of it;
  - ``np.argsort`` of the full query x gallery distance matrix -> metric time as a ratio of it.

    python benchmarks/bench_evaluate.py                      # tiny model (64x32 input): a few minutes
    python benchmarks/bench_evaluate.py --model default      # the real network: long on 2 CPU cores
    python benchmarks/bench_evaluate.py --model CKPT --device cuda --rerank
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TINY = dict(input_size=(64, 32), c_a=8, c_b=8, d_x=32, d_h=16, d_att=16, num_glimpses=1, embed_dim=32)


def get_model(spec: str):
    """'tiny' (random weights, 64x32 input), 'default' (the packaged pretrained network) or a checkpoint path."""
    from reid.model import ModelConfig, build_model, load_checkpoint

    if spec == "tiny":
        return build_model(ModelConfig(**TINY), pretrained=False)
    if spec == "default":
        return build_model(pretrained=True)
    return load_checkpoint(spec)


def ensure_tree(root: Path, size: tuple[int, int]) -> Path:
    """Write the mirror-real synthetic Market-1501 under ``root`` unless a complete one is already there.

    Written by a child process: OpenCV's thread pool, once used, can deadlock the forked decoding workers.
    """
    base = root / "Market-1501-v15.09.15"
    marker = root / f".complete-{size[0]}x{size[1]}"
    if not marker.exists():
        t = time.perf_counter()
        code = ("import sys; from reid.synthetic import write_market1501; "
                "write_market1501(sys.argv[1], mirror_real=True, size=(int(sys.argv[2]), int(sys.argv[3])))")
        subprocess.run([sys.executable, "-c", code, str(root), str(size[0]), str(size[1])], check=True,
                       cwd=Path(__file__).resolve().parents[1])
        marker.touch()
        print(f"wrote synthetic Market-1501 ({size[0]}x{size[1]} crops) in {time.perf_counter() - t:.1f} s",
              file=sys.stderr)
    return base


def model_throughput(model, device, batch_size: int, n: int) -> float:
    """Images per second of the model alone on random pre-decoded crops (the embedding baseline)."""
    from reid.embed import embed_arrays, model_input_size

    h, w = model_input_size(model)
    x = np.random.default_rng(0).random((n, 3, h, w), dtype=np.float32)
    embed_arrays(model, x[:batch_size], batch_size=batch_size, device=device)  # warm-up
    t = time.perf_counter()
    embed_arrays(model, x, batch_size=batch_size, device=device)
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize()
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "reid-bench-market-real")
    ap.add_argument("--image-size", default="64x32", help="HxW of the written crops (tiny = fast to write)")
    ap.add_argument("--model", default="tiny", help="tiny | default | path to a checkpoint")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=None, help="decoding processes (default: auto, as reid evaluate)")
    ap.add_argument("--rerank", action="store_true", help="also time the warm run with k-reciprocal re-ranking")
    ap.add_argument("--baseline-images", type=int, default=1024, help="crops for the model-only baseline")
    args = ap.parse_args()

    from reid.evaluation import ScoreOptions
    from reid.evaluation.evaluate import EvalOptions, evaluate, load_datasets
    from reid.runtime import resolve_device

    h, w = (int(v) for v in args.image_size.lower().split("x"))
    root = args.root
    root.mkdir(parents=True, exist_ok=True)
    ensure_tree(root, (h, w))
    os.environ["REID_CACHE"] = str(root / "feature-cache")
    device = resolve_device(args.device)
    model = get_model(args.model)

    ds = load_datasets("market1501", root)[0][1]
    print(f"dataset: {len(ds.query)} queries, {len(ds.gallery)} gallery; model {args.model}; device {device}; "
          f"torch threads {__import__('torch').get_num_threads()}", file=sys.stderr)
    base_ips = model_throughput(model, device, args.batch_size, args.baseline_images)

    options = EvalOptions(batch_size=args.batch_size, workers=args.workers, device=args.device)
    cold = evaluate("market1501", root, options.replace(use_cache=False), model=model).report
    evaluate("market1501", root, options, model=model)  # writes the cache ...
    warm_ev = evaluate("market1501", root, options, model=model)  # ... this one reads it
    warm = warm_ev.report
    assert warm["cache"] == "hit" and abs(warm["mAP"] - cold["mAP"]) < 1e-6
    reranked = (evaluate("market1501", root, options.replace(scoring=ScoreOptions(rerank=True)), model=model).report
                if args.rerank else None)

    n_images = cold["num_images_embedded"] + cold["num_images_failed"]
    pipe_ips = n_images / cold["timings"]["embed_s"]
    fs = warm_ev.sets[0]  # argsort baseline on the same matrix the metrics saw
    dist = 1.0 - fs.query_features @ fs.gallery_features.T
    t = time.perf_counter()
    np.argsort(dist, axis=1)
    argsort_s = time.perf_counter() - t

    wt = warm["timings"]
    rows = [
        ("images embedded (query + gallery)", f"{n_images}"),
        ("model alone, pre-decoded (baseline)", f"{base_ips:.0f} img/s"),
        ("cold: embedding (decode + model)", f"{cold['timings']['embed_s']:.1f} s = {pipe_ips:.0f} img/s "
                                              f"({pipe_ips / base_ips:.0%} of the model alone)"),
        ("cold: metrics", f"{cold['timings']['metric_s']:.3f} s"),
        ("cold: total (load + model + embed + metrics)", f"{cold['timings']['total_s']:.1f} s"),
        ("warm (cache hit): total", f"{wt['total_s']:.2f} s (dataset listing {wt['load_s']:.2f} s, "
                                    f"cache read {wt['embed_s']:.2f} s, metrics {wt['metric_s']:.3f} s)"),
        ("np.argsort of the 3368 x 15913 matrix (baseline)", f"{argsort_s:.3f} s "
                                                            f"(metrics = {wt['metric_s'] / argsort_s:.2f}x argsort)"),
    ]
    if reranked is not None:
        rows.append(("warm + re-ranking: metrics", f"{reranked['timings']['metric_s']:.1f} s"))
    rows.append(("mAP / rank-1 (sanity)", f"{cold['mAP']:.4f} / {cold['rank1']:.4f}"))
    width = max(len(r[0]) for r in rows)
    print(f"\nreid evaluate market1501 (real size, synthetic {h}x{w} crops, model {args.model}, {device})")
    print("-" * (width + 50))
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
