"""Generation speed with the adapter unmerged vs merged, and the time to merge, on the embedded model.

    python benchmarks/bench_generate.py

Builds a non-zero LoRA adapter (the spec's q/v r=8 and the `all` preset r=16), saves it, times
`merge_adapter` (load base, merge, save) with the model cache warm, then greedy-generates the same
prompts with base+adapter unmerged (PEFT) and with the merged model. Prints tokens/s and ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a prime number is.",
    "List three uses of copper.",
    "Describe a cat to someone who has never seen one.",
]


def make_adapter(folder: Path, targets: list[str], r: int) -> None:
    from peft import LoraConfig

    from smolora.lora import add_lora
    from smolora.models import load_model, resolve_model

    model = add_lora(
        load_model(resolve_model(None)),
        LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, task_type="CAUSAL_LM"),
        warn=lambda *_: None,
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    model.save_pretrained(folder)


def generation_speed(model, tokenizer, new_tokens: int, fold: bool = True) -> float:
    """Greedy decoding through smolora's generation path (``fold=False``: PEFT's plain unmerged forward)."""
    import contextlib

    from smolora.generate import folded_adapter, prompt_ids

    model.eval()
    total, seconds = 0, 0.0
    for prompt in PROMPTS:
        ids = prompt_ids(tokenizer, prompt)
        with torch.no_grad():
            t = time.perf_counter()
            with folded_adapter(model) if fold else contextlib.nullcontext():
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
            seconds += time.perf_counter() - t
        total += out.shape[1] - ids.shape[1]
    return total / seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the measurements to this JSON file")
    args = ap.parse_args()

    from smolora.merge import load_adapter, merge_adapter
    from smolora.models import load_model, load_tokenizer, resolve_model

    source = resolve_model(None)  # warms the cache (converts the GGUF once)
    tokenizer = load_tokenizer(source)
    report = {}
    for name, targets, r in [
        ("qv-r8", ["q_proj", "v_proj"], 8),
        ("all-r16", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 16),
    ]:
        with tempfile.TemporaryDirectory() as tmp:
            adapter, merged_dir = Path(tmp) / "adapter", Path(tmp) / "merged"
            make_adapter(adapter, targets, r)
            merge_times = []
            for _ in range(args.reps):
                t = time.perf_counter()
                merge_adapter(adapter, merged_dir, overwrite=True)
                merge_times.append(time.perf_counter() - t)
            unmerged = load_adapter(load_model(source), adapter)
            merged = load_model(resolve_model(str(merged_dir)))
            speeds = {"unmerged": [], "merged": [], "unmerged_peft_plain": []}
            for _ in range(args.reps):
                speeds["unmerged"].append(generation_speed(unmerged, tokenizer, args.new_tokens))
                speeds["merged"].append(generation_speed(merged, tokenizer, args.new_tokens))
                speeds["unmerged_peft_plain"].append(generation_speed(unmerged, tokenizer, args.new_tokens, fold=False))
        med = {k: statistics.median(v) for k, v in speeds.items()}
        report[name] = {
            "merge_seconds": statistics.median(merge_times),
            "tokens_per_s": med,
            "unmerged_over_merged": med["unmerged"] / med["merged"],
        }
        print(
            f"{name}: merge (load base, merge, save) {report[name]['merge_seconds']:.2f} s; generation tokens/s "
            f"merged {med['merged']:.1f}, unmerged {med['unmerged']:.1f} "
            f"(unmerged/merged = {med['unmerged'] / med['merged']:.3f}); "
            f"PEFT's plain unmerged forward {med['unmerged_peft_plain']:.1f}",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
