"""Pictures drawn with OpenCV alone: CMC curves, ranked-match strips and attention overlays.

Every function takes and returns uint8 HxWx3 **RGB** arrays; ``save_image`` converts to the file's
colour order when writing. Nothing here needs matplotlib.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from reid.atomic import atomic_path
from reid.errors import InputError

log = logging.getLogger(__name__)

FONT = cv2.FONT_HERSHEY_SIMPLEX
WRITABLE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

# Border colours (RGB) of ranked tiles, by status.
STATUS_COLOURS: dict[str, tuple[int, int, int]] = {
    "match": (0, 170, 0),
    "mismatch": (220, 0, 0),
    "junk": (150, 150, 150),
    "unknown": (255, 255, 255),
    "query": (30, 90, 230),
}
# Curve colours (RGB) cycled over the curves of one plot.
CURVE_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (23, 190, 207)]

BORDER = 4  # px of coloured frame around each tile
CAPTION_H = 16  # px of text band under each tile
GAP = 4  # px between tiles
QUERY_GAP = 16  # px between the query tile and its ranked list


# --- files -------------------------------------------------------------------------------------


def save_image(path: str | Path, image_rgb: np.ndarray, *, quality: int = 92) -> Path:
    """Write an RGB picture to ``path`` (format from the extension) atomically; return the path."""
    path = check_picture_path(path)
    ext = path.suffix.lower()
    image = _as_rgb_uint8(image_rgb)
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if ext in (".jpg", ".jpeg") else []
    ok, buf = cv2.imencode(ext, cv2.cvtColor(image, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise InputError(f"OpenCV could not encode a {ext} picture for {path}")
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.tobytes())
    log.info("wrote %s (%dx%d)", path, image.shape[1], image.shape[0])
    return path


def check_picture_path(path: str | Path) -> Path:
    """Fail early (InputError) when ``path`` has no picture extension or its folder does not exist."""
    path = Path(path)
    if path.suffix.lower() not in WRITABLE_EXTENSIONS:
        raise InputError(f"cannot write a picture to {path}: use one of {', '.join(WRITABLE_EXTENSIONS)}")
    if not path.parent.is_dir():
        raise InputError(f"cannot write {path}: folder {path.parent} does not exist; create it first")
    return path


def _as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Coerce gray / RGBA / float-in-[0,1] arrays to contiguous uint8 HxWx3 RGB."""
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[0] == 3 and img.shape[2] != 3:  # CHW float tensor layout
        img = np.transpose(img, (1, 2, 0))
    if img.dtype != np.uint8:
        img = np.clip(img.astype(np.float32) * (255.0 if img.max(initial=0) <= 1.0 else 1.0), 0, 255)
        img = np.round(img).astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise InputError(f"expected an HxWx3 RGB image, got an array of shape {np.shape(image)}")
    return np.ascontiguousarray(img[:, :, :3])


# --- CMC curve ---------------------------------------------------------------------------------


def plot_cmc(
    curves: Mapping[str, np.ndarray] | np.ndarray,
    *,
    max_rank: int = 50,
    size: tuple[int, int] = (480, 640),
    title: str = "CMC",
) -> np.ndarray:
    """Draw one or more CMC curves (values in [0,1], index 0 = rank 1) as an RGB image of ``size`` (H, W)."""
    data = _cmc_curves(curves, max_rank, size)
    h, w = size
    n = max(len(v) for v in data.values())
    img = np.full((h, w, 3), 255, np.uint8)
    left, right, top, bottom = 64, 16, 36, 48
    x0, x1, y0, y1 = left, w - right, top, h - bottom  # plot box; y0 is the top edge

    lo = min(float(np.nanmin(v)) for v in data.values() if len(v))
    y_min = max(0.0, np.floor(lo * 10) / 10) if np.isfinite(lo) else 0.0
    y_min = min(y_min, 0.9)

    def px(rank: float) -> int:
        return int(round(x0 + (rank - 1) / max(n - 1, 1) * (x1 - x0)))

    def py(v: float) -> int:
        return int(round(y1 - (v - y_min) / (1.0 - y_min) * (y1 - y0)))

    grid, ink = (225, 225, 225), (40, 40, 40)
    for i in range(int(round((1.0 - y_min) * 10)) + 1):  # horizontal grid + y ticks every 10 %
        v = y_min + i / 10
        y = py(v)
        cv2.line(img, (x0, y), (x1, y), grid, 1)
        label = f"{v * 100:.0f}%"
        (tw, th), _ = cv2.getTextSize(label, FONT, 0.4, 1)
        cv2.putText(img, label, (x0 - 6 - tw, y + th // 2), FONT, 0.4, ink, 1, cv2.LINE_AA)
    for r in _rank_ticks(n):  # vertical grid + x ticks
        x = px(r)
        cv2.line(img, (x, y0), (x, y1), grid, 1)
        (tw, th), _ = cv2.getTextSize(str(r), FONT, 0.4, 1)
        cv2.putText(img, str(r), (x - tw // 2, y1 + 6 + th), FONT, 0.4, ink, 1, cv2.LINE_AA)
    cv2.rectangle(img, (x0, y0), (x1, y1), ink, 1)
    _centered(img, "rank", (x0 + x1) // 2, h - 10, 0.45)
    _centered(img, title, w // 2, 24, 0.6)
    ylab = np.full((16, 120, 3), 255, np.uint8)
    _centered(ylab, "matching rate", 60, 12, 0.45)
    ylab = np.rot90(ylab)  # vertical axis label, reading bottom to top
    ly = (y0 + y1) // 2 - ylab.shape[0] // 2
    if ly >= 0 and ly + ylab.shape[0] <= h:
        img[ly : ly + ylab.shape[0], 4 : 4 + ylab.shape[1]] = ylab

    legend_y = y1 - 10 - 18 * (len(data) - 1)
    for i, (name, v) in enumerate(data.items()):
        colour = CURVE_COLOURS[i % len(CURVE_COLOURS)]
        pts = np.array([[px(r + 1), py(float(np.clip(val, y_min, 1.0)))] for r, val in enumerate(v)], np.int32)
        cv2.polylines(img, [pts.reshape(-1, 1, 2)], False, colour, 2, cv2.LINE_AA)
        for p in pts[: min(len(pts), 1)]:
            cv2.circle(img, tuple(int(c) for c in p), 3, colour, -1, cv2.LINE_AA)
        text = f"{name}  R1 {v[0] * 100:.1f}%"
        (tw, _), _ = cv2.getTextSize(text, FONT, 0.45, 1)
        ly = legend_y + 18 * i
        cv2.line(img, (x1 - tw - 40, ly - 4), (x1 - tw - 16, ly - 4), colour, 2, cv2.LINE_AA)
        cv2.putText(img, text, (x1 - tw - 8, ly), FONT, 0.45, ink, 1, cv2.LINE_AA)
    return img


def _cmc_curves(curves: Mapping[str, np.ndarray] | np.ndarray, max_rank: int,
                size: tuple[int, int]) -> dict[str, np.ndarray]:
    """``plot_cmc``'s curves as named float64 vectors cut at ``max_rank``; InputError when there is nothing to draw."""
    if not isinstance(curves, Mapping):
        curves = {"CMC": np.asarray(curves)}
    if not curves:
        raise InputError("plot_cmc needs at least one curve")
    h, w = size
    if h < 200 or w < 260:
        raise InputError(f"a CMC plot needs at least 200x260 pixels, got {h}x{w}")
    data = {k: np.asarray(v, dtype=np.float64).ravel()[:max_rank] for k, v in curves.items()}
    if max(len(v) for v in data.values()) == 0:
        raise InputError("plot_cmc got an empty curve")
    return data


def _rank_ticks(n: int) -> list[int]:
    """Rank ticks: 1 plus round numbers that fit ``n`` ranks without crowding."""
    step = next(s for s in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if n / s <= 10)
    return sorted({1, *range(step, n + 1, step)})


def _centered(img: np.ndarray, text: str, cx: int, baseline: int, scale: float) -> None:
    (tw, _), _ = cv2.getTextSize(text, FONT, scale, 1)
    cv2.putText(img, text, (cx - tw // 2, baseline), FONT, scale, (40, 40, 40), 1, cv2.LINE_AA)


# --- ranked lists ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankedItem:
    """One gallery tile of a ranked list: the crop, its status (match|mismatch|junk|unknown), a caption."""

    image: np.ndarray
    status: str = "unknown"
    caption: str = ""


def tile(image: np.ndarray, status: str, caption: str = "", *, size: tuple[int, int] = (128, 64)) -> np.ndarray:
    """A crop resized to ``size`` (H, W), framed in its status colour, with a caption band below."""
    if status not in STATUS_COLOURS:
        raise InputError(f"unknown tile status {status!r}; expected one of {', '.join(STATUS_COLOURS)}")
    th, tw = size
    crop = cv2.resize(_as_rgb_uint8(image), (tw - 2 * BORDER, th - 2 * BORDER), interpolation=cv2.INTER_AREA)
    if status == "junk":  # greyed out: junk entries neither help nor hurt the metrics
        grey = cv2.cvtColor(cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
        crop = cv2.addWeighted(grey, 0.45, np.full_like(crop, 255), 0.55, 0)
    out = np.full((th + CAPTION_H, tw, 3), 255, np.uint8)
    out[:th, :] = STATUS_COLOURS[status]
    out[BORDER : th - BORDER, BORDER : tw - BORDER] = crop
    if status == "junk":
        cv2.line(out, (BORDER, BORDER), (tw - BORDER - 1, th - BORDER - 1), (110, 110, 110), 1, cv2.LINE_AA)
        cv2.line(out, (tw - BORDER - 1, BORDER), (BORDER, th - BORDER - 1), (110, 110, 110), 1, cv2.LINE_AA)
        _centered(out, "junk", tw // 2, th // 2 + 4, 0.4)
    if caption:
        scale = 0.35
        while scale > 0.2 and cv2.getTextSize(caption, FONT, scale, 1)[0][0] > tw - 2:
            scale -= 0.05
        _centered(out, caption, tw // 2, th + CAPTION_H - 4, scale)
    return out


def rank_strip(
    query: np.ndarray,
    items: Sequence[RankedItem],
    *,
    size: tuple[int, int] = (128, 64),
    query_caption: str = "query",
    slots: int | None = None,
) -> np.ndarray:
    """One row: the query tile (blue), a gap, then the ranked gallery tiles; ``slots`` fixes the row width."""
    slots = len(items) if slots is None else slots
    if len(items) > slots:
        raise InputError(f"rank_strip got {len(items)} items for {slots} slots")
    th, tw = size
    width = tw + QUERY_GAP + slots * tw + max(slots - 1, 0) * GAP
    row = np.full((th + CAPTION_H, width, 3), 255, np.uint8)
    row[:, :tw] = tile(query, "query", query_caption, size=size)
    for i, item in enumerate(items):
        x = tw + QUERY_GAP + i * (tw + GAP)
        row[:, x : x + tw] = tile(item.image, item.status, item.caption, size=size)
    return row


def stack_rows(rows: Sequence[np.ndarray], *, gap: int = 8) -> np.ndarray:
    """Stack rows vertically with ``gap`` white pixels between them, right-padding narrower rows."""
    if not rows:
        raise InputError("stack_rows needs at least one row")
    width = max(r.shape[1] for r in rows)
    height = sum(r.shape[0] for r in rows) + gap * (len(rows) - 1)
    out = np.full((height, width, 3), 255, np.uint8)
    y = 0
    for r in rows:
        out[y : y + r.shape[0], : r.shape[1]] = r
        y += r.shape[0] + gap
    return out


def rank_grid_shape(rows: int, slots: int, *, size: tuple[int, int] = (128, 64), gap: int = 8) -> tuple[int, int]:
    """(H, W) of ``stack_rows`` over ``rows`` strips of ``slots`` items each (for callers and tests)."""
    th, tw = size
    return rows * (th + CAPTION_H) + gap * (rows - 1), tw + QUERY_GAP + slots * tw + max(slots - 1, 0) * GAP


# --- attention ---------------------------------------------------------------------------------


def attention_overlay(image_rgb: np.ndarray, attention_map: np.ndarray, *, alpha: float = 0.5) -> np.ndarray:
    """Blend a JET heat map of ``attention_map`` ([Gh,Gw], or [K,Gh,Gw] averaged) over the crop, same size."""
    img = _as_rgb_uint8(image_rgb)
    att = np.asarray(attention_map, dtype=np.float32)
    if att.ndim == 3:
        att = att.mean(axis=0)
    if att.ndim != 2 or att.size == 0:
        raise InputError(f"attention map must be [Gh,Gw] or [K,Gh,Gw], got shape {np.shape(attention_map)}")
    if not np.all(np.isfinite(att)):
        raise InputError("attention map holds NaN or infinite values")
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha must be in [0, 1], got {alpha}")
    h, w = img.shape[:2]
    att = cv2.resize(att, (w, h), interpolation=cv2.INTER_CUBIC)
    lo, hi = float(att.min()), float(att.max())
    norm = (att - lo) / (hi - lo) if hi > lo else np.zeros_like(att)
    heat_bgr = cv2.applyColorMap(np.round(norm * 255).astype(np.uint8), cv2.COLORMAP_JET)
    heat = cv2.cvtColor(heat_bgr, cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(img, 1.0 - alpha, heat, alpha, 0)


def attention_painter(model) -> Callable[[np.ndarray], np.ndarray]:
    """A function overlaying ``model``'s attention (``model.attention_maps``, glimpses averaged) on an RGB crop."""
    import torch

    from reid.embed import model_input_size
    from reid.images import preprocess

    size = model_input_size(model)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))

    def paint(image_rgb: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(preprocess(_as_rgb_uint8(image_rgb), size))[None].to(device)
        with torch.inference_mode():
            att = model.attention_maps(x)[0].float().cpu().numpy()
        return attention_overlay(image_rgb, att)

    return paint


# --- evaluation rank lists ---------------------------------------------------------------------


def draw_rank_lists(
    query_paths: Sequence[str | Path],
    gallery_paths: Sequence[str | Path],
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    distances: np.ndarray,
    *,
    top: int = 10,
    size: tuple[int, int] = (128, 64),
    paint: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """Top-``top`` gallery crops of each query (rows of ``distances``, smaller = closer) as one picture.

    Borders: green = same identity from another camera, red = another identity, grey and crossed =
    junk (same identity and same camera, or identity -1), which the metrics ignore. ``paint`` (e.g.
    ``attention_painter(model)``) is applied to every crop before it is tiled.
    """
    from reid.images import decode_image

    def crop(path: str | Path) -> np.ndarray:
        img = decode_image(path)
        return paint(img) if paint is not None else img

    distances = np.asarray(distances)
    if distances.shape != (len(query_paths), len(gallery_paths)):
        raise InputError(f"distances {distances.shape} do not match {len(query_paths)} queries x "
                         f"{len(gallery_paths)} gallery")
    top = min(top, len(gallery_paths))
    rows = []
    for qi, qpath in enumerate(query_paths):
        order = np.argsort(distances[qi], kind="stable")[:top]
        items = []
        for rank, gi in enumerate(order, 1):
            same_pid = g_pids[gi] == q_pids[qi]
            if g_pids[gi] == -1 or (same_pid and g_camids[gi] == q_camids[qi]):
                status = "junk"
            else:
                status = "match" if same_pid else "mismatch"
            items.append(RankedItem(crop(gallery_paths[gi]), status, f"{rank}: {distances[qi, gi]:.3f}"))
        caption = f"id {int(q_pids[qi])} c{int(q_camids[qi])}"
        rows.append(rank_strip(crop(qpath), items, size=size, query_caption=caption, slots=top))
    return stack_rows(rows)
