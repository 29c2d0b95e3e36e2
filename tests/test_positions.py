import math

import pytest
import torch

from tformer.positions import PositionalEncoding, sinusoidal_table


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
