"""The type of a value read from (or written as) JSON or TOML: tformer's config files, checkpoints' JSON
files, the accel tuning cache. Torch-free, imports nothing."""

from __future__ import annotations

from typing import TypeAlias

JSON: TypeAlias = dict[str, "JSON"] | list["JSON"] | str | int | float | bool | None
JSONObject: TypeAlias = dict[str, JSON]
