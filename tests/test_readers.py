"""Readers on small files written here, including every malformed case: the message names file and line."""

import gzip

import pytest

from tformer.data.readers import DataError, read_labelled, read_parallel, read_text


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
    with pytest.raises(DataError, match=r"p.tsv:2: 1 tab-separated column\(s\); expected at least 2"):
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
