"""The [model] section: TransformerConfig (what every family shares; defaults = the paper's base model) and
the three families' classes, Seq2SeqConfig (ModelConfig: its deprecated alias), ClassifierConfig and
LMConfig. What each attention backend can do comes from tformer/backends.py's table. Imports no torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tformer import backends, families
from tformer.config.base import (
    ConfigError,
    Section,
    check_choice,
    check_positive,
    check_probability,
    check_types,
)

# what each attention backend can do: tformer/backends.py (torch-free), the one table
ATTENTION_BACKENDS = tuple(backends.BACKENDS)
ATTENTION_SCORES = backends.SCORES
SCORE_BACKENDS = tuple(n for n, b in backends.BACKENDS.items() if b.scores == backends.EXACT)
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")
POSITIONS = ("sinusoidal", "sinusoidal_concat", "learned", "rotary", "none")
POOLINGS = ("cls", "mean")


@dataclass(frozen=True)
class TransformerConfig(Section):
    """Hyper-parameters every model family shares. Defaults: the paper's base model (Table 3)."""

    d_model: int = 512
    n_heads: int = 8
    d_ff: int = 2048
    n_layers: int = 6
    dropout: float = 0.1
    attention_dropout: float = 0.0  # the paper drops sublayer outputs, not attention weights
    max_seq_len: int = 512
    norm_first: bool = False  # False: post-norm, as in the paper; True: pre-norm
    final_norm: bool | None = None  # LayerNorm after the stack(s); None: only with pre-norm
    activation: str = "relu"
    positions: str = "sinusoidal"
    scale_embeddings: bool = True  # multiply embeddings by sqrt(d_model) (paper section 3.4)
    bias: bool = True  # biases in linear layers and LayerNorms
    attention: str = "sdpa"
    attention_window: int = 256  # "local" attention: how far each query sees
    linformer_rank: int = 64  # "linformer" attention: length keys and values are projected to
    n_kv_heads: int | None = None  # grouped-query attention: key/value heads (None: n_heads; 1: multi-query)
    attention_score: str = "dot"  # "dot" (paper), "cosine" (learned temperature), "l2" (-squared distance)
    layer_norm_eps: float = 1e-5
    token_types: int = 0  # segment (token type) embeddings added to the tokens' (BERT's type_vocab_size)
    embedding_norm: bool = False  # LayerNorm over embeddings + positions, before dropout (BERT)
    pad_id: int = 0
    # "transformer", or a baseline: "lstm" / "gru" (translation with additive attention, lm, classification),
    # "cnn" (classification). Baselines read d_model (hidden size), n_layers and dropout; the rest is unused.
    architecture: str = "transformer"
    position_kinds: ClassVar[tuple[str, ...]] = POSITIONS  # what `positions` may be (vision: its own)

    def __post_init__(self) -> None:
        check_types(self)
        name = type(self).__name__
        family = families.for_config(type(self))
        allowed = family.architectures if family else ("transformer",)
        if self.architecture not in allowed:
            raise ConfigError(
                f"{name}.architecture = {self.architecture!r} is not available for "
                f"{family.name if family else name}; choose one of {', '.join(allowed)}"
            )
        check_positive(
            name,
            d_model=self.d_model,
            n_heads=self.n_heads,
            d_ff=self.d_ff,
            n_layers=self.n_layers,
            max_seq_len=self.max_seq_len,
            layer_norm_eps=self.layer_norm_eps,
            attention_window=self.attention_window,
            linformer_rank=self.linformer_rank,
        )
        if self.architecture == "transformer" and self.d_model % self.n_heads:  # baselines have no heads
            raise ConfigError(
                f"{name}.d_model = {self.d_model} must be divisible by n_heads = {self.n_heads}"
            )
        if self.n_kv_heads is not None and (self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads):
            raise ConfigError(f"{name}.n_kv_heads = {self.n_kv_heads} must divide n_heads = {self.n_heads}")
        if self.architecture == "transformer" and self.positions == "rotary" and self.d_head % 2:
            raise ConfigError(f"{name}.positions = 'rotary' needs an even d_head, got {self.d_head}")
        check_probability(name, dropout=self.dropout, attention_dropout=self.attention_dropout)
        check_choice(name, "activation", self.activation, ACTIVATIONS)
        check_choice(name, "positions", self.positions, self.position_kinds)
        check_choice(name, "attention_score", self.attention_score, ATTENTION_SCORES)
        self._check_backend("attention", self.attention)
        if self.token_types < 0:
            raise ConfigError(f"{name}.token_types must be >= 0, got {self.token_types}")

    def _check_backend(self, key: str, value: str, *, causal: bool = False, cross: bool = False) -> None:
        """`value` (config key `key`) is a backend that can serve its role (tformer/backends.py)."""
        name = type(self).__name__
        check_choice(name, key, value, tuple(backends.BACKENDS))
        spec = backends.BACKENDS[value]
        problem = backends.unsupported(
            spec, score=self.attention_score, dropout=self.attention_dropout, causal=causal, cross=cross
        )
        if problem:
            role = " (the causal self-attention)" if causal and key == "attention" else ""
            raise ConfigError(f"{name}.{key}{role} = {value!r} {problem}")

    def _check_vocab(self, **sizes: int) -> None:
        name = type(self).__name__
        check_positive(name, **sizes)
        if not 0 <= self.pad_id < min(sizes.values()):
            raise ConfigError(f"{name}.pad_id = {self.pad_id} is outside the vocabulary")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def use_final_norm(self) -> bool:
        return self.norm_first if self.final_norm is None else self.final_norm


@dataclass(frozen=True)
class Seq2SeqConfig(TransformerConfig):
    """The paper's encoder-decoder (translation). Defaults: the base model."""

    src_vocab_size: int = 32000
    tgt_vocab_size: int = 32000
    n_decoder_layers: int | None = None  # None: same as n_layers
    share_embeddings: bool = False  # one embedding for source and target (needs one vocabulary)
    tie_output: bool = True  # output projection shares the target embedding (paper section 3.4)
    output_bias: bool = False  # a bias on the output logits (Marian's final_logits_bias)
    bidirectional: bool = True  # lstm / gru: a bidirectional encoder (d_model / 2 per direction)
    # the other attention roles (tformer/backends.py); None: `attention` where it can fill the role, else
    # "sdpa" (a `local` translator attends to its whole source, a `linformer` one's decoder is causal)
    decoder_attention: str | None = None  # the decoder's causal self-attention
    cross_attention: str | None = None  # the decoder's attention to the encoder output

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        self._check_vocab(src_vocab_size=self.src_vocab_size, tgt_vocab_size=self.tgt_vocab_size)
        for key in ("token_types", "embedding_norm"):
            if getattr(self, key):
                raise ConfigError(f"{name}.{key} is for encoder-only stacks; a translation model has none")
        if self.n_decoder_layers is not None:
            check_positive(name, n_decoder_layers=self.n_decoder_layers)
        self._check_backend("decoder_attention", self.decoder_backend, causal=True)
        self._check_backend("cross_attention", self.cross_backend, cross=True)
        if self.architecture != "transformer" and self.bidirectional and self.d_model % 2:
            raise ConfigError(
                f"{name}.d_model = {self.d_model} must be even for a bidirectional {self.architecture} "
                "encoder (d_model / 2 per direction); set bidirectional = false or an even d_model"
            )
        if self.share_embeddings and self.src_vocab_size != self.tgt_vocab_size:
            raise ConfigError(
                f"{name}.share_embeddings needs src_vocab_size == tgt_vocab_size, "
                f"got {self.src_vocab_size} and {self.tgt_vocab_size}"
            )

    @property
    def decoder_layers(self) -> int:
        return self.n_layers if self.n_decoder_layers is None else self.n_decoder_layers

    @property
    def decoder_backend(self) -> str:
        """The backend of the decoder's self-attention (`decoder_attention`, resolved)."""
        return backends.role(self.attention, self.decoder_attention, causal=True)

    @property
    def cross_backend(self) -> str:
        """The backend of cross-attention (`cross_attention`, resolved)."""
        return backends.role(self.attention, self.cross_attention, cross=True)


# The class's name before 0.3, kept importable: every `ModelConfig` is a Seq2SeqConfig (deprecated alias).
ModelConfig = Seq2SeqConfig


@dataclass(frozen=True)
class ClassifierConfig(TransformerConfig):
    """Encoder + pooling + dropout + linear head (the literature's Transformer classifier)."""

    vocab_size: int = 8000
    n_classes: int = 2
    pooling: str = "cls"  # "cls": the first position (BOS, prepended by the task); "mean": non-padding mean
    n_layers: int = 4
    d_model: int = 256
    n_heads: int = 4
    d_ff: int = 1024
    max_seq_len: int = 128
    cnn_widths: tuple[int, ...] = (3, 4, 5)  # cnn: filter widths (Kim, 2014)
    cnn_filters: int = 100  # cnn: filters per width

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_vocab(vocab_size=self.vocab_size)
        if not self.cnn_widths or not all(w > 0 for w in self.cnn_widths):
            raise ConfigError(
                f"ClassifierConfig.cnn_widths must be positive integers, got {list(self.cnn_widths)}"
            )
        check_positive(type(self).__name__, cnn_filters=self.cnn_filters)
        if self.n_classes < 2:
            raise ConfigError(f"{type(self).__name__}.n_classes must be >= 2, got {self.n_classes}")
        check_choice(type(self).__name__, "pooling", self.pooling, POOLINGS)


@dataclass(frozen=True)
class LMConfig(TransformerConfig):
    """Decoder-only language model (GPT-style): pre-norm, GELU, learned positions, tied output."""

    vocab_size: int = 8000
    d_model: int = 384
    n_heads: int = 6
    d_ff: int = 1536
    n_layers: int = 6
    dropout: float = 0.0
    max_seq_len: int = 256
    norm_first: bool = True
    activation: str = "gelu"
    positions: str = "learned"
    scale_embeddings: bool = False
    tie_output: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_vocab(vocab_size=self.vocab_size)
        self._check_backend("attention", self.attention, causal=True)  # the stack runs causally
