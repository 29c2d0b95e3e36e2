"""Readers on small files written here, including every malformed case: the message names file and line."""

import gzip

import pytest

from tformer.data.readers import DataError, read_labelled, read_parallel, read_text, report_skipped


def test_parallel_tsv_and_aligned_gz_files(tmp_path):
    tsv = tmp_path / "p.tsv"
    tsv.write_text("ein Hund\ta dog\n\nzwei Katzen\ttwo cats\n")
    pairs, stats = read_parallel([tsv])
    assert pairs == [("ein Hund", "a dog"), ("zwei Katzen", "two cats")]
    assert stats.skipped == {"blank": 1}
    src, tgt = tmp_path / "a.de.gz", tmp_path / "a.en.gz"
    with gzip.open(src, "wt") as fh:
        fh.write("ein Hund\nzwei Katzen\n")
    with gzip.open(tgt, "wt") as fh:
        fh.write("a dog\ntwo cats\n")
    assert read_parallel([src, tgt])[0] == pairs


def test_unequal_line_counts(tmp_path):
    (tmp_path / "s.txt").write_text("a\nb\nc\n")
    (tmp_path / "t.txt").write_text("x\ny\n")
    with pytest.raises(DataError, match=r"s.txt has 3 lines but .*t.txt has 2.*t.txt ends at line 2"):
        read_parallel([tmp_path / "s.txt", tmp_path / "t.txt"])


def test_missing_column_in_tsv(tmp_path):
    f = tmp_path / "p.tsv"
    f.write_text("ein Hund\ta dog\nkein Tab hier\n")
    with pytest.raises(DataError, match=r"p.tsv:2: 1 tab-separated column\(s\); expected exactly 2"):
        read_parallel([f])


def test_undecodable_bytes_name_the_line(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"fine\nalso fine\nbad \xff\xfe here\n")
    with pytest.raises(DataError, match=r"bad.txt:3: bytes that are not UTF-8 at column 5"):
        read_text(f)


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty.txt: the file is empty"):
        read_text(tmp_path / "empty.txt")
    with pytest.raises(DataError, match="nope.txt: file not found"):
        read_text(tmp_path / "nope.txt")
    with pytest.raises(DataError, match="one TSV file or two aligned files, got 3"):
        read_parallel([tmp_path / "a", tmp_path / "b", tmp_path / "c"])


def test_labelled_csv_tsv_jsonl(tmp_path):
    (tmp_path / "d.csv").write_text('text,label\n"good, really",pos\nbad,neg\n\n,neg\n')
    rows, stats = read_labelled(tmp_path / "d.csv")
    assert rows == [("good, really", "pos"), ("bad", "neg")]
    assert stats.skipped == {"blank": 1, "empty text": 1}
    (tmp_path / "d.tsv").write_text("sentence\tlabel\nnice film\t1\n")
    assert read_labelled(tmp_path / "d.tsv", text_column="sentence")[0] == [("nice film", "1")]
    (tmp_path / "d.jsonl").write_text('{"review": "ok", "stars": 3}\n{"review": "meh", "stars": 2}\n')
    rows, _ = read_labelled(tmp_path / "d.jsonl", text_column="review", label_column="stars")
    assert rows == [("ok", "3"), ("meh", "2")]


def test_labelled_missing_column_and_unknown_label(tmp_path):
    (tmp_path / "d.csv").write_text("sentence,label\nhello,pos\n")
    with pytest.raises(
        DataError, match=r"d.csv:1: header has no text column 'text'; columns are \['sentence', 'label'\]"
    ):
        read_labelled(tmp_path / "d.csv")
    (tmp_path / "e.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b"}\n')
    with pytest.raises(DataError, match=r"e.jsonl:2: no key 'label'"):
        read_labelled(tmp_path / "e.jsonl")
    (tmp_path / "v.csv").write_text("text,label\nfine,pos\nodd,maybe\n")
    with pytest.raises(
        DataError, match=r"v.csv:3: label 'maybe' is not one of the training labels \['neg', 'pos'\]"
    ):
        read_labelled(tmp_path / "v.csv", labels=["pos", "neg"])
    (tmp_path / "short.csv").write_text("text,label\nonly text\n")
    with pytest.raises(DataError, match=r"short.csv:2: 1 column\(s\); expected 2"):
        read_labelled(tmp_path / "short.csv")


def test_empty_labels_bom_quotes_and_all_blank(tmp_path):
    (tmp_path / "d.csv").write_bytes("\ufefftext,label\ngood,pos\nbad,\n".encode())  # BOM, an empty label
    rows, stats = read_labelled(tmp_path / "d.csv")
    assert rows == [("good", "pos")] and stats.skipped == {"empty label": 1}
    (tmp_path / "q.csv").write_text('text,label\n"starts a quote\n')
    with pytest.raises(DataError, match=r"q.csv:2: a quoted field runs past the end of the line"):
        read_labelled(tmp_path / "q.csv")
    (tmp_path / "blank.tsv").write_text("\n\n\t\n")
    with pytest.raises(DataError, match="blank.tsv: no sentence pairs"):
        read_parallel([tmp_path / "blank.tsv"])
    corrupt = tmp_path / "c.txt.gz"
    corrupt.write_bytes(gzip.compress(b"line one\nline two\n")[:-12])
    with pytest.raises(DataError, match="c.txt.gz:.*cannot read"):
        read_text(corrupt)


# ---- issue 13: nothing lost silently ----


def test_parallel_tsv_refuses_columns_past_the_last_one_named(tmp_path):
    f = tmp_path / "p.tsv"
    f.write_text("ein Hund\ta dog\nzwei\tKatzen\ttwo cats\n")  # a tab inside the source: 3 columns
    with pytest.raises(
        DataError,
        match=r"p.tsv:2: 3 tab-separated column\(s\); expected exactly 2 \(source in column 1, target in column 2\)",
    ):
        read_parallel([f])
    # the general rule: exactly max(src_column, tgt_column) + 1 columns; a column between them is ignored by choice
    g = tmp_path / "q.tsv"
    g.write_text("1\tein Hund\ta dog\n2\tzwei Katzen\ttwo cats\n")
    assert read_parallel([g], src_column=1, tgt_column=2)[0] == [
        ("ein Hund", "a dog"),
        ("zwei Katzen", "two cats"),
    ]
    assert read_parallel([g], src_column=2, tgt_column=0)[0] == [("a dog", "1"), ("two cats", "2")]
    g.write_text("1\tein Hund\ta dog\n2\tzwei Katzen\ttwo cats\t0.9\n")
    with pytest.raises(DataError, match=r"q.tsv:2: 4 tab-separated column\(s\); expected exactly 3"):
        read_parallel([g], src_column=1, tgt_column=2)


def test_universal_newlines_and_line_numbers(tmp_path):
    # old-Mac CR-only endings are line breaks; \x0b \x0c \x1c-\x1e \x85 \u2028 \u2029 are not (unlike str.splitlines)
    f = tmp_path / "mac.tsv"
    f.write_bytes("ein\x0bHund\ta\x85dog\r\rzwei\u2028Katzen\ttwo\x1ccats\r".encode())
    pairs, stats = read_parallel([f])
    assert pairs == [("ein\x0bHund", "a\x85dog"), ("zwei\u2028Katzen", "two\x1ccats")]
    assert stats.skipped == {"blank": 1} and stats.first_lines == {"blank": [2]}
    f.write_bytes(b"a\tb\r\nc\td\re\tf\ng h\r\n")  # mixed endings: the bad line is line 4
    with pytest.raises(DataError, match=r"mac.tsv:4: 1 tab-separated column"):
        read_parallel([f])
    # read_text: CR and CRLF become \n, every line ends in \n; form feeds and U+2028 stay inside their line
    t = tmp_path / "lm.txt"
    t.write_bytes("one\r\ntwo\rthree\x0cmore\nfour\u2029five".encode())
    assert read_text(t) == "one\ntwo\nthree\x0cmore\nfour\u2029five\n"
    # two aligned files, one CR-only and one CRLF
    (tmp_path / "s.txt").write_bytes(b"ein Hund\rzwei Katzen\r")
    (tmp_path / "t.txt").write_bytes(b"a dog\r\ntwo cats\r\n")
    assert read_parallel([tmp_path / "s.txt", tmp_path / "t.txt"])[0] == [
        ("ein Hund", "a dog"),
        ("zwei Katzen", "two cats"),
    ]
    # labelled CSV with CR endings
    (tmp_path / "d.csv").write_bytes(b'text,label\r"good, really",pos\rbad,neg\r')
    assert read_labelled(tmp_path / "d.csv")[0] == [("good, really", "pos"), ("bad", "neg")]


def test_labelled_rows_with_more_fields_than_the_header_are_refused(tmp_path):
    (tmp_path / "d.csv").write_text("text,label\ngood film,pos\ngood, really,pos\n")  # an unquoted comma
    with pytest.raises(
        DataError, match=r"d.csv:3: 3 column\(s\); expected 2 as in the header \['text', 'label'\]"
    ):
        read_labelled(tmp_path / "d.csv")
    (tmp_path / "d.tsv").write_text("text\tlabel\nnice\tpos\nnice\tfilm\tpos\n")
    with pytest.raises(
        DataError, match=r"d.tsv:3: 3 column\(s\); expected 2 as in the header \['text', 'label'\]"
    ):
        read_labelled(tmp_path / "d.tsv")
    (tmp_path / "f.csv").write_text('text,label\n"say ""hi""" twice,pos\n')  # text after a closing quote
    with pytest.raises(DataError, match=r"f.csv:2: .*expected ',' after the closing quote"):
        read_labelled(tmp_path / "f.csv")
    (tmp_path / "g.csv").write_text(
        'text,label\na 5" screen,pos\n"a ""quoted"" word",neg\n'
    )  # literal quotes are text
    assert read_labelled(tmp_path / "g.csv")[0] == [('a 5" screen', "pos"), ('a "quoted" word', "neg")]


def test_jsonl_values_must_be_strings_or_integer_labels(tmp_path):
    f = tmp_path / "e.jsonl"
    f.write_text('{"text": "fine", "label": 1}\n{"text": "fine", "label": "pos"}\n')
    assert read_labelled(f)[0] == [("fine", "1"), ("fine", "pos")]
    for line, message in [
        ('{"text": "x", "label": null}', r"e.jsonl:2: key 'label' is null; expected a string or an integer"),
        ('{"text": null, "label": "pos"}', r"e.jsonl:2: key 'text' is null; expected a string"),
        ('{"text": 42, "label": "pos"}', r"e.jsonl:2: key 'text' is a number \(42\); expected a string"),
        ('{"text": "x", "label": true}', r"e.jsonl:2: key 'label' is true; expected a string or an integer"),
        (
            '{"text": "x", "label": 1.5}',
            r"e.jsonl:2: key 'label' is a number \(1.5\); expected a string or an integer",
        ),
        (
            '{"text": "x", "label": ["a"]}',
            r"e.jsonl:2: key 'label' is a list; expected a string or an integer",
        ),
        ('{"text": {"a": 1}, "label": "pos"}', r"e.jsonl:2: key 'text' is an object; expected a string"),
        (
            '{"text": "x", "label": "a", "label": "b"}',
            r"e.jsonl:2: key 'label' appears 2 times; expected it once",
        ),
        ('{"text": "\\ud800", "label": "pos"}', r"e.jsonl:2: key 'text' holds a lone surrogate"),
        ("[" * 100_000, r"e.jsonl:2: .*nested too deeply"),
    ]:
        f.write_text('{"text": "fine", "label": "pos"}\n' + line + "\n")
        with pytest.raises(DataError, match=message):
            read_labelled(f)


def test_corrupt_gz_is_a_data_error_naming_file_and_line(tmp_path):
    good = gzip.compress(b"line one\nline two\nline three\n")
    corrupt = bytearray(gzip.compress(b"line four\nline five\n" * 20))
    corrupt[10] ^= 0xFF  # the first byte of the deflate stream
    f = tmp_path / "c.txt.gz"
    f.write_bytes(good + bytes(corrupt))  # a valid member, then a corrupt one
    with pytest.raises(
        DataError,
        match=r"c.txt.gz:4: cannot read: corrupt or truncated gzip data \(.*\); expected a complete",
    ):
        read_text(f)
    f.write_bytes(bytes(corrupt))
    with pytest.raises(DataError, match=r"c.txt.gz:1: cannot read: corrupt or truncated gzip data"):
        read_parallel([f])
    f.write_bytes(b"not gzip at all\n")
    with pytest.raises(
        DataError, match=r"c.txt.gz:1: cannot read: corrupt or truncated gzip data \(BadGzipFile"
    ):
        read_text(f)
    rows = b'{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n'
    (tmp_path / "d.jsonl.gz").write_bytes(
        gzip.compress(rows)[:-5]
    )  # the trailer cut: both rows read, then EOF
    with pytest.raises(
        DataError, match=r"d.jsonl.gz:3: cannot read: corrupt or truncated gzip data \(EOFError"
    ):
        read_labelled(tmp_path / "d.jsonl.gz")
    (tmp_path / "plain.txt").write_bytes(good)  # gzip bytes without the .gz name
    with pytest.raises(DataError, match=r"plain.txt:1: gzip-compressed data in a file not named \.gz"):
        read_text(tmp_path / "plain.txt")


def test_skipped_lines_are_counted_and_named(tmp_path, capsys):
    f = tmp_path / "x.tsv"
    f.write_text("a\tb\nc\td\ne\tf\n\ng\th\n\t\ni\tj\nk\tl\n  \nm\tn\nfoo\t\n\n")
    pairs, stats = read_parallel([f])
    assert len(pairs) == 7
    assert stats.skipped == {"blank": 4, "empty source or target": 1}
    assert stats.first_lines == {"blank": [4, 6, 9, 12], "empty source or target": [11]}
    report_skipped(stats)
    err = capsys.readouterr().err
    assert f"{f}: skipped 4 line(s): blank (lines 4, 6, 9, 12)\n" in err
    assert f"{f}: skipped 1 line(s): empty source or target (line 11)\n" in err
    f.write_text("a\tb\n" + "\n" * 8)
    stats = read_parallel([f])[1]
    assert stats.first_lines == {"blank": [2, 3, 4, 5, 6]}  # the first five
    report_skipped(stats)
    assert f"{f}: skipped 8 line(s): blank (lines 2, 3, 4, 5, 6, ...)\n" in capsys.readouterr().err
    (tmp_path / "d.csv").write_text("text,label\n\ngood,pos\n,neg\nbad,\n")
    stats = read_labelled(tmp_path / "d.csv")[1]
    assert stats.first_lines == {"blank": [2], "empty text": [4], "empty label": [5]}
    (tmp_path / "s.txt").write_text("a\n\nb\nc\n")
    (tmp_path / "t.txt").write_text("x\n\n\nz\n")
    pairs, stats = read_parallel([tmp_path / "s.txt", tmp_path / "t.txt"])
    assert pairs == [("a", "x"), ("c", "z")]
    assert stats.first_lines == {"blank": [2], "empty source or target": [3]}


def test_file_level_errors_name_the_file_and_say_what_was_expected(tmp_path):
    with pytest.raises(DataError, match=rf"^{tmp_path}: is a directory; expected a file"):
        read_text(tmp_path)
    (tmp_path / "s.txt").write_text("a\nb\n")
    with pytest.raises(DataError, match=r"t.txt: file not found; expected an existing file"):
        read_parallel([tmp_path / "s.txt", tmp_path / "t.txt"])
    (tmp_path / "t.txt").write_bytes(b"x\ny \xc3\n")  # the target file's second line is cut mid-character
    with pytest.raises(DataError, match=r"t.txt:2: bytes that are not UTF-8 at column 3"):
        read_parallel([tmp_path / "s.txt", tmp_path / "t.txt"])
    (tmp_path / "u16.txt").write_bytes("hello\nworld\n".encode("utf-16"))
    with pytest.raises(DataError, match=r"u16.txt:1: starts with a UTF-16 byte-order mark; expected UTF-8"):
        read_text(tmp_path / "u16.txt")
    (tmp_path / "u16le.txt").write_bytes("hello\nworld\n".encode("utf-16-le"))  # no BOM: NULs between letters
    with pytest.raises(DataError, match=r"u16le.txt:1: a NUL character at column 2; expected UTF-8 text"):
        read_text(tmp_path / "u16le.txt")
    (tmp_path / "e.csv").write_text("\ntext,label\n")
    with pytest.raises(DataError, match=r"e.csv:1: blank; expected the header row"):
        read_labelled(tmp_path / "e.csv")
    (tmp_path / "h.csv").write_text("text,label\n")
    with pytest.raises(DataError, match=r"h.csv: no rows with text and a label; expected at least one"):
        read_labelled(tmp_path / "h.csv")
    (tmp_path / "dup.csv").write_text("text,label,label\na,b,c\n")
    with pytest.raises(DataError, match=r"dup.csv:1: the header names column 'label' 2 times"):
        read_labelled(tmp_path / "dup.csv")


def test_a_jsonl_integer_too_long_to_read_names_file_and_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "fine", "label": 1}\n{"text": "a", "label": ' + "9" * 5000 + "}\n")
    with pytest.raises(DataError, match=r"x.jsonl:2: unusable JSON value .*4300 digits"):
        read_labelled(path)
