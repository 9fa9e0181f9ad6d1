"""`smolora export --check`: the smallest GGUF file that keeps what the fine-tune learned.

Each candidate type, largest to smallest, is exported (``smolora.export``), read back by
transformers' GGUF loader — which dequantizes exactly the weights the file holds — and scored on
held-out data: greedy exact match of each example's last reply (``smolora.evaluate``, batched) and
the loss over the reply tokens. The smallest file whose exact match is within ``tolerance`` points of
the unquantized model's is kept at the output path; the others are removed. Every candidate is
scored on the same token ids, from the model's own tokenizer.

The k-quants (q6_k, q5_k, q4_k) are not candidates: gguf-py reads them but cannot write them.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from smolora.errors import SmoLoRAError
from smolora.log import say

# Largest first (for a 135M Llama: 258, 138, 107, 105, 100, 94 and 88 MiB). q5_0_qv: q5_0 with attention's q
# and v kept at q8_0 (``export.MIXES``).
CANDIDATES = ("f16", "q8_0", "q5_1", "q5_0_qv", "q5_0", "q4_1", "q4_0")
TOLERANCE = 2.0  # exact-match points a smaller file may lose against the unquantized model


@dataclass
class Score:
    """One file (or the unquantized model, ``size`` None) scored on the held-out examples."""

    dtype: str
    size: int | None
    exact_match: float
    loss: float
    kept: bool = False  # within the tolerance

    def row(self) -> str:
        size = "(in memory)" if self.size is None else size_text(self.size)
        mark = "  within" if self.kept else ""
        return f"  {self.dtype:12s} {size:>11s} {self.exact_match:10.1f}% {self.loss:9.4f}{mark}"


def size_text(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB"


def check_tolerance(tolerance: float) -> float:
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise SmoLoRAError(f"--tolerance must be a number of points >= 0 (got {tolerance})")
    return tolerance


def check_examples(path: str | Path, tokenizer) -> list:
    """The held-out examples ``--check`` scores, tokenized as ``smolora eval`` tokenizes them; a one-line
    error for a file that is missing, unreadable, or has no prompt before its replies."""
    from smolora.config import DataConfig
    from smolora.data import check_records, load_source, prepare_data
    from smolora.evaluate import replies_to_score

    if not Path(path).is_file():
        raise SmoLoRAError(f"--check {path}: no such file (expected held-out records, e.g. prompt/completion JSONL)")
    data = DataConfig()
    records = load_source(str(path), data, mix=False)
    check_records(records, data)
    examples = prepare_data(records, tokenizer, data).train
    replies_to_score(examples)
    return examples


def smallest_that_keeps(
    model,
    tokenizer,
    examples: list,
    output: str | Path,
    *,
    tolerance: float = TOLERANCE,
    types: tuple[str, ...] = CANDIDATES,
    overwrite: bool = False,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    **export_options,
) -> tuple[Path, list[Score]]:
    """Export ``model`` as each of ``types``, score each file, and publish at ``output`` the smallest
    within ``tolerance`` exact-match points of ``model`` itself (with the Ollama Modelfile beside it).
    Returns the output and the scores (the unquantized model's first). ``export_options`` go to
    ``export_gguf`` (name, base, finetune). Nothing is written at ``output`` when no type keeps the skill.
    """
    from smolora.export import check_output, export_gguf
    from smolora.ollama import write_modelfile
    from smolora.paths import publish

    output = check_output(output, types[0], overwrite)
    check_tolerance(tolerance)
    scoring = dict(max_new_tokens=max_new_tokens, batch_size=batch_size)
    say(f"scoring the unquantized model on {len(examples)} held-out examples")
    reference = _score(model, tokenizer, examples, "unquantized", None, **scoring)
    scores = [reference]
    export_options.setdefault("finetune", export_options.get("name") or output.stem)  # as if written at output
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.stem}.check-") as tmp:
        for dtype in types:
            path = export_gguf(model, tokenizer, Path(tmp) / f"{dtype}.gguf", dtype, modelfile=False, **export_options)
            say(f"scoring the {dtype} file ({size_text(path.stat().st_size)})")
            scores.append(_score(_load_gguf(path), tokenizer, examples, dtype, path.stat().st_size, **scoring))
            scores[-1].kept = scores[-1].exact_match >= reference.exact_match - tolerance
        within = [s for s in scores[1:] if s.kept]
        print(table(scores, tolerance))
        if not within:
            raise SmoLoRAError(
                f"no type keeps exact match within {tolerance:g} points of the unquantized model's "
                f"{reference.exact_match:.1f}%; nothing written"
            )
        chosen = min(within, key=lambda s: s.size)
        publish(output, lambda tmp_file: os.replace(Path(tmp) / f"{chosen.dtype}.gguf", tmp_file), folder=False)
    write_modelfile(output, tokenizer)
    say(f"kept {chosen.dtype}: {output} ({size_text(chosen.size)}), the Ollama Modelfile beside it")
    return output, scores


def table(scores: list[Score], tolerance: float) -> str:
    """The scores as the table ``--check`` prints."""
    head = f"  {'type':12s} {'size':>11s} {'exact match':>11s} {'loss':>9s}"
    lines = [head, *(s.row() for s in scores)]
    lines.append(f"  (within: exact match no more than {tolerance:g} points below the unquantized model's)")
    return "\n".join(lines)


def _score(model, tokenizer, examples, dtype: str, size: int | None, **scoring) -> Score:
    from smolora.evaluate import evaluate

    result = evaluate(
        model,
        tokenizer,
        examples,
        exact_match=True,
        max_new_tokens=scoring["max_new_tokens"],
        generation_batch_size=scoring["batch_size"],
        progress=False,
    )
    return Score(dtype, size, result.exact_match, result.loss)


def _load_gguf(path: Path):
    """The model a GGUF file holds, dequantized to fp32 by transformers' GGUF loader."""
    from transformers import AutoModelForCausalLM

    from smolora.models import HUB_KERNELS_OFF

    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, **HUB_KERNELS_OFF
    )
    return model.eval()
