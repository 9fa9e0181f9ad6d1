"""A fine-tune against its base on the same data: loss, perplexity and exact match side by side,
and a few replies of each to the same prompts. The numbers are ``smolora.evaluate.evaluate``'s."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from smolora.data.formats import Example
from smolora.errors import SmoLoRAError
from smolora.evaluate import EvalResult, evaluate, last_reply


@dataclass
class Comparison:
    base: EvalResult
    tuned: EvalResult
    samples: list[dict] = field(default_factory=list)  # {"prompt", "expected", "base", "fine_tuned"}

    def table(self) -> str:
        b, t = self.base, self.tuned
        rows = [
            ("loss", f"{b.loss:.4f}", f"{t.loss:.4f}", f"{t.loss - b.loss:+.4f}"),
            ("perplexity", f"{b.perplexity:.3f}", f"{t.perplexity:.3f}", f"x{t.perplexity / b.perplexity:.3g}"),
        ]
        if b.exact_match is not None and t.exact_match is not None:
            change = f"{t.exact_match - b.exact_match:+.1f} points"
            rows.append(("exact match", f"{b.exact_match:.1f}%", f"{t.exact_match:.1f}%", change))
        lines = [f"{b.examples} examples, {b.supervised_tokens} supervised tokens"]
        lines += [f"{'':<12} {'base':>12} {'fine-tuned':>12}  change"]
        lines += [f"{name:<12} {x:>12} {y:>12}  {d}" for name, x, y, d in rows]
        for i, s in enumerate(self.samples, 1):
            lines.append(f"example {i}: {_short(s['prompt'], 100)}")
            lines += [f"  expected:   {_short(s['expected'])}", f"  base:       {_short(s['base'])}"]
            lines.append(f"  fine-tuned: {_short(s['fine_tuned'])}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"base": self.base.to_dict(), "fine_tuned": self.tuned.to_dict(), "samples": self.samples}


def _short(text: str, width: int = 80) -> str:
    text = repr(text)[1:-1]  # one line: line breaks shown as \n
    return text if len(text) <= width else "..." + text[-(width - 3) :]


def sample_pairs(examples: list[Example], count: int) -> list[tuple[list[int], list[int]]]:
    """The first ``count`` examples that have a prompt before their last reply: (prompt, reply) ids."""
    return [pair for pair in map(last_reply, examples) if pair is not None][:count]


def measure(model, tokenizer, examples, pairs, exact_match: bool, max_new_tokens: int, **options):
    """One model's numbers on ``examples`` and its greedy replies to the sample prompts."""
    import torch

    from smolora.generate import generate

    result = evaluate(model, tokenizer, examples, exact_match=exact_match, max_new_tokens=max_new_tokens, **options)
    device = next(model.parameters()).device
    replies = [
        generate(model, tokenizer, torch.tensor([prompt], device=device), max_new_tokens, do_sample=False)
        for prompt, _ in pairs
    ]
    return result, replies


def comparison(base_run, tuned_run, tokenizer, pairs) -> Comparison:
    """``base_run``/``tuned_run``: ``measure``'s (result, replies) of each model."""
    samples = [
        {
            "prompt": tokenizer.decode(prompt, skip_special_tokens=True).strip(),
            "expected": tokenizer.decode(reply, skip_special_tokens=True).strip(),
            "base": base_reply,
            "fine_tuned": tuned_reply,
        }
        for (prompt, reply), base_reply, tuned_reply in zip(pairs, base_run[1], tuned_run[1])
    ]
    return Comparison(base_run[0], tuned_run[0], samples)


def base_of(model: str | None, adapter: str | None, base: str | None) -> str | None:
    """The base a fine-tune is compared with: ``--base``; with ``--adapter``, ``--model`` or the base
    the adapter names; for a run's ``final_merged`` folder, the base its ``adapter_checkpoint`` names."""
    from smolora.merge import RUN_FILE, adapter_base_reference

    if base is not None:
        return base
    if adapter is not None:
        return model if model is not None else adapter_base_reference(adapter)
    sibling = Path(model).parent / "adapter_checkpoint" if model else None
    if sibling is not None and (sibling / RUN_FILE).is_file():
        return adapter_base_reference(sibling)
    raise SmoLoRAError(
        "--compare-base: which base? pass --adapter (its base is known), or --base MODEL with a merged --model"
    )
