"""Embedding throughput of AttentionBilinearNet against torchvision ResNet-50, in the same process.

Target (DESIGN "Performance targets"): default model, batch 32, 256x128 >= 2x ResNet-50 (fp32,
channels-last). Modes of our model:
  fused   the default inference path (BN folded into convs, ReLU/ReLU6 fused in oneDNN), fp32
  plain   the trained layers as they are (eval mode, gradients on), fp32: the accuracy reference
  bf16    the streams under CPU bf16 autocast (AMX), head fp32: measured, NOT used (see agreement)
  fp16    agreement only (CPU fp16 is slow here): what CUDA fp16 autocast would round the streams to
  ONNX Runtime / OpenVINO f32: the model exported by ``reid.model.export`` (what ``--runtime`` runs),
  next to ResNet-50 exported the same way (the ratio in the same runtime)
Candidates run interleaved, several rounds, and the median time per round is reported, so load
from other processes hits all of them alike. Agreement with `plain` is measured on synthetic
pedestrian crops (and natural-image crops from scikit-image when installed).

    OMP_NUM_THREADS=2 python benchmarks/bench_model.py [--threads 2] [--rounds 5]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def crops(n_ids: int = 16, n_cams: int = 4) -> tuple[torch.Tensor, np.ndarray]:
    """Synthetic pedestrian crops [N,3,256,128] in [0,1] (+ natural-image crops) and their ids."""
    import cv2

    imgs, ids = [], []
    try:
        from reid.synthetic import render_person

        rng = np.random.default_rng(0)
        for pid in range(1, n_ids + 1):
            for cam in range(1, n_cams + 1):
                imgs.append(render_person(pid, cam, rng, (256, 128)))
                ids.append(pid)
    except ImportError:
        pass
    try:
        from skimage import data

        rng = np.random.default_rng(1)
        for k, name in enumerate(("astronaut", "chelsea", "coffee", "rocket", "camera", "cat")):
            im = getattr(data, name)()
            im = np.stack([im] * 3, -1) if im.ndim == 2 else im[..., :3]
            hh, ww = im.shape[:2]
            for _ in range(3):
                h = int(rng.integers(hh // 3, hh))
                w = min(ww, h // 2)
                y, x = int(rng.integers(0, hh - h + 1)), int(rng.integers(0, ww - w + 1))
                imgs.append(cv2.resize(im[y : y + h, x : x + w], (128, 256), interpolation=cv2.INTER_LINEAR))
                ids.append(1000 + k)
    except ImportError:
        pass
    if not imgs:
        raise SystemExit("need reid.synthetic or scikit-image for the agreement check")
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float().div(255)
    return x, np.array(ids)


def agreement(ref: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """Cosine between embeddings, and how often each image's ranking of all the others is unchanged."""
    cos = (ref * other).sum(1)
    n = len(ref)
    s_ref, s_oth = ref @ ref.T, other @ other.T
    s_ref.fill_diagonal_(-9)
    s_oth.fill_diagonal_(-9)
    r_ref, r_oth = s_ref.argsort(1, descending=True)[:, : n - 1], s_oth.argsort(1, descending=True)[:, : n - 1]
    top5 = [set(r_ref[i, :5].tolist()) == set(r_oth[i, :5].tolist()) for i in range(n)]
    return {
        "cos_min": cos.min().item(),
        "cos_mean": cos.mean().item(),
        "top1": (r_ref[:, 0] == r_oth[:, 0]).float().mean().item(),
        "top5": float(np.mean(top5)),
        "full": (r_ref == r_oth).all(1).float().mean().item(),
    }


def interleaved_times(cands: dict, x: torch.Tensor, rounds: int, iters: int) -> dict[str, list[float]]:
    """Seconds per call of each candidate on ``x``, one entry per round; the candidates take turns each round."""
    times = {k: [] for k in cands}
    for f in cands.values():
        f(x)  # warm-up (builds the fused copy, primes oneDNN)
    for _ in range(rounds):
        for k, f in cands.items():
            t = time.perf_counter()
            for _ in range(iters):
                f(x)
            times[k].append((time.perf_counter() - t) / iters)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4, help="interleaved rounds at batch 32")
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()

    import torchvision

    from reid.model import build_model
    from reid.runtime import prepare_torch

    torch.set_num_threads(args.threads)
    prepare_torch()
    model = build_model()
    resnet = torchvision.models.resnet50(weights=None).eval().to(memory_format=torch.channels_last)

    def ours(mode: str):
        def run(x: torch.Tensor) -> torch.Tensor:
            if mode == "plain":
                with torch.no_grad(), model.run_mode(fused=False):
                    return model(x)
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode)
            ctx = torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()
            with torch.inference_mode(), ctx, model.run_mode(streams_autocast=dtype is not None):
                return model(x)

        return run

    def r50(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return resnet(x.contiguous(memory_format=torch.channels_last))

    cands = {"ResNet-50 fp32 channels-last": r50, "ours fused fp32 (torch)": ours("fused"),
             "ours plain fp32": ours("plain"), "ours bf16 streams (rejected)": ours("bf16")}
    tmp = Path(tempfile.mkdtemp(prefix="bench_model_"))
    exported = exported_runtimes(model, resnet, tmp, args.threads)
    cands.update({name: (lambda x, run=run: run(x.numpy())) for name, run in exported.items()})

    rows = []
    for batch, rounds, iters in ((args.batch, args.rounds, 1), (1, 3, 8)):
        times = interleaved_times(cands, torch.rand(batch, 3, 256, 128), rounds, iters)
        base = statistics.median(times["ResNet-50 fp32 channels-last"])
        base_ort = statistics.median(times["ResNet-50 ONNX Runtime fp32"])
        for k in cands:
            med = statistics.median(times[k])
            rows.append((batch, k, batch / med, base / med, base_ort / med, batch / min(times[k]), 1000 * med))

    print(f"\nthreads={args.threads}  input 256x128  torch {torch.__version__}  (median of interleaved rounds)")
    print(f"{'batch':>5}  {'model':<30} {'img/s':>8} {'x R50 torch':>12} {'x R50 ORT':>10} {'best img/s':>11} "
          f"{'ms/batch':>9}")
    for batch, k, ips, ratio, ratio_ort, best, ms in rows:
        print(f"{batch:>5}  {k:<30} {ips:8.1f} {ratio:12.2f} {ratio_ort:10.2f} {best:11.1f} {ms:9.1f}")

    xs, _ = crops()
    ref = torch.cat([ours("plain")(xs[i : i + 32]) for i in range(0, len(xs), 32)])
    print(f"\nagreement with plain fp32 on {len(xs)} crops "
          "(cosine; share of images whose ranking of the others is unchanged)")
    print(f"{'mode':<30} {'cos min':>8} {'cos mean':>9} {'top-1':>7} {'top-5 set':>10} {'full':>7}")
    modes = {mode: ours(mode) for mode in ("fused", "bf16", "fp16")}
    modes.update({name: (lambda x, run=run: torch.from_numpy(np.asarray(run(x.numpy()))))
                  for name, run in exported.items() if not name.startswith("ResNet")})
    for mode, run in modes.items():
        emb = torch.nn.functional.normalize(torch.cat([run(xs[i : i + 32]) for i in range(0, len(xs), 32)]), dim=1)
        a = agreement(ref, emb)
        print(f"{mode:<30} {a['cos_min']:8.5f} {a['cos_mean']:9.5f} {a['top1']:7.1%} {a['top5']:10.1%} "
              f"{a['full']:7.1%}")
    bulk = {"torch": "ours fused fp32 (torch)", "onnx": "ours ONNX Runtime fp32", "openvino": "ours OpenVINO f32"}
    speed = {rt: ips for batch, k, ips, *_ in rows for rt, name in bulk.items() if k == name and batch == args.batch}
    single = {rt: ips for batch, k, ips, *_ in rows for rt, name in bulk.items() if k == name and batch == 1}
    print("\nrule: a faster mode is used only with cos min >= 0.999 and unchanged rankings (an export must also\n"
          "match torch to cosine 0.9999 and the same top-5 on its check crops before it is used). `--runtime auto`\n"
          f"on a CPU: bulk work (reid index, evaluate) takes the fastest at batch 32, measured once per model and\n"
          f"machine by reid.engine.bulk_runtime; in this table that is {max(speed, key=speed.get)}. One-shot queries\n"
          f"take ONNX Runtime (no torch import; batch 1 here: {', '.join(f'{k} {v:.0f}' for k, v in single.items())}"
          " img/s).")
    shutil.rmtree(tmp, ignore_errors=True)


def exported_runtimes(model, resnet, tmp: Path, threads: int) -> dict:
    """name -> run(float32 NCHW numpy) for our export on ONNX Runtime (and OpenVINO f32 when installed), and
    ResNet-50 exported the same way on ONNX Runtime (the same-runtime ratio)."""
    import warnings

    from reid.engine import open_exported
    from reid.model.export import export_model

    export_model(model, tmp / "ours.onnx", "onnx")
    out = {"ours ONNX Runtime fp32": open_exported(tmp / "ours.onnx", "onnx", threads=threads)._run}
    try:
        export_model(model, tmp / "ours.xml", "openvino")
        out["ours OpenVINO f32"] = open_exported(tmp / "ours.xml", "openvino", threads=threads)._run
    except Exception as e:  # noqa: BLE001 - OpenVINO missing or failing: the table says so
        print(f"OpenVINO row left out: {e}")
    import onnxruntime as ort

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(resnet, (torch.rand(2, 3, 256, 128),), str(tmp / "r50.onnx"), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}})
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(tmp / "r50.onnx"), opts, providers=["CPUExecutionProvider"])
    out["ResNet-50 ONNX Runtime fp32"] = lambda x: session.run(None, {"x": x})[0]
    return out


if __name__ == "__main__":
    main()
