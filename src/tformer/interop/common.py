"""Reading a Hugging Face model directory and moving its tensors into tformer's modules, strictly.

A directory holds config.json and model.safetensors (or shards listed in model.safetensors.index.json),
and usually tokenizer.json. Nothing is fetched from a hub. Every tensor of the file is either consumed by
the mapping (`Tensors.take`) or named as ignored with the reason (`Tensors.ignore`); anything left over is
an error, and so is a tformer parameter nothing filled: a load is complete or it fails.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from tformer.config import ConfigError

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
HF_TOKENIZER = "tokenizer.json"

# Hugging Face activation names (transformers.activations.ACT2FN) -> tformer's; each pair computes the same
# function (the tanh approximations differ only in how the constant is written).
ACTIVATIONS_IN = {
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}
ACTIVATIONS_OUT = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}


class InteropError(ValueError):
    """A Hugging Face directory or tformer checkpoint that cannot be converted as asked."""


class HFConfig:
    """config.json of a Hugging Face model, with errors that name the file and the field."""

    def __init__(self, directory: Path, data: dict[str, Any]) -> None:
        self.directory, self.data = directory, data
        self.path = directory / HF_CONFIG

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def need(self, key: str, kind: type | tuple[type, ...] = int) -> Any:
        if key not in self.data:
            raise ConfigError(f"{self.path}: field '{key}' is missing")
        value = self.data[key]
        if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
            raise ConfigError(f"{self.path}: field '{key}' = {value!r}; expected {_kind_name(kind)}")
        return value

    def expect(self, key: str, wanted: Any, default: Any, why: str) -> None:
        """A field tformer can only take at one value (`default` when the field is absent)."""
        value = self.data.get(key, default)
        if value != wanted:
            raise ConfigError(
                f"{self.path}: {key} = {value!r} cannot be mapped to tformer ({why}); expected {wanted!r}"
            )

    def activation(self, key: str, default: str | None = None) -> str:
        value = self.data.get(key, default)
        if value not in ACTIVATIONS_IN:
            raise ConfigError(
                f"{self.path}: {key} = {value!r} cannot be mapped to tformer; "
                f"supported: {', '.join(sorted(ACTIVATIONS_IN))}"
            )
        return ACTIVATIONS_IN[value]

    def token_id(self, key: str, vocab_size: int, fallback: str | None = None) -> int:
        """A special-token id field (pad_token_id, ...), or the `fallback` field when it is null."""
        value = self.data.get(key)
        if value is None and fallback is not None:
            key, value = fallback, self.data.get(fallback)
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < vocab_size:
            raise ConfigError(
                f"{self.path}: {key} = {value!r}; expected a token id in [0, vocab_size = {vocab_size})"
            )
        return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def read_hf_config(directory: str | Path) -> HFConfig:
    directory = Path(directory)
    if not directory.is_dir():
        raise InteropError(
            f"{directory}: not a directory (expected a Hugging Face model: config.json + weights)"
        )
    path = directory / HF_CONFIG
    if not path.exists():
        raise InteropError(f"{directory}: {HF_CONFIG} is missing; not a Hugging Face model directory")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InteropError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InteropError(f"{path}: expected a JSON object")
    return HFConfig(directory, data)


def read_hf_tensors(directory: Path) -> dict[str, Tensor]:
    """model.safetensors, or every shard named by model.safetensors.index.json, as float32 tensors."""
    single, index = directory / HF_WEIGHTS, directory / HF_INDEX
    if single.exists():
        files = [single]
    elif index.exists():
        files = _shards(directory, index)
    else:
        others = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.h5")]
        hint = f" (found {', '.join(others)}: only safetensors files are read)" if others else ""
        raise InteropError(f"{directory}: {HF_WEIGHTS} is missing{hint}")
    tensors: dict[str, Tensor] = {}
    for f in files:
        try:
            tensors.update(load_file(str(f)))
        except (SafetensorError, OSError) as exc:  # (missing, a directory, unreadable)
            raise InteropError(f"{f}: cannot read the weights ({exc})") from None
    return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}


def _shards(directory: Path, index: Path) -> list[Path]:
    """The shard files that model.safetensors.index.json names: each must be a file inside `directory`
    once `..` and links are followed (a downloaded index must not read files elsewhere). The one exception
    is the Hugging Face hub cache's own layout, snapshots/<revision>/<file> linking to the same cached
    repository's blobs/."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InteropError(f"{index}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InteropError(f"{index}: expected a JSON object with a 'weight_map' (tensor name -> shard file)")
    if "weight_map" not in data:
        raise InteropError(
            f"{index}: has no 'weight_map' (tensor name -> shard file); not a safetensors index"
        )
    weight_map = data["weight_map"]
    if not isinstance(weight_map, dict):
        raise InteropError(
            f"{index}: 'weight_map' is a {type(weight_map).__name__}; expected an object of tensor name -> "
            "shard file name"
        )
    if not weight_map:
        raise InteropError(f"{index}: 'weight_map' is empty; it names no shard files")
    for key, name in weight_map.items():  # (JSON object keys are strings)
        if not isinstance(name, str) or not name:
            raise InteropError(f"{index}: 'weight_map' entry {key!r}: {name!r}; expected a shard file name")
    root = directory.resolve()
    # the hub cache: <repo>/snapshots/<revision>/<file> links to <repo>/blobs/<hash>
    blobs = root.parent.parent / "blobs" if root.parent.name == "snapshots" else None
    files = []
    for name in sorted(set(weight_map.values())):
        path = directory / name  # (an absolute name replaces the directory: refused below)
        real = path.resolve()
        inside = real.is_relative_to(root) or (blobs is not None and real.parent == blobs)
        if Path(name).is_absolute() or not inside:
            raise InteropError(
                f"{index}: shard {name!r} lies outside the model directory {directory} (resolved: {real}); "
                "shard names must be files inside it"
            )
        files.append(path)
    return files


class Tensors:
    """The tensors of a Hugging Face file, handed out once each; `finish` fails on any left unused."""

    def __init__(self, tensors: dict[str, Tensor], source: str) -> None:
        self.tensors, self.source = tensors, source
        self.used: set[str] = set()
        self.ignored: dict[str, str] = {}

    def has(self, name: str) -> bool:
        return name in self.tensors

    def take(self, name: str, shape: tuple[int, ...]) -> Tensor:
        if name not in self.tensors:
            raise InteropError(f"{self.source}: tensor '{name}' is missing (expected shape {shape})")
        t = self.tensors[name]
        if tuple(t.shape) != tuple(shape):
            raise InteropError(f"{self.source}: tensor '{name}' has shape {tuple(t.shape)}; expected {shape}")
        self.used.add(name)
        return t

    def take_same(self, name: str, like: Tensor, what: str) -> None:
        """An optional duplicate of a tensor already taken (a tied copy); it must hold the same values."""
        if name in self.tensors:
            t = self.take(name, tuple(like.shape))
            if not torch.equal(t, like):
                raise InteropError(f"{self.source}: tensor '{name}' differs from {what}; tformer ties them")

    def ignore(self, name: str, why: str) -> None:
        if name in self.tensors:
            self.used.add(name)
            self.ignored[name] = why

    def finish(self) -> None:
        left = sorted(set(self.tensors) - self.used)
        if left:
            more = f" and {len(left) - 8} more" if len(left) > 8 else ""
            raise InteropError(
                f"{self.source}: {len(left)} tensor(s) tformer does not know how to use: "
                f"{', '.join(left[:8])}{more}"
            )


def linear(t: Tensors, name: str, n_out: int, n_in: int, *, bias: bool = True) -> dict[str, Tensor]:
    """An nn.Linear-layout weight (out, in) and its bias, as {'weight', 'bias'}."""
    out = {"weight": t.take(f"{name}.weight", (n_out, n_in))}
    if bias:
        out["bias"] = t.take(f"{name}.bias", (n_out,))
    return out


def conv1d(t: Tensors, name: str, n_in: int, n_out: int) -> dict[str, Tensor]:
    """GPT-2's Conv1D stores the weight as (in, out): transposed to nn.Linear's (out, in)."""
    return {"weight": t.take(f"{name}.weight", (n_in, n_out)).t(), "bias": t.take(f"{name}.bias", (n_out,))}


def fused_qkv(q: dict[str, Tensor], k: dict[str, Tensor], v: dict[str, Tensor]) -> dict[str, Tensor]:
    """Separate q, k, v projections -> tformer's one in_proj (rows q, then k, then v)."""
    return {key: torch.cat([q[key], k[key], v[key]], dim=0) for key in q}


def prefixed(prefix: str, parts: dict[str, Tensor]) -> dict[str, Tensor]:
    return {f"{prefix}.{k}": v for k, v in parts.items()}


def bert_style_layer(
    t: Tensors, hf: str, ours: str, d: int, f: int, *, attention: str, norms: tuple[str, str]
) -> dict[str, Tensor]:
    """One Hugging Face BERT-layout encoder layer (`hf`: its prefix; BERT and ViT share the layout and
    differ in two names) as the state of tformer's SelfAttentionLayer `ours`: query, key and value fused
    into `in_proj`, `{attention}.output.dense` the output projection, `intermediate.dense` / `output.dense`
    the FFN, `norms` (the LayerNorms of norm1 and norm2)."""
    qkv = [linear(t, f"{hf}.{attention}.{n}", d, d) for n in ("query", "key", "value")]
    state = prefixed(f"{ours}.self_attn.in_proj", fused_qkv(*qkv))
    state.update(prefixed(f"{ours}.self_attn.out_proj", linear(t, f"{hf}.attention.output.dense", d, d)))
    state.update(prefixed(f"{ours}.ff.linear1", linear(t, f"{hf}.intermediate.dense", f, d)))
    state.update(prefixed(f"{ours}.ff.linear2", linear(t, f"{hf}.output.dense", d, f)))
    for mine, theirs in zip(("norm1", "norm2"), norms, strict=True):
        state[f"{ours}.{mine}.weight"] = t.take(f"{hf}.{theirs}.weight", (d,))
        state[f"{ours}.{mine}.bias"] = t.take(f"{hf}.{theirs}.bias", (d,))
    return state


def load_exact(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Fill every parameter and persistent buffer of `model` from `state`, nothing more or less.

    Tied parameters (one tensor under several names) need their value under one of the names."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    full = dict(state)
    for group in names.values():
        given = [n for n in group if n in state]
        for n in group:
            if given and n not in full:
                full[n] = state[given[0]]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(full))
    unexpected = sorted(set(full) - set(expected))
    if missing or unexpected:
        raise InteropError(
            f"{source}: the converted weights do not fill the tformer model "
            f"(unfilled: {missing[:6]}, unknown: {unexpected[:6]})"
        )
    for name, value in full.items():
        if tuple(value.shape) != tuple(expected[name].shape):
            raise InteropError(
                f"{source}: tformer parameter '{name}' has shape {tuple(expected[name].shape)}, "
                f"the converted tensor {tuple(value.shape)}"
            )
    model.load_state_dict(full, strict=True)
