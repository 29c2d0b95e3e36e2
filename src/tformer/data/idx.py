"""The IDX format of MNIST and Fashion-MNIST (LeCun et al.; yann.lecun.com/exdb/mnist), plain or gzipped.

    bytes 0-1   0x00 0x00
    byte  2     element type: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64
    byte  3     number of dimensions, n >= 1
    then        n sizes, big-endian uint32 each; then prod(sizes) elements, big-endian, row-major

A file must be exactly that long: a count that disagrees with the file's size (truncated, or with bytes
after the data) is an error, as is a wrong magic number, an unknown type code or a corrupt .gz. Every
error names the file and what was expected.
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from tformer.data.readers import DataError

DTYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_MAX_DIMS = 8
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise DataError(f"{path}: file not found; expected an IDX file (plain or .gz)")
    if path.is_dir():
        raise DataError(f"{path}: is a directory; expected an IDX file (plain or .gz)")
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:  # gzip data, named .gz or not (the MNIST downloads are .gz)
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(
                f"{path}: corrupt or truncated gzip data ({exc}); expected a gzipped IDX file"
            ) from None
    if path.suffix == ".gz":
        raise DataError(f"{path}: named .gz but not gzip data (starts {raw[:2].hex()}); expected gzip's 1f8b")
    return raw


def parse_idx(data: bytes, source: str) -> np.ndarray:
    """The bytes of an IDX file -> its array (native byte order), every header field checked."""
    if len(data) < 4:
        raise DataError(f"{source}: {len(data)} bytes; an IDX file starts with a 4-byte magic number")
    if data[0] != 0 or data[1] != 0:
        raise DataError(
            f"{source}: magic number {data[:4].hex()} does not start with 0000; not an IDX file "
            "(expected 00 00, a type code and a dimension count, e.g. 00000803 for images)"
        )
    code, ndim = data[2], data[3]
    if code not in DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in DTYPES)
        raise DataError(f"{source}: IDX type code 0x{code:02X} in the magic number; expected one of {known}")
    if not 1 <= ndim <= _MAX_DIMS:
        raise DataError(f"{source}: IDX magic number says {ndim} dimensions; expected 1 to {_MAX_DIMS}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(
            f"{source}: {len(data)} bytes, shorter than the {header}-byte header of {ndim} dimension sizes"
        )
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = DTYPES[code]
    want = header + math.prod(shape) * dtype.itemsize
    if len(data) != want:
        raise DataError(
            f"{source}: the header says {' x '.join(map(str, shape))} elements of {dtype.itemsize} byte(s) "
            f"({want} bytes with the header), but the data is {len(data)} bytes"
            + (" (truncated)" if len(data) < want else " (bytes after the data)")
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (plain or gzipped) -> its array."""
    path = Path(path)
    return parse_idx(_read_bytes(path), str(path))


def read_idx_pair(images_path: str | Path, labels_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """MNIST-style images (N, H, W) uint8 and labels (N,) -> images (N, 1, H, W) uint8, labels (N,) int64."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(
            f"{images_path}: an IDX array of {images.ndim} dimension(s), {images.dtype}; expected images: "
            "3 dimensions (count, rows, columns) of uint8 (type 0x08)"
        )
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(
            f"{labels_path}: an IDX array of {labels.ndim} dimension(s), {labels.dtype}; expected labels: "
            "1 dimension of integers"
        )
    if len(images) != len(labels):
        raise DataError(
            f"{labels_path}: {len(labels)} labels for the {len(images)} images of {images_path}; "
            "expected one label per image"
        )
    return images[:, None], labels.astype(np.int64)
