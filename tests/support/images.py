"""Small image files the vision tests write: IDX bytes, image folders, .npz, and a tiny VisionConfig."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from PIL import Image

from tformer.config import VisionConfig


def idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    """An IDX file's bytes: magic (00 00 code ndim), big-endian sizes, the big-endian data."""
    dtype = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(dtype).tobytes()


def write_idx(path: Path, array: np.ndarray, code: int = 0x08) -> Path:
    data = idx_bytes(array, code)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def idx_pair(
    directory: Path, n: int = 12, size: int = 8, n_classes: int = 3, seed: int = 0
) -> tuple[Path, Path]:
    """Images (n, size, size) uint8 and labels 0..n_classes-1 (every class present), as .gz files."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
    labels = np.arange(n) % n_classes
    directory.mkdir(parents=True, exist_ok=True)
    return (
        write_idx(directory / "images-idx3-ubyte.gz", images),
        write_idx(directory / "labels-idx1-ubyte.gz", labels),
    )


def image_folder(
    root: Path, classes: dict[str, int] | None = None, size: int = 8, mode: str = "L", seed: int = 0
) -> Path:
    """ROOT/<class>/<i>.png, `classes` name -> count; each class a different mean brightness (learnable)."""
    classes = classes or {"cat": 4, "dog": 4, "eel": 4}
    rng = np.random.default_rng(seed)
    for k, (name, count) in enumerate(classes.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            shape = (size, size) if mode == "L" else (size, size, 3)
            pixels = np.clip(rng.normal(40 + 80 * k, 20, shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, mode).save(folder / f"{i}.png")
    return root


def tiny_vision(**changes: object) -> VisionConfig:
    base: dict[str, object] = dict(
        image_size=8, patch_size=4, channels=1, n_classes=3, d_model=16, n_heads=2, d_ff=32, n_layers=2
    )
    return VisionConfig(**{**base, **changes})
