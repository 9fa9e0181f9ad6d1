"""Records -> ids + labels: completion-only masks found by character offsets, EOS trained."""

from __future__ import annotations

import pytest

from smolora.data.formats import IGNORE, FormatOptions, encode_record, encode_records
from smolora.errors import SmoLoRAError


def decode_supervised(tok, ex) -> str:
    return tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE])


def test_chat_mask_supervises_answer_and_end_of_turn_even_though_pad_is_eos(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    rec = {"messages": [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "the quick fox"}]}
    ex = encode_record(rec, tokenizer, FormatOptions())
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    # Exactly the answer tokens plus the closing <|im_end|> are supervised, in order.
    answer = tokenizer("the quick fox", add_special_tokens=False)["input_ids"]
    assert [lab for lab in ex.labels if lab != IGNORE] == answer + [end]
    # Every prompt token (system, user, the '<|im_start|>assistant\n' header) is masked.
    first = next(i for i, lab in enumerate(ex.labels) if lab != IGNORE)
    assert all(lab == IGNORE for lab in ex.labels[:first])
    assert tokenizer.decode(ex.input_ids[:first]).endswith("<|im_start|>assistant\n")
    # The user's <|im_end|> (same id as pad) stays masked: masking is not by token id.
    assert ex.input_ids[:first].count(end) >= 2


def test_multi_turn_supervises_every_assistant_turn(tokenizer):
    rec = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": "two"},
            {"role": "user", "content": "three"},
            {"role": "assistant", "content": "four"},
        ]
    }
    ex = encode_record(rec, tokenizer, FormatOptions())
    assert decode_supervised(tokenizer, ex) == "two<|im_end|>four<|im_end|>"


def test_train_on_prompt_supervises_everything(tokenizer):
    rec = {"prompt": "hello", "completion": "world"}
    ex = encode_record(rec, tokenizer, FormatOptions(train_on_prompt=True))
    assert ex.labels == ex.input_ids


@pytest.mark.parametrize(
    "record",
    [
        {"prompt": "hello", "completion": "world"},
        {"instruction": "hello", "input": "", "output": "world"},
        {"conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "world"}]},
        {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]},
    ],
)
def test_every_conversational_shape_renders_the_same(tokenizer, record):
    ex = encode_record(record, tokenizer, FormatOptions())
    assert decode_supervised(tokenizer, ex) == "world<|im_end|>"
    assert tokenizer.decode(ex.input_ids).startswith("<|im_start|>system\nYou are a test bot")


def test_no_second_bos(tokenizer):
    ex = encode_record({"prompt": "hi", "completion": "yo"}, tokenizer, FormatOptions())
    bos = tokenizer.bos_token_id
    assert ex.input_ids[0] == bos and ex.input_ids[1] != bos


def test_text_record_appends_and_trains_eos(tokenizer):
    ex = encode_record({"text": "hello world"}, tokenizer, FormatOptions())
    assert ex.input_ids[-1] == tokenizer.eos_token_id and ex.labels[-1] == tokenizer.eos_token_id
    assert ex.labels == ex.input_ids


def test_whitespace_only_text_is_dropped_like_empty_text(tokenizer):
    examples, stats = encode_records([{"text": ""}, {"text": " \n\t "}, {"text": "hello"}], tokenizer, FormatOptions())
    assert (stats.kept, stats.dropped) == (1, 2)


def test_custom_text_field_and_field_map(tokenizer):
    ex = encode_record({"body": "hello"}, tokenizer, FormatOptions(text_field="body"))
    assert tokenizer.decode(ex.input_ids).startswith("hello")
    ex = encode_record(
        {"q": "hello", "a": "world"}, tokenizer, FormatOptions(field_map={"prompt": "q", "completion": "a"})
    )
    assert decode_supervised(tokenizer, ex) == "world<|im_end|>"


def test_system_prompt_override(tokenizer):
    ex = encode_record({"prompt": "hi", "completion": "yo"}, tokenizer, FormatOptions(system_prompt="be terse"))
    assert tokenizer.decode(ex.input_ids).startswith("<|im_start|>system\nbe terse<|im_end|>")


def test_truncation_drops_examples_whose_answer_is_cut_off(tokenizer):
    long_prompt = "hello world " * 50
    recs = [{"prompt": long_prompt, "completion": "fox"}, {"prompt": "hi", "completion": "the quick brown fox jumps"}]
    fits = len(encode_record(recs[1], tokenizer, FormatOptions()).input_ids)
    examples, stats = encode_records(recs, tokenizer, FormatOptions(max_length=fits))
    assert stats.dropped == 1 and stats.kept == 1 and stats.truncated == 1
    assert [x for x in examples[0].labels if x != -100][-1] == tokenizer.eos_token_id  # still learns to stop


def test_model_without_template_gets_chatml():
    from conftest import build_tokenizer

    tok = build_tokenizer(chat_template=None)
    examples, _ = encode_records([{"prompt": "hi", "completion": "yo"}], tok, FormatOptions())
    assert tok.decode(examples[0].input_ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"


@pytest.mark.parametrize(
    "record, message",
    [
        (
            {"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]},
            "unknown role 'wizard'",
        ),
        ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
        ({"body": "x", "_where": "f.jsonl:3"}, "f.jsonl:3: record has no 'text' field (it has 1 other field)"),
        ({"messages": "hello"}, "messages must be a non-empty list"),
        ({"prompt": 3, "completion": "x"}, "field 'prompt' must be a string"),
        (
            {"question": "x", "b": "y", "_map": {"prompt": "question"}},
            "record has 'question' as its prompt but no 'completion' field for its completion; "
            "map it with --field-map completion=FIELD",
        ),
        ({"output": "y"}, "record has 'output' as its output but no 'instruction' field"),
    ],
)
def test_bad_records_name_the_problem(tokenizer, record, message):
    fields = {k: v for k, v in record.items() if k != "_map"}
    with pytest.raises(SmoLoRAError, match=message.replace("(", r"\(").replace(")", r"\)")):
        encode_record(fields, tokenizer, FormatOptions(field_map=record.get("_map", {})))


def test_a_conversation_the_chat_template_rejects_is_named_with_the_template_s_reason():
    from conftest import build_tokenizer

    no_system = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    tok = build_tokenizer(chat_template=no_system)
    record = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
        ],
        "_where": "chats.jsonl:4",
    }
    with pytest.raises(
        SmoLoRAError,
        match="^chats.jsonl:4: the model's chat template rejects this conversation: System role not supported$",
    ):
        encode_record(record, tok, FormatOptions())


def test_multi_task_prefix_and_counts(tmp_path, tokenizer, said):
    import json

    from smolora.config import DataConfig
    from smolora.data import load_source, prepare_data

    (tmp_path / "a.jsonl").write_text(
        "".join(json.dumps({"prompt": f"q{i}", "completion": "a"}) + "\n" for i in range(6))
    )
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": f"hello {i}"}) + "\n" for i in range(6)))
    records = load_source(
        {"SENTIMENT": (str(tmp_path / "a.jsonl"), 2.0), "SUMMARY": str(tmp_path / "b.jsonl")}, DataConfig()
    )
    prepared = prepare_data(records, tokenizer, DataConfig())
    assert prepared.stats.per_task == {"SENTIMENT": 8, "SUMMARY": 4}
    assert "per task: SENTIMENT=8, SUMMARY=4" in said[0]
    chat = next(e for e in prepared.train if e.task == "SENTIMENT")
    assert "<|im_start|>user\n[TASK:SENTIMENT] q" in tokenizer.decode(chat.input_ids)
    text = next(e for e in prepared.train if e.task == "SUMMARY")
    assert tokenizer.decode(text.input_ids).startswith("[TASK:SUMMARY] hello")


def test_curriculum_length_puts_short_examples_first(tokenizer):
    from smolora.config import DataConfig, TrainConfig
    from smolora.data import prepare_data
    from smolora.data.batching import epoch_order

    records = [{"text": "one two three four five"}, {"text": "one"}, {"text": "one two three"}]
    prepared = prepare_data(records, tokenizer, DataConfig(), TrainConfig(curriculum="length"))
    difficulty = [e.difficulty for e in prepared.train]
    assert difficulty == [5.0, 1.0, 3.0]
    assert epoch_order(3, 0, 0, difficulty=difficulty) == [1, 2, 0]


def test_a_text_field_named_explicitly_wins_over_other_shapes(tokenizer):
    record = {"prompt": "q", "completion": "a", "content": "the quick brown fox"}
    assert encode_record(record, tokenizer, FormatOptions()).labels.count(IGNORE) > 0  # auto: prompt/completion
    ex = encode_record(record, tokenizer, FormatOptions(text_field="content"))
    assert tokenizer.decode(ex.input_ids).startswith("the quick brown fox") and IGNORE not in ex.labels


class _Measured:
    """A tokenizer that notes the longest text it was given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.longest = tokenizer, 0

    def __call__(self, text, **kw):
        self.longest = max(self.longest, len(text))
        return self.tokenizer(text, **kw)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


@pytest.mark.parametrize(
    "record",
    [
        {"text": "lorem ipsum dolor sit amet " * 40_000},
        {"text": "x" * 1_000_000},  # one word: no whitespace to cut before
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "say " * 300_000}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a <|im_end|> b " * 80_000}]},
    ],
)
def test_a_huge_record_is_tokenized_only_as_far_as_max_length_needs(tokenizer, record):
    measured = _Measured(tokenizer)
    opts = FormatOptions(max_length=64)
    (cut,), stats = encode_records([record], measured, opts)
    whole = encode_record(record, tokenizer, FormatOptions(max_length=10**9))
    assert (cut.input_ids, cut.labels) == (whole.input_ids[:64], whole.labels[:64])
    assert stats.truncated == 1 and measured.longest < 10_000


def test_a_record_just_over_max_length_is_truncated_and_counted_as_before(tokenizer):
    record = {"text": "one two three four five six seven eight nine ten " * 3}
    whole = encode_record(record, tokenizer, FormatOptions(max_length=10**9))
    for max_length in (len(whole.input_ids) - 1, len(whole.input_ids)):
        (ex,), stats = encode_records([record], tokenizer, FormatOptions(max_length=max_length))
        assert ex.input_ids == whole.input_ids[:max_length] and stats.truncated == (max_length < len(whole.input_ids))
