import cv2
import numpy as np
import pytest

from reid import viz
from reid.errors import InputError


def _read_rgb(path):
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert img is not None, f"{path} is not a readable picture"
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def test_plot_cmc_size_and_curve_pixels():
    ranks = np.arange(1, 51)
    cmc = 1 - 0.5 * np.exp(-ranks / 5)
    img = viz.plot_cmc({"ours": cmc}, size=(400, 600))
    assert img.shape == (400, 600, 3) and img.dtype == np.uint8
    colour = np.array(viz.CURVE_COLOURS[0])
    hits = np.argwhere(np.all(np.abs(img.astype(int) - colour) < 20, axis=2))
    assert len(hits) > 300  # the curve (and its legend swatch) is drawn
    # The curve rises: the leftmost curve pixels lie lower in the picture than those at the right.
    left = hits[(hits[:, 1] > 60) & (hits[:, 1] < 120)][:, 0].mean()
    right = hits[(hits[:, 1] > 300) & (hits[:, 1] < 400)][:, 0].mean()  # the legend sits further right
    assert left > right + 50


def test_plot_cmc_two_curves_distinct_colours_and_plain_array():
    c = np.linspace(0.3, 1.0, 50)
    img = viz.plot_cmc({"a": c, "b": c**2})
    for colour in viz.CURVE_COLOURS[:2]:
        assert np.all(np.abs(img.astype(int) - np.array(colour)) < 20, axis=2).sum() > 100
    assert viz.plot_cmc(c).shape == (480, 640, 3)


def test_plot_cmc_rejects_empty_and_tiny():
    with pytest.raises(InputError):
        viz.plot_cmc({})
    with pytest.raises(InputError):
        viz.plot_cmc(np.ones(5), size=(50, 50))


def test_tile_colours_by_status():
    img = np.full((100, 50, 3), 128, np.uint8)
    for status in ("match", "mismatch", "junk", "query"):
        t = viz.tile(img, status, "1: 0.123", size=(128, 64))
        assert t.shape == (128 + viz.CAPTION_H, 64, 3)
        assert tuple(t[1, 1]) == viz.STATUS_COLOURS[status]
    # Junk crops are greyed: no colour left inside the frame.
    colourful = np.zeros((100, 50, 3), np.uint8)
    colourful[..., 0] = 255
    inner = viz.tile(colourful, "junk")[10:-30, 10:-10].astype(int)
    assert np.abs(inner[..., 0] - inner[..., 1]).max() < 40
    with pytest.raises(InputError):
        viz.tile(img, "maybe")


def test_rank_strip_and_grid_shape():
    rng = np.random.default_rng(0)
    crops = [rng.integers(0, 255, (90, 40, 3), dtype=np.uint8) for _ in range(11)]
    items = [viz.RankedItem(c, "match" if i % 2 else "mismatch", f"{i + 1}") for i, c in enumerate(crops[1:])]
    rows = [viz.rank_strip(crops[0], items), viz.rank_strip(crops[0], items[:3], slots=10)]
    grid = viz.stack_rows(rows)
    assert grid.shape[:2] == viz.rank_grid_shape(2, 10)
    x = 64 + viz.QUERY_GAP  # first ranked tile of row 0 is a mismatch (red)
    assert tuple(grid[2, x + 2]) == viz.STATUS_COLOURS["mismatch"]
    assert tuple(grid[2, 2]) == viz.STATUS_COLOURS["query"]
    with pytest.raises(InputError):
        viz.rank_strip(crops[0], items, slots=5)


def test_attention_overlay_follows_the_map():
    img = np.full((256, 128, 3), 128, np.uint8)
    att = np.zeros((16, 8), np.float32)
    att[2, 4] = 1.0  # hot cell in the upper half
    out = viz.attention_overlay(img, att)
    assert out.shape == img.shape and out.dtype == np.uint8
    # JET: hot = red, cold = blue.
    hot = out[2 * 16 + 8, 4 * 16 + 8].astype(int)
    cold = out[200, 20].astype(int)
    assert hot[0] > hot[2] + 60 and cold[2] > cold[0] + 60
    # K glimpses are averaged; a constant map gives a uniform overlay.
    flat = viz.attention_overlay(img, np.ones((3, 16, 8)))
    assert flat.reshape(-1, 3).std(axis=0).max() == 0
    with pytest.raises(InputError):
        viz.attention_overlay(img, np.ones(5))
    with pytest.raises(InputError):
        viz.attention_overlay(img, np.full((4, 4), np.nan))


def test_save_image_roundtrip_and_errors(tmp_path):
    img = np.zeros((40, 30, 3), np.uint8)
    img[..., 0] = 200  # red in RGB must stay red on disk
    path = viz.save_image(tmp_path / "a.png", img)
    assert np.array_equal(_read_rgb(path), img)
    assert _read_rgb(viz.save_image(tmp_path / "b.jpg", img)).shape == (40, 30, 3)
    assert not list(tmp_path.glob(".*tmp"))  # temp files replaced, none left behind
    with pytest.raises(InputError, match="use one of"):
        viz.save_image(tmp_path / "a.gif", img)
    with pytest.raises(InputError, match="does not exist"):
        viz.save_image(tmp_path / "missing" / "a.png", img)


def test_draw_rank_lists_marks_matches_junk_and_mismatches(tmp_path):
    rng = np.random.default_rng(1)
    paths = []
    for i in range(5):
        p = tmp_path / f"{i}.png"
        cv2.imwrite(str(p), rng.integers(0, 255, (64, 32, 3), dtype=np.uint8))
        paths.append(p)
    # Query: pid 7, camera 1. Gallery: same pid other camera (match), same pid same camera (junk), others.
    g_pids = np.array([7, 7, 3, 4])
    g_cams = np.array([2, 1, 1, 2])
    dist = np.array([[0.3, 0.1, 0.2, 0.4]])
    img = viz.draw_rank_lists([paths[0]], paths[1:], np.array([7]), g_pids, np.array([1]), g_cams, dist, top=3)
    assert img.shape[:2] == viz.rank_grid_shape(1, 3)
    xs = [64 + viz.QUERY_GAP + i * (64 + viz.GAP) + 1 for i in range(3)]
    assert [tuple(img[1, x]) for x in xs] == [viz.STATUS_COLOURS[s] for s in ("junk", "mismatch", "match")]


def test_attention_painter_overlays_the_models_own_map():
    import torch

    from reid.model import ModelConfig, build_model

    model = build_model(ModelConfig(input_size=(64, 32), c_a=8, c_b=8, d_x=32, d_h=16, d_att=16, num_glimpses=2,
                                    embed_dim=32), pretrained=False)
    img = np.random.default_rng(0).integers(0, 255, (100, 40, 3), dtype=np.uint8)
    painted = viz.attention_painter(model)(img)
    from reid.images import preprocess

    with torch.inference_mode():
        att = model.attention_maps(torch.from_numpy(preprocess(img, (64, 32)))[None])[0].numpy()
    assert painted.shape == img.shape and np.array_equal(painted, viz.attention_overlay(img, att))
    assert not np.array_equal(painted, img)
