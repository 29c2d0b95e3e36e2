"""Property-based fuzzing of the IDX reader (hypothesis; conftest's fast derandomized profile by default):
any bytes, plain or gzipped, and any damage to a well-formed file give the array or a DataError that names
the file, never another exception; well-formed files of any type code and shape read back exactly."""

import gzip
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from support.images import idx_bytes
from tformer.data.idx import DTYPES, parse_idx, read_idx
from tformer.data.readers import DataError

pytestmark = pytest.mark.fuzz

SHAPES = st.lists(st.integers(0, 4), min_size=1, max_size=3)


def _read(data: bytes, name: str) -> np.ndarray | None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        try:
            return read_idx(path)
        except DataError as exc:
            assert str(exc).startswith(f"{path}: "), exc
            return None


@given(st.binary(max_size=64), st.booleans())
def test_any_bytes(data, zipped):
    name = "x-idx.gz" if zipped else "x-idx"
    _read(gzip.compress(data) if zipped else data, name)
    _read(data, "y-idx.gz")  # raw bytes named .gz


@given(st.sampled_from(sorted(DTYPES)), SHAPES, st.data())
def test_damaged_files(code, shape, data):
    good = idx_bytes(np.ones(shape), code)
    at = data.draw(st.integers(0, len(good)))
    kind = data.draw(st.sampled_from(["cut", "extra", "flip"]))
    if kind == "cut":
        bad = good[:at]
    elif kind == "extra":
        bad = good + data.draw(st.binary(min_size=1, max_size=8))
    else:
        i = min(at, len(good) - 1)
        bad = good[:i] + bytes([good[i] ^ data.draw(st.integers(1, 255))]) + good[i + 1 :]
    out = _read(bad, "d-idx")
    if out is not None:  # a change that still parses must describe a consistent file
        assert out.size * out.dtype.itemsize + 4 + 4 * out.ndim == len(bad)


@given(st.sampled_from(sorted(DTYPES)), SHAPES)
def test_round_trip(code, shape):
    rng = np.random.default_rng(0)
    array = rng.integers(-100, 100, shape) if code != 0x08 else rng.integers(0, 256, shape)
    got = parse_idx(idx_bytes(array, code), "mem")
    assert got.shape == tuple(shape) and np.array_equal(got, array.astype(got.dtype))
