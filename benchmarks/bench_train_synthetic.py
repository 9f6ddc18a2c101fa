"""Benchmark: does `reid train` learn? Untrained vs trained mAP / rank-1 on a synthetic Market-1501.

Writes a synthetic Market-1501 (default 100 training and 100 test identities, 6 cameras), scores the
untrained network (packaged ImageNet streams, seeded head: the in-run baseline), trains it for a fixed
wall-clock budget, and scores it again on the same query/gallery. Targets: trained mAP >= 2x the
untrained mAP, and trained rank-1 >= 0.8.

The number of epochs is set from the speed of the first (warm-up) epoch so that the cosine schedule
ends at the budget (the run then resumes exactly); ``max_seconds`` also stops training when the
estimate was off. On a machine shared with other work, pass ``--threads 1``: two OpenMP threads
on two busy cores can make training many times slower.

    python benchmarks/bench_train_synthetic.py --minutes 15          # the lead's run
    python benchmarks/bench_train_synthetic.py --minutes 2           # a quick check
    python benchmarks/bench_train_synthetic.py --device cuda --input-size 256x128 --minutes 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_data(root: Path, args: argparse.Namespace) -> None:
    """Write the synthetic tree in a child process (OpenCV's thread pool must not be inherited by forked workers)."""
    code = (
        "import sys, json; from reid.synthetic import write_market1501; "
        "write_market1501(sys.argv[1], **json.loads(sys.argv[2]))"
    )
    options = dict(num_train_ids=args.ids, num_test_ids=args.ids, cameras=args.cameras,
                   images_per_cam=args.images_per_cam, seed=args.data_seed, size=[128, 64])
    subprocess.run([sys.executable, "-c", code, str(root), json.dumps(options)], check=True,
                   cwd=Path(__file__).resolve().parents[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=15.0, help="training budget (wall clock)")
    ap.add_argument("--ids", type=int, default=100, help="training identities (and as many test identities)")
    ap.add_argument("--cameras", type=int, default=6)
    ap.add_argument("--images-per-cam", type=int, default=2)
    ap.add_argument("--input-size", default="128x64", help="model input HxW (128x64 for CPU speed)")
    ap.add_argument("--batch-p", type=int, default=8)
    ap.add_argument("--batch-k", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--backbone-lr-mult", type=float, default=0.3)
    ap.add_argument("--warmup-epochs", type=int, default=1)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=None, help="loader processes (default: auto, as reid train)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="folder for data and run (default: a temp folder)")
    ap.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    args = ap.parse_args()

    import torch

    from reid.datasets import load
    from reid.model import ModelConfig, build_model, load_checkpoint
    from reid.runtime import resolve_device
    from reid.train import TrainConfig, train
    from reid.train.validate import validate

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    h, w = (int(v) for v in args.input_size.lower().split("x"))
    mc = ModelConfig(input_size=(h, w))
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_train_")))
        data_root, run_dir = work / "data", work / "run"
        if not (data_root / "Market-1501-v15.09.15").exists():
            t = time.perf_counter()
            write_data(data_root, args)
            print(f"wrote synthetic Market-1501 in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        dataset = load("market1501", data_root)
        print(f"{dataset!r}", file=sys.stderr)

        t = time.perf_counter()
        untrained = validate(build_model(mc, pretrained=True), dataset, device=device, workers=args.workers)
        eval_s = time.perf_counter() - t
        print(f"untrained: mAP {untrained['mAP']:.4f} rank-1 {untrained['rank1']:.4f} ({eval_s:.1f} s)",
              file=sys.stderr)

        budget = args.minutes * 60
        cfg = TrainConfig(batch_p=args.batch_p, batch_k=args.batch_k, lr=args.lr,
                          backbone_lr_mult=args.backbone_lr_mult, warmup_epochs=args.warmup_epochs,
                          precision=args.precision, seed=args.seed, epochs=1, eval_every=0)

        def on_event(kind: str, info: dict) -> None:
            if kind == "epoch":
                print(f"  epoch {info['epoch']}/{cfg.epochs}: loss {info['loss']:.3f} (ce {info.get('ce', 0):.3f}, "
                      f"triplet {info.get('triplet', 0):.3f}) {info['images_per_s']:.1f} img/s", file=sys.stderr)

        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run each time (--work may be reused for the data)
        # The first (warm-up) epoch does not depend on the number of epochs: run it, measure the real
        # speed, then resume with as many epochs as fit the budget, so the cosine schedule ends on time.
        # (Resuming is exact, so this is the same trajectory as one run of that many epochs.)
        t = time.perf_counter()
        first = train(dataset, run_dir, cfg, model_config=mc, pretrained=True, device=device, workers=args.workers,
                      on_event=on_event)
        left = budget - (time.perf_counter() - t)
        more = int(0.92 * left * first.last["images_per_s"] / first.last["images"]) if left > 0 else 0
        cfg = cfg.replace(epochs=1 + max(more, 0), eval_every=1 + max(more, 0))
        print(f"{first.last['images_per_s']:.1f} img/s in epoch 1 -> {cfg.epochs} epochs of ~{first.last['images']} "
              f"images in {args.minutes:g} min", file=sys.stderr)
        result = train(dataset, run_dir, cfg, model_config=mc, device=device, workers=args.workers, resume=True,
                       max_seconds=max(left, 1.0), on_event=on_event)
        if "mAP" not in result.last:  # the budget was spent in the first epoch: score what there is
            result.last.update(validate(load_checkpoint(run_dir / "last"), dataset, device=device,
                                        workers=args.workers))
        wall = time.perf_counter() - t
        records = _records(run_dir)
        train_speed = sum(r["images"] for r in records) / sum(r["train_seconds"] for r in records)
        trained = {k: result.last[k] for k in ("mAP", "rank1", "rank5", "mINP")}
        first_loss, last_loss = records[0]["loss"], records[-1]["loss"]

    ratio = trained["mAP"] / max(untrained["mAP"], 1e-9)
    ok_map, ok_r1 = ratio >= 2.0, trained["rank1"] >= 0.8
    size = f"{h}x{w}"
    print()
    print(f"synthetic Market-1501: {len(dataset.train)} train images / {dataset.num_train_pids} ids, "
          f"{len(dataset.query)} queries, {len(dataset.gallery)} gallery; input {size}; "
          f"{device.type} {torch.get_num_threads()} threads; precision {args.precision}")
    print(f"{'model':<28} {'mAP':>8} {'rank-1':>8} {'rank-5':>8} {'mINP':>8}")
    print(f"{'untrained (ImageNet streams)':<28} {untrained['mAP']:>8.4f} {untrained['rank1']:>8.4f} "
          f"{untrained['rank5']:>8.4f} {untrained['mINP']:>8.4f}")
    label = f"trained {result.epochs_done} ep / {wall / 60:.1f} min"
    print(f"{label:<28} {trained['mAP']:>8.4f} {trained['rank1']:>8.4f} {trained['rank5']:>8.4f} "
          f"{trained['mINP']:>8.4f}")
    print(f"mean training loss: epoch 1 {first_loss:.3f} -> epoch {result.epochs_done} {last_loss:.3f}")
    print(f"training speed: {train_speed:.1f} img/s (P={cfg.batch_p} x K={cfg.batch_k}, {size}, "
          f"workers={args.workers if args.workers is not None else 'auto'})")
    print(f"mAP x{ratio:.2f} (target >= 2: {'PASS' if ok_map else 'FAIL'}), "
          f"rank-1 {trained['rank1']:.3f} (target >= 0.8: {'PASS' if ok_r1 else 'FAIL'})")
    if args.json:
        print(json.dumps({"untrained": untrained, "trained": trained, "epochs": result.epochs_done,
                          "train_images_per_s": train_speed, "wall_s": wall, "input_size": size,
                          "map_ratio": ratio, "pass": ok_map and ok_r1}))


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]



if __name__ == "__main__":
    main()
