"""State-dict names of earlier module layouts, mapped to today's when weights are loaded.

A model whose submodules were renamed declares `LEGACY_PREFIXES`: (old prefix, new prefix) pairs relative
to the model, e.g. `Seq2Seq`'s ("decoder_layers.", "decoder.layers.") from before it had a `Decoder`, and
calls `upgrade_on_load(self)`. Old names are recognised by themselves (safetensors keeps no torch metadata
such as `_version`), and no old prefix is a prefix of a name the model has today, so a state saved either
way loads. Three paths read weights by name and all come here:

- `load_state_dict` (safetensors' `load_model`, checkpoint.load_weights, interop, users): the pre-hook that
  `upgrade_on_load` registers renames the keys under the model's prefix before torch matches them;
- full state dicts given to torch.distributed's `set_model_state_dict` (FSDP resume), which matches names
  before any hook runs, and name-keyed optimiser states: `upgrade_names(values, model)` first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

from torch import nn

V = TypeVar("V")
Prefixes = tuple[tuple[str, str], ...]


def _rename(name: str, renames: list[tuple[str, str]]) -> str:
    for old, new in renames:
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def legacy_renames(model: nn.Module) -> list[tuple[str, str]]:
    """(old, new) name prefixes of every renamed submodule of `model`, as full names under `model`."""
    out: list[tuple[str, str]] = []
    for path, module in model.named_modules():
        prefixes: Prefixes = getattr(type(module), "LEGACY_PREFIXES", ())
        p = f"{path}." if path else ""
        out.extend((p + old, p + new) for old, new in prefixes)
    return out


def renamer(model: nn.Module) -> Callable[[str], str]:
    """A parameter name of `model` as an earlier layout wrote it -> today's (current names unchanged)."""
    renames = legacy_renames(model)
    return lambda name: _rename(name, renames)


def upgrade_names(values: Mapping[str, V], model: nn.Module) -> dict[str, V]:
    """`values` keyed by parameter name (weights, optimiser moments) with earlier layouts' names renamed to
    today's names in `model`; names already current pass unchanged."""
    rename = renamer(model)
    return {rename(name): value for name, value in values.items()}


def _upgrade_hook(
    module: nn.Module,
    state_dict: dict[str, object],
    prefix: str,
    local_metadata: object,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    prefixes: Prefixes = getattr(type(module), "LEGACY_PREFIXES", ())
    renames = [(prefix + old, prefix + new) for old, new in prefixes]
    for key in [k for k in state_dict if k.startswith(prefix)]:
        new = _rename(key, renames)
        if new != key and new not in state_dict:
            state_dict[new] = state_dict.pop(key)


def upgrade_on_load(module: nn.Module) -> None:
    """Make `module.load_state_dict` (and any parent's) accept the names of `type(module).LEGACY_PREFIXES`."""
    module.register_load_state_dict_pre_hook(_upgrade_hook)
