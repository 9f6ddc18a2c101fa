"""Embedding runtimes: torch (the reference, and training), ONNX Runtime and OpenVINO on an exported model.

An exported model (``reid.model.export``) is a derived artifact kept per model fingerprint in the
export cache (``$REID_CACHE_DIR/exports/FINGERPRINT/``, default ``~/.cache/reid``): built on first
need from the torch model and checked against it, rebuilt (with a warning) when missing or corrupt,
and never used for another fingerprint. This module imports neither torch nor the runtimes until
asked: ``reid query`` on a gallery whose model is exported runs without importing torch.

``auto`` is torch where CUDA is asked for or an NVIDIA GPU is visible. On a CPU, one-shot work (``reid
query``: one crop, and a start-up that must not import torch) takes ONNX Runtime, the fastest at batch 1
here (9.4 ms a crop against OpenVINO's 12.8 and torch's 21.5) and the lightest import; bulk work (``reid
index``, ``reid evaluate --runtime auto``) takes the fastest of torch, ONNX Runtime and OpenVINO f32
(when installed) at batch 32, measured once per model and machine (``bulk_runtime``): every export has
been checked against torch before it is used (cosine >= 0.9999, the same top-5).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path
from collections.abc import Sequence

import numpy as np

from reid.errors import CheckpointError, InputError
from reid.images import resize_crop, to_unit_float

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "onnx", "openvino")
FILES = {"onnx": "model.onnx", "openvino": "model.xml"}
INPUT_NAME, OUTPUT_NAME = "crops", "embeddings"  # of every exported graph (reid.model.export)


def export_cache_dir() -> Path:
    """Where exported models are kept: ``$REID_CACHE_DIR/exports`` (default ``~/.cache/reid/exports``)."""
    root = os.environ.get("REID_CACHE_DIR") or Path.home() / ".cache" / "reid"
    return Path(root).expanduser() / "exports"


def export_path(fingerprint: str, fmt: str) -> Path:
    """The cached export of the model ``fingerprint`` in format ``fmt``."""
    if fmt not in FILES:
        raise InputError(f"unknown export format {fmt!r}; expected one of: {', '.join(FILES)}")
    return export_cache_dir() / fingerprint / FILES[fmt]


class ExportedEmbedder:
    """An exported model on ONNX Runtime or OpenVINO: the same resize and conversion as the torch path
    (``reid.images.resize_crop``, ``to_unit_float``), the runtime's L2-normalised output."""

    def __init__(self, path: Path, fmt: str, run, meta: dict[str, str]) -> None:
        self.path, self.runtime, self._run, self.meta = path, fmt, run, meta
        self.fingerprint = meta["reid.fingerprint"]
        h, w = (int(v) for v in meta["reid.input_size"].split("x"))
        self.input_size = (h, w)
        self.embed_dim = int(meta["reid.embed_dim"])

    def embed_batch(self, crops: np.ndarray) -> np.ndarray:
        """uint8 crops [B,H,W,3] at ``input_size`` -> float32 [B, D], L2-normalised."""
        out = np.asarray(self._run(to_unit_float(crops)), dtype=np.float32)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)

    def embed_images(self, images: Sequence[np.ndarray], batch_size: int = 32) -> np.ndarray:
        """Decoded uint8 HxWx3 RGB images of any size -> float32 [N, D] (``reid.embed.embed_images``'s numbers)."""
        out = []
        for s in range(0, len(images), batch_size):
            batch = np.stack([resize_crop(img, self.input_size) for img in images[s : s + batch_size]])
            out.append(self.embed_batch(batch))
        return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)

    def __repr__(self) -> str:
        return f"ExportedEmbedder({self.runtime}, {self.fingerprint}, {self.path})"


def _open_onnx(path: Path, threads: int | None, keep_optimized: bool = False):
    """An ONNX Runtime session on ``path`` and the file's reid metadata (read by the session: no ``onnx`` import).

    ``keep_optimized`` (the export cache): ONNX Runtime's graph optimisation took ~1 s of every one-shot
    query, so the first open saves the graph optimised at the portable ``ORT_ENABLE_EXTENDED`` level beside
    the export (named after ORT's version and the export's size and mtime) and later opens start from it
    (~0.2-0.5 s); an unreadable copy is dropped and made again.
    """
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise InputError("ONNX Runtime is not installed: `pip install onnxruntime`, or `--runtime torch`") from e

    def options():
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        return opts

    session = None
    st = path.stat()  # the copy is named after the export's size and time: a rewritten export never meets it
    optimized = path.with_name(f"{path.stem}.ort-{ort.__version__}-{st.st_size}-{st.st_mtime_ns}.onnx")
    if keep_optimized and optimized.is_file():
        try:
            session = ort.InferenceSession(str(optimized), options(), providers=["CPUExecutionProvider"])
        except Exception:  # noqa: BLE001 - a damaged derived copy: drop it, use the export itself
            log.warning("dropping the unreadable optimised copy %s", optimized)
            optimized.unlink(missing_ok=True)
    if session is None:
        opts = options()
        if keep_optimized:
            from reid.atomic import atomic_path

            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            with atomic_path(optimized) as tmp:
                opts.optimized_model_filepath = str(tmp)
                session = _session(ort, path, opts)
        else:
            session = _session(ort, path, opts)
    meta = {k: v for k, v in session.get_modelmeta().custom_metadata_map.items() if k.startswith("reid.")}
    if "reid.fingerprint" not in meta:
        raise CheckpointError(f"{path} is an ONNX file without reid's metadata; export it with `reid export`")
    return meta, lambda x: session.run(None, {INPUT_NAME: x})[0]


def _session(ort, path: Path, opts):
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ORT raises its own Fail / InvalidGraph / RuntimeException types
        raise CheckpointError(f"ONNX Runtime cannot load {path}: {e}") from None


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``reid.*`` metadata of an exported ONNX file (CheckpointError if it is not one)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises DecodeError, OSError, ValueError...
        raise CheckpointError(f"{path} is not a readable ONNX file ({type(e).__name__}: {e})") from None
    meta = {p.key: p.value for p in proto.metadata_props if p.key.startswith("reid.")}
    if "reid.fingerprint" not in meta:
        raise CheckpointError(f"{path} is an ONNX file without reid's metadata; export it with `reid export`")
    return meta


def _open_openvino(path: Path, threads: int | None):
    try:
        import openvino as ov
    except ImportError as e:
        raise InputError("OpenVINO is not installed: `pip install openvino`, or `--runtime onnx`") from e
    core = ov.Core()
    try:
        model = core.read_model(str(path))
        meta = {f"reid.{k}": str(model.get_rt_info(["reid", k]).astype(str))
                for k in ("format_version", "fingerprint", "input_size", "embed_dim")}
    except Exception as e:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses of its own
        raise CheckpointError(f"OpenVINO cannot read {path} as a reid export: {e}") from None
    # f32: OpenVINO's default on CPUs with bf16 (AMX / AVX-512 BF16) moved embeddings to cosine 0.989.
    config = {"INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = core.compile_model(model, "CPU", config)
    return meta, lambda x: compiled(x)[0]


def open_exported(path: str | os.PathLike, fmt: str, *, threads: int | None = None,
                  fingerprint: str | None = None, keep_optimized: bool = False) -> ExportedEmbedder:
    """Open an exported file on its runtime; CheckpointError when it is not the model ``fingerprint``.
    ``keep_optimized``: ONNX Runtime keeps its optimised graph beside the file (for the export cache)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"exported model {path} does not exist")
    if fmt == "onnx":
        meta, run = _open_onnx(path, threads, keep_optimized)
    elif fmt == "openvino":
        meta, run = _open_openvino(path, threads)
    else:
        raise InputError(f"unknown export format {fmt!r}; expected one of: {', '.join(FILES)}")
    embedder = ExportedEmbedder(path, fmt, run, meta)
    if fingerprint is not None and embedder.fingerprint != fingerprint:
        raise CheckpointError(f"exported model {path} is the model {embedder.fingerprint}, not {fingerprint}; an "
                              f"export is never used for another model")
    return embedder


def cached_embedder(fingerprint: str, fmt: str = "onnx", *, threads: int | None = None) -> ExportedEmbedder | None:
    """The cached export of ``fingerprint`` on its runtime, or None when there is none or it is unusable
    (corrupt, or another model's: a warning says so, and the next ``ensure_exported`` rebuilds it)."""
    path = export_path(fingerprint, fmt)
    if not path.is_file():
        return None
    try:
        return open_exported(path, fmt, threads=threads, fingerprint=fingerprint, keep_optimized=True)
    except CheckpointError as e:
        log.warning("the cached %s export %s is unusable and will be rebuilt: %s", fmt, path, e)
        return None


def ensure_exported(model, fingerprint: str, fmt: str = "onnx", *, threads: int | None = None) -> ExportedEmbedder:
    """The export of ``model`` (torch, whose fingerprint is ``fingerprint``) from the cache, built and checked
    against torch first when it is missing or unusable."""
    found = cached_embedder(fingerprint, fmt, threads=threads)
    return found if found is not None else build_export(model, fingerprint, fmt, threads=threads)


def build_export(model, fingerprint: str, fmt: str = "onnx", *, threads: int | None = None) -> ExportedEmbedder:
    """Export ``model`` into the cache slot of ``fingerprint`` (replacing what is there), checked against torch,
    and open it: for callers that found the slot missing or unusable (``cached_embedder`` returned None)."""
    from reid.model.export import export_onnx, export_openvino

    onnx_file = export_path(fingerprint, "onnx")
    log.info("exporting model %s for %s (once per model) to %s", fingerprint, fmt, onnx_file.parent)
    for stale in onnx_file.parent.glob(f"{onnx_file.stem}.ort-*.onnx"):  # optimised copies of an older file
        stale.unlink(missing_ok=True)
    if fmt == "onnx" or cached_embedder(fingerprint, "onnx") is None:
        export_onnx(model, onnx_file, fingerprint=fingerprint)
    if fmt == "openvino":
        export_openvino(onnx_file, export_path(fingerprint, "openvino"))
    return open_exported(export_path(fingerprint, fmt), fmt, threads=threads, fingerprint=fingerprint,
                         keep_optimized=True)


def wants_torch(runtime: str, device) -> bool:
    """Whether ``runtime`` on ``device`` means the torch path (``auto``: when CUDA is asked for or visible)."""
    if runtime not in RUNTIMES:
        raise InputError(f"unknown runtime {runtime!r}; expected one of: {', '.join(RUNTIMES)}")
    device = str(device or "auto").lower()  # a name, or a torch.device
    if runtime == "torch":
        return True
    if device.startswith("cuda"):
        if runtime != "auto":
            raise InputError(f"runtime {runtime} runs on the CPU here; use `--runtime torch` (or auto) for CUDA")
        return True
    return runtime == "auto" and device == "auto" and _nvidia_gpu_visible()


def _nvidia_gpu_visible() -> bool:
    """An NVIDIA GPU the driver lists (without importing torch); CUDA_VISIBLE_DEVICES="" hides them."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpus.is_dir() and any(gpus.iterdir())


def exported_runtime(runtime: str) -> str:
    """The export format a non-torch ``runtime`` runs (``auto`` -> onnx: one-shot work)."""
    return "onnx" if runtime == "auto" else runtime


CHOICE_FILE = "auto.json"  # in the model's export cache slot: bulk_runtime's measurements, per machine


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what ``platform`` knows of it."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    return cpu


def _machine(threads: int) -> str:
    """What a runtime measurement holds for: the CPU, its cores, the threads and the runtimes' versions."""
    import torch

    from importlib import metadata

    cpu = cpu_model()
    versions = [f"torch {torch.__version__}"]
    for name in ("onnxruntime", "openvino"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions.append(f"{name} {metadata.version(name)}")
    return f"{cpu} | {os.cpu_count()} cpus | {threads} threads | {', '.join(versions)}"


def _installed(fmt: str) -> bool:
    import importlib.util

    return importlib.util.find_spec({"onnx": "onnxruntime", "openvino": "openvino"}[fmt]) is not None


def bulk_runtime(model, fingerprint: str, *, batch: int = 32, rounds: int = 3) -> str:
    """The fastest runtime on this CPU for bulk embedding of ``model`` (torch, CPU; fingerprint
    ``fingerprint``): torch, onnx or openvino (those installed), each export made and checked against
    torch if missing. Measured once per model and machine (``batch`` crops, ``rounds`` interleaved rounds,
    the median) and kept in the model's export cache slot, so later runs only read the answer."""
    import torch

    slot = export_path(fingerprint, "onnx").parent
    machine = _machine(torch.get_num_threads())
    try:
        known = json.loads((slot / CHOICE_FILE).read_text())
    except (OSError, ValueError):
        known = {}
    known = known if isinstance(known, dict) else {}
    entry = known.get(machine)
    chosen = entry.get("runtime") if isinstance(entry, dict) else None
    if chosen == "torch" or (chosen in FILES and _installed(chosen)):
        return chosen
    from reid.embed import embed_batch

    h, w = model.input_size
    crops = np.random.default_rng(0).integers(0, 256, (batch, h, w, 3), dtype=np.uint8)
    embedders = {"torch": lambda x: embed_batch(model, x, device=torch.device("cpu"))}
    for fmt in FILES:
        if not _installed(fmt):
            continue
        try:  # made and checked against torch here when missing
            embedders[fmt] = ensure_exported(model, fingerprint, fmt).embed_batch
        except (CheckpointError, RuntimeError) as e:
            if fmt == "onnx":  # `reid query` needs it: a failure here is the command's error, as without auto
                raise
            log.warning("runtime auto leaves out %s: %s", fmt, e)
    speed = _measure(embedders, crops, rounds)
    best = max(speed, key=speed.get)
    log.info("runtime auto for bulk embedding on this machine: %s (crops/s at batch %d: %s)", best, batch,
             ", ".join(f"{k} {v}" for k, v in speed.items()))
    known[machine] = {"runtime": best, "crops_per_s": speed, "batch": batch, "measured": time.time()}
    from reid.atomic import atomic_path

    slot.mkdir(parents=True, exist_ok=True)
    with atomic_path(slot / CHOICE_FILE) as tmp:
        tmp.write_text(json.dumps(known, indent=1))
    return best


def _measure(embedders: dict, crops: np.ndarray, rounds: int) -> dict[str, float]:
    """Crops per second of each ``embedders[name](crops)``: a warm-up call each, then ``rounds`` interleaved
    rounds (load from other processes hits them alike), the median."""
    times: dict[str, list[float]] = {name: [] for name in embedders}
    for embed in embedders.values():
        embed(crops)  # first-call allocations, oneDNN primitives
    for _ in range(rounds):
        for name, embed in embedders.items():
            t = time.perf_counter()
            embed(crops)
            times[name].append(time.perf_counter() - t)
    return {name: round(len(crops) / statistics.median(ts), 1) for name, ts in times.items()}


def bulk_embedder(model, fingerprint: str, runtime: str):
    """What bulk embedding runs for ``runtime`` on a CPU: ``model`` itself (torch) or its checked export.
    ``auto``: ``bulk_runtime``'s measured choice, the ONNX export made in any case (``reid query`` runs it)."""
    fmt = bulk_runtime(model, fingerprint) if runtime == "auto" else runtime
    if fmt == "torch":
        if runtime == "auto":
            ensure_exported(model, fingerprint, "onnx")
        return model
    return ensure_exported(model, fingerprint, fmt)
