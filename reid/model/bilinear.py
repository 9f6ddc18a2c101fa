"""Per-location bilinear pooling: the outer product of the two streams' local features at every cell.

Unlike classic bilinear CNNs there is no sum over locations: each grid cell keeps its own
bilinear vector, which the spatial LSTM and the attention then read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvBNReLU(nn.Sequential):
    """1x1 conv + BatchNorm + ReLU: reduces a stream's channels before the outer product."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class LocalBilinear(nn.Module):
    """a [B,Ca,H,W], b [B,Cb,H,W] -> x [B,H,W,d_x]: reduce, outer product per cell, signed sqrt, L2, linear."""

    def __init__(self, in_a: int, in_b: int, *, c_a: int, c_b: int, d_x: int) -> None:
        super().__init__()
        self.reduce_a = ConvBNReLU(in_a, c_a)
        self.reduce_b = ConvBNReLU(in_b, c_b)
        self.proj = nn.Linear(c_a * c_b, d_x)
        self.c_a, self.c_b, self.d_x = c_a, c_b, d_x

    def outer(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Reduced local features -> normalised bilinear vectors [B,H,W,c_a*c_b] (before the projection).

        The reductions end in ReLU, so a, b >= 0 and signed_sqrt(a b^T) = sqrt(a) sqrt(b)^T, whose
        L2 norm is |sqrt(a)| |sqrt(b)|: normalising the two small factors first gives the same
        vectors as sqrt + L2 over the c_a*c_b products, for a fraction of the memory passes.
        """
        a = self.reduce_a(a).permute(0, 2, 3, 1)  # [B,H,W,c_a], >= 0
        b = self.reduce_b(b).permute(0, 2, 3, 1)
        if a.shape[1:3] != b.shape[1:3]:
            raise ValueError(f"stream grids differ: {tuple(a.shape[1:3])} vs {tuple(b.shape[1:3])}")
        u = F.normalize(_sqrt0(a), dim=-1)
        v = F.normalize(_sqrt0(b), dim=-1)
        return (u.unsqueeze(-1) * v.unsqueeze(-2)).flatten(-2)  # vec(u v^T), row-major over (c_a, c_b)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Local bilinear features projected to d_x: [B,H,W,d_x]."""
        return self.proj(self.outer(a, b))


_EPS = 1e-12


def _sqrt0(x: torch.Tensor) -> torch.Tensor:
    """sqrt(x) for x >= 0, exactly 0 at 0, with a finite gradient there (|error| <= 1e-6)."""
    return torch.sqrt(x + _EPS) - _EPS**0.5
