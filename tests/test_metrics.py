"""reid.evaluation's metrics against plain per-query references (argsort + masks), hand-computed and edge cases."""

from __future__ import annotations

import numpy as np
import pytest

import reid.evaluation._ranks as ranks_mod
from reid.errors import InputError
from reid.evaluation import (
    cosine_distance,
    evaluate_cuhk03_classic,
    evaluate_features,
    evaluate_ranking,
)
from reid.evaluation._ranks import float32_order_keys

METHODS = ("auto", "candidates", "sort")


# ----------------------------------------------------------------------------- references


def reference_ranking(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50):
    """The obvious implementation: stable argsort per query, drop junk, find the true matches."""
    cmcs, aps, inps, per_query_ap = [], [], [], []
    for i in range(distmat.shape[0]):
        order = np.argsort(distmat[i], kind="stable")
        same = g_pids[order] == q_pids[i]
        junk = (g_pids[order] == -1) | (same & (g_camids[order] == q_camids[i]))
        hits = same[~junk]
        if not hits.any():
            per_query_ap.append(np.nan)
            continue
        where = np.flatnonzero(hits)
        cmc = np.zeros(max_rank)
        if where[0] < max_rank:
            cmc[where[0]:] = 1.0
        cmcs.append(cmc)
        aps.append(np.mean(np.arange(1, where.size + 1) / (where + 1.0)))
        per_query_ap.append(aps[-1])
        inps.append(where.size / (where[-1] + 1.0))
    return np.mean(cmcs, axis=0), float(np.mean(aps)), float(np.mean(inps)), len(aps), np.array(per_query_ap)


def reference_trapezoid_ap(distmat, q_pids, g_pids, q_camids, g_camids):
    """Line by line the official Market-1501 MATLAB compute_AP.m (junk = pid -1 or same pid + camera)."""
    aps = []
    for i in range(distmat.shape[0]):
        index = np.argsort(distmat[i], kind="stable")  # MATLAB's sort is stable too
        good = set(np.flatnonzero((g_pids == q_pids[i]) & (g_camids != q_camids[i]) & (g_pids != -1)).tolist())
        junk = set(np.flatnonzero((g_pids == -1) | ((g_pids == q_pids[i]) & (g_camids == q_camids[i]))).tolist())
        if not good:
            continue
        ngood = len(good)
        old_recall, old_precision, ap, intersect, j, good_now = 0.0, 1.0, 0.0, 0, 0, 0
        for n in index:
            flag = n in good
            if flag:
                good_now += 1
            if n in junk:
                continue
            if flag:
                intersect += 1
            recall = intersect / ngood
            precision = intersect / (j + 1)
            ap += (recall - old_recall) * (old_precision + precision) / 2
            old_recall, old_precision = recall, precision
            j += 1
            if good_now == ngood:
                break
        aps.append(ap)
    return float(np.mean(aps))


def random_case(seed: int):
    """A small protocol with distractors (0), junk (-1), same-camera matches, ties, maybe no-match queries."""
    rng = np.random.default_rng(seed)
    nq, ng = int(rng.integers(1, 30)), int(rng.integers(1, 90))
    num_ids, num_cams = int(rng.integers(1, 8)), int(rng.integers(1, 4))
    q_pids = rng.integers(1, num_ids + 2, nq)  # some query ids may be absent from the gallery
    g_pids = rng.integers(-1, num_ids + 1, ng)  # -1 junk, 0 distractors
    q_camids = rng.integers(0, num_cams, nq)
    g_camids = rng.integers(0, num_cams, ng)
    levels = int(rng.choice([3, 10, 1000]))  # few levels = many ties
    d = rng.integers(0, levels, (nq, ng)) / levels
    if rng.random() < 0.2:
        d = -d  # negative distances (e.g. negated similarities) are fine
    dtype = rng.choice([np.float32, np.float64])
    return d.astype(dtype), q_pids, g_pids, q_camids, g_camids


def has_valid_query(q_pids, g_pids, q_camids, g_camids):
    return any(((g_pids == p) & (g_camids != c) & (g_pids != -1)).any() for p, c in zip(q_pids, q_camids, strict=True))


# ----------------------------------------------------------------------------- Market-1501 protocol


@pytest.mark.parametrize("method", METHODS)
def test_equals_reference_on_random_cases(method):
    checked = 0
    for seed in range(120):
        d, qp, gp, qc, gc = random_case(seed)
        if not has_valid_query(qp, gp, qc, gc):
            with pytest.raises(InputError, match="none of the"):
                evaluate_ranking(d, qp, gp, qc, gc, method=method)
            continue
        max_rank = int(np.random.default_rng(seed).integers(1, 120))  # often above the gallery size
        r = evaluate_ranking(d, qp, gp, qc, gc, max_rank=max_rank, method=method)
        cmc, mAP, mINP, nvalid, qap = reference_ranking(d, qp, gp, qc, gc, max_rank)
        assert r.cmc.shape == (max_rank,)
        np.testing.assert_allclose(r.cmc, cmc, rtol=0, atol=1e-12)
        assert r.mAP == pytest.approx(mAP, abs=1e-12)
        assert r.mINP == pytest.approx(mINP, abs=1e-12)
        assert (r.num_queries, r.num_valid_queries) == (len(qp), nvalid)
        np.testing.assert_allclose(r.query_ap, qap, rtol=0, atol=1e-12)  # NaN where no valid match
        t = evaluate_ranking(d, qp, gp, qc, gc, max_rank=max_rank, ap="trapezoid", method=method)
        assert t.mAP == pytest.approx(reference_trapezoid_ap(d, qp, gp, qc, gc), abs=1e-12)
        np.testing.assert_array_equal(t.cmc, r.cmc)
        checked += 1
    assert checked > 80


def test_many_sub_blocks_and_a_market_like_structure(monkeypatch):
    """Sub-blocks of a few rows, real-looking ids (many cameras, distractors, junk), float32 ties."""
    rng = np.random.default_rng(7)
    ids = np.arange(1, 41)
    g_pids = np.concatenate([np.repeat(ids, 6), np.zeros(60, int), -np.ones(30, int)])
    g_camids = rng.integers(1, 7, g_pids.size)
    q_pids = np.repeat(ids, 2)
    q_camids = rng.integers(1, 7, q_pids.size)
    centre = rng.standard_normal((41, 8))
    g = centre[np.maximum(g_pids, 0)] + rng.standard_normal((g_pids.size, 8))
    q = centre[q_pids] + rng.standard_normal((q_pids.size, 8))
    d = np.round(1 - (q @ g.T) / 20, 2).astype(np.float32)
    monkeypatch.setattr(ranks_mod, "SUBBLOCK_ELEMENTS", 3 * g_pids.size)
    expected = reference_ranking(d, q_pids, g_pids, q_camids, g_camids, 50)
    for method in METHODS:
        r = evaluate_ranking(d, q_pids, g_pids, q_camids, g_camids, method=method)
        np.testing.assert_allclose(r.cmc, expected[0], atol=1e-12)
        assert (r.mAP, r.mINP) == pytest.approx(expected[1:3], abs=1e-12)
    assert 0.1 < expected[1] < 0.9  # a non-trivial case


def test_hand_computed_standard_trapezoid_and_minp():
    # Query 0 (pid 1, cam 1). Sorted: g2 (same pid+cam: ignored) 0.05, g0 (pid 2) 0.1, g3 (junk) 0.15,
    # g1 (match) 0.2, g4 (distractor 0) 0.3, g5 (match) 0.4 -> valid order g0 g1 g4 g5, matches at ranks 1, 3.
    # Query 1 (pid 2, cam 1): g0 (pid 2, cam 2) is first -> one match at rank 0.
    g_pids = np.array([2, 1, 1, -1, 0, 1])
    g_cams = np.array([2, 2, 1, 3, 2, 3])
    d = np.array([[0.1, 0.2, 0.05, 0.15, 0.3, 0.4], [0.0, 0.5, 0.5, 0.5, 0.5, 0.5]])
    q_pids, q_cams = np.array([1, 2]), np.array([1, 1])
    r = evaluate_ranking(d, q_pids, g_pids, q_cams, g_cams, max_rank=5)
    # AP: q0 = (1/2 + 2/4) / 2 = 1/2, q1 = 1. mINP: q0 = 2/4, q1 = 1/1.
    assert r.query_ap == pytest.approx([0.5, 1.0])
    assert r.mAP == pytest.approx(0.75)
    assert r.mINP == pytest.approx(0.75)
    np.testing.assert_allclose(r.cmc, [0.5, 1, 1, 1, 1])
    np.testing.assert_array_equal(r.query_first_rank, [1, 0])
    # compute_AP.m, q0: trapezoids (0 + 1/2)/2 * 1/2 + (1/3 + 2/4)/2 * 1/2 = 1/8 + 5/24 = 1/3; q1: 1.
    t = evaluate_ranking(d, q_pids, g_pids, q_cams, g_cams, max_rank=5, ap="trapezoid")
    assert t.query_ap == pytest.approx([1 / 3, 1.0])
    assert t.mAP == pytest.approx(2 / 3)
    assert t.to_dict()["ap"] == "trapezoid"


def test_ties_follow_gallery_index_order():
    # All distances equal (and -0.0 == +0.0): the order is g0 g1 g2 g3; g2 is same pid + cam (ignored).
    d = np.array([[0.0, -0.0, 0.0, -0.0]], dtype=np.float32)
    g_pids, g_cams = np.array([1, 2, 1, 1]), np.array([2, 2, 1, 3])
    for method in METHODS:
        r = evaluate_ranking(d, [1], g_pids, [1], g_cams, max_rank=3, method=method)
        np.testing.assert_array_equal(r.query_first_rank, [0])
        assert r.mAP == pytest.approx((1 + 2 / 3) / 2)  # matches at valid ranks 0 and 2
        assert r.mINP == pytest.approx(2 / 3)
    # The same matrix with the columns reversed: now the distractor comes first.
    r = evaluate_ranking(d[:, ::-1], [1], g_pids[::-1], [1], g_cams[::-1], max_rank=3)
    assert r.mAP == pytest.approx((1 / 1 + 2 / 3) / 2)  # order g3 g2(ignored) g1 g0: ranks 0, 2


def test_gallery_smaller_than_max_rank_saturates():
    d = np.array([[0.3, 0.1, 0.2]])
    r = evaluate_ranking(d, [5], [7, 8, 5], [0], [1, 1, 1], max_rank=50)
    assert r.cmc.shape == (50,)
    np.testing.assert_allclose(r.cmc, [0] + [1] * 49)  # the match is second (0.2 after 0.1)
    assert r.rank(2) == 1.0 and r.to_dict()["rank1"] == 0.0 and r.to_dict()["rank20"] == 1.0
    with pytest.raises(InputError, match="rank 51"):
        r.rank(51)


def test_queries_without_valid_match_are_excluded_and_counted():
    d = np.array([[0.1, 0.2], [0.2, 0.1], [0.5, 0.4]])
    # q0 matches g1 (other camera); q1 only sees itself in the same camera; q2's id is not in the gallery.
    r = evaluate_ranking(d, [1, 2, 9], [2, 1], [0, 0, 0], [0, 1], max_rank=2)
    assert (r.num_queries, r.num_valid_queries, r.num_invalid_queries) == (3, 1, 2)
    assert np.isnan(r.query_ap[1]) and np.isnan(r.query_ap[2])
    np.testing.assert_allclose(r.cmc, [0, 1])
    assert r.to_dict()["num_valid_queries"] == 1


def test_integer_float16_and_transposed_inputs():
    d, qp, gp, qc, gc = next(c for c in map(random_case, range(10, 99)) if len(c[1]) > 5 and has_valid_query(*c[1:]))
    expected = reference_ranking(d, qp, gp, qc, gc)
    for variant in (np.asarray(d * 1000, dtype=np.int32), d.astype(np.float16), np.asfortranarray(d)):
        r = evaluate_ranking(variant, qp, gp, qc, gc)
        ref = reference_ranking(np.asarray(variant, dtype=np.float64), qp, gp, qc, gc)
        assert (r.mAP, r.mINP) == pytest.approx(ref[1:3], abs=1e-12)
    assert evaluate_ranking(d, qp, gp, qc, gc).mAP == pytest.approx(expected[1], abs=1e-12)


def test_bad_inputs_raise_input_errors():
    d = np.zeros((2, 3))
    ids = ([1, 2], [1, 2, 2], [0, 0], [1, 1, 1])
    with pytest.raises(InputError, match="g_pids has 3 entries but the distance matrix needs 4"):
        evaluate_ranking(np.zeros((2, 4)), *ids)
    with pytest.raises(InputError, match="`ap` must be one of standard, trapezoid"):
        evaluate_ranking(d, *ids, ap="matlab")
    with pytest.raises(InputError, match="max_rank"):
        evaluate_ranking(d, *ids, max_rank=0)
    with pytest.raises(InputError, match="2-D"):
        evaluate_ranking(np.zeros(3), *ids)
    with pytest.raises(InputError, match="integer labels"):
        evaluate_ranking(d, [1.5, 2], [1, 2, 2], [0, 0], [1, 1, 1])
    bad = d.copy()
    bad[1, 2] = np.nan
    with pytest.raises(InputError, match="NaN .*query row 1"):
        evaluate_ranking(bad, *ids)
    with pytest.raises(InputError, match="ranking method"):
        evaluate_ranking(d, *ids, method="quick")


def test_order_keys_preserve_float_order():
    v = np.array([-np.inf, -3.5, -1e-30, -0.0, 0.0, 1e-30, 1.0, 2.5, np.inf], dtype=np.float32)
    k = float32_order_keys(v)
    assert (np.diff(k.astype(np.int64)) >= 0).all()
    assert k[3] == k[4]  # -0.0 == +0.0
    assert (np.diff(k.astype(np.int64))[[0, 1, 2, 4, 5, 6, 7]] > 0).all()


# ----------------------------------------------------------------------------- features


def exact_features(rng, n, dim=16):
    """Unit vectors with four entries of +-1/2: every dot product (and 1 - dot) is exact in float32."""
    x = np.zeros((n, dim), dtype=np.float32)
    for row in x:
        row[rng.choice(dim, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
    return x


def test_evaluate_features_equals_evaluate_ranking_exactly():
    rng = np.random.default_rng(0)
    q, g = exact_features(rng, 40), exact_features(rng, 150)
    qp, gp = rng.integers(1, 12, 40), rng.integers(-1, 12, 150)
    qc, gc = rng.integers(0, 3, 40), rng.integers(0, 3, 150)
    explicit = 1.0 - q.astype(np.float64) @ g.T.astype(np.float64)  # exact: the values are multiples of 1/4
    np.testing.assert_array_equal(cosine_distance(q, g, block_size=7), explicit.astype(np.float32))
    want = evaluate_ranking(explicit, qp, gp, qc, gc, max_rank=20)
    ref = reference_ranking(explicit, qp, gp, qc, gc, 20)
    assert want.mAP == pytest.approx(ref[1], abs=1e-12)
    for block_size in (None, 1, 7, 40):
        got = evaluate_features(q, g, qp, gp, qc, gc, max_rank=20, block_size=block_size)
        np.testing.assert_array_equal(got.cmc, want.cmc)
        assert (got.mAP, got.mINP, got.num_valid_queries) == (want.mAP, want.mINP, want.num_valid_queries)


def test_evaluate_features_normalises_and_matches_cosine_distance():
    rng = np.random.default_rng(1)
    q, g = rng.standard_normal((25, 32)), rng.standard_normal((90, 32))
    qp, gp = rng.integers(1, 9, 25), rng.integers(0, 9, 90)
    qc, gc = rng.integers(0, 4, 25), rng.integers(0, 4, 90)
    r = evaluate_features(3.0 * q, g, qp, gp, qc, gc, block_size=4)
    want = evaluate_ranking(cosine_distance(q, g), qp, gp, qc, gc)
    np.testing.assert_array_equal(r.cmc, want.cmc)
    assert r.mAP == pytest.approx(want.mAP, abs=1e-9)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    ref = reference_ranking(1 - qn @ gn.T, qp, gp, qc, gc)
    assert r.mAP == pytest.approx(ref[1], abs=1e-9)


def test_evaluate_features_rejects_bad_features():
    ids = ([1], [1, 1], [0], [1, 2])
    with pytest.raises(InputError, match="dims"):
        evaluate_features(np.ones((1, 4)), np.ones((2, 5)), *ids)
    with pytest.raises(InputError, match="all zeros"):
        evaluate_features(np.zeros((1, 4)), np.ones((2, 4)), *ids)
    with pytest.raises(InputError, match="NaN or infinite"):
        evaluate_features(np.full((1, 4), np.nan), np.ones((2, 4)), *ids)


# ----------------------------------------------------------------------------- CUHK03 classic


def reference_classic(d, q_pids, g_pids, q_cams, g_cams, max_rank, repeats, seed):
    """Loop version of the documented draw: per repeat u = rng.random((nq, num_ids)), one item per identity."""
    ids = np.unique(g_pids[g_pids != -1])
    rng = np.random.default_rng(seed)
    total, valid = np.zeros(max_rank), set()
    for _ in range(repeats):
        u = rng.random((len(q_pids), len(ids)))
        for i in range(len(q_pids)):
            picked = []
            for p_index, pid in enumerate(ids):
                items = np.flatnonzero((g_pids == pid) & ((g_pids != q_pids[i]) | (g_cams != q_cams[i])))
                if items.size == 0:
                    if pid == q_pids[i]:
                        break
                    continue
                picked.append(items[min(int(u[i, p_index] * items.size), items.size - 1)])
            else:
                if q_pids[i] not in ids:
                    continue
                picked = np.array(picked)
                order = picked[np.argsort(d[i, picked], kind="stable")]
                rank = int(np.flatnonzero(g_pids[order] == q_pids[i])[0])
                cmc = np.zeros(max_rank)
                cmc[min(rank, max_rank):] = 1.0
                total += cmc
                valid.add(i)
    return total / (len(valid) * repeats)


def classic_case(seed):
    rng = np.random.default_rng(seed)
    ids = np.arange(1, 13)
    pids = np.repeat(ids, 4)
    cams = np.tile([1, 1, 2, 2], ids.size)  # two views per identity, as CUHK03
    feats = rng.standard_normal((13, 6))[pids] * 0.7 + rng.standard_normal((pids.size, 6))
    d = np.round(((feats[:, None] - feats[None]) ** 2).sum(-1), 1)  # query = gallery, with ties
    return d, pids, pids, cams, cams


def test_classic_equals_loop_reference_and_is_seeded():
    d, qp, gp, qc, gc = classic_case(0)
    r = evaluate_cuhk03_classic(d, qp, gp, qc, gc, max_rank=20, repeats=5, seed=3)
    np.testing.assert_allclose(r.cmc, reference_classic(d, qp, gp, qc, gc, 20, 5, 3), atol=1e-12)
    assert r.cmc.shape == (20,) and r.cmc[11:].min() == 1.0  # 12 identities: saturated from rank 12 on
    again = evaluate_cuhk03_classic(d, qp, gp, qc, gc, max_rank=20, repeats=5, seed=3)
    np.testing.assert_array_equal(again.cmc, r.cmc)
    other = evaluate_cuhk03_classic(d, qp, gp, qc, gc, max_rank=20, repeats=5, seed=4)
    assert not np.array_equal(other.cmc, r.cmc)
    full = evaluate_ranking(d, qp, gp, qc, gc, max_rank=20)
    assert (r.mAP, r.mINP) == (full.mAP, full.mINP)  # AP over all valid items, as torchreid
    info = r.to_dict()
    assert (info["seed"], info["repeats"], info["protocol"]) == (3, 5, "cuhk03-classic")
    assert r.cmc[0] >= full.cmc[0]  # one item per identity can only make rank-1 easier


def test_classic_with_junk_missing_ids_and_blocks(monkeypatch):
    d, qp, gp, qc, gc = classic_case(1)
    gp = gp.copy()
    gp[[0, 5]] = -1  # junk items are never drawn
    qp = qp.copy()
    qp[7] = 99  # a query whose identity is not in the gallery
    import reid.evaluation.cuhk03 as classic

    monkeypatch.setattr(classic, "_DRAW_BLOCK", 30)  # a few queries per sampling block
    r = evaluate_cuhk03_classic(d, qp, gp, qc, gc, max_rank=15, repeats=3, seed=0)
    np.testing.assert_allclose(r.cmc, reference_classic(d, qp, gp, qc, gc, 15, 3, 0), atol=1e-12)
    assert r.num_valid_queries < r.num_queries
    with pytest.raises(InputError, match="repeats"):
        evaluate_cuhk03_classic(d, qp, gp, qc, gc, repeats=0)
