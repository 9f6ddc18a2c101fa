"""Soft attention over grid locations: which local LSTM states the embedding keeps.

e_l = w_k^T tanh(W_x x_l + W_h h_l + b),  alpha_k = softmax_l(e_k),  z_k = sum_l alpha_kl h_l,
for K glimpses (K independent vectors w_k); the K glimpses are concatenated.
"""

from __future__ import annotations

import torch
from torch import nn


class LocationAttention(nn.Module):
    """x [B,L,d_x] (bilinear inputs), h [B,L,d_h] (LSTM states) -> z [B,K*d_h], alpha [B,K,L]."""

    def __init__(self, d_x: int, d_h: int, *, d_att: int, glimpses: int) -> None:
        super().__init__()
        self.proj_x = nn.Linear(d_x, d_att, bias=True)  # carries b
        self.proj_h = nn.Linear(d_h, d_att, bias=False)
        self.score = nn.Linear(d_att, glimpses, bias=False)  # the K vectors w_k
        self.glimpses = glimpses

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention-pooled states z [B,K*d_h] and the weights alpha [B,K,L] (each row sums to 1)."""
        e = self.score(torch.tanh(self.proj_x(x) + self.proj_h(h)))  # [B,L,K]
        alpha = torch.softmax(e, dim=1, dtype=torch.promote_types(e.dtype, torch.float32)).transpose(1, 2)  # [B,K,L]
        z = torch.bmm(alpha.to(h.dtype), h)  # [B,K,d_h]
        return z.flatten(1), alpha
