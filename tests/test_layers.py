"""Encoder / decoder layers against torch.nn.TransformerEncoderLayer / DecoderLayer on copied weights."""

import pytest
import torch

from support.weights import copy_decoder_layer, copy_encoder_layer
from tformer.attention import causal_mask, padding_mask
from tformer.config import ModelConfig, TransformerConfig
from tformer.layers import FeedForward
from tformer.models.builders import decoder_layer, self_attention_layer

B, S, T, C, H, F = 2, 6, 5, 16, 4, 32
SRC = torch.tensor([[5, 6, 7, 8, 9, 10], [5, 6, 7, 0, 0, 0]])


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_encoder_layer_matches_torch(norm_first, activation):
    c = TransformerConfig(
        d_model=C,
        n_heads=H,
        d_ff=F,
        dropout=0.0,
        norm_first=norm_first,
        activation=activation,
        attention="math",
    )
    ours = self_attention_layer(c)
    ref = torch.nn.TransformerEncoderLayer(
        C, H, F, dropout=0.0, batch_first=True, norm_first=norm_first, activation=activation
    )
    ours, ref = ours.double(), ref.double()
    copy_encoder_layer(ours, ref)
    x = torch.randn(B, S, C, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    keep = padding_mask(SRC, 0)
    out = ours(x1, mask=keep).x
    ref_out = ref(x2, src_key_padding_mask=~keep[:, 0, 0, :])
    # Padded query positions carry no meaning; compare the real ones.
    real = keep[:, 0, 0, :, None]
    torch.testing.assert_close(out * real, ref_out * real, atol=1e-10, rtol=0)
    ((out * real) ** 2).sum().backward()
    ((ref_out * real) ** 2).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-10, rtol=0)
    torch.testing.assert_close(ours.ff.linear1.weight.grad, ref.linear1.weight.grad, atol=1e-10, rtol=0)
    torch.testing.assert_close(ours.norm1.weight.grad, ref.norm1.weight.grad, atol=1e-10, rtol=0)


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_layer_matches_torch(norm_first):
    c = ModelConfig(d_model=C, n_heads=H, d_ff=F, dropout=0.0, norm_first=norm_first, attention="math")
    ours = decoder_layer(c).double()
    ref = torch.nn.TransformerDecoderLayer(
        C, H, F, dropout=0.0, batch_first=True, norm_first=norm_first
    ).double()
    copy_decoder_layer(ours, ref)
    x = torch.randn(B, T, C, dtype=torch.float64)
    memory = torch.randn(B, S, C, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    m1, m2 = memory.clone().requires_grad_(), memory.clone().requires_grad_()
    keep = padding_mask(SRC, 0)
    o = ours(x1, m1, memory_mask=keep, causal=True)
    ref_out = ref(
        x2, m2, tgt_mask=~causal_mask(T), memory_key_padding_mask=~keep[:, 0, 0, :], tgt_is_causal=True
    )
    torch.testing.assert_close(o.x, ref_out, atol=1e-10, rtol=0)
    g = torch.randn_like(ref_out)
    (o.x * g).sum().backward()
    (ref_out * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-10, rtol=0)
    torch.testing.assert_close(m1.grad, m2.grad, atol=1e-10, rtol=0)
    torch.testing.assert_close(ours.norm3.weight.grad, ref.norm3.weight.grad, atol=1e-10, rtol=0)


def test_feedforward_is_two_linears_around_relu():
    ff = FeedForward(4, 8).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    want = ff.linear2.weight @ torch.relu(ff.linear1.weight @ x.T + ff.linear1.bias[:, None])
    torch.testing.assert_close(ff(x), want.T + ff.linear2.bias, atol=1e-12, rtol=0)
