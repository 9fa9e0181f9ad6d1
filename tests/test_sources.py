"""Readers for every source, and one-line errors that name the file and line."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smolora.config import DataConfig, TrainConfig
from smolora.data import prepare_data
from smolora.data.sources import load_records
from smolora.errors import SmoLoRAError

RECS = [{"text": "alpha beta"}, {"text": "gamma delta"}]


def test_jsonl_json_csv_txt_parquet_saved_and_in_memory(tmp_path):
    import datasets

    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECS))
    (tmp_path / "a.json").write_text(json.dumps(RECS))
    (tmp_path / "a.csv").write_text("text\nalpha beta\ngamma delta\n")
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "one.txt").write_text("alpha beta\n\ngamma delta\n")
    ds = datasets.Dataset.from_list(RECS)
    ds.to_parquet(str(tmp_path / "a.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    sources = [
        tmp_path / "a.jsonl",
        tmp_path / "a.json",
        tmp_path / "a.csv",
        tmp_path / "txt",
        tmp_path / "txt" / "one.txt",
        tmp_path / "a.parquet",
        tmp_path / "saved",
        ds,
        RECS,
    ]
    for src in sources:
        got = [r["text"] for r in load_records(src)]
        assert got == ["alpha beta", "gamma delta"], src


def test_txt_modes_and_dedupe(tmp_path, capsys):
    f = tmp_path / "a.txt"
    f.write_text("one two three four five\none two three four five\nsix\n")
    assert len(load_records(f)) == 2
    assert "removed 1 exact duplicate" in capsys.readouterr().out
    assert len(load_records(f, txt_mode="file")) == 1
    chunks = [r["text"] for r in load_records(f, txt_mode="file", chunk_words=4, chunk_stride=2, dedupe=False)]
    assert len(chunks) == 1
    chunks = [r["text"] for r in load_records(f, txt_mode="chunk", chunk_words=4, chunk_stride=2, dedupe=False)]
    assert chunks[0] == "one two three four" and chunks[1] == "three four five one"


def error_of(source, **kw) -> str:
    with pytest.raises(SmoLoRAError) as info:
        load_records(source, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_lines_end_only_at_newlines_not_at_unicode_separators(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"text": "one\u2028two"}, ensure_ascii=False) + "\r\n", encoding="utf-8"
    )
    (tmp_path / "a.txt").write_text("one\x85still one\rtwo\n", encoding="utf-8")
    (tmp_path / "a.csv").write_text('text\n"x\u2028y"\n', encoding="utf-8")
    assert [r["text"] for r in load_records(str(tmp_path / "a.jsonl"))] == ["one\u2028two"]
    assert [r["text"] for r in load_records(str(tmp_path / "a.txt"))] == ["one\x85still one", "two"]
    assert [r["text"] for r in load_records(str(tmp_path / "a.csv"))] == ["x\u2028y"]


def test_malformed_json_line_names_file_and_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "ok"}\n{"text": "ok2"}\n{"text": broken}\n')
    assert error_of(f).startswith(f"{f}:3: malformed JSON")


def test_json_array_error_line(tmp_path):
    f = tmp_path / "d.json"
    f.write_text('[\n{"text": "a"},\n{"text" "b"}\n]')
    assert error_of(f).startswith(f"{f}:3: malformed JSON")


def test_non_utf8_names_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    assert error_of(f) == f"{f}:2: not valid UTF-8 (byte 0xe9); save the file as UTF-8"


def test_empty_missing_and_unknown(tmp_path):
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n\n")
    assert "no records found" in error_of(empty)
    assert "data path does not exist" in error_of(str(tmp_path / "nope.jsonl"))
    odd = tmp_path / "d.xlsx"
    odd.write_text("x")
    assert "unknown file type .xlsx" in error_of(odd)
    assert "expected a JSON object per line" in error_of(_write(tmp_path / "l.jsonl", "[1, 2]\n"))


def test_csv_ragged_row(tmp_path):
    f = _write(tmp_path / "d.csv", 'text\nok\n"a","b"\n')
    assert error_of(f) == f"{f}:3: more fields than the header's 1"


def _write(path, text):
    path.write_text(text)
    return path


def prepare(records, tokenizer, max_length=1024, **cfg):
    return prepare_data(records, tokenizer, DataConfig(max_length=max_length), TrainConfig(**cfg))


def test_csv_without_the_named_column(tmp_path, tokenizer):
    f = _write(tmp_path / "d.csv", "body,label\nhello,1\n")
    with pytest.raises(SmoLoRAError, match=r"d.csv:2: record has no 'text' field \(it has 2 other fields\)"):
        prepare(load_records(f), tokenizer)


def test_nothing_supervised_fails_before_model_load(tokenizer):
    recs = [{"prompt": "hello world " * 40, "completion": "x"}]
    with pytest.raises(SmoLoRAError, match="no example has a supervised token left"):
        prepare(recs, tokenizer, max_length=16)


def test_validation_split_is_deterministic(tokenizer):
    recs = [{"text": f"hello {i}"} for i in range(20)]
    a = prepare([dict(r) for r in recs], tokenizer, val_size=0.25, seed=3)
    b = prepare([dict(r) for r in recs], tokenizer, val_size=0.25, seed=3)
    assert len(a.val) == 5 and len(a.train) == 15
    assert [e.input_ids for e in a.val] == [e.input_ids for e in b.val]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
    max_leaves=8,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.one_of(st.text(max_size=40), json_values.map(json.dumps)), min_size=0, max_size=6))
def test_fuzz_jsonl_reader_and_encoder_raise_only_our_errors(tmp_path_factory, tokenizer, lines):
    f = tmp_path_factory.mktemp("fuzz") / "d.jsonl"
    f.write_text("\n".join(line.replace("\n", " ") for line in lines), encoding="utf-8", errors="surrogatepass") if all(
        _encodable(x) for x in lines
    ) else f.write_bytes(b"\xff")
    try:
        prepare(load_records(f), tokenizer)
    except SmoLoRAError as e:
        assert "\n" not in str(e)


def _encodable(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def test_token_windows_with_stride(tmp_path, tokenizer):
    f = _write(
        tmp_path / "book.txt", "the quick brown fox jumps over the lazy dog\nhello world, this is a tiny tokenizer\n"
    )
    data = DataConfig(txt_mode="chunk", chunk_unit="tokens", chunk_words=8, chunk_stride=4)
    from smolora.data import load_source

    records = load_source(str(f), data)
    assert len(records) == 1  # the whole file, cut after tokenizing
    prepared = prepare_data(records, tokenizer, data)
    full = tokenizer("\n".join(f.read_text().splitlines()).strip())["input_ids"] + [tokenizer.eos_token_id]
    windows = [e.input_ids for e in prepared.train]
    assert all(len(w) <= 8 for w in windows) and windows[0] == full[:8] and windows[1] == full[4:12]
    assert windows[-1][-1] == tokenizer.eos_token_id
    assert sum(len(w) for w in windows[::2]) >= len(full) - 8  # every token is covered


def test_empty_system_prompt_suppresses_the_default(tokenizer):
    from smolora.data.formats import FormatOptions, encode_record

    ex = encode_record({"prompt": "hi", "completion": "yo"}, tokenizer, FormatOptions(system_prompt=""))
    assert "You are a test bot" not in tokenizer.decode(ex.input_ids)


def test_a_difficulty_function_gets_the_text_as_in_the_spec_and_its_errors_name_the_record(tokenizer):
    records = [
        {"text": "three words here", "_where": "a.txt:1"},
        {"text": "one", "_where": "a.txt:2"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "_where": "a.txt:3"},
    ]
    seen = []
    prepared = prepare_data(
        [dict(r) for r in records],
        tokenizer,
        DataConfig(),
        difficulty=lambda x: seen.append(x) or (len(x.split()) if isinstance(x, str) else 0),
    )
    assert seen[:2] == ["three words here", "one"] and isinstance(seen[2], dict)
    assert [e.difficulty for e in prepared.train] == [3.0, 1.0, 0.0]
    with pytest.raises(SmoLoRAError, match="a.txt:1: difficulty_fn failed: AttributeError"):
        prepare_data(
            [dict(r) for r in records],
            tokenizer,
            DataConfig(),
            difficulty=lambda x: x.nope,
        )
