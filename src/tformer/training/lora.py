"""LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models", section 4.1): an adapted
linear layer's W x becomes W x + (alpha / r) B A dropout(x), A (r, in) and B (out, r) new, B zero at the
start, so a rank-r model starts as exactly its base model; W stays frozen. Only the adapters and the modules
a family trains in full (a classifier's or vision model's new head) train.

Through Hugging Face peft: every tformer projection is an `nn.Linear` module (attention/multihead.py's
in_proj / q_proj / kv_proj / out_proj, layers.py's linear1 / linear2; an accel model's AccelLinear is a
subclass), and `peft.inject_adapter_in_model(LoraConfig(target_modules=NAMES), model)` wraps each named one
in place on any nn.Module: no transformers PreTrainedModel around it, no PeftModel wrapper (get_peft_model's,
whose forward takes transformers' keywords and whose state-dict names gain a base_model.model. prefix), so
the task, trainer, accel and activation checkpointing see the same model. Targets are matched here (fnmatch
patterns, clear errors) and handed to peft as exact module names.

A LoRA run's checkpoints are adapter-only (decision: the base is not copied into every checkpoint):
model.safetensors holds the trainable tensors, config.json's "lora" section the adapters' settings and the
base (`base`: where train.init_from's weights were read, `sha256`: of that weights file). Loading one into a
plain model (every predictor, through checkpoint.load_weights) resolves the base, refuses a base whose hash
differs, adds the adapters, loads them and merges them into the base weights; into a resumed run's adapted
model it loads the adapters only. `merge_checkpoint` (`tformer merge`) writes the merged model as a
self-contained checkpoint whose state-dict keys are the base's: it loads with no peft installed.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from tformer.config import ConfigError, TrainConfig
from tformer.training.checkpoint import CONFIG, WEIGHTS, CheckpointError, read_config

RECORD = "_tformer_lora"  # the model's Adaptation, in its __dict__ (as accel keeps its plan)
ATTENTION_FFN = ("in_proj", "out_proj", "linear1", "linear2")
# train.lora_targets' defaults: the attention and feed-forward projections (the translator's decoder also
# has cross-attention's q_proj / kv_proj); never an output layer or a head
DEFAULT_TARGETS = {"translation": ("in_proj", "q_proj", "kv_proj", "out_proj", "linear1", "linear2")}
FULL = {"classification": ("head",), "vision": ("head",)}  # modules trained in full: the new heads


@dataclass(frozen=True)
class Adaptation:
    """A model's LoRA adapters: settings, adapted layers, and the base they adapt (config.json's "lora")."""

    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]  # module names of the adapted linear layers
    full: tuple[str, ...]  # module names trained in full (a new head)
    init_from: str  # train.init_from as given
    base: str  # where its weights were read: a checkpoint directory or hf:DIR, absolute (init_from.base_of)
    sha256: str  # of the base's weights file

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "targets": list(self.targets), "full": list(self.full)}

    @classmethod
    def from_dict(cls, data: object, where: Path) -> Adaptation:
        try:
            if not isinstance(data, dict):
                raise TypeError(f"a JSON {type(data).__name__}")
            a = cls(
                rank=int(data["rank"]),
                alpha=float(data["alpha"]),
                dropout=float(data["dropout"]),
                targets=tuple(str(t) for t in data["targets"]),
                full=tuple(str(t) for t in data["full"]),
                init_from=str(data["init_from"]),
                base=str(data["base"]),
                sha256=str(data["sha256"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"{where / CONFIG}: a broken 'lora' section ({type(exc).__name__}: {exc})"
            ) from None
        if a.rank < 1 or not a.targets:
            raise CheckpointError(f"{where / CONFIG}: 'lora' has rank {a.rank} and {len(a.targets)} targets")
        return a


def adapted(model: nn.Module) -> Adaptation | None:
    """The model's adapters (None: a plain model)."""
    found = model.__dict__.get(RECORD)
    return found if isinstance(found, Adaptation) else None


def linear_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def match_targets(model: nn.Module, patterns: tuple[str, ...]) -> tuple[str, ...]:
    """The module names of `model`'s linear layers that `patterns` match (fnmatch; a pattern also matches a
    name's last parts: "in_proj" is "*.in_proj"), in the model's order. A pattern matching none is an error
    listing the linear layers there are; so is a layer whose weight is shared (merging would change both)."""
    names = linear_names(model)
    chosen: set[str] = set()
    for pattern in patterns:
        hits = [n for n in names if fnmatch(n, pattern) or fnmatch(n, f"*.{pattern}")]
        if not hits:
            shapes = dict.fromkeys(re.sub(r"(^|\.)\d+(\.|$)", r"\1*\2", n) for n in names)
            raise ConfigError(
                f"train.lora_targets: {pattern!r} matches no linear layer of the {type(model).__name__}; "
                f"its linear layers are {', '.join(shapes)}"
            )
        chosen.update(hits)
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    for name in chosen:
        shared = owners[id(model.get_submodule(name).weight)]
        if len(shared) > 1:
            raise ConfigError(
                f"train.lora_targets: {name!r}'s weight is tied ({', '.join(shared)}); merging adapters into a "
                "shared weight would change the other use too: leave it out"
            )
    return tuple(n for n in names if n in chosen)


def adapt(model: nn.Module, config: TrainConfig, *, family: str) -> Adaptation:
    """Add `config`'s LoRA adapters (train.lora_*) to `model`, in place, on the base train.init_from loaded
    into it; everything else is frozen but the family's new head."""
    from tformer.interop.init_from import base_of

    if not config.init_from:  # checked here, not in the config: a TOML file may leave it to an override
        raise ConfigError(
            f"train.lora_rank = {config.lora_rank} adapts pretrained weights: it needs train.init_from "
            "(a checkpoint of the family, or hf:DIR), the base the adapters are trained on"
        )
    rank = int(config.lora_rank or 0)
    patterns = config.lora_targets or DEFAULT_TARGETS.get(family, ATTENTION_FFN)
    targets = match_targets(model, patterns)
    base, sha256 = base_of(config.init_from)
    a = Adaptation(
        rank=rank,
        alpha=float(config.lora_alpha if config.lora_alpha is not None else rank),
        dropout=config.lora_dropout,
        targets=targets,
        full=FULL.get(family, ()),
        init_from=config.init_from,
        base=base,
        sha256=sha256,
    )
    inject(model, a)
    return a


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise ConfigError(
            "LoRA adapters (train.lora_rank, adapter checkpoints) need Hugging Face peft: "
            "pip install 'tformer[lora]'"
        ) from None
    return peft


def inject(model: nn.Module, a: Adaptation) -> None:
    """Wrap `a.targets` in peft LoRA layers (A: peft's Kaiming-uniform, B: zeros) and freeze all but them and
    `a.full`; the model remembers `a`."""
    if adapted(model) is not None:
        raise ValueError(f"the {type(model).__name__} has LoRA adapters already")
    peft = _peft()
    config = peft.LoraConfig(
        r=a.rank, lora_alpha=a.alpha, lora_dropout=a.dropout, target_modules=list(a.targets), bias="none"
    )
    peft.inject_adapter_in_model(config, model)  # freezes every parameter but the adapters'
    for name in a.full:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    model.__dict__[RECORD] = a


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What an adapter checkpoint holds: the trainable tensors (adapters, a new head), by state-dict name."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def counts(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters), tied ones once."""
    params = list(model.parameters())  # unique
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def section(model: nn.Module) -> dict[str, object]:
    """config.json's "lora": the Adaptation, with the parameter counts."""
    a = adapted(model)
    if a is None:
        raise ValueError(f"the {type(model).__name__} has no LoRA adapters")
    trainable, total = counts(model)
    return {**a.to_dict(), "trainable_parameters": trainable, "parameters": total}


def describe(model: nn.Module) -> str:
    """One line for the log: the adapters and the trainable share."""
    a = adapted(model)
    assert a is not None
    trainable, total = counts(model)
    head = f" + {', '.join(a.full)} in full" if a.full else ""
    return (
        f"LoRA: rank {a.rank} (alpha {a.alpha:g}) on {len(a.targets)} linear layers{head}; "
        f"{trainable:,} of {total:,} parameters train ({100 * trainable / total:.2f}%)"
    )


def merge(model: nn.Module) -> None:
    """Merge the adapters into their base weights (W + alpha / r B A) and remove peft's layers, in place:
    `model` becomes a plain model again, its state-dict keys the base's, every parameter trainable."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=True)  # refuses a non-finite result
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    model.__dict__.pop(RECORD, None)
    model.__dict__.pop("peft_config", None)  # what inject_adapter_in_model set on the model
    for p in model.parameters():
        p.requires_grad_(True)


def load_adapter_checkpoint(path: Path, model: nn.Module, data: object) -> None:
    """checkpoint.load_weights of an adapter checkpoint (`data`: its config.json "lora"). Into a resumed run's
    adapted model: the adapters (its base must be the one they were trained on). Into a plain model: the
    base, then the adapters, merged."""
    a = Adaptation.from_dict(data, path)
    mine = adapted(model)
    if mine is not None:
        if mine.sha256 != a.sha256:
            raise CheckpointError(
                f"{path}: its adapters were trained on {a.base} (sha256 {a.sha256}); this run's base is "
                f"{mine.base} (sha256 {mine.sha256}), a different model. Resume with the same "
                f"train.init_from ({a.init_from}), or start a new run"
            )
        if (mine.rank, mine.targets) != (a.rank, a.targets):
            raise CheckpointError(
                f"{path}: adapters of rank {a.rank} on {len(a.targets)} layers; this run has rank "
                f"{mine.rank} on {len(mine.targets)} (train.lora_rank / lora_targets changed)"
            )
        _load_adapters(path, model)
        return
    from tformer.interop.init_from import base_of, start

    try:
        _, found = base_of(a.base)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: its base {a.base} cannot be read ({exc})") from None
    if found != a.sha256:
        raise CheckpointError(
            f"{path}: its adapters were trained on {a.base} with sha256 {a.sha256}; {a.base} now holds "
            f"sha256 {found}, a different model. Put the base back, or train the adapters again"
        )
    start(a.base, str(read_config(path).get("task"))).load_into(model)
    inject(model, a)
    _load_adapters(path, model)
    merge(model)


def _load_adapters(path: Path, model: nn.Module) -> None:
    """model.safetensors of an adapter checkpoint into the adapted `model`: exactly its trainable tensors."""
    file = path / WEIGHTS
    if not file.exists():
        raise CheckpointError(f"{path}: {WEIGHTS} is missing")
    try:
        saved = load_file(str(file))
    except SafetensorError as exc:
        raise CheckpointError(f"{file}: corrupt weights file ({exc})") from None
    expected = adapter_state(model)
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{file}: the adapters do not fit the model (missing: {missing[:5]}, unexpected: {unexpected[:5]})"
        )
    with torch.no_grad():
        for name, p in expected.items():
            if saved[name].shape != p.shape:
                raise CheckpointError(
                    f"{file}: {name} has shape {tuple(saved[name].shape)}, the model's {tuple(p.shape)}"
                )
            p.copy_(saved[name])


def merge_checkpoint(adapters: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """`tformer merge ADAPTER_CKPT --out DIR`: the adapters merged into their base, as a self-contained
    checkpoint (config.json without "lora", with "merged_from"; the adapter checkpoint's other files)."""
    from tformer.config import model_config_class
    from tformer.models import build_model
    from tformer.training import run_dir
    from tformer.training.average import copy_files
    from tformer.training.checkpoint import load_weights, save_checkpoint

    path = run_dir.resolve(adapters, say=True)
    raw = read_config(path)
    if "lora" not in raw:
        raise CheckpointError(
            f"{path}: not an adapter checkpoint (config.json has no 'lora' section: trained without "
            "train.lora_rank); it is self-contained already"
        )
    out = Path(out)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise CheckpointError(f"{out}: exists; give --overwrite to replace it, or another --out")
    if out.exists() and out.resolve() == path.resolve():
        raise CheckpointError(f"{out}: is the adapter checkpoint itself; write another --out")
    task = str(raw.get("task"))
    model = build_model(model_config_class(task).from_dict(raw.get("model", {}), source=str(path / CONFIG)))
    load_weights(path, model)  # the base with the adapters merged (load_adapter_checkpoint)
    a = Adaptation.from_dict(raw["lora"], path)
    config = {k: v for k, v in raw.items() if k not in ("lora", "tformer_version")}
    config["merged_from"] = {"adapters": str(path), "base": a.base, "sha256": a.sha256}
    return save_checkpoint(out, model=model, config=config, write_extra=lambda d: copy_files(path, d))
