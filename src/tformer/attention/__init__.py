"""How tokens look at each other: masks, attention backends, multi-head attention."""

from tformer.attention.backends import available_backends, get_backend, math_attention, sdpa_attention
from tformer.attention.kv_cache import KV, KVCache, LayerKV
from tformer.attention.masks import causal_mask, check_mask, combine, lengths_mask, padding_mask
from tformer.attention.multihead import AttentionOutput, MultiHeadAttention

__all__ = [
    "KV",
    "AttentionOutput",
    "KVCache",
    "LayerKV",
    "MultiHeadAttention",
    "available_backends",
    "causal_mask",
    "check_mask",
    "combine",
    "get_backend",
    "lengths_mask",
    "math_attention",
    "padding_mask",
    "sdpa_attention",
]
