"""`smolora chat` in a real subprocess fed by a pipe: two adapters on one base, switched with
/adapter, each answering as it does when loaded alone; /compare, /save, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import build_tiny_llama, build_tokenizer

ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
PROMPT = "hello there, what is 2 plus 2?"
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny base on disk and two adapters with distinct random weights (B nonzero: each changes the model)."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("chat")
    tokenizer = build_tokenizer()
    build_tiny_llama(len(tokenizer)).save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    for seed, name in [(107, "ada"), (109, "bob")]:  # seeds whose replies decode to distinct text
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
        model = get_peft_model(build_tiny_llama(len(tokenizer)), config)
        torch.manual_seed(seed)
        with torch.no_grad():
            for n, w in model.named_parameters():
                if "lora_" in n:
                    w.normal_(0, 0.5)
        model.save_pretrained(root / name)
    return root, tokenizer


def alone(root, tokenizer, adapter: str | None) -> str:
    """The greedy reply of the base with ``adapter`` alone attached (None: the base as it is)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from smolora.generate import generate

    model = AutoModelForCausalLM.from_pretrained(root / "tiny").eval()
    if adapter:
        model = PeftModel.from_pretrained(model, str(root / adapter)).eval()
    messages = [{"role": "user", "content": PROMPT}]
    return generate(model, tokenizer, messages, max_new_tokens=NEW_TOKENS, do_sample=False)


def test_switching_adapters_answers_as_each_alone(setup, tmp_path):
    root, tokenizer = setup
    expected = {name: alone(root, tokenizer, None if name == "base" else name) for name in ("ada", "bob", "base")}
    assert len(set(expected.values())) == 3  # three different models, or the test proves nothing
    script = [
        PROMPT,
        "/adapter bob",
        "/reset",
        PROMPT,
        "/adapter base",
        "/reset",
        PROMPT,
        "/compare",
        "/adapter nobody",
        f"/save {tmp_path / 'talk.json'}",
        f"/save {tmp_path / 'talk.jsonl'}",
    ]
    r = subprocess.run(
        [sys.executable, "-m", "smolora.cli", "chat", "--model", root / "tiny", "--adapter", f"ada={root / 'ada'}",
         "--adapter", f"bob={root / 'bob'}", "--greedy", "--max-new-tokens", str(NEW_TOKENS)],
        input="\n".join(script) + "\n", capture_output=True, text=True, timeout=300, env=ENV,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "adapters loaded: ada, bob" in r.stdout and "no adapter 'nobody'; loaded: ada, bob, base" in r.stdout
    talk = json.loads((tmp_path / "talk.json").read_text())["messages"]
    replies = [(m["model"], m["content"], m.get("compare", False)) for m in talk if m["role"] == "assistant"]
    assert replies == [
        ("ada", expected["ada"], False),
        ("bob", expected["bob"], False),
        ("base", expected["base"], False),
        *[(name, expected[name], True) for name in ("ada", "bob", "base")],  # /compare: every model, same prompt
    ]
    assert [m["content"] for m in talk if m["role"] == "user"] == [PROMPT] * 3
    lines = [json.loads(line) for line in (tmp_path / "talk.jsonl").read_text().splitlines()]
    assert lines == talk
    assert r.stdout.count("ada> ") == 2 and r.stdout.count("base> ") == 2  # a label before each streamed reply


def test_the_system_prompt_and_reset_shape_the_conversation(setup, monkeypatch, capsys):
    import io

    from transformers import AutoModelForCausalLM

    from smolora.chat import chat_repl, open_chat

    root, tokenizer = setup
    model = AutoModelForCausalLM.from_pretrained(root / "tiny").eval()
    chat = open_chat(model, tokenizer, {}, {"max_new_tokens": 2, "do_sample": False})
    too_long = "the quick brown fox " * 100  # beyond the tiny model's 256 positions: refused, one warning
    script = f"/system be brief\none\ntwo\n/reset\nthree\n{too_long}\n/quit\nfour\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    chat_repl(chat)
    replies = [m["content"] for m in chat.transcript if m["role"] == "assistant"]
    assert [m["content"] for m in chat.transcript if m["role"] == "user"] == ["one", "two", "three"]  # /quit ends it
    assert chat.messages() == [  # after /reset: the system prompt and the last turn only (the refused one left none)
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "three"},
        {"role": "assistant", "content": replies[2]},
    ]
    out = capsys.readouterr().out
    assert "system prompt set" in out and "history cleared" in out and out.count("model> ") == 4
    assert "model> \n[smolora] warning: the prompt (" in out and "fills the model's context (256 tokens)" in out


def test_bad_adapters_are_one_line(setup, tmp_path, capsys):
    from smolora.cli import main

    root, _ = setup
    for args, expected in [
        (["--adapter", f"a={tmp_path}"], "not an adapter folder"),
        (["--adapter", f"a={root / 'ada'}", "--adapter", f"a={root / 'bob'}"], "the name 'a' is given twice"),
        (["--adapter", f"base={root / 'ada'}"], "the name must be a word other than 'base'"),
    ]:
        assert main(["chat", "--model", str(root / "tiny"), *args]) == 2
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1, err
