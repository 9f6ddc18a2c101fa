"""reid.evaluation.rerank against a dense re-implementation of the authors' published re_ranking code."""

from __future__ import annotations

import numpy as np
import pytest

import reid.evaluation.rerank as rerank_mod
from reid.errors import InputError
from reid.evaluation.rerank import _expanded_weights, _neighbours, re_rank


def reference_re_ranking(q, g, k1, k2, lambda_value):
    """zhunzhong07/person-re-ranking ``re_ranking`` (python version), structure and loops kept.

    Changes: float64 throughout instead of float16 for V / Jaccard; features L2-normalised first (our
    features always are). Returns (final distance, V before query expansion, expansion count).
    """
    feat = np.concatenate([q, g]).astype(np.float64)
    feat /= np.linalg.norm(feat, axis=1, keepdims=True)
    query_num, all_num = q.shape[0], feat.shape[0]
    sq = (feat**2).sum(axis=1)
    original_dist = sq[:, None] + sq[None, :] - 2 * feat @ feat.T
    gallery_num = original_dist.shape[0]
    original_dist = np.transpose(original_dist / np.max(original_dist, axis=0))
    V = np.zeros_like(original_dist)
    initial_rank = np.argsort(original_dist).astype(np.int32)
    expansions = 0
    for i in range(all_num):
        forward_k_neigh_index = initial_rank[i, : k1 + 1]
        backward_k_neigh_index = initial_rank[forward_k_neigh_index, : k1 + 1]
        fi = np.where(backward_k_neigh_index == i)[0]
        k_reciprocal_index = forward_k_neigh_index[fi]
        k_reciprocal_expansion_index = k_reciprocal_index
        for j in range(len(k_reciprocal_index)):
            candidate = k_reciprocal_index[j]
            candidate_forward_k_neigh_index = initial_rank[candidate, : int(np.around(k1 / 2)) + 1]
            candidate_backward_k_neigh_index = initial_rank[
                candidate_forward_k_neigh_index, : int(np.around(k1 / 2)) + 1
            ]
            fi_candidate = np.where(candidate_backward_k_neigh_index == candidate)[0]
            candidate_k_reciprocal_index = candidate_forward_k_neigh_index[fi_candidate]
            if len(np.intersect1d(candidate_k_reciprocal_index, k_reciprocal_index)) > 2 / 3 * len(
                candidate_k_reciprocal_index
            ):
                k_reciprocal_expansion_index = np.append(k_reciprocal_expansion_index, candidate_k_reciprocal_index)
        before = len(np.unique(k_reciprocal_index))
        k_reciprocal_expansion_index = np.unique(k_reciprocal_expansion_index)
        expansions += len(k_reciprocal_expansion_index) > before
        weight = np.exp(-original_dist[i, k_reciprocal_expansion_index])
        V[i, k_reciprocal_expansion_index] = weight / np.sum(weight)
    V_before_qe = V.copy()
    original_dist = original_dist[:query_num,]
    if k2 != 1:
        V_qe = np.zeros_like(V)
        for i in range(all_num):
            V_qe[i, :] = np.mean(V[initial_rank[i, :k2], :], axis=0)
        V = V_qe
    invIndex = []
    for i in range(gallery_num):
        invIndex.append(np.where(V[:, i] != 0)[0])
    jaccard_dist = np.zeros_like(original_dist)
    for i in range(query_num):
        temp_min = np.zeros(shape=[1, gallery_num])
        indNonZero = np.where(V[i, :] != 0)[0]
        indImages = [invIndex[ind] for ind in indNonZero]
        for j in range(len(indNonZero)):
            temp_min[0, indImages[j]] = temp_min[0, indImages[j]] + np.minimum(
                V[i, indNonZero[j]], V[indImages[j], indNonZero[j]]
            )
        jaccard_dist[i] = 1 - temp_min / (2 - temp_min)
    final_dist = jaccard_dist * (1 - lambda_value) + original_dist * lambda_value
    return final_dist[:query_num, query_num:], V_before_qe, expansions


def clustered(seed, nq, ng, dim=16, ids=12, spread=0.8):
    """Features with identity structure, so that reciprocal sets and their expansion are non-trivial."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((ids, dim))
    q = centres[rng.integers(0, ids, nq)] + spread * rng.standard_normal((nq, dim))
    g = centres[rng.integers(0, ids, ng)] + spread * rng.standard_normal((ng, dim))
    return q.astype(np.float32), g.astype(np.float32)


@pytest.mark.parametrize(
    "seed, nq, ng, k1, k2, lam",
    [
        (0, 15, 45, 6, 3, 0.3),
        (1, 20, 70, 20, 6, 0.3),  # the defaults: k1 + 1 covers a third of the items
        (2, 10, 50, 5, 1, 0.3),  # round(5 / 2) = 2 (numpy rounds half to even); no query expansion
        (3, 12, 40, 7, 4, 0.0),  # Jaccard only
        (4, 8, 30, 4, 2, 1.0),  # original distance only
        (5, 3, 4, 20, 6, 0.5),  # fewer items than k1 + 1
    ],
)
def test_equals_dense_reference(seed, nq, ng, k1, k2, lam):
    q, g = clustered(seed, nq, ng)
    want, _, _ = reference_re_ranking(q, g, k1, k2, lam)
    got = re_rank(q, g, k1=k1, k2=k2, lambda_value=lam)
    assert got.dtype == np.float32 and got.shape == (nq, ng)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_expanded_weights_equal_the_reference_v():
    q, g = clustered(6, 20, 60)
    k1 = 6
    _, v_want, expansions = reference_re_ranking(q, g, k1, 3, 0.3)
    assert expansions > 0  # the 2/3 rule fired for some items
    x = np.concatenate([q, g])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    knn, row_max, _ = _neighbours(x, 20, k1 + 1)
    v = _expanded_weights(x, knn, row_max, k1 + 1, int(np.around(k1 / 2)) + 1)
    np.testing.assert_allclose(v.toarray(), v_want, rtol=1e-5, atol=1e-6)


def test_blocks_and_chunks_do_not_change_the_result(monkeypatch):
    q, g = clustered(7, 30, 120, dim=8)
    whole = re_rank(q, g, k1=8, k2=3)
    monkeypatch.setattr(rerank_mod, "BLOCK_ELEMENTS", 150 * 7)  # 7 rows of similarities at a time
    monkeypatch.setattr(rerank_mod, "TRIPLE_CHUNK", 500)  # many Jaccard chunks
    # BLAS rounds a block's products differently with its shape (a few ulps), so equal up to that.
    np.testing.assert_allclose(re_rank(q, g, k1=8, k2=3), whole, rtol=1e-6, atol=1e-6)
    want, _, _ = reference_re_ranking(q, g, 8, 3, 0.3)
    np.testing.assert_allclose(whole, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_rows", [7, 50, 600])
def test_neighbours_equal_a_stable_sort_with_ties(monkeypatch, block_rows):
    """Exact features (entries +-1/2, four per row): every similarity is exact, and ties abound."""
    rng = np.random.default_rng(8)
    n, nq, k = 600, 90, 21
    x = np.zeros((n, 16), dtype=np.float32)
    for row in x:
        row[rng.choice(16, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
    monkeypatch.setattr(rerank_mod, "BLOCK_ELEMENTS", n * block_rows)
    knn, row_max, qg = _neighbours(x, nq, k)
    sim = x.astype(np.float64) @ x.T.astype(np.float64)
    np.testing.assert_array_equal(knn, np.argsort(-sim, axis=1, kind="stable")[:, :k])
    np.testing.assert_array_equal(row_max, 2.0 - 2.0 * sim.min(axis=1))
    np.testing.assert_array_equal(qg, sim[:nq, nq:])


def test_medium_size_uses_the_shortcut_and_still_matches():
    q, g = clustered(9, 60, 640, dim=24, ids=60, spread=0.6)
    want, _, _ = reference_re_ranking(q, g, 20, 6, 0.3)
    np.testing.assert_allclose(re_rank(q, g), want, rtol=1e-5, atol=1e-5)


def test_re_ranking_helps_on_clustered_data():
    from reid.evaluation import evaluate_ranking, cosine_distance

    rng = np.random.default_rng(10)
    ids = np.arange(1, 31)
    centres = rng.standard_normal((31, 32))
    g_pids = np.repeat(ids, 8)
    q_pids = ids
    g = centres[g_pids] + 1.1 * rng.standard_normal((g_pids.size, 32))
    q = centres[q_pids] + 1.1 * rng.standard_normal((q_pids.size, 32))
    cams = (np.zeros(q_pids.size, int), np.ones(g_pids.size, int))
    before = evaluate_ranking(cosine_distance(q, g), q_pids, g_pids, *cams)
    after = evaluate_ranking(re_rank(q, g), q_pids, g_pids, *cams)
    assert after.mAP > before.mAP + 0.02


def test_bad_arguments():
    q, g = clustered(0, 3, 5)
    with pytest.raises(InputError, match="k1"):
        re_rank(q, g, k1=0)
    with pytest.raises(InputError, match="lambda_value"):
        re_rank(q, g, lambda_value=1.5)
    with pytest.raises(InputError, match="dims"):
        re_rank(q, g[:, :4])
    assert re_rank(q[:0], g).shape == (0, 5)


@pytest.mark.parametrize("k1, k2", [(6, 3), (8, 1)])
def test_jaccard_distances_equal_the_reference_encoding(k1, k2):
    """Every item against every other: rows of the first part against the second are the reference's
    query x gallery Jaccard distances (lambda 0) over the same items."""
    from reid.evaluation.rerank import jaccard_distances

    q, g = clustered(9, 14, 36)
    got = jaccard_distances(np.concatenate([q, g]), k1=k1, k2=k2)
    want, _, _ = reference_re_ranking(q, g, k1, k2, 0.0)
    assert got.shape == (50, 50) and got.dtype == np.float32
    np.testing.assert_allclose(got[:14, 14:], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, got.T, atol=1e-5)
