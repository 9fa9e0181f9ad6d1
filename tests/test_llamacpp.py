"""SmoLoRA's GGUF files in a real llama.cpp: node-llama-cpp's prebuilt CPU build, driven by
tests/llamacpp/probe.mjs (one node process per module). `make test` installs it into .llamacpp/;
run alone, these tests install it there too, and skip only where node or npm is missing.

What must hold: an export loads without warnings the llama.cpp-converted original does not give;
llama.cpp tokenizes and renders the chat template as transformers does; greedy generation of an
f32/f16 export, and of a base file with a LoRA adapter file, is transformers' on the merged model.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import build_tiny, build_tiny_llama
from smolora.export import export_gguf, export_lora_gguf

ROOT = Path(__file__).resolve().parents[1]
LLAMACPP_DIR = Path(os.environ.get("SMOLORA_LLAMACPP_DIR", ROOT / ".llamacpp"))
PACKAGE = "node-llama-cpp@3.22.1"
PROBE = ROOT / "tests" / "llamacpp" / "probe.mjs"
STRINGS = [
    "Hello, world!",
    "  two  spaces,\ttab\nnewline   ",
    "naïve café, Zürich — 東京 and Москва",
    "emoji: 😀👍🏽 🇫🇷 ✨",
    "def add(a, b):\n    return a + b  # sum\n",
    "digits 1234567890 3.14159 2021-03-05 1e-9 $12,000",
    "<|im_start|>user\nnot special here<|im_end|>",
]
PROMPTS = ["def add(a, b):", "The capital of France is", "2021-03-05 means", "Once upon a time"]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Rewrite 5 March 2021 as ISO."}],
    [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "und 3+3? 😀"},
    ],
]


def installed() -> bool:
    return (LLAMACPP_DIR / "node_modules" / "node-llama-cpp" / "package.json").is_file()


def install_node_llama_cpp() -> None:
    """As `make llamacpp` does: node-llama-cpp's prebuilt CPU binaries, nothing built, into LLAMACPP_DIR."""
    if installed():
        return
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed: these tests run llama.cpp through the npm package node-llama-cpp")
    LLAMACPP_DIR.mkdir(parents=True, exist_ok=True)
    if not (LLAMACPP_DIR / "package.json").exists():
        (LLAMACPP_DIR / "package.json").write_text('{"private": true}\n')
    done = subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund", "--prefix", str(LLAMACPP_DIR), PACKAGE],
        env={**os.environ, "NODE_LLAMA_CPP_SKIP_DOWNLOAD": "true"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0 and installed(), f"npm install {PACKAGE} failed: {done.stderr[-2000:]}"


class LlamaCpp:
    """One node process running probe.mjs: ask() sends a request line and reads the answer line."""

    def __init__(self):
        env = {**os.environ, "SMOLORA_LLAMACPP_DIR": str(LLAMACPP_DIR), "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(
            ["node", str(PROBE)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )

    def ask(self, timeout: float = 120, **request) -> dict:
        self.process.stdin.write(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in request.items()}))
        self.process.stdin.write("\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if ready else ""
        if not line:
            self.process.kill()
            raise AssertionError(f"llama.cpp probe gave no answer: {self.process.stderr.read()[-2000:]}")
        answer = json.loads(line)
        assert "error" not in answer, answer["error"]
        return answer

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def llamacpp():
    install_node_llama_cpp()
    probe = LlamaCpp()
    yield probe
    probe.close()


@pytest.fixture(scope="module")
def embedded():
    """The embedded model's GGUF (made by llama.cpp's converter) and its tokenizer, as transformers reads it."""
    from smolora.models import embedded_gguf_path, load_tokenizer, resolve_model

    return embedded_gguf_path(), load_tokenizer(resolve_model(None))


def tiny_with_lora(vocab_size: int, seed: int = 0, rslora: bool = False, arch: str = "llama"):
    """A tiny random Llama (weights x4, so that greedy choices are rarely near-ties) and a LoRA on
    every projection with random B: (a copy of the base without adapters, the peft model)."""
    import copy

    from smolora.config import LoraSettings
    from smolora.lora import add_lora

    base = build_tiny(arch, vocab_size, seed=seed)
    with torch.no_grad():
        for p in base.parameters():
            if p.ndim == 2:
                p.mul_(4)
    plain = copy.deepcopy(base)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]
    settings = LoraSettings(r=4, lora_alpha=8, target_modules=targets, use_rslora=rslora)
    peft_model = add_lora(base, settings.to_peft())
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return plain, peft_model


def greedy(model, ids: list[int], max_new_tokens: int = 12) -> tuple[list[int], list[float]]:
    """transformers' greedy continuation (eos dropped, as llama.cpp's stop drops it) and the gap between the
    best and second-best logit at each step."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=2,
        )
    tokens = out.sequences[0, len(ids) :].tolist()
    gaps = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
    if tokens and tokens[-1] == model.generation_config.eos_token_id:
        tokens = tokens[:-1]
    return tokens, gaps


def assert_same_greedy(expected: tuple[list[int], list[float]], got: list[int], tie: float) -> int:
    """llama.cpp's tokens equal transformers'; where they part, transformers' choice there was a near-tie
    (its two best logits within ``tie``: rounding may pick either). Returns the tokens compared."""
    tokens, gaps = expected
    for i, (want, have) in enumerate(zip(tokens, got, strict=False)):
        if want != have:
            assert gaps[i] < tie, f"step {i}: llama.cpp chose {have}, transformers {want} (logit gap {gaps[i]:.4f})"
            return i
    assert len(got) == len(tokens), f"llama.cpp gave {len(got)} tokens, transformers {len(tokens)}"
    return len(tokens)


def test_exports_load_without_warnings_the_converters_file_does_not_give(tmp_path, llamacpp, embedded):
    baseline_path, tokenizer = embedded
    baseline = set(llamacpp.ask(model=baseline_path, tokenize=["x"])["warnings"])
    model = build_tiny_llama(len(tokenizer))
    for dtype in ("f32", "f16", "q8_0", "q4_0"):
        path = export_gguf(model, tokenizer, tmp_path / f"m-{dtype}.gguf", dtype)
        answer = llamacpp.ask(model=path, tokenize=["x"], generate=[{"ids": [1, 2, 3], "max_tokens": 2}])
        assert set(answer["warnings"]) <= baseline, f"{dtype}: {set(answer['warnings']) - baseline}"
        assert len(answer["generated"][0]) <= 2


def test_llama_cpp_tokenizes_as_transformers_and_as_the_converters_file(tmp_path, llamacpp, embedded):
    baseline_path, tokenizer = embedded
    path = export_gguf(build_tiny_llama(len(tokenizer)), tokenizer, tmp_path / "m.gguf", "f16")
    ours = llamacpp.ask(model=path, tokenize=STRINGS)["tokens"]
    theirs = llamacpp.ask(model=baseline_path, tokenize=STRINGS)["tokens"]
    expected = [tokenizer(s, add_special_tokens=False).input_ids for s in STRINGS]
    assert ours == expected
    assert theirs == expected


def test_the_chat_template_llama_cpp_applies_is_the_one_training_used(tmp_path, llamacpp, embedded):
    _, tokenizer = embedded
    path = export_gguf(build_tiny_llama(len(tokenizer)), tokenizer, tmp_path / "m.gguf", "q8_0")
    chats = [{"messages": c, "add_generation_prompt": True} for c in CONVERSATIONS]
    answer = llamacpp.ask(model=path, chat=chats)
    assert answer["chat_template"] == tokenizer.chat_template
    for conversation, text, ids in zip(CONVERSATIONS, answer["chat"], answer["chat_tokens"], strict=True):
        assert text == tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        expected = tokenizer.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True)
        assert ids == list(expected["input_ids"] if hasattr(expected, "keys") else expected)


@pytest.mark.parametrize(
    ("arch", "dtype", "tie"),
    [("llama", "f32", 1e-3), ("llama", "f16", 0.05), ("qwen2", "f32", 1e-3), ("qwen3", "f16", 0.05)],
)
def test_greedy_generation_of_an_export_is_transformers_on_the_merged_model(
    tmp_path, llamacpp, embedded, arch, dtype, tie
):
    from smolora.merge import merge_and_unload

    _, tokenizer = embedded
    merged = merge_and_unload(tiny_with_lora(len(tokenizer), arch=arch)[1])
    path = export_gguf(merged, tokenizer, tmp_path / "m.gguf", dtype)
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    answer = llamacpp.ask(model=path, generate=[{"ids": ids, "max_tokens": 12} for ids in prompts])
    compared = [assert_same_greedy(greedy(merged, ids), got, tie) for ids, got in zip(prompts, answer["generated"])]
    assert sum(compared) >= 0.75 * 12 * len(PROMPTS), compared  # near-ties are rare, not the rule


@pytest.mark.parametrize(
    ("arch", "dtype", "tie", "rslora"),
    [
        ("llama", "f32", 1e-3, False),
        ("llama", "f16", 0.05, False),
        ("llama", "f32", 1e-3, True),
        ("qwen2", "f16", 0.05, False),
    ],
)
def test_a_lora_gguf_on_its_base_generates_what_the_merged_model_does(
    tmp_path, llamacpp, embedded, arch, dtype, tie, rslora
):
    from smolora.merge import merge_and_unload

    _, tokenizer = embedded
    base, peft_model = tiny_with_lora(len(tokenizer), rslora=rslora, arch=arch)
    peft_model.save_pretrained(tmp_path / "adapter")
    base_path = export_gguf(base, tokenizer, tmp_path / "base.gguf", dtype)
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    base_greedy = [greedy(base, ids)[0] for ids in prompts]
    lora_path = export_lora_gguf(tmp_path / "adapter", base.config, tmp_path / "a.gguf", dtype)
    merged = merge_and_unload(peft_model)
    expected = [greedy(merged, ids) for ids in prompts]
    assert [e[0] for e in expected] != base_greedy  # the adapter changes what is generated

    answer = llamacpp.ask(model=base_path, lora=lora_path, generate=[{"ids": ids, "max_tokens": 12} for ids in prompts])
    assert set(answer["warnings"]) == set()
    compared = [assert_same_greedy(e, got, tie) for e, got in zip(expected, answer["generated"])]
    assert sum(compared) >= 0.75 * 12 * len(PROMPTS), compared
    assert lora_path.stat().st_size < base_path.stat().st_size / 4


@pytest.mark.slow
def test_the_demos_fine_tune_scores_the_same_through_llama_cpp_at_f16(tmp_path, llamacpp, embedded):
    """A short date-task fine-tune of the embedded model: exact match through llama.cpp (the merged f16 file,
    and the f16 base with the f16 adapter file) equals exact match through transformers, reply for reply."""
    from smolora.demo import exact_match, run_demo
    from smolora.generate import prompt_ids
    from smolora.models import load_model, load_tokenizer, resolve_model

    baseline_path, _ = embedded
    baseline = set(llamacpp.ask(model=baseline_path, tokenize=["x"])["warnings"])
    summary = run_demo(str(tmp_path / "demo"), train_size=300, eval_size=24, max_steps=40)
    held_out = [json.loads(line) for line in Path(summary["eval_data"]).read_text().splitlines()]
    merged_source = resolve_model(summary["merged_model"])
    tokenizer = load_tokenizer(merged_source)
    merged = load_model(merged_source, "cpu").eval()
    score, replies = exact_match(merged, tokenizer, held_out)
    assert score > 50, score  # the fine-tune learned the task: a score worth comparing

    merged_path = export_gguf(merged, tokenizer, tmp_path / "dates.gguf", "f16", base=baseline_path)
    base_path = export_gguf(load_model(resolve_model(None), "cpu"), tokenizer, tmp_path / "base.gguf", "f16")
    lora_path = export_lora_gguf(summary["adapter"], merged.config, tmp_path / "dates.lora.gguf", "f16")
    requests = [{"ids": prompt_ids(tokenizer, r["prompt"])[0].tolist(), "max_tokens": 16} for r in held_out]
    for model, lora in ((merged_path, None), (base_path, lora_path)):
        answer = llamacpp.ask(model=model, lora=lora, generate=requests, timeout=900)
        assert set(answer["warnings"]) <= baseline, set(answer["warnings"]) - baseline
        hits = sum(t.strip() == r["completion"] for t, r in zip(answer["text"], held_out, strict=True))
        assert 100.0 * hits / len(held_out) == score, (model.name, answer["text"], replies)
        same = sum(t.strip() == o.strip() for t, o in zip(answer["text"], replies))
        assert same >= len(replies) - 1, (model.name, answer["text"], replies)  # a near-tie may part one reply
    # The adapter on the very file training started from (the embedded Q4_1 GGUF, what its Modelfile names):
    # 4-bit matrices with 8-bit activations, so close to the score, not necessarily equal
    answer = llamacpp.ask(model=baseline_path, lora=lora_path, generate=requests, timeout=900)
    assert set(answer["warnings"]) <= baseline, set(answer["warnings"]) - baseline
    hits = sum(t.strip() == r["completion"] for t, r in zip(answer["text"], held_out, strict=True))
    assert hits >= score * len(held_out) / 100 - 2, (answer["text"], replies)
