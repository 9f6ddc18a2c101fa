"""Training augmentation on float32 3xHxW arrays in [0, 1]: flip, pad + random crop, random erasing.

Every function takes an explicit ``np.random.Generator`` so a sample's augmentation depends
only on the seed the sampler hands out with it (reproducible whatever the worker count).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def random_flip(img: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    """Mirror a CxHxW array left-right with probability ``p``."""
    if rng.random() < p:
        return np.ascontiguousarray(img[:, :, ::-1])
    return img


def pad_crop(img: np.ndarray, rng: np.random.Generator, pad: int) -> np.ndarray:
    """Zero-pad by ``pad`` pixels on every side, then crop a random window of the original size."""
    if pad <= 0:
        return img
    c, h, w = img.shape
    padded = np.zeros((c, h + 2 * pad, w + 2 * pad), dtype=img.dtype)
    padded[:, pad : pad + h, pad : pad + w] = img
    top = int(rng.integers(0, 2 * pad + 1))
    left = int(rng.integers(0, 2 * pad + 1))
    return np.ascontiguousarray(padded[:, top : top + h, left : left + w])


def erase_box(
    h: int,
    w: int,
    rng: np.random.Generator,
    *,
    area: tuple[float, float] = (0.02, 0.4),
    aspect: tuple[float, float] = (0.3, 3.33),
    attempts: int = 100,
) -> tuple[int, int, int, int] | None:
    """Draw a rectangle ``(top, left, height, width)`` inside an HxW image (Zhong et al. 2017), or None."""
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    for _ in range(attempts):
        target = rng.uniform(*area) * h * w
        ratio = math.exp(rng.uniform(*log_aspect))
        eh = int(round(math.sqrt(target * ratio)))
        ew = int(round(math.sqrt(target / ratio)))
        if 0 < eh < h and 0 < ew < w:
            top = int(rng.integers(0, h - eh + 1))
            left = int(rng.integers(0, w - ew + 1))
            return top, left, eh, ew
    return None


def random_erasing(
    img: np.ndarray,
    rng: np.random.Generator,
    p: float = 0.5,
    *,
    area: tuple[float, float] = (0.02, 0.4),
    aspect: tuple[float, float] = (0.3, 3.33),
) -> np.ndarray:
    """With probability ``p`` overwrite a random rectangle with uniform noise in [0, 1] (a copy)."""
    if rng.random() >= p:
        return img
    c, h, w = img.shape
    box = erase_box(h, w, rng, area=area, aspect=aspect)
    if box is None:
        return img
    top, left, eh, ew = box
    out = img.copy()
    out[:, top : top + eh, left : left + ew] = rng.random((c, eh, ew), dtype=np.float32)
    return out


@dataclass(frozen=True)
class TrainTransform:
    """Decoded uint8 HxWx3 RGB image -> augmented float32 3xHxW array at ``size`` = (H, W).

    ``pad`` defaults to 10 pixels at a height of 256 and scales with the input height.
    """

    size: tuple[int, int] = (256, 128)
    flip_p: float = 0.5
    pad: int | None = None
    erase_p: float = 0.5

    @property
    def pad_pixels(self) -> int:
        """Padding used before the random crop."""
        return self.pad if self.pad is not None else max(1, round(10 * self.size[0] / 256))

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        from reid.images import preprocess

        x = preprocess(image, size=tuple(self.size))
        x = random_flip(x, rng, self.flip_p)
        x = pad_crop(x, rng, self.pad_pixels)
        x = random_erasing(x, rng, self.erase_p)
        return np.ascontiguousarray(x, dtype=np.float32)
