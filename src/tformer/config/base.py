"""What every config section shares: ConfigError, the checks that quote the bad value, and `Section` (a
frozen dataclass built from a mapping, whose unknown keys name the closest valid key). Imports no torch."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TypeVar

S = TypeVar("S", bound="Section")


class ConfigError(ValueError):
    """A configuration value or key that cannot be used."""


INT64 = (-(2**63), 2**63)  # TOML's integers; any count or seed beyond them cannot be a tensor or a seed


def short(text: str, limit: int = 60) -> str:
    """Keep messages short: a 400-digit number or a 5,000-character argument is cut."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def show(value: object) -> str:
    try:
        return short(repr(value))
    except ValueError:  # an int past Python's digit limit for str()
        return f"<an int of {value.bit_length() if isinstance(value, int) else '?'} bits>"


def closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else f" (valid keys: {', '.join(sorted(options))})"


def check_choice(cls_name: str, key: str, value: object, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str):
        raise ConfigError(
            f"{cls_name}.{key} = {show(value)} is not a string; expected one of {', '.join(choices)}"
        )
    if value not in choices:
        raise ConfigError(f"{cls_name}.{key} = {value!r} is not one of {', '.join(choices)}")


def _type_ok(value: object, annotation: str) -> bool:
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


def _checked(cls_name: str, key: str, value: object, annotation: str) -> object:
    """`value` if it is of type `annotation`, ints made floats where floats are declared; else a ConfigError
    naming the key, the value and the type. Floats must be finite (a NaN compares false with every bound,
    so it would slip past the range checks) and ints must fit in 64 bits."""
    if not _type_ok(value, annotation):
        raise ConfigError(f"{cls_name}.{key} = {show(value)} ({type(value).__name__}); expected {annotation}")
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int) and "float" in annotation and "int" not in annotation:
        try:
            value = float(value)
        except OverflowError:
            raise ConfigError(f"{cls_name}.{key} = {show(value)} is too large for a float") from None
    elif isinstance(value, int) and not INT64[0] <= value < INT64[1]:
        raise ConfigError(f"{cls_name}.{key} = {show(value)} is outside the 64-bit integers")
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


def check_types(config: Section) -> None:
    """Each field holds a value of its declared type (see _checked); tuples are made tuples."""
    for f in fields(config):
        annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        value = _checked(type(config).__name__, f.name, getattr(config, f.name), annotation)
        object.__setattr__(config, f.name, value)


def check_positive(cls_name: str, **values: float) -> None:
    for key, value in values.items():
        if not value > 0:
            raise ConfigError(f"{cls_name}.{key} must be > 0, got {value!r}")


def check_nonnegative(cls_name: str, **values: float) -> None:
    for key, value in values.items():
        if not value >= 0:
            raise ConfigError(f"{cls_name}.{key} must be >= 0, got {value!r}")


def check_probability(cls_name: str, **values: float) -> None:
    for key, value in values.items():
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{cls_name}.{key} must be in [0, 1), got {value!r}")


@dataclass(frozen=True)
class Section:
    """A frozen config section ([model], [train], [data], or a whole run): built from a mapping, written
    back as one, changed by `replace`; unknown keys are errors naming the closest valid key."""

    @classmethod
    def from_dict(cls: type[S], data: Mapping[str, object], *, source: str = "config") -> S:
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
                    f"{source}: unknown {cls.__name__} key '{short(str(key))}'{closest(str(key), names)}"
                )
        try:
            return cls(**data)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    def replace(self: S, **changes: object) -> S:
        names = [f.name for f in fields(self)]
        for key in changes:
            if key not in names:
                raise ConfigError(f"unknown {type(self).__name__} key '{key}'{closest(key, names)}")
        return dataclasses.replace(self, **changes)
