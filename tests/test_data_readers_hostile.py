"""Hostile CSV and Parquet files: each is read correctly or refused with one line that names the file
and the line or row, and never quotes the file's content."""

from __future__ import annotations

import re

import pytest

from smolora.config import DataConfig
from smolora.data import prepare_data
from smolora.data.sources import load_records
from smolora.errors import SmoLoRAError
from test_cli import smolora
from test_hostile import one_error_line

SECRET = "root:SECRETHASH:19000:0:99999:7:::"


def write(path, text):
    path.write_text(text, encoding="utf-8", newline="")
    return path


def refused(source, pattern: str, **kw) -> str:
    """The reader's one-line error for ``source``; ``pattern`` is matched after the file's name."""
    with pytest.raises(SmoLoRAError, match=re.escape(str(source)) + pattern) as info:
        load_records(source, **kw)
    msg = str(info.value)
    assert "\n" not in msg and "SECRETHASH" not in msg
    return msg


def prepare(records, tokenizer):
    return prepare_data(records, tokenizer, DataConfig())


# CSV quoting


def test_an_unclosed_quote_in_the_last_column_is_refused_where_it_opens(tmp_path):
    rows = [f"q{i},a{i}" for i in range(40)]
    rows[3] = 'q3,"a3 never closed'
    f = write(tmp_path / "d.csv", "prompt,completion\n" + "\n".join(rows) + "\n")
    refused(f, r":5: malformed CSV: the quote opened here is never closed$")


def test_an_unclosed_quote_in_another_column_or_on_the_last_line_is_refused_where_it_opens(tmp_path):
    f = write(tmp_path / "d.csv", 'prompt,completion\nq0,a0\n"q1,a1\nq2,a2\nq3,a3\n')
    refused(f, r":3: malformed CSV: the quote opened here is never closed$")
    f = write(tmp_path / "e.csv", 'text\nok\n"last')  # no newline at the end either
    refused(f, r":3: malformed CSV: the quote opened here is never closed$")


def test_a_stray_quote_that_closes_lines_later_is_refused_where_it_opens(tmp_path):
    f = write(tmp_path / "d.csv", 'prompt,completion\nq0,"a0\nq1,a1\nq2,"a2"\nq3,a3\n')
    refused(f, r':2: malformed CSV: the quote opened here closes on line 4 with text right after it; .* as ""\)$')
    f = write(tmp_path / "e.csv", 'text\n"say "hi" twice"\n')
    refused(f, r":2: malformed CSV: the quote opened here closes with text right after it; ")


def test_multi_line_cells_load_and_records_are_named_by_their_first_line(tmp_path):
    text = 'prompt,completion\n"two\nlines","say ""hi"""\n\nplain,"three\n\nlines"\nq,a\n'
    recs = load_records(write(tmp_path / "d.csv", text))
    assert [(r["prompt"], r["completion"]) for r in recs] == [
        ("two\nlines", 'say "hi"'),
        ("plain", "three\n\nlines"),
        ("q", "a"),
    ]
    assert [r["_where"].rsplit(":", 1)[1] for r in recs] == ["2", "5", "8"]
    f = write(tmp_path / "e.csv", text + 'x,"multi\nline"\ntoo,many,fields\n')
    refused(f, r":11: more fields than the header's 2$")


# CSV: other malformed or unusual files


def test_a_row_with_fewer_fields_is_refused_at_its_line(tmp_path):
    refused(write(tmp_path / "d.csv", "prompt,completion\nq,a\n\nq2\n"), r":4: fewer fields than the header's 2$")


def test_a_header_only_or_blank_csv_has_no_records(tmp_path):
    refused(write(tmp_path / "d.csv", "text\n"), r": no records found")
    refused(write(tmp_path / "e.csv", "\n  \n"), r": no records found")
    refused(write(tmp_path / "f.csv", ",,\nx,y,z\n"), r":1: CSV has no header row$")


def test_a_header_naming_a_column_twice_is_refused(tmp_path):
    refused(write(tmp_path / "d.csv", "text,text\na,b\n"), r":1: the header names a column twice$")


def test_nul_bytes_are_refused_at_their_line(tmp_path):
    f = tmp_path / "d.csv"
    f.write_bytes(b"text\nok\nbad\x00cell\n")
    refused(f, r":3: NUL byte; the file is binary or UTF-16, not UTF-8 text$")
    f.write_bytes("text\nok\n".encode("utf-16-le"))  # UTF-16 without its byte order mark
    refused(f, r":1: NUL byte")


def test_a_bom_carriage_returns_and_quotes_inside_plain_cells_load(tmp_path):
    f = tmp_path / "d.csv"
    f.write_bytes(b'\xef\xbb\xbftext,n\rsay ab"c,1\r"two\r\nlines",2\r\rlast,3')
    recs = load_records(f)
    assert [(r["text"], r["n"]) for r in recs] == [('say ab"c', "1"), ("two\nlines", "2"), ("last", "3")]
    assert [r["_where"] for r in recs] == [f"{f}:2", f"{f}:3", f"{f}:6"]


def test_a_secret_file_read_as_csv_is_never_quoted(tmp_path):
    f = write(tmp_path / "shadow.csv", SECRET + '\ndaemon:*:19000\n"open')
    refused(f, r":3: malformed CSV: the quote opened here is never closed$")
    f = write(tmp_path / "shadow2.csv", SECRET + "\ndaemon,x:19000\n")
    refused(f, r":2: more fields than the header's 1$")


# Parquet


def parquet(path, columns: dict):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), str(path))
    return path


def test_parquet_rows_are_named_and_values_of_the_wrong_type_are_refused_at_their_row(tmp_path, tokenizer):
    f = parquet(tmp_path / "d.parquet", {"text": ["a b", "c d"]})
    assert [r["_where"] for r in load_records(f)] == [f"{f}#row0", f"{f}#row1"]
    f = parquet(tmp_path / "ints.parquet", {"text": [1, 2, 3]})
    with pytest.raises(SmoLoRAError, match=re.escape(f"{f}#row0: field 'text' must be a string, got int")):
        prepare(load_records(f), tokenizer)
    f = parquet(tmp_path / "msg_ints.parquet", {"messages": [[1, 2], [3]]})
    with pytest.raises(SmoLoRAError, match=re.escape(f"{f}#row0: message 0 must be an object with 'role'")):
        prepare(load_records(f), tokenizer)
    f = parquet(tmp_path / "msg_str.parquet", {"messages": ["hi", "yo"]})
    with pytest.raises(SmoLoRAError, match=re.escape(f"{f}#row0: messages must be a non-empty list")):
        prepare(load_records(f), tokenizer)
    f = parquet(tmp_path / "struct.parquet", {"text": [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]})
    with pytest.raises(SmoLoRAError, match=re.escape(f"{f}#row0: field 'text' must be a string, got dict")):
        prepare(load_records(f), tokenizer)


def test_parquet_that_is_empty_or_not_parquet_is_refused(tmp_path):
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    refused(empty, r": cannot read Parquet \(Parquet file size is 0 bytes\)$")
    fake = write(tmp_path / "fake.parquet", SECRET + "\n" * 20)
    msg = refused(fake, r": cannot read Parquet \(Parquet magic bytes not found")
    assert msg.count(str(fake)) == 1
    refused(parquet(tmp_path / "none.parquet", {"text": []}), r": no records found")


def test_saved_dataset_rows_are_named(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"text": "a"}, {"text": "b"}]).save_to_disk(str(tmp_path / "saved"))
    assert [r["_where"] for r in load_records(tmp_path / "saved")] == [f"{tmp_path / 'saved'}#row{i}" for i in (0, 1)]


# Through the CLI


def test_cli_refuses_an_unclosed_csv_quote_with_one_line_and_no_content(tmp_path, tiny_model_dir):
    f = write(tmp_path / "shadow.csv", SECRET + '\nx\n"never closed\ny\n')
    out = tmp_path / "run"
    r = smolora("train", "--data", f, "--output", out, "--model", tiny_model_dir, "--max-steps", 1)
    line = one_error_line(r)
    assert f"{f}:3: malformed CSV: the quote opened here is never closed" in line
    assert "SECRETHASH" not in r.stderr + r.stdout and "never closed\ny" not in r.stderr


def test_cli_names_the_parquet_row_of_a_value_of_the_wrong_type(tmp_path, tiny_model_dir):
    f = parquet(tmp_path / "d.parquet", {"text": [SECRET, "b", None]})
    out = tmp_path / "run"
    r = smolora("train", "--data", f, "--output", out, "--model", tiny_model_dir, "--max-steps", 1)
    assert f"{f}#row2: field 'text' must be a string, got NoneType" in one_error_line(r)
    assert "SECRETHASH" not in r.stderr
