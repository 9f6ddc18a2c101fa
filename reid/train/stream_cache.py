"""Head-only training on frozen streams: run the two CNN streams once per crop, keep their local maps.

The streams (ImageNet MobileNetV2 and EfficientNet-Lite0) are most of the network's cost; when they
stay frozen, every epoch over the same crop would recompute the same maps. ``compute_stream_maps``
runs them once (fused, inference mode) and keeps both maps as float16 [N,C,Gh,Gw] - in memory, or as
``.npy`` memmaps in a folder that a later run reopens (``open_stream_maps``) - together with their
float32 average pools (the training-free baseline and the distillation teacher). The head then trains
from batches of cached maps through ``AttentionBilinearNet.head_from_streams``. Used by
``reid.train.distill`` (the shipped default head) and by unsupervised adaptation.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from reid.errors import InputError

log = logging.getLogger(__name__)

CACHE_VERSION = 1
META_NAME = "stream_maps.json"
_ARRAYS = ("a", "b", "pooled")
_TORCH_DTYPES = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}


@dataclass
class StreamMaps:
    """The two streams' local maps of N crops and their float32 average pools.

    ``a`` [N,Ca,Gh,Gw] and ``b`` [N,Cb,Gh,Gw] are float16 or float32 (arrays or read-only memmaps); ``pooled``
    [N,Ca+Cb] is the mean over the grid of each map in float32, taken before rounding.
    """

    a: np.ndarray
    b: np.ndarray
    pooled: np.ndarray

    def __len__(self) -> int:
        return int(self.a.shape[0])

    @property
    def channels(self) -> tuple[int, int]:
        """(Ca, Cb)."""
        return int(self.a.shape[1]), int(self.b.shape[1])

    def batch(self, index: np.ndarray | Sequence[int],
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Maps of the crops ``index`` as tensors (fa, fb) on ``device``, in the cache's dtype."""
        idx = np.asarray(index, dtype=np.int64)
        fa = torch.from_numpy(np.ascontiguousarray(self.a[idx])).to(device)
        fb = torch.from_numpy(np.ascontiguousarray(self.b[idx])).to(device)
        return fa, fb

    def pooled_features(self, part: str = "ab", stripes: int = 1) -> np.ndarray:
        """Training-free features: ``a``, ``b`` or ``ab`` (each pool L2-normalised, then concatenated).

        ``stripes`` > 1: the pools of that many horizontal stripes of the grid (``stripe_rows``), each
        stripe's pools normalised as above, concatenated top to bottom and L2-normalised again."""
        names = {"a": ("a",), "b": ("b",), "ab": ("a", "b")}.get(part)
        if names is None:
            raise InputError(f"pooled part must be 'a', 'b' or 'ab', not {part!r}")
        if stripes > 1:
            return self._stripe_features(names, stripes)
        ca = self.channels[0]
        columns = {"a": slice(None, ca), "b": slice(ca, None)}
        pools = [_unit(self.pooled[:, columns[name]]) for name in names]
        return pools[0] if len(pools) == 1 else _unit(np.concatenate(pools, axis=1))

    def _stripe_features(self, names: tuple[str, ...], stripes: int, chunk: int = 512) -> np.ndarray:
        rows = stripe_rows(int(self.a.shape[2]), stripes)
        out = []
        for s in range(0, len(self), chunk):
            pools = [np.stack([_unit(m[:, :, r].mean((2, 3))) for r in rows], 1)  # [n, stripes, C]
                     for m in (np.asarray(getattr(self, name)[s:s + chunk], np.float32) for name in names)]
            out.append(_unit(np.concatenate(pools, axis=2).reshape(len(pools[0]), -1)))
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def stripe_rows(grid_rows: int, stripes: int) -> list[slice]:
    """Rows of each of ``stripes`` horizontal stripes of a grid, top to bottom, as even as they divide."""
    if not 1 <= stripes <= grid_rows:
        raise InputError(f"cannot cut {grid_rows} grid rows into {stripes} stripes")
    bounds = [round(i * grid_rows / stripes) for i in range(stripes + 1)]
    return [slice(lo, hi) for lo, hi in zip(bounds, bounds[1:], strict=False)]


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def concat_maps(parts: Sequence[StreamMaps]) -> StreamMaps:
    """One StreamMaps holding ``parts`` one after another (in memory)."""
    return StreamMaps(*(np.concatenate([getattr(p, k) for p in parts]) for k in _ARRAYS))


def frozen_streams(model: nn.Module) -> nn.ModuleDict:
    """An inference-only copy of the model's two streams, BatchNorm folded and ReLU fused (reid.model.fusion)."""
    from reid.model.fusion import fuse_for_inference

    streams = fuse_for_inference(nn.ModuleDict({"a": model.stream_a, "b": model.stream_b}))
    return streams.to(memory_format=torch.channels_last)


def streams_fingerprint(model: nn.Module) -> str:
    """sha256 (16 hex) of what the maps depend on: the streams' kinds, input size, stride and weights."""
    c = model.config
    h = hashlib.sha256(json.dumps([c.stream_a, c.stream_b, list(c.input_size), c.output_stride]).encode())
    for prefix, module in (("a", model.stream_a), ("b", model.stream_b)):
        for key, value in sorted(module.state_dict().items()):
            t = value.detach().to("cpu").contiguous()
            h.update(f"\n{prefix}.{key}:{t.dtype}:{tuple(t.shape)}\n".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def _allocate_maps(folder: Path | None, n: int, fa: torch.Tensor, fb: torch.Tensor,
                   dtype: type) -> dict[str, np.ndarray]:
    """Arrays for ``n`` crops' maps shaped like the batch ``fa``, ``fb``: .npy memmaps in ``folder``, else in memory."""
    shapes = {"a": (n, *fa.shape[1:]), "b": (n, *fb.shape[1:]), "pooled": (n, fa.shape[1] + fb.shape[1])}
    dtypes = {"a": dtype, "b": dtype, "pooled": np.float32}
    return {k: (np.lib.format.open_memmap(folder / f"{k}.npy", mode="w+", dtype=dtypes[k], shape=shapes[k])
                if folder is not None else np.empty(shapes[k], dtypes[k]))
            for k in _ARRAYS}


def _lowered(k: str, f: torch.Tensor, dtype: type) -> torch.Tensor:
    """Stream ``k``'s maps ``f`` in ``dtype``; InputError when that loses more than 1% of them."""
    low = f.to(_TORCH_DTYPES[np.dtype(dtype)])
    if low.dtype != torch.float32:
        err = float((low.float() - f).norm() / f.norm().clamp_min(1e-30))
        if not err < 1e-2:  # e.g. untrained streams, whose maps are ~1e-8
            raise InputError(f"stream {k}'s maps do not survive {np.dtype(dtype).name} (relative "
                             f"error {err:.2g}); keep them with dtype=np.float32")
    return low


def compute_stream_maps(
    model: nn.Module,
    crops: Sequence[np.ndarray] | Callable[[int], np.ndarray],
    count: int | None = None,
    *,
    batch_size: int = 32,
    folder: str | os.PathLike | None = None,
    key: str = "",
    device: torch.device | str | None = None,
    dtype: type = np.float16,
    progress: Callable[[int, int], None] | None = None,
) -> StreamMaps:
    """Run the frozen streams once over ``count`` crops (uint8 HxWx3 RGB; resized to the model's input
    size here) -> StreamMaps. ``crops`` is a sequence or a function of the index, so crops can be made
    on the fly. With ``folder`` the maps are written there as .npy memmaps with a JSON that names
    ``key`` (what the crops are) and the streams, so ``open_stream_maps`` can reuse them. float16 maps
    (the default) halve the memory; InputError when a stream's maps would lose more than 1% to it.
    """
    from reid.embed import to_model_input
    from reid.images import resize_crop

    get = crops if callable(crops) else crops.__getitem__
    n = len(crops) if count is None else int(count)
    if n < 1:
        raise InputError("compute_stream_maps needs at least one crop")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    size = tuple(model.config.input_size)
    streams = frozen_streams(model).to(device)
    arrays: dict[str, np.ndarray] = {}
    folder = Path(folder) if folder is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / META_NAME).unlink(missing_ok=True)  # the maps are valid only once the JSON is back
    done = 0
    with torch.inference_mode():
        while done < n:
            stop = min(n, done + batch_size)
            batch = torch.from_numpy(np.stack([resize_crop(np.asarray(get(i)), size) for i in range(done, stop)]))
            x = to_model_input(batch.to(device)).contiguous(memory_format=torch.channels_last)
            fa, fb = streams["a"](x).float(), streams["b"](x).float()
            if not arrays:
                arrays.update(_allocate_maps(folder, n, fa, fb, dtype))
            for k, f in (("a", fa), ("b", fb)):
                arrays[k][done:stop] = _lowered(k, f, dtype).cpu().numpy()
            arrays["pooled"][done:stop] = torch.cat([fa.mean((2, 3)), fb.mean((2, 3))], 1).cpu().numpy()
            done = stop
            if progress is not None:
                progress(done, n)
            if done == n or (done // batch_size) % 20 == 0:
                log.info("stream maps: %d / %d crops", done, n)
    maps = StreamMaps(arrays["a"], arrays["b"], arrays["pooled"])
    if folder is not None:
        for arr in arrays.values():
            arr.flush()
        meta = {"version": CACHE_VERSION, "key": key, "streams": streams_fingerprint(model), "count": n}
        (folder / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        log.info("cached stream maps of %d crops in %s", n, folder)
    return maps


def open_stream_maps(folder: str | os.PathLike, *, key: str, model: nn.Module) -> StreamMaps | None:
    """The maps ``compute_stream_maps(..., folder=folder, key=key)`` wrote with these streams, or None
    when the folder holds none, other crops, other streams or an unfinished run."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / META_NAME).read_text())
    except (OSError, ValueError):
        return None
    if (meta.get("version") != CACHE_VERSION or meta.get("key") != key
            or meta.get("streams") != streams_fingerprint(model)):
        return None
    try:
        arrays = [np.load(folder / f"{k}.npy", mmap_mode="r") for k in _ARRAYS]
    except (OSError, ValueError):
        return None
    if any(len(a) != meta.get("count") for a in arrays):
        return None
    return StreamMaps(*arrays)


def cached_stream_maps(model: nn.Module, crops, count: int | None = None, *, folder: str | os.PathLike | None,
                       key: str, **options) -> StreamMaps:
    """``open_stream_maps`` when ``folder`` already holds these maps, else ``compute_stream_maps`` (into it)."""
    if folder is not None:
        maps = open_stream_maps(folder, key=key, model=model)
        if maps is not None:
            log.info("reusing cached stream maps in %s", folder)
            return maps
    return compute_stream_maps(model, crops, count, folder=folder, key=key, **options)


def embed_from_streams(model: nn.Module, fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
    """The model's embedding (L2-normalised BNNeck output) of cached stream maps, as ``forward`` gives it."""
    return F.normalize(model.bnneck(model.head_from_streams(fa, fb).features), dim=1)


def embed_maps(model: nn.Module, maps: StreamMaps, *, batch_size: int = 128, flip: bool = False) -> np.ndarray:
    """Embeddings [N, D] float32 of every crop in ``maps`` (eval mode, inference); ``flip`` adds the
    embedding of the mirrored maps (an approximation of embedding the mirrored crop)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        with torch.inference_mode():
            for s in range(0, len(maps), batch_size):
                fa, fb = maps.batch(np.arange(s, min(len(maps), s + batch_size)), device)
                e = embed_from_streams(model, fa, fb)
                if flip:
                    e = F.normalize(e + embed_from_streams(model, fa.flip(3), fb.flip(3)), dim=1)
                out.append(e.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out).numpy()


def tune_allocator() -> None:
    """Keep freed memory in the process (glibc): a training step allocates and frees tens of MB of
    activations, and returning them to the OS each time makes every step page-fault them back in
    (measured: the head's backward pass 1.3-4x slower). No-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)  # the largest glibc accepts
    libc.mallopt(m_trim_threshold, 1 << 34)
    libc.mallopt(m_top_pad, 1 << 28)
