"""Padding-free packing is exact: packed logits and loss equal each example run alone."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import ARCHITECTURES, TINY_SIZES, build_tiny, chat_records
from smolora.data.batching import collate, epoch_order, group_micro_batches, mix_tasks
from smolora.data.formats import IGNORE, Example, FormatOptions, encode_records
from smolora.fast import attention, native, onednn
from smolora.fast.attention import varlen_attention
from smolora.fast.head_loss import loss_sum as token_loss_sum

# The default; a threshold every span of the tiny examples reaches (on CPU, spans in two halves,
# each by the flash kernel); and the same with every span by GemmAttention, as on a CPU where
# oneDNN's GEMM is the faster one.
MODES = ["default", "halves", "gemm"]


def attention_mode(monkeypatch, mode: str) -> None:
    if mode == "default":
        return
    monkeypatch.setattr(attention, "SPLIT_QUERIES", 4)
    monkeypatch.setattr(attention, "GEMM_MIN_QUERIES", 1 if mode == "gemm" else 10**9)
    if mode == "gemm":
        if not onednn._available():
            pytest.skip("this torch build has no oneDNN")
        monkeypatch.setattr(onednn, "onednn_is_faster", lambda: True)


def examples_of(tokenizer, n=5):
    recs = chat_records(n)
    recs[1]["messages"][1]["content"] = "a much longer answer: the quick brown fox jumps over the lazy dog"
    return encode_records(recs, tokenizer, FormatOptions())[0]


@torch.no_grad()
@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("mode", MODES)
def test_packed_logits_equal_logits_alone(tokenizer, arch, mode, monkeypatch):
    attention_mode(monkeypatch, mode)
    model = build_tiny(arch, len(tokenizer))
    examples = examples_of(tokenizer)
    mb = collate(examples, packed=True)
    assert mb.input_ids.shape[0] == 1 and mb.attention_mask is None
    # transformers' own packed path (block mask from restarting position ids) ...
    packed = model(input_ids=mb.input_ids, position_ids=mb.position_ids, use_cache=False).logits[0]
    # ... and ours (attention block by block) agree with each example run alone
    with varlen_attention(model):
        ours = model(
            input_ids=mb.input_ids, position_ids=mb.position_ids, use_cache=False, smolora_segments=mb.segments
        ).logits[0]
    torch.testing.assert_close(ours, packed, atol=1e-5, rtol=0)
    start = 0
    for ex in examples:
        alone = model(input_ids=torch.tensor([ex.input_ids]), use_cache=False).logits[0]
        n = len(ex.input_ids)
        torch.testing.assert_close(packed[start : start + n], alone, atol=1e-5, rtol=0)
        start += n


@torch.no_grad()
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_packed_loss_equals_unpacked_and_padded_loss(tokenizer, arch):
    model = build_tiny(arch, len(tokenizer))
    examples = examples_of(tokenizer)
    packed = token_loss_sum(model, collate(examples, packed=True))
    padded = token_loss_sum(model, collate(examples, packed=False, pad_id=tokenizer.pad_token_id))
    alone = sum(token_loss_sum(model, collate([e], packed=True)) for e in examples)
    torch.testing.assert_close(packed, alone, atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(padded, alone, atol=1e-4, rtol=1e-6)


def test_targets_never_cross_example_boundaries():
    a = Example([5, 6, 7], [IGNORE, 6, 7])
    b = Example([8, 9], [8, 9])
    mb = collate([a, b])
    assert mb.targets.tolist() == [[6, 7, IGNORE, 9, IGNORE]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 0, 1]]


example_st = st.lists(st.tuples(st.integers(3, 299), st.booleans()), min_size=1, max_size=30).map(
    lambda toks: Example([t for t, _ in toks], [t if sup else IGNORE for t, sup in toks])
)


@settings(max_examples=150, deadline=None)
@given(
    examples=st.lists(example_st, min_size=1, max_size=20),
    batch=st.integers(1, 6),
    cap=st.integers(0, 60),
    seed=st.integers(0, 5),
    by_len=st.booleans(),
)
def test_packer_never_loses_or_duplicates_a_supervised_token(examples, batch, cap, seed, by_len):
    lengths = [len(e.input_ids) for e in examples]
    order = epoch_order(len(examples), 0, seed, lengths=lengths, group_by_length=by_len)
    assert sorted(order) == list(range(len(examples)))
    groups = group_micro_batches(lengths, order, batch, cap)
    assert sorted(i for g in groups for i in g) == list(range(len(examples)))
    for g in groups:
        assert len(g) <= batch
        assert cap == 0 or len(g) == 1 or sum(lengths[i] for i in g) <= cap
    got = sorted(t for g in groups for t in collate([examples[i] for i in g]).targets[0].tolist() if t != IGNORE)
    want = sorted(t for e in examples for t in e.labels[1:] if t != IGNORE)
    assert got == want


def test_curriculum_orders_easy_first_and_bucket_shuffle_keeps_buckets():
    difficulty = [5.0, 1.0, 3.0, 2.0, 4.0, 0.0]
    assert epoch_order(6, 0, 0, difficulty=difficulty) == [5, 1, 3, 2, 4, 0]
    shuffled = epoch_order(6, 0, 0, difficulty=difficulty, bucket_shuffle=True, num_buckets=2)
    assert set(shuffled[:3]) == {5, 1, 3} and set(shuffled[3:]) == {2, 4, 0}


def test_mix_tasks_follows_weights_and_tags_records():
    mixed = mix_tasks(
        [("A", [{"text": f"a{i}"} for i in range(10)], 3.0), ("B", [{"text": f"b{i}"} for i in range(10)], 1.0)], seed=0
    )
    counts = {t: sum(r["_task"] == t for r in mixed) for t in "AB"}
    assert counts == {"A": 15, "B": 5}
    assert len({r["text"] for r in mixed if r["_task"] == "A"}) == 10  # every A record used before any repeats


@pytest.mark.parametrize("val_size", [0.2, 4])
def test_validation_split_of_mixed_tasks_never_holds_a_record_that_is_trained_on(val_size):
    from smolora.data import split_validation

    # A's 5 records are repeated 5 times each to reach its half of the mix; B's 45 are subsampled
    mixed = mix_tasks(
        [("A", [{"text": f"a{i}"} for i in range(5)], 1.0), ("B", [{"text": f"b{i}"} for i in range(45)], 1.0)], seed=0
    )
    train, val = split_validation(mixed, val_size, seed=42)
    held_out = [r["text"] for r in val]
    assert (
        len(held_out) == len(set(held_out)) == (6 if val_size == 0.2 else 4)
    )  # 30 distinct records; each held out once
    assert not set(held_out) & {r["text"] for r in train}
    assert len(train) + sum(sum(m["text"] == t for m in mixed) for t in held_out) == len(
        mixed
    )  # every copy goes one way


@torch.no_grad()
@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("mode", MODES)
def test_shared_prefix_packing_is_exact(tokenizer, arch, mode, monkeypatch):
    attention_mode(monkeypatch, mode)
    from smolora.data.batching import shared_prefix_length

    model = build_tiny(arch, len(tokenizer))
    examples = examples_of(tokenizer)
    prefix = shared_prefix_length(examples)
    system = len(tokenizer("<|im_start|>system\nYou are a test bot<|im_end|>\n", add_special_tokens=False)["input_ids"])
    assert prefix >= system  # at least the default system prompt is shared
    shared = collate(examples, share_prefix=True)
    assert shared.input_ids.shape[1] == sum(len(e.input_ids) for e in examples) - (len(examples) - 1) * prefix
    assert shared.segments.prefix == prefix
    assert shared.num_tokens == sum(len(e.input_ids) for e in examples)
    assert shared.num_targets == collate(examples).num_targets
    loss_shared = token_loss_sum(model, shared)
    loss_alone = sum(token_loss_sum(model, collate([e])) for e in examples)
    torch.testing.assert_close(loss_shared, loss_alone, atol=1e-4, rtol=1e-6)
    # Each example's supervised logits equal its logits run alone.
    with varlen_attention(model):
        logits = model(
            input_ids=shared.input_ids,
            position_ids=shared.position_ids,
            use_cache=False,
            smolora_segments=shared.segments,
        ).logits[0]
    mask = shared.segments.dense_mask(shared.input_ids.shape[1])
    mask = torch.zeros(mask.shape).masked_fill_(~mask, torch.finfo(torch.float32).min)
    dense = model(
        input_ids=shared.input_ids, position_ids=shared.position_ids, attention_mask=mask, use_cache=False
    ).logits[0]
    torch.testing.assert_close(dense, logits, atol=1e-5, rtol=0)
    start = prefix
    for ex in examples:
        alone = model(input_ids=torch.tensor([ex.input_ids]), use_cache=False).logits[0]
        n = len(ex.input_ids) - prefix
        torch.testing.assert_close(logits[start : start + n], alone[prefix:], atol=1e-5, rtol=0)
        start += n


def test_shared_prefix_never_covers_a_target():
    from smolora.data.batching import shared_prefix_length

    a = Example([1, 2, 3, 4, 5], [1, 2, 3, 4, 5])  # plain text: every position predicts something
    b = Example([1, 2, 3, 9, 9], [1, 2, 3, 9, 9])
    assert shared_prefix_length([a, b]) == 0
    c = Example([1, 2, 3, 4, 5], [IGNORE, IGNORE, IGNORE, 4, 5])
    d = Example([1, 2, 3, 4, 7], [IGNORE, IGNORE, IGNORE, 4, 7])
    assert shared_prefix_length([c, d]) == 2  # position 2 predicts token 3 (id 4), a target


def test_chunked_linear_cross_entropy_equals_the_plain_one():
    from smolora.fast.head_loss import LinearCrossEntropy

    torch.manual_seed(0)
    hidden = torch.randn(300, 16, requires_grad=True)  # more rows than one chunk
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (300,))
    ours = LinearCrossEntropy.apply(hidden, weight, targets)
    ours.backward(torch.tensor(0.5))
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    plain = torch.nn.functional.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    plain.backward(torch.tensor(0.5))
    torch.testing.assert_close(ours, plain, atol=1e-3, rtol=1e-6)
    torch.testing.assert_close(gh, hidden.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, weight.grad, atol=1e-5, rtol=1e-5)


def test_linear_cross_entropy_over_vocabulary_blocks_equals_the_plain_one_and_reads_codes_alike(monkeypatch):
    """A frozen head: several blocks of the vocabulary (online softmax) and several passes over positions."""
    from smolora.fast.codes import fit_codes
    from smolora.fast.head_loss import LinearCrossEntropy

    monkeypatch.setattr(LinearCrossEntropy, "VOCAB", 24)
    monkeypatch.setattr(LinearCrossEntropy, "POSITIONS", 128)
    generator = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (50, 1, 32), generator=generator)
    q[:, :, 0] = 127
    weight = (q * torch.rand(50, 1, 1, generator=generator).mul(0.05).half().float()).reshape(
        50, 32
    )  # as Q8_0 makes one
    hidden = torch.randn(300, 32, generator=generator, requires_grad=True)
    targets = torch.randint(0, 50, (300,), generator=generator)
    plain = torch.nn.functional.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    (expected,) = torch.autograd.grad(plain, hidden, torch.tensor(0.5))
    ours = LinearCrossEntropy.apply(hidden, weight, targets)
    (got,) = torch.autograd.grad(ours, hidden, torch.tensor(0.5))
    torch.testing.assert_close(ours, plain, atol=1e-3, rtol=1e-6)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    coded = LinearCrossEntropy.apply(hidden, torch.full_like(weight, float("nan")), targets, fit_codes(weight))
    assert torch.equal(coded, ours)
    assert torch.equal(torch.autograd.grad(coded, hidden, torch.tensor(0.5))[0], got)


@torch.no_grad()
@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("mode", MODES)
def test_rows_continuing_a_step_prefix_equal_examples_alone(tokenizer, arch, mode, monkeypatch):
    attention_mode(monkeypatch, mode)
    from smolora.data.batching import shared_prefix_length
    from smolora.fast.attention import StepPrefix

    model = build_tiny(arch, len(tokenizer))
    examples = examples_of(tokenizer)
    n = shared_prefix_length(examples)
    alone = [model(input_ids=torch.tensor([ex.input_ids]), use_cache=False).logits[0] for ex in examples]
    step = StepPrefix(examples[0].input_ids[:n])
    with varlen_attention(model):
        step.forward(model)
        for rows in ((0, 2), (2, len(examples))):
            row = examples[rows[0] : rows[1]]
            mb = collate(row, step_prefix=n)
            assert mb.input_ids.shape[1] == sum(len(e.input_ids) - n for e in row)
            assert mb.num_tokens == sum(len(e.input_ids) for e in row)
            logits = model(
                input_ids=mb.input_ids,
                position_ids=mb.position_ids,
                use_cache=False,
                smolora_segments=mb.segments,
                smolora_step_prefix=step,
            ).logits[0]
            for i, (start, end) in zip(range(*rows), mb.segments.spans):
                torch.testing.assert_close(logits[start:end], alone[i][n:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("gemm", [False, True])
@pytest.mark.parametrize("prefix, n", [(0, 384), (7, 385), (7, 383), (0, 20)])
def test_a_long_span_in_two_halves_equals_one_masked_call(prefix, n, gemm, monkeypatch):
    """Values and gradients of the split attention equal one call over the whole span, with each
    part by the flash kernel or by GemmAttention."""
    monkeypatch.setattr(attention, "GEMM_MIN_QUERIES", 1)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, n, 8, generator=gen, requires_grad=True)
    k, v = (torch.randn(1, 2, prefix + n, 8, generator=gen, requires_grad=True) for _ in range(2))
    attend = functools.partial(F.scaled_dot_product_attention, enable_gqa=True)
    parts = attention._span_attention(attend, q, k, v, scale=8**-0.5 if gemm else None)
    assert len(parts) == (2 if n >= attention.SPLIT_QUERIES else 1)
    mask = torch.ones(n, prefix + n, dtype=torch.bool)
    mask[:, prefix:] = torch.ones(n, n, dtype=torch.bool).tril()
    ours, ref = torch.cat(parts, dim=2), attend(q, k, v, attn_mask=mask)
    # The kernels sum up to ~390 products of unit-size values in other orders (tiles, halves): each
    # output, of size up to ~2, may differ by a few of its ulps (fp32: 2.4e-7 at 2), whichever CPU.
    torch.testing.assert_close(ours, ref, atol=16 * torch.finfo(torch.float32).eps, rtol=0)
    grad = torch.randn(1, 4, n, 8, generator=gen)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads, kv, prefix, n", [(4, 2, 7, 40), (4, 4, 0, 33), (6, 2, 0, 1), (3, 1, 5, 9)])
def test_gemm_attention_equals_sdpa_and_its_backward_is_the_true_gradient(heads, kv, prefix, n, monkeypatch):
    """GemmAttention on transformers' (1, H, n, D) views, oneDNN's GEMM where the build has it:
    values and gradients against float64 SDPA; its hand-written backward against gradcheck."""
    if onednn._available():
        monkeypatch.setattr(onednn, "onednn_is_faster", lambda: True)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, n, heads, 8, generator=gen).transpose(1, 2).requires_grad_()
    k, v = (torch.randn(1, prefix + n, kv, 8, generator=gen).transpose(1, 2).requires_grad_() for _ in range(2))
    mask = torch.ones(n, prefix + n, dtype=torch.bool)
    mask[:, prefix:] = torch.ones(n, n, dtype=torch.bool).tril()
    ref = F.scaled_dot_product_attention(*(t.double() for t in (q, k, v)), attn_mask=mask, enable_gqa=True)
    ours = attention.GemmAttention.apply(q, k, v, 8**-0.5)
    torch.testing.assert_close(ours.double(), ref, atol=1e-6, rtol=1e-6)
    grad = torch.randn(ours.shape, generator=gen)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad.double())):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(lambda *t: attention.GemmAttention.apply(*t, 8**-0.5), exact)


@pytest.mark.skipif(native.library() is None, reason="no C compiler with OpenMP")
@pytest.mark.parametrize(
    "heads, kv, d, context, lengths, in_row",
    [
        (9, 3, 64, 23, (35, 33, 1, 36, 5), False),  # the embedded model's heads after a step prefix
        (4, 2, 8, 7, (3, 9, 12), False),
        (4, 4, 16, 5, (5, 9, 127), True),  # a row's own prefix; the longest span it takes
        (2, 1, 128, 0, (17, 40), False),  # no context
        (6, 2, 80, 11, (50, 70), True),  # a head size that is no multiple of 16
        (4, 2, 16, 9, (300,), False),  # a long span, as it takes them where GemmAttention would
    ],
)
def test_span_attention_equals_sdpa_and_its_backward_is_the_true_gradient(heads, kv, d, context, lengths, in_row):
    """The compiled SpanAttention on a row's spans, each seeing a shared context (separate keys and
    values, or the row's own first rows) then itself causally: values and gradients against float64
    SDPA span by span."""
    gen = torch.Generator().manual_seed(d)
    tokens = sum(lengths) + (context if in_row else 0)
    q, k, v = (torch.randn(tokens, h, d, generator=gen, dtype=torch.float64) for h in (heads, kv, kv))
    ck, cv = (torch.randn(context, kv, d, generator=gen, dtype=torch.float64) for _ in range(2))
    rows, start = ([[0, context, 0]] if in_row else []), (context if in_row else 0)
    for n in lengths:
        rows.append([start, start + n, int(context > 0)])
        start += n
    spans = torch.tensor(rows)
    exact = [t.clone().requires_grad_() for t in (q, k, v, ck, cv)]
    if in_row:
        exact[3:] = [exact[1][:context], exact[2][:context]]
    reference = []
    for start, end, sees in rows:  # one SDPA call per span, in float64
        keys, values = exact[1][start:end], exact[2][start:end]
        if sees:
            keys, values = torch.cat([exact[3], keys]), torch.cat([exact[4], values])
        mask = torch.ones(end - start, keys.shape[0], dtype=torch.bool).tril(keys.shape[0] - (end - start))
        as_heads = lambda t: t.transpose(0, 1)[None]  # noqa: E731
        out = F.scaled_dot_product_attention(
            as_heads(exact[0][start:end]), as_heads(keys), as_heads(values), attn_mask=mask, enable_gqa=True
        )
        reference.append(out[0].transpose(0, 1))
    reference = torch.cat(reference)
    ours = [t.float().requires_grad_() for t in (q, k, v, ck, cv)]
    separate = ours[3:] if not in_row else [None, None]
    out = attention.SpanAttention.apply(*ours[:3], *separate, spans, context, d**-0.5)
    torch.testing.assert_close(out.double(), reference, atol=5e-6, rtol=0)
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    inputs = exact[:3] + ([] if in_row else exact[3:])
    expected = torch.autograd.grad(reference, inputs, grad, allow_unused=True)
    got = torch.autograd.grad(out, ours[:3] + ([] if in_row else ours[3:]), grad.float(), allow_unused=True)
    for a, b in zip(got, expected):
        if b is None:  # no context: nothing flows to it
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=0)


def test_short_spans_take_span_attention_where_it_is_built(monkeypatch):
    """Every span, and a row's prefix, shorter than SPAN_MAX_QUERIES, fp32, no dropout; longer ones
    up to SPAN_MAX_QUERIES_OVER_GEMM where GemmAttention would take them."""
    monkeypatch.setattr(onednn, "onednn_is_faster", lambda: False)
    q, k = torch.randn(1, 4, 100, 8), torch.randn(1, 2, 100, 8)
    short = attention.Segments(10, ((10, 50), (50, 100)))
    long = attention.Segments(0, ((0, 100),))
    if native.library() is None:
        assert attention._span_rows(short, 0.0, q, k) is None
        return
    assert attention._span_rows(short, 0.0, q, k).tolist() == [[0, 10, 0], [10, 50, 1], [50, 100, 1]]
    assert attention._span_rows(attention.Segments(0, ((0, 30), (30, 100)), 5), 0.0, q, k).tolist() == [
        [0, 30, 1],
        [30, 100, 1],
    ]
    assert attention._span_rows(short, 0.1, q, k) is None
    assert attention._span_rows(short, 0.0, q, k.half()) is None
    monkeypatch.setattr(attention, "SPAN_MAX_QUERIES", 100)
    assert attention._span_rows(long, 0.0, q, k) is None
    if onednn._available():
        monkeypatch.setattr(onednn, "onednn_is_faster", lambda: True)
        assert attention._span_rows(long, 0.0, q, k).tolist() == [[0, 100, 0]]
        monkeypatch.setattr(attention, "SPAN_MAX_QUERIES_OVER_GEMM", 100)
        assert attention._span_rows(long, 0.0, q, k) is None


def test_long_spans_take_gemm_attention_only_where_it_pays(monkeypatch):
    """Where oneDNN's GEMM is the faster, fp32 spans of GEMM_MIN_QUERIES or more without dropout."""
    calls = []
    monkeypatch.setattr(attention.GemmAttention, "apply", lambda *args: calls.append(args[0].shape[2]) or args[0])
    q = torch.randn(1, 4, 400, 8)
    k = v = torch.randn(1, 2, 400, 8)
    monkeypatch.setattr(onednn, "onednn_is_faster", lambda: True)
    assert attention.gemm_attention_pays(q, k, 0.0)
    assert not attention.gemm_attention_pays(q, k, 0.1)
    assert not attention.gemm_attention_pays(q.double(), k.double(), 0.0)
    attend = functools.partial(F.scaled_dot_product_attention, enable_gqa=True)
    attention._span_attention(attend, q, k, v, scale=0.5)
    assert calls == [200, 200]  # two halves
    attention._span_attention(attend, q[:, :, :100], k[:, :, :100], v[:, :, :100], scale=0.5)
    assert calls == [200, 200]  # under GEMM_MIN_QUERIES: the flash kernel
    monkeypatch.setattr(onednn, "onednn_is_faster", lambda: False)
    assert not attention.gemm_attention_pays(q, k, 0.0)


OTHER_MODELS = {  # what the four architectures above do not exercise
    "granite logits_scaling": ("Granite", dict(logits_scaling=8.0), ["q_proj", "v_proj", "down_proj"]),
    "mistral sliding window": ("Mistral", dict(sliding_window=16), ["q_proj", "v_proj", "down_proj"]),
    "phi3 partial rotary": ("Phi3", dict(partial_rotary_factor=0.75), ["qkv_proj", "o_proj", "gate_up_proj"]),
}


@pytest.mark.parametrize("name", OTHER_MODELS)
def test_a_training_step_equals_examples_alone_on_other_model_conventions(tokenizer, tmp_path, name):
    """One packed optimizer step (one row, a shared prefix) updates the adapter exactly as the plain
    per-example loss does, for heads with scaled logits, sliding-window attention, partial rotary."""
    import transformers
    from peft import LoraConfig

    from smolora.config import TrainConfig
    from smolora.lora import add_lora
    from smolora.train import train

    arch, extra, targets = OTHER_MODELS[name]
    torch.manual_seed(0)
    config = getattr(transformers, arch + "Config")(
        vocab_size=len(tokenizer),
        **TINY_SIZES,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        **extra,
    )
    model = add_lora(
        getattr(transformers, arch + "ForCausalLM")(config),
        LoraConfig(r=4, lora_dropout=0.0, target_modules=targets),
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.1)  # A and B both get gradients
    examples = examples_of(tokenizer, 4)
    assert max(len(e.input_ids) for e in examples) > 16  # longer than the sliding window
    model.zero_grad()
    targets_total = sum(sum(x != IGNORE for x in e.labels[1:]) for e in examples)
    for e in examples:  # the reference: each example alone, full logits
        logits = model(input_ids=torch.tensor([e.input_ids]), use_cache=False).logits[0, :-1]
        F.cross_entropy(logits, torch.tensor(e.labels[1:]), ignore_index=IGNORE, reduction="sum").div(
            targets_total
        ).backward()
    expected = {n: -p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    train(
        model,
        examples,
        TrainConfig(
            output_dir=str(tmp_path),
            max_steps=1,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=1,
            optim="sgd",
            learning_rate=1.0,
            lr_scheduler_type="constant",
            max_grad_norm=0,
            logging_steps=1,
        ),
    )
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach() - before[n], expected[n], atol=1e-6, rtol=1e-4)
