"""Readers for the files people have. Every error names the file, the line and what was expected.

- parallel text: one TSV (source<TAB>target per line) or two aligned files, plain or .gz;
- plain text for language modelling (one stream, newlines kept);
- labelled text for classification: CSV / TSV with a header, or JSONL, with configurable column names.

Nothing is lost or invented silently; the rules a demanding user can rely on:

- Lines: UTF-8 (a leading BOM is dropped), split on universal newlines: ``\\n``, ``\\r\\n`` and a lone
  ``\\r`` (old Mac), in any mix, and nothing else: ``\\x0b \\x0c \\x1c-\\x1e \\x85 \\u2028 \\u2029`` stay inside
  their line (unlike `str.splitlines`). Line numbers count those breaks. A UTF-16 file, a NUL character,
  bytes that are not UTF-8, gzip data in a file not named .gz, and a corrupt or truncated .gz (whatever
  zlib or gzip raises) are each a `DataError` at the line reached.
- `read_text` returns the lines joined by ``\\n``, each line ending in one (so CR and CRLF become ``\\n``
  and a last line without a break gets one); blank lines are text and kept.
- A parallel TSV line has exactly ``max(src_column, tgt_column) + 1`` tab-separated columns: 2 with the
  defaults. One more is refused, not dropped (a tab inside a sentence would otherwise cut it short); a
  column between the two named ones is ignored by choice. Two aligned files must have equal line counts.
- CSV / TSV: every row has exactly as many fields as the header (an unquoted comma is refused, never a
  phantom column). CSV follows the csv module's quoting, strictly (text after a closing quote is refused);
  TSV has no quoting (quotes are text); one record per line, so a quoted newline is refused.
- JSONL: one object per line; the text must be a JSON string; the label a string or an integer (``1`` and
  ``"1"`` are one class); null, booleans, floats, lists and objects are refused, as is a text or label key
  given twice in one object.

Blank lines and empty fields are skipped, never an error: `ReadStats` counts them per reason and remembers
the first few line numbers, and `report_skipped` prints both (stderr).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import sys
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tformer.jsontypes import JSON

_NAMED_LINES = 5  # line numbers remembered (and printed) per skip reason
_CHUNK = 1 << 16  # bytes per read


class DataError(ValueError):
    """Malformed input data; the message names the file and line."""


@dataclass
class ReadStats:
    path: str
    read: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    first_lines: dict[str, list[int]] = field(default_factory=dict)  # the first few skipped, per reason

    def skip(self, reason: str, line: int) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        named = self.first_lines.setdefault(reason, [])
        if len(named) < _NAMED_LINES:
            named.append(line)


def report_skipped(stats: ReadStats) -> None:
    """One stderr line per reason, e.g. ``x.tsv: skipped 3 line(s): blank (lines 4, 9, 12)``."""
    for reason, n in stats.skipped.items():
        named = stats.first_lines.get(reason, [])
        where = ""
        if named:
            more = ", ..." if n > len(named) else ""
            where = f" (line{'s' if n > 1 else ''} {', '.join(map(str, named))}{more})"
        print(f"{stats.path}: skipped {n} line(s): {reason}{where}", file=sys.stderr)


def _open_bytes(path: Path) -> io.BufferedIOBase:
    if not path.exists():
        raise DataError(f"{path}: file not found; expected an existing file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory; expected a file")
    try:
        if path.suffix == ".gz":
            return gzip.open(path, "rb")
        return path.open("rb")
    except OSError as exc:
        raise DataError(f"{path}: cannot open ({exc.strerror or exc}); expected a readable file") from None


def _split_lines(path: Path, fh: io.BufferedIOBase) -> Iterator[bytes]:
    """Raw lines without their break, split on \\n, \\r\\n or \\r; read in chunks (memory: a chunk and a line)."""
    unfinished: list[bytes] = []  # the pieces of the line the last chunk ended in
    held_cr = False  # a chunk ended in \r: a break, but perhaps the first half of a \r\n
    n = 0  # lines yielded
    while True:
        try:
            chunk = fh.read1(_CHUNK)  # one read at most: a corrupt .gz member fails at the line it reaches
        except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
            why = f"{'zlib.error' if isinstance(exc, zlib.error) else type(exc).__name__}: {exc}"
            if path.suffix == ".gz":
                raise DataError(
                    f"{path}:{n + 1}: cannot read: corrupt or truncated gzip data ({why}); expected a complete "
                    "gzip file"
                ) from None
            raise DataError(f"{path}:{n + 1}: cannot read ({why}); expected a readable file") from None
        if not chunk:
            break
        if held_cr:
            chunk, held_cr = b"\r" + chunk, False
        if chunk.endswith(b"\r"):
            chunk, held_cr = chunk[:-1], True
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = chunk.split(b"\n")
        unfinished.append(lines[0])
        if len(lines) == 1:
            continue
        lines[0] = b"".join(unfinished)
        unfinished = [lines.pop()]
        n += len(lines)
        yield from lines
    last = b"".join(unfinished)
    if last or held_cr:  # a last line without a break, or one ended by a lone \r
        yield last


def _decode(path: Path, n: int, raw: bytes) -> str:
    if n == 1:
        if raw.startswith(b"\xef\xbb\xbf"):  # a leading BOM is not text
            raw = raw[3:]
        elif raw.startswith((b"\xff\xfe", b"\xfe\xff")):
            raise DataError(
                f"{path}:1: starts with a UTF-16 byte-order mark; expected UTF-8 text "
                "(convert it, e.g. iconv -f UTF-16 -t UTF-8)"
            )
        elif raw.startswith(b"\x1f\x8b"):
            raise DataError(
                f"{path}:1: gzip-compressed data in a file not named .gz; expected UTF-8 text (name it *.gz)"
            )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        column = len(raw[: exc.start].decode("utf-8")) + 1
        raise DataError(
            f"{path}:{n}: bytes that are not UTF-8 at column {column} "
            f"({raw[exc.start : exc.start + 4]!r}); expected UTF-8 text"
        ) from None
    if "\x00" in text:
        raise DataError(
            f"{path}:{n}: a NUL character at column {text.index(chr(0)) + 1}; expected UTF-8 text "
            "(is the file UTF-16 or binary?)"
        )
    return text


def read_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number, text without its line break) for each line, by the rules in the module docstring."""
    path = Path(path)
    n = 0
    with _open_bytes(path) as fh:
        for n, raw in enumerate(_split_lines(path, fh), 1):
            yield n, _decode(path, n, raw)
    if n == 0:
        raise DataError(f"{path}: the file is empty; expected at least one line")


def read_parallel(
    paths: Sequence[str | Path], *, src_column: int = 0, tgt_column: int = 1
) -> tuple[list[tuple[str, str]], ReadStats]:
    """A parallel corpus from one TSV (`[file.tsv]`) or two aligned files (`[source, target]`)."""
    if len(paths) == 1:
        path = Path(paths[0])
        stats = ReadStats(str(path))
        pairs = []
        need = max(src_column, tgt_column) + 1
        for n, line in read_lines(path):
            if not line.strip():
                stats.skip("blank", n)
                continue
            cols = line.split("\t")
            if len(cols) != need:
                hint = "; a tab inside a sentence splits it" if len(cols) > need else ""
                raise DataError(
                    f"{path}:{n}: {len(cols)} tab-separated column(s); expected exactly {need} "
                    f"(source in column {src_column + 1}, target in column {tgt_column + 1}){hint}"
                )
            src, tgt = cols[src_column].strip(), cols[tgt_column].strip()
            if not src or not tgt:
                stats.skip("empty source or target", n)
                continue
            pairs.append((src, tgt))
        stats.read = len(pairs)
        _need_some(pairs, str(path))
        return pairs, stats
    if len(paths) != 2:
        raise DataError(f"a parallel corpus is one TSV file or two aligned files, got {len(paths)} paths")
    src_path, tgt_path = Path(paths[0]), Path(paths[1])
    src_lines = [t for _, t in read_lines(src_path)]
    tgt_lines = [t for _, t in read_lines(tgt_path)]
    if len(src_lines) != len(tgt_lines):
        shorter = src_path if len(src_lines) < len(tgt_lines) else tgt_path
        raise DataError(
            f"{src_path} has {len(src_lines)} lines but {tgt_path} has {len(tgt_lines)}; expected equal line "
            f"counts in aligned files ({shorter} ends at line {min(len(src_lines), len(tgt_lines))})"
        )
    stats = ReadStats(f"{src_path} + {tgt_path}")
    pairs = []
    for n, (s, t) in enumerate(zip(src_lines, tgt_lines, strict=True), 1):
        s, t = s.strip(), t.strip()
        if not s and not t:
            stats.skip("blank", n)
        elif not s or not t:
            stats.skip("empty source or target", n)
        else:
            pairs.append((s, t))
    stats.read = len(pairs)
    _need_some(pairs, stats.path)
    return pairs, stats


def _need_some(pairs: list[tuple[str, str]], where: str) -> None:
    if not pairs:
        raise DataError(f"{where}: no sentence pairs with both a source and a target; expected at least one")


def read_text(path: str | Path) -> str:
    """A whole text file for language modelling: every line ends in \\n (CR and CRLF become \\n)."""
    return "".join(line + "\n" for _, line in read_lines(path))


def _json_kind(value: JSON) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, list) else "an object"


class _Object(dict[str, JSON]):
    """A JSON object that remembers how often each key appeared (json keeps only the last value)."""

    counts: dict[str, int]


def _object(pairs: list[tuple[str, JSON]]) -> _Object:
    obj = _Object(pairs)
    obj.counts = {}
    for k, _ in pairs:
        obj.counts[k] = obj.counts.get(k, 0) + 1
    return obj


def _json_value(path: Path, n: int, row: _Object, key: str, *, label: bool) -> str:
    if row.counts[key] > 1:
        raise DataError(f"{path}:{n}: key {key!r} appears {row.counts[key]} times; expected it once")
    value = row[key]
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise DataError(
                f"{path}:{n}: key {key!r} holds a lone surrogate ({value[exc.start]!r}); expected valid Unicode"
            ) from None
        return value
    if label and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    expected = "a string or an integer" if label else "a string"
    raise DataError(f"{path}:{n}: key {key!r} is {_json_kind(value)}; expected {expected}")


def _jsonl_rows(
    path: Path, text_column: str, label_column: str
) -> Iterator[tuple[int, str | None, str | None]]:
    for n, line in read_lines(path):
        if not line.strip():
            yield n, None, None
            continue
        try:
            row = json.loads(line, object_pairs_hook=_object)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}:{n}: not valid JSON ({exc.msg} at column {exc.colno}); expected one JSON object per "
                "line (JSONL)"
            ) from None
        except RecursionError:
            raise DataError(f"{path}:{n}: JSON nested too deeply; expected one flat JSON object") from None
        except ValueError as exc:  # e.g. an integer of more than 4,300 digits
            raise DataError(f"{path}:{n}: unusable JSON value ({exc}); expected one JSON object") from None
        if not isinstance(row, _Object):
            raise DataError(f"{path}:{n}: {_json_kind(row)}; expected a JSON object per line (JSONL)")
        for col in (text_column, label_column):
            if col not in row:
                raise DataError(f"{path}:{n}: no key {col!r}; keys are {sorted(row)}; expected both")
        yield (
            n,
            _json_value(path, n, row, text_column, label=False),
            _json_value(path, n, row, label_column, label=True),
        )


def _fields(path: Path, n: int, line: str, delimiter: str) -> list[str]:
    if delimiter == "\t":
        return line.split("\t")  # TSV has no quoting
    try:
        return next(csv.reader([line], strict=True))
    except csv.Error as exc:
        if str(exc) == "unexpected end of data":
            raise DataError(
                f"{path}:{n}: a quoted field runs past the end of the line; expected one record per line "
                "(quoted newlines are not supported)"
            ) from None
        if "expected after" in str(exc):
            raise DataError(
                f"{path}:{n}: text after a closing quote; expected ',' after the closing quote (write a quote "
                'inside a quoted field as "")'
            ) from None
        raise DataError(f"{path}:{n}: not valid CSV ({exc}); expected comma-separated fields") from None


def _table_rows(
    path: Path, name: str, text_column: str, label_column: str
) -> Iterator[tuple[int, str | None, str | None]]:
    delimiter = "," if name.endswith(".csv") else "\t"
    lines = read_lines(path)
    header_n, header_line = next(lines)
    if not header_line.strip():
        raise DataError(f"{path}:{header_n}: blank; expected the header row (column names)")
    header = [c.strip() for c in _fields(path, header_n, header_line, delimiter)]
    for col, what in ((text_column, "text"), (label_column, "label")):
        if col not in header:
            raise DataError(
                f"{path}:{header_n}: header has no {what} column {col!r}; columns are {header}; expected one "
                f"named {col!r} (or set {what}_column)"
            )
        if header.count(col) > 1:
            raise DataError(
                f"{path}:{header_n}: the header names column {col!r} {header.count(col)} times; expected it once"
            )
    ti, li = header.index(text_column), header.index(label_column)
    for n, line in lines:
        if not line.strip():
            yield n, None, None
            continue
        cols = _fields(path, n, line, delimiter)
        if len(cols) != len(header):
            hint = ""
            if len(cols) > len(header):
                hint = (
                    " (a ',' inside a text must be quoted)" if delimiter == "," else " (a tab inside a text?)"
                )
            raise DataError(
                f"{path}:{n}: {len(cols)} column(s); expected {len(header)} as in the header {header}{hint}"
            )
        yield n, cols[ti], cols[li]


def read_labelled(
    path: str | Path,
    *,
    text_column: str = "text",
    label_column: str = "label",
    labels: Sequence[str] | None = None,
) -> tuple[list[tuple[str, str]], ReadStats]:
    """(text, label) rows from CSV / TSV (header row) or JSONL. With `labels` (the training set's), a label
    outside them is an error naming the line."""
    path = Path(path)
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    if name.endswith(".jsonl") or name.endswith(".json"):
        source = _jsonl_rows(path, text_column, label_column)
    else:
        source = _table_rows(path, name, text_column, label_column)
    stats = ReadStats(str(path))
    rows = []
    known = set(labels) if labels is not None else None
    for n, text, label in source:
        if text is None or label is None:
            stats.skip("blank", n)
            continue
        text, label = text.strip(), label.strip()
        if not text:
            stats.skip("empty text", n)
            continue
        if not label:
            stats.skip("empty label", n)
            continue
        if known is not None and label not in known:
            raise DataError(
                f"{path}:{n}: label {label!r} is not one of the training labels {sorted(known)}; expected one "
                "of them"
            )
        rows.append((text, label))
    if not rows:
        raise DataError(f"{path}: no rows with text and a label; expected at least one")
    stats.read = len(rows)
    return rows, stats
