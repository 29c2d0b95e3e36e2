import math

import pytest
import torch

from tformer.positions import PositionalEncoding, RotaryEmbedding, sinusoidal_table


@pytest.mark.parametrize("pos,i", [(0, 0), (1, 0), (7, 3), (50, 10), (99, 31)])
def test_sinusoid_matches_paper_formula(pos, i):
    d = 64
    table = sinusoidal_table(100, d, dtype=torch.float64)
    angle = pos / 10000 ** (2 * i / d)
    assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-12)
    assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-12)


def test_known_values_and_odd_width():
    table = sinusoidal_table(3, 4, dtype=torch.float64)
    assert table[0].tolist() == [0.0, 1.0, 0.0, 1.0]
    assert table[1, 0].item() == pytest.approx(math.sin(1.0))
    assert table[1, 3].item() == pytest.approx(math.cos(1.0 / 100))
    assert sinusoidal_table(5, 7).shape == (5, 7)


def test_offset_and_too_long():
    pe = PositionalEncoding(8, 4)
    x = torch.zeros(1, 3, 4)
    torch.testing.assert_close(pe(x, offset=2), sinusoidal_table(8, 4)[2:5][None])
    with pytest.raises(ValueError, match="length 9 is longer than the model's max_seq_len = 8"):
        pe(torch.zeros(1, 9, 4))
    assert "table" not in pe.state_dict()  # derived buffer, not saved


def _rotate_reference(x, positions, base=10000.0):
    """Rotary positions by the formula (float64): features i and i + D/2 turned by angle pos * base^(-2i/D)."""
    d = x.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = positions.to(torch.float64)[..., None] * inv  # (..., T, D/2)
    c, s = ang.cos(), ang.sin()
    x1, x2 = x[..., : d // 2].double(), x[..., d // 2 :].double()
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def test_rotary_forward_and_packed_heads_match_the_formula():
    torch.manual_seed(0)
    rope = RotaryEmbedding(8, 32)
    x = torch.randn(2, 3, 5, 8)  # (B, H, T, D)
    want = _rotate_reference(x, torch.arange(4, 9))
    torch.testing.assert_close(rope(x, 4).double(), want, atol=1e-6, rtol=0)
    # (B, T, N, D), N heads side by side (a packed projection's query and key heads): one call for all
    packed = x.transpose(1, 2)
    got = rope.rotate_heads(packed, 4)
    assert torch.equal(got.transpose(1, 2), rope(x, 4))  # the same arithmetic, bit for bit
    # each row its own positions (continuous batching): (B, T) offsets
    rows = torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
    want_rows = torch.stack([_rotate_reference(x[b], rows[b]) for b in range(2)])
    torch.testing.assert_close(rope(x, rows).double(), want_rows, atol=1e-6, rtol=0)
    assert torch.equal(rope.rotate_heads(packed, rows).transpose(1, 2), rope(x, rows))
    # float64 computes its own tables: error at float64's level
    torch.testing.assert_close(rope(x.double(), 4), want, atol=1e-12, rtol=0)
    torch.testing.assert_close(
        rope.rotate_heads(packed.double(), 4).transpose(1, 2), want, atol=1e-12, rtol=0
    )
    with pytest.raises(ValueError, match="longer than the model's max_seq_len = 32"):
        rope.rotate_heads(packed, 30)
