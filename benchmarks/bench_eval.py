"""Greedy generation speed, SmoLoRA against llama.cpp, on the same model and the same prompts.

    python benchmarks/bench_eval.py                       # the embedded model, 32 held-out demo dates
    python benchmarks/bench_eval.py --model DIR --data held_out.jsonl --examples 64

The prompts are the ones ``smolora eval --exact-match`` generates from (each example's last reply
prompted with everything before it). Timed, interleaved repetition by repetition so that a busy
machine's load falls on every side alike, with the model loaded beforehand:

  smolora_generate   ``smolora.generate.generate`` per prompt (transformers' generate), what
                     ``smolora generate`` and exact match one at a time ran
  smolora_1          ``smolora.evaluate.greedy_replies`` with batches of one
  smolora_batched    the same, ``--batch-size`` prompts at a time (``smolora eval --exact-match``)
  llamacpp_1         llama.cpp (node-llama-cpp's prebuilt CPU build) on the model's f16 GGUF export,
                     one sequence
  llamacpp_parallel  the same, ``--batch-size`` sequences generating at once

Each side counts the tokens it generated (with the stop token) over the wall time of all prompts,
prompt evaluation included. Prints tokens/s (median of ``--reps``), the ratios to llama.cpp, and
whether the generated ids agree. Every side runs ``--threads`` threads (default 1: on a shared
machine, more threads per process than free cores is slower, not faster). llama.cpp is installed
with ``NODE_LLAMA_CPP_SKIP_DOWNLOAD=true npm install node-llama-cpp@3.22.1`` into ``--llamacpp``
(default ``.llamacpp/``, git-ignored) when it is not there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
NODE_SCRIPT = Path(__file__).resolve().parent / "llamacpp_generate.mjs"
NODE_LLAMA_CPP = "node-llama-cpp@3.22.1"


def install_llamacpp(folder: Path) -> Path:
    """node-llama-cpp (prebuilt llama.cpp binaries, no build) in ``folder``, installed once."""
    if (folder / "node_modules" / "node-llama-cpp" / "package.json").is_file():
        return folder
    if shutil.which("npm") is None:
        sys.exit("bench_eval: npm is not installed; llama.cpp's side needs node and npm")
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "NODE_LLAMA_CPP_SKIP_DOWNLOAD": "true"}
    subprocess.run(["npm", "install", "--no-audit", "--no-fund", NODE_LLAMA_CPP], cwd=folder, env=env, check=True)
    return folder


def eval_prompts(model_source, tokenizer, data: str | None, count: int) -> list[list[int]]:
    """The prompt ids ``smolora eval --exact-match`` generates from, for ``count`` records of
    ``data`` (default: held-out dates of the demo's task)."""
    from smolora.config import DataConfig
    from smolora.data import load_source, prepare_data
    from smolora.demo import make_examples
    from smolora.evaluate import last_reply

    if data is None:
        records = make_examples(count, seed=1)
    else:
        records = load_source(data, DataConfig(), mix=False)[:count]
    examples = prepare_data(records, tokenizer, DataConfig()).train
    return [pair[0] for pair in map(last_reply, examples) if pair is not None]


def timed(run) -> tuple[list[list[int]], float]:
    start = time.perf_counter()
    generated = run()
    return generated, time.perf_counter() - start


def smolora_sides(model, tokenizer, prompts: list[list[int]], max_new: int, batch_size: int) -> dict:
    from smolora.evaluate import greedy_replies
    from smolora.generate import generate, stop_token_ids

    def one_by_one() -> list[list[int]]:
        # generate() returns text: its ids again, and the stop token it drops where it stopped early
        texts = [generate(model, tokenizer, torch.tensor([p]), max_new, do_sample=False) for p in prompts]
        ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
        return [i + [stop] if len(i) < max_new else i for i in ids]

    stop = stop_token_ids(tokenizer, model)[0]

    return {
        "smolora_generate": one_by_one,
        "smolora_1": lambda: greedy_replies(model, tokenizer, prompts, max_new, batch_size=1),
        "smolora_batched": lambda: greedy_replies(model, tokenizer, prompts, max_new, batch_size=batch_size),
    }


def llamacpp_side(folder: Path, gguf: Path, prompts: list[list[int]], max_new: int, threads: int, parallel: int):
    request = {
        "llamacpp": str(folder.resolve()),
        "model": str(gguf),
        "prompts": prompts,
        "max_tokens": max_new,
        "threads": threads,
        "parallel": parallel,
    }

    def run() -> tuple[list[list[int]], float]:
        done = subprocess.run(
            ["node", str(NODE_SCRIPT)], input=json.dumps(request), capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            sys.exit(f"bench_eval: llama.cpp failed: {done.stderr[-2000:]}")
        answer = json.loads(done.stdout.strip().splitlines()[-1])
        return answer["generated"], answer["seconds"]

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a model folder (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--data", default=None, help="held-out records (default: the demo's task, held-out dates)")
    ap.add_argument("--examples", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--llamacpp", default=str(ROOT / ".llamacpp"), help="where node-llama-cpp is (or goes)")
    ap.add_argument("--sides", default="smolora_generate,smolora_1,smolora_batched,llamacpp_1,llamacpp_parallel")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the measurements to this JSON file")
    args = ap.parse_args()

    from smolora.export import export_gguf
    from smolora.models import load_model, load_tokenizer, resolve_model

    torch.set_num_threads(args.threads)
    folder = install_llamacpp(Path(args.llamacpp))
    source = resolve_model(args.model)
    tokenizer = load_tokenizer(source)
    model = load_model(source).eval()
    prompts = eval_prompts(source, tokenizer, args.data, args.examples)
    wanted = args.sides.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        gguf = export_gguf(model, tokenizer, Path(tmp) / "model-f16.gguf", "f16")
        sides = smolora_sides(model, tokenizer, prompts, args.max_new_tokens, args.batch_size)
        sides = {name: (lambda run=run: timed(run)) for name, run in sides.items()}
        for name, parallel in (("llamacpp_1", 1), ("llamacpp_parallel", args.batch_size)):
            sides[name] = llamacpp_side(folder, gguf, prompts, args.max_new_tokens, args.threads, parallel)
        sides = {name: run for name, run in sides.items() if name in wanted}
        speeds: dict[str, list[float]] = {name: [] for name in sides}
        outputs: dict[str, list[list[int]]] = {}
        for rep in range(args.reps):
            for name, run in sides.items():
                generated, seconds = run()
                outputs[name] = generated
                speeds[name].append(sum(map(len, generated)) / seconds)
            print(
                f"rep {rep + 1}: " + ", ".join(f"{n} {s[-1]:.1f}" for n, s in speeds.items()) + " tokens/s", flush=True
            )
    report(speeds, outputs, prompts, args)


def report(speeds: dict, outputs: dict, prompts: list, args) -> None:
    median = {name: statistics.median(values) for name, values in speeds.items()}
    print(
        f"\n{len(prompts)} prompts, up to {args.max_new_tokens} new tokens, {args.threads} thread(s), "
        f"batch {args.batch_size}; tokens/s, median of {args.reps}:"
    )
    for name, value in median.items():
        print(f"  {name:18s} {value:8.1f}   ({', '.join(f'{v:.1f}' for v in speeds[name])})")
    for ours in ("smolora_generate", "smolora_1", "smolora_batched"):
        for theirs in ("llamacpp_1", "llamacpp_parallel"):
            if ours in median and theirs in median:
                print(f"  {ours} / {theirs} = {median[ours] / median[theirs]:.2f}")
    if "smolora_1" in outputs and "smolora_batched" in outputs:
        same = sum(a == b for a, b in zip(outputs["smolora_1"], outputs["smolora_batched"]))
        print(f"  batched ids == one-at-a-time ids: {same} of {len(prompts)}")
    for theirs in ("llamacpp_1", "llamacpp_parallel"):
        if "smolora_1" in outputs and theirs in outputs:
            same = sum(a == b for a, b in zip(outputs["smolora_1"], outputs[theirs]))
            print(f"  {theirs} ids (f16 file) == smolora's (fp32): {same} of {len(prompts)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"tokens_per_s": median, "runs": speeds, "args": vars(args)}, indent=1))


if __name__ == "__main__":
    main()
