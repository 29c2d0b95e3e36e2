"""Image data for the vision family, in the formats people have; every error names the file (and the index)
and what was expected.

- IDX pairs, images + labels (MNIST, Fashion-MNIST; plain or .gz): data/idx.py.
- An image folder: ROOT/<class>/<image>, one subfolder per class (class names sorted), PNG / JPEG / BMP /
  GIF / WebP / TIFF read by Pillow, converted to the configured channels (1: grey "L", 3: "RGB") and
  resized to image_size x image_size (bilinear) unless resizing is off, when any other size is an error.
  A corrupt or truncated image, one over Pillow's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`) and
  an empty class folder are errors; files without an image extension are skipped and counted.
- NumPy .npz with arrays `x` (N, H, W) or (N, H, W, channels) and `y` (N,) integers, read with
  allow_pickle=False (an object array is an error, never unpickled).

16-bit grey images are scaled to 8 bits (Pillow's own conversion would clip them at 255); 32-bit integer
and float images (Pillow modes I and F), whose range cannot be told, are errors. Images are kept as
(N, channels, H, W) uint8 (0..255; floats from .npz, which must lie in [0, 1], stay float32), labels as
int64 class indices.
"""

from __future__ import annotations

import sys
import warnings
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from tformer.data.idx import read_idx_pair
from tformer.data.readers import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MODES = {1: "L", 3: "RGB"}
# Pillow modes whose pixel range is unknown: converting them to "L" clips at 255 (refused, not guessed)
WIDE_MODES = {"I": "32-bit integer", "F": "32-bit float"}


def sixteen_to_eight_bit(pixels: np.ndarray) -> np.ndarray:
    """uint16 0..65535 -> uint8 0..255, rounded to nearest (65535 / 255 = 257)."""
    return ((pixels.astype(np.uint32) + 128) // 257).astype(np.uint8)


@dataclass
class ImageSet:
    images: np.ndarray  # (N, channels, H, W) uint8 or float32
    labels: np.ndarray  # (N,) int64
    source: str
    classes: list[str] | None = None  # an image folder's class names (IDX / .npz: None, from the config)
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> files left out

    def __len__(self) -> int:
        return len(self.labels)


def report_skipped_files(data: ImageSet) -> None:
    """One stderr line per reason, e.g. ``train/: skipped 2 file(s): not an image suffix (a.txt, b.csv)``."""
    for reason, files in data.skipped.items():
        more = ", ..." if len(files) > 5 else ""
        print(
            f"{data.source}: skipped {len(files)} file(s): {reason} ({', '.join(files[:5])}{more})",
            file=sys.stderr,
        )


def load_image(
    source: Path | BinaryIO, *, channels: int, size: int, resize: bool, name: str | None = None
) -> np.ndarray:
    """One image file, or an image's bytes as a binary file (the server's requests), -> (channels, size,
    size) uint8, with Pillow's failures as DataErrors naming it (`name`, default the path)."""
    from PIL import Image, UnidentifiedImageError

    path = str(source) if name is None else name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # over the limit: refused
            with Image.open(source) as im:
                im.load()  # decodes now: a truncated file fails here, not later
                mode = im.mode
                if mode.startswith("I;16"):  # 16-bit grey: Pillow's convert would clip it at 255
                    im = Image.fromarray(sixteen_to_eight_bit(np.asarray(im)))
                pixels = None if mode in WIDE_MODES else im.convert(MODES[channels])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(
            f"{path}: refused as a possible decompression bomb ({exc}); expected an image of at most "
            f"{Image.MAX_IMAGE_PIXELS} pixels (PIL.Image.MAX_IMAGE_PIXELS)"
        ) from None
    except UnidentifiedImageError:
        raise DataError(
            f"{path}: not an image Pillow can read; expected {', '.join(IMAGE_SUFFIXES)}"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data (Pillow's own errors)
        raise DataError(
            f"{path}: corrupt or truncated image ({exc}); expected a complete image file"
        ) from None
    if pixels is None:
        raise DataError(
            f"{path}: {WIDE_MODES[mode]} pixels (Pillow mode {mode}), whose range Pillow cannot tell; "
            "expected 8- or 16-bit pixels (save it as an 8-bit PNG or JPEG)"
        )
    if pixels.size != (size, size):
        if not resize:
            w, h = pixels.size
            raise DataError(
                f"{path}: {w} x {h} pixels; expected {size} x {size} (model.image_size), since "
                "data.resize = false (images of mixed sizes need data.resize = true)"
            )
        pixels = pixels.resize((size, size), Image.Resampling.BILINEAR)
    array = np.asarray(pixels, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1).copy()


def image_files(root: Path) -> tuple[list[Path], list[str]]:
    """The image files under `root` (recursively, sorted) and the other files' names (skipped)."""
    images: list[Path] = []
    others: list[Path] = []
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        (images if f.suffix.lower() in IMAGE_SUFFIXES else others).append(f)
    return images, [str(f.relative_to(root)) for f in others]


def read_image_folder(
    root: str | Path, *, channels: int, size: int, resize: bool = True, classes: Sequence[str] | None = None
) -> ImageSet:
    """ROOT/<class>/<images> -> an ImageSet. `classes`: the training split's class names (a validation
    folder's classes must be among them); None: this folder's subfolders, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory; expected an image folder (one subfolder per class)")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise DataError(f"{root}: has no subfolders; expected one subfolder of images per class")
    names = [f.name for f in folders]
    if classes is not None:
        unseen = [n for n in names if n not in classes]
        if unseen:
            raise DataError(
                f"{root}: class folder(s) {unseen} never seen in training; expected classes among {list(classes)}"
            )
    index = {n: i for i, n in enumerate(names if classes is None else classes)}
    skipped: dict[str, list[str]] = {}
    loose = [p.name for p in root.iterdir() if p.is_file()]
    if loose:
        skipped["not in a class folder"] = sorted(loose)
    images, labels = [], []
    for folder in folders:
        files, others = image_files(folder)
        if others:
            skipped.setdefault("not an image suffix", []).extend(f"{folder.name}/{o}" for o in others)
        if not files:
            raise DataError(
                f"{folder}: empty class folder; expected at least one image ({', '.join(IMAGE_SUFFIXES)})"
            )
        for f in files:
            images.append(load_image(f, channels=channels, size=size, resize=resize))
            labels.append(index[folder.name])
    return ImageSet(np.stack(images), np.asarray(labels, dtype=np.int64), str(root), list(index), skipped)


def read_npz(path: str | Path, *, channels: int) -> ImageSet:
    """A .npz with `x` (N, H, W) or (N, H, W, channels) and `y` (N,) integers; never unpickles."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; expected a .npz with arrays x and y")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in ("x", "y") if k not in npz.files]
            if missing:
                raise DataError(f"{path}: has arrays {npz.files}; expected 'x' (images) and 'y' (labels)")
            x, y = npz["x"], npz["y"]
    except ValueError as exc:  # an object array (it would need pickle), or a corrupt member
        if isinstance(exc, DataError):
            raise
        raise DataError(
            f"{path}: cannot read without pickle ({exc}); expected numeric arrays x and y"
        ) from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz ({exc}); expected numpy.savez output") from None
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    else:
        raise DataError(
            f"{path}: x has shape {x.shape}; expected (N, H, W) or (N, H, W, channels) with 1 or 3 channels"
        )
    if x.shape[1] != channels:
        raise DataError(f"{path}: x has {x.shape[1]} channel(s); expected {channels} (model.channels)")
    if x.dtype != np.uint8 and x.dtype.kind not in "f":
        raise DataError(f"{path}: x is {x.dtype}; expected uint8 (0..255) or floating point")
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise DataError(f"{path}: y has shape {y.shape}, {y.dtype}; expected (N,) integers")
    if len(y) != len(x):
        raise DataError(f"{path}: {len(y)} labels in y for {len(x)} images in x; expected one per image")
    flat = x.reshape(len(x), int(np.prod(x.shape[1:])))  # (N, pixels), N = 0 too
    if x.dtype.kind == "f" and not np.isfinite(flat).all():
        bad = int(np.flatnonzero(~np.isfinite(flat).all(1))[0])
        raise DataError(f"{path}: x[{bad}] has a non-finite value; expected finite pixels")
    outside = (flat < 0).any(1) | (flat > 1).any(1) if x.dtype.kind == "f" else np.zeros(0, bool)
    if outside.any():
        bad = int(np.flatnonzero(outside)[0])
        raise DataError(
            f"{path}: x[{bad}] has pixels in [{flat[bad].min():g}, {flat[bad].max():g}]; expected floating-point "
            "pixels in [0, 1] (image files are read as 0..255 / 255: divide by 255, or save x as uint8)"
        )
    x = x if x.dtype == np.uint8 else x.astype(np.float32)
    return ImageSet(np.ascontiguousarray(x), y.astype(np.int64), str(path))


def read_images(
    paths: Sequence[str],
    *,
    channels: int,
    size: int,
    resize: bool = True,
    classes: Sequence[str] | None = None,
) -> ImageSet:
    """One split, by what the paths are: two files (IDX images + labels), a directory (an image folder), or
    one .npz. `classes`: the training split's class names, for a validation folder."""
    if len(paths) == 2:
        images, labels = read_idx_pair(*paths)
        data = ImageSet(images, labels, paths[1])
    elif len(paths) == 1 and Path(paths[0]).is_dir():
        return read_image_folder(paths[0], channels=channels, size=size, resize=resize, classes=classes)
    elif len(paths) == 1 and paths[0].lower().endswith(".npz"):
        data = read_npz(paths[0], channels=channels)
    else:
        raise DataError(
            f"{' '.join(paths) or '(no files)'}: expected an IDX images file and its labels file, an image "
            "folder (one subfolder per class) or one .npz (arrays x, y)"
        )
    if data.images.shape[2:] != (size, size):
        h, w = data.images.shape[2:]
        raise DataError(
            f"{paths[0]}: images are {w} x {h} pixels; expected {size} x {size} (model.image_size)"
        )
    if data.images.shape[1] != channels:
        raise DataError(
            f"{paths[0]}: {data.images.shape[1]} channel(s); expected {channels} (model.channels)"
        )
    return data


def check_labels(data: ImageSet, n_classes: int) -> None:
    """Every label a class index in [0, n_classes); the first outside named with its index."""
    bad = np.flatnonzero((data.labels < 0) | (data.labels >= n_classes))
    if len(bad):
        i = int(bad[0])
        raise DataError(
            f"{data.source}: label {int(data.labels[i])} at index {i} is outside the class range "
            f"[0, {n_classes}) ({len(bad)} such label(s)); expected 0 to {n_classes - 1} "
            "(model.n_classes, or data.classes' length)"
        )


def check_seen(valid: ImageSet, train: ImageSet, classes: Iterable[str]) -> None:
    """Every class of the validation split has training images."""
    names = list(classes)
    seen = set(np.unique(train.labels).tolist())
    unseen = np.flatnonzero(~np.isin(valid.labels, list(seen)))
    if len(unseen):
        i = int(unseen[0])
        label = int(valid.labels[i])
        raise DataError(
            f"{valid.source}: class {names[label]!r} (label {label}) at index {i} has no training images in "
            f"{train.source}; expected validation classes seen in training"
        )
