"""The embedding network as an ONNX (or OpenVINO IR) file: what ``reid export`` writes and the runtimes run.

The file's contract is in its metadata (``onnx`` metadata_props, OpenVINO ``rt_info``), so a runtime
needs nothing but the file: ``reid.fingerprint`` (the torch model's, ``reid.model.checkpoint``),
``reid.input_size`` (HxW), ``reid.embed_dim``, and the input it takes: float32 NCHW RGB in [0, 1]
(``reid.embed.to_model_input`` of uint8 crops resized by ``reid.images.resize_crop``); the output is
the L2-normalised embedding. Exported with the TorchScript exporter (opset 17, dynamic batch) from the
unfused network (the fused CPU copy calls oneDNN kernels ONNX has no operator for; the runtimes fuse
on their own); every export is checked against torch on crops before it is kept.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from pathlib import Path

import numpy as np

from reid.engine import INPUT_NAME, OUTPUT_NAME, read_onnx_metadata
from reid.errors import CheckpointError, InputError

log = logging.getLogger(__name__)

FORMATS = ("onnx", "openvino")
OPSET = 17
INPUT_CONTRACT = "float32 NCHW RGB in [0, 1]"
FORMAT_VERSION = "1"
MIN_COSINE = 0.9999  # an export must match torch this closely on every check crop (and keep its top-5)


def export_metadata(model, fingerprint: str) -> dict[str, str]:
    """The key/value pairs every exported file carries."""
    h, w = model.input_size
    return {"reid.format_version": FORMAT_VERSION, "reid.fingerprint": fingerprint, "reid.input_size": f"{h}x{w}",
            "reid.embed_dim": str(int(model.embed_dim)), "reid.input": INPUT_CONTRACT, "reid.output": OUTPUT_NAME,
            "reid.arch": model.config.arch, "reid.config": json.dumps(model.config.to_dict(), sort_keys=True)}


def check_crops(input_size: tuple[int, int], count: int = 8, seed: int = 0) -> np.ndarray:
    """uint8 crops [N,H,W,3] to compare runtimes on: smooth random fields, a bright/dark pair and, when
    scikit-image is installed, crops of its photographs (natural image statistics)."""
    import cv2

    rng = np.random.default_rng(seed)
    h, w = input_size
    crops = []
    for _ in range(count - 2):
        small = rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
        crops.append(cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC))
    crops.append(np.full((h, w, 3), 250, np.uint8))
    crops.append(np.full((h, w, 3), 5, np.uint8))
    try:
        import skimage.data

        for img in (skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()):
            y = img.shape[0] // 8
            crops.append(cv2.resize(np.ascontiguousarray(img[y:, : img.shape[1] // 2]), (w, h),
                                    interpolation=cv2.INTER_AREA))
    except ImportError:
        pass
    return np.stack(crops)


def agreement(reference: np.ndarray, other: np.ndarray) -> dict[str, float | bool]:
    """Cosine of each pair of rows (both L2-normalised), and whether every row keeps its top-5 neighbours
    (as sets) among the rows."""
    cos = (reference * other).sum(1)
    # A crop the model maps to the zero vector (every reduced channel cut by ReLU) agrees when both give it.
    zero = (np.linalg.norm(reference, axis=1) < 1e-6) & (np.linalg.norm(other, axis=1) < 1e-6)
    cos = np.where(zero, 1.0, cos)
    k = min(5, len(reference) - 1)

    def top(x):
        s = x @ x.T
        np.fill_diagonal(s, -np.inf)
        return [set(r) for r in np.argsort(-s, axis=1)[:, :k]]

    same = all(a == b for a, b in zip(top(reference), top(other), strict=True)) if k > 0 else True
    return {"cos_min": float(cos.min()), "cos_mean": float(cos.mean()), "same_top5": bool(same)}


def _torch_reference(model, crops: np.ndarray) -> np.ndarray:
    from reid.embed import embed_images

    return embed_images(model, list(crops), device=None)


def export_onnx(model, out: str | os.PathLike, *, fingerprint: str | None = None, check: bool = True) -> dict:
    """Write ``model`` (an AttentionBilinearNet, on the CPU) to the ONNX file ``out`` atomically; returns
    the metadata and, with ``check``, the agreement with torch (CheckpointError below ``MIN_COSINE``)."""
    import onnx
    import torch

    from reid.atomic import atomic_path
    from reid.model.checkpoint import model_fingerprint

    model = model.cpu().eval()
    meta = export_metadata(model, fingerprint or model_fingerprint(model))
    h, w = model.input_size
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, torch.no_grad(), model.run_mode(fused=False), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and shape-inference notes
        example = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(0))  # leaves the global RNG alone
        torch.onnx.export(model, (example,), str(tmp), dynamo=False, opset_version=OPSET,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
        proto = onnx.load(str(tmp))
        del proto.metadata_props[:]
        for k, v in meta.items():
            proto.metadata_props.add(key=k, value=v)
        onnx.save(proto, str(tmp))
        report = dict(meta)
        if check:
            report.update(_check(model, tmp, "onnx"))
    return report


def export_openvino(onnx_file: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Convert an exported ONNX file to OpenVINO IR (``out`` .xml + .bin, float32 weights) with its metadata."""
    try:
        import openvino as ov
    except ImportError as e:
        raise InputError("OpenVINO is not installed: `pip install openvino` (or export `--format onnx`)") from e
    meta = read_onnx_metadata(onnx_file)
    model = ov.convert_model(str(onnx_file))
    for k, v in meta.items():
        model.set_rt_info(v, ["reid", k.removeprefix("reid.")])
    out = Path(out).with_suffix(".xml")
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = out.parent / f".{out.stem}.{os.getpid()}.openvino-tmp"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        ov.save_model(model, str(scratch / out.name), compress_to_fp16=False)
        os.replace(scratch / out.with_suffix(".bin").name, out.with_suffix(".bin"))  # the weights first
        os.replace(scratch / out.name, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out


def _check(model, path: Path, fmt: str) -> dict:
    """Embed the check crops with torch and with the file; CheckpointError unless they agree."""
    from reid.engine import open_exported

    crops = check_crops(model.input_size)
    ref = _torch_reference(model, crops)
    got = open_exported(path, fmt, threads=None).embed_images(list(crops))
    a = agreement(ref, got)
    if a["cos_min"] < MIN_COSINE or not a["same_top5"]:
        raise CheckpointError(f"the {fmt} export does not match the torch model (cosine min {a['cos_min']:.6f}, "
                              f"same top-5 {a['same_top5']}); it was not kept")
    return a


def export_model(model, out: str | os.PathLike, fmt: str = "onnx", *, fingerprint: str | None = None) -> dict:
    """``reid export``: ``model`` as ``fmt`` (onnx -> ``out``; openvino -> ``out`` .xml + .bin, through an ONNX
    export), checked against torch; returns the metadata, the files and the agreement figures."""
    import tempfile

    if fmt not in FORMATS:
        raise InputError(f"unknown export format {fmt!r}; expected one of: {', '.join(FORMATS)}")
    out = Path(out).expanduser()
    if fmt == "onnx":
        report = export_onnx(model, out, fingerprint=fingerprint)
        report["files"] = [str(out)]
        return report
    with tempfile.TemporaryDirectory(prefix="reid-export-") as tmp:
        report = export_onnx(model, Path(tmp) / "model.onnx", fingerprint=fingerprint)
        xml = export_openvino(Path(tmp) / "model.onnx", out)
    report.update(_check(model, xml, "openvino"))
    report["files"] = [str(xml), str(xml.with_suffix(".bin"))]
    return report
