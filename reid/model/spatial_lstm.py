"""2-D spatial LSTM (Theis & Bethge 2015, "Generative Image Modeling Using Spatial LSTMs") over a grid.

Cell (i, j) reads its input x_ij and the states of its upper (i-1, j) and left (i, j-1) neighbours:
    [i, f1, f2, o, g] = W_x x_ij + W_h [h_{i-1,j}, h_{i,j-1}] + b
    c_ij = sigmoid(f1) * c_{i-1,j} + sigmoid(f2) * c_{i,j-1} + sigmoid(i) * tanh(g)
    h_ij = sigmoid(o) * tanh(c_ij)
All cells on one anti-diagonal (i + j = k) depend only on the previous anti-diagonal, so the scan
takes Gh + Gw - 1 batched steps instead of Gh * Gw. Two scans run together (top-left -> bottom-right
and, on the flipped grid, bottom-right -> top-left), each with its own weights; their hidden states
are concatenated.

With ``row_counter`` the last unit of the last scan direction is a fixed positional unit: its gates are
saturated and its input and recurrent weights zero, so its cell adds ``COUNTER_STEP`` at every step along
the scan's vertical axis and forgets its left neighbour; its state is tanh(rows from the scan's first edge
x step), whatever the crop shows. The forward pass reads the counter's gates from fixed constants, not from
its slots of the parameters, so no optimizer step can move it (weight decay included: an L2 term under Adam
moved its 0.02 candidate bias by about lr per step and stopped the count within a few dozen steps); the
attention, and the other units, may read it.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

NUM_GATES = 5  # input, forget-up, forget-left, output, candidate
COUNTER_STEP = 0.02  # the row counter's increment per row: tanh stays near its linear range over 16 rows
COUNTER_SATURATION = 30.0  # the counter's gate biases: sigmoid(30) = 1 - 1e-13


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

    def __init__(self, d_in: int, d_h: int, *, directions: int = 2, row_counter: bool = False) -> None:
        super().__init__()
        if directions not in (1, 2):
            raise ValueError("directions must be 1 or 2")
        self.d_in, self.d_h, self.directions = d_in, d_h, directions
        self.row_counter = row_counter
        self.weight_x = nn.Parameter(torch.empty(directions, d_in, NUM_GATES * d_h))
        self.weight_h = nn.Parameter(torch.empty(directions, 2 * d_h, NUM_GATES * d_h))
        self.bias = nn.Parameter(torch.empty(directions, NUM_GATES * d_h))
        if row_counter:
            mask = torch.zeros(directions, NUM_GATES * d_h, dtype=torch.bool)
            mask[-1, [d_h - 1 + g * d_h for g in range(NUM_GATES)]] = True  # the last direction's counter gates
            fixed = torch.zeros(directions, NUM_GATES * d_h)
            s = COUNTER_SATURATION
            fixed[-1, mask[-1]] = torch.tensor([s, s, -s, s, math.atanh(COUNTER_STEP)])
            self.register_buffer("_counter_mask", mask, persistent=False)
            self.register_buffer("_counter_bias", fixed, persistent=False)
        self.reset_parameters()

    @property
    def counter_unit(self) -> int:
        """Index of the row counter in the output channels (the last one), when ``row_counter``."""
        return self.directions * self.d_h - 1

    def weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weight_x, weight_h, bias) as the scan uses them: with ``row_counter`` the counter's gates are the
        fixed constants whatever its parameter slots hold (so they take no gradient either)."""
        if not self.row_counter:
            return self.weight_x, self.weight_h, self.bias
        m = self._counter_mask
        return (self.weight_x.masked_fill(m.unsqueeze(1), 0.0), self.weight_h.masked_fill(m.unsqueeze(1), 0.0),
                torch.where(m, self._counter_bias.to(self.bias.dtype), self.bias))

    @torch.no_grad()
    def reset_counter(self) -> None:
        """Write the row counter's constants into its parameter slots too, so the saved weights show the unit
        the scan uses (no-op without ``row_counter``)."""
        if not self.row_counter:
            return
        b = self.weights()[2]
        m = self._counter_mask.unsqueeze(1)
        self.weight_x.masked_fill_(m, 0.0)
        self.weight_h.masked_fill_(m, 0.0)
        self.bias.copy_(b)

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
        self.reset_counter()

    @staticmethod
    def cell(gates: torch.Tensor, c_up: torch.Tensor, c_left: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One LSTM update from pre-activation gates [..., 5*d_h] and the neighbours' cell states."""
        d = gates.shape[-1] // NUM_GATES
        sig = torch.sigmoid(gates[..., : 4 * d])
        g = torch.tanh(gates[..., 4 * d :])
        i, f1, f2, o = sig[..., :d], sig[..., d : 2 * d], sig[..., 2 * d : 3 * d], sig[..., 3 * d :]
        c = torch.addcmul(torch.addcmul(i * g, f1, c_up), f2, c_left)
        return o * torch.tanh(c), c

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
        # Layout [dir, cell (diagonal-major), batch, channel]: one diagonal is a contiguous block.
        xs = torch.stack(seqs).transpose(1, 2).reshape(nd, gh * gw * b, -1)
        weight_x, weight_h, bias = self.weights()
        gates_x = torch.baddbmm(bias.unsqueeze(1), xs, weight_x)  # [nd, L*B, 5*d_h]

        # Each diagonal's input gates as one block of a single split: slicing the tensor once per diagonal
        # instead gave every slice a zero-filled gradient of the whole tensor in the backward pass (~80% of
        # the LSTM's training time: 13 s of CPU instead of 2.5 s per batch of 64 at 16x8); same values.
        blocks = gates_x.split([(hi - lo + 1) * b for lo, hi in ranges], dim=1)
        # State of the previous diagonal as [h | c] on its rows lo-1 .. hi+1 (zero rows at both ends).
        state = x.new_zeros(nd, 2, b, 2 * dh)
        prev_lo, outs = 0, []
        for (lo, hi), gx in zip(ranges, blocks, strict=True):
            n = hi - lo + 1
            up = state[:, lo - prev_lo : hi - prev_lo + 1]  # rows i-1 of the previous diagonal
            left = state[:, lo - prev_lo + 1 : hi - prev_lo + 2]  # rows i (column j-1)
            rec = torch.cat([up[..., :dh], left[..., :dh]], dim=-1).view(nd, n * b, 2 * dh)
            gates = torch.baddbmm(gx, rec, weight_h)
            h, c = self.cell(gates.view(nd, n, b, -1), up[..., dh:], left[..., dh:])
            outs.append(h)
            state = F.pad(torch.cat([h, c], dim=-1), (0, 0, 0, 0, 1, 1))
            prev_lo = lo

        hs = torch.cat(outs, dim=1)  # [nd, L, B, d_h], diagonal-major
        inverse = torch.empty_like(order_t)
        inverse[order_t] = torch.arange(len(order), device=x.device)
        hs = hs.index_select(1, inverse).permute(0, 2, 1, 3)  # [nd, B, L, d_h], row-major
        hs = torch.cat([hs[0], hs[1].flip(1)], dim=-1) if nd == 2 else hs[0]
        return hs.reshape(b, gh, gw, nd * dh)
