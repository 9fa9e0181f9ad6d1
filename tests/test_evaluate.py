"""Evaluation: loss over the reply tokens, greedy exact match of the last reply; the CLI around it."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import build_tiny_llama
from smolora.data.formats import FormatOptions, encode_record, encode_records
from smolora.evaluate import evaluate, last_reply
from smolora.fast import accelerated
from smolora.generate import generate
from smolora.loss import evaluate_loss
from test_cli import smolora


def test_last_reply_is_the_last_supervised_run_and_all_before_it(tokenizer):
    chat = {
        "messages": [
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": "first"},
            {"role": "user", "content": "two"},
            {"role": "assistant", "content": "second"},
        ]
    }
    ex = encode_record(chat, tokenizer, FormatOptions())
    prompt, reply = last_reply(ex)
    assert tokenizer.decode(reply) == "second<|im_end|>"
    assert tokenizer.decode(prompt).endswith(
        "first<|im_end|>\n<|im_start|>user\ntwo<|im_end|>\n<|im_start|>assistant\n"
    )
    assert prompt + reply == ex.input_ids[: len(prompt) + len(reply)]
    assert last_reply(encode_record({"text": "plain text all supervised"}, tokenizer, FormatOptions())) is None


def test_loss_is_the_training_validation_loss_and_exact_match_compares_greedy_replies(tokenizer):
    model = build_tiny_llama(len(tokenizer), seed=3)
    blank = [i for i in range(len(tokenizer)) if not tokenizer.decode([i], skip_special_tokens=True).strip()]
    with torch.no_grad():  # tied: logits 0 for special and whitespace tokens, below the best of ~300 random ones
        model.get_input_embeddings().weight[blank] = 0
    prompts = ["what is 1 plus 1?", "hello world", "the quick brown fox", "rewrite the date"]
    replies = [generate(model, tokenizer, p, max_new_tokens=4, do_sample=False) for p in prompts]
    assert all(replies), replies  # the tiny model says something to each
    records = [{"prompt": p, "completion": r} for p, r in zip(prompts, replies)]
    records[1]["completion"] = replies[1] + " and more"  # one wrong reference
    examples, _ = encode_records(records, tokenizer, FormatOptions())
    result = evaluate(model, tokenizer, examples, exact_match=True, max_new_tokens=4, progress=False)
    with accelerated(model, training=False) as speed:  # the loss training's validation computes
        assert result.loss == evaluate_loss(model, examples, 8, pad_id=tokenizer.pad_token_id, loss_sum=speed.loss_sum)
    assert result.perplexity == pytest.approx(math.exp(result.loss))
    assert result.supervised_tokens == sum(e.num_supervised for e in examples)
    assert (result.matched, result.scored, result.exact_match) == (3, 4, 75.0)
    assert "exact match 75.0% (3 of 4 last replies, greedy)" in result.summary()


def test_cli_eval_writes_json_and_refuses_bad_input_before_loading(tmp_path, tiny_model_dir):
    data = tmp_path / "val.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"what is {i} plus {i}?", "completion": str(2 * i)}) + "\n" for i in range(6))
    )
    r = smolora(
        "eval",
        "--data",
        data,
        "--model",
        tiny_model_dir,
        "--exact-match",
        "--max-new-tokens",
        3,
        "--json",
        tmp_path / "reports" / "r.json",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    saved = json.loads((tmp_path / "reports" / "r.json").read_text())  # the missing folder made
    assert saved["examples"] == 6 and saved["scored"] == 6 and saved["loss"] > 0
    assert f"6 examples, {saved['supervised_tokens']} supervised tokens: loss {saved['loss']:.4f}" in r.stdout

    text = tmp_path / "notes.txt"
    text.write_text("plain text\nmore plain text\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{oops}\n')
    for args, message in (
        ((text, "--exact-match"), "exact match needs examples with a prompt"),
        ((bad,), "bad.jsonl:2: malformed JSON"),
        ((data, "--max-new-tokens", 0), "max_new_tokens must be >= 1"),
        ((data, "--model", tmp_path / "nowhere"), "model path does not exist"),
        ((data, "--json", tmp_path), "is a folder; expected a file name"),
        ((data, "--json", text / "r.json"), "notes.txt is not a writable folder"),
    ):
        r = smolora("eval", "--model", tiny_model_dir, "--data", *args)
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def test_several_tasks_are_evaluated_record_by_record_with_their_prefix(tmp_path, tiny_model_dir):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(
        "".join(json.dumps({"prompt": f"what is {i} plus {i}?", "completion": str(2 * i)}) + "\n" for i in range(5))
    )
    b.write_text("".join(json.dumps({"prompt": f"say {w}", "completion": w}) + "\n" for w in ("hello", "world")))
    r = smolora(
        "eval",
        "--data",
        f"x={a}",
        "--data",
        f"y={b}@3",
        "--model",
        tiny_model_dir,
        "--exact-match",
        "--max-new-tokens",
        2,
        "--json",
        tmp_path / "r.json",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert (
        "7 examples kept" in r.stdout + r.stderr and "per task: x=5, y=2" in r.stdout + r.stderr
    )  # no resampling by weight
    saved = json.loads((tmp_path / "r.json").read_text())
    x, y = saved["per_task"]["x"], saved["per_task"]["y"]
    assert (x["examples"], y["examples"]) == (5, 2) and x["scored"] + y["scored"] == saved["scored"] == 7
    assert x["matched"] + y["matched"] == saved["matched"]
    assert x["supervised_tokens"] + y["supervised_tokens"] == saved["supervised_tokens"]
    # the whole's loss is the token-weighted mean of the tasks'
    mean = (x["loss"] * x["supervised_tokens"] + y["loss"] * y["supervised_tokens"]) / saved["supervised_tokens"]
    assert saved["loss"] == pytest.approx(mean, rel=1e-5)
    assert f"  task x: 5 examples, {x['supervised_tokens']} supervised tokens" in r.stdout
