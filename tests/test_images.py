import os

import cv2
import numpy as np
import pytest

from reid.errors import ImageDecodeError, InputError
from reid.images import decode_bytes, decode_image, find_images, parse_market_name, preprocess


def _write(path, img):
    assert cv2.imwrite(str(path), img)
    return path


def test_find_images_recursive_sorted_and_filtered(tmp_path):
    (tmp_path / "b" / "c").mkdir(parents=True)
    img = np.zeros((8, 4, 3), np.uint8)
    for rel in ["z.jpg", "a.PNG", "b/c/x.jpeg", "b/y.bmp", "b/w.webp"]:
        _write(tmp_path / rel, img)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "Thumbs.db").write_bytes(b"x")
    (tmp_path / ".hidden").mkdir()
    _write(tmp_path / ".hidden" / "h.jpg", img)
    found = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]
    assert found == ["a.PNG", "b/c/x.jpeg", "b/w.webp", "b/y.bmp", "z.jpg"]


def test_find_images_missing_root(tmp_path):
    with pytest.raises(InputError, match="no such folder"):
        find_images(tmp_path / "nope")


def test_decode_converts_gray_rgba_and_16bit_to_uint8_rgb(tmp_path):
    bgr = np.zeros((6, 5, 3), np.uint8)
    bgr[..., 0] = 200  # blue in OpenCV's BGR order
    rgb = decode_image(_write(tmp_path / "c.png", bgr))
    assert rgb.shape == (6, 5, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == [0, 0, 200]

    gray = decode_image(_write(tmp_path / "g.png", np.full((6, 5), 77, np.uint8)))
    assert gray.shape == (6, 5, 3) and (gray == 77).all()

    bgra = np.dstack([bgr, np.full((6, 5), 10, np.uint8)])
    assert decode_image(_write(tmp_path / "a.png", bgra))[0, 0].tolist() == [0, 0, 200]

    deep = decode_image(_write(tmp_path / "d.png", np.full((6, 5), 0xABCD, np.uint16)))
    assert deep.dtype == np.uint8 and (deep == 0xAB).all()


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "empty file"),
        (b"this is not an image at all", "not a decodable image"),
        (None, "truncated JPEG"),
    ],
)
def test_decode_failures_have_reasons(tmp_path, content, reason):
    if content is None:
        ok, enc = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 255, (64, 32, 3), dtype=np.uint8))
        content = enc.tobytes()[: len(enc) // 2]
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageDecodeError, match=reason):
        decode_image(path)


def test_decode_missing_and_unreadable(tmp_path):
    with pytest.raises(ImageDecodeError, match="no such file"):
        decode_image(tmp_path / "missing.jpg")
    if os.geteuid() != 0:  # root reads anything
        p = _write(tmp_path / "locked.png", np.zeros((4, 4, 3), np.uint8))
        p.chmod(0)
        with pytest.raises(ImageDecodeError, match="permission denied"):
            decode_image(p)


def test_decode_bytes_round_trip():
    img = np.random.default_rng(1).integers(0, 255, (10, 7, 3), dtype=np.uint8)
    ok, enc = cv2.imencode(".png", img[..., ::-1])
    assert (decode_bytes(enc.tobytes()) == img).all()


@pytest.mark.parametrize(
    "name, expected",
    [
        ("0002_c1s1_000451_03.jpg", (2, 1)),
        ("dir/-1_c3s2_000001_00.jpg", (-1, 3)),
        ("0000_c6s4_002427_05.jpg", (0, 6)),
        ("0005_c2_f0046985.jpg", (5, 2)),  # DukeMTMC-reID naming
        ("person.jpg", (None, None)),
    ],
)
def test_parse_market_name(name, expected):
    assert parse_market_name(name) == expected


def test_preprocess_shape_range_and_layout():
    img = np.zeros((40, 20, 3), np.uint8)
    img[..., 1] = 255
    x = preprocess(img, (32, 16))
    assert x.shape == (3, 32, 16) and x.dtype == np.float32
    assert np.allclose(x[1], 1.0) and np.allclose(x[0], 0.0)
