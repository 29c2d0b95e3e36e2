"""The whole encoder-decoder against torch.nn.Transformer on copied weights, and cached decoding parity."""

import pytest
import torch

from support.weights import copy_decoder_layer, copy_encoder_layer, torch_stack_logits, torch_transformer_like
from tformer.config import ModelConfig
from tformer.models import Seq2Seq

SRC = torch.tensor([[5, 6, 7, 8, 9, 10, 2], [5, 6, 7, 2, 0, 0, 0], [11, 2, 0, 0, 0, 0, 0]])
TGT = torch.tensor([[1, 4, 5, 6, 7], [1, 8, 9, 0, 0], [1, 3, 0, 0, 0]])


def _config(**kw):
    base = dict(
        src_vocab_size=20,
        tgt_vocab_size=15,
        d_model=16,
        n_heads=4,
        d_ff=32,
        n_layers=2,
        n_decoder_layers=3,
        dropout=0.0,
        max_seq_len=32,
        attention="math",
    )
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("norm_first", [False, True])
def test_model_matches_torch_transformer(norm_first):
    """nn.Transformer always puts a LayerNorm after each stack: compare with final_norm=True."""
    model = Seq2Seq(_config(norm_first=norm_first, final_norm=True)).double().eval()
    ref = torch_transformer_like(model)
    ours = model(SRC, TGT).logits
    want = torch_stack_logits(model, ref.encoder, ref.decoder, SRC, TGT)
    torch.testing.assert_close(ours, want, atol=1e-10, rtol=0)
    # Gradients through the whole model, embeddings included (shared parameters: compare via autograd).
    (e_ours, q_ours) = torch.autograd.grad(
        (ours**2).sum(), [model.src_embed.weight, model.encoder.layers[0].self_attn.in_proj.weight]
    )
    (e_want, in_proj) = torch.autograd.grad(
        (want**2).sum(), [model.src_embed.weight, ref.encoder.layers[0].self_attn.in_proj_weight]
    )
    torch.testing.assert_close(e_ours, e_want, atol=1e-10, rtol=0)
    torch.testing.assert_close(q_ours, in_proj, atol=1e-10, rtol=0)


def test_post_norm_without_final_norm_matches_torch_stacks():
    """The paper's post-norm model has no extra LayerNorm after the stacks."""
    c = _config()
    model = Seq2Seq(c).double().eval()
    assert isinstance(model.encoder.norm, torch.nn.Identity)
    enc_layer = torch.nn.TransformerEncoderLayer(c.d_model, c.n_heads, c.d_ff, dropout=0.0, batch_first=True)
    dec_layer = torch.nn.TransformerDecoderLayer(c.d_model, c.n_heads, c.d_ff, dropout=0.0, batch_first=True)
    ref_enc = torch.nn.TransformerEncoder(enc_layer, c.n_layers, enable_nested_tensor=False).double().eval()
    ref_dec = torch.nn.TransformerDecoder(dec_layer, c.decoder_layers).double().eval()
    for ours, theirs in zip(model.encoder.layers, ref_enc.layers, strict=True):
        copy_encoder_layer(ours, theirs)
    for ours, theirs in zip(model.decoder.layers, ref_dec.layers, strict=True):
        copy_decoder_layer(ours, theirs)
    with torch.no_grad():
        torch.testing.assert_close(
            model(SRC, TGT).logits, torch_stack_logits(model, ref_enc, ref_dec, SRC, TGT), atol=1e-10, rtol=0
        )


@pytest.mark.parametrize("attention", ["math", "sdpa"])
@pytest.mark.parametrize("norm_first", [False, True])
def test_cached_decoding_equals_teacher_forcing(attention, norm_first):
    model = Seq2Seq(_config(attention=attention, norm_first=norm_first)).double().eval()
    with torch.no_grad():
        full = model(SRC, TGT).logits
        memory, memory_mask, _ = model.encode(SRC)
        cache = model.start_cache(memory, memory_mask)
        steps = []
        for t in range(TGT.shape[1]):
            out = model.decode_step(TGT[:, t : t + 1], cache)
            cache = out.cache
            steps.append(out.logits)
    assert cache.length == TGT.shape[1]
    assert cache.self_kv[0].k.shape == (3, 4, TGT.shape[1], 4)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-10, rtol=0)


def test_shared_and_tied_embeddings():
    model = Seq2Seq(_config(src_vocab_size=15, share_embeddings=True, tie_output=True))
    assert model.src_embed is model.tgt_embed
    assert model.output.weight is model.tgt_embed.weight
    untied = Seq2Seq(_config(tie_output=False))
    assert untied.output.weight is not untied.tgt_embed.weight
    n_shared = sum(p.numel() for p in model.parameters())
    assert n_shared < sum(p.numel() for p in untied.parameters())


def test_embeddings_scaled_by_sqrt_d_model():
    model = Seq2Seq(_config()).double()
    ids = torch.tensor([[3, 4]])
    torch.testing.assert_close(model.src_embed(ids), model.src_embed.weight[ids] * 4.0)


def test_paper_base_is_the_default_config():
    c = ModelConfig()
    assert (c.n_layers, c.decoder_layers, c.d_model, c.n_heads, c.d_ff, c.dropout) == (
        6,
        6,
        512,
        8,
        2048,
        0.1,
    )
    assert not c.norm_first and c.positions == "sinusoidal"


def test_attention_weights_are_returned_not_stored():
    model = Seq2Seq(_config()).eval()
    with torch.no_grad():
        out = model(SRC, TGT, need_weights=True)
    assert len(out.encoder_attention) == 2 and len(out.cross_attention) == 3
    assert out.cross_attention[0].shape == (3, 4, 5, 7)
    # Rows sum to one; padded source positions get no weight.
    torch.testing.assert_close(out.cross_attention[0].sum(-1), torch.ones(3, 4, 5))
    assert out.cross_attention[0][1, :, :, 4:].abs().max() == 0
