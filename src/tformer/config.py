"""Configuration as frozen, validated data. Imports no torch.

Every run is reproduced from its saved config and seed. Unknown keys are errors that name the closest
valid key; values are checked on construction so a bad config fails before any tensor is made.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

from tformer import backends, families

# what each attention backend can do: tformer/backends.py (torch-free), the one table
ATTENTION_BACKENDS = tuple(backends.BACKENDS)
ATTENTION_SCORES = backends.SCORES
SCORE_BACKENDS = tuple(n for n, b in backends.BACKENDS.items() if b.scores == backends.EXACT)
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")
POSITIONS = ("sinusoidal", "sinusoidal_concat", "learned", "rotary", "none")
POOLINGS = ("cls", "mean")
SCHEDULES = ("inverse_sqrt", "cosine", "constant")
TOKENIZERS = ("word", "bpe", "char")
# Task names, each family's [model] class and its architectures come from tformer.families (the registry);
# TASKS is the built-in families' names, kept for importers (the checks below ask the registry each time).
TASKS = families.names()

C = TypeVar("C", bound="_Config")


class ConfigError(ValueError):
    """A configuration value or key that cannot be used."""


INT64 = (-(2**63), 2**63)  # TOML's integers; any count or seed beyond them cannot be a tensor or a seed


def _short(text: str, limit: int = 60) -> str:
    """Keep messages short: a 400-digit number or a 5,000-character argument is cut."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _show(value: Any) -> str:
    try:
        return _short(repr(value))
    except ValueError:  # an int past Python's digit limit for str()
        return f"<an int of {value.bit_length()} bits>"


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else f" (valid keys: {', '.join(sorted(options))})"


def _check_choice(cls_name: str, key: str, value: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str):
        raise ConfigError(
            f"{cls_name}.{key} = {_show(value)} is not a string; expected one of {', '.join(choices)}"
        )
    if value not in choices:
        raise ConfigError(f"{cls_name}.{key} = {value!r} is not one of {', '.join(choices)}")


def _type_ok(value: Any, annotation: str) -> bool:
    """Check a value against a field annotation written as a string (from __future__ annotations)."""
    options = [a.strip() for a in annotation.split("|")]
    for option in options:
        if option == "None" and value is None:
            return True
        if option == "bool" and isinstance(value, bool):
            return True
        if option == "int" and isinstance(value, int) and not isinstance(value, bool):
            return True
        if option == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if option == "str" and isinstance(value, str):
            return True
        if option.startswith("tuple") and isinstance(value, (tuple, list)):
            return True
        if option == "Any":
            return True
    return False


def _checked(cls_name: str, key: str, value: Any, annotation: str) -> Any:
    """`value` if it is of type `annotation`, ints made floats where floats are declared; else a ConfigError
    naming the key, the value and the type. Floats must be finite (a NaN compares false with every bound,
    so it would slip past the range checks) and ints must fit in 64 bits."""
    if not _type_ok(value, annotation):
        raise ConfigError(
            f"{cls_name}.{key} = {_show(value)} ({type(value).__name__}); expected {annotation}"
        )
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int) and "float" in annotation and "int" not in annotation:
        try:
            value = float(value)
        except OverflowError:
            raise ConfigError(f"{cls_name}.{key} = {_show(value)} is too large for a float") from None
    elif isinstance(value, int) and not INT64[0] <= value < INT64[1]:
        raise ConfigError(f"{cls_name}.{key} = {_show(value)} is outside the 64-bit integers")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{cls_name}.{key} = {value!r} is not a finite number")
    tuple_of = re.fullmatch(r"tuple\[(.*)\]", annotation.strip())
    if tuple_of and isinstance(value, (tuple, list)):
        items = [t.strip() for t in tuple_of.group(1).split(",")]
        if items[-1] == "...":
            items = items[:1] * len(value)
        elif len(value) != len(items):
            n = len(value)
            raise ConfigError(f"{cls_name}.{key} has {n} item{'s' * (n != 1)}; expected {len(items)}")
        value = tuple(
            _checked(cls_name, f"{key}[{i}]", v, t) for i, (v, t) in enumerate(zip(value, items, strict=True))
        )
    return value


def _check_types(config: Any) -> None:
    """Each field holds a value of its declared type (see _checked); tuples are made tuples."""
    for f in fields(config):
        annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        value = _checked(type(config).__name__, f.name, getattr(config, f.name), annotation)
        object.__setattr__(config, f.name, value)


def _check_positive(cls_name: str, **values: float) -> None:
    for key, value in values.items():
        if not value > 0:
            raise ConfigError(f"{cls_name}.{key} must be > 0, got {value!r}")


def _check_nonnegative(cls_name: str, **values: float) -> None:
    for key, value in values.items():
        if not value >= 0:
            raise ConfigError(f"{cls_name}.{key} must be >= 0, got {value!r}")


def _check_probability(cls_name: str, **values: float) -> None:
    for key, value in values.items():
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{cls_name}.{key} must be in [0, 1), got {value!r}")


@dataclass(frozen=True)
class _Config:
    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any], *, source: str = "config") -> C:
        """Build from a mapping; unknown keys raise a ConfigError naming the closest valid key. Every error
        starts with `source` (the file the mapping came from)."""
        if not isinstance(data, dict):
            raise ConfigError(
                f"{source}: expected a mapping of {cls.__name__} keys, got a {type(data).__name__}"
            )
        names = [f.name for f in fields(cls)]
        for key in data:
            if key not in names:
                raise ConfigError(
                    f"{source}: unknown {cls.__name__} key '{_short(str(key))}'{_closest(str(key), names)}"
                )
        try:
            return cls(**data)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self: C, **changes: Any) -> C:
        names = [f.name for f in fields(self)]
        for key in changes:
            if key not in names:
                raise ConfigError(f"unknown {type(self).__name__} key '{key}'{_closest(key, names)}")
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class TransformerConfig(_Config):
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

    def __post_init__(self) -> None:
        _check_types(self)
        name = type(self).__name__
        family = families.for_config(type(self))
        allowed = family.architectures if family else ("transformer",)
        if self.architecture not in allowed:
            raise ConfigError(
                f"{name}.architecture = {self.architecture!r} is not available for "
                f"{family.name if family else name}; choose one of {', '.join(allowed)}"
            )
        _check_positive(
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
        _check_probability(name, dropout=self.dropout, attention_dropout=self.attention_dropout)
        _check_choice(name, "activation", self.activation, ACTIVATIONS)
        _check_choice(name, "positions", self.positions, POSITIONS)
        _check_choice(name, "attention_score", self.attention_score, ATTENTION_SCORES)
        self._check_backend("attention", self.attention)
        if self.token_types < 0:
            raise ConfigError(f"{name}.token_types must be >= 0, got {self.token_types}")

    def _check_backend(self, key: str, value: str, *, causal: bool = False, cross: bool = False) -> None:
        """`value` (config key `key`) is a backend that can serve its role (tformer/backends.py)."""
        name = type(self).__name__
        _check_choice(name, key, value, tuple(backends.BACKENDS))
        spec = backends.BACKENDS[value]
        problem = backends.unsupported(
            spec, score=self.attention_score, dropout=self.attention_dropout, causal=causal, cross=cross
        )
        if problem:
            role = " (the causal self-attention)" if causal and key == "attention" else ""
            raise ConfigError(f"{name}.{key}{role} = {value!r} {problem}")

    def _check_vocab(self, **sizes: int) -> None:
        name = type(self).__name__
        _check_positive(name, **sizes)
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
            _check_positive(name, n_decoder_layers=self.n_decoder_layers)
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
        _check_positive(type(self).__name__, cnn_filters=self.cnn_filters)
        if self.n_classes < 2:
            raise ConfigError(f"{type(self).__name__}.n_classes must be >= 2, got {self.n_classes}")
        _check_choice(type(self).__name__, "pooling", self.pooling, POOLINGS)


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


@dataclass(frozen=True)
class TrainConfig(_Config):
    """Optimisation. Adam with the paper's betas and epsilon (section 5.3), label smoothing 0.1."""

    epochs: int = 10
    max_steps: int | None = None  # stop after this many optimiser steps, whatever the epoch
    max_time: float | None = None  # seconds; stop (and evaluate) once training has run this long
    batch_tokens: int = 4096  # target (source + target) tokens per batch, before padding
    max_batch_sentences: int = 512
    batch_size: int | None = None  # lm: sequences per batch (None: batch_tokens // max_seq_len)
    lr: float | None = None  # peak learning rate; None: the paper's d_model**-0.5 * warmup**-0.5
    schedule: str = "inverse_sqrt"
    warmup_steps: int = 4000
    min_lr: float = 0.0  # floor of the cosine schedule
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-9
    weight_decay: float = 0.0
    label_smoothing: float = 0.1
    clip_norm: float | None = 1.0  # gradient norm clipped to this; 0 or None: no clipping
    seed: int = 0
    eval_every_epochs: int = 1
    eval_every_steps: int | None = None  # also evaluate every this many steps (curves for long epochs)
    eval_beam_size: int = 1  # translation: decoding used for the BLEU printed at each evaluation
    eval_max_sentences: int | None = 500  # translation: decode at most this many validation sentences
    log_every: int = 50
    # "auto": bf16 where this machine's bfloat16 products are >= 2x float32's, else fp32 (accel/precision.py);
    # "bf16": bfloat16 autocast (CPU, GPU); "fp16": float16 autocast + grad scaler (GPU); "fp32"
    precision: str = "auto"
    compile: bool = False  # torch.compile the model (slow to start, faster steps)
    accumulate: int = 1  # batches per rank summed into one optimiser step (gradient accumulation)
    parallel: str = "ddp"  # with several processes (torchrun): "ddp" replicas or "fsdp" sharded (FSDP2)
    device: str = "auto"  # "auto": the process's CUDA GPU when there is one, else CPU; or "cpu", "cuda"
    init_from: str | None = None  # classification: start from "hf:DIR" (BERT) or a tformer checkpoint
    save_every_steps: int | None = 1000  # also checkpoint every this many steps (None: at evaluations only)
    keep_checkpoints: int = 2  # checkpoint-<step>/ directories kept in the run directory (newest first)
    max_nonfinite_skips: int = 10  # steps skipped for a non-finite gradient before training stops

    def __post_init__(self) -> None:
        _check_types(self)
        name = type(self).__name__
        _check_positive(
            name,
            epochs=self.epochs,
            batch_tokens=self.batch_tokens,
            max_batch_sentences=self.max_batch_sentences,
            eval_every_epochs=self.eval_every_epochs,
            log_every=self.log_every,
            accumulate=self.accumulate,
        )
        if self.max_steps is not None:
            _check_positive(name, max_steps=self.max_steps)
        for key in ("max_time", "batch_size", "eval_every_steps", "eval_max_sentences"):
            if getattr(self, key) is not None:  # None: no limit / derived / never / all
                _check_positive(name, **{key: getattr(self, key)})
        _check_positive(name, eps=self.eps, eval_beam_size=self.eval_beam_size)
        _check_nonnegative(name, weight_decay=self.weight_decay, min_lr=self.min_lr)
        if self.clip_norm is not None:  # 0 or None: no clipping (0 is fairseq's way, and TOML has no None)
            _check_nonnegative(name, clip_norm=self.clip_norm)
        if not 0 <= self.seed < 2**32:  # offsets are added per rank and step; torch's seeds stop at 2**64
            raise ConfigError(f"{name}.seed must be in [0, 2**32), got {self.seed}")
        if self.save_every_steps is not None:
            _check_positive(name, save_every_steps=self.save_every_steps)
        _check_positive(name, keep_checkpoints=self.keep_checkpoints)
        if self.max_nonfinite_skips < 0:
            raise ConfigError(f"{name}.max_nonfinite_skips must be >= 0, got {self.max_nonfinite_skips}")
        if self.lr is not None:
            _check_positive(name, lr=self.lr)
        if self.warmup_steps < 0:
            raise ConfigError(f"{name}.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check_choice(name, "schedule", self.schedule, SCHEDULES)
        _check_choice(name, "precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        _check_choice(name, "parallel", self.parallel, ("ddp", "fsdp"))
        _check_choice(name, "device", self.device, ("auto", "cpu", "cuda"))
        if self.init_from is not None and not self.init_from.strip():
            raise ConfigError(f"{name}.init_from is empty; give hf:DIR or a checkpoint directory")
        _check_probability(name, label_smoothing=self.label_smoothing)
        if self.schedule == "cosine" and self.max_steps is None:
            raise ConfigError(f"{name}.schedule = 'cosine' needs max_steps (the length of the decay)")
        if not all(0.0 <= b < 1.0 for b in self.betas):  # two floats: _check_types
            raise ConfigError(f"{name}.betas must be two numbers in [0, 1), got {self.betas!r}")


@dataclass(frozen=True)
class DataConfig(_Config):
    """Where the data is and how it becomes ids. In paths, "{data}" stands for $TFORMER_DATA, or
    ../shared/data when that is unset."""

    train: tuple[
        str, ...
    ] = ()  # translation: one TSV or two aligned files; lm: text; classification: csv/tsv/jsonl
    valid: tuple[str, ...] = ()
    test: tuple[str, ...] = ()
    tokenizer: str = "bpe"
    vocab_size: int = 8000
    shared_vocab: bool = True  # translation: one vocabulary for source and target
    text_column: str = "text"
    label_column: str = "label"
    valid_fraction: float = 0.0  # lm without a valid file: hold out this final fraction of the text

    def __post_init__(self) -> None:
        name = type(self).__name__
        for key in ("train", "valid", "test"):
            value = getattr(self, key)
            if isinstance(value, str):
                object.__setattr__(self, key, (value,))
        _check_types(self)  # lists become tuples
        _check_choice(name, "tokenizer", self.tokenizer, TOKENIZERS)
        _check_positive(name, vocab_size=self.vocab_size)
        _check_probability(name, valid_fraction=self.valid_fraction)

    def paths(self, key: str) -> list[str]:
        import os

        root = os.environ.get("TFORMER_DATA", "../shared/data")
        return [p.replace("{data}", root) for p in getattr(self, key)]


@dataclass(frozen=True)
class RunConfig(_Config):
    """A whole run as one TOML file: [model], [train] and [data] sections. The task picks the model class."""

    task: str = "translation"
    model: Any = None  # the task's model config; None: its defaults
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        _check_choice(type(self).__name__, "task", self.task, families.names())
        wanted = model_config_class(self.task)
        if self.model is None:
            object.__setattr__(self, "model", wanted())
        if not isinstance(self.model, wanted):
            article = "an" if wanted is LMConfig else "a"  # "an LMConfig", "a Seq2SeqConfig"
            raise ConfigError(
                f"RunConfig.model is a {type(self.model).__name__}; task {self.task!r} needs "
                f"{article} {wanted.__name__}"
            )
        for key, cls in (("train", TrainConfig), ("data", DataConfig)):
            if not isinstance(getattr(self, key), cls):
                value = getattr(self, key)
                raise ConfigError(
                    f"RunConfig.{key} = {_show(value)} ({type(value).__name__}); expected a {cls.__name__}"
                )
        if self.train.init_from and self.task != "classification":
            raise ConfigError(
                f"train.init_from starts a classifier from pretrained weights; the task is {self.task!r}"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config", task: str | None = None) -> RunConfig:
        sections = ["task", "model", "train", "data"]
        if not isinstance(data, dict):
            raise ConfigError(
                f"{source}: expected a mapping of sections ({', '.join(sections)}), got a {type(data).__name__}"
            )
        for key in data:
            if key not in sections:
                raise ConfigError(
                    f"{source}: unknown section '[{_short(str(key))}]'{_closest(str(key), sections)}"
                )
        if task and data.get("task", task) != task:
            raise ConfigError(f"{source}: a {_show(data['task'])} config, but the task asked for is {task!r}")
        task = task or data.get("task", "translation")
        tasks = ", ".join(families.names())
        if not isinstance(task, str):
            raise ConfigError(f"{source}: task = {_show(task)} is not a string; expected one of {tasks}")
        if task not in families.FAMILIES:
            raise ConfigError(f"{source}: task = {_show(task)} is not one of {tasks}")
        classes: dict[str, type[_Config]] = {
            "model": model_config_class(task),
            "train": TrainConfig,
            "data": DataConfig,
        }
        parts: dict[str, Any] = {}
        for key, section_cls in classes.items():
            value = data.get(key, {})
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{source}: [{key}] must be a table of {section_cls.__name__} keys, "
                    f"got {_show(value)} ({type(value).__name__})"
                )
            parts[key] = section_cls.from_dict(value, source=source)
        try:
            return cls(task=task, **parts)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "model": self.model.to_dict(),
            "train": self.train.to_dict(),
            "data": self.data.to_dict(),
        }


def model_config_class(task: str) -> type[TransformerConfig]:
    """The [model] section's class of a task (its family's, tformer.families)."""
    return families.get(task).config_class()


def load_toml(path: str | Path, *, task: str | None = None) -> RunConfig:
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:  # a directory, no permission
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror or exc})") from None
    except ValueError as exc:  # TOMLDecodeError; also bytes that are not UTF-8, an int past the digit limit
        raise ConfigError(f"{path}: not valid TOML: {_short(str(exc), 200)}") from None
    return RunConfig.from_dict(data, source=str(path), task=task)


def _parse_value(item: str, text: str) -> Any:
    """One TOML value; a bare word (or anything that is not one TOML value) stays a string."""
    try:
        parsed = tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        return text
    except ValueError:  # valid syntax that Python refuses, such as an int past the digit limit
        raise ConfigError(f"override '{_short(item)}': the value is not usable TOML") from None
    return parsed["v"] if list(parsed) == ["v"] else text  # "1\nx = 2" is not one value


def _blame(error: ConfigError, items: dict[str, str]) -> ConfigError:
    """`error`, prefixed by the overrides (key -> argument) it names, or all of them when it names none."""
    message = str(error)
    named = [item for key, item in items.items() if re.search(rf"(?<!\w){re.escape(key)}(?!\w)", message)]
    named = named or list(items.values())
    which = ", ".join(f"'{_short(item)}'" for item in named)
    return ConfigError(f"override{'s' * (len(named) > 1)} {which}: {message}")


def apply_overrides(config: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply `section.key=value` overrides; a bare `key=value` is looked up in model, train, data.

    All changes to a section are applied together, so `d_model=32 n_heads=2` is valid whatever the order.
    Every error names the argument(s) it comes from."""
    changes: dict[str, dict[str, Any]] = {"model": {}, "train": {}, "data": {}}
    arguments: dict[str, dict[str, str]] = {"model": {}, "train": {}, "data": {}}  # section -> key -> item
    sections = {"model": config.model, "train": config.train, "data": config.data}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{_short(item)}' is not of the form key=value")
        key, text = item.split("=", 1)
        section, dot, name = key.strip().rpartition(".")
        if not name.strip():
            raise ConfigError(
                f"override '{_short(item)}': the key is empty; write key=value or section.key=value"
            )
        if dot and not section.strip():
            raise ConfigError(
                f"override '{_short(item)}': the section is empty; write {name}=... or <section>.{name}=..."
            )
        if not section:
            owners = [sec for sec, cfg in sections.items() if name in [f.name for f in fields(cfg)]]
            if len(owners) > 1:
                raise ConfigError(
                    f"override '{_short(item)}': '{name}' is a key of {' and '.join(owners)}; write "
                    + " or ".join(f"{sec}.{name}" for sec in owners)
                )
            if not owners:
                every = [f.name for cfg in sections.values() for f in fields(cfg)]
                raise ConfigError(
                    f"override '{_short(item)}': unknown key '{_short(name)}'{_closest(name, every)}"
                )
            section = owners[0]
        if section not in sections:
            raise ConfigError(
                f"override '{_short(item)}': unknown section '{_short(section)}'"
                f"{_closest(section, list(sections))}"
            )
        valid = [f.name for f in fields(sections[section])]
        if name not in valid:
            raise ConfigError(
                f"override '{_short(item)}': unknown {section} key '{_short(name)}'{_closest(name, valid)}"
            )
        changes[section][name] = _parse_value(item, text.strip())
        arguments[section][name] = item
    updated = {}
    for sec, kw in changes.items():
        if kw:
            try:
                updated[sec] = getattr(config, sec).replace(**kw)
            except ConfigError as exc:
                raise _blame(exc, arguments[sec]) from None
    try:
        return dataclasses.replace(config, **updated) if updated else config
    except ConfigError as exc:  # across sections: train.init_from and the task
        raise _blame(exc, {k: v for args in arguments.values() for k, v in args.items()}) from None
