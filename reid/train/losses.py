"""Re-id training losses: label-smoothed cross-entropy, batch-hard triplet, attention entropy."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def cross_entropy_label_smooth(logits: torch.Tensor, targets: torch.Tensor, epsilon: float = 0.1) -> torch.Tensor:
    """Cross-entropy against ``(1 - eps) * one_hot + eps / C`` (Szegedy et al. 2016), batch mean."""
    log_probs = F.log_softmax(logits.float(), dim=1)
    nll = -log_probs.gather(1, targets.long().unsqueeze(1)).squeeze(1)
    uniform = -log_probs.mean(dim=1)
    return ((1.0 - epsilon) * nll + epsilon * uniform).mean()


def pairwise_euclidean(x: torch.Tensor) -> torch.Tensor:
    """[B, D] -> [B, B] Euclidean distances (clamped before the square root so gradients stay finite)."""
    x = x.float()
    sq = (x * x).sum(dim=1)
    d2 = sq.unsqueeze(0) + sq.unsqueeze(1) - 2.0 * (x @ x.t())
    return d2.clamp_min(1e-12).sqrt()


def batch_hard_triplet(
    features: torch.Tensor, labels: torch.Tensor, margin: float = 0.3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-hard triplet loss (Hermans et al. 2017) on Euclidean distances.

    For each anchor: the farthest same-identity sample and the closest other-identity one;
    loss = mean(relu(d_ap - d_an + margin)). Returns (loss, share of anchors with d_an > d_ap).
    Anchors without any positive (other than themselves) or any negative are left out.
    """
    dist = pairwise_euclidean(features)
    labels = labels.view(-1)
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    pos_mask = same & ~eye
    neg_mask = ~same
    valid = pos_mask.any(dim=1) & neg_mask.any(dim=1)
    if not bool(valid.any()):
        zero = features.float().sum() * 0.0
        return zero, zero.detach()
    d_ap = dist.masked_fill(~pos_mask, float("-inf")).max(dim=1).values[valid]
    d_an = dist.masked_fill(~neg_mask, float("inf")).min(dim=1).values[valid]
    loss = F.relu(d_ap - d_an + margin).mean()
    accuracy = (d_an > d_ap).float().mean().detach()
    return loss, accuracy


def attention_entropy(attention: torch.Tensor) -> torch.Tensor:
    """Mean entropy of attention maps [B, K, Gh, Gw] (each summing to 1), divided by log(Gh*Gw).

    0 = all mass on one location, 1 = uniform. Adding it to the loss makes glimpses focus.
    """
    a = attention.float().flatten(2)
    n = a.shape[-1]
    if n <= 1:
        return a.sum() * 0.0
    ent = -(a * a.clamp_min(1e-12).log()).sum(dim=-1)
    return ent.mean() / math.log(n)


@dataclass(frozen=True)
class LossWeights:
    """Weights and settings of the combined re-id loss."""

    ce: float = 1.0
    triplet: float = 1.0
    margin: float = 0.3
    label_smoothing: float = 0.1
    attention_entropy: float = 0.0


def reid_loss(
    features: torch.Tensor,
    logits: torch.Tensor | None,
    attention: torch.Tensor | None,
    labels: torch.Tensor,
    weights: LossWeights = LossWeights(),
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of the three terms; returns (loss to back-propagate, detached parts as floats)."""
    parts: dict[str, float] = {}
    total = features.float().sum() * 0.0
    if logits is not None and weights.ce > 0:
        ce = cross_entropy_label_smooth(logits, labels, weights.label_smoothing)
        total = total + weights.ce * ce
        parts["ce"] = float(ce.detach())
        parts["acc"] = float((logits.detach().argmax(dim=1) == labels).float().mean())
    if weights.triplet > 0:
        tri, tri_acc = batch_hard_triplet(features, labels, weights.margin)
        total = total + weights.triplet * tri
        parts["triplet"] = float(tri.detach())
        parts["triplet_acc"] = float(tri_acc)
    if attention is not None and weights.attention_entropy > 0:
        ent = attention_entropy(attention)
        total = total + weights.attention_entropy * ent
        parts["attention_entropy"] = float(ent.detach())
    parts["loss"] = float(total.detach())
    return total, parts
