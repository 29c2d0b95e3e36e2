"""Grouped-query / multi-query attention: equal to standard attention with each key/value head copied to
its query group; n_kv_heads == n_heads is standard attention; the cache shrinks accordingly."""

import pytest
import torch

from tformer.attention import MultiHeadAttention


@pytest.mark.parametrize("n_kv", [1, 2, 4])
def test_gqa_equals_standard_attention_with_shared_heads(n_kv):
    torch.manual_seed(0)
    c, h, d = 16, 4, 4
    gqa = MultiHeadAttention(c, h, n_kv_heads=n_kv, backend="math").double()
    full = MultiHeadAttention(c, h, backend="math").double()
    group = h // n_kv
    with torch.no_grad():
        w, b = gqa.in_proj.weight, gqa.in_proj.bias
        kv = n_kv * d
        wk, wv = w[c : c + kv].view(n_kv, d, c), w[c + kv :].view(n_kv, d, c)
        bk, bv = b[c : c + kv].view(n_kv, d), b[c + kv :].view(n_kv, d)
        full.in_proj.weight.copy_(
            torch.cat(
                [
                    w[:c],
                    wk.repeat_interleave(group, 0).reshape(c, c),
                    wv.repeat_interleave(group, 0).reshape(c, c),
                ]
            )
        )
        full.in_proj.bias.copy_(
            torch.cat(
                [b[:c], bk.repeat_interleave(group, 0).reshape(c), bv.repeat_interleave(group, 0).reshape(c)]
            )
        )
        full.out_proj.load_state_dict(gqa.out_proj.state_dict())
    x = torch.randn(2, 5, c, dtype=torch.float64)
    mem = torch.randn(2, 7, c, dtype=torch.float64)
    a, ref = gqa(x, causal=True), full(x, causal=True)
    torch.testing.assert_close(a.out, ref.out, atol=1e-12, rtol=0)
    # cross-attention with the same weights: a packed state dict loads into q_proj / kv_proj
    gqa_x = MultiHeadAttention(c, h, n_kv_heads=n_kv, backend="math", cross=True).double()
    full_x = MultiHeadAttention(c, h, backend="math", cross=True).double()
    gqa_x.load_state_dict(gqa.state_dict())
    full_x.load_state_dict(full.state_dict())
    torch.testing.assert_close(gqa_x(x, mem).out, full_x(x, mem).out, atol=1e-12, rtol=0)
    assert a.kv.k.shape == (2, n_kv, 5, d)  # the cache holds n_kv heads, not n_heads
    assert gqa.in_proj.weight.shape == (c + 2 * n_kv * d, c)


def test_kv_cache_with_gqa_equals_full_pass():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4, n_kv_heads=2).eval()
    x = torch.randn(1, 6, 16)
    full = mha(x, causal=True).out
    past, outs = None, []
    for t in range(6):
        o = mha(x[:, t : t + 1], causal=True, past=past)
        past, outs = o.kv, [*outs, o.out]
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-6, rtol=1e-6)


def test_n_kv_heads_must_divide_n_heads():
    with pytest.raises(ValueError, match="n_kv_heads = 3 must divide n_heads = 4"):
        MultiHeadAttention(16, 4, n_kv_heads=3)
