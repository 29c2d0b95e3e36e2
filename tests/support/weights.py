"""Copy torch.nn reference layers' weights into ours, for the parity tests (ours vs nn.MultiheadAttention,
nn.TransformerEncoderLayer, nn.TransformerDecoderLayer on the same weights)."""

import torch


def copy_mha(ours, ref):
    """Copy torch.nn.MultiheadAttention's packed in-projection (rows q, k, v) into ours: self-attention's
    one `in_proj`, or cross-attention's `q_proj` and `kv_proj`."""
    with torch.no_grad():
        if ours.cross:
            c = ours.d_model
            ours.q_proj.weight.copy_(ref.in_proj_weight[:c])
            ours.q_proj.bias.copy_(ref.in_proj_bias[:c])
            ours.kv_proj.weight.copy_(ref.in_proj_weight[c:])
            ours.kv_proj.bias.copy_(ref.in_proj_bias[c:])
        else:
            ours.in_proj.weight.copy_(ref.in_proj_weight)
            ours.in_proj.bias.copy_(ref.in_proj_bias)
        ours.out_proj.weight.copy_(ref.out_proj.weight)
        ours.out_proj.bias.copy_(ref.out_proj.bias)


def in_proj_grads(ours):
    """Our attention's in-projection gradients as torch's packed (weight, bias), rows q, k, v."""
    if ours.cross:
        return (
            torch.cat([ours.q_proj.weight.grad, ours.kv_proj.weight.grad]),
            torch.cat([ours.q_proj.bias.grad, ours.kv_proj.bias.grad]),
        )
    return ours.in_proj.weight.grad, ours.in_proj.bias.grad


def copy_ff_norms(ours, ref, n_norms):
    with torch.no_grad():
        ours.ff.linear1.load_state_dict(ref.linear1.state_dict())
        ours.ff.linear2.load_state_dict(ref.linear2.state_dict())
        for i in range(1, n_norms + 1):
            getattr(ours, f"norm{i}").load_state_dict(getattr(ref, f"norm{i}").state_dict())


def copy_encoder_layer(ours, ref):
    copy_mha(ours.self_attn, ref.self_attn)
    copy_ff_norms(ours, ref, 2)


def copy_decoder_layer(ours, ref):
    copy_mha(ours.self_attn, ref.self_attn)
    copy_mha(ours.cross_attn, ref.multihead_attn)
    copy_ff_norms(ours, ref, 3)


def torch_transformer_like(model):
    """torch.nn.Transformer of `model`'s (a Seq2Seq with final_norm=True) shape, with its weights: every
    layer and both final norms copied (nn.Transformer always has the norms), dropout 0, eval mode."""
    c = model.config
    ref = torch.nn.Transformer(
        c.d_model, c.n_heads, c.n_layers, c.decoder_layers, c.d_ff, dropout=0.0, batch_first=True,
        norm_first=c.norm_first,
    ).to(next(model.parameters()))  # fmt: skip
    for ours, theirs in zip(model.encoder.layers, ref.encoder.layers, strict=True):
        copy_encoder_layer(ours, theirs)
    for ours, theirs in zip(model.decoder.layers, ref.decoder.layers, strict=True):
        copy_decoder_layer(ours, theirs)
    with torch.no_grad():
        model.encoder.norm.load_state_dict(ref.encoder.norm.state_dict())
        model.decoder.norm.load_state_dict(ref.decoder.norm.state_dict())
    return ref.eval()


def torch_stack_logits(model, ref_encoder, ref_decoder, src, tgt, pad_id=0):
    """`model`'s logits computed by torch's encoder and decoder stacks in place of its own: its embeddings,
    positions and output layer around them, the paper's masks in torch's convention (True = masked)."""
    from tformer.attention import causal_mask

    src_keep = src != pad_id
    memory = ref_encoder(model.encoder.positions(model.src_embed(src)), src_key_padding_mask=~src_keep)
    t = tgt.shape[1]
    out = ref_decoder(
        model.decoder.positions(model.tgt_embed(tgt)),
        memory,
        tgt_mask=~causal_mask(t, device=src.device),
        memory_key_padding_mask=~src_keep,
        tgt_is_causal=True,
    )
    return model.output(out)
