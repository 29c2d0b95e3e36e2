"""A RunConfig from a TOML file, and changed by command-line `key=value` overrides (applied per section at
once). Imports no torch."""

from __future__ import annotations

import re
import sys
from dataclasses import fields
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

from tformer.config.base import ConfigError, Section, closest, short
from tformer.config.run import RunConfig


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
        raise ConfigError(f"{path}: not valid TOML: {short(str(exc), 200)}") from None
    return RunConfig.from_dict(data, source=str(path), task=task)


def _parse_value(item: str, text: str) -> object:
    """One TOML value; a bare word (or anything that is not one TOML value) stays a string."""
    try:
        parsed = tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        return text
    except ValueError:  # valid syntax that Python refuses, such as an int past the digit limit
        raise ConfigError(f"override '{short(item)}': the value is not usable TOML") from None
    return parsed["v"] if list(parsed) == ["v"] else text  # "1\nx = 2" is not one value


def _blame(error: ConfigError, items: dict[str, str]) -> ConfigError:
    """`error`, prefixed by the overrides (key -> argument) it names, or all of them when it names none."""
    message = str(error)
    named = [item for key, item in items.items() if re.search(rf"(?<!\w){re.escape(key)}(?!\w)", message)]
    named = named or list(items.values())
    which = ", ".join(f"'{short(item)}'" for item in named)
    return ConfigError(f"override{'s' * (len(named) > 1)} {which}: {message}")


def apply_overrides(config: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply `section.key=value` overrides; a bare `key=value` is looked up in model, train, data.

    All changes to a section are applied together, so `d_model=32 n_heads=2` is valid whatever the order.
    Every error names the argument(s) it comes from."""
    changes: dict[str, dict[str, object]] = {"model": {}, "train": {}, "data": {}}
    arguments: dict[str, dict[str, str]] = {"model": {}, "train": {}, "data": {}}  # section -> key -> item
    sections: dict[str, Section] = {"model": config.model, "train": config.train, "data": config.data}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{short(item)}' is not of the form key=value")
        key, text = item.split("=", 1)
        section, dot, name = key.strip().rpartition(".")
        if not name.strip():
            raise ConfigError(
                f"override '{short(item)}': the key is empty; write key=value or section.key=value"
            )
        if dot and not section.strip():
            raise ConfigError(
                f"override '{short(item)}': the section is empty; write {name}=... or <section>.{name}=..."
            )
        if not section:
            owners = [sec for sec, cfg in sections.items() if name in [f.name for f in fields(cfg)]]
            if len(owners) > 1:
                raise ConfigError(
                    f"override '{short(item)}': '{name}' is a key of {' and '.join(owners)}; write "
                    + " or ".join(f"{sec}.{name}" for sec in owners)
                )
            if not owners:
                every = [f.name for cfg in sections.values() for f in fields(cfg)]
                raise ConfigError(
                    f"override '{short(item)}': unknown key '{short(name)}'{closest(name, every)}"
                )
            section = owners[0]
        if section not in sections:
            raise ConfigError(
                f"override '{short(item)}': unknown section '{short(section)}'"
                f"{closest(section, list(sections))}"
            )
        valid = [f.name for f in fields(sections[section])]
        if name not in valid:
            raise ConfigError(
                f"override '{short(item)}': unknown {section} key '{short(name)}'{closest(name, valid)}"
            )
        changes[section][name] = _parse_value(item, text.strip())
        arguments[section][name] = item
    updated: dict[str, Section] = {}
    for sec, kw in changes.items():
        if kw:
            try:
                updated[sec] = sections[sec].replace(**kw)
            except ConfigError as exc:
                raise _blame(exc, arguments[sec]) from None
    try:
        return config.replace(**updated) if updated else config
    except ConfigError as exc:  # across sections: train.init_from and the task
        raise _blame(exc, {k: v for args in arguments.values() for k, v in args.items()}) from None
