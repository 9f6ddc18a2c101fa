"""2-D spatial LSTM (Theis & Bethge 2015, "Generative Image Modeling Using Spatial LSTMs") over a grid.

Cell (i, j) reads its input x_ij and the states of its upper (i-1, j) and left (i, j-1) neighbours:
    [i, f1, f2, o, g] = W_x x_ij + W_h [h_{i-1,j}, h_{i,j-1}] + b
    c_ij = sigmoid(f1) * c_{i-1,j} + sigmoid(f2) * c_{i,j-1} + sigmoid(i) * tanh(g)
    h_ij = sigmoid(o) * tanh(c_ij)
All cells on one anti-diagonal (i + j = k) depend only on the previous anti-diagonal, so the scan
takes Gh + Gw - 1 batched steps instead of Gh * Gw. Two scans run together (top-left -> bottom-right
and, on the flipped grid, bottom-right -> top-left), each with its own weights; their hidden states
are concatenated.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

NUM_GATES = 5  # input, forget-up, forget-left, output, candidate


@lru_cache(maxsize=64)
def diagonal_plan(gh: int, gw: int) -> tuple[tuple[tuple[int, int], ...], tuple[int, ...]]:
    """Row ranges (lo, hi) of each anti-diagonal, and the row-major -> diagonal-major cell order."""
    ranges, order = [], []
    for k in range(gh + gw - 1):
        lo, hi = max(0, k - gw + 1), min(k, gh - 1)
        ranges.append((lo, hi))
        order.extend(i * gw + (k - i) for i in range(lo, hi + 1))
    return tuple(ranges), tuple(order)


class SpatialLSTM2d(nn.Module):
    """x [B,Gh,Gw,d_in] -> h [B,Gh,Gw,directions*d_h]; directions = 2 (TL->BR and BR->TL) or 1."""

    def __init__(self, d_in: int, d_h: int, *, directions: int = 2) -> None:
        super().__init__()
        if directions not in (1, 2):
            raise ValueError("directions must be 1 or 2")
        self.d_in, self.d_h, self.directions = d_in, d_h, directions
        self.weight_x = nn.Parameter(torch.empty(directions, d_in, NUM_GATES * d_h))
        self.weight_h = nn.Parameter(torch.empty(directions, 2 * d_h, NUM_GATES * d_h))
        self.bias = nn.Parameter(torch.empty(directions, NUM_GATES * d_h))
        self.reset_parameters()

    @property
    def out_dim(self) -> int:
        """Channels of the output: directions * d_h."""
        return self.directions * self.d_h

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Uniform(+-1/sqrt(d_h)) weights like nn.LSTM; forget-gate biases start at 1 (remember by default)."""
        bound = 1.0 / math.sqrt(self.d_h)
        with torch.no_grad():
            for p in (self.weight_x, self.weight_h):
                p.uniform_(-bound, bound, generator=generator)
            self.bias.zero_()
            self.bias[:, self.d_h : 3 * self.d_h] = 1.0

    @staticmethod
    def cell(gates: torch.Tensor, c_up: torch.Tensor, c_left: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One LSTM update from pre-activation gates [..., 5*d_h] and the neighbours' cell states."""
        i, f1, f2, o, g = gates.chunk(NUM_GATES, dim=-1)
        c = torch.sigmoid(f1) * c_up + torch.sigmoid(f2) * c_left + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scan the grid along anti-diagonals; returns the concatenated hidden states [B,Gh,Gw,D*d_h]."""
        b, gh, gw, _ = x.shape
        nd, dh = self.directions, self.d_h
        ranges, order = diagonal_plan(gh, gw)
        order_t = torch.tensor(order, device=x.device)
        flat = x.reshape(b, gh * gw, -1)
        seqs = [flat.index_select(1, order_t)]
        if nd == 2:
            # The BR->TL scan is the TL->BR scan of the grid flipped in both axes (cell l -> L-1-l).
            seqs.append(flat.flip(1).index_select(1, order_t))
        xs = torch.stack(seqs)  # [nd, B, L, d_in], diagonal-major
        gates_x = torch.baddbmm(self.bias.unsqueeze(1), xs.flatten(1, 2), self.weight_x).view(nd, b, gh * gw, -1)

        # h/c of the previous diagonal indexed by row + 1 (index 0 = the zero row above the grid).
        h_prev = x.new_zeros(nd, b, gh + 1, dh)
        c_prev = h_prev
        outs, start = [], 0
        for lo, hi in ranges:
            n = hi - lo + 1
            h_up, h_left = h_prev[:, :, lo : hi + 1], h_prev[:, :, lo + 1 : hi + 2]
            c_up, c_left = c_prev[:, :, lo : hi + 1], c_prev[:, :, lo + 1 : hi + 2]
            rec = torch.cat([h_up, h_left], dim=-1).reshape(nd, b * n, 2 * dh)
            gates = gates_x[:, :, start : start + n] + torch.bmm(rec, self.weight_h).view(nd, b, n, -1)
            h, c = self.cell(gates, c_up, c_left)
            outs.append(h)
            start += n
            pad = (0, 0, lo + 1, gh - hi - 1)
            h_prev, c_prev = F.pad(h, pad), F.pad(c, pad)

        hs = torch.cat(outs, dim=2)  # [nd, B, L, d_h], diagonal-major
        inverse = torch.empty_like(order_t)
        inverse[order_t] = torch.arange(len(order), device=x.device)
        hs = hs.index_select(2, inverse)  # row-major
        if nd == 2:
            hs = torch.cat([hs[0], hs[1].flip(1)], dim=-1)
        else:
            hs = hs[0]
        return hs.view(b, gh, gw, nd * dh)
