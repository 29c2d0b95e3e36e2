"""Property-based tests of the config front doors: `key=value` overrides, TOML files and from_dict.

Whatever the input, the result is a valid RunConfig (which round-trips through to_dict and JSON, and
whose numbers are finite) or a ConfigError that names the argument or file it came from; never another
exception."""

from __future__ import annotations

import json
import math
import re
from dataclasses import fields
from typing import Any

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from tformer.config import (
    TASKS,
    ClassifierConfig,
    ConfigError,
    DataConfig,
    LMConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
    load_toml,
)

pytestmark = pytest.mark.fuzz

KEYS = sorted(
    {
        f.name
        for cls in (ModelConfig, ClassifierConfig, LMConfig, TrainConfig, DataConfig)
        for f in fields(cls)
    }
)
SECTIONS = ("model", "train", "data")
WORDS = ("sdpa", "local", "chunked", "cosine", "l2", "bpe", "char", "fp16", "bf16", "cls", "mean", "gelu",
         "rotary", "lstm", "cnn", "hf:x", "none", "null", "a.txt", "{data}/x.tsv", "true", "false")  # fmt: skip

junk = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_.-= 0", max_size=12)
keys = st.one_of(st.sampled_from(KEYS), st.sampled_from(KEYS), st.sampled_from(KEYS), junk)  # mostly real
prefixes = st.sampled_from(
    ("", "", "", "", "model.", "train.", "data.", "x.", ".", "model.train.", " train . ")
)


def _float_text(x: float) -> str:
    if math.isnan(x):
        return "nan"
    return ("-inf" if x < 0 else "inf") if math.isinf(x) else repr(x)


numbers = st.one_of(
    st.integers(-3, 70).map(str),
    st.integers(-(2**70), 2**70).map(str),
    st.sampled_from(["1" + "0" * 400, "9" * 5000, "-0", "0", "+1", "1_000", "0x10", "2**8", "1e400"]),
    st.floats(allow_nan=True, allow_infinity=True).map(_float_text),
    st.sampled_from(["inf", "+inf", "-inf", "nan", "-nan", "-0.0", "0.0", "1e-9", "0.5", "0.999", "1.0"]),
)
values = st.one_of(
    st.sampled_from(["1", "2", "4", "8", "16", "64", "0.5", "0.1", "1e-3", "true", "false"]),  # mostly valid
    st.sampled_from(["1", "2", "4", "8", "16", "64", "0.5", "0.1", "1e-3", "true", "false"]),
    numbers,
    st.sampled_from(WORDS),
    st.sampled_from(WORDS).map(json.dumps),
    st.sampled_from(
        [
            "[0.9, 0.98]",
            "[0.9]",
            "[0.9, 0.98, 0.5]",
            "[0.9, nan]",
            "[1, 2]",
            "[3, 4, 5]",
            "[]",
            "[true]",
            '["a.txt", "b.txt"]',
            '[1, "a"]',
            "[[1]]",
            "[inf, 0.5]",
        ]
    ),
    st.sampled_from(["{a = 1}", "{}", "{d_model = 64}", "1979-05-27", "'abc", '"', "[1, 2", "1\nx = 2"]),
    st.just(""),
    st.text(max_size=10),
)


@st.composite
def items(draw: st.DrawFn) -> str:
    """One `[section.]key=value` argument (failures then print as the plain string)."""
    return f"{draw(prefixes)}{draw(keys)}{draw(st.sampled_from(['=', ' = ']))}{draw(values)}"


def _check_valid(cfg: RunConfig) -> None:
    event("a valid config")
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    # as a checkpoint's config.json stores it: tuples become lists, ints stay ints
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict(), allow_nan=False))) == cfg
    for section in (cfg.model, cfg.train, cfg.data):
        for f in fields(section):
            value = getattr(section, f.name)
            for x in value if isinstance(value, tuple) else (value,):
                if isinstance(x, float):
                    assert math.isfinite(x), (f.name, value)
                if "float" in f.type:
                    assert x is None or isinstance(x, float), (f.name, value)


def _check_overrides(task: str, overrides: list[str]) -> None:
    try:
        cfg = apply_overrides(RunConfig(task=task), overrides)
    except ConfigError as exc:
        event("a ConfigError")
        message = str(exc)
        assert message.startswith("override"), message
        named = [item for item in overrides if f"'{item[:50]}" in message]
        assert named, message
        if len(overrides) == 1:
            assert message.startswith(f"override '{overrides[0][:50]}"), message
        # short, even for a 5,000-digit value (the list of valid keys for an unknown key aside)
        assert len(re.sub(r" \(valid keys: .*\)$", "", message)) < 300, message
    else:
        _check_valid(cfg)


@pytest.mark.parametrize("task", TASKS)
@given(overrides=st.lists(items(), min_size=1, max_size=4))
def test_overrides_give_a_valid_config_or_name_the_argument(task, overrides):
    _check_overrides(task, overrides)


def _typed_values(annotation: str) -> st.SearchStrategy[str]:
    """Values of a field's own type, mostly in range: overrides that often give a valid config."""
    if annotation.startswith("tuple"):
        inner = "0.9, 0.98" if "float" in annotation else ("3, 4" if "int" in annotation else '"a.txt"')
        return st.sampled_from([f"[{inner}]", "a.txt", "[]"])
    options = [st.sampled_from(WORDS)]
    if "bool" in annotation:
        options.append(st.sampled_from(["true", "false"]))
    if "int" in annotation:
        options.append(st.integers(-1, 64).map(str))
    if "float" in annotation:
        options.append(st.floats(-0.1, 1.0).map(_float_text))
    return st.one_of(*options)


@st.composite
def typed_items(draw: st.DrawFn, task: str) -> str:
    cfg = RunConfig(task=task)
    section = draw(st.sampled_from(SECTIONS))
    f = draw(st.sampled_from(fields(getattr(cfg, section))))
    return f"{section}.{f.name}={draw(_typed_values(f.type))}"


@pytest.mark.parametrize("task", TASKS)
@given(data=st.data())
def test_typed_overrides_round_trip(task, data):
    overrides = data.draw(st.lists(typed_items(task), min_size=1, max_size=3))
    _check_overrides(task, overrides)


@given(value=values, key=st.sampled_from(["lr", "eps", "clip_norm", "min_lr", "weight_decay", "dropout"]))
def test_a_single_float_override(value, key):
    item = f"{key}={value}"
    try:
        cfg = apply_overrides(RunConfig(task="lm"), [item])
    except ConfigError as exc:
        event("a ConfigError")
        assert str(exc).startswith(f"override '{item[:50]}"), str(exc)
    else:
        _check_valid(cfg)
        got = getattr(cfg.model if key == "dropout" else cfg.train, key)
        assert isinstance(got, float) and math.isfinite(got)
        assert got >= 0 and (got > 0 or key in ("min_lr", "weight_decay", "dropout", "clip_norm"))


# --- TOML documents -----------------------------------------------------------------------------------


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    """The tiny TOML writer: json.dumps writes strings TOML reads as basic strings."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return _float_text(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"


def to_toml(doc: dict[str, Any]) -> str:
    """Top-level values first, then one [table] per dict (dicts inside tables are inline tables)."""
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for name, table in doc.items():
        if isinstance(table, dict):
            lines.append(f"[{_toml_key(name)}]")
            lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


scalars = st.one_of(
    st.integers(-3, 70),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 1e-9, 0.1, 0.5, 0.9, 0.98, 1.0]),
    st.booleans(),
    st.sampled_from(WORDS),
    st.text(max_size=8),
)
toml_values = st.recursive(
    scalars, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(junk, inner, max_size=2)),
    max_leaves=4,
)  # fmt: skip
section_names = st.one_of(st.sampled_from(SECTIONS), st.sampled_from(["trian", "models", "x"]))
tables = st.dictionaries(st.one_of(st.sampled_from(KEYS), junk), toml_values, max_size=4)
documents = st.dictionaries(
    st.one_of(section_names, st.just("task")),
    st.one_of(tables, tables, toml_values, st.sampled_from(TASKS)),
    max_size=4,
)


def _check_loaded(load: Any, source: str) -> None:
    try:
        cfg = load()
    except ConfigError as exc:
        event("a ConfigError")
        assert str(exc).startswith(f"{source}: "), str(exc)
        assert len(re.sub(r" \(valid keys: .*\)$", "", str(exc))) < 400, str(exc)
    else:
        _check_valid(cfg)


@given(doc=documents, task=st.sampled_from([None, *TASKS]))
def test_toml_documents_give_a_valid_config_or_name_the_file(tmp_path, doc, task):
    path = tmp_path / "run.toml"
    path.write_text(to_toml(doc))
    _check_loaded(lambda: load_toml(path, task=task), str(path))


@given(text=st.one_of(st.text(max_size=60), st.binary(max_size=30)))
def test_random_text_gives_a_config_or_names_the_file(tmp_path, text):
    path = tmp_path / "run.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    _check_loaded(lambda: load_toml(path), str(path))


@given(data=st.one_of(documents, toml_values), task=st.sampled_from([None, *TASKS]))
def test_from_dict_of_any_json_names_the_source(data, task):
    data = json.loads(json.dumps(data))  # what a checkpoint's config.json can hold
    _check_loaded(lambda: RunConfig.from_dict(data, source="run/config.json", task=task), "run/config.json")
