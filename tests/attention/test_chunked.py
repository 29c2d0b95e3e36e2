"""The chunked (online-softmax) backend equals `math`: values and gradients, masks, odd lengths, empty rows."""

import pytest
import torch

from tformer.attention import math_attention
from tformer.attention.chunked import chunked_attention


def _inputs(b, h, t, s, d, dtype):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, h, n, d, generator=g, dtype=dtype, requires_grad=True) for n in (t, s, s)]


def _compare(q, k, v, mask, causal, block, atol):
    out_ref, _ = math_attention(q, k, v, mask, causal=causal)
    out, _ = chunked_attention(q, k, v, mask, causal=causal, block_size=block)
    torch.testing.assert_close(out, out_ref, atol=atol, rtol=atol)
    g = torch.randn_like(out)
    grads_ref = torch.autograd.grad(out_ref, (q, k, v), g)
    grads = torch.autograd.grad(out, (q, k, v), g)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=atol)
    return out, grads


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block", [1, 4, 7, 64])
def test_equals_math_float32_with_padding(causal, block):
    q, k, v = _inputs(2, 3, 13, 13, 8, torch.float32)  # 13: not a multiple of the block
    mask = torch.ones(2, 1, 1, 13, dtype=torch.bool)
    mask[1, ..., 9:] = False  # padding
    _compare(q, k, v, mask, causal, block, 1e-5)


def test_cross_attention_lengths_and_offset_causal_float64():
    q, k, v = _inputs(2, 2, 5, 11, 4, torch.float64)
    _compare(q, k, v, None, False, 3, 1e-12)
    _compare(q, k, v, None, True, 3, 1e-12)  # the 5 queries are the last 5 of 11 positions


def test_fully_masked_rows_give_zeros_and_zero_gradients():
    q, k, v = _inputs(1, 2, 6, 6, 4, torch.float32)
    mask = torch.ones(1, 1, 6, 6, dtype=torch.bool)
    mask[0, 0, 2, :] = False
    out, grads = _compare(q, k, v, mask, False, 4, 1e-5)
    assert torch.equal(out[0, :, 2], torch.zeros_like(out[0, :, 2]))
    assert torch.isfinite(grads[0]).all() and torch.equal(
        grads[0][0, :, 2], torch.zeros_like(grads[0][0, :, 2])
    )


def test_refuses_weights_and_dropout():
    q, k, v = _inputs(1, 1, 2, 2, 4, torch.float32)
    with pytest.raises(ValueError, match="cannot return weights"):
        chunked_attention(q, k, v, need_weights=True)
    with pytest.raises(ValueError, match="does not support attention dropout"):
        chunked_attention(q, k, v, dropout_p=0.1)


def test_model_with_chunked_backend_matches_math():
    from tformer.config import LMConfig
    from tformer.models import LanguageModel

    torch.manual_seed(0)
    a = LanguageModel(
        LMConfig(vocab_size=30, d_model=16, n_heads=2, d_ff=32, n_layers=2, max_seq_len=320, attention="math")
    ).double()
    b = LanguageModel(
        LMConfig(
            vocab_size=30, d_model=16, n_heads=2, d_ff=32, n_layers=2, max_seq_len=320, attention="chunked"
        )
    ).double()
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, 30, (2, 300))  # longer than one 256-key block
    torch.testing.assert_close(b(ids).logits, a(ids).logits, atol=1e-10, rtol=0)
