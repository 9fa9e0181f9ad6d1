"""Read training data into a list of plain dict records.

Our own readers handle JSONL, JSON, CSV and text, where a bad byte or a bad line must be reported
with its file and line number. Parquet, saved ``datasets`` folders and hub names go through the
``datasets`` library. Every error is a ``SmoLoRAError`` that names the place.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

from smolora.errors import SmoLoRAError

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
            print(f"[smolora] {name}: removed {dropped} exact duplicate record(s)", flush=True)
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
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


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
    lines = _decode_lines(path)
    if not any(line.strip() for line in lines):
        return []
    reader = csv.DictReader(io.StringIO("\n".join(lines) + "\n"))
    if not reader.fieldnames or not any(f and f.strip() for f in reader.fieldnames):
        raise SmoLoRAError(f"{path}:1: CSV has no header row")
    records = []
    try:
        for rec in reader:
            if None in rec:
                raise SmoLoRAError(f"{path}:{reader.line_num}: more fields than the header's {len(reader.fieldnames)}")
            rec = {k: v for k, v in rec.items() if k is not None}
            rec["_where"] = f"{path}:{reader.line_num}"
            records.append(rec)
    except csv.Error as e:
        raise SmoLoRAError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
    return records


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
    import datasets

    try:
        ds = datasets.Dataset.from_parquet(str(path))
    except Exception as e:  # pyarrow raises many types; report them as one
        raise SmoLoRAError(f"{path}: cannot read Parquet ({str(e).splitlines()[0][:200]})") from None
    return list(ds.to_list())


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
    return list(ds.to_list())


def _read_hub(name: str) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as e:
        raise SmoLoRAError(
            f"{name}: not a local path, and loading it as a hub dataset failed ({str(e).splitlines()[0][:200]})"
        ) from None
    return list(ds.to_list())


def dedupe_records(records: list[dict]) -> tuple[list[dict], int]:
    seen: set[str] = set()
    kept = []
    for rec in records:
        key = json.dumps({k: v for k, v in rec.items() if k != "_where"}, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            kept.append(rec)
    return kept, len(records) - len(kept)
