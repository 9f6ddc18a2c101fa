"""Sampler, transforms and losses of reid.train, checked against brute force and closed forms."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest
import torch

from reid.errors import DatasetError, InputError
from reid.train.losses import (
    LossWeights,
    attention_entropy,
    batch_hard_triplet,
    cross_entropy_label_smooth,
    pairwise_euclidean,
    reid_loss,
)
from reid.train.sampler import PKSampler, relabel_pids
from reid.train.transforms import erase_box, pad_crop, random_erasing, random_flip

# --- sampler ---------------------------------------------------------------------------------


def test_relabel_pids_is_contiguous_and_sorted():
    labels, pids = relabel_pids([7, 3, 7, 1500, 3])
    assert pids == [3, 7, 1500]
    assert labels.tolist() == [1, 0, 1, 2, 0]
    with pytest.raises(DatasetError, match="no training images"):
        relabel_pids([])


def _labels_uneven():
    # 10 identities with 1..10 images each (identity 0 has fewer than K images).
    return [lab for lab in range(10) for _ in range(lab + 1)]


@pytest.mark.parametrize("p,k", [(4, 4), (3, 2), (10, 3)])
def test_every_batch_is_p_identities_times_k(p, k):
    labels = np.array(_labels_uneven())
    sampler = PKSampler(labels, p, k, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) > 0
    for batch in batches:
        assert len(batch) == p * k
        counts = Counter(int(labels[i]) for i, _ in batch)
        assert len(counts) == p and set(counts.values()) == {k}
        # Distinct images within an identity whenever it has at least K of them.
        for lab in counts:
            idx = [i for i, _ in batch if labels[i] == lab]
            if (labels == lab).sum() >= k:
                assert len(set(idx)) == k


def test_epoch_covers_images_and_small_ids_get_replacement():
    labels = np.array(_labels_uneven())
    sampler = PKSampler(labels, 2, 4, seed=0)
    seen = Counter(i for b in sampler for i, _ in b)
    # Identities with >= 4 images contribute floor(n/4)*4 distinct images, never one twice.
    assert max(seen.values()) <= 4
    small = [i for i in seen if labels[i] < 3]  # identities 0..2 have 1..3 images
    assert all(labels[i] < 3 for i in small)
    assert any(seen[i] > 1 for i in small)


def test_plan_depends_only_on_seed_and_epoch():
    labels = _labels_uneven()
    a, b = PKSampler(labels, 3, 2, seed=5), PKSampler(labels, 3, 2, seed=5)
    a.set_epoch(3)
    b.load_state_dict({"epoch": 3, "seed": 5, "p": 3, "k": 2})
    assert list(a) == list(b)
    b.set_epoch(4)
    assert list(a) != list(b)
    assert list(PKSampler(labels, 3, 2, seed=6)) != list(PKSampler(labels, 3, 2, seed=5))
    seeds = [s for batch in a for _, s in batch]
    assert len(set(seeds)) > 0.9 * len(seeds)


def test_sampler_errors():
    with pytest.raises(InputError, match="P=11 identities.*has 10; lower `batch_p`"):
        PKSampler(_labels_uneven(), 11, 2)
    with pytest.raises(InputError, match="at least 1"):
        PKSampler(_labels_uneven(), 0, 2)
    with pytest.raises(InputError, match="seed"):
        PKSampler(_labels_uneven(), 2, 2, seed=1).load_state_dict({"epoch": 0, "seed": 2, "p": 2, "k": 2})


# --- transforms ------------------------------------------------------------------------------


def _image(h=32, w=16):
    return np.random.default_rng(0).random((3, h, w), dtype=np.float32)


def test_flip_mirrors_or_keeps():
    img = _image()
    outs = [random_flip(img, np.random.default_rng(s)) for s in range(20)]
    flipped = [o for o in outs if not np.array_equal(o, img)]
    assert 0 < len(flipped) < 20
    for o in flipped:
        np.testing.assert_array_equal(o, img[:, :, ::-1])
    np.testing.assert_array_equal(random_flip(img, np.random.default_rng(0), p=0.0), img)


def test_pad_crop_is_a_shifted_window():
    img = _image()
    for s in range(20):
        out = pad_crop(img, np.random.default_rng(s), pad=3)
        assert out.shape == img.shape and out.dtype == np.float32
        # The output equals the zero-padded image at one of the (2*pad+1)^2 offsets.
        padded = np.pad(img, ((0, 0), (3, 3), (3, 3)))
        hits = [
            (t, left)
            for t, left in itertools.product(range(7), range(7))
            if np.array_equal(padded[:, t : t + 32, left : left + 16], out)
        ]
        assert hits
    assert pad_crop(img, np.random.default_rng(0), pad=0) is img


def test_erase_box_inside_bounds_and_area():
    rng = np.random.default_rng(0)
    for _ in range(500):
        box = erase_box(32, 16, rng)
        assert box is not None
        top, left, eh, ew = box
        assert top >= 0 and top + eh <= 32 and left >= 0 and left + ew <= 16
        assert 0 < eh < 32 and 0 < ew < 16
        assert eh * ew <= 0.4 * 32 * 16 * 1.5  # rounding slack on a small image


def test_random_erasing_changes_only_one_rectangle():
    img = _image()
    changed_any = False
    for s in range(30):
        out = random_erasing(img, np.random.default_rng(s), p=1.0)
        assert out.shape == img.shape and out.dtype == np.float32
        assert out.min() >= 0.0 and out.max() <= 1.0
        diff = np.any(out != img, axis=0)
        if diff.any():
            changed_any = True
            rows, cols = np.flatnonzero(diff.any(1)), np.flatnonzero(diff.any(0))
            # Every changed pixel lies inside the bounding box of the changes, which is small.
            assert diff.sum() <= (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
            assert (rows[-1] - rows[0] + 1) < 32 and (cols[-1] - cols[0] + 1) < 16
    assert changed_any
    np.testing.assert_array_equal(random_erasing(img, np.random.default_rng(0), p=0.0), img)
    assert not np.shares_memory(random_erasing(img, np.random.default_rng(1), p=1.0), img)


# --- losses ----------------------------------------------------------------------------------


def test_label_smoothing_matches_closed_form():
    torch.manual_seed(0)
    logits, targets = torch.randn(6, 5), torch.tensor([0, 4, 2, 2, 1, 3])
    eps = 0.1
    q = torch.full((6, 5), eps / 5)
    q[torch.arange(6), targets] += 1 - eps
    expected = -(q * torch.log_softmax(logits, 1)).sum(1).mean()
    assert torch.allclose(cross_entropy_label_smooth(logits, targets, eps), expected, atol=1e-6)
    assert torch.allclose(
        cross_entropy_label_smooth(logits, targets, 0.0), torch.nn.functional.cross_entropy(logits, targets)
    )
    assert torch.allclose(
        cross_entropy_label_smooth(logits, targets, eps),
        torch.nn.functional.cross_entropy(logits, targets, label_smoothing=eps),
        atol=1e-6,
    )


def test_pairwise_euclidean_matches_cdist():
    x = torch.randn(7, 4, dtype=torch.float64)
    d = pairwise_euclidean(x)
    ref = torch.cdist(x.float(), x.float())
    assert torch.allclose(d.diagonal(), torch.full((7,), 1e-6), atol=1e-5)
    off = ~torch.eye(7, dtype=torch.bool)
    assert torch.allclose(d[off], ref[off], atol=1e-5)


def _triplet_brute_force(x, labels, margin):
    n, losses, correct = len(labels), [], 0
    for a in range(n):
        pos = [float(torch.dist(x[a], x[j])) for j in range(n) if j != a and labels[j] == labels[a]]
        neg = [float(torch.dist(x[a], x[j])) for j in range(n) if labels[j] != labels[a]]
        if not pos or not neg:
            continue
        losses.append(max(0.0, max(pos) - min(neg) + margin))
        correct += min(neg) > max(pos)
    return sum(losses) / len(losses), correct / len(losses)


def test_batch_hard_triplet_matches_brute_force():
    torch.manual_seed(1)
    x = torch.randn(12, 8)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 5])  # identity 5 has no positive
    loss, acc = batch_hard_triplet(x, labels, margin=0.3)
    ref_loss, ref_acc = _triplet_brute_force(x, labels.tolist(), 0.3)
    assert math.isclose(float(loss), ref_loss, rel_tol=1e-5)
    assert math.isclose(float(acc), ref_acc, rel_tol=1e-6)
    # Well separated clusters: zero loss, full accuracy, and finite gradients.
    centers = torch.eye(4) * 10
    y = centers[torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])] + 0.01 * torch.randn(8, 4)
    y.requires_grad_(True)
    loss, acc = batch_hard_triplet(y, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(acc) == 1.0 and torch.isfinite(y.grad).all()


def test_triplet_without_pairs_is_zero_with_gradient():
    x = torch.randn(3, 4, requires_grad=True)
    loss, _ = batch_hard_triplet(x, torch.tensor([0, 1, 2]))
    loss.backward()
    assert float(loss.detach()) == 0.0 and x.grad is not None


def test_attention_entropy_bounds():
    uniform = torch.full((2, 3, 4, 2), 1 / 8)
    assert math.isclose(float(attention_entropy(uniform)), 1.0, rel_tol=1e-6)
    peaked = torch.zeros(2, 3, 4, 2)
    peaked[..., 0, 0] = 1.0
    assert float(attention_entropy(peaked)) < 1e-6
    half = torch.zeros(1, 1, 4, 2)
    half[0, 0, 0, :] = 0.5
    assert math.isclose(float(attention_entropy(half)), math.log(2) / math.log(8), rel_tol=1e-6)


def test_reid_loss_sums_weighted_parts():
    torch.manual_seed(2)
    feats, logits = torch.randn(8, 6), torch.randn(8, 4)
    att = torch.softmax(torch.randn(8, 2, 12), -1).view(8, 2, 4, 3)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    w = LossWeights(ce=0.5, triplet=2.0, attention_entropy=0.1)
    total, parts = reid_loss(feats, logits, att, labels, w)
    expected = (
        0.5 * cross_entropy_label_smooth(logits, labels)
        + 2.0 * batch_hard_triplet(feats, labels)[0]
        + 0.1 * attention_entropy(att)
    )
    assert math.isclose(float(total), float(expected), rel_tol=1e-6)
    assert set(parts) == {"ce", "acc", "triplet", "triplet_acc", "attention_entropy", "loss"}
    total, parts = reid_loss(feats, None, None, labels)
    assert "ce" not in parts and math.isclose(float(total), parts["triplet"], rel_tol=1e-6)


def test_train_transform_shape_range_and_seed():
    from reid.train.transforms import TrainTransform

    img = np.random.default_rng(0).integers(0, 256, size=(97, 41, 3), dtype=np.uint8)
    t = TrainTransform(size=(64, 32))
    a = t(img, np.random.default_rng(7))
    b = t(img, np.random.default_rng(7))
    assert a.shape == (3, 64, 32) and a.dtype == np.float32
    assert a.min() >= 0.0 and a.max() <= 1.0
    np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, t(img, np.random.default_rng(s))) for s in range(8))
    assert TrainTransform(size=(256, 128)).pad_pixels == 10 and t.pad_pixels == 2


# --- schedule --------------------------------------------------------------------------------


def test_lr_schedule_warmup_cosine_step():
    from reid.train.schedule import lr_factor

    kw = dict(epochs=10, warmup_epochs=2, warmup_factor=0.1)
    assert math.isclose(lr_factor(0.0, **kw), 0.1)
    assert math.isclose(lr_factor(1.0, **kw), 0.55)
    assert math.isclose(lr_factor(2.0, **kw), 1.0)
    assert math.isclose(lr_factor(6.0, **kw), 0.01 + 0.99 * 0.5)  # half-way through the cosine
    assert math.isclose(lr_factor(10.0, **kw), 0.01)
    step = dict(kw, schedule="step", milestones=(4, 8))
    assert [lr_factor(e, **step) for e in (3.9, 4.0, 7.9, 8.0)] == pytest.approx([1.0, 0.1, 0.1, 0.01])
    assert lr_factor(5.0, epochs=10, schedule="constant") == 1.0
    with pytest.raises(InputError, match="unknown schedule"):
        lr_factor(0.0, epochs=1, schedule="linear")


def test_warm_up_is_bounded_to_a_tenth_of_the_run():
    from reid.train import TrainConfig

    assert TrainConfig(epochs=60).warmup == 5.0  # long runs: as configured
    assert TrainConfig(epochs=8).warmup == pytest.approx(0.8)  # short runs: a tenth, not 5 of 8 epochs
    assert TrainConfig(epochs=8, warmup_max_fraction=1.0).warmup == 5.0
    assert TrainConfig(epochs=8, warmup_epochs=0).warmup == 0.0
    with pytest.raises(InputError, match="warmup_max_fraction"):
        TrainConfig(warmup_max_fraction=1.5)
