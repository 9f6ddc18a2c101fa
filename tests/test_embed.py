import cv2
import numpy as np
import pytest
import torch

from reid.embed import embed_arrays, embed_paths


class PoolNet(torch.nn.Module):
    """A tiny stand-in embedder: per-channel means of a 2x2 pooled grid, L2-normalised."""

    embed_dim = 12
    input_size = (256, 128)

    def forward(self, x):
        f = torch.nn.functional.adaptive_avg_pool2d(x, (2, 2)).flatten(1)
        return torch.nn.functional.normalize(f + 1e-3, dim=1)


def _gallery(tmp_path, n=7):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = tmp_path / f"{i:02d}.png"
        cv2.imwrite(str(p), rng.integers(0, 255, (40, 20, 3), dtype=np.uint8))
        paths.append(p)
    return paths


@pytest.mark.parametrize("workers", [0, 2])
def test_embed_paths_keeps_order_and_reports_failures(tmp_path, workers):
    paths = _gallery(tmp_path)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    paths.insert(3, bad)
    seen = []
    res = embed_paths(PoolNet(), paths, batch_size=3, workers=workers, progress=seen.append)
    assert sum(seen) == len(paths)
    assert res.features.shape == (7, 12) and res.features.dtype == np.float32
    assert np.allclose(np.linalg.norm(res.features, axis=1), 1, atol=1e-5)
    assert res.paths == [p for p in paths if p != bad]
    assert res.index.tolist() == [0, 1, 2, 4, 5, 6, 7]
    assert len(res.failures) == 1 and res.failures[0][0] == bad and "not a decodable image" in res.failures[0][1]


def test_embed_paths_equals_embed_arrays_and_streams_batches(tmp_path):
    from reid.images import decode_image, preprocess

    paths = _gallery(tmp_path, 5)
    batches = []
    res = embed_paths(PoolNet(), paths, batch_size=2, workers=0, on_batch=lambda p, f, e: batches.append((p, f)))
    assert [len(p) for p, _ in batches] == [2, 2, 1]
    direct = embed_arrays(PoolNet(), np.stack([preprocess(decode_image(p)) for p in paths]))
    assert np.allclose(res.features, direct, atol=1e-6)
    assert np.allclose(np.concatenate([f for _, f in batches]), direct, atol=1e-6)


def test_flip_averages_both_orientations():
    x = torch.rand(2, 3, 8, 4)
    model = PoolNet()
    flipped = embed_arrays(model, x, flip=True)
    expected = torch.nn.functional.normalize(model(x) + model(x.flip(3)), dim=1).numpy()
    assert np.allclose(flipped, expected, atol=1e-6)
    assert not np.allclose(flipped, embed_arrays(model, x), atol=1e-4)


def test_all_failures_gives_empty_features(tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"")
    res = embed_paths(PoolNet(), [bad], workers=0)
    assert res.features.shape == (0, 12) and res.paths == [] and len(res.failures) == 1


def test_workers_do_not_deadlock_after_parent_used_opencv_threads(tmp_path):
    """Forked decoding workers once hung when the parent had already used OpenCV's thread pool."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        f"""
        import cv2, numpy as np, torch
        from pathlib import Path
        from reid.embed import embed_paths
        paths = []
        for i in range(6):
            p = Path({str(tmp_path)!r}) / f"{{i}}.png"
            cv2.imwrite(str(p), np.random.randint(0, 255, (900, 500, 3), np.uint8))
            paths.append(p)
        cv2.resize(np.zeros((2000, 2000, 3), np.uint8), (1000, 1000))  # spins up OpenCV's pool
        class M(torch.nn.Module):
            embed_dim = 3
            input_size = (256, 128)
            def forward(self, x):
                return torch.nn.functional.normalize(x.mean((2, 3)), dim=1)
        print(embed_paths(M(), paths, workers=2, batch_size=2).features.shape)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(6, 3)"


def test_cpu_and_torch_conversions_give_the_model_the_same_numbers():
    from reid.embed import to_model_input
    from reid.images import to_unit_float

    img = np.random.default_rng(3).integers(0, 256, (16, 8, 3), dtype=np.uint8)
    img[0, 0] = [0, 128, 255]
    got = to_model_input(torch.from_numpy(img)[None])[0].numpy()
    assert np.array_equal(got, to_unit_float(img))


def test_a_query_finds_its_own_indexed_file(tmp_path):
    """Gallery files and query crops go through one embedding path (with the real default network: the
    index embeds a batch through the fused copy, the one-crop query through the trained layers)."""
    from reid.search import query_images
    from reid.index import build_index
    from reid.synthetic import render_person

    gallery = tmp_path / "g"
    gallery.mkdir()
    for i in range(9):
        cv2.imwrite(str(gallery / f"{i + 1:04d}_c1s1_000001_01.jpg"),
                    render_person(i % 4 + 1, 1, np.random.default_rng(i), (160, 64))[..., ::-1])
    build_index(gallery, tmp_path / "idx", device="cpu")
    probe = sorted(gallery.iterdir())[4]
    [result] = query_images([probe], tmp_path / "idx", top=1, device="cpu")
    assert result.matches[0].path == str(probe)
    assert result.matches[0].score >= 0.99999
