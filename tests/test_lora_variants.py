"""LoRA variants (rsLoRA, DoRA, the inits PEFT offers, LoRA+) and rank by task: each trains, resumes
bit-identically, saves an adapter PEFT loads on the untouched base to our logits, merges to the
adapter's logits, and grows its rank where the variant allows it."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import build_tiny_llama, chat_records
from smolora.config import LoraSettings, TrainConfig, validate
from smolora.data.formats import FormatOptions, encode_records
from smolora.errors import SmoLoRAError
from smolora.lora import add_lora, check_growable, grow_rank
from smolora.loss import evaluate_loss
from smolora.merge import merge_adapter

# name: (LoraSettings fields, TrainConfig fields)
VARIANTS = {
    "rslora": ({"use_rslora": True}, {}),
    "dora": ({"use_dora": True}, {}),
    "gaussian": ({"init_lora_weights": "gaussian"}, {}),
    "orthogonal": ({"init_lora_weights": "orthogonal"}, {}),
    "pissa": ({"init_lora_weights": "pissa"}, {}),
    "olora": ({"init_lora_weights": "olora"}, {}),
    "loraplus": ({}, {"loraplus_lr_ratio": 16.0}),
}
MOVES_BASE = {"pissa", "olora"}


def run(tiny_model_dir, out, name: str, resume=None):
    from smolora import SmoLoRA

    lora_fields, train_fields = VARIANTS[name]
    lora = SmoLoRA(base_model_name=str(tiny_model_dir), dataset_name=chat_records(16), output_dir=str(out))
    lora.peft_config = LoraSettings(r=4, lora_alpha=8, target_modules=["all-linear"], **lora_fields).to_peft()
    settings = dict(
        max_steps=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        save_steps=2,
        save_total_limit=0,
        logging_steps=1,
        seed=1,
        **train_fields,
    )
    for key, value in settings.items():
        setattr(lora.sft_config, key, value)
    return lora, lora.train(resume=resume)


def logits_of(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.mark.parametrize("name", VARIANTS)
def test_a_variant_trains_resumes_exactly_and_merges_to_the_adapter(tokenizer, tiny_model_dir, tmp_path, name):
    lora, full = run(tiny_model_dir, tmp_path / "run", name)
    examples = encode_records(chat_records(16), tokenizer, FormatOptions())[0]
    ids = torch.tensor([examples[3].input_ids])
    ours = logits_of(lora.model, ids)
    trained = {n: p.detach().clone() for n, p in lora.model.named_parameters() if p.requires_grad}

    # PEFT loads the saved adapter on the untouched base (PiSSA/OLoRA: converted to a plain LoRA) to our logits
    adapter = tmp_path / "run" / "adapter_checkpoint"
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["r"] == (8 if name in MOVES_BASE else 4) and saved["init_lora_weights"] in (
        True,
        "gaussian",
        "orthogonal",
    )
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter)
    theirs = logits_of(loaded, ids)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    with loaded.disable_adapter():  # trained: the adapter lowers the loss from the base's
        base_loss = evaluate_loss(loaded, examples)
    assert evaluate_loss(loaded, examples) < base_loss - 0.01

    merged = AutoModelForCausalLM.from_pretrained(lora.save())
    torch.testing.assert_close(logits_of(merged, ids), theirs, atol=1e-4, rtol=0)
    if name in MOVES_BASE:  # a checkpoint's factors fit the moved base only: merging one is refused
        with pytest.raises(SmoLoRAError, match=f"init_lora_weights {name} fits only the base its init moved"):
            merge_adapter(tmp_path / "run" / "checkpoints" / "step-000004", tmp_path / "m", str(tiny_model_dir))

    # resumed from the middle, into a fresh model: the same steps, bit for bit
    again, resumed = run(
        tiny_model_dir, tmp_path / "run", name, resume=tmp_path / "run" / "checkpoints" / "step-000002"
    )
    assert resumed.losses == full.losses
    for n, p in again.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, trained[n]), n


def test_loraplus_trains_b_at_its_multiple_of_a_and_the_checkpoint_keeps_the_groups(tiny_model_dir, tmp_path):
    lora, _ = run(tiny_model_dir, tmp_path / "run", "loraplus")
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    groups = state["optimizer"]["param_groups"]
    assert [g["lr_scale"] for g in groups] == [1.0, 16.0]
    assert groups[1]["lr"] == pytest.approx(16 * groups[0]["lr"]) and groups[0]["lr"] > 0
    names = [n for n, p in lora.model.named_parameters() if p.requires_grad]
    assert len(groups[1]["params"]) == sum("lora_B" in n for n in names) == len(names) // 2


def test_loraplus_moves_b_by_its_multiple_of_a_plain_sgd_step(tokenizer, tmp_path):
    """SGD, one step from nonzero factors: B's change is 16 times the one LoRA's own learning rate gives,
    A's the same."""
    from smolora.train import train

    examples = encode_records(chat_records(4), tokenizer, FormatOptions())[0]

    def one_step(ratio):
        torch.manual_seed(0)
        model = add_lora(build_tiny_llama(len(tokenizer)), LoraSettings(r=4, lora_dropout=0.0).to_peft())
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        settings = dict(max_steps=1, optim="sgd", learning_rate=1e-2, lr_scheduler_type="constant", max_grad_norm=0)
        train(model, examples, TrainConfig(output_dir=str(tmp_path / str(ratio)), loraplus_lr_ratio=ratio, **settings))
        return {n: p.detach() - before[n] for n, p in model.named_parameters() if p.requires_grad}

    plain, plus = one_step(0.0), one_step(16.0)
    for n, change in plain.items():
        torch.testing.assert_close(plus[n], change * (16 if "lora_B" in n else 1), atol=1e-6, rtol=1e-3)
    assert max(c.abs().max() for c in plain.values()) > 1e-5


@pytest.mark.parametrize("name", VARIANTS)
def test_rank_growth_keeps_the_output_where_the_variant_allows_it(tokenizer, name):
    lora_fields, _ = VARIANTS[name]
    torch.manual_seed(0)
    model = add_lora(
        build_tiny_llama(len(tokenizer)), LoraSettings(r=4, target_modules=["all"], **lora_fields).to_peft()
    )
    if name in MOVES_BASE:
        with pytest.raises(SmoLoRAError, match=f"init_lora_weights='{name}', which moves the base weights"):
            check_growable(model)
        return
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn_like(p) * 0.1)  # as after training
    ids = torch.tensor([list(range(3, 15))])
    before = logits_of(model, ids)
    grow_rank(model, 8, generator=torch.Generator().manual_seed(0))
    assert model.peft_config["default"].r == 8
    torch.testing.assert_close(logits_of(model, ids), before, atol=1e-5, rtol=0)


def test_bad_variant_settings_are_one_line_each():
    problems = {
        "init_lora_weights must be one of default, gaussian": LoraSettings(init_lora_weights="eva"),
        "init_lora_weights pissa cannot go with use_dora": LoraSettings(init_lora_weights="pissa", use_dora=True),
        "orthogonal needs an even r": LoraSettings(r=5, init_lora_weights="orthogonal"),
    }
    for message, settings in problems.items():
        with pytest.raises(SmoLoRAError, match=message):
            validate(settings, TrainConfig())
    with pytest.raises(SmoLoRAError, match="loraplus_lr_ratio must be >= 0"):
        validate(LoraSettings(), TrainConfig(loraplus_lr_ratio=-1))
    validate(LoraSettings(init_lora_weights="pissa_niter_4").to_peft(), TrainConfig())


def test_task_picks_the_rank_and_alpha_unless_given():
    assert (LoraSettings(task="domain").for_task().r, LoraSettings(task="domain").for_task().lora_alpha) == (4, 8)
    capability = LoraSettings(task="capability").for_task(lora_alpha=8)
    assert (capability.r, capability.lora_alpha) == (16, 8)
    style = LoraSettings(task="style").for_task(r=2)
    assert (style.r, style.lora_alpha) == (2, 4)
    assert (LoraSettings(r=6).for_task().r, LoraSettings(r=6).for_task().lora_alpha) == (6, 16)  # no task
    with pytest.raises(SmoLoRAError, match="task must be one of domain, style, capability"):
        LoraSettings(task="chat").for_task()


def test_the_command_line_takes_the_variants_and_the_task_and_says_what_it_chose(tiny_model_dir, tmp_path):
    from conftest import write_jsonl
    from test_cli import smolora

    data = write_jsonl(tmp_path / "train.jsonl", chat_records(8))
    out = tmp_path / "run"
    flags = ["--use-rslora", "--use-dora", "--init-lora-weights", "gaussian", "--loraplus-lr-ratio", 4]
    r = smolora(
        "train",
        *("--data", data, "--output", out, "--model", tiny_model_dir, "--max-steps", 2, "--no-merge"),
        *("--task", "capability", "--lora-alpha", 8, "--target-modules", "attention", *flags),
    )
    said = r.stdout + r.stderr
    assert r.returncode == 0, said[-2000:]
    assert "task capability: r 16, lora_alpha 8" in said
    assert (
        "LoRA on 8 layers: q_proj x2 (query), k_proj x2 (key), v_proj x2 (value), o_proj x2 (attention output)" in said
    )
    saved = json.loads((out / "adapter_checkpoint" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["use_rslora"], saved["use_dora"]) == (16, 8, True, True)
    assert saved["init_lora_weights"] == "gaussian"
    state = json.loads((out / "checkpoints" / "step-000002" / "trainer_state.json").read_text())
    assert state["lora_config"]["r"] == 16 and state["train_config"]["loraplus_lr_ratio"] == 4
    r = smolora("train", "--data", data, "--output", tmp_path / "bad", "--model", tiny_model_dir, "--task", "chat")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert r.stderr.endswith("task must be one of domain, style, capability (got 'chat')\n")


def test_a_deep_copy_of_the_settings_is_what_peft_holds(tokenizer):
    """add_lora resolves the presets on a copy: the caller's config still says what was asked."""
    config = LoraSettings(target_modules=["all-linear"]).to_peft()
    asked = copy.deepcopy(config.target_modules)
    model = add_lora(build_tiny_llama(len(tokenizer)), config)
    assert config.target_modules == asked
    assert sorted(model.peft_config["default"].target_modules) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


def test_loraplus_and_dora_through_rank_growth_resume_bit_identically(tokenizer, tmp_path):
    """Growth replaces each factor by a larger one in its own optimizer group (B stays at its multiple),
    and a resumed run grows the fresh model to the checkpoint's rank before loading it."""
    from smolora.train import train

    examples = encode_records(chat_records(16), tokenizer, FormatOptions())[0]

    def fresh():
        torch.manual_seed(0)
        settings = LoraSettings(r=2, lora_alpha=4, use_dora=True, target_modules=["qv"])
        return add_lora(build_tiny_llama(len(tokenizer)), settings.to_peft())

    settings = dict(
        output_dir=str(tmp_path),
        max_steps=6,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        save_steps=1,
        save_total_limit=0,
        seed=1,
        grow_rank=[4, 8],
        loraplus_lr_ratio=8.0,
    )
    model = fresh()
    full = train(model, examples, TrainConfig(**settings))
    assert model.peft_config["default"].r == 8
    state = json.loads((tmp_path / "checkpoints" / "step-000006" / "trainer_state.json").read_text())
    assert [g["lr_scale"] for g in state["optimizer"]["param_groups"]] == [1.0, 8.0]
    resumed = fresh()
    again = train(resumed, examples, TrainConfig(**settings), resume_from=tmp_path / "checkpoints" / "step-000003")
    assert again.losses == full.losses
    for (n, a), (_, b) in zip(model.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n
