"""Configuration as frozen, validated data. Imports no torch.

Every run is reproduced from its saved config and seed. Unknown keys are errors that name the closest
valid key; values are checked on construction so a bad config fails before any tensor is made.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

ATTENTION_BACKENDS = ("math", "sdpa")
ACTIVATIONS = ("relu", "gelu")
POSITIONS = ("sinusoidal", "learned")
SCHEDULES = ("inverse_sqrt", "cosine", "constant")

C = TypeVar("C", bound="_Config")


class ConfigError(ValueError):
    """A configuration value or key that cannot be used."""


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else f" (valid keys: {', '.join(sorted(options))})"


def _check_choice(cls_name: str, key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{cls_name}.{key} = {value!r} is not one of {', '.join(choices)}")


def _check_positive(cls_name: str, **values: float) -> None:
    for key, value in values.items():
        if not value > 0:
            raise ConfigError(f"{cls_name}.{key} must be > 0, got {value!r}")


def _check_probability(cls_name: str, **values: float) -> None:
    for key, value in values.items():
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{cls_name}.{key} must be in [0, 1), got {value!r}")


@dataclass(frozen=True)
class _Config:
    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any], *, source: str = "config") -> C:
        """Build from a mapping; unknown keys raise a ConfigError naming the closest valid key."""
        names = [f.name for f in fields(cls)]
        for key in data:
            if key not in names:
                raise ConfigError(f"{source}: unknown {cls.__name__} key '{key}'{_closest(key, names)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self: C, **changes: Any) -> C:
        names = [f.name for f in fields(self)]
        for key in changes:
            if key not in names:
                raise ConfigError(f"unknown {type(self).__name__} key '{key}'{_closest(key, names)}")
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ModelConfig(_Config):
    """Encoder-decoder hyper-parameters. The defaults are the paper's base model (Table 3, "base")."""

    src_vocab_size: int = 32000
    tgt_vocab_size: int = 32000
    d_model: int = 512
    n_heads: int = 8
    d_ff: int = 2048
    n_layers: int = 6
    n_decoder_layers: int | None = None  # None: same as n_layers
    dropout: float = 0.1
    attention_dropout: float = 0.0  # the paper drops sublayer outputs, not attention weights
    max_seq_len: int = 512
    norm_first: bool = False  # False: post-norm, as in the paper; True: pre-norm
    final_norm: bool | None = None  # LayerNorm after each stack; None: only with pre-norm
    activation: str = "relu"
    positions: str = "sinusoidal"
    share_embeddings: bool = False  # one embedding for source and target (needs one vocabulary)
    tie_output: bool = True  # output projection shares the target embedding (paper section 3.4)
    attention: str = "sdpa"
    layer_norm_eps: float = 1e-5
    pad_id: int = 0

    def __post_init__(self) -> None:
        name = type(self).__name__
        _check_positive(
            name,
            src_vocab_size=self.src_vocab_size,
            tgt_vocab_size=self.tgt_vocab_size,
            d_model=self.d_model,
            n_heads=self.n_heads,
            d_ff=self.d_ff,
            n_layers=self.n_layers,
            max_seq_len=self.max_seq_len,
            layer_norm_eps=self.layer_norm_eps,
        )
        if self.n_decoder_layers is not None:
            _check_positive(name, n_decoder_layers=self.n_decoder_layers)
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"{name}.d_model = {self.d_model} must be divisible by n_heads = {self.n_heads}"
            )
        _check_probability(name, dropout=self.dropout, attention_dropout=self.attention_dropout)
        _check_choice(name, "activation", self.activation, ACTIVATIONS)
        _check_choice(name, "positions", self.positions, POSITIONS)
        _check_choice(name, "attention", self.attention, ATTENTION_BACKENDS)
        if self.share_embeddings and self.src_vocab_size != self.tgt_vocab_size:
            raise ConfigError(
                f"{name}.share_embeddings needs src_vocab_size == tgt_vocab_size, "
                f"got {self.src_vocab_size} and {self.tgt_vocab_size}"
            )
        if not 0 <= self.pad_id < min(self.src_vocab_size, self.tgt_vocab_size):
            raise ConfigError(f"{name}.pad_id = {self.pad_id} is outside the vocabulary")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def decoder_layers(self) -> int:
        return self.n_layers if self.n_decoder_layers is None else self.n_decoder_layers

    @property
    def use_final_norm(self) -> bool:
        return self.norm_first if self.final_norm is None else self.final_norm


@dataclass(frozen=True)
class TrainConfig(_Config):
    """Optimisation. Adam with the paper's betas and epsilon (section 5.3), label smoothing 0.1."""

    epochs: int = 10
    max_steps: int | None = None  # stop after this many optimiser steps, whatever the epoch
    max_time: float | None = None  # seconds; stop (and evaluate) once training has run this long
    batch_tokens: int = 4096  # target (source + target) tokens per batch, before padding
    max_batch_sentences: int = 512
    lr: float | None = None  # peak learning rate; None: the paper's d_model**-0.5 * warmup**-0.5
    schedule: str = "inverse_sqrt"
    warmup_steps: int = 4000
    min_lr: float = 0.0  # floor of the cosine schedule
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-9
    weight_decay: float = 0.0
    label_smoothing: float = 0.1
    clip_norm: float | None = 1.0
    seed: int = 0
    eval_every_epochs: int = 1
    log_every: int = 50

    def __post_init__(self) -> None:
        name = type(self).__name__
        _check_positive(
            name,
            epochs=self.epochs,
            batch_tokens=self.batch_tokens,
            max_batch_sentences=self.max_batch_sentences,
            eval_every_epochs=self.eval_every_epochs,
            log_every=self.log_every,
        )
        if self.max_steps is not None:
            _check_positive(name, max_steps=self.max_steps)
        if self.max_time is not None:
            _check_positive(name, max_time=self.max_time)
        if self.lr is not None:
            _check_positive(name, lr=self.lr)
        if self.warmup_steps < 0:
            raise ConfigError(f"{name}.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check_choice(name, "schedule", self.schedule, SCHEDULES)
        _check_probability(name, label_smoothing=self.label_smoothing)
        if self.schedule == "cosine" and self.max_steps is None:
            raise ConfigError(f"{name}.schedule = 'cosine' needs max_steps (the length of the decay)")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"{name}.betas must be two numbers in [0, 1), got {self.betas!r}")
        # TOML gives lists; keep the frozen config hashable and comparable.
        object.__setattr__(self, "betas", tuple(self.betas))


@dataclass(frozen=True)
class RunConfig(_Config):
    """A whole run: the model, the optimisation and the tokenizer choice, as one TOML file."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> RunConfig:
        sections = {"model": ModelConfig, "train": TrainConfig}
        for key in data:
            if key not in sections:
                raise ConfigError(f"{source}: unknown section '[{key}]'{_closest(key, list(sections))}")
        return cls(
            model=ModelConfig.from_dict(data.get("model", {}), source=source),
            train=TrainConfig.from_dict(data.get("train", {}), source=source),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "train": self.train.to_dict()}


def load_toml(path: str | Path) -> RunConfig:
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return RunConfig.from_dict(data, source=str(path))


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word: keep it as a string


def apply_overrides(config: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply `section.key=value` (or bare `key=value`, looked up in both sections) overrides."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, text = item.split("=", 1)
        value = _parse_value(text.strip())
        section, _, name = key.strip().rpartition(".")
        model_keys = [f.name for f in fields(ModelConfig)]
        train_keys = [f.name for f in fields(TrainConfig)]
        if not section:
            section = "model" if name in model_keys else "train" if name in train_keys else ""
            if not section:
                raise ConfigError(
                    f"override '{item}': unknown key '{name}'{_closest(name, model_keys + train_keys)}"
                )
        if section == "model":
            config = RunConfig(model=config.model.replace(**{name: value}), train=config.train)
        elif section == "train":
            config = RunConfig(model=config.model, train=config.train.replace(**{name: value}))
        else:
            raise ConfigError(
                f"override '{item}': unknown section '{section}'{_closest(section, ['model', 'train'])}"
            )
    return config
