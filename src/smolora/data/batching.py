"""Examples -> micro-batches: ordering (shuffle, curriculum, length grouping), mixing, packing.

Packing is padding-free: a micro-batch is one row holding its examples back to back, with
position ids restarting at 0 for each example (or continuing after a prefix they all share, which
is then computed once). The row's ``Segments`` say where each example lies; attention runs block
by block over them (``smolora.fast.attention``; a dense mask on the plain path), so no token attends
across an example boundary.
Targets are shifted per example, so the last token of one example never learns to predict the
first token of the next.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from smolora.data.formats import IGNORE, Example
from smolora.errors import SmoLoRAError


@dataclass(frozen=True)
class Segments:
    """Layout of a packed row: ``prefix`` shared tokens, then one span [start, end) per example.

    ``step_prefix`` > 0: the row's examples continue a prefix that is not in the row: a
    ``StepPrefix`` computed it once for the whole optimizer step, and every span attends to its
    keys and values as well.
    """

    prefix: int
    spans: tuple[tuple[int, int], ...]
    step_prefix: int = 0

    def dense_mask(self, length: int) -> torch.Tensor:
        """(1, 1, T, T) bool mask, True where a query may attend: for models without the interface."""
        seg = torch.zeros(length, dtype=torch.long)
        for k, (s, e) in enumerate(self.spans, start=1):
            seg[s:e] = k
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        return (causal & ((seg[:, None] == seg[None, :]) | (seg[None, :] == 0)))[None, None]


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # (B, T) — B is 1 when packed
    position_ids: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, T) next-token targets, IGNORE where nothing is learned
    attention_mask: torch.Tensor | None  # (B, T) for padded batches; None when packed
    num_examples: int
    num_tokens: int  # the dataset's own tokens (no padding; a shared prefix counts once per example)
    segments: Segments | None = None  # packed rows: where each example lies

    @property
    def num_targets(self) -> int:
        return int((self.targets != IGNORE).sum())


def shifted_targets(ex: Example) -> list[int]:
    """targets[t] = labels[t + 1]; the example's last position predicts nothing."""
    return ex.labels[1:] + [IGNORE]


def shared_prefix_length(examples: Sequence[Example]) -> int:
    """How many leading tokens all examples can share: a common prefix none of whose positions
    carries a target (it only provides context), leaving every example at least one token."""
    if len(examples) < 2:
        return 0
    first = examples[0].input_ids
    common = min(len(e.input_ids) for e in examples) - 1
    for e in examples[1:]:
        n = 0
        while n < common and e.input_ids[n] == first[n]:
            n += 1
        common = n
    # Position t predicts token t + 1, which must be common too: share at most common - 1.
    share = max(0, common - 1)
    for e in examples:
        supervised = next((t for t, lab in enumerate(e.labels[1 : share + 1]) if lab != IGNORE), None)
        if supervised is not None:
            share = supervised
    return share


def collate_packed(examples: Sequence[Example], prefix: int = 0, step_prefix: int = 0) -> MicroBatch:
    """One row: the first ``prefix`` tokens (common to all examples) once, then each example's rest.

    Each example attends to the prefix and, causally, to itself — never to another example — and
    its position ids continue from the prefix, so its logits are exactly those of the example run
    alone, while the prefix (a chat template's system prompt is a third of a short chat example)
    is computed once. With ``step_prefix`` the row leaves out the first ``step_prefix`` tokens of
    every example altogether: a ``StepPrefix`` computes them once for all the rows of a step.
    """
    if prefix and step_prefix:
        raise ValueError("a row shares either its own prefix or the step's, not both")
    ids = list(examples[0].input_ids[:prefix])
    pos = list(range(prefix))
    tgt = [IGNORE] * prefix
    spans = []
    skip = prefix or step_prefix
    for e in examples:
        n = len(e.input_ids)
        spans.append((len(ids), len(ids) + n - skip))
        ids += e.input_ids[skip:]
        pos += range(skip, n)
        tgt += shifted_targets(e)[skip:]
    as_row = lambda xs: torch.tensor([xs], dtype=torch.long)  # noqa: E731
    num_tokens = sum(len(e.input_ids) for e in examples)
    return MicroBatch(
        as_row(ids),
        as_row(pos),
        as_row(tgt),
        None,
        len(examples),
        num_tokens,
        Segments(prefix, tuple(spans), step_prefix),
    )


def collate(
    examples: Sequence[Example], packed: bool = True, pad_id: int = 0, share_prefix: bool = False, step_prefix: int = 0
) -> MicroBatch:
    """Build one micro-batch: a single packed row, or right-padded rows with an attention mask.

    ``step_prefix``: the examples' first tokens are computed by the step's ``StepPrefix`` (packed only).
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    if packed:
        prefix = shared_prefix_length(examples) if share_prefix and not step_prefix else 0
        return collate_packed(examples, prefix, step_prefix)
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    tgt = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        tgt[i, :n] = torch.tensor(shifted_targets(e))
        mask[i, :n] = 1
    pos = torch.arange(width).unsqueeze(0).expand(len(examples), -1).contiguous()
    return MicroBatch(ids, pos, tgt, mask, len(examples), sum(len(e.input_ids) for e in examples))


def group_micro_batches(
    lengths: Sequence[int], order: Sequence[int], batch_size: int, max_tokens: int = 0
) -> list[list[int]]:
    """Split an ordering of example indices into micro-batches of at most ``batch_size`` examples
    and, when ``max_tokens`` > 0, at most ``max_tokens`` tokens (an example longer than the cap
    gets a micro-batch of its own)."""
    groups: list[list[int]] = []
    current: list[int] = []
    tokens = 0
    for i in order:
        n = lengths[i]
        full = len(current) >= batch_size or (max_tokens > 0 and current and tokens + n > max_tokens)
        if full:
            groups.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += n
    if current:
        groups.append(current)
    return groups


def epoch_order(
    num_examples: int,
    epoch: int,
    seed: int,
    *,
    shuffle: bool = True,
    difficulty: Sequence[float] | None = None,
    bucket_shuffle: bool = False,
    num_buckets: int = 10,
    lengths: Sequence[int] | None = None,
    group_by_length: bool = False,
    group_size: int = 64,
) -> list[int]:
    """The order examples are seen in one epoch; a pure function of its arguments (so resumable).

    ``difficulty`` turns on curriculum order: easiest first; with ``bucket_shuffle`` the order is
    shuffled within ``num_buckets`` equal-size buckets of difficulty.
    ``group_by_length`` sorts windows of ``group_size`` examples by length, so micro-batches hold
    similar lengths while the epoch stays shuffled.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(num_examples))
    if difficulty is not None:
        order.sort(key=lambda i: (difficulty[i], i))
        if bucket_shuffle:
            size = max(1, -(-num_examples // num_buckets))
            buckets = [order[s : s + size] for s in range(0, num_examples, size)]
            for b in buckets:
                rng.shuffle(b)
            order = [i for b in buckets for i in b]
        return order
    if shuffle:
        rng.shuffle(order)
    if group_by_length and lengths is not None:
        windows = [order[s : s + group_size] for s in range(0, num_examples, group_size)]
        order = [i for w in windows for i in sorted(w, key=lambda i: lengths[i])]
    return order


def word_length(record: dict) -> float:
    """The spec's curriculum difficulty: number of words in the record's text."""
    parts = []
    for v in record.values():
        if isinstance(v, str):
            parts.append(v)
        elif isinstance(v, list):
            parts.extend(str(m.get("content", m.get("value", ""))) for m in v if isinstance(m, dict))
    return float(sum(len(p.split()) for p in parts))


DIFFICULTY: dict[str, Callable[[dict], float]] = {"length": word_length}


def mix_tasks(tasks: Sequence[tuple[str, list[dict], float]], seed: int) -> list[dict]:
    """Combine several datasets, each (task name, records, weight), into one list of records.

    Each task contributes a share of the total proportional to its weight: larger shares repeat
    records (sampling without replacement until exhausted, then again), smaller ones subsample.
    Every record gets ``_task`` so the task prefix and per-task counts can be applied later, and
    ``_origin`` (task, index), the same for every copy of a record, so a split keeps copies together.
    """
    if not tasks:
        raise SmoLoRAError("no datasets to mix")
    for name, recs, weight in tasks:
        if weight <= 0:
            raise SmoLoRAError(f"task {name}: weight must be > 0 (got {weight})")
        if not recs:
            raise SmoLoRAError(f"task {name}: dataset is empty")
    total = sum(len(r) for _, r, _ in tasks)
    weight_sum = sum(w for _, _, w in tasks)
    rng = random.Random(seed)
    mixed: list[dict] = []
    for name, recs, weight in tasks:
        want = max(1, round(total * weight / weight_sum))
        picked: list[int] = []
        while len(picked) < want:
            idx = list(range(len(recs)))
            rng.shuffle(idx)
            picked.extend(idx[: want - len(picked)])
        mixed.extend({**recs[i], "_task": name, "_origin": (name, i)} for i in picked)
    return mixed
