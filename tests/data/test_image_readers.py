"""The vision readers on small files the tests write: IDX (plain, .gz), image folders, .npz; every bad
input of issue 16 with its message (the file, the index where there is one, what was expected)."""

import gzip
import io
import re

import numpy as np
import pytest
from PIL import Image

from support.images import idx_bytes, idx_pair, image_folder, write_idx
from tformer.data.idx import read_idx, read_idx_pair
from tformer.data.images import (
    ImageSet,
    check_labels,
    check_seen,
    load_image,
    read_image_folder,
    read_images,
    read_npz,
)
from tformer.data.readers import DataError


def test_idx_plain_and_gz_round_trip(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("a-idx3-ubyte", "a-idx3-ubyte.gz"):
        assert np.array_equal(read_idx(write_idx(tmp_path / name, a)), a)
    f = np.linspace(-1, 1, 6).reshape(2, 3)
    assert np.array_equal(read_idx(write_idx(tmp_path / "f.idx", f, 0x0E)), f)
    ints = np.array([-5, 7, 70000])
    assert np.array_equal(read_idx(write_idx(tmp_path / "i.idx", ints, 0x0C)), ints)


def test_idx_pair(tmp_path):
    images, labels = read_idx_pair(*idx_pair(tmp_path, n=6))
    assert images.shape == (6, 1, 8, 8) and images.dtype == np.uint8
    assert labels.tolist() == [0, 1, 2, 0, 1, 2] and labels.dtype == np.int64


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x08\x03", r"2 bytes; an IDX file starts with a 4-byte magic number"),
        (b"\x01\x00\x08\x01" + bytes(4), r"magic number 01000801 does not start with 0000; not an IDX file"),
        (b"\x00\x00\x07\x01" + bytes(4), r"IDX type code 0x07 in the magic number; expected one of 0x08"),
        (b"\x00\x00\x08\x00", r"IDX magic number says 0 dimensions; expected 1 to 8"),
        (b"\x00\x00\x08\x03" + bytes(4), r"8 bytes, shorter than the 16-byte header of 3 dimension sizes"),
        (
            idx_bytes(np.zeros((3, 2, 2), np.uint8))[:-1],
            r"the header says 3 x 2 x 2 elements .* but the data is 27 bytes \(truncated\)",
        ),
        (
            idx_bytes(np.zeros(3, np.uint8)) + b"\x00",
            r"the header says 3 elements of 1 byte\(s\) \(11 bytes with the header\), but the data is 12 bytes \(bytes after the data\)",
        ),
    ],
)
def test_idx_bad_bytes(tmp_path, data, message):
    path = tmp_path / "bad-idx"
    path.write_bytes(data)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: {message}"):
        read_idx(path)


def test_idx_bad_files(tmp_path):
    with pytest.raises(DataError, match=r"missing.gz: file not found; expected an IDX file"):
        read_idx(tmp_path / "missing.gz")
    (tmp_path / "plain.gz").write_bytes(idx_bytes(np.zeros(2, np.uint8)))
    with pytest.raises(DataError, match=r"plain.gz: named .gz but not gzip data \(starts 0000\)"):
        read_idx(tmp_path / "plain.gz")
    (tmp_path / "cut.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(100, np.uint8)))[:-12])
    with pytest.raises(DataError, match=r"cut.gz: corrupt or truncated gzip data .*expected a gzipped IDX"):
        read_idx(tmp_path / "cut.gz")


def test_idx_pair_mismatches(tmp_path):
    images = write_idx(tmp_path / "im", np.zeros((4, 8, 8), np.uint8))
    labels = write_idx(tmp_path / "lab", np.zeros(3, np.uint8))
    with pytest.raises(
        DataError, match=r"lab: 3 labels for the 4 images of .*im; expected one label per image"
    ):
        read_idx_pair(images, labels)
    with pytest.raises(
        DataError, match=r"lab: an IDX array of 1 dimension\(s\), uint8; expected images: 3 dim"
    ):
        read_idx_pair(labels, labels)
    with pytest.raises(
        DataError, match=r"im: an IDX array of 3 dimension\(s\), uint8; expected labels: 1 dim"
    ):
        read_idx_pair(images, images)


def test_image_folder(tmp_path, capsys):
    root = image_folder(tmp_path / "train", {"b": 2, "a": 3}, size=10)
    (root / "README.txt").write_text("not an image")
    (root / "a" / "notes.csv").write_text("x")
    data = read_image_folder(root, channels=1, size=8)
    assert data.classes == ["a", "b"] and data.labels.tolist() == [0, 0, 0, 1, 1]
    assert data.images.shape == (5, 1, 8, 8) and data.images.dtype == np.uint8  # resized 10 -> 8
    assert data.skipped == {"not in a class folder": ["README.txt"], "not an image suffix": ["a/notes.csv"]}
    rgb = read_image_folder(root, channels=3, size=10)
    assert rgb.images.shape == (5, 3, 10, 10)
    from tformer.data.images import report_skipped_files

    report_skipped_files(data)
    assert "skipped 1 file(s): not an image suffix (a/notes.csv)" in capsys.readouterr().err


def test_image_folder_errors(tmp_path, monkeypatch):
    root = image_folder(tmp_path / "d", {"a": 2, "b": 2})
    good = (root / "a" / "0.png").read_bytes()
    (root / "a" / "0.png").write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(
        DataError, match=r"a/0.png: corrupt or truncated image .*expected a complete image file"
    ):
        read_image_folder(root, channels=1, size=8)
    (root / "a" / "0.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match=r"a/0.png: not an image Pillow can read; expected .png"):
        read_image_folder(root, channels=1, size=8)
    (root / "a" / "0.png").write_bytes(good)
    Image.new("L", (9, 8)).save(root / "b" / "9.png")  # a second size
    with pytest.raises(
        DataError,
        match=r"b/9.png: 9 x 8 pixels; expected 8 x 8 \(model.image_size\), since data.resize = false",
    ):
        read_image_folder(root, channels=1, size=8, resize=False)
    (root / "b" / "9.png").unlink()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30)  # 64 pixels: over the limit
    with pytest.raises(
        DataError, match=r"a/0.png: refused as a possible decompression bomb .*at most 30 pixels"
    ):
        read_image_folder(root, channels=1, size=8)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40)  # 64 pixels: Pillow only warns below twice the limit
    with pytest.raises(
        DataError, match=r"a/0.png: refused as a possible decompression bomb .*at most 40 pixels"
    ):
        read_image_folder(root, channels=1, size=8)
    monkeypatch.undo()
    (root / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: empty class folder; expected at least one image"):
        read_image_folder(root, channels=1, size=8)
    (root / "empty").rmdir()
    with pytest.raises(
        DataError,
        match=r"d: class folder\(s\) \['b'\] never seen in training; expected classes among \['a'\]",
    ):
        read_image_folder(root, channels=1, size=8, classes=["a"])
    with pytest.raises(DataError, match=r"nothing: not a directory; expected an image folder"):
        read_image_folder(tmp_path / "nothing", channels=1, size=8)
    (tmp_path / "flat").mkdir()
    with pytest.raises(
        DataError, match=r"flat: has no subfolders; expected one subfolder of images per class"
    ):
        read_image_folder(tmp_path / "flat", channels=1, size=8)


def test_jpeg(tmp_path):
    """JPEG through Pillow: a smooth image decodes close to what was saved (lossy), a cut file is an error."""
    rows = np.linspace(20, 230, 16)
    pixels = np.repeat(rows[:, None], 16, 1).astype(np.uint8)
    path = tmp_path / "ramp.jpg"
    Image.fromarray(pixels, "L").save(path, quality=95)
    out = load_image(path, channels=1, size=16, resize=False)
    assert out.shape == (1, 16, 16) and out.dtype == np.uint8
    assert np.abs(out[0].astype(int) - pixels.astype(int)).max() <= 4
    rgb = load_image(path, channels=3, size=8, resize=True)
    assert rgb.shape == (3, 8, 8) and (rgb[0] == rgb[1]).all() and (rgb[1] == rgb[2]).all()
    (tmp_path / "cut.jpg").write_bytes(path.read_bytes()[:200])
    with pytest.raises(
        DataError, match=r"cut.jpg: corrupt or truncated image .*expected a complete image file"
    ):
        load_image(tmp_path / "cut.jpg", channels=1, size=16, resize=False)


def test_pixel_depths(tmp_path):
    """16-bit grey is scaled to 8 bits (Pillow's convert would clip at 255); 32-bit int and float refused."""
    wide = (np.arange(16, dtype=np.uint16).reshape(4, 4) * 17) * 257  # 0 .. 65535 in steps of 17 * 257
    Image.fromarray(wide).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode == "I;16"
    out = load_image(tmp_path / "g16.png", channels=1, size=4, resize=False)
    np.testing.assert_array_equal(out[0], np.arange(16).reshape(4, 4) * 17)
    assert (load_image(tmp_path / "g16.png", channels=3, size=4, resize=False) == out).all()
    Image.fromarray(np.full((4, 4), 1000, np.int32)).save(tmp_path / "i32.tif")
    with pytest.raises(
        DataError, match=r"i32.tif: 32-bit integer pixels \(Pillow mode I\).*expected 8- or 16-bit"
    ):
        load_image(tmp_path / "i32.tif", channels=1, size=4, resize=False)
    Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(tmp_path / "f32.tif")
    with pytest.raises(DataError, match=r"f32.tif: 32-bit float pixels \(Pillow mode F\)"):
        load_image(tmp_path / "f32.tif", channels=1, size=4, resize=False)


def test_npz(tmp_path):
    x = np.zeros((3, 8, 8, 3), np.uint8)
    np.savez(tmp_path / "ok.npz", x=x, y=np.array([0, 1, 2]))
    data = read_npz(tmp_path / "ok.npz", channels=3)
    assert data.images.shape == (3, 3, 8, 8) and data.labels.tolist() == [0, 1, 2]
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}], dtype=object), y=np.array([0]))
    with pytest.raises(
        DataError, match=r"obj.npz: cannot read without pickle .*expected numeric arrays x and y"
    ):
        read_npz(tmp_path / "obj.npz", channels=1)
    np.savez(tmp_path / "keys.npz", images=x)
    with pytest.raises(
        DataError, match=r"keys.npz: has arrays \['images'\]; expected 'x' \(images\) and 'y'"
    ):
        read_npz(tmp_path / "keys.npz", channels=3)
    np.savez(tmp_path / "n.npz", x=x, y=np.array([0, 1]))
    with pytest.raises(DataError, match=r"n.npz: 2 labels in y for 3 images in x; expected one per image"):
        read_npz(tmp_path / "n.npz", channels=3)
    with pytest.raises(DataError, match=r"ok.npz: x has 3 channel\(s\); expected 1 \(model.channels\)"):
        read_npz(tmp_path / "ok.npz", channels=1)
    np.savez(tmp_path / "shape.npz", x=np.zeros((3, 8)), y=np.array([0, 1, 2]))
    with pytest.raises(DataError, match=r"shape.npz: x has shape \(3, 8\); expected \(N, H, W\)"):
        read_npz(tmp_path / "shape.npz", channels=1)
    np.savez(tmp_path / "yf.npz", x=x, y=np.array([0.5, 1, 2]))
    with pytest.raises(DataError, match=r"yf.npz: y has shape \(3,\), float64; expected \(N,\) integers"):
        read_npz(tmp_path / "yf.npz", channels=3)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"junk.npz: "):
        read_npz(tmp_path / "junk.npz", channels=1)
    buf = io.BytesIO()
    np.savez(buf, x=np.full((1, 2, 2), np.nan, np.float32), y=np.array([0]))
    (tmp_path / "nan.npz").write_bytes(buf.getvalue())
    with pytest.raises(DataError, match=r"nan.npz: x\[0\] has a non-finite value"):
        read_npz(tmp_path / "nan.npz", channels=1)
    floats = np.zeros((3, 2, 2), np.float32)
    floats[1, 0, 0] = 255.0  # 0..255 floats: would be read as 255 times too bright
    np.savez(tmp_path / "f255.npz", x=floats, y=np.array([0, 1, 2]))
    with pytest.raises(
        DataError,
        match=r"f255.npz: x\[1\] has pixels in \[0, 255\]; expected floating-point pixels in \[0, 1\]",
    ):
        read_npz(tmp_path / "f255.npz", channels=1)
    with open(tmp_path / "UPPER.NPZ", "wb") as f:  # a path would get ".npz" appended
        np.savez(f, x=x, y=np.array([0, 1, 2]))
    assert len(read_images([str(tmp_path / "UPPER.NPZ")], channels=3, size=8)) == 3


def test_labels_and_splits(tmp_path):
    images, labels = idx_pair(tmp_path, n=6)
    data = read_images([str(images), str(labels)], channels=1, size=8)
    with pytest.raises(
        DataError,
        match=r"labels-idx1-ubyte.gz: label 2 at index 2 is outside the class range \[0, 2\) \(2 such label\(s\)\)",
    ):
        check_labels(data, 2)
    check_labels(data, 3)
    with pytest.raises(DataError, match=r"images-idx3-ubyte.gz: images are 8 x 8 pixels; expected 28 x 28"):
        read_images([str(images), str(labels)], channels=1, size=28)
    train = ImageSet(data.images[:2], data.labels[:2], "train-labels")
    with pytest.raises(
        DataError,
        match=r"labels-idx1-ubyte.gz: class 'c' \(label 2\) at index 2 has no training images in train-labels",
    ):
        check_seen(data, train, ["a", "b", "c"])
    with pytest.raises(
        DataError, match=r"a b c: expected an IDX images file and its labels file, an image folder"
    ):
        read_images(["a", "b", "c"], channels=1, size=8)
