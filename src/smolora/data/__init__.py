"""The data stage: sources -> records -> tokenized examples, split and checked before any model loads."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

from smolora.config import DataConfig, TrainConfig
from smolora.data.batching import DIFFICULTY, mix_tasks
from smolora.data.formats import EncodeStats, Example, FormatOptions, check_record, encode_records
from smolora.data.sources import load_records
from smolora.errors import SmoLoRAError
from smolora.log import say

__all__ = ["PreparedData", "load_source", "prepare_data", "Example"]


@dataclass
class PreparedData:
    train: list[Example]
    val: list[Example]
    stats: EncodeStats


def load_source(source: Any, data: DataConfig, seed: int = 42, mix: bool = True) -> list[dict]:
    """Records from one source, or from several tasks given as {name: source or (source, weight)}:
    mixed by their weights, or with ``mix=False`` every task's records once (each with its task)."""
    # Token windows need the tokenizer: read whole files here, cut them when encoding.
    mode = "file" if data.txt_mode == "chunk" and data.chunk_unit == "tokens" else data.txt_mode
    read = lambda s: load_records(
        s,
        txt_mode=mode,
        chunk_words=data.chunk_words,
        chunk_stride=data.chunk_stride,
        dedupe=data.dedupe,
        max_file_mb=data.max_file_mb,
    )  # noqa: E731
    if isinstance(source, dict):
        tasks = []
        for name, spec in source.items():
            src, weight = spec if isinstance(spec, tuple) else (spec, 1.0)
            tasks.append((name, read(src), float(weight)))
        return mix_tasks(tasks, seed) if mix else [{**r, "_task": name} for name, records, _ in tasks for r in records]
    return read(source)


def format_options(data: DataConfig) -> FormatOptions:
    return FormatOptions(
        text_field=data.dataset_text_field,
        shape=data.shape,
        field_map=data.field_map,
        system_prompt=data.system_prompt,
        train_on_prompt=data.train_on_prompt,
        max_length=data.max_length,
        task_prefix=data.task_prefix,
        chunk_tokens=data.chunk_words if data.txt_mode == "chunk" and data.chunk_unit == "tokens" else 0,
        chunk_stride=data.chunk_stride,
        special_tokens_in_content=data.special_tokens_in_content,
    )


def check_records(records: list[dict], data: DataConfig) -> None:
    """Every record's shape and fields, before a tokenizer or a model is loaded (``check_record``)."""
    opts = format_options(data)
    for record in records:
        check_record(record, opts)


def prepare_data(
    records: list[dict],
    tokenizer,
    data: DataConfig,
    cfg: TrainConfig | None = None,
    *,
    val_records: list[dict] | None = None,
    difficulty: Callable[[Any], float] | None = None,
) -> PreparedData:
    """Split, tokenize, mask and truncate. Fails if nothing is left to learn from. ``cfg``, where
    training follows: its validation split and curriculum (none: every record, in its order)."""
    cfg = cfg or TrainConfig()
    if val_records is None and cfg.val_size > 0:
        records, val_records = split_validation(records, cfg.val_size, cfg.seed)
    opts = format_options(data)
    score, what = (DIFFICULTY[cfg.curriculum], f"curriculum {cfg.curriculum!r}") if cfg.curriculum else (None, "")
    if difficulty is not None:  # the user's: given the record's text, as the spec calls it, or the whole record
        field = data.field_map.get(data.dataset_text_field, data.dataset_text_field)
        score, what = (
            lambda public: difficulty(public[field] if isinstance(public.get(field), str) else public),
            "difficulty_fn",
        )
    if score is not None:
        for rec in records:
            try:
                rec["_difficulty"] = float(score({k: v for k, v in rec.items() if not k.startswith("_")}))
            except Exception as e:
                raise SmoLoRAError(f"{rec.get('_where', 'record')}: {what} failed: {type(e).__name__}: {e}") from None
    train, stats = encode_records(records, tokenizer, opts)
    if not train:
        raise SmoLoRAError(
            f"no example has a supervised token left after max_length={data.max_length} truncation ({stats.summary()})"
        )
    say(f"data: {stats.summary()}")
    val: list[Example] = []
    if val_records:
        val, vstats = encode_records(val_records, tokenizer, opts)
        say(f"validation: {vstats.summary()}")
    return PreparedData(train, val, stats)


def split_validation(records: list[dict], val_size: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministic split: a fraction (< 1) or a count of records goes to validation.

    Copies of one record (multi-task mixing repeats records: their ``_origin``) count once and go
    to one side, so no validation record is also trained on; validation holds each once.
    """
    keys = [r.get("_origin", i) for i, r in enumerate(records)]
    distinct = list(dict.fromkeys(keys))
    count = int(round(len(distinct) * val_size)) if val_size < 1 else int(val_size)
    if count <= 0 or count >= len(distinct):
        raise SmoLoRAError(f"val_size={val_size} leaves no training or no validation records (have {len(distinct)})")
    random.Random(seed).shuffle(distinct)
    held_out = set(distinct[:count])
    val = {k: r for k, r in zip(keys, records) if k in held_out}  # one copy each
    return [r for k, r in zip(keys, records) if k not in held_out], list(val.values())
