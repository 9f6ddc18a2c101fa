"""Benchmark: does `reid train` learn? Untrained vs trained mAP / rank-1 on a synthetic Market-1501.

Writes a synthetic Market-1501 (default 100 training and 100 test identities, 6 cameras), scores the
untrained network (packaged ImageNet streams, seeded head: the in-run baseline), trains it for a fixed
wall-clock budget, and scores it again on the same query/gallery. Targets: trained mAP >= 2x the
untrained mAP, and trained rank-1 >= 0.8.

The number of epochs is set from the training speed measured on a few warm-up steps so that the
cosine schedule ends at the budget; ``max_seconds`` also stops training when the estimate was off.

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
        "import sys, json; from reid.datasets.synthetic import write_market1501; "
        "write_market1501(sys.argv[1], **json.loads(sys.argv[2]))"
    )
    options = dict(num_train_ids=args.ids, num_test_ids=args.ids, cameras=args.cameras,
                   images_per_cam=args.images_per_cam, seed=args.data_seed, size=[128, 64])
    subprocess.run([sys.executable, "-c", code, str(root), json.dumps(options)], check=True,
                   cwd=Path(__file__).resolve().parents[1])


def measure_speed(dataset, model_config, cfg, device, steps: int = 4) -> float:
    """Training images/s of a throwaway copy of the model over a few P x K batches (after one warm-up step)."""
    import torch

    from reid.model import build_model
    from reid.train.config import resolve_precision
    from reid.train.losses import reid_loss
    from reid.train.loop import _autocast
    from reid.train.sampler import PKSampler, relabel_pids

    labels, pids = relabel_pids([s.pid for s in dataset.train])
    model = build_model(model_config.replace(num_classes=len(pids)), pretrained=True).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    sampler = PKSampler(labels, cfg.batch_p, cfg.batch_k, seed=123)
    h, w = model_config.input_size
    precision = resolve_precision(cfg.precision, device)
    t0, n = 0.0, 0
    with torch.random.fork_rng(devices=[]):
        for i, batch in enumerate(sampler.plan()[: steps + 1]):
            if i == 1:
                t0 = time.perf_counter()
            x = torch.rand(len(batch), 3, h, w, device=device)
            y = torch.as_tensor([labels[j] for j, _ in batch], device=device)
            with _autocast(device, precision):
                out = model.forward_train(x)
            loss, _ = reid_loss(out.features, out.logits, out.attention, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i >= 1:
                n += len(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


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
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="folder for data and run (default: a temp folder)")
    ap.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    args = ap.parse_args()

    import torch

    from reid.datasets import load
    from reid.model import ModelConfig, build_model
    from reid.runtime import resolve_device
    from reid.train import TrainConfig, train
    from reid.train.validate import evaluate_model

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
        untrained = evaluate_model(build_model(mc, pretrained=True), dataset, device=device, workers=args.workers)
        eval_s = time.perf_counter() - t
        print(f"untrained: mAP {untrained['mAP']:.4f} rank-1 {untrained['rank1']:.4f} ({eval_s:.1f} s)", file=sys.stderr)

        budget = args.minutes * 60
        base = TrainConfig(batch_p=args.batch_p, batch_k=args.batch_k, lr=args.lr, backbone_lr_mult=args.backbone_lr_mult,
                           warmup_epochs=args.warmup_epochs, precision=args.precision, seed=args.seed)
        speed = measure_speed(dataset, mc, base, device)
        images_per_epoch = len(dataset.train)
        # 10% kept for the loader start-up, checkpoints and the closing evaluation.
        epochs = max(1, int(0.9 * (budget - eval_s) * speed / images_per_epoch))
        cfg = base.replace(epochs=epochs, eval_every=epochs, warmup_epochs=min(args.warmup_epochs, max(epochs - 1, 0)))
        print(f"~{speed:.1f} img/s measured -> {epochs} epochs of ~{images_per_epoch} images in {args.minutes:g} min",
              file=sys.stderr)

        def on_event(kind: str, info: dict) -> None:
            if kind == "epoch":
                print(f"  epoch {info['epoch']}/{epochs}: loss {info['loss']:.3f} (ce {info.get('ce', 0):.3f}, "
                      f"triplet {info.get('triplet', 0):.3f}) {info['images_per_s']:.1f} img/s", file=sys.stderr)

        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run each time (--work may be reused for the data)
        t = time.perf_counter()
        result = train(dataset, run_dir, cfg, model_config=mc, pretrained=True, device=device, workers=args.workers,
                       max_seconds=budget, on_event=on_event)
        wall = time.perf_counter() - t
        trained = {k: result.last[k] for k in ("mAP", "rank1", "rank5", "mINP")}
        first_loss, last_loss = _first_last_loss(run_dir / "metrics.jsonl")

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
    print(f"training speed: {result.images_per_s:.1f} img/s (P={cfg.batch_p} x K={cfg.batch_k}, {size}, "
          f"workers={args.workers})")
    print(f"mAP x{ratio:.2f} (target >= 2: {'PASS' if ok_map else 'FAIL'}), "
          f"rank-1 {trained['rank1']:.3f} (target >= 0.8: {'PASS' if ok_r1 else 'FAIL'})")
    if args.json:
        print(json.dumps({"untrained": untrained, "trained": trained, "epochs": result.epochs_done,
                          "train_images_per_s": result.images_per_s, "wall_s": wall, "input_size": size,
                          "map_ratio": ratio, "pass": ok_map and ok_r1}))


def _first_last_loss(path: Path) -> tuple[float, float]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return rows[0]["loss"], rows[-1]["loss"]


if __name__ == "__main__":
    main()
