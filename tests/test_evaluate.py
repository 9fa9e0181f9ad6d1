"""Evaluation: loss over the reply tokens, greedy exact match of the last reply; the CLI around it."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import LoraConfig

from conftest import build_tiny_llama, build_tokenizer
from smolora.data.formats import FormatOptions, encode_record, encode_records
from smolora.errors import SmoLoRAError
from smolora.evaluate import (
    BATCH_TOKENS,
    _batches,
    _decode,
    _mismatch,
    evaluate,
    greedy_replies,
    greedy_texts,
    last_reply,
)
from smolora.fast import accelerated
from smolora.generate import generate, prompt_ids, stop_token_ids
from smolora.lora import add_lora
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
        ((data, "--exact-match", "--batch-size", 0), "--batch-size must be >= 1"),
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


PROMPTS = [
    "hi",
    "what is 1 plus 1?",
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is a tiny tokenizer for tests",
    "rewrite",
    "0 1 2 3",
    "question answer user",
    "a b c d e f g",
    "march",
]


def alone(model, tokenizer, prompt: list[int], max_new_tokens: int) -> list[int]:
    """The ids ``smolora.generate.generate`` generates for one prompt (its own call to transformers' generate)."""
    ids = torch.tensor([prompt])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        eos_token_id=stop_token_ids(tokenizer, model),
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
    )
    return out[0, len(prompt) :].tolist()


def talkative_tiny_llama(tokenizer, prompts: list[list[int]], max_new_tokens: int):
    """A tiny Llama whose greedy replies vary (weights drawn wider than the init's), with its most
    frequent reply token made a stop token, so that rows of a batch end at different steps."""
    model = build_tiny_llama(len(tokenizer), seed=3)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.4)
    tokens = [t for p in prompts for t in alone(model, tokenizer, p, max_new_tokens)]
    model.generation_config.eos_token_id = [2, max(set(tokens), key=tokens.count)]
    return model


@pytest.mark.parametrize("adapter", [False, True])
def test_batched_greedy_decoding_generates_the_ids_of_one_prompt_at_a_time(tokenizer, adapter):
    prompts = [prompt_ids(tokenizer, p)[0].tolist() for p in PROMPTS]
    prompts.append(tokenizer("plain text without a template").input_ids)
    model = talkative_tiny_llama(tokenizer, prompts, 12)
    if adapter:  # unmerged: folded into the weights while decoding, as generate() does
        model = add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.3)
    expected = [alone(model, tokenizer, p, 12) for p in prompts]
    found = (model.training, {n: p.detach().clone() for n, p in model.state_dict().items()})
    lengths = {len(ids) for ids in expected}
    assert len(lengths) >= 3 and 12 in lengths, expected  # rows stop at different steps; some run to the limit
    for batch_size in (1, 3, 16):
        assert greedy_replies(model, tokenizer, prompts, 12, batch_size=batch_size) == expected
    texts = [generate(model, tokenizer, p, max_new_tokens=12, do_sample=False) for p in PROMPTS]
    assert greedy_texts(model, tokenizer, PROMPTS, 12, batch_size=4) == texts
    assert model.training == found[0]  # the model is left as found: its mode, its weights (an adapter unmerged)
    assert all(torch.equal(p, found[1][n]) for n, p in model.state_dict().items())


def test_a_near_tie_in_a_batch_is_decoded_again_alone(tokenizer):
    prompts = [prompt_ids(tokenizer, p)[0].tolist() for p in PROMPTS]
    model = talkative_tiny_llama(tokenizer, prompts, 8)
    first = alone(model, tokenizer, prompts[0], 8)[0]
    twin = next(t for t in range(len(tokenizer)) if t not in (first, *stop_token_ids(tokenizer, model)))
    with torch.no_grad():  # tied: the twin's logit is the first token's times (1 + 1e-6), a near tie wherever it leads
        weight = model.get_input_embeddings().weight
        weight[twin] = weight[first] * (1 + 1e-6)
    decoded = _decode(prompts, [8] * len(prompts), stop_token_ids(tokenizer, model), tokenizer.pad_token_id, model)
    assert decoded[0][1] and not all(close for _, close in decoded)  # flagged where the twins lead, only there
    expected = [alone(model, tokenizer, p, 8) for p in prompts]
    assert greedy_replies(model, tokenizer, prompts, 8, batch_size=16) == expected


def test_a_reply_that_can_no_longer_match_stops_with_the_same_verdict(tokenizer):
    prompts = [prompt_ids(tokenizer, p)[0].tolist() for p in PROMPTS]
    model = talkative_tiny_llama(tokenizer, prompts, 16)
    full = greedy_replies(model, tokenizer, prompts, 16)
    text = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in full]
    references = [
        text[0],  # right
        text[1] + "  ",  # right: whitespace at the ends does not count
        text[2][:-1] + "#",  # wrong at its last character
        "#" + text[3],  # wrong at the first
        text[4] + " more",  # the reply and more
        text[5][: len(text[5]) // 2],  # half of it
        *text[6:],
    ]
    references = [r.strip() for r in references]
    early = greedy_replies(model, tokenizer, prompts, 16, batch_size=4, until=_mismatch(tokenizer, references))
    verdicts = [t == r for t, r in zip(text, references)]
    assert verdicts[:6] == [True, True, False, False, False, False]
    assert [
        tokenizer.decode(ids, skip_special_tokens=True).strip() == r for ids, r in zip(early, references)
    ] == verdicts
    assert all(full[i][: len(ids)] == ids for i, ids in enumerate(early))  # prefixes of the full replies
    assert len(early[3]) == 1 and len(early[5]) < len(full[5])  # stopped where the text left the reference


def test_batches_pad_little_and_hold_a_bounded_number_of_tokens():
    prompts = [[0] * n for n in (5, 300, 7, 6, 2000, 8)]
    batches = _batches(prompts, 3)
    assert sorted(i for b in batches for i in b) == list(range(6))
    assert batches[0] == [0, 3, 2] and all(len(b) <= 3 for b in batches)  # shortest first
    assert all(len(b) * max(len(prompts[i]) for i in b) <= BATCH_TOKENS for b in batches)
    with pytest.raises(SmoLoRAError, match="batch_size must be >= 1"):
        greedy_replies(build_tiny_llama(300), build_tokenizer(), prompts, 4, batch_size=0)


@pytest.mark.slow
def test_batched_greedy_decoding_on_the_embedded_model_equals_one_at_a_time():
    from smolora.demo import make_examples
    from smolora.models import load_model, load_tokenizer, resolve_model

    source = resolve_model(None)
    tokenizer, model = load_tokenizer(source), load_model(source).eval()
    records = make_examples(6, seed=5) + [{"prompt": "Name three colours.", "completion": ""}]
    prompts = [prompt_ids(tokenizer, r["prompt"])[0].tolist() for r in records]
    expected = [alone(model, tokenizer, p, 16) for p in prompts]
    assert len({len(ids) for ids in expected}) >= 2, expected  # replies of several lengths
    for batch_size in (3, 8):
        assert greedy_replies(model, tokenizer, prompts, 16, batch_size=batch_size) == expected
