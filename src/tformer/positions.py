"""Position information: sinusoidal (paper section 3.5), learned, or rotary (Su et al., 2021).

Sinusoidal and learned positions are added to the token embeddings (`PositionalEncoding`); rotary
positions rotate the queries and keys inside attention (`RotaryEmbedding`, given to MultiHeadAttention).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sinusoidal_table(
    max_len: int, d_model: int, *, dtype: torch.dtype = torch.float32, layout: str = "interleaved"
) -> Tensor:
    """(max_len, d_model): PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(same).

    layout "concat" puts the same sines in the first half of the features and the cosines in the second
    (Marian's layout: transformers' MarianSinusoidalPositionalEmbedding)."""
    pos = torch.arange(max_len, dtype=torch.float64)[:, None]
    inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(10000.0) / d_model))
    sin, cos = torch.sin(pos * inv_freq), torch.cos(pos * inv_freq)[:, : d_model // 2]
    if layout == "concat":
        return torch.cat([sin, cos], dim=1).to(dtype)
    table = torch.zeros(max_len, d_model, dtype=torch.float64)
    table[:, 0::2] = sin
    table[:, 1::2] = cos
    return table.to(dtype)


def _check_length(length: int, max_seq_len: int) -> None:
    if length > max_seq_len:
        raise ValueError(
            f"sequence of length {length} is longer than the model's max_seq_len = {max_seq_len}"
        )


class PositionalEncoding(nn.Module):
    """Adds positions [offset, offset + T) to x (B, T, C): "sinusoidal" (fixed; "sinusoidal_concat" with
    Marian's feature layout), "learned", or "none"."""

    def __init__(self, max_seq_len: int, d_model: int, *, kind: str = "sinusoidal") -> None:
        super().__init__()
        self.max_seq_len, self.kind = max_seq_len, kind
        if kind == "learned":
            self.table = nn.Parameter(torch.randn(max_seq_len, d_model) * 0.02)
        elif kind in ("sinusoidal", "sinusoidal_concat"):
            # Derived, not learned: not saved in checkpoints, rebuilt on any device.
            self.layout = "concat" if kind == "sinusoidal_concat" else "interleaved"
            table = sinusoidal_table(max_seq_len, d_model, layout=self.layout)
            self.register_buffer("table", table, persistent=False)
        elif kind not in ("none", "rotary"):
            raise ValueError(
                f"unknown positions {kind!r}; expected sinusoidal, sinusoidal_concat, learned, rotary or none"
            )

    def forward(self, x: Tensor, offset: int | Tensor = 0) -> Tensor:
        """`offset`: the first position (int), or each token's own position (B, T), for a batch whose
        rows continue from different lengths (continuous batching)."""
        t = x.shape[1]
        if isinstance(offset, Tensor):
            return x if self.kind in ("none", "rotary") else x + self._rows(offset, x)
        _check_length(offset + t, self.max_seq_len)
        if self.kind in ("none", "rotary"):
            return x
        if self.kind.startswith("sinusoidal") and x.dtype == torch.float64:  # exact, not float32-rounded
            table = sinusoidal_table(offset + t, x.shape[-1], dtype=torch.float64, layout=self.layout)
            return x + table[offset:].to(x.device)
        return x + self.table[offset : offset + t].to(x.dtype)

    def _rows(self, positions: Tensor, x: Tensor) -> Tensor:
        """The encodings (B, T, C) of per-token positions (B, T), in x's dtype (float64 exactly)."""
        if self.kind.startswith("sinusoidal") and x.dtype == torch.float64:
            table = sinusoidal_table(self.max_seq_len, x.shape[-1], dtype=torch.float64, layout=self.layout)
            return table.to(x.device)[positions]
        return self.table[positions].to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotates pairs of query/key features by position-dependent angles (RoFormer, Su et al., 2021).

    Dot products of rotated q and k then depend only on their relative position. Uses the "rotate half"
    layout: feature i pairs with feature i + D/2. Computed as x cos + roll(x, D/2) sin_rot, with rotate-half's
    sign in the table (sin_rot: -sin on the first half, +sin on the second): the same products and sums as
    x cos + cat(-x2, x1) sin, bit for bit, in three elementwise passes instead of five.
    """

    cos: Tensor  # (max_seq_len, D) buffers, float32
    sin_rot: Tensor

    def __init__(self, d_head: int, max_seq_len: int, *, base: float = 10000.0) -> None:
        super().__init__()
        self.max_seq_len, self.d_head, self.base = max_seq_len, d_head, base
        cos, sin_rot = self._tables(0, max_seq_len, torch.float32)
        self.register_buffer("cos", cos, persistent=False)  # (T, D)
        self.register_buffer("sin_rot", sin_rot, persistent=False)

    def _tables(self, start: int, stop: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        inv_freq = self.base ** (
            -torch.arange(0, self.d_head, 2, dtype=torch.float64) / self.d_head
        )  # (D/2,)
        angles = torch.arange(start, stop, dtype=torch.float64)[:, None] * inv_freq[None]  # (T, D/2)
        sin = angles.sin()
        return torch.cat([angles, angles], dim=-1).cos().to(dtype), torch.cat([-sin, sin], dim=-1).to(dtype)

    def _angles(self, offset: int | Tensor, t: int, x: Tensor) -> tuple[Tensor, Tensor]:
        """cos and sin_rot in x's dtype for positions [offset, offset + t): (T, D); for a (B, T) tensor of
        positions: (B, T, D). float64 computes its own tables (the float32 buffers would round them)."""
        if isinstance(offset, Tensor):
            if x.dtype == torch.float64:
                cos, sin = self._tables(0, self.max_seq_len, torch.float64)
                return cos.to(x.device)[offset], sin.to(x.device)[offset]
            return self.cos[offset].to(x.dtype), self.sin_rot[offset].to(x.dtype)
        _check_length(offset + t, self.max_seq_len)
        if x.dtype == torch.float64:
            cos, sin = self._tables(offset, offset + t, torch.float64)
            return cos.to(x.device), sin.to(x.device)
        return self.cos[offset : offset + t].to(x.dtype), self.sin_rot[offset : offset + t].to(x.dtype)

    def _rotate(self, x: Tensor, cos: Tensor, sin_rot: Tensor) -> Tensor:
        return x * cos + x.roll(self.d_head // 2, dims=-1) * sin_rot

    def forward(self, x: Tensor, offset: int | Tensor = 0) -> Tensor:
        """x (B, H, T, D) at positions [offset, offset + T) -> rotated x; `offset` may also give each
        row's own positions (B, T) (continuous batching)."""
        cos, sin = self._angles(offset, x.shape[-2], x)
        if isinstance(offset, Tensor):
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D): the same angles for every head
        return self._rotate(x, cos, sin)

    def rotate_heads(self, x: Tensor, offset: int | Tensor = 0) -> Tensor:
        """x (B, T, N, D), N heads side by side at each position (self-attention's query and key heads as
        its packed projection lays them out) -> all N rotated in one pass, as `forward` rotates each."""
        cos, sin = self._angles(offset, x.shape[1], x)
        return self._rotate(x, cos.unsqueeze(-2), sin.unsqueeze(-2))  # (T or B x T, 1, D): every head
