"""Position information added to token embeddings: sinusoidal (paper section 3.5) or learned."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sinusoidal_table(max_len: int, d_model: int, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """(max_len, d_model): PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(same)."""
    pos = torch.arange(max_len, dtype=torch.float64)[:, None]
    inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(10000.0) / d_model))
    table = torch.zeros(max_len, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq)[:, : d_model // 2]
    return table.to(dtype)


class PositionalEncoding(nn.Module):
    """Adds positions [offset, offset + T) to x (B, T, C). `learned=False` is the paper's fixed sinusoid."""

    def __init__(self, max_seq_len: int, d_model: int, *, learned: bool = False) -> None:
        super().__init__()
        self.max_seq_len = max_seq_len
        self.learned = learned
        if learned:
            self.table = nn.Parameter(torch.randn(max_seq_len, d_model) * 0.02)
        else:
            # Derived, not learned: not saved in checkpoints, rebuilt on any device/dtype.
            self.register_buffer("table", sinusoidal_table(max_seq_len, d_model), persistent=False)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        t = x.shape[1]
        if offset + t > self.max_seq_len:
            raise ValueError(
                f"sequence of length {offset + t} is longer than the model's max_seq_len = {self.max_seq_len}"
            )
        return x + self.table[offset : offset + t].to(x.dtype)
