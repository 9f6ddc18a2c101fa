"""reid.search (query images against an index) and the result picture."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from reid.errors import EmptyGalleryError, ImageDecodeError, InputError
from reid.model import ModelConfig, build_model, save_checkpoint
from reid.search import Match, QueryResult, Searcher, load_queries, query_images
from reid.search_picture import draw_results, match_status
from reid.index import index_folder
from reid.model.identity import ModelRef
from reid.store import Filter, open_gallery
from reid.viz import rank_grid_shape

SMALL = ModelConfig(input_size=(64, 32), output_stride=32, c_a=4, c_b=4, d_x=16, d_h=8, d_att=8, num_glimpses=1,
                    embed_dim=16)


def crop(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.zeros((96, 48, 3), np.uint8)
    img[:48] = rng.integers(0, 255, 3)  # shirt
    img[48:] = rng.integers(0, 255, 3)  # trousers
    return img


@pytest.fixture
def indexed(tmp_path):
    model = build_model(SMALL, pretrained=False)
    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    gallery = tmp_path / "g"
    gallery.mkdir()
    for i in range(5):
        cv2.imwrite(str(gallery / f"{i + 1:04d}_c{i % 2 + 1}s1_000001_01.png"), crop(i))
    cv2.imwrite(str(gallery / "plain.png"), crop(9))
    with open_gallery(tmp_path / "idx", write=True) as store:
        store.bind(ModelRef.of(model, str(ckpt)))
        report = index_folder(store, model, gallery, workers=0)
    assert report.added == 6
    return sorted(gallery.iterdir()), tmp_path / "idx"


def test_each_gallery_image_finds_itself_first_with_parsed_ids(indexed):
    files, idx = indexed
    results = query_images(files, idx, top=3)
    for f, r in zip(files, results, strict=True):
        assert r.query == str(f)
        assert r.matches[0].path == str(f.resolve()) and r.matches[0].score == pytest.approx(1.0, abs=1e-4)
        assert [m.rank for m in r.matches] == [1, 2, 3]
    named = next(r for r in results if r.query.endswith("0002_c2s1_000001_01.png"))
    assert (named.pid, named.camid, named.matches[0].pid, named.matches[0].camid) == (2, 2, 2, 2)
    plain = next(r for r in results if r.query.endswith("plain.png"))
    assert (plain.pid, plain.matches[0].pid, plain.matches[0].camid) == (None, None, None)
    assert plain.to_dict()["matches"][0] == {"rank": 1, "score": pytest.approx(1.0, abs=1e-4),
                                             "path": str(files[-1].resolve()), "camid": None, "pid": None}


def test_min_score_and_top(indexed):
    files, idx = indexed
    with Searcher.open(idx) as s:
        every = s.query(files[:1], top=50)[0].matches
        assert len(every) == 6
        cut = (every[2].score + every[3].score) / 2
        assert [m.rank for m in s.query(files[:1], top=50, min_score=cut)[0].matches] == [1, 2, 3]
        with pytest.raises(InputError, match="^`top` must be at least 1, not 0$"):
            s.query(files[:1], top=0)


def test_bad_queries(tmp_path, indexed):
    files, idx = indexed
    with pytest.raises(InputError, match="does not exist"):
        load_queries([tmp_path / "nope.jpg"])
    with pytest.raises(InputError, match="is a folder"):
        load_queries([tmp_path])
    (tmp_path / "x.png").write_bytes(b"nope")
    with pytest.raises(ImageDecodeError, match="x.png"):
        query_images([tmp_path / "x.png"], idx)
    with pytest.raises(InputError, match="no query image"):
        query_images([], idx)


def test_empty_index_is_refused_before_loading_any_model(tmp_path):
    open_gallery(tmp_path / "idx", write=True).close()
    with pytest.raises(EmptyGalleryError, match="is empty$"):
        query_images([tmp_path / "whatever.jpg"], tmp_path / "idx")


def test_match_status():
    assert match_status(3, 3) == "match"
    assert match_status(3, 4) == "mismatch"
    assert match_status(3, 0) == "mismatch"  # a distractor
    assert match_status(3, -1) == "junk"
    assert match_status(None, 3) == "unknown"
    assert match_status(3, None) == "unknown"
    assert match_status(0, 0) == "mismatch"  # two distractors are not the same person


def test_picture_has_one_row_per_query_and_survives_a_vanished_gallery_file(tmp_path, caplog):
    q = tmp_path / "0001_c1s1_000001_01.png"
    cv2.imwrite(str(q), crop(1))
    g = tmp_path / "0001_c2s1_000002_01.png"
    cv2.imwrite(str(g), crop(1))
    results = [
        QueryResult(str(q), [Match(1, 0.9, str(g), 2, 1), Match(2, 0.5, str(tmp_path / "gone.png"), 1, 7)], 1, 1),
        QueryResult(str(q), [Match(1, 0.4, str(g), 2, 1)], 1, 1),
    ]
    with caplog.at_level("WARNING"):
        pic = draw_results(results)
    assert "gone.png" in caplog.text
    assert pic.shape[:2] == rank_grid_shape(2, 2) and pic.dtype == np.uint8
    # The first match is framed green (same identity), the second red (another identity).
    from reid.viz import BORDER, GAP, QUERY_GAP, STATUS_COLOURS

    tw = 64
    x1 = tw + QUERY_GAP + BORDER // 2
    x2 = tw + QUERY_GAP + tw + GAP + BORDER // 2
    assert tuple(pic[60, x1]) == STATUS_COLOURS["match"]
    assert tuple(pic[60, x2]) == STATUS_COLOURS["mismatch"]


def test_searcher_pushes_filters_down_to_the_gallery(indexed):
    files, idx = indexed  # 0001_c1 .. 0005_c1 (cameras 1, 2, 1, 2, 1) and plain.png
    with Searcher.open(idx) as s:
        [only] = s.query(files[:1], top=10, where=Filter(cameras={2}))
        assert {m.camid for m in only.matches} == {2} and len(only.matches) == 2
        [other] = s.query(files[:1], top=10, other_cameras=True)  # camera 1 left out; no camera stays in
        assert [m.camid for m in other.matches].count(None) == 1 and 1 not in {m.camid for m in other.matches}
        [both] = s.query(files[:1], top=10, other_cameras=True, where=Filter(pids={2}))
        assert [(m.pid, m.camid) for m in both.matches] == [(2, 2)]
        with pytest.raises(InputError, match="`other_cameras` needs the query's camera"):
            s.query(files[-1:], other_cameras=True)
