"""A description of a model for people: streams, grid, sizes, parameters, FLOPs, fingerprint."""

from __future__ import annotations

from typing import Any

import torch

from reid.model.checkpoint import model_fingerprint
from reid.model.net import AttentionBilinearNet
from reid.model.streams import IMAGENET_MEAN, IMAGENET_STD


def count_flops(model: AttentionBilinearNet, input_size: tuple[int, int] | None = None) -> dict[str, int]:
    """FLOPs of one image (multiply-add = 2), counted by torch's FlopCounterMode: streams, head, total."""
    from torch.utils.flop_counter import FlopCounterMode

    h, w = input_size or model.config.input_size
    device = next(model.parameters()).device
    x = torch.rand(1, 3, h, w, device=device)
    was_training = model.training
    model.eval()
    # Count the trained layers: FlopCounterMode cannot see oneDNN's fused convs.
    try:
        with torch.inference_mode(), model.run_mode(fused=False):
            with FlopCounterMode(display=False) as streams:
                model.stream_a(x)
                model.stream_b(x)
            with FlopCounterMode(display=False) as total:
                model(x)
    finally:
        model.train(was_training)
    s, t = streams.get_total_flops(), total.get_total_flops()
    return {"streams": int(s), "head": int(t - s), "total": int(t)}


def _normalisation(stream: torch.nn.Module) -> str:
    """How a stream normalises its input, in words ("ImageNet mean/std", "mean=std=0.5")."""
    mean = [round(v, 3) for v in stream.mean.flatten().tolist()]
    std = [round(v, 3) for v in stream.std.flatten().tolist()]
    if mean == list(IMAGENET_MEAN) and std == list(IMAGENET_STD):
        return "ImageNet mean/std"
    if len(set(mean + std)) == 1:
        return f"mean=std={mean[0]:g}"
    return f"mean={mean}, std={std}"


def model_summary(model: AttentionBilinearNet) -> dict[str, Any]:
    """JSON-able facts about a model (what `reid model` prints)."""
    cfg = model.config
    n_backbone = sum(p.numel() for p in model.backbone_parameters())
    n_total = sum(p.numel() for p in model.parameters())
    return {
        "arch": cfg.arch,
        "fingerprint": model_fingerprint(model),
        "streams": {
            "a": f"{cfg.stream_a} ({model.stream_a.out_channels} ch, {_normalisation(model.stream_a)})",
            "b": f"{cfg.stream_b} ({model.stream_b.out_channels} ch, {_normalisation(model.stream_b)})",
        },
        "input_size": list(cfg.input_size),
        "output_stride": cfg.output_stride,
        "grid": list(cfg.grid),
        "dims": {
            "c_a": cfg.c_a, "c_b": cfg.c_b, "bilinear": cfg.c_a * cfg.c_b, "d_x": cfg.d_x, "d_h": cfg.d_h,
            "lstm_directions": cfg.lstm_directions, "d_att": cfg.d_att, "glimpses": cfg.num_glimpses,
            "embed_dim": cfg.embed_dim, "num_classes": cfg.num_classes,
        },
        "parameters": {"backbone": n_backbone, "head": n_total - n_backbone, "total": n_total},
        "flops_per_image": count_flops(model),
        "config": cfg.to_dict(),
    }
