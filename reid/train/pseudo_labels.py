"""Pseudo-identities for unlabeled crops, re-estimated every epoch of ``reid adapt``.

Cluster contrast (Dai et al. 2021): k-reciprocal Jaccard distances between the current embeddings
(Zhong et al. 2017, the same encoding as re-ranking), density clustering with DBSCAN (scikit-learn),
outliers left out of the epoch. Crops known to show one person (one tracklet) are must-links, enforced
after clustering by a vote: every crop of a tracklet joins the cluster most of its clustered crops fell
in (a tracklet none of whose crops was clustered is a cluster of its own). Setting their distances to 0
before DBSCAN instead made every tracklet a dense core through which neighbouring tracklets chained:
on an index of 116 tracklets of a few dozen people it left 10-13 clusters for 1,285 crops.
A ``ProxyMemory`` keeps one momentum-updated proxy per cluster,
or per (cluster, camera) when cameras are known (camera-aware proxies, Wang et al. 2021), and scores
a batch against all of them with a multi-positive InfoNCE loss.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from reid.errors import InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Clusters:
    """One epoch's pseudo-labels: ``labels[i]`` is a cluster id in 0..num_clusters-1, or -1 (outlier)."""

    labels: np.ndarray
    eps: float = 0.0  # the DBSCAN radius used

    @property
    def num_clusters(self) -> int:
        """Clusters found (outliers excluded)."""
        return int(self.labels.max()) + 1 if self.labels.size and self.labels.max() >= 0 else 0

    @property
    def num_outliers(self) -> int:
        """Crops left out of this epoch."""
        return int((self.labels < 0).sum())

    @property
    def largest(self) -> int:
        """Crops in the largest cluster (0 without clusters)."""
        return int(np.bincount(self.labels[self.labels >= 0]).max()) if self.num_clusters else 0


RHO = 1.6e-3  # share of the closest pairs whose mean distance is the automatic DBSCAN radius


def auto_eps(dist: np.ndarray, rho: float = RHO) -> float:
    """The mean of the smallest ``rho`` share of the pairwise distances (Song et al. 2018, "Unsupervised
    domain adaptive re-identification: theory and practice"), and of at least as many pairs as crops: a
    radius that follows the distances' scale.

    Measured with the shipped head on a held-out synthetic Market world (1,208 crops of 100 people): the
    fixed radius 0.6 of Cluster Contrast's Market setting merged nearly everyone (adjusted Rand index 0.00
    over the clustered crops), this rule (radius 0.34) gave 0.42 with 83% outliers; on a 322-crop synthetic
    gallery 0.6 made one cluster, this rule 3 (ARI 0.60, 96% outliers); on well-separated toy blobs, whose
    within-identity distances are all ~0, it is too tight. Not the default: neither radius suits small
    galleries yet.
    """
    n = len(dist)
    upper = dist[np.triu_indices(n, 1)]
    m = min(upper.size, max(n, int(round(rho * upper.size))))  # at least one pair per crop in small galleries
    return float(np.partition(upper, m - 1)[:m].mean())


def centre_cameras(features: np.ndarray, cameras: np.ndarray) -> np.ndarray:
    """``features`` [N, D] with each camera's mean feature taken away, rows L2-normalised again.

    What a camera adds to every crop it sees (its light, colour cast, background, viewpoint) is in its
    mean; with that taken away, a crop's neighbours are found across cameras, not only among its own
    camera's crops. On a
    synthetic selection world (seed 23: 334 crops of 40 people in 6 camera styles, shipped head) the
    nearest crop in another camera is the same person for 88% of crops (85% before), and DBSCAN at radius
    0.5, k1 10, 2 samples makes clusters whose same-cluster pairs are 65% right and catch 74% of each
    person's pairs, against 48% / 46% on the raw features.
    """
    out = np.asarray(features, np.float32).copy()
    cameras = np.asarray(cameras)
    for c in np.unique(cameras):
        rows = cameras == c
        if rows.sum() > 1:  # a camera's only crop would be all mean
            out[rows] -= out[rows].mean(axis=0)
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def cluster_features(features: np.ndarray, *, eps: float | None = 0.6, rho: float = RHO, min_samples: int = 4,
                     k1: int = 30, k2: int = 6, tracklets: np.ndarray | None = None,
                     cameras: np.ndarray | None = None) -> Clusters:
    """DBSCAN over k-reciprocal Jaccard distances of L2-normalised ``features`` [N, D].

    ``eps``: the DBSCAN radius; None picks it from the distances (``auto_eps`` with ``rho``, before the
    must-links). ``tracklets``: int [N], crops sharing a value >= 0 are one person (must-link); -1 for unknown.
    ``cameras``: int [N]: cluster the features with each camera's mean taken away (``centre_cameras``), when
    there are two cameras or more.
    """
    from sklearn.cluster import DBSCAN

    from reid.evaluation.rerank import jaccard_distances

    n = len(features)
    if n < 2:
        raise InputError(f"clustering needs at least 2 crops, got {n}")
    if cameras is not None and len(np.unique(cameras)) > 1:  # one camera: no bias between cameras to remove
        features = centre_cameras(features, cameras)
    dist = jaccard_distances(features, k1=min(k1, n - 1), k2=min(k2, n))
    if eps is None:
        eps = max(auto_eps(dist, rho), 1e-6)
    labels = DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed", n_jobs=1).fit_predict(dist)
    if tracklets is not None:
        labels = _vote(labels.astype(np.int64), np.asarray(tracklets))
    return Clusters(labels.astype(np.int64), float(eps))


def _vote(labels: np.ndarray, tracklets: np.ndarray) -> np.ndarray:
    """Must-links by a vote: each tracklet's crops all take the label most of its clustered crops have, or
    a new cluster when none was clustered (and it has two crops or more); labels renumbered 0..n-1."""
    out = labels.copy()
    fresh = int(labels.max()) + 1 if labels.size else 0
    for t in np.unique(tracklets[tracklets >= 0]):
        members = np.flatnonzero(tracklets == t)
        clustered = labels[members][labels[members] >= 0]
        if clustered.size:
            out[members] = np.bincount(clustered).argmax()
        elif members.size > 1:
            out[members] = fresh
            fresh += 1
    kept = np.unique(out[out >= 0])
    remap = np.full(fresh + 1, -1, np.int64)
    remap[kept] = np.arange(kept.size)
    return np.where(out >= 0, remap[np.maximum(out, 0)], -1)


class ProxyMemory:
    """Momentum proxies of the clusters (per camera when ``cameras`` are given) and their contrastive loss.

    The loss of a crop of cluster y is ``-log(sum_{p in P(y)} exp(s_p / t) / sum_all exp(s / t))`` over
    the proxies' cosine similarities s, P(y) being the proxies of y (one without cameras: plain cluster
    contrast). After each step a crop's own proxy moves to it: ``m <- normalize(mu m + (1 - mu) f)``.
    """

    def __init__(self, features: np.ndarray, clusters: Clusters, cameras: np.ndarray | None = None, *,
                 temperature: float = 0.05, momentum: float = 0.2, device: torch.device | str = "cpu") -> None:
        inliers = clusters.labels >= 0
        cams = np.zeros(len(features), np.int64) if cameras is None else np.asarray(cameras, np.int64)
        keys = clusters.labels[inliers] * (int(cams.max()) + 1 if cams.size else 1) + cams[inliers]
        uniq, proxy_of_inlier = np.unique(keys, return_inverse=True)
        self.proxy = np.full(len(features), -1, np.int64)
        self.proxy[inliers] = proxy_of_inlier
        self.cluster_of_proxy = torch.as_tensor(uniq // (int(cams.max()) + 1 if cams.size else 1), device=device)
        sums = np.zeros((len(uniq), features.shape[1]), np.float64)
        np.add.at(sums, proxy_of_inlier, features[inliers])
        self.memory = F.normalize(torch.as_tensor(sums, dtype=torch.float32, device=device), dim=1)
        self.temperature, self.momentum = float(temperature), float(momentum)
        self.labels = torch.as_tensor(clusters.labels, device=device)

    def __len__(self) -> int:
        return int(self.memory.shape[0])

    def loss(self, feats: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Mean multi-positive InfoNCE of L2-normalised ``feats`` [B, D] of crops ``index`` [B] (inliers)."""
        logits = feats @ self.memory.T / self.temperature  # [B, P]
        positive = self.cluster_of_proxy[None, :] == self.labels[index][:, None]
        log_all = torch.logsumexp(logits, dim=1)
        log_pos = torch.logsumexp(logits.masked_fill(~positive, float("-inf")), dim=1)
        return (log_all - log_pos).mean()

    @torch.no_grad()
    def update(self, feats: torch.Tensor, index: torch.Tensor) -> None:
        """Move each crop's own proxy towards its (detached) feature."""
        proxies = torch.as_tensor(self.proxy[index.cpu().numpy()], device=self.memory.device)
        for f, p in zip(feats.detach(), proxies, strict=True):
            self.memory[p] = F.normalize(self.momentum * self.memory[p] + (1.0 - self.momentum) * f, dim=0)
