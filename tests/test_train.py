"""The loop: only adapters train, accumulation is exact, schedules, numeric guards, exact resume."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch

from conftest import build_tiny_llama, chat_records
from smolora.checkpoint import list_checkpoints
from smolora.config import LoraSettings, TrainConfig
from smolora.data.batching import collate
from smolora.data.formats import FormatOptions, encode_records
from smolora.lora import add_lora
from smolora.paths import publish
from smolora.train import NonFiniteLossError, lr_at, train


def setup(tokenizer, dropout=0.1, seed=0, tie=True):
    model = build_tiny_llama(len(tokenizer), tie=tie, seed=seed)
    torch.manual_seed(seed)
    peft_model = add_lora(model, LoraSettings(lora_dropout=dropout, target_modules=["all"]).to_peft())
    examples = encode_records(chat_records(16), tokenizer, FormatOptions())[0]
    return peft_model, examples


def cfg(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path),
        max_steps=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        logging_steps=2,
        seed=1,
    )
    return TrainConfig(**{**base, **kw})


def test_only_lora_params_change_and_base_stays_bit_identical(tokenizer, tmp_path):
    model, examples = setup(tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train(model, examples, cfg(tmp_path))
    assert len(result.losses) == 4
    for n, p in model.named_parameters():
        if "lora_" in n:
            assert p.requires_grad
            if "lora_B" in n:
                assert not torch.equal(p, before[n]), n
        else:
            assert not p.requires_grad and torch.equal(p, before[n]), n


def adapter_update(
    tokenizer,
    tmp_path,
    batch,
    accum,
    max_tokens=0,
    share_prefix=False,
    gradient_checkpointing=False,
    dropout=0.0,
    **settings,
):
    model, examples = setup(tokenizer, dropout=dropout)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    c = cfg(
        tmp_path,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum,
        max_steps=1,
        optim="sgd",
        learning_rate=1.0,
        max_grad_norm=0,
        max_tokens_per_batch=max_tokens,
        lr_scheduler_type="constant",
        share_prefix=share_prefix,
        gradient_checkpointing=gradient_checkpointing,
        **settings,
    )
    train(model, examples[:8], c)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    return {n: p.detach() - start[n] for n, p in model.named_parameters() if p.requires_grad}


def test_accumulation_8x1_equals_one_batch_of_8(tokenizer, tmp_path):
    one_batch = adapter_update(tokenizer, tmp_path / "a", batch=8, accum=1)
    accumulated = adapter_update(tokenizer, tmp_path / "b", batch=1, accum=8)
    by_tokens = adapter_update(tokenizer, tmp_path / "c", batch=1, accum=8, max_tokens=40)
    checkpointed = adapter_update(tokenizer, tmp_path / "e", batch=8, accum=1, gradient_checkpointing=True)
    shared = adapter_update(tokenizer, tmp_path / "d", batch=1, accum=8, max_tokens=4096, share_prefix=True)
    assert max(d.abs().max() for d in one_batch.values()) > 1e-3  # a real update, not a no-op
    for n in one_batch:
        torch.testing.assert_close(accumulated[n], one_batch[n], atol=1e-6, rtol=0)
        torch.testing.assert_close(by_tokens[n], one_batch[n], atol=1e-6, rtol=0)
        torch.testing.assert_close(shared[n], one_batch[n], atol=1e-6, rtol=0)
        torch.testing.assert_close(checkpointed[n], one_batch[n], atol=1e-6, rtol=0)


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_a_prefix_shared_across_rows_gives_the_same_update(tokenizer, tmp_path, gradient_checkpointing):
    # 8 examples in rows of at most 40 tokens: the system prompt is computed once by a StepPrefix
    # that every row attends to, and its gradient flows back through that one forward.
    from smolora.fast.attention import StepPrefix

    calls = []
    original = StepPrefix.backward
    StepPrefix.backward = lambda self: calls.append(len(self)) or original(self)
    try:
        shared = adapter_update(
            tokenizer,
            tmp_path / "a",
            batch=1,
            accum=8,
            max_tokens=40,
            share_prefix=True,
            gradient_checkpointing=gradient_checkpointing,
        )
    finally:
        StepPrefix.backward = original
    alone = adapter_update(tokenizer, tmp_path / "b", batch=1, accum=8)
    assert calls and calls[0] > 5  # the prefix was shared across the step's rows
    for n in alone:
        torch.testing.assert_close(shared[n], alone[n], atol=1e-6, rtol=0)


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
@pytest.mark.parametrize("kernel", ["GemmAttention", "SpanAttention"])
def test_gemm_and_span_attention_give_the_flash_kernels_update(
    tokenizer, tmp_path, monkeypatch, kernel, gradient_checkpointing
):
    # Every packed span (in-row and step prefixes, rows of at most 40 tokens) through GemmAttention,
    # as on a CPU where oneDNN's GEMM is the faster one, or through the compiled SpanAttention (the
    # default where it is built), against the flash kernel.
    from smolora.fast import attention, native, onednn

    if kernel == "GemmAttention" and not onednn._available():
        pytest.skip("this torch build has no oneDNN")
    if kernel == "SpanAttention" and native.library() is None:
        pytest.skip("no C compiler with OpenMP")
    settings = dict(batch=1, accum=8, max_tokens=40, share_prefix=True, gradient_checkpointing=gradient_checkpointing)
    span_max = attention.SPAN_MAX_QUERIES, attention.SPAN_MAX_QUERIES_OVER_GEMM
    monkeypatch.setattr(attention, "SPAN_MAX_QUERIES", 0)
    monkeypatch.setattr(attention, "SPAN_MAX_QUERIES_OVER_GEMM", 0)
    monkeypatch.setattr(attention, "GEMM_MIN_QUERIES", 10**9)
    flash = adapter_update(tokenizer, tmp_path / "a", **settings)
    calls, function = [], getattr(attention, kernel)
    forward = function.forward
    if kernel == "GemmAttention":
        monkeypatch.setattr(attention, "GEMM_MIN_QUERIES", 1)
        monkeypatch.setattr(onednn, "onednn_is_faster", lambda: True)
    else:
        monkeypatch.setattr(attention, "SPAN_MAX_QUERIES", span_max[0])
        monkeypatch.setattr(attention, "SPAN_MAX_QUERIES_OVER_GEMM", span_max[1])
    monkeypatch.setattr(function, "forward", staticmethod(lambda *args: calls.append(1) or forward(*args)))
    other = adapter_update(tokenizer, tmp_path / "b", **settings)
    assert len(calls) > 8
    for n in flash:
        torch.testing.assert_close(other[n], flash[n], atol=1e-6, rtol=0)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_gives_nearly_the_fp32_update_in_fp32_adapter_weights(tokenizer, tmp_path, precision):
    # Several rows sharing a StepPrefix, so the prefix's keys/values and the LM-head loss run under autocast too.
    shape = dict(batch=1, accum=8, max_tokens=40, share_prefix=True)
    fp32 = adapter_update(tokenizer, tmp_path / "a", **shape)
    mixed = adapter_update(tokenizer, tmp_path / "b", **shape, **{precision: True})
    assert any(not torch.equal(mixed[n], fp32[n]) for n in fp32)  # the matmuls did run in low precision
    for n in fp32:
        torch.testing.assert_close(mixed[n], fp32[n], atol=5e-2 * float(fp32[n].abs().max()), rtol=0)


def test_mixed_precision_warns_on_a_cpu_without_native_support(monkeypatch, said):
    import smolora.train as train_module

    monkeypatch.setattr(train_module, "_cpu_flags", lambda: {"avx2", "avx512f"})
    autocast, scaler = train_module.mixed_precision(TrainConfig(bf16=True), torch.device("cpu"))
    assert scaler is None and autocast().fast_dtype == torch.bfloat16
    assert len(said) == 1 and "bf16" in said[0] and "slower than fp32" in said[0]
    said.clear()
    monkeypatch.setattr(train_module, "_cpu_flags", lambda: {"avx512f", "amx_bf16"})
    train_module.mixed_precision(TrainConfig(bf16=True), torch.device("cpu"))
    _, scaler = train_module.mixed_precision(TrainConfig(), torch.device("cpu"))
    assert said == [] and scaler is None


def test_fp16_overflow_skips_the_update_and_lowers_the_scale(tokenizer, tmp_path, monkeypatch):
    # A loss scale of 2^127 overflows every gradient: each step must be skipped, not stop the run.
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0**127))
    model, examples = setup(tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    result = train(model, examples, cfg(tmp_path, max_steps=3, fp16=True))
    assert result.steps == 3 and len(result.losses) == 3
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, before[n]), n
    state = json.loads((tmp_path / "checkpoints" / "step-000003" / "trainer_state.json").read_text())
    assert state["loss_scale"]["scale"] == 2.0**124
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged and all(
        entry["grad_norm"] is None for entry in logged if "grad_norm" in entry
    )  # strict JSON, no Infinity


def test_fp16_keeps_its_loss_scale_across_resume(tokenizer, tmp_path):
    model, examples = setup(tokenizer)
    fresh = copy.deepcopy(model)
    settings = dict(max_steps=4, save_steps=2, save_total_limit=0, fp16=True)
    full = train(model, examples, cfg(tmp_path, **settings))
    state = json.loads((tmp_path / "checkpoints" / "step-000002" / "trainer_state.json").read_text())
    assert state["loss_scale"]["scale"] > 1
    second = train(fresh, examples, cfg(tmp_path, **settings), resume_from=tmp_path / "checkpoints" / "step-000002")
    assert second.losses == full.losses


def test_fp16_checkpoint_at_a_skipped_step_holds_the_lowered_loss_scale(tokenizer, tmp_path):
    model, examples = setup(tokenizer)
    fresh = copy.deepcopy(model)
    poison_after(model, calls=4, until=6)  # step 3 is NaN: skipped, and the scaler halves its scale
    settings = dict(
        max_steps=5, save_steps=1, save_total_limit=0, fp16=True, lr_scheduler_type="constant", **NO_STEP_PREFIX
    )
    full = train(model, examples, cfg(tmp_path, **settings), skip_nonfinite_steps=1)
    scale = {
        s: json.loads((tmp_path / "checkpoints" / f"step-{s:06d}" / "trainer_state.json").read_text())["loss_scale"][
            "scale"
        ]
        for s in (2, 3)
    }
    assert scale[3] == scale[2] / 2
    second = train(
        fresh,
        examples,
        cfg(tmp_path, **settings),
        resume_from=tmp_path / "checkpoints" / "step-000003",
        skip_nonfinite_steps=1,
    )
    assert second.losses == full.losses
    for (n, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), n


def test_gradient_checkpointing_recomputes_the_same_dropout_masks(tokenizer, tmp_path):
    plain = adapter_update(tokenizer, tmp_path / "a", batch=8, accum=1, dropout=0.3)
    checkpointed = adapter_update(tokenizer, tmp_path / "b", batch=8, accum=1, dropout=0.3, gradient_checkpointing=True)
    other_seed = adapter_update(tokenizer, tmp_path / "c", batch=4, accum=2, dropout=0.3)  # other masks: not equal
    assert any(not torch.allclose(other_seed[n], plain[n], atol=1e-6, rtol=0) for n in plain)
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], atol=1e-6, rtol=0)


@pytest.mark.parametrize("tie", [True, False])
def test_an_adapter_on_lm_head_is_in_the_loss_and_trains(tokenizer, tmp_path, tie):
    import torch.nn.functional as F
    from peft import LoraConfig

    from smolora.data.batching import collate
    from smolora.fast.head_loss import loss_sum as token_loss_sum

    model = add_lora(
        build_tiny_llama(len(tokenizer), tie=tie),
        LoraConfig(r=4, lora_dropout=0.0, target_modules=["q_proj", "lm_head"]),
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lm_head.lora_B" in n:
                p.normal_(0, 0.5)  # an adapter that moves the logits
    examples = encode_records(chat_records(4), tokenizer, FormatOptions())[0]
    mb = collate(examples, packed=False, pad_id=0)
    keep = mb.targets != -100
    with torch.no_grad():
        logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits
        expected = F.cross_entropy(logits[keep], mb.targets[keep], reduction="sum")
        torch.testing.assert_close(token_loss_sum(model, mb), expected)
    head_lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lm_head.lora_" in n}
    train(model, examples, cfg(tmp_path, max_steps=2, gradient_accumulation_steps=1))
    assert head_lora and all(not torch.equal(p, head_lora[n]) for n, p in model.named_parameters() if n in head_lora)


def test_lr_schedules():
    assert lr_at(0, 10, 1.0, "constant", 4) == 0.25
    assert lr_at(3, 10, 1.0, "linear", 4) == 1.0
    assert lr_at(4, 10, 1.0, "linear", 4) == 1.0 and lr_at(7, 10, 1.0, "linear", 4) == 0.5
    assert lr_at(4, 10, 1.0, "cosine", 4) == 1.0 and abs(lr_at(7, 10, 1.0, "cosine", 4) - 0.5) < 1e-12
    assert lr_at(9, 10, 2.0, "constant", 0) == 2.0


@pytest.mark.parametrize(
    "n, batch, accum, epochs, steps", [(16, 2, 2, 2, 8), (10, 1, 4, 2, 5), (7, 1, 8, 3, 3), (9, 2, 2, 1, 3)]
)
def test_epochs_instead_of_max_steps_train_every_example_that_many_times(
    tokenizer, tmp_path, monkeypatch, n, batch, accum, epochs, steps
):
    import smolora.step
    import smolora.train

    model, examples = setup(tokenizer)
    seen = []
    monkeypatch.setattr(
        smolora.step, "collate", lambda exs, *a, **k: seen.extend(id(e) for e in exs) or collate(exs, *a, **k)
    )
    c = cfg(
        tmp_path,
        max_steps=-1,
        num_train_epochs=epochs,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum,
        max_tokens_per_batch=0,
        share_prefix=False,
    )
    result = train(model, examples[:n], c)
    assert result.steps == steps
    assert sorted(seen) == sorted(id(e) for e in examples[:n] for _ in range(epochs))


def test_epochs_are_exact_when_each_epoch_groups_its_own_way(tokenizer, tmp_path, monkeypatch):
    """Unpacked micro-batches under a token budget: each shuffled epoch makes a different number of them."""
    import smolora.step
    import smolora.train

    model, _ = setup(tokenizer)
    records = [
        {
            "messages": [
                {"role": "user", "content": "what is " + " plus".join(str(j) for j in range(i % 7 + 1)) + "?"},
                {"role": "assistant", "content": "x " * (1 + 5 * (i % 5))},
            ]
        }
        for i in range(24)
    ]
    examples = encode_records(records, tokenizer, FormatOptions())[0]
    seen = []
    monkeypatch.setattr(
        smolora.step, "collate", lambda exs, *a, **k: seen.extend(id(e) for e in exs) or collate(exs, *a, **k)
    )
    c = cfg(
        tmp_path,
        max_steps=-1,
        num_train_epochs=2,
        packing=False,
        max_tokens_per_batch=150,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
    )
    train(model, examples, c)
    assert sorted(seen) == sorted(id(e) for e in examples for _ in range(2))


# One row per micro-batch and no StepPrefix forward: the final norm runs exactly twice a step.
NO_STEP_PREFIX = dict(max_tokens_per_batch=0, share_prefix=False)


def poison_after(model, calls: int, until: int = 10**9):  # use with NO_STEP_PREFIX: 2 calls a step
    """Make the final norm's output NaN for training forward calls number calls+1 .. until (forwards
    without autograd, such as train()'s probe of the LM head, are not counted)."""
    count = {"n": 0}

    def hook(_module, _inputs, output):
        if not torch.is_grad_enabled():
            return output
        count["n"] += 1
        return output * float("nan") if calls < count["n"] <= until else output

    model.get_base_model().model.norm.register_forward_hook(hook)


def test_nan_stops_with_the_step_and_keeps_last_good_checkpoint(tokenizer, tmp_path):
    model, examples = setup(tokenizer)
    poison_after(model, calls=4)  # 2 micro-batches per step: step 3 is the first poisoned
    with pytest.raises(NonFiniteLossError, match=r"non-finite values at step 3 .*last good checkpoint: .*step-000002"):
        train(model, examples, cfg(tmp_path, save_steps=1, save_total_limit=0, **NO_STEP_PREFIX))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000001", "step-000002"]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_tolerance_skips_steps(tokenizer, tmp_path):
    model, examples = setup(tokenizer)
    poison_after(model, calls=4, until=6)  # only step 3 is poisoned
    result = train(
        model,
        examples,
        cfg(tmp_path / "a", max_steps=5, save_steps=3, save_total_limit=0, **NO_STEP_PREFIX),
        skip_nonfinite_steps=1,
    )
    assert len(result.losses) == 4 and result.steps == 5
    assert [c.name for c in list_checkpoints(tmp_path / "a")] == [
        "step-000003",
        "step-000005",
    ]  # a skipped step still saves
    model, examples = setup(tokenizer)
    poison_after(model, calls=6)  # steps 4, 5 skipped, then step 6 is one too many
    with pytest.raises(NonFiniteLossError, match="step 6"):
        train(model, examples, cfg(tmp_path / "b", max_steps=8, **NO_STEP_PREFIX), skip_nonfinite_steps=2)


@pytest.mark.parametrize("max_tokens", [512, 40])  # 40: several rows a step, sharing a StepPrefix
def test_resume_in_process_is_bit_identical(tokenizer, tmp_path, max_tokens):
    model, examples = setup(tokenizer, dropout=0.1)
    fresh = copy.deepcopy(model)
    settings = dict(
        max_steps=6, save_steps=3, save_total_limit=0, per_device_train_batch_size=2, max_tokens_per_batch=max_tokens
    )
    full = train(model, examples, cfg(tmp_path / "full", **settings))
    second = train(
        fresh,
        examples,
        cfg(tmp_path / "full", **settings),
        resume_from=tmp_path / "full" / "checkpoints" / "step-000003",
    )
    assert second.losses == full.losses
    for (n, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), n


def test_resuming_an_earlier_checkpoint_sets_the_later_ones_aside(tokenizer, tmp_path):
    model, examples = setup(tokenizer)
    settings = dict(max_steps=6, save_steps=2, save_total_limit=0, lr_scheduler_type="constant")
    train(copy.deepcopy(model), examples, cfg(tmp_path, **settings))
    train(
        model,
        examples,
        cfg(tmp_path, **{**settings, "max_steps": 3}),
        resume_from=tmp_path / "checkpoints" / "step-000002",
    )
    assert [c.name for c in list_checkpoints(tmp_path)] == ["step-000002", "step-000003"]  # what a plain --resume sees
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("abandoned-*")) == [
        "abandoned-step-000004",
        "abandoned-step-000006",
    ]


def test_output_names_cannot_escape_or_follow_symlinks(tmp_path):
    from smolora.checkpoint import safe_child
    from smolora.errors import SmoLoRAError

    assert safe_child(tmp_path, "checkpoints", "step-000001") == tmp_path / "checkpoints" / "step-000001"
    with pytest.raises(SmoLoRAError, match="'..'"):
        safe_child(tmp_path, "../elsewhere")
    with pytest.raises(SmoLoRAError, match="absolute"):
        safe_child(tmp_path, "/etc")
    (tmp_path / "outside").mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").symlink_to(tmp_path / "outside")
    with pytest.raises(SmoLoRAError, match="symlink"):
        safe_child(tmp_path / "run", "checkpoints", "step-000001")


def test_a_crash_mid_save_leaves_the_previous_checkpoint_and_no_partial_one(tokenizer, tmp_path):
    from smolora import checkpoint as ckpt

    model, examples = setup(tokenizer)
    train(model, examples, cfg(tmp_path, max_steps=2, save_steps=1, save_total_limit=0))
    before = [p.name for p in ckpt.list_checkpoints(tmp_path)]

    def crash(tmp):
        (tmp / "adapter_model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        publish(ckpt.checkpoint_dir(tmp_path, 3), crash, marker=True)
    with pytest.raises(OSError, match="disk full"):  # replacing an existing checkpoint fails safe too
        publish(ckpt.checkpoint_dir(tmp_path, 2), crash, marker=True)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == before == ["step-000001", "step-000002"]
    assert ckpt.find_resume_checkpoint(tmp_path, "auto").name == "step-000002"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before  # no temp folder left


def test_checkpoint_without_marker_is_never_resumed(tokenizer, tmp_path):
    from smolora import checkpoint as ckpt
    from smolora.errors import SmoLoRAError

    model, examples = setup(tokenizer)
    train(model, examples, cfg(tmp_path, max_steps=2, save_steps=1, save_total_limit=0))
    (tmp_path / "checkpoints" / "step-000002" / "COMPLETE").unlink()
    assert ckpt.find_resume_checkpoint(tmp_path, "auto").name == "step-000001"
    with pytest.raises(SmoLoRAError, match="not a complete checkpoint"):
        ckpt.find_resume_checkpoint(tmp_path, str(tmp_path / "checkpoints" / "step-000002"))


def test_validation_loss_at_interval_and_end(tokenizer, tmp_path):
    import math

    model, examples = setup(tokenizer)
    result = train(model, examples[:12], cfg(tmp_path, max_steps=5, eval_steps=2), val_examples=examples[12:])
    assert [s for s, _ in result.eval_losses] == [2, 4, 5]  # and at the end, unless it just did
    assert all(math.isfinite(loss) and loss > 0 for _, loss in result.eval_losses)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in logged if "eval_loss" in e]
    assert (
        len(evals) == 3
        and abs(evals[0]["eval_perplexity"] - math.exp(evals[0]["eval_loss"])) / evals[0]["eval_perplexity"] < 1e-3
    )


def scripted_eval(monkeypatch, losses, start=0):
    """Validation losses in this order, one per evaluation (``start``: how many a resumed run has had)."""
    import smolora.step
    import smolora.train

    calls = iter(losses[start:])
    monkeypatch.setattr(smolora.train, "evaluate_loss", lambda *a, **k: next(calls))


EARLY = dict(
    eval_steps=1, early_stopping_patience=2, lr_scheduler_type="constant", max_steps=8, save_steps=1, save_total_limit=0
)


def test_early_stopping_stops_after_patience_and_keeps_the_best_adapter(tokenizer, tmp_path, monkeypatch):
    scripted_eval(monkeypatch, [3.0, 2.0, 2.5, 2.6, 1.0])  # best at step 2; steps 3 and 4 no better: stop after 4
    model, examples = setup(tokenizer)
    result = train(model, examples[:12], cfg(tmp_path / "run", **EARLY), val_examples=examples[12:])
    assert result.steps == 4 and result.best_step == 2 and [s for s, _ in result.eval_losses] == [1, 2, 3, 4]
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-2] == {"step": 4, "best_step": 2, "best_eval_loss": 2.0} and "run_seconds" in logged[-1]
    # the kept adapter is bit for bit the one a 2-step run ends with
    reference, _ = setup(tokenizer)
    train(reference, examples[:12], cfg(tmp_path / "two", max_steps=2, lr_scheduler_type="constant"))
    for (n, a), (_, b) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(a, b), n


def test_early_stopping_resumes_exactly(tokenizer, tmp_path, monkeypatch):
    losses = [3.0, 2.0, 2.5, 2.6]
    scripted_eval(monkeypatch, losses)
    model, examples = setup(tokenizer)
    fresh = copy.deepcopy(model)
    full = train(model, examples[:12], cfg(tmp_path, **EARLY), val_examples=examples[12:])
    scripted_eval(monkeypatch, losses, start=3)  # resumed after step 3: the best (step 2) comes from the checkpoint
    resumed = train(
        fresh,
        examples[:12],
        cfg(tmp_path, **EARLY),
        val_examples=examples[12:],
        resume_from=tmp_path / "checkpoints" / "step-000003",
    )
    assert resumed.steps == full.steps == 4 and resumed.best_step == full.best_step == 2
    for (n, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), n


def test_the_end_of_run_evaluation_may_be_best_but_does_not_count_toward_patience(tokenizer, tmp_path, monkeypatch):
    scripted_eval(monkeypatch, [2.0, 2.5, 2.6])  # steps 2 and 4 on schedule; step 5 only because the run ends there
    model, examples = setup(tokenizer)
    result = train(
        model, examples[:12], cfg(tmp_path, **{**EARLY, "eval_steps": 2, "max_steps": 5}), val_examples=examples[12:]
    )
    assert result.steps == 5 and result.best_step == 2
    state = json.loads((tmp_path / "checkpoints" / "step-000005" / "trainer_state.json").read_text())
    assert state["evals_since_best"] == 1 and not state["stopped"]  # resumable for more steps


def test_resume_with_early_stopping_refuses_other_evaluations():
    from smolora.checkpoint import check_compatible
    from smolora.errors import SmoLoRAError

    saved = {
        "data_fingerprint": "a",
        "model_fingerprint": "m",
        "val_fingerprint": "v",
        "train_config": {"lr_scheduler_type": "constant", "eval_steps": 10, "early_stopping_patience": 3},
    }
    with pytest.raises(SmoLoRAError, match="eval_steps: 10 -> 20 \\(decides which adapter early stopping keeps\\)"):
        check_compatible(
            saved, {**saved, "train_config": {**saved["train_config"], "eval_steps": 20}}, allow_config_change=False
        )
    with pytest.raises(SmoLoRAError, match="validation data"):
        check_compatible(saved, {**saved, "val_fingerprint": "w"}, allow_config_change=False)
    plain = {**saved, "train_config": {"lr_scheduler_type": "constant", "eval_steps": 10}}
    check_compatible(
        plain,
        {**plain, "val_fingerprint": "w", "train_config": {"lr_scheduler_type": "constant", "eval_steps": 20}},
        allow_config_change=False,
    )


def test_early_stopping_needs_evaluations_and_validation_data():
    from smolora.config import DataConfig, validate
    from smolora.errors import SmoLoRAError

    lora = LoraSettings()
    with pytest.raises(SmoLoRAError, match="needs eval_steps > 0.*needs validation data"):
        validate(lora, TrainConfig(early_stopping_patience=3), DataConfig())
    validate(lora, TrainConfig(early_stopping_patience=3, eval_steps=10, val_size=0.1), DataConfig())
    validate(lora, TrainConfig(early_stopping_patience=3, eval_steps=10), DataConfig(validation_data="val.jsonl"))


def test_resume_refuses_other_data_or_base_model():
    from smolora.checkpoint import check_compatible
    from smolora.errors import SmoLoRAError

    saved = {"data_fingerprint": "a", "model_fingerprint": "m", "train_config": {"learning_rate": 1e-3}}
    with pytest.raises(SmoLoRAError, match="training data differs"):
        check_compatible(saved, {**saved, "data_fingerprint": "b"}, allow_config_change=True)
    with pytest.raises(SmoLoRAError, match="base model differs"):
        check_compatible(saved, {**saved, "model_fingerprint": "x"}, allow_config_change=True)
    check_compatible(
        saved, {**saved, "train_config": {"learning_rate": 1e-3, "save_steps": 5}}, allow_config_change=False
    )


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_resume_for_more_steps_only_where_the_schedule_does_not_depend_on_the_length(schedule):
    from smolora.checkpoint import check_compatible
    from smolora.errors import SmoLoRAError

    saved = {
        "data_fingerprint": "a",
        "model_fingerprint": "m",
        "train_config": {"lr_scheduler_type": schedule, "max_steps": 100},
    }
    longer = {**saved, "train_config": {"lr_scheduler_type": schedule, "max_steps": 200}}
    if schedule == "constant":
        check_compatible(saved, longer, allow_config_change=False)
    else:
        with pytest.raises(
            SmoLoRAError, match=f"max_steps: 100 -> 200 \\(sets the {schedule} schedule's learning rates\\)"
        ):
            check_compatible(saved, longer, allow_config_change=False)
    check_compatible(saved, longer, allow_config_change=True)


def test_partial_target_match_warns_with_count(tokenizer, said):
    from smolora.lora import check_targets

    model = build_tiny_llama(len(tokenizer))
    model.model.layers[1].self_attn.q_proj = torch.nn.Identity()  # layer 1 has no q_proj linear
    check_targets(model, ["q_proj", "v_proj"])
    assert said == ["[smolora] warning: target 'q_proj' matches only 1 of 2 layers"]


def test_fast_dropout_keeps_1_minus_p_follows_torch_rng_and_backprops_its_mask():
    from smolora.fast.dropout import FastDropout

    drop = FastDropout(0.1)
    x = torch.randn(1000, 1000, requires_grad=True)
    torch.manual_seed(3)
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 2e-3  # 1e6 draws: std of the mean is 3e-4
    torch.testing.assert_close(y[kept], x[kept] / 0.9)
    torch.manual_seed(3)
    assert torch.equal(drop(x), y)  # the mask follows torch's RNG state
    assert not torch.equal(drop(x), y)  # and moves on with it
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, kept.float() / 0.9)
    assert torch.equal(drop.eval()(x), x)


@pytest.mark.parametrize("p", [25.5 / 256, 0.5 + 2**-30])
def test_fast_dropout_ties_on_the_high_byte_are_decided_by_the_low_bits(p):
    """The mask's 32-bit draw is its high byte and, where that equals the threshold's, 24 more
    bits. At 25.5/256 half the ties (1/256 of the elements) are kept: keeping all or none of them
    would move the keep rate by 0.002, 6 standard deviations of 1e6 draws."""
    from smolora.fast.dropout import FastDropout

    torch.manual_seed(0)
    kept = FastDropout(p).mask(torch.empty(1000, 1000)).double().mean().item()
    assert abs(kept - (1 - p)) < 1e-3


def test_fast_dropout_is_swapped_in_for_training_and_back_out(tokenizer, tmp_path):
    from smolora.fast.dropout import FastDropout, fast_dropout

    model, _ = setup(tokenizer, dropout=0.1)
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    with fast_dropout(model):
        assert sum(isinstance(m, FastDropout) for m in model.modules()) == len(drops) > 0
    assert [m for m in model.modules() if isinstance(m, torch.nn.Dropout)] == drops


def _saved_bytes(model, mb) -> int:
    """Bytes autograd keeps for backward over one forward (each storage counted once)."""
    from smolora.fast.head_loss import loss_sum as token_loss_sum

    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        token_loss_sum(model, mb)
    return sum(storages.values())


def test_dropout_and_lora_a_in_one_function_train_the_same_and_save_less(tokenizer, tmp_path, monkeypatch):
    from smolora.fast import dropout as lora

    def run(fused: bool, out):
        if not fused:
            monkeypatch.setattr(lora, "_dropout_lora_forward", lambda layer, original: original)
        model, examples = setup(tokenizer, dropout=0.1)
        mb = collate(examples[:4], True, 0)
        model.train()
        with lora.fast_dropout(model):
            saved = _saved_bytes(model, mb)
        result = train(model, examples, cfg(out))
        monkeypatch.undo()
        return saved, result.losses, {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    saved, losses, weights = run(True, tmp_path / "fused")
    saved_plain, losses_plain, weights_plain = run(False, tmp_path / "plain")
    torch.testing.assert_close(losses, losses_plain, rtol=1e-6, atol=1e-6)
    for (
        n,
        w,
    ) in weights.items():  # smolora.fast.native's A product sums in another order: after 4 Adam steps at lr 1e-2, ~3e-6
        torch.testing.assert_close(w, weights_plain[n], rtol=1e-5, atol=1e-5, msg=n)
    # a layer's q/k/v adapters read one normed input, its gate/up adapters another: each saved once,
    # not as dropped copies
    assert saved < saved_plain


def test_dropout_lora_function_gradients():
    from smolora.fast.dropout import DropoutLinear

    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    keep = torch.rand(2, 5, 6) > 0.3
    torch.autograd.gradcheck(lambda x, w: DropoutLinear.apply(x, keep, 1 / 0.7, w), (x, w))


def test_every_lora_config_field_set_through_the_api_reaches_the_adapter(tmp_path, tiny_model_dir):
    from smolora import SmoLoRA

    lora = SmoLoRA(base_model_name=str(tiny_model_dir), dataset_name=chat_records(8), output_dir=str(tmp_path))
    lora.peft_config.use_rslora = True
    lora.peft_config.layers_to_transform = [0]
    lora.peft_config.target_modules = "all-linear"
    lora.sft_config.max_steps, lora.sft_config.gradient_accumulation_steps = 1, 1
    lora.train()
    saved = json.loads((tmp_path / "adapter_checkpoint" / "adapter_config.json").read_text())
    assert saved["use_rslora"] and saved["layers_to_transform"] == [0]
    assert sorted(saved["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    assert all(".layers.0." in n for n, p in lora.model.named_parameters() if p.requires_grad)


def test_settings_refuse_unknown_names_and_say_which_spec_names_do_nothing():
    from smolora.config import DataConfig

    c = TrainConfig()
    with pytest.raises(AttributeError, match="no setting 'max_step'; did you mean 'max_steps'"):
        c.max_step = 10
    with pytest.warns(UserWarning, match="dataloader_num_workers has no effect"):
        c.dataloader_num_workers = 2
    with pytest.raises(AttributeError, match="no setting 'lora_r'"):
        LoraSettings().lora_r = 4
    with pytest.raises(AttributeError):
        DataConfig().shapes = "chat"
    c.max_steps = 10
    assert c.max_steps == 10


# ---------------------------------------------------------------------------------------------
# rank growth


def logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.mark.parametrize("rslora", [False, True])
def test_growing_the_rank_keeps_the_output_and_peft_loads_the_grown_adapter(tokenizer, tmp_path, rslora):
    from peft import LoraConfig, PeftModel, get_peft_model

    from smolora.lora import grow_rank

    base = build_tiny_llama(len(tokenizer), tie=False)
    config = LoraConfig(
        r=4, lora_alpha=8, use_rslora=rslora, target_modules=["q_proj", "down_proj", "lm_head", "embed_tokens"]
    )
    model = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.5)  # both factors nonzero, as after training
    ids = torch.randint(0, len(tokenizer), (1, 12))
    before = logits(model, ids)
    generator = torch.Generator().manual_seed(0)
    alpha = grow_rank(model, 6, generator=generator)
    assert alpha == pytest.approx(8 * (6 / 4) ** (0.5 if rslora else 1.0))
    assert (config.r, config.lora_alpha) == (4, 8) and model.peft_config[
        "default"
    ].r == 6  # the caller's config is left alone
    layer = model.base_model.model.model.layers[0]
    assert layer.self_attn.q_proj.lora_A["default"].weight.shape == (6, 32)
    assert layer.mlp.down_proj.lora_B["default"].weight.shape == (32, 6)
    assert model.base_model.model.model.embed_tokens.lora_embedding_A["default"].shape == (6, len(tokenizer))
    assert torch.allclose(logits(model, ids), before, atol=1e-5)
    assert not torch.equal(
        layer.self_attn.q_proj.lora_A["default"].weight[4:], torch.zeros(2, 32)
    )  # new directions to learn
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["r"] == 6 and saved["lora_alpha"] == pytest.approx(alpha)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)  # the real reader, from the files alone
    assert torch.allclose(logits(loaded, ids), before, atol=1e-5)


def test_the_optimizer_state_grows_with_the_adapter(tokenizer):
    from smolora.lora import grow_rank

    model, examples = setup(tokenizer, dropout=0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    from smolora.fast.head_loss import loss_sum as token_loss_sum

    token_loss_sum(model, collate(examples[:2])).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    moments = {k: v.clone() for k, v in optimizer.state[q.lora_A["default"].weight].items()}
    grow_rank(model, 16, optimizer, torch.Generator().manual_seed(0))
    a = q.lora_A["default"].weight  # a new Parameter, in the old one's place in the optimizer
    assert sum(p is a for p in optimizer.param_groups[0]["params"]) == 1 and len(optimizer.state) == len(params)
    state = optimizer.state[a]
    assert a.shape == state["exp_avg"].shape == state["exp_avg_sq"].shape == (16, 32)
    assert torch.equal(state["exp_avg"][:8], moments["exp_avg"]) and not state["exp_avg"][8:].any()
    assert torch.equal(state["exp_avg_sq"][:8], moments["exp_avg_sq"])
    assert torch.allclose(state["exp_avg_sq"][8:], moments["exp_avg_sq"].mean().expand(8, 32))
    token_loss_sum(model, collate(examples[:2])).backward()
    before = a.detach().clone()
    optimizer.step()  # the optimizer trains the grown factor on
    assert torch.isfinite(a).all() and not torch.equal(a, before)


GROW = dict(grow_rank=[4, 8], max_steps=6, save_steps=1, save_total_limit=0)


def test_training_grows_the_rank_at_equal_shares_and_resumes_bit_identically(tokenizer, tmp_path):
    from peft import LoraConfig

    from smolora.lora import add_lora

    def fresh():
        torch.manual_seed(0)
        return add_lora(
            build_tiny_llama(len(tokenizer)),
            LoraConfig(r=2, lora_alpha=4, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]),
        )

    examples = encode_records(chat_records(16), tokenizer, FormatOptions())[0]
    model = fresh()
    full = train(model, examples, cfg(tmp_path / "run", **GROW))
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(e["step"], e["rank"], e["lora_alpha"]) for e in logged if "rank" in e] == [(2, 4, 8), (4, 8, 16)]
    ranks = [json.loads((c / "adapter_config.json").read_text())["r"] for c in list_checkpoints(tmp_path / "run")]
    assert ranks == [2, 2, 4, 4, 8, 8]  # each checkpoint holds the rank its last step trained at
    assert model.peft_config["default"].r == 8 and len(full.losses) == 6
    for step in (2, 3):  # resumed just before a growth, and after one
        resumed = fresh()
        again = train(
            resumed,
            examples,
            cfg(tmp_path / "run", **GROW),
            resume_from=tmp_path / "run" / "checkpoints" / f"step-00000{step}",
        )
        assert again.losses == full.losses
        for (n, a), (_, b) in zip(model.named_parameters(), resumed.named_parameters()):
            assert torch.equal(a, b), n


def test_early_stopping_keeps_the_best_adapter_of_a_lower_rank(tokenizer, tmp_path, monkeypatch):
    scripted_eval(monkeypatch, [3.0, 2.0, 2.5, 2.6])  # best at step 2; 8 steps at ranks 8, 16, 32: 16 from step 3
    model, examples = setup(tokenizer)
    result = train(
        model, examples[:12], cfg(tmp_path / "run", **{**EARLY, "grow_rank": [16, 32]}), val_examples=examples[12:]
    )
    assert result.best_step == 2 and model.peft_config["default"].r == 16
    reference, _ = setup(tokenizer)
    train(reference, examples[:12], cfg(tmp_path / "two", max_steps=2, lr_scheduler_type="constant"))
    ids = torch.tensor([examples[0].input_ids])
    assert torch.allclose(logits(model, ids), logits(reference, ids), atol=1e-5)  # zero-padded: the same function


def test_rank_growth_settings_are_checked():
    from smolora.checkpoint import check_compatible
    from smolora.config import validate
    from smolora.errors import SmoLoRAError

    for bad in ([8], [16, 12], [12, 12], [16.0], 16, None):
        with pytest.raises(SmoLoRAError, match="grow_rank must be a list of increasing ranks above r=8"):
            validate(LoraSettings(r=8), TrainConfig(grow_rank=bad))
    validate(LoraSettings(r=4), TrainConfig(grow_rank=[8, 16]))
    validate(LoraSettings(r=4), TrainConfig(grow_rank=(8, 16)))
    saved = {
        "data_fingerprint": "a",
        "model_fingerprint": "m",
        "train_config": {"lr_scheduler_type": "constant", "max_steps": 100, "grow_rank": [16]},
    }
    with pytest.raises(SmoLoRAError, match="max_steps: 100 -> 200 \\(sets the steps where the rank grows\\)"):
        check_compatible(
            saved, {**saved, "train_config": {**saved["train_config"], "max_steps": 200}}, allow_config_change=False
        )


def test_a_grown_checkpoint_resumes_into_a_fresh_model_even_without_growth_and_a_misfit_is_one_line(
    tokenizer, tmp_path
):
    from smolora.errors import SmoLoRAError

    model, examples = setup(tokenizer)
    train(
        model, examples, cfg(tmp_path, max_steps=4, save_steps=1, save_total_limit=0, grow_rank=[16], seed=2**62)
    )  # any seed
    assert model.peft_config["default"].r == 16
    fresh, _ = setup(tokenizer)  # rank 8, asked for no growth (--allow-config-change): the checkpoint's rank 16 stays
    train(
        fresh,
        examples,
        cfg(tmp_path, max_steps=4, lr_scheduler_type="constant"),
        resume_from=tmp_path / "checkpoints" / "step-000003",
    )
    assert fresh.peft_config["default"].r == 16
    bigger = add_lora(build_tiny_llama(len(tokenizer)), LoraSettings(r=32, target_modules=["all"]).to_peft())
    with pytest.raises(
        SmoLoRAError, match=r"step-000004: the checkpoint's adapter does not fit this run's \(size mismatch for"
    ):
        train(bigger, examples, cfg(tmp_path, max_steps=4), resume_from=tmp_path / "checkpoints" / "step-000004")


def test_rank_growth_through_the_api_resumes_with_a_tuple_setting(tmp_path, tiny_model_dir):
    from smolora import SmoLoRA

    def run(resume):
        lora = SmoLoRA(base_model_name=str(tiny_model_dir), dataset_name=chat_records(8), output_dir=str(tmp_path))
        lora.peft_config.r, lora.sft_config.grow_rank = 4, (8,)
        lora.sft_config.max_steps, lora.sft_config.gradient_accumulation_steps, lora.sft_config.save_steps = 2, 1, 1
        lora.train(resume=resume)
        return json.loads((tmp_path / "adapter_checkpoint" / "adapter_config.json").read_text())

    assert run(None)["r"] == 8
    assert run(True)["r"] == 8  # the saved settings read back as lists: the same run


def test_resume_with_nothing_to_resume_says_it_starts_at_step_0(tmp_path, tiny_model_dir, capsys):
    from smolora import SmoLoRA

    run = SmoLoRA(base_model_name=str(tiny_model_dir), dataset_name=chat_records(8), output_dir=str(tmp_path / "new"))
    run.sft_config.max_steps, run.sft_config.gradient_accumulation_steps = 2, 1
    assert run.train(resume=True).steps == 2
    assert f"nothing to resume in {tmp_path / 'new'} yet: starting at step 0" in capsys.readouterr().out


def test_an_output_folder_with_a_runs_outputs_is_never_trained_over_silently(tmp_path, tiny_model_dir, monkeypatch):
    import smolora.run
    from smolora import SmoLoRA
    from smolora.errors import SmoLoRAError

    def lora():
        run = SmoLoRA(base_model_name=str(tiny_model_dir), dataset_name=chat_records(8), output_dir=str(tmp_path))
        run.sft_config.max_steps, run.sft_config.gradient_accumulation_steps = 2, 1
        return run

    (tmp_path / "final_merged").mkdir()
    (tmp_path / "final_merged" / "keep.txt").write_text("mine")
    with pytest.raises(SmoLoRAError, match=r"holds an earlier run \(final_merged\); pass --resume"):
        lora().train()
    with pytest.raises(
        SmoLoRAError, match=r"holds an earlier run \(final_merged\) but no complete checkpoint to resume"
    ):
        lora().train(resume=True)
    assert (tmp_path / "final_merged" / "keep.txt").read_text() == "mine"
    lora().train(overwrite=True)
    changed = lora()
    changed.sft_config.learning_rate = 1e-3
    monkeypatch.setattr(
        smolora.run, "load_model", lambda *a, **k: pytest.fail("the model loaded before the settings were checked")
    )
    with pytest.raises(SmoLoRAError, match="cannot resume: settings differ.*learning_rate"):
        changed.train(resume=True)


def test_settings_that_would_be_silently_ignored_or_misread_are_refused():
    from smolora.config import DataConfig, validate
    from smolora.errors import SmoLoRAError

    lora = LoraSettings(r=4)
    with pytest.raises(
        SmoLoRAError, match=r"val_size must be a fraction below 1 or a whole count of examples \(got 1.5\)"
    ):
        validate(lora, TrainConfig(val_size=1.5), DataConfig())
    with pytest.raises(SmoLoRAError, match=r"eval_steps needs validation data"):
        validate(lora, TrainConfig(eval_steps=10), DataConfig())
    with pytest.raises(
        SmoLoRAError, match=r"grow_rank \[8, 16\] needs max_steps >= 3: a step or more at each rank \(got 2\)"
    ):
        validate(lora, TrainConfig(grow_rank=[8, 16], max_steps=2), DataConfig())
    validate(lora, TrainConfig(val_size=5, eval_steps=10, grow_rank=[8, 16], max_steps=3), DataConfig())
