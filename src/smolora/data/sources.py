"""Read training data into a list of plain dict records.

Our own readers handle JSONL, JSON, CSV and text, where a bad byte or a bad line must be reported
with its file and line number. Parquet is read with ``pyarrow``; saved ``datasets`` folders and hub
names go through the ``datasets`` library. Every record of a file carries ``_where``, its place
(``file:line``, ``file[i]``, ``file#rowN``), so that later checks of its fields can name it. Every
error is a ``SmoLoRAError`` that names the place, not the content found there.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

from smolora.errors import SmoLoRAError
from smolora.log import say

TEXT_SUFFIXES = (".txt", ".md")
KNOWN_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet") + TEXT_SUFFIXES


def load_records(
    source: Any,
    *,
    txt_mode: str = "line",
    chunk_words: int = 0,
    chunk_stride: int = 0,
    dedupe: bool = True,
    max_file_mb: int = 2048,
) -> list[dict]:
    """Load records from a path, a ``datasets.Dataset``, a list of dicts or a hub name.

    Args:
        source: where the data is.
        txt_mode: for text files: ``line`` (one example per non-empty line), ``file`` (one per
            file) or ``chunk`` (windows of ``chunk_words`` words moving by ``chunk_stride``).
        dedupe: drop exact duplicate records; the count is printed.
        max_file_mb: a larger data file is refused before it is read.
    """
    records = _read_any(source, txt_mode, chunk_words, chunk_stride, max_file_mb)
    name = _describe(source)
    if not records:
        raise SmoLoRAError(f"{name}: no records found (the data is empty)")
    if dedupe:
        records, dropped = dedupe_records(records)
        if dropped:
            say(f"{name}: removed {dropped} exact duplicate record(s)")
    return records


def _describe(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return type(source).__name__


def _read_any(source: Any, txt_mode: str, chunk_words: int, chunk_stride: int, max_file_mb: int) -> list[dict]:
    if isinstance(source, list):
        for i, rec in enumerate(source):
            if not isinstance(rec, dict):
                raise SmoLoRAError(f"records[{i}]: expected a dict, got {type(rec).__name__}")
        return [dict(r) for r in source]
    if hasattr(source, "to_list") and hasattr(source, "column_names"):  # datasets.Dataset
        return list(source.to_list())
    if not isinstance(source, (str, os.PathLike)):
        raise SmoLoRAError(f"data: expected a path, a list of dicts or a datasets.Dataset, got {type(source).__name__}")
    path = Path(source).expanduser()
    if path.is_dir():
        if (
            (path / "dataset_info.json").is_file()
            or (path / "state.json").is_file()
            or (path / "dataset_dict.json").is_file()
        ):
            return _read_saved_dataset(path)
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise SmoLoRAError(f"{path}: folder holds no .txt files and is not a saved dataset")
        records: list[dict] = []
        for f in files:
            _check_file(f, max_file_mb)
            records.extend(read_text_file(f, txt_mode, chunk_words, chunk_stride))
        return records
    if path.exists():
        _check_file(path, max_file_mb)
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return read_jsonl(path)
        if suffix == ".json":
            return read_json(path)
        if suffix == ".csv":
            return read_csv(path)
        if suffix == ".parquet":
            return _read_parquet(path)
        if suffix in TEXT_SUFFIXES:
            return read_text_file(path, txt_mode, chunk_words, chunk_stride)
        raise SmoLoRAError(
            f"{path}: unknown file type {suffix or '(none)'}; expected one of {', '.join(KNOWN_SUFFIXES)} or a folder"
        )
    text = str(source)
    if text.startswith((".", "/", "~")) or Path(text).suffix.lower() in KNOWN_SUFFIXES or text.count("/") > 1:
        raise SmoLoRAError(f"{text}: data path does not exist")
    return _read_hub(text)


def _check_file(path: Path, max_file_mb: int) -> None:
    """Only regular files are read (a FIFO would block, a device never end), and none larger than the limit."""
    if not path.is_file():
        raise SmoLoRAError(f"{path}: not a regular file (a pipe, a device or a socket); data is read from files only")
    size = path.stat().st_size
    if size > max_file_mb * 2**20:
        raise SmoLoRAError(
            f"{path}: {size / 2**20:.0f} MiB, larger than max_file_mb ({max_file_mb}); raise --max-file-mb to read it"
        )


def _decode_lines(path: Path) -> list[str]:
    """Read a file as UTF-8 lines; a bad byte is reported with its line number."""
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise SmoLoRAError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x}); save the file as UTF-8"
        ) from None
    # Lines end at \n, \r\n or \r only: str.splitlines would also split inside a record at U+2028,
    # U+0085 and other characters JSON strings and CSV cells may hold as they are.
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    nul = text.find("\x00")
    if nul >= 0:  # text data holds no NUL; a file that does is binary, or UTF-16 without its byte order mark
        line = text.count("\n", 0, nul) + 1
        raise SmoLoRAError(f"{path}:{line}: NUL byte; the file is binary or UTF-16, not UTF-8 text")
    return text.split("\n")


def _beyond(error: Exception) -> str:
    if isinstance(error, RecursionError):
        return "arrays or objects nested too deeply"
    return "a number with too many digits" if "digits" in str(error) else type(error).__name__


def read_jsonl(path: Path) -> list[dict]:
    records = []
    for number, line in enumerate(_decode_lines(path), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise SmoLoRAError(
                f"{path}:{number}: malformed JSON ({e.msg.removesuffix(' at')} at column {e.colno})"
            ) from None
        except (ValueError, RecursionError) as e:  # a number of thousands of digits; nesting thousands deep
            raise SmoLoRAError(f"{path}:{number}: JSON this reader refuses ({_beyond(e)})") from None
        if not isinstance(rec, dict):
            raise SmoLoRAError(f"{path}:{number}: expected a JSON object per line, got {type(rec).__name__}")
        rec["_where"] = f"{path}:{number}"
        records.append(rec)
    return records


def read_json(path: Path) -> list[dict]:
    text = "\n".join(_decode_lines(path))
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise SmoLoRAError(
            f"{path}:{e.lineno}: malformed JSON ({e.msg.removesuffix(' at')} at column {e.colno})"
        ) from None
    except (ValueError, RecursionError) as e:
        raise SmoLoRAError(f"{path}: JSON this reader refuses ({_beyond(e)})") from None
    if isinstance(data, dict):
        # Accept {"data": [...]} / {"train": [...]} wrappers holding one list of records.
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise SmoLoRAError(f"{path}: expected a JSON array of records (or an object holding one array)")
        data = lists[0]
    if not isinstance(data, list):
        raise SmoLoRAError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise SmoLoRAError(f"{path}: record {i} is {type(rec).__name__}, expected an object")
        rec["_where"] = f"{path}[{i}]"
    return data


def read_csv(path: Path) -> list[dict]:
    """Records of a CSV file with a header row, each at the line it starts on.

    Every row must have the header's number of fields: a row with more or fewer is a broken row,
    and a quoting mistake shows as one.
    """
    text = "\n".join(_decode_lines(path))
    if not text.strip():
        return []
    rows = _csv_rows(path, text)
    line, names = next(rows)
    if not any(name.strip() for name in names):
        raise SmoLoRAError(f"{path}:{line}: CSV has no header row")
    named = [name for name in names if name]
    if len(set(named)) != len(named):
        raise SmoLoRAError(f"{path}:{line}: the header names a column twice")
    records = []
    for line, fields in rows:
        if len(fields) != len(names):
            more = "more" if len(fields) > len(names) else "fewer"
            raise SmoLoRAError(f"{path}:{line}: {more} fields than the header's {len(names)}")
        records.append({**dict(zip(names, fields)), "_where": f"{path}:{line}"})
    return records


# One field of the csv module's default dialect, at the start of a field: quoted (a quote inside is
# written twice; newlines are part of the cell) or not (a quote inside is an ordinary character).
# A quoted field's groups: its inside, its closing quote (absent: never closed), text after that.
_CSV_FIELD = re.compile(r'"([^"]*(?:""[^"]*)*)(")?([^,\n]*)|[^,\n]*')


def _csv_rows(path: Path, text: str) -> Iterator[tuple[int, list[str]]]:
    """Yield (line, fields) for each record of ``text``, the line being the one the record starts on.

    Blank lines are skipped. Quoting is checked here, where the place of the opening quote is known:
    a quote never closed would swallow every later row into one cell, and text right after a closing
    quote means a stray or missing quote (it may close many lines after the one that opened it).
    """
    pos, line = 0, 1
    while pos < len(text):
        if text[pos] == "\n":
            pos, line = pos + 1, line + 1
            continue
        first, fields = line, []
        while True:
            m = _CSV_FIELD.match(text, pos)
            inside, closed, after = m.groups()
            if inside is None:
                fields.append(m.group())
            else:
                if closed is None:
                    raise SmoLoRAError(f"{path}:{line}: malformed CSV: the quote opened here is never closed")
                last = line + inside.count("\n")
                if after.strip():
                    on = f" on line {last}" if last != line else ""
                    raise SmoLoRAError(
                        f"{path}:{line}: malformed CSV: the quote opened here closes{on} with text right after it; "
                        'a quote is stray or missing (inside a quoted cell, write a quote as "")'
                    )
                fields.append(inside.replace('""', '"') + after)
                line = last
            pos = m.end() + 1  # past the comma or the end of the line
            if m.end() >= len(text) or text[m.end()] == "\n":
                break
        yield first, fields
        line += 1


def read_text_file(path: Path, mode: str, chunk_words: int = 0, chunk_stride: int = 0) -> list[dict]:
    lines = _decode_lines(path)
    if mode == "line":
        return [{"text": ln.strip(), "_where": f"{path}:{i}"} for i, ln in enumerate(lines, 1) if ln.strip()]
    text = "\n".join(lines).strip()
    if not text:
        return []
    if mode == "file":
        return [{"text": text, "_where": str(path)}]
    if mode == "chunk":
        if chunk_words <= 0:
            raise SmoLoRAError("txt chunking needs chunk_words > 0")
        return [
            {"text": t, "_where": f"{path}#chunk{i}"} for i, t in enumerate(chunk_text(text, chunk_words, chunk_stride))
        ]
    raise SmoLoRAError(f"txt_mode must be line, file or chunk (got {mode!r})")


def chunk_text(text: str, size: int, stride: int = 0) -> Iterable[str]:
    """Windows of ``size`` words starting every ``stride`` words (default: no overlap)."""
    words = re.split(r"\s+", text.strip())
    step = stride if stride > 0 else size
    for start in range(0, max(1, len(words) - size + step), step):
        window = words[start : start + size]
        if window:
            yield " ".join(window)
        if start + size >= len(words):
            break


def _read_parquet(path: Path) -> list[dict]:
    """Rows of a Parquet file, each named ``path#rowN`` (N counting from 0) so that a value of the wrong
    type is reported at its row."""
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(str(path)).to_pylist()
    except Exception as e:  # pyarrow raises many types; report them as one
        reason = re.sub(r"^Could not open Parquet input source '[^']*': ", "", str(e).splitlines()[0])
        raise SmoLoRAError(f"{path}: cannot read Parquet ({reason[:200]})") from None
    return _numbered_rows(rows, str(path))


def _numbered_rows(rows: list[dict], name: str) -> list[dict]:
    for i, rec in enumerate(rows):
        rec["_where"] = f"{name}#row{i}"
    return rows


def _read_saved_dataset(path: Path) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise SmoLoRAError(f"{path}: cannot read saved dataset ({str(e).splitlines()[0][:200]})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise SmoLoRAError(f"{path}: saved DatasetDict has no 'train' split (has {', '.join(ds)})")
        ds = ds["train"]
    return _numbered_rows(ds.to_list(), str(path))


def _read_hub(name: str) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as e:
        raise SmoLoRAError(
            f"{name}: not a local path, and loading it as a hub dataset failed ({str(e).splitlines()[0][:200]})"
        ) from None
    return _numbered_rows(ds.to_list(), name)


def dedupe_records(records: list[dict]) -> tuple[list[dict], int]:
    seen: set[str] = set()
    kept = []
    for rec in records:
        key = json.dumps({k: v for k, v in rec.items() if k != "_where"}, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            kept.append(rec)
    return kept, len(records) - len(kept)
