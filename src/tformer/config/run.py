"""The [train] and [data] sections and RunConfig, a whole run (task + [model] + [train] + [data]), which
is what config.json and a TOML file hold. Imports no torch."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tformer import families
from tformer.config.base import (
    ConfigError,
    S,
    Section,
    check_choice,
    check_nonnegative,
    check_positive,
    check_probability,
    check_types,
    closest,
    short,
    show,
)
from tformer.config.model import LMConfig, TransformerConfig

SCHEDULES = ("inverse_sqrt", "cosine", "constant")
TOKENIZERS = ("word", "bpe", "char")
# Task names, each family's [model] class and its architectures come from tformer.families (the registry);
# TASKS is the built-in families' names, kept for importers (the checks below ask the registry each time).
TASKS = families.names()


# train.keep_best's metrics: -> True where lower is better
BEST_METRICS = {
    "bleu": False,
    "chrf": False,
    "exact_match": False,
    "accuracy": False,
    "macro_f1": False,
    "valid_nll": True,
    "valid_ppl": True,
}


def best_metric_lower(metric: str) -> bool:
    """Whether lower is better for train.keep_best's `metric` (an "ema_" one: as its raw metric's)."""
    return BEST_METRICS[metric.removeprefix("ema_")]


@dataclass(frozen=True)
class TrainConfig(Section):
    """Optimisation. Adam with the paper's betas and epsilon (section 5.3), label smoothing 0.1."""

    epochs: int = 10
    max_steps: int | None = None  # stop after this many optimiser steps, whatever the epoch
    max_time: float | None = None  # seconds; stop (and evaluate) once training has run this long
    batch_tokens: int = 4096  # target (source + target) tokens per batch, before padding
    max_batch_sentences: int = 512
    batch_size: int | None = None  # lm: sequences per batch (None: batch_tokens // max_seq_len)
    lr: float | None = None  # peak learning rate; None: the paper's d_model**-0.5 * warmup**-0.5
    # "inverse_sqrt" (the paper's), "constant" after warm-up, or "cosine" down to min_lr at max_steps; with
    # max_time and no max_steps the cosine ends where the time runs out, at the step the measured step rate
    # predicts (at the warm-up's end, again at 50 / 75 / 90% of the decay; a resumed run keeps it)
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
    # where records go: log.jsonl always (the run's record); "tensorboard" adds event files (logsinks.py)
    log: tuple[str, ...] = ("jsonl",)
    # "auto": bf16 where this machine's bfloat16 products are >= 2x float32's, else fp32 (accel/precision.py);
    # "bf16": bfloat16 autocast (CPU, GPU); "fp16": float16 autocast + grad scaler (GPU); "fp32"
    precision: str = "auto"
    # torch.compile the training steps (slow to start, faster steps; evaluation stays eager): true, false, or
    # "auto": where this machine measured the model's compiled step faster, in runs of 10 minutes or more
    # with batches of one shape (training/compiling.py)
    compile: bool | str = "auto"
    accumulate: int = 1  # batches per rank summed into one optimiser step (gradient accumulation)
    parallel: str = "ddp"  # with several processes (torchrun): "ddp" replicas or "fsdp" sharded (FSDP2)
    device: str = "auto"  # "auto": the process's CUDA GPU when there is one, else CPU; or "cpu", "cuda"
    # start from pretrained weights: a tformer checkpoint of the family (a run directory: its best or latest),
    # or "hf:DIR" (classification: BERT; lm: GPT-2; translation: Marian; vision: ViT); interop/init_from.py
    init_from: str | None = None
    save_every_steps: int | None = 1000  # also checkpoint every this many steps (None: at evaluations only)
    keep_checkpoints: int = 2  # checkpoint-<step>/ directories kept in the run directory (newest first)
    max_nonfinite_skips: int = 10  # steps skipped for a non-finite gradient before training stops
    # keep the checkpoint of the best evaluation by this metric (run_dir `best`; lower is better for
    # valid_nll / valid_ppl, higher for the rest); predictors then load it from the run directory. An
    # "ema_" metric (with train.ema) keeps the moving average's weights of the best evaluation instead
    keep_best: str | None = None
    patience: int | None = None  # with keep_best: stop after this many evaluations without a new best
    # an exponential moving average of the weights, e.g. 0.999 (None: none): evaluated and saved beside them
    ema: float | None = None
    checkpoint_activations: bool = False  # recompute each layer's activations in backward (less memory)
    # LoRA (training/lora.py, through Hugging Face peft): low-rank adapters of this rank on the weights of
    # train.init_from, which stay frozen; only the adapters (and a classifier's head) train, and checkpoints
    # hold only them. 0 or None: off (every weight trains)
    lora_rank: int | None = None
    lora_alpha: float | None = None  # the adapters' output is scaled by alpha / rank; None: alpha = rank
    lora_dropout: float = 0.0  # dropout on the adapters' input
    # module-name patterns (fnmatch; a pattern also matches a name's last parts, "in_proj" = "*.in_proj") of
    # the linear layers to adapt; empty: the family's attention and feed-forward projections
    lora_targets: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_types(self)
        name = type(self).__name__
        check_positive(
            name,
            epochs=self.epochs,
            batch_tokens=self.batch_tokens,
            max_batch_sentences=self.max_batch_sentences,
            eval_every_epochs=self.eval_every_epochs,
            log_every=self.log_every,
            accumulate=self.accumulate,
        )
        if self.max_steps is not None:
            check_positive(name, max_steps=self.max_steps)
        for key in ("max_time", "batch_size", "eval_every_steps", "eval_max_sentences"):
            if getattr(self, key) is not None:  # None: no limit / derived / never / all
                check_positive(name, **{key: getattr(self, key)})
        check_positive(name, eps=self.eps, eval_beam_size=self.eval_beam_size)
        check_nonnegative(name, weight_decay=self.weight_decay, min_lr=self.min_lr)
        if self.clip_norm is not None:  # 0 or None: no clipping (0 is fairseq's way, and TOML has no None)
            check_nonnegative(name, clip_norm=self.clip_norm)
        if not 0 <= self.seed < 2**32:  # offsets are added per rank and step; torch's seeds stop at 2**64
            raise ConfigError(f"{name}.seed must be in [0, 2**32), got {self.seed}")
        if self.save_every_steps is not None:
            check_positive(name, save_every_steps=self.save_every_steps)
        check_positive(name, keep_checkpoints=self.keep_checkpoints)
        if self.keep_best is not None and self.keep_best.removeprefix("ema_") not in BEST_METRICS:
            raise ConfigError(
                f"{name}.keep_best = {self.keep_best!r}: expected one of {', '.join(BEST_METRICS)} "
                "(what the family's evaluation records), or one of them with ema_ (the moving average's "
                "score, with train.ema)"
            )
        if self.keep_best is not None and self.keep_best.startswith("ema_") and self.ema is None:
            raise ConfigError(
                f"{name}.keep_best = {self.keep_best!r} scores the moving average of the weights, which "
                "needs train.ema (e.g. train.ema = 0.999)"
            )
        if self.patience is not None:
            check_positive(name, patience=self.patience)
            if self.keep_best is None:
                raise ConfigError(
                    f"{name}.patience = {self.patience} needs train.keep_best, the metric whose "
                    'improvement it waits for (e.g. train.keep_best = "bleu")'
                )
        if self.ema is not None and not 0.0 < self.ema < 1.0:
            raise ConfigError(f"{name}.ema = {self.ema}: expected a decay in (0, 1), e.g. 0.999, or none")
        unknown = [v for v in self.log if v not in ("jsonl", "tensorboard")]
        if unknown or "jsonl" not in self.log:
            raise ConfigError(
                f"{name}.log = {list(self.log)}: "
                + (f"unknown {unknown[0]!r}; " if unknown else "")
                + "expected 'jsonl' (always: log.jsonl is the run's record) and optionally 'tensorboard', "
                'e.g. train.log = ["jsonl", "tensorboard"]'
            )
        if self.max_nonfinite_skips < 0:
            raise ConfigError(f"{name}.max_nonfinite_skips must be >= 0, got {self.max_nonfinite_skips}")
        if self.lr is not None:
            check_positive(name, lr=self.lr)
        if self.warmup_steps < 0:
            raise ConfigError(f"{name}.warmup_steps must be >= 0, got {self.warmup_steps}")
        check_choice(name, "schedule", self.schedule, SCHEDULES)
        check_choice(name, "precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        check_choice(name, "parallel", self.parallel, ("ddp", "fsdp"))
        if isinstance(self.compile, str) and self.compile != "auto":
            raise ConfigError(f"{name}.compile = {self.compile!r}: expected true, false or 'auto'")
        check_choice(name, "device", self.device, ("auto", "cpu", "cuda"))
        if self.init_from is not None and not self.init_from.strip():
            raise ConfigError(f"{name}.init_from is empty; give hf:DIR or a checkpoint directory")
        check_probability(name, label_smoothing=self.label_smoothing)
        self._check_lora(name)
        if self.schedule == "cosine" and self.max_steps is None and self.max_time is None:
            raise ConfigError(
                f"{name}.schedule = 'cosine' needs max_steps (the length of the decay) or max_time (a time "
                "budget: the decay is sized from the step rate measured in the warm-up)"
            )
        if not all(0.0 <= b < 1.0 for b in self.betas):  # two floats: check_types
            raise ConfigError(f"{name}.betas must be two numbers in [0, 1), got {self.betas!r}")

    @property
    def lora(self) -> bool:
        """LoRA is on (train.lora_rank > 0)."""
        return bool(self.lora_rank)

    def _check_lora(self, name: str) -> None:
        if self.lora_rank is not None:
            check_nonnegative(name, lora_rank=self.lora_rank)
        if self.lora_alpha is not None:
            check_positive(name, lora_alpha=self.lora_alpha)
        check_probability(name, lora_dropout=self.lora_dropout)
        if not all(t.strip() for t in self.lora_targets):
            raise ConfigError(f"{name}.lora_targets = {list(self.lora_targets)}: a pattern is empty")


@dataclass(frozen=True)
class DataConfig(Section):
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
    # lm without a valid file: hold out this final fraction of the text; vision: this fraction of the training
    # images, drawn by train.seed
    valid_fraction: float = 0.0
    # vision (tformer.data.images, tformer.data.transforms): class names of IDX / .npz labels 0..K-1 (empty:
    # "0".."K-1"); an image folder's come from its subfolders
    classes: tuple[str, ...] = ()
    resize: bool = True  # image folder: resize to model.image_size (false: any other size is an error)
    crop_padding: int = 0  # training augmentation: random crop of the image zero-padded by this many pixels
    flip: bool = False  # training augmentation: horizontal flip with probability 1/2
    mixup: float = 0.0  # training augmentation: mixup with this Beta(alpha, alpha) (0: off)
    cutmix: float = (
        0.0  # training augmentation: cutmix with this Beta(alpha, alpha) (0: off; both: one each batch)
    )

    def __post_init__(self) -> None:
        name = type(self).__name__
        for key in ("train", "valid", "test"):
            value = getattr(self, key)
            if isinstance(value, str):
                object.__setattr__(self, key, (value,))
        check_types(self)  # lists become tuples
        check_choice(name, "tokenizer", self.tokenizer, TOKENIZERS)
        check_positive(name, vocab_size=self.vocab_size)
        check_probability(name, valid_fraction=self.valid_fraction)
        check_nonnegative(name, crop_padding=self.crop_padding, mixup=self.mixup, cutmix=self.cutmix)
        if len(set(self.classes)) != len(self.classes) or not all(c.strip() for c in self.classes):
            raise ConfigError(f"{name}.classes must be distinct non-empty names, got {list(self.classes)}")

    def paths(self, key: str) -> list[str]:
        import os

        root = os.environ.get("TFORMER_DATA", "../shared/data")
        return [p.replace("{data}", root) for p in getattr(self, key)]


@dataclass(frozen=True)
class RunConfig(Section):
    """A whole run as one TOML file: [model], [train] and [data] sections. The task picks the model class."""

    task: str = "translation"
    # the task's model config (None: its defaults), a subclass the task picks: typed Any so that each task's
    # code reads its own family's keys (RunConfig is not generic over the family; __post_init__ checks it)
    model: Any = None
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        check_choice(type(self).__name__, "task", self.task, families.names())
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
                    f"RunConfig.{key} = {show(value)} ({type(value).__name__}); expected a {cls.__name__}"
                )
        if self.train.lora and self.model.architecture != "transformer":
            raise ConfigError(
                f"train.lora_rank = {self.train.lora_rank}: LoRA adapts a Transformer's projections; "
                f"model.architecture = {self.model.architecture!r} is a baseline (use 'transformer')"
            )

    @classmethod
    def from_dict(
        cls, data: Mapping[str, object], *, source: str = "config", task: str | None = None
    ) -> RunConfig:
        sections = ["task", "model", "train", "data"]
        if not isinstance(data, dict):
            raise ConfigError(
                f"{source}: expected a mapping of sections ({', '.join(sections)}), got a {type(data).__name__}"
            )
        for key in data:
            if key not in sections:
                raise ConfigError(
                    f"{source}: unknown section '[{short(str(key))}]'{closest(str(key), sections)}"
                )
        if task and data.get("task", task) != task:
            raise ConfigError(f"{source}: a {show(data['task'])} config, but the task asked for is {task!r}")
        task = task or data.get("task", "translation")
        tasks = ", ".join(families.names())
        if not isinstance(task, str):
            raise ConfigError(f"{source}: task = {show(task)} is not a string; expected one of {tasks}")
        if task not in families.FAMILIES:
            raise ConfigError(f"{source}: task = {show(task)} is not one of {tasks}")

        def section(key: str, section_cls: type[S]) -> S:
            value = data.get(key, {})
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{source}: [{key}] must be a table of {section_cls.__name__} keys, "
                    f"got {show(value)} ({type(value).__name__})"
                )
            return section_cls.from_dict(value, source=source)

        model = section("model", model_config_class(task))
        train, data_config = section("train", TrainConfig), section("data", DataConfig)
        try:
            return cls(task=task, model=model, train=train, data=data_config)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    def to_dict(self) -> dict[str, object]:
        return {
            "task": self.task,
            "model": self.model.to_dict(),
            "train": self.train.to_dict(),
            "data": self.data.to_dict(),
        }


def model_config_class(task: str) -> type[TransformerConfig]:
    """The [model] section's class of a task (its family's, tformer.families)."""
    return families.get(task).config_class()
