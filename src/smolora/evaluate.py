"""Evaluate a model on held-out data: the mean loss and perplexity over the tokens training learns
(the replies, with their end-of-turn token), and, if asked, greedy exact match of each example's
last reply given everything before it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from smolora.data.formats import IGNORE, Example
from smolora.errors import SmoLoRAError


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
    progress: bool = True,
    weight_codes: bool = True,
    fast: bool = True,
) -> EvalResult:
    """Loss over ``examples``' supervised tokens; with ``exact_match``, also generate each last reply
    greedily and compare it with the reference (whitespace at either end ignored). ``weight_codes``:
    the loss from the frozen weights' GGUF codes where the model has them (``smolora.fast.codes``);
    ``fast``: through the speed wing (``smolora.fast``), else the libraries' own path."""
    from smolora.fast import accelerated
    from smolora.loss import evaluate_loss

    hits = _exact_matches(model, tokenizer, examples, max_new_tokens, progress) if exact_match else None

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


def _exact_matches(model, tokenizer, examples: list[Example], max_new_tokens: int, progress: bool) -> list[bool | None]:
    """Per example: whether its last reply, generated greedily, matches (None: nothing to prompt with)."""
    from smolora.generate import generate
    from smolora.monitor import progress as shown

    replies_to_score(examples)  # an error if there are none
    device = next(model.parameters()).device
    hits: list[bool | None] = []
    for example in shown(examples, "[smolora] exact match", "example") if progress else examples:
        pair = last_reply(example)
        if pair is None:
            hits.append(None)
            continue
        prompt, reply = pair
        out = generate(
            model, tokenizer, torch.tensor([prompt], device=device), max_new_tokens=max_new_tokens, do_sample=False
        )
        hits.append(out.strip() == tokenizer.decode(reply, skip_special_tokens=True).strip())
    return hits
