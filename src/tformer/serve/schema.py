"""Request bodies read by a small typed schema of the server's own (no pydantic in the `serve` extra): the
body must be a JSON object whose keys the endpoint knows; `Body` reads each field with its type and range
and answers a `RequestError` naming the field, what it got and what was expected.

JSON is read strictly: NaN / Infinity (which Python's json accepts) are refused, as are text that is not
UTF-8, nesting too deep to parse, and strings that are not valid Unicode (lone surrogates, which the
tokenizers cannot encode).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import overload

from tformer.config.base import closest, show
from tformer.serve.errors import RequestError

JSONValue = object


def _no_constants(name: str) -> object:
    raise ValueError(f"{name} is not JSON (numbers must be finite)")


def parse_json(raw: bytes) -> JSONValue:
    """A request body -> its JSON value, or a RequestError (field null) saying why it is not JSON."""
    if not raw.strip():
        raise RequestError("the body is empty; expected a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(
            f"the body is not UTF-8 text ({exc.reason} at byte {exc.start}); expected a JSON object"
        ) from None
    try:
        return json.loads(text, parse_constant=_no_constants)
    except RecursionError:
        raise RequestError(
            "the body nests too deeply to read; expected a JSON object of plain fields"
        ) from None
    except ValueError as exc:  # json.JSONDecodeError, and NaN / Infinity above
        raise RequestError(f"the body is not valid JSON: {exc}") from None


def json_type(value: object) -> str:
    """How a JSON value is named in messages ("a string", "an array", ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _got(value: object) -> str:
    kind = json_type(value)
    return kind if isinstance(value, (list, dict)) or value is None else f"{kind} ({show(value)})"


def _valid_text(name: str, value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(
            f"{name} holds a lone surrogate escape; expected valid Unicode text", field=name
        ) from None
    return value


class Body:
    """A JSON object read field by field. The keys must be among `accepted` (the endpoint's parameters);
    an unknown one is an error naming the closest accepted key."""

    def __init__(self, value: JSONValue, accepted: Sequence[str]) -> None:
        if not isinstance(value, dict):
            raise RequestError(f"the body is {json_type(value)}; expected a JSON object")
        for key in value:
            if key not in accepted:
                hint = closest(key, list(accepted))
                raise RequestError(f"unknown parameter {show(key)}{hint}", field=str(key))
        self._value: dict[str, object] = value

    def present(self, name: str) -> bool:
        """Given and not null."""
        return self._value.get(name) is not None

    def text(self, name: str, *, what: str) -> str:
        """A required string; `what` says what it is for in the message."""
        value = self._value.get(name)
        if name not in self._value:
            raise RequestError(f"{name} is missing; expected a string: {what}", field=name)
        if not isinstance(value, str):
            raise RequestError(f"{name} is {_got(value)}; expected a string: {what}", field=name)
        return _valid_text(name, value)

    @overload
    def integer(self, name: str, default: int, *, low: int, high: int) -> int: ...

    @overload
    def integer(self, name: str, default: None, *, low: int, high: int) -> int | None: ...

    def integer(self, name: str, default: int | None, *, low: int, high: int) -> int | None:
        """An integer in [low, high]; absent or null: `default`. true / false and 4.0 are not integers."""
        value = self._value.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise RequestError(
                f"{name} is {_got(value)}; expected an integer from {low} to {high}", field=name
            )
        if not low <= value <= high:
            raise RequestError(
                f"{name} = {show(value)} is out of range; expected {low} to {high}", field=name
            )
        return value

    def number(self, name: str, default: float, *, low: float, high: float, above: bool = False) -> float:
        """A number in [low, high] ((low, high] with `above`); absent or null: `default`."""
        value = self._value.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            span = f"{'above ' if above else 'from '}{low} {'up ' if above else ''}to {high}"
            raise RequestError(f"{name} is {_got(value)}; expected a number {span}", field=name)
        number = float(value)
        if not (low < number if above else low <= number) or number > high:
            span = f"{'> ' if above else '>= '}{low} and <= {high}"
            raise RequestError(f"{name} = {show(value)} is out of range; expected {span}", field=name)
        return number

    def boolean(self, name: str, default: bool) -> bool:
        value = self._value.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise RequestError(f"{name} is {_got(value)}; expected true or false", field=name)
        return value

    def texts(self, name: str, *, max_items: int, single: bool) -> tuple[str, ...]:
        """An array of at most `max_items` non-empty strings (`single`: a lone string too); absent: ()."""
        value = self._value.get(name)
        if value is None:
            return ()
        if single and isinstance(value, str):
            value = [value]
        expected = f"{'a string or ' if single else ''}an array of at most {max_items} non-empty strings"
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise RequestError(f"{name} is {_got(value)}; expected {expected}", field=name)
        if len(value) > max_items:
            raise RequestError(f"{name} has {len(value)} strings; expected {expected}", field=name)
        return tuple(_valid_text(name, v) for v in value)
