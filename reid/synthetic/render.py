"""Pedestrian-like synthetic crops whose identity survives camera changes, so that re-id is learnable.

An identity (fixed by its pid and a world seed) is a figure with head, hair or hat, torso, arms, legs,
shoes and maybe a bag: clothing colours drawn from a small palette (so identities collide on colour
alone), an upper-body pattern (plain, stripes, checks) and body proportions. A camera (fixed by its
id and the world seed) brings its own light (gain, colour cast, gamma, saturation), background and
clutter, framing (scale, offset), blur and noise. Each image adds its own pose (walking phase, arm
swing, small shifts, mirror flip), viewpoint (front/back: a backpack shows as straps or as a pack),
light jitter, clutter placement and occasional occlusion. ``difficulty`` scales all nuisances.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

# Clothing colours (RGB) with how common they are: dark clothes dominate, as in real street scenes.
_PALETTE = np.array(
    [
        (25, 25, 28), (60, 60, 64), (120, 120, 125), (200, 200, 205), (240, 240, 236),
        (30, 40, 90), (50, 90, 170), (120, 160, 215), (160, 30, 35), (90, 20, 30),
        (40, 110, 60), (100, 105, 50), (190, 170, 130), (110, 70, 40), (220, 190, 50),
        (225, 140, 170), (110, 60, 140), (230, 120, 40),
    ],
    dtype=np.float32,
)
_PALETTE_P = np.array([9, 7, 5, 4, 5, 6, 5, 3, 3, 2, 2, 2, 4, 3, 1.5, 1.5, 1, 1], dtype=np.float64)
_PALETTE_P /= _PALETTE_P.sum()
_SKIN = np.array([(235, 200, 170), (210, 165, 130), (170, 120, 85), (110, 75, 50)], dtype=np.float32)
_HAIR = np.array([(20, 15, 12), (60, 40, 25), (120, 85, 50), (200, 170, 120), (130, 130, 130)], dtype=np.float32)
_PATTERNS = ("plain", "plain", "hstripes", "vstripes", "checks")
_BAGS = ("none", "none", "backpack", "shoulder")


@dataclass(frozen=True)
class Identity:
    """What stays the same for one person in every camera."""

    upper: np.ndarray
    upper2: np.ndarray
    pattern: str
    period: float  # stripe period, fraction of body height
    lower: np.ndarray
    shoes: np.ndarray
    skin: np.ndarray
    hair: np.ndarray
    hat: np.ndarray | None
    bag: str
    bag_colour: np.ndarray
    height: float  # body height, fraction of the crop
    width: float  # shoulder width, fraction of the crop width
    torso: float  # torso length, fraction of body height
    head: float  # head height, fraction of body height
    long_sleeves: bool
    shorts: bool


@dataclass(frozen=True)
class Camera:
    """What one camera does to every image: light, background, framing, optics."""

    gain: float
    cast: np.ndarray  # per-channel multipliers
    gamma: float
    saturation: float
    background: np.ndarray  # 3 colours: top, bottom, clutter
    ground: float  # where the floor starts, fraction of height
    clutter: int  # clutter objects per image
    scale: float
    dy: float
    blur: float  # Gaussian sigma as a fraction of the crop height
    noise: float  # pixel noise std (0..255 scale)
    back_view: float  # probability of seeing people from behind


def _colour(rng: np.random.Generator, jitter: float = 14.0) -> np.ndarray:
    c = _PALETTE[rng.choice(len(_PALETTE), p=_PALETTE_P)]
    return np.clip(c + rng.normal(0.0, jitter, 3), 0, 255).astype(np.float32)


@lru_cache(maxsize=4096)
def identity_of(pid: int, world_seed: int = 0) -> Identity:
    """The appearance of identity ``pid`` in the world ``world_seed`` (deterministic)."""
    rng = np.random.default_rng([world_seed & 0xFFFFFFFF, 0x1D, int(pid) + 2])
    upper = _colour(rng)
    pattern = _PATTERNS[rng.integers(len(_PATTERNS))]
    upper2 = _colour(rng)
    if np.abs(upper2 - upper).sum() < 90:  # a pattern must be visible
        upper2 = np.clip(255.0 - upper + rng.normal(0, 10, 3), 0, 255).astype(np.float32)
    return Identity(
        upper=upper,
        upper2=upper2,
        pattern=pattern,
        period=float(rng.uniform(0.035, 0.08)),
        lower=_colour(rng),
        shoes=_colour(rng, 8.0) * 0.6,
        skin=_SKIN[rng.integers(len(_SKIN))] + rng.normal(0, 6, 3).astype(np.float32),
        hair=_HAIR[rng.integers(len(_HAIR))],
        hat=_colour(rng) if rng.random() < 0.15 else None,
        bag=_BAGS[rng.integers(len(_BAGS))],
        bag_colour=_colour(rng),
        height=float(rng.uniform(0.80, 0.95)),
        width=float(rng.uniform(0.34, 0.50)),
        torso=float(rng.uniform(0.30, 0.40)),
        head=float(rng.uniform(0.11, 0.15)),
        long_sleeves=bool(rng.random() < 0.6),
        shorts=bool(rng.random() < 0.2),
    )


@lru_cache(maxsize=256)
def camera_of(camid: int, world_seed: int = 0, difficulty: float = 1.0) -> Camera:
    """The rendering style of camera ``camid`` in the world ``world_seed`` (deterministic)."""
    rng = np.random.default_rng([world_seed & 0xFFFFFFFF, 0xCA, int(camid) + 2])
    d = float(difficulty)
    # Muted scene colours: a grey level with a mild tint (walls, pavement, and one colour for clutter).
    bg = np.stack([rng.uniform(50, 210) + rng.normal(0, 18, 3) for _ in range(3)]).clip(0, 255).astype(np.float32)
    return Camera(
        gain=float(np.exp(rng.uniform(-0.35, 0.3) * d)),
        cast=np.exp(rng.uniform(-0.16, 0.16, 3) * d).astype(np.float32),
        gamma=float(np.exp(rng.uniform(-0.25, 0.25) * d)),
        saturation=float(np.clip(1.0 + rng.uniform(-0.45, 0.2) * d, 0.2, 1.5)),
        background=bg,
        ground=float(rng.uniform(0.55, 0.85)),
        clutter=int(rng.integers(1, 4 + int(3 * d))),
        scale=float(1.0 - rng.uniform(0.0, 0.15) * d),
        dy=float(rng.uniform(-0.04, 0.04) * d),
        blur=float(rng.uniform(0.0, 0.012) * d),
        noise=float(rng.uniform(2.0, 7.0) * d),
        back_view=float(rng.uniform(0.1, 0.9)),
    )


def _ellipse(img, center, axes, colour) -> None:
    cv2.ellipse(img, (int(center[0] * 16), int(center[1] * 16)), (max(1, int(axes[0] * 16)), max(1, int(axes[1] * 16))),
                0, 0, 360, colour.tolist(), -1, cv2.LINE_AA, shift=4)


def _poly(img, pts, colour) -> None:
    cv2.fillPoly(img, [np.round(np.asarray(pts) * 16).astype(np.int32)], colour.tolist(), cv2.LINE_AA, shift=4)


def _line(img, p, q, colour, thickness: float) -> None:
    cv2.line(img, (int(p[0] * 16), int(p[1] * 16)), (int(q[0] * 16), int(q[1] * 16)), colour.tolist(),
             max(1, int(round(thickness))), cv2.LINE_AA, shift=4)


def _background(h: int, w: int, cam: Camera, rng: np.random.Generator, d: float) -> np.ndarray:
    top, bottom, clutter = cam.background
    g = int(cam.ground * h)
    light = rng.normal(0, 6 * d, 3)  # this moment's light on the scene
    img = np.empty((h, w, 3), np.uint8)
    img[:g] = np.clip(top + light, 0, 255)
    img[g:] = np.clip(bottom + light, 0, 255)
    for _ in range(cam.clutter):
        spread = 70.0 if rng.random() < 0.25 else 30.0  # now and then a brightly coloured object
        c = np.clip(clutter + rng.normal(0, spread * d, 3), 0, 255).astype(np.float32)
        x0, y0 = rng.uniform(-0.2, 1.0) * w, rng.uniform(-0.1, 0.9) * h
        x1, y1 = x0 + rng.uniform(0.1, 0.6) * w, y0 + rng.uniform(0.05, 0.4) * h
        if rng.random() < 0.7:
            _poly(img, [(x0, y0), (x1, y0), (x1, y1), (x0, y1)], c)
        else:
            _line(img, (x0, y0), (x1, y1), c, max(1.0, 0.03 * w))
    return img


def _torso_pattern(h: int, w: int, ident: Identity, body_h: float, rng: np.random.Generator) -> np.ndarray:
    """Full-canvas fill of the upper garment (plain / stripes / checks) to be masked by the torso shape."""
    fill = np.empty((h, w, 3), np.uint8)
    fill[:] = np.clip(ident.upper + 0.5, 0, 255)
    if ident.pattern == "plain":
        return fill
    period = max(2.0, ident.period * body_h)
    phase = rng.uniform(0, period)
    ys = ((np.arange(h) + phase) // (period / 2)) % 2 == 1
    xs = ((np.arange(w) + phase) // (period / 2)) % 2 == 1
    if ident.pattern == "hstripes":
        sel = np.broadcast_to(ys[:, None], (h, w))
    elif ident.pattern == "vstripes":
        sel = np.broadcast_to(xs[None, :], (h, w))
    else:
        sel = ys[:, None] ^ xs[None, :]
    fill[sel] = np.clip(ident.upper2 + 0.5, 0, 255)
    return fill


def _draw_legs(img: np.ndarray, ident: Identity, cx: float, sw: float, ww: float, waist_y: float, foot_y: float,
               body_h: float, phase: float) -> None:
    """Legs (lower garment, skin below shorts) and shoes; ``phase`` -1..1 sets the stride."""
    for side in (-1, 1):
        hip = (cx + side * ww * 0.45, waist_y)
        foot = (cx + side * ww * 0.5 + side * phase * sw * 0.5, foot_y - 0.02 * body_h)
        lw = ww * 0.5
        knee_y = (waist_y + foot_y) / 2
        _poly(img, [(hip[0] - lw, hip[1]), (hip[0] + lw, hip[1]), (foot[0] + lw * 0.7, foot[1]),
                    (foot[0] - lw * 0.7, foot[1])], ident.lower)
        if ident.shorts:
            kx = (hip[0] + foot[0]) / 2
            _poly(img, [(kx - lw * 0.85, knee_y), (kx + lw * 0.85, knee_y), (foot[0] + lw * 0.6, foot[1]),
                        (foot[0] - lw * 0.6, foot[1])], ident.skin)
        _ellipse(img, (foot[0] + side * lw * 0.2, foot[1]), (lw * 0.9, max(1.0, 0.025 * body_h)), ident.shoes)


def _draw_person(img: np.ndarray, ident: Identity, cam: Camera, rng: np.random.Generator, d: float) -> None:
    h, w = img.shape[:2]
    scale = cam.scale * np.exp(rng.normal(0, 0.04 * d))
    body_h = ident.height * scale * h
    cx = w / 2 + rng.normal(0, 0.05 * d) * w
    top = (h - body_h) / 2 + (cam.dy + rng.normal(0, 0.02 * d)) * h
    back = rng.random() < cam.back_view
    head_h = ident.head * body_h
    sh_y = top + head_h * 1.05
    waist_y = sh_y + ident.torso * body_h
    foot_y = top + body_h
    sw = ident.width * w * scale / 2  # half shoulder width
    ww = sw * 0.8  # half waist width
    phase = rng.uniform(-1, 1) * d  # walking: -1..1 = legs apart one way or the other
    _draw_legs(img, ident, cx, sw, ww, waist_y, foot_y, body_h, phase)
    # backpack seen from behind sits under the torso drawing's edge; from the front only straps show
    if ident.bag == "backpack" and back:
        _poly(img, [(cx - sw * 0.8, sh_y + 0.02 * body_h), (cx + sw * 0.8, sh_y + 0.02 * body_h),
                    (cx + sw * 0.75, waist_y), (cx - sw * 0.75, waist_y)], ident.bag_colour)
    # torso with its pattern
    mask = np.zeros((h, w), np.uint8)
    torso = [(cx - sw, sh_y), (cx + sw, sh_y), (cx + ww, waist_y), (cx - ww, waist_y)]
    cv2.fillPoly(mask, [np.round(np.asarray(torso) * 16).astype(np.int32)], 255, cv2.LINE_AA, shift=4)
    if ident.bag == "backpack" and back:  # the pack covers the middle of the back
        pack = [(cx - sw * 0.6, sh_y + 0.04 * body_h), (cx + sw * 0.6, sh_y + 0.04 * body_h),
                (cx + sw * 0.55, waist_y), (cx - sw * 0.55, waist_y)]
        cv2.fillPoly(mask, [np.round(np.asarray(pack) * 16).astype(np.int32)], 0, cv2.LINE_AA, shift=4)
    fill = _torso_pattern(h, w, ident, body_h, rng)
    cv2.copyTo(fill, mask, img)
    # arms: sleeves to the elbow (or wrist), then skin; swing opposite to the legs
    swing = -phase * 0.35 * body_h * 0.25
    for side in (-1, 1):
        sh = (cx + side * sw * 0.95, sh_y + 0.02 * body_h)
        hand = (cx + side * sw * 1.15 + side * 0.02 * w, waist_y + 0.05 * body_h + side * swing * 0.3)
        elbow = ((sh[0] + hand[0]) / 2 + side * 0.01 * w, (sh[1] + hand[1]) / 2)
        thick = max(1.0, sw * 0.35)
        _line(img, sh, elbow, ident.upper, thick)
        _line(img, elbow, hand, ident.upper if ident.long_sleeves else ident.skin, thick * 0.9)
        _ellipse(img, hand, (thick * 0.45, thick * 0.5), ident.skin)
    if ident.bag == "backpack" and not back:
        for side in (-1, 1):
            _line(img, (cx + side * sw * 0.6, sh_y), (cx + side * sw * 0.5, waist_y - 0.05 * body_h), ident.bag_colour,
                  max(1.0, 0.025 * w))
    if ident.bag == "shoulder":
        side = 1 if rng.random() < 0.5 else -1
        _line(img, (cx - side * sw * 0.7, sh_y), (cx + side * ww, waist_y), ident.bag_colour, max(1.0, 0.02 * w))
        bx, by = cx + side * (ww + sw * 0.25), waist_y - 0.02 * body_h
        _poly(img, [(bx - sw * 0.35, by), (bx + sw * 0.35, by), (bx + sw * 0.35, by + 0.12 * body_h),
                    (bx - sw * 0.35, by + 0.12 * body_h)], ident.bag_colour)
    # head, hair or hat (hair covers the face when seen from behind)
    hc = (cx + rng.normal(0, 0.01) * w, top + head_h / 2)
    hr = (head_h * 0.36, head_h * 0.5)
    _ellipse(img, hc, hr, ident.skin)
    if ident.hat is not None:
        _poly(img, [(hc[0] - hr[0] * 1.1, hc[1] - hr[1] * 0.2), (hc[0] + hr[0] * 1.1, hc[1] - hr[1] * 0.2),
                    (hc[0] + hr[0] * 0.8, hc[1] - hr[1] * 1.1), (hc[0] - hr[0] * 0.8, hc[1] - hr[1] * 1.1)], ident.hat)
    elif back:
        _ellipse(img, (hc[0], hc[1] - hr[1] * 0.05), (hr[0] * 1.05, hr[1] * 0.95), ident.hair)
    else:
        _ellipse(img, (hc[0], hc[1] - hr[1] * 0.55), (hr[0] * 1.05, hr[1] * 0.5), ident.hair)


_GREY = np.array([0.299, 0.587, 0.114], dtype=np.float64)


def _camera_optics(img: np.ndarray, cam: Camera, rng: np.random.Generator, d: float) -> np.ndarray:
    """Light (gain, colour cast, saturation as one 3x3 colour transform; gamma), blur and sensor noise."""
    h = img.shape[0]
    gain = cam.gain * np.exp(rng.normal(0, 0.08 * d)) * cam.cast.astype(np.float64)
    mix = cam.saturation * np.eye(3) + (1.0 - cam.saturation) * np.outer(np.ones(3), _GREY)
    out = cv2.transform(img, (mix * gain[None, :]).astype(np.float32))  # saturates to uint8
    lut = (255.0 * (np.arange(256) / 255.0) ** cam.gamma + 0.5).astype(np.uint8)
    out = cv2.LUT(out, lut)
    sigma = cam.blur * h * np.exp(rng.normal(0, 0.3))
    if sigma > 0.3:
        out = cv2.GaussianBlur(out, (0, 0), sigma)
    if cam.noise > 0:
        noise = rng.standard_normal(out.shape, dtype=np.float32) * np.float32(cam.noise)
        out = cv2.add(out, noise, dtype=cv2.CV_8U)
    return out


def render_person(
    pid: int,
    camid: int,
    rng: np.random.Generator,
    size: tuple[int, int] = (128, 64),
    *,
    world_seed: int = 0,
    difficulty: float = 1.0,
) -> np.ndarray:
    """One crop (uint8 HxWx3 RGB, ``size`` = (H, W)) of identity ``pid`` seen by camera ``camid``.

    Identity and camera styles depend only on (pid, world_seed) and (camid, world_seed); ``rng`` draws
    this image's pose, light jitter, clutter, occlusion and noise.
    """
    h, w = int(size[0]), int(size[1])
    d = max(0.0, float(difficulty))
    ident = identity_of(int(pid), int(world_seed))
    cam = camera_of(int(camid), int(world_seed), d)
    img = _background(h, w, cam, rng, d)
    _draw_person(img, ident, cam, rng, d)
    if rng.random() < 0.12 * d:  # something in front: a pole, a passer-by's shoulder, a car's edge
        c = np.clip(cam.background[2] + rng.normal(0, 50, 3), 0, 255).astype(np.float32)
        if rng.random() < 0.5:
            x0 = rng.uniform(-0.1, 0.9) * w
            _poly(img, [(x0, 0), (x0 + rng.uniform(0.08, 0.25) * w, 0), (x0 + 0.2 * w, h), (x0, h)], c)
        else:
            y0 = rng.uniform(0.7, 0.9) * h
            _poly(img, [(0, y0), (w, y0 + rng.uniform(-0.05, 0.05) * h), (w, h), (0, h)], c)
    if rng.random() < 0.5:
        img = img[:, ::-1]
    return _camera_optics(np.ascontiguousarray(img), cam, rng, d)


def render_junk(rng: np.random.Generator, camid: int, size: tuple[int, int] = (128, 64), *, world_seed: int = 0,
                difficulty: float = 1.0) -> np.ndarray:
    """A badly detected box (Market-1501's junk, id -1): a sliver of someone, mostly background."""
    h, w = int(size[0]), int(size[1])
    full = render_person(int(rng.integers(10**6, 2 * 10**6)), camid, rng, (2 * h, 2 * w), world_seed=world_seed,
                         difficulty=difficulty)
    ch, cw = int(rng.uniform(0.3, 0.7) * 2 * h), int(rng.uniform(0.3, 0.8) * 2 * w)
    y0, x0 = int(rng.integers(0, 2 * h - ch + 1)), int(rng.integers(0, 2 * w - cw + 1))
    return cv2.resize(full[y0:y0 + ch, x0:x0 + cw], (w, h), interpolation=cv2.INTER_LINEAR)
