"""Finding and decoding pedestrian crops: files in, uint8 RGB arrays (or a reason) out."""

from __future__ import annotations

import os
import re
from pathlib import Path

import cv2
import numpy as np

from reid.errors import ImageDecodeError, InputError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

# Refuse absurd images before decoding them into gigabytes of memory (OpenCV's own cap is 2^30 pixels).
MAX_PIXELS = 100_000_000

_MARKET_NAME = re.compile(r"^(-?\d+)_c(\d+)")
_JPEG_SOI = b"\xff\xd8"
_JPEG_EOI = b"\xff\xd9"


def find_images(root: str | os.PathLike) -> list[Path]:
    """All image files under ``root`` (recursive, by extension, case-insensitive), sorted by path."""
    root = Path(root)
    if not root.exists():
        raise InputError(f"{root}: no such folder")
    if root.is_file():
        if root.suffix.lower() in IMAGE_EXTENSIONS:
            return [root]
        raise InputError(f"{root}: not a folder or an image file ({', '.join(IMAGE_EXTENSIONS)})")
    return walk_files(root, IMAGE_EXTENSIONS)


def walk_files(root: str | os.PathLike, extensions: tuple[str, ...]) -> list[Path]:
    """Files under the folder ``root`` whose extension (lower-cased) is one of ``extensions``, recursively,
    hidden files and folders skipped, sorted by path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=None):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in extensions:
                found.append(Path(dirpath) / name)
    return sorted(found)


def decode_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file to uint8 HxWx3 RGB; gray, RGBA and 16-bit inputs are converted.

    Raises ImageDecodeError with a short reason (missing, unreadable, empty, truncated, not an image).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageDecodeError(f"{path}: no such file") from None
    except PermissionError:
        raise ImageDecodeError(f"{path}: permission denied") from None
    except IsADirectoryError:
        raise ImageDecodeError(f"{path}: is a folder, not an image") from None
    except OSError as e:
        raise ImageDecodeError(f"{path}: cannot read ({e.strerror or e})") from None
    return decode_bytes(data, name=str(path))


def decode_bytes(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode encoded image bytes to uint8 HxWx3 RGB (see ``decode_image``)."""
    if not data:
        raise ImageDecodeError(f"{name}: empty file")
    if data[:2] == _JPEG_SOI and _JPEG_EOI not in data[-64:]:
        # libjpeg fills a truncated JPEG with grey and only warns; a half-grey crop would poison the index.
        raise ImageDecodeError(f"{name}: truncated JPEG (no end-of-image marker)")
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH)
    except cv2.error as e:
        raise ImageDecodeError(f"{name}: cannot decode ({str(e).strip().splitlines()[-1]})") from None
    if img is None or img.size == 0:
        raise ImageDecodeError(f"{name}: not a decodable image")
    if img.shape[0] * img.shape[1] > MAX_PIXELS:
        raise ImageDecodeError(f"{name}: image too large ({img.shape[1]}x{img.shape[0]})")
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    elif img.dtype != np.uint8:
        if not np.issubdtype(img.dtype, np.floating):
            raise ImageDecodeError(f"{name}: unsupported pixel type {img.dtype}")
        img = np.clip(img * 255.0, 0, 255).astype(np.uint8)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def parse_market_name(name: str) -> tuple[int | None, int | None]:
    """(pid, camid) from a Market-style file name like ``0002_c1s1_000451_03.jpg``; (None, None) otherwise."""
    m = _MARKET_NAME.match(os.path.basename(name))
    if m is None:
        return None, None
    return int(m.group(1)), int(m.group(2))


def resize_crop(img: np.ndarray, size: tuple[int, int] = (256, 128)) -> np.ndarray:
    """Resize a uint8 HxWx3 RGB image to ``size`` = (H, W), still uint8 (4x less to move between processes)."""
    h, w = size
    if img.shape[:2] == (h, w):
        return img
    interp = cv2.INTER_AREA if img.shape[0] > 2 * h else cv2.INTER_LINEAR
    return cv2.resize(img, (w, h), interpolation=interp)


def decode_crop(path: str | os.PathLike, size: tuple[int, int]) -> tuple[np.ndarray | None, str | None]:
    """A crop file decoded and resized to ``size`` = (H, W) -> (uint8 HxWx3 RGB, None), or (None, the reason it
    could not be): the one decoding step of every embedded crop file (``reid.embed``, ``reid.distributed``)."""
    from reid.errors import ReidError

    try:
        return resize_crop(decode_image(path), size), None
    except ReidError as e:
        return None, str(e)
    except Exception as e:  # noqa: BLE001 - a decoder crash on one file must not stop the run
        return None, f"{path}: {type(e).__name__}: {e}"


def to_unit_float(img: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 -> float32 3xHxW in [0, 1] (the numbers ``reid.embed.to_model_input`` gives the model);
    a batch BxHxWx3 -> Bx3xHxW."""
    axes = (2, 0, 1) if img.ndim == 3 else (0, 3, 1, 2)
    return np.ascontiguousarray(img.transpose(axes), dtype=np.float32) / np.float32(255.0)


def preprocess(img: np.ndarray, size: tuple[int, int] = (256, 128)) -> np.ndarray:
    """Resize a uint8 HxWx3 RGB image to ``size`` = (H, W) and return float32 3xHxW in [0, 1]."""
    return to_unit_float(resize_crop(img, size))
