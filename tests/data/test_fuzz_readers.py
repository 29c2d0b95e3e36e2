"""Property-based fuzzing of the readers (hypothesis; the fast derandomized profile from conftest by default).

Robustness: any bytes, in any encoding, with any line endings and column counts, plain or (corrupt) .gz,
give each reader a result or a DataError that starts with the file's path (and its `:line` when a line is
at fault) and says what was expected: never another exception. Round trips: well-formed files with any
line endings parse back to exactly the rows written, with the blank lines inserted counted and named.
Files go under a TemporaryDirectory per example (function-scoped fixtures are shared across examples).
"""

import contextlib
import csv
import gzip
import io
import json
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tformer.data import readers
from tformer.data.readers import DataError, read_labelled, read_lines, read_parallel, read_text

ENDINGS = ["\n", "\r\n", "\r"]
SPECIALS = "\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"  # str.splitlines breaks on these; the readers must not
BLANKS = ["", "  ", " \t "]
CHUNKS = st.sampled_from([1, 2, 3, 7, 1 << 16])  # read sizes: a \r\n split across reads must stay one break

# text that survives a reader unchanged: no line breaks, tabs, NUL or BOM, no surrogates, no outer whitespace
CHARS = st.one_of(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\t\r\n\x00\ufeff"),
    st.sampled_from(SPECIALS),
)
TEXTS = st.text(CHARS, min_size=1, max_size=10).map(str.strip).filter(bool)


@contextlib.contextmanager
def _chunk(size: int) -> Iterator[None]:
    saved, readers._CHUNK = readers._CHUNK, size
    try:
        yield
    finally:
        readers._CHUNK = saved


def _split(raw: bytes) -> list[bytes]:
    """The reference: universal-newline lines of the whole buffer at once."""
    parts = re.split(rb"\r\n|\r|\n", raw)
    return parts[:-1] if parts[-1] == b"" else parts


@st.composite
def _endings(draw, n: int) -> tuple[list[str], bool]:
    style = draw(st.sampled_from(["\n", "\r\n", "\r", "mixed"]))
    return [draw(st.sampled_from(ENDINGS)) if style == "mixed" else style for _ in range(n)], draw(
        st.booleans()
    )


def _assemble(lines: list[str], endings: list[str], final: bool) -> str:
    """Lines joined by their endings; an unambiguous file: '\\r' then a blank line ending '\\n' would read as one
    '\\r\\n' break, so that blank line ends in '\\r\\n'; a last line is dropped of its break only if non-empty."""
    out, prev = [], ""
    for i, (line, end) in enumerate(zip(lines, endings, strict=True)):
        if prev == "\r" and line == "" and end == "\n":
            end = "\r\n"
        if i == len(lines) - 1 and not final and line:
            end = ""
        out.append(line + end)
        prev = end
    return "".join(out)


def _write(folder: str, name: str, data: bytes, gz: bool) -> Path:
    path = Path(folder) / (name + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


# ---- robustness: anything in, a result or a DataError out ----

FIELDS = st.one_of(
    st.sampled_from(["text", "label", "", " ", '"', '""', '"a,b"', 'a"b', '"x" y', "é", "null", *SPECIALS]),
    TEXTS,
    st.text(max_size=6),  # anything, line breaks and tabs included
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["text", "label", "x"]), inner)
    ),
    max_leaves=5,
)
JSON_LINES = st.one_of(
    st.fixed_dictionaries({"text": JSON, "label": JSON}).map(json.dumps),
    st.fixed_dictionaries({"text": TEXTS, "label": TEXTS | st.integers()}).map(json.dumps),
    JSON.map(json.dumps),
    st.sampled_from(
        ['{"text": "a", "text": "b", "label": 1}', '{"text": "\\ud800", "label": 1}', "[" * 2000, "{"]
    ),
)


def _joined(sep: str) -> st.SearchStrategy[str]:
    """Fields joined by `sep`; mostly the two columns the readers want, sometimes fewer or more."""
    width = st.sampled_from([2, 2, 2, 0, 1, 3, 4])
    return width.flatmap(lambda k: st.lists(FIELDS, min_size=k, max_size=k)).map(sep.join)


STYLES = {"tab": _joined("\t"), "comma": _joined(","), "json": JSON_LINES, "text": st.text(max_size=12)}
HEADERS = {"tab": ["text\tlabel", "label\ttext\tid"], "comma": ["text,label", "label,text,id"]}


@st.composite
def _contents(draw, style: str) -> bytes:
    """Random bytes, or lines (mostly in the reader's style: columns, JSON) in a random encoding with random
    line endings."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=64))
    any_line = st.one_of(*STYLES.values(), st.sampled_from(BLANKS))
    lines = draw(st.lists(st.one_of(STYLES[style], STYLES[style], any_line), min_size=1, max_size=6))
    if style in HEADERS and draw(st.integers(0, 3)):  # mostly a header the readers want, to reach the rows
        lines.insert(0, draw(st.sampled_from(HEADERS[style])))
    endings, final = draw(_endings(len(lines)))
    text = "".join(line + end for line, end in zip(lines, endings, strict=True))[: None if final else -1]
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-8-sig", "latin-1", "utf-16"]))
    return text.encode(encoding, errors="replace")


@st.composite
def _files(draw, folder: str, name: str, style: str) -> tuple[Path, int | None]:
    """A file holding random contents: plain, .gz, a corrupt or truncated .gz, or plain bytes named .gz.
    Returns it and its line count where the reader can know it (None for a damaged .gz)."""
    data = draw(_contents(style))
    how = draw(st.sampled_from(["plain"] * 3 + ["gz"] * 2 + ["gz-corrupt", "gz-truncated", "bytes-as-gz"]))
    path = Path(folder) / (name + ("" if how == "plain" else ".gz"))
    if how == "plain" or how == "bytes-as-gz":
        path.write_bytes(data)
        return path, len(_split(data)) if how == "plain" else None
    packed = bytearray(gzip.compress(data, mtime=0))
    if how == "gz-corrupt":
        i = draw(st.integers(0, len(packed) - 1))
        packed[i] ^= draw(st.integers(1, 255))
    elif how == "gz-truncated":
        del packed[draw(st.integers(0, len(packed) - 1)) :]
    path.write_bytes(bytes(packed))
    return path, len(_split(data)) if how == "gz" else None


WHOLE_FILE = re.compile(
    r": (the file is empty|no sentence pairs|no rows|file not found)|( \+ .*: no sentence pairs)"
)


def _check_error(exc: DataError, files: list[tuple[Path, int | None]]) -> None:
    msg = str(exc)
    assert "expected" in msg, msg
    if len(files) == 2 and re.match(rf"{re.escape(str(files[0][0]))} has \d+ lines but ", msg):
        return
    path, n_lines = next(((p, n) for p, n in files if msg.startswith(str(p))), (None, None))
    assert path is not None, f"{msg!r} does not start with a file's path"
    rest = msg[len(str(path)) :]
    m = re.match(r":(\d+): ", rest)
    if m is None:
        assert WHOLE_FILE.match(rest), msg
    else:  # the line at fault: at most one past the last line (a read failing after it)
        assert 1 <= int(m.group(1)) <= (n_lines + 1 if n_lines is not None else 10**6), msg


READERS = {  # the files' names, how the reader is called, the style of the lines it wants
    "parallel-tsv": (["p.tsv"], lambda p: read_parallel(p), "tab"),
    "parallel-two-files": (["p.de", "p.en"], lambda p: read_parallel(p), "text"),
    "text": (["t.txt"], lambda p: read_text(p[0]), "text"),
    "labelled-csv": (["l.csv"], lambda p: read_labelled(p[0]), "comma"),
    "labelled-tsv": (["l.tsv"], lambda p: read_labelled(p[0]), "tab"),
    "labelled-jsonl": (["l.jsonl"], lambda p: read_labelled(p[0]), "json"),
}


@pytest.mark.fuzz
@pytest.mark.parametrize("reader", list(READERS))
@given(data=st.data(), chunk=CHUNKS)
def test_any_file_gives_a_result_or_a_data_error_naming_it(reader, data, chunk):
    names, read, style = READERS[reader]
    with tempfile.TemporaryDirectory() as folder, _chunk(chunk):
        files = [data.draw(_files(folder, name, style)) for name in names]
        try:
            read([p for p, _ in files])
        except DataError as exc:
            _check_error(exc, files)


@pytest.mark.fuzz
@given(
    pieces=st.lists(
        st.sampled_from([b"\r", b"\n", b"\r\n", b"a", b"\xc3\xa9", b"\t", *(c.encode() for c in SPECIALS)])
    ),
    chunk=CHUNKS,
    gz=st.booleans(),
)
def test_line_splitting_matches_universal_newlines_at_any_read_size(pieces, chunk, gz):
    raw = b"".join(pieces)
    with tempfile.TemporaryDirectory() as folder, _chunk(chunk):
        path = _write(folder, "x.txt", raw, gz)
        if not raw:
            with pytest.raises(DataError, match="the file is empty"):
                list(read_lines(path))
            return
        got = list(read_lines(path))
    want = [line.decode() for line in _split(raw)]
    assert got == list(enumerate(want, 1))


# ---- round trips: well-formed files give back exactly what was written ----


def _encode(text: str, bom: bool) -> bytes:
    return text.encode("utf-8-sig" if bom else "utf-8")


def _blank_stats(stats, blank_lines: list[int], reason: str = "blank") -> None:
    assert stats.skipped == ({reason: len(blank_lines)} if blank_lines else {})
    assert stats.first_lines == ({reason: blank_lines[:5]} if blank_lines else {})


@pytest.mark.fuzz
@given(
    items=st.lists(
        st.one_of(st.tuples(TEXTS, TEXTS), st.sampled_from(BLANKS)), min_size=1, max_size=12
    ).filter(lambda xs: any(isinstance(x, tuple) for x in xs)),
    data=st.data(),
    bom=st.booleans(),
    gz=st.booleans(),
    chunk=CHUNKS,
)
def test_parallel_tsv_round_trip(items, data, bom, gz, chunk):
    width = data.draw(st.integers(2, 4), label="columns")
    src, tgt = data.draw(st.permutations(range(width)), label="order")[:2]
    if max(src, tgt) + 1 < width:  # exactly max(src, tgt) + 1 columns: the rest are between or before them
        width = max(src, tgt) + 1
    lines = []
    for item in items:
        if isinstance(item, str):
            lines.append(item)
            continue
        cols = [data.draw(st.sampled_from(["", "filler"])) for _ in range(width)]
        cols[src], cols[tgt] = item
        lines.append("\t".join(cols))
    endings, final = data.draw(_endings(len(lines)))
    with tempfile.TemporaryDirectory() as folder, _chunk(chunk):
        path = _write(folder, "p.tsv", _encode(_assemble(lines, endings, final), bom), gz)
        pairs, stats = read_parallel([path], src_column=src, tgt_column=tgt)
    assert pairs == [x for x in items if isinstance(x, tuple)]
    _blank_stats(stats, [n for n, x in enumerate(items, 1) if isinstance(x, str)])


@pytest.mark.fuzz
@given(
    rows=st.lists(
        st.tuples(st.one_of(TEXTS, st.none()), st.one_of(TEXTS, st.none())), min_size=1, max_size=12
    ).filter(lambda rs: any(s is not None and t is not None for s, t in rs)),
    data=st.data(),
    gz=st.booleans(),
    chunk=CHUNKS,
)
def test_parallel_two_files_round_trip(rows, data, gz, chunk):
    sides = []
    for k in range(2):
        lines = [data.draw(st.sampled_from(BLANKS)) if r[k] is None else r[k] for r in rows]
        endings, final = data.draw(_endings(len(lines)))
        sides.append(_encode(_assemble(lines, endings, final), data.draw(st.booleans())))
    with tempfile.TemporaryDirectory() as folder, _chunk(chunk):
        paths = [_write(folder, "p.de", sides[0], gz), _write(folder, "p.en", sides[1], gz)]
        pairs, stats = read_parallel(paths)
    assert pairs == [(s, t) for s, t in rows if s is not None and t is not None]
    blank = [n for n, (s, t) in enumerate(rows, 1) if s is None and t is None]
    half = [n for n, (s, t) in enumerate(rows, 1) if (s is None) != (t is None)]
    assert stats.skipped == {k: len(v) for k, v in (("blank", blank), ("empty source or target", half)) if v}
    assert stats.first_lines == {
        k: v[:5] for k, v in (("blank", blank), ("empty source or target", half)) if v
    }


@pytest.mark.fuzz
@given(
    lines=st.lists(st.text(st.one_of(CHARS, st.just("\t")), max_size=10), min_size=1, max_size=12),
    data=st.data(),
    bom=st.booleans(),
    gz=st.booleans(),
    chunk=CHUNKS,
)
def test_text_round_trip(lines, data, bom, gz, chunk):
    endings, final = data.draw(_endings(len(lines)))
    with tempfile.TemporaryDirectory() as folder, _chunk(chunk):
        path = _write(folder, "t.txt", _encode(_assemble(lines, endings, final), bom), gz)
        assert read_text(path) == "".join(line + "\n" for line in lines)


def _csv_line(fields: list[str]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="").writerow(fields)
    return out.getvalue()


@pytest.mark.fuzz
@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl"])
@given(
    items=st.lists(
        st.one_of(st.tuples(TEXTS, TEXTS | st.integers()), st.sampled_from(BLANKS)), min_size=1, max_size=12
    ).filter(lambda xs: any(isinstance(x, tuple) for x in xs)),
    data=st.data(),
    bom=st.booleans(),
    gz=st.booleans(),
    chunk=CHUNKS,
)
def test_labelled_round_trip(kind, items, data, bom, gz, chunk):
    columns = data.draw(
        st.permutations(["text", "label", "id"] if data.draw(st.booleans()) else ["text", "label"])
    )
    lines = [] if kind == "jsonl" else [(_csv_line if kind == "csv" else "\t".join)(columns)]
    for i, item in enumerate(items):
        if isinstance(item, str):
            lines.append(item)
            continue
        text, label = item
        if kind == "jsonl":
            row = dict(
                zip(columns, [{"text": text, "label": label, "id": i}[c] for c in columns], strict=True)
            )
            lines.append(json.dumps(row, ensure_ascii=data.draw(st.booleans())))
        else:
            row = [{"text": text, "label": str(label), "id": str(i)}[c] for c in columns]
            lines.append(_csv_line(row) if kind == "csv" else "\t".join(row))
    endings, final = data.draw(_endings(len(lines)))
    with tempfile.TemporaryDirectory() as folder, _chunk(chunk):
        path = _write(folder, f"l.{kind}", _encode(_assemble(lines, endings, final), bom), gz)
        rows, stats = read_labelled(path)
    assert rows == [(t, str(lab)) for t, lab in (x for x in items if isinstance(x, tuple))]
    offset = 0 if kind == "jsonl" else 1  # the header is line 1
    _blank_stats(stats, [n + offset for n, x in enumerate(items, 1) if isinstance(x, str)])
