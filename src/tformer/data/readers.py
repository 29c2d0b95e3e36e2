"""Readers for the files people have. Every error names the file, the line and what was expected.

- parallel text: one TSV (source<TAB>target per line) or two aligned files, plain or .gz;
- plain text for language modelling (one stream, newlines kept);
- labelled text for classification: CSV / TSV with a header, or JSONL, with configurable column names.

Nothing is dropped silently: blank lines and empty fields are skipped and counted, and the count is
printed (stderr) by `report_skipped`.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path


class DataError(ValueError):
    """Malformed input data; the message names the file and line."""


@dataclass
class ReadStats:
    path: str
    read: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def report_skipped(stats: ReadStats) -> None:
    for reason, n in stats.skipped.items():
        print(f"{stats.path}: skipped {n} line(s): {reason}", file=sys.stderr)


def _open_bytes(path: Path) -> io.BufferedIOBase:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a file")
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    return path.open("rb")


def read_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number, text without the newline) for each line; a clear error on bytes that are not UTF-8."""
    path = Path(path)
    with _open_bytes(path) as fh:
        n = 0
        try:
            for n, raw in enumerate(fh, 1):
                try:
                    text = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a leading BOM is not text
                except UnicodeDecodeError as exc:
                    raise DataError(
                        f"{path}:{n}: bytes that are not UTF-8 at column {exc.start + 1} "
                        f"({raw[exc.start : exc.start + 4]!r}); expected UTF-8 text"
                    ) from None
                yield n, text.rstrip("\r\n")
        except (OSError, EOFError) as exc:  # truncated or corrupt .gz
            raise DataError(f"{path}:{n + 1}: cannot read ({exc})") from None
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
                stats.skip("blank")
                continue
            cols = line.split("\t")
            if len(cols) < need:
                raise DataError(
                    f"{path}:{n}: {len(cols)} tab-separated column(s); expected at least {need} "
                    f"(source in column {src_column + 1}, target in column {tgt_column + 1})"
                )
            src, tgt = cols[src_column].strip(), cols[tgt_column].strip()
            if not src or not tgt:
                stats.skip("empty source or target")
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
            f"{src_path} has {len(src_lines)} lines but {tgt_path} has {len(tgt_lines)}; aligned files must "
            f"have equal line counts ({shorter} ends at line {min(len(src_lines), len(tgt_lines))})"
        )
    stats = ReadStats(f"{src_path} + {tgt_path}")
    pairs = []
    for s, t in zip(src_lines, tgt_lines, strict=True):
        if not s.strip() or not t.strip():
            stats.skip("empty source or target")
            continue
        pairs.append((s.strip(), t.strip()))
    stats.read = len(pairs)
    _need_some(pairs, stats.path)
    return pairs, stats


def _need_some(pairs: list[tuple[str, str]], where: str) -> None:
    if not pairs:
        raise DataError(f"{where}: no sentence pairs with both a source and a target")


def read_text(path: str | Path) -> str:
    """A whole text file for language modelling, newlines kept."""
    return "".join(line + "\n" for _, line in read_lines(path))


def _labelled_rows(
    path: Path, text_column: str, label_column: str
) -> Iterator[tuple[int, str | None, str | None]]:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    if name.endswith(".jsonl") or name.endswith(".json"):
        for n, line in read_lines(path):
            if not line.strip():
                yield n, None, None
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}:{n}: not valid JSON ({exc.msg}); expected one JSON object per line"
                ) from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: a JSON {type(row).__name__}; expected an object")
            for col in (text_column, label_column):
                if col not in row:
                    raise DataError(f"{path}:{n}: no key {col!r}; keys are {sorted(row)}")
            yield n, str(row[text_column]), str(row[label_column])
        return
    delimiter = "," if name.endswith(".csv") else "\t"
    lines = read_lines(path)
    header_n, header_line = next(lines)
    header = next(csv.reader([header_line], delimiter=delimiter))
    for col, what in ((text_column, "text"), (label_column, "label")):
        if col not in header:
            raise DataError(
                f"{path}:{header_n}: header has no {what} column {col!r}; columns are {header} "
                f"(set {what}_column)"
            )
    ti, li = header.index(text_column), header.index(label_column)
    # csv.reader over the remaining lines keeps our own line numbers (quoted newlines are not supported).
    for n, line in lines:
        if not line.strip():
            yield n, None, None
            continue
        if delimiter == "," and line.count('"') % 2:
            raise DataError(
                f"{path}:{n}: a quoted field runs past the end of the line; quoted newlines are not supported "
                "(one record per line)"
            )
        cols = next(
            csv.reader(
                [line], delimiter=delimiter, quoting=csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE
            )
        )
        if len(cols) <= max(ti, li):
            raise DataError(
                f"{path}:{n}: {len(cols)} column(s); expected {len(header)} as in the header {header}"
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
    stats = ReadStats(str(path))
    rows = []
    known = set(labels) if labels is not None else None
    for n, text, label in _labelled_rows(path, text_column, label_column):
        if text is None or label is None:
            stats.skip("blank")
            continue
        text, label = text.strip(), label.strip()
        if not text:
            stats.skip("empty text")
            continue
        if not label:
            stats.skip("empty label")
            continue
        if known is not None and label not in known:
            raise DataError(f"{path}:{n}: label {label!r} is not one of the training labels {sorted(known)}")
        rows.append((text, label))
    if not rows:
        raise DataError(f"{path}: no rows with text and a label")
    stats.read = len(rows)
    return rows, stats
