"""Small random Hugging Face models saved as directories (config.json, model.safetensors, tokenizer.json),
for the interop tests: GPT-2, BERT, Marian. Every parameter redrawn with a large spread (LayerNorm gains
around 1), so a tensor copied to the wrong place moves the outputs far. Needs transformers: import it from
a test module after `pytest.importorskip("transformers")`."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

V = 64  # vocabulary of every test model


def randomise(model: torch.nn.Module, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_positions" in name:  # Marian's fixed sinusoids (not saved; rebuilt on loading)
                continue
            gain = 1.0 if p.dim() == 1 and name.endswith("weight") else 0.0  # LayerNorm gains around 1
            p.copy_(torch.randn(p.shape, generator=g) * std + gain)


def word_tokenizer(specials: list[str], unk: str) -> HFTokenizer:
    """A word-level tokenizer.json with V entries: the specials first, then w0, w1, ..."""
    words = [f"w{i}" for i in range(V - len(specials))]
    vocab = {tok: i for i, tok in enumerate([*specials, *words])}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def save_gpt2(d: Path) -> Path:
    """A small random gpt2 model and its word-level tokenizer.json saved in the directory `d`."""
    config = transformers.GPT2Config(
        vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=48, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config)
    randomise(model)
    model.save_pretrained(d)
    word_tokenizer(["<|endoftext|>"], "<|endoftext|>").save(str(d / "tokenizer.json"))
    return d


def save_bert(d: Path) -> Path:
    """A small random bert model and its word-level tokenizer.json saved in the directory `d`."""
    config = transformers.BertConfig(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=40,
        type_vocab_size=2,
    )
    model = transformers.BertModel(config)
    randomise(model)
    model.save_pretrained(d)
    word_tokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], "[UNK]").save(str(d / "tokenizer.json"))
    return d


def save_marian(d: Path) -> Path:
    """A small random marian model and its word-level tokenizer.json saved in the directory `d`."""
    config = transformers.MarianConfig(
        vocab_size=V,
        d_model=32,
        encoder_layers=2,
        decoder_layers=3,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=48,
        decoder_ffn_dim=48,
        max_position_embeddings=40,
        activation_function="swish",  # as the released opus-mt models
        scale_embedding=True,
        pad_token_id=V - 1,
        decoder_start_token_id=V - 1,
        eos_token_id=0,
    )
    model = transformers.MarianMTModel(config)
    randomise(model)
    with torch.no_grad():
        # a buffer: randomise leaves it at zero
        model.final_logits_bias.copy_(torch.randn(1, V, generator=torch.Generator().manual_seed(2)))
    model.save_pretrained(d)
    word_tokenizer(["</s>", "<unk>"], "<unk>").save(str(d / "tokenizer.json"))
    return d
