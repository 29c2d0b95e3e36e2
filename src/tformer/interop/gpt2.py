"""GPT-2 (`GPT2LMHeadModel`) <-> tformer's LanguageModel.

GPT-2 is the pre-norm causal stack tformer's LM already is: learned positions added to unscaled token
embeddings, LayerNorm (eps `layer_norm_epsilon`) before each sublayer and after the stack (ln_f), the
tanh-approximated GELU ("gelu_new"), biases everywhere, and the output tied to the token embedding. Its
Conv1D layers store weights as (in, out), the transpose of nn.Linear's; c_attn holds q, k, v side by side
in that order, which transposed is exactly tformer's fused in_proj.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tformer.config import LMConfig
from tformer.interop.common import ACTIVATIONS_OUT, HFConfig, InteropError, Tensors, conv1d, prefixed
from tformer.models.lm import LanguageModel


def lm_config(cfg: HFConfig) -> LMConfig:
    """config.json of a GPT-2 model -> LMConfig; fields tformer cannot reproduce are errors."""
    d = cfg.need("n_embd")
    vocab = cfg.need("vocab_size")
    cfg.expect("scale_attn_weights", True, True, "attention is always scaled by 1/sqrt(d_head)")
    cfg.expect("scale_attn_by_inverse_layer_idx", False, False, "no per-layer attention scaling")
    cfg.expect("add_cross_attention", False, False, "a language model has no cross-attention")
    return LMConfig(
        vocab_size=vocab,
        d_model=d,
        n_heads=cfg.need("n_head"),
        d_ff=cfg.get("n_inner") or 4 * d,
        n_layers=cfg.need("n_layer"),
        dropout=float(cfg.get("resid_pdrop", 0.1)),
        attention_dropout=float(cfg.get("attn_pdrop", 0.1)),
        max_seq_len=cfg.need("n_positions"),
        norm_first=True,
        final_norm=True,
        activation=cfg.activation("activation_function", "gelu_new"),
        positions="learned",
        scale_embeddings=False,
        bias=True,
        layer_norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
        tie_output=bool(cfg.get("tie_word_embeddings", True)),
        pad_id=cfg.token_id("pad_token_id", vocab, fallback="eos_token_id"),
    )


def _top(c: LMConfig) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
    """(tformer name, GPT-2 name, shape) outside the blocks."""
    d, p = c.d_model, "transformer"
    return (
        ("blocks.embed.weight", f"{p}.wte.weight", (c.vocab_size, d)),
        ("blocks.positions.table", f"{p}.wpe.weight", (c.max_seq_len, d)),
        ("blocks.norm.weight", f"{p}.ln_f.weight", (d,)),
        ("blocks.norm.bias", f"{p}.ln_f.bias", (d,)),
    )


def _convs(c: LMConfig) -> tuple[tuple[str, str, int, int], ...]:
    """Per block: (tformer nn.Linear, GPT-2 Conv1D, in features, out features)."""
    d, f = c.d_model, c.d_ff
    return (
        ("self_attn.in_proj", "attn.c_attn", d, 3 * d),
        ("self_attn.out_proj", "attn.c_proj", d, d),
        ("ff.linear1", "mlp.c_fc", d, f),
        ("ff.linear2", "mlp.c_proj", f, d),
    )


_NORMS = (("norm1", "ln_1"), ("norm2", "ln_2"))  # per block: tformer LayerNorm, GPT-2's


def _block(i: int) -> tuple[str, str]:
    return f"transformer.h.{i}", f"blocks.layers.{i}"


# The one GPT-2 <-> LanguageModel mapping: the three tables above, read in both directions (`lm_state`
# in, `gpt2_state` out; bench.common copies Hugging Face models through `lm_state` too).


def lm_state(t: Tensors, c: LMConfig) -> dict[str, Tensor]:
    """GPT-2's tensors -> LanguageModel state dict (prefix "transformer." as GPT2LMHeadModel saves it)."""
    d = c.d_model
    state = {ours: t.take(theirs, shape) for ours, theirs, shape in _top(c)}
    for i in range(c.n_layers):
        h, o = _block(i)
        for ours, theirs, n_in, n_out in _convs(c):
            state.update(prefixed(f"{o}.{ours}", conv1d(t, f"{h}.{theirs}", n_in, n_out)))
        for ours, theirs in _NORMS:
            state[f"{o}.{ours}.weight"] = t.take(f"{h}.{theirs}.weight", (d,))
            state[f"{o}.{ours}.bias"] = t.take(f"{h}.{theirs}.bias", (d,))
        # the causal-mask buffers older transformers versions saved; tformer builds its mask from a flag
        t.ignore(f"{h}.attn.bias", "causal mask buffer")
        t.ignore(f"{h}.attn.masked_bias", "mask fill value buffer")
    if c.tie_output:
        t.take_same("lm_head.weight", state["blocks.embed.weight"], "transformer.wte.weight")
    else:
        state["output.weight"] = t.take("lm_head.weight", (c.vocab_size, d))
    return state


def check_exportable(c: LMConfig, source: str) -> None:
    """The LM options GPT-2 has no way to express are errors naming the field."""
    needs: list[tuple[str, Any, Any]] = [
        ("norm_first", c.norm_first, True),
        ("use_final_norm", c.use_final_norm, True),
        ("positions", c.positions, "learned"),
        ("scale_embeddings", c.scale_embeddings, False),
        ("bias", c.bias, True),
        ("token_types", c.token_types, 0),
        ("embedding_norm", c.embedding_norm, False),
    ]
    for key, value, wanted in needs:
        if value != wanted:
            raise InteropError(f"{source}: model.{key} = {value!r}; GPT-2 needs {wanted!r}")
    if c.n_kv_heads not in (None, c.n_heads):
        raise InteropError(
            f"{source}: model.n_kv_heads = {c.n_kv_heads}; GPT-2 has one key/value head per head"
        )
    if c.activation not in ACTIVATIONS_OUT:
        raise InteropError(f"{source}: model.activation = {c.activation!r} has no Hugging Face name")


def gpt2_config(c: LMConfig, *, bos_id: int, eos_id: int, pad_id: int) -> dict[str, Any]:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c.vocab_size,
        "n_positions": c.max_seq_len,
        "n_embd": c.d_model,
        "n_layer": c.n_layers,
        "n_head": c.n_heads,
        "n_inner": c.d_ff,
        "activation_function": ACTIVATIONS_OUT[c.activation],
        "resid_pdrop": c.dropout,
        "embd_pdrop": c.dropout,
        "attn_pdrop": c.attention_dropout,
        "layer_norm_epsilon": c.layer_norm_eps,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": c.tie_output,
        "use_cache": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
    }


def gpt2_state(model: LanguageModel) -> dict[str, Tensor]:
    """LanguageModel -> GPT2LMHeadModel's tensors (Conv1D weights transposed back to (in, out))."""
    c, sd = model.config, model.state_dict()
    out = {theirs: sd[ours] for ours, theirs, _ in _top(c)}
    for i in range(c.n_layers):
        h, o = _block(i)
        for ours, theirs, _, _ in _convs(c):
            out[f"{h}.{theirs}.weight"] = sd[f"{o}.{ours}.weight"].t()
            out[f"{h}.{theirs}.bias"] = sd[f"{o}.{ours}.bias"]
        for ours, theirs in _NORMS:
            out[f"{h}.{theirs}.weight"] = sd[f"{o}.{ours}.weight"]
            out[f"{h}.{theirs}.bias"] = sd[f"{o}.{ours}.bias"]
    if not c.tie_output:
        out["lm_head.weight"] = sd["output.weight"]
    return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in out.items()}
