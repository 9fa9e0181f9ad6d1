"""Evaluate a model on held-out data: the mean loss and perplexity over the tokens training learns
(the replies, with their end-of-turn token), and, if asked, greedy exact match of each example's
last reply given everything before it."""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import asdict, dataclass

import torch

from smolora.data.formats import IGNORE, Example
from smolora.errors import SmoLoRAError
from smolora.log import warn

BATCH_SIZE = 16  # prompts decoded at once by default
BATCH_TOKENS = 8192  # at most this many padded prompt tokens in one batch's first forward
# A step whose best logit leads the runner-up by less than this (relative to its size, at least 1) is a near tie:
# batching moved SmolLM2-135M's logits (~20) by at most 4e-5, 2e-6 of their size: a fiftieth of this margin.
TIE_MARGIN = 1e-4


@dataclass
class EvalResult:
    examples: int
    supervised_tokens: int
    loss: float
    perplexity: float
    exact_match: float | None = None  # percent of the replies scored
    matched: int | None = None
    scored: int | None = None  # examples with a prompt before their last reply
    per_task: dict[str, EvalResult] | None = None  # multi-task data: the same, task by task

    def summary(self) -> str:
        lines = [
            f"{self.examples} examples, {self.supervised_tokens} supervised tokens: "
            f"loss {self.loss:.4f}, perplexity {self.perplexity:.3f}"
        ]
        if self.exact_match is not None:
            lines.append(f"exact match {self.exact_match:.1f}% ({self.matched} of {self.scored} last replies, greedy)")
        for task, part in (self.per_task or {}).items():
            lines.append(f"  task {task}: " + part.summary().replace("\n", "; "))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if v is not None and k != "per_task"}
        if self.per_task:
            out["per_task"] = {task: part.to_dict() for task, part in self.per_task.items()}
        return out


def last_reply(example: Example) -> tuple[list[int], list[int]] | None:
    """(prompt ids, reply ids): the example's last run of supervised tokens and all before it.
    None where nothing comes before it (plain text, supervised throughout)."""
    labels = example.labels
    end = max((i for i, x in enumerate(labels) if x != IGNORE), default=-1) + 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    if start == 0:
        return None
    return example.input_ids[:start], example.input_ids[start:end]


def replies_to_score(examples: list[Example]) -> list[tuple[list[int], list[int]]]:
    """The (prompt, reply) pairs exact match scores; an error if there are none."""
    pairs = [p for p in map(last_reply, examples) if p is not None]
    if not pairs:
        raise SmoLoRAError(
            "exact match needs examples with a prompt before the reply (chat, prompt/completion, alpaca); "
            "these are plain text"
        )
    return pairs


def evaluate(
    model,
    tokenizer,
    examples: list[Example],
    *,
    exact_match: bool = False,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    generation_batch_size: int = BATCH_SIZE,
    progress: bool = True,
    weight_codes: bool = True,
    fast: bool = True,
) -> EvalResult:
    """Loss over ``examples``' supervised tokens; with ``exact_match``, also generate each last reply
    greedily and compare it with the reference (whitespace at either end ignored), ``generation_batch_size``
    replies at a time (``greedy_replies``: the replies generated one at a time). ``batch_size``: examples
    per packed row of the loss. ``weight_codes``: the loss from the frozen weights' GGUF codes where the
    model has them (``smolora.fast.codes``); ``fast``: through the speed wing (``smolora.fast``), else
    the libraries' own path."""
    from smolora.fast import accelerated
    from smolora.loss import evaluate_loss

    hits = (
        _exact_matches(model, tokenizer, examples, max_new_tokens, generation_batch_size, progress)
        if exact_match
        else None
    )

    def measure(indices: list[int]) -> EvalResult:
        part = [examples[i] for i in indices]
        with accelerated(model, fast=fast, training=False, weight_codes=weight_codes) as speed:
            loss = evaluate_loss(
                model, part, batch_size, packed=True, pad_id=tokenizer.pad_token_id or 0, loss_sum=speed.loss_sum
            )
        tokens = sum(1 for e in part for x in e.labels[1:] if x != IGNORE)
        result = EvalResult(len(part), tokens, loss, math.exp(min(loss, 50)))
        scored = [hits[i] for i in indices if hits[i] is not None] if hits is not None else []
        if scored:
            result.matched, result.scored = sum(scored), len(scored)
            result.exact_match = 100.0 * result.matched / result.scored
        return result

    result = measure(list(range(len(examples))))
    tasks = list(dict.fromkeys(e.task for e in examples))
    if len(tasks) > 1:
        result.per_task = {t or "default": measure([i for i, e in enumerate(examples) if e.task == t]) for t in tasks}
    return result


def _exact_matches(
    model, tokenizer, examples: list[Example], max_new_tokens: int, batch_size: int, progress: bool
) -> list[bool | None]:
    """Per example: whether its last reply, generated greedily, matches (None: nothing to prompt with).
    A reply that can no longer match stops there (``_mismatch``): the same verdicts, fewer tokens."""
    replies_to_score(examples)  # an error if there are none
    pairs = [last_reply(e) for e in examples]
    prompts = [pair[0] for pair in pairs if pair is not None]
    desc = "[smolora] exact match" if progress else None
    text = lambda ids: tokenizer.decode(ids, skip_special_tokens=True).strip()  # noqa: E731  as generate() returns
    references = [text(pair[1]) for pair in pairs if pair is not None]
    # a tokenizer that cleans up spaces can rewrite text already decoded: no early verdict there
    until = None if getattr(tokenizer, "clean_up_tokenization_spaces", False) else _mismatch(tokenizer, references)
    replies = greedy_replies(model, tokenizer, prompts, max_new_tokens, batch_size=batch_size, desc=desc, until=until)
    matches = iter(text(reply) == reference for reply, reference in zip(replies, references))
    return [None if pair is None else next(matches) for pair in pairs]


def _mismatch(tokenizer, references: list[str]):
    """``until`` for ``greedy_replies``: whether prompt ``i``'s reply so far can no longer equal
    ``references[i]`` whatever follows, its text having left every ``whitespace + reference +
    whitespace``. Exact for a byte-level decoder, which only appends to the text (an unfinished
    character, shown as U+FFFD, waits for its other bytes)."""

    def settled(i: int, ids: list[int]) -> bool:
        reference = references[i]
        text = tokenizer.decode(ids, skip_special_tokens=True).lstrip().rstrip("\ufffd")
        if len(text) <= len(reference):
            return not reference.startswith(text)
        return not (text.startswith(reference) and text[len(reference) :].isspace())

    return settled


def greedy_replies(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int = 64,
    *,
    batch_size: int = BATCH_SIZE,
    desc: str | None = None,
    until=None,
) -> list[list[int]]:
    """Each prompt's greedy continuation (token ids, up to and with its stop token): the ids
    ``smolora.generate.generate(..., do_sample=False)`` gives each prompt alone, computed
    ``batch_size`` prompts at a time. ``desc``: show progress under that name.

    Prompts of similar length share a batch (less padding), left-padded behind an attention mask,
    positions counted from each row's first real token; a row leaves the batch at a stop token
    (``stop_token_ids``) or its token limit. Batching changes the order of float sums (a GEMM
    over more rows, attention over masked keys), so a row's logits may differ from its logits alone
    in the last bits. Where a step's best token led the runner-up by less than ``TIE_MARGIN``, that
    difference could change the choice: such a row is decoded again alone, where the ids are
    ``generate``'s to the bit (a batch of one runs the same forward calls). So every row's ids are
    the one-at-a-time ids. ``until(i, ids)``: where true, prompt ``i``'s reply is settled and stops
    there (exact match stops a reply that can no longer match; its ids are then a prefix of the full
    reply's).
    """
    from smolora.fast import accelerated
    from smolora.generate import folded_adapter, stop_token_ids
    from smolora.monitor import progress

    if batch_size < 1:
        raise SmoLoRAError(f"batch_size must be >= 1 (got {batch_size})")
    limits = _token_limits(model, prompts, max_new_tokens)
    stops = stop_token_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    replies: list[list[int]] = [[] for _ in prompts]
    batches = _batches(prompts, batch_size)
    was_training = model.training
    model.eval()
    try:
        with folded_adapter(model), accelerated(model, training=False, only=("oneDNN linears",)):
            for batch in progress(batches, desc, "batch") if desc else batches:
                run = lambda rows: _decode(  # noqa: E731
                    [prompts[i] for i in rows],
                    [limits[i] for i in rows],
                    stops,
                    pad,
                    model,
                    None if until is None else [functools.partial(until, i) for i in rows],
                )
                for i, (ids, close) in zip(batch, run(batch)):
                    replies[i] = run([i])[0][0] if close and len(batch) > 1 else ids
    finally:
        model.train(was_training)
    return replies


def greedy_texts(
    model, tokenizer, prompts: list[str], max_new_tokens: int = 64, *, batch_size: int = BATCH_SIZE, desc=None
) -> list[str]:
    """Each text prompt's greedy reply as ``generate(model, tokenizer, prompt, max_new_tokens,
    do_sample=False)`` returns it (through the chat template where the model has one), computed in
    batches by ``greedy_replies``."""
    from smolora.generate import prompt_ids

    ids = [prompt_ids(tokenizer, prompt)[0].tolist() for prompt in prompts]
    replies = greedy_replies(model, tokenizer, ids, max_new_tokens, batch_size=batch_size, desc=desc)
    return [tokenizer.decode(reply, skip_special_tokens=True).strip() for reply in replies]


def _token_limits(model, prompts: list[list[int]], max_new_tokens: int) -> list[int]:
    """Per prompt, the tokens it may generate: ``max_new_tokens``, cut to the model's context as
    ``generate`` cuts it (once said); an error for a prompt that fills the context."""
    context = getattr(model.config, "max_position_embeddings", None)
    if not isinstance(context, int):
        return [max_new_tokens] * len(prompts)
    longest = max(map(len, prompts), default=0)
    if longest >= context:
        raise SmoLoRAError(f"a prompt ({longest} tokens) fills the model's context ({context} tokens)")
    if longest + max_new_tokens > context:
        warn(f"max_new_tokens cut to fit the model's context ({context} tokens) for the longest prompts")
    return [min(max_new_tokens, context - len(p)) for p in prompts]


def _batches(prompts: list[list[int]], batch_size: int) -> list[list[int]]:
    """Prompt indices in batches of at most ``batch_size`` prompts and ``BATCH_TOKENS`` padded
    tokens, shortest prompts first (a batch pads to its longest)."""
    batches: list[list[int]] = []
    for i in sorted(range(len(prompts)), key=lambda i: len(prompts[i])):
        last = batches[-1] if batches else None
        if last is None or len(last) >= batch_size or (len(last) + 1) * len(prompts[i]) > BATCH_TOKENS:
            batches.append([i])
        else:
            last.append(i)
    return batches


@torch.no_grad()
def _decode(
    prompts: list[list[int]], limits: list[int], stops: list[int], pad: int, model, settled=None
) -> list[tuple[list[int], bool]]:
    """Greedy decoding of one batch: per prompt, (the ids generated, whether some step's choice was
    a near tie). A batch of one runs the forward calls ``model.generate`` runs for it, bit for bit.
    ``settled``: per prompt, ids -> whether its reply is settled and may stop (``greedy_replies``' until)."""
    from transformers import DynamicCache

    from smolora.loss import base_lm

    lm = base_lm(model)
    rows, width = len(prompts), max(map(len, prompts))
    ids = torch.full((rows, width), pad, dtype=torch.long)
    mask = torch.zeros((rows, width), dtype=torch.long)
    for r, prompt in enumerate(prompts):
        ids[r, width - len(prompt) :] = torch.tensor(prompt)
        mask[r, width - len(prompt) :] = 1
    device = next(lm.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # (B, T): each row counts from its first token
    cache = DynamicCache(config=lm.config)
    stop = torch.tensor(stops, device=device)
    out: list[list[int]] = [[] for _ in prompts]
    close = [False] * rows
    alive = list(range(rows))  # the prompts still in the batch, in its row order
    options = _step_options(lm, cache)
    while True:
        logits = lm(
            input_ids=ids,
            attention_mask=None if bool(mask.all()) else mask,  # no padding: the mask generate() drops
            position_ids=positions,
            use_cache=True,
            **options,
        ).logits[:, -1]  # (B, V)
        best, runner_up = logits.topk(2, dim=-1).values.unbind(-1)
        near = (best - runner_up) < TIE_MARGIN * best.abs().clamp(min=1.0)
        chosen = logits.argmax(-1)  # the first of equal maxima, as generate's greedy search picks
        stopped = torch.isin(chosen, stop)
        keep = []
        for row, (token, tie, end) in enumerate(zip(chosen.tolist(), near.tolist(), stopped.tolist())):
            i = alive[row]
            out[i].append(token)
            close[i] = close[i] or tie
            if not end and len(out[i]) < limits[i] and not (settled and settled[i](out[i])):
                keep.append(row)
        if not keep:
            return list(zip(out, close))
        if len(keep) < len(alive):  # finished rows leave the batch, and their cache with them
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            mask, positions, chosen = mask[index], positions[index], chosen[index]
            alive = [alive[row] for row in keep]
        mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)
        positions = positions[:, -1:] + 1
        ids = chosen[:, None]


def _step_options(lm, cache) -> dict:
    """The cache under the forward's name for it (``cache`` in newer transformers 5 releases,
    ``past_key_values`` before) and, where the forward takes it, ``logits_to_keep=1``, as
    ``generate`` passes them."""
    accepted = inspect.signature(lm.forward).parameters
    options = {"cache" if "cache" in accepted else "past_key_values": cache}
    if "logits_to_keep" in accepted:
        options["logits_to_keep"] = 1
    return options
