"""The speed wing's door: every lever undone exactly, a lever that does not fit skipped with one warning,
and the plain path (``fast=False``) training the same steps as the wing."""

from __future__ import annotations

import sys

import pytest
import torch

import smolora.fast.door
from conftest import ARCHITECTURES, build_tiny, chat_records
from smolora.config import LoraSettings, TrainConfig
from smolora.data.formats import FormatOptions, encode_records
from smolora.fast import LEVERS, accelerated
from smolora.fast.patch import Patches
from smolora.lora import add_lora
from smolora.train import train


class _Thing:
    def method(self):
        return "class"


def test_patches_put_back_exactly_what_was_there_newest_first():
    thing, mapping = _Thing(), {"kept": 1}
    thing.own = "own"
    patches = Patches()
    patches.attribute(thing, "method", lambda: "patched")  # the class's method: no attribute of its own before
    patches.attribute(thing, "own", "first")
    patches.attribute(thing, "own", "second")  # nested on the same attribute
    patches.item(mapping, "kept", 2)
    patches.item(mapping, "new", 3)
    assert (thing.method(), thing.own, mapping) == ("patched", "second", {"kept": 2, "new": 3})
    assert patches.restore() == []
    assert "method" not in vars(thing) and thing.method() == "class"
    assert thing.own == "own" and mapping == {"kept": 1}


def test_a_patch_something_else_replaced_is_left_as_found_and_reported():
    thing = _Thing()
    patches = Patches()
    patches.attribute(thing, "method", lambda: "ours", "lever A")
    del thing.method  # another party (transformers' hub kernels do this on train()/eval())
    patches.attribute(thing, "other", 1, "lever B")
    thing.other = 2
    assert patches.restore() == ["lever A", "lever B"]
    assert "method" not in vars(thing) and thing.other == 2


def _peft(arch: str, vocab: int, seed: int = 0, dropout: float = 0.0):
    model = build_tiny(arch, vocab, seed=seed)
    torch.manual_seed(seed)
    settings = LoraSettings(lora_dropout=dropout, target_modules=["all"])
    return add_lora(model, settings.to_peft())


def _state(model) -> dict:
    """Every module's own attributes, and the modeling modules' functions: what a lever could change."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    modules = {name: dict(vars(m)) for name, m in model.named_modules()}
    for own in modules.values():
        own.pop("training", None)
    modeling = {type(m).__module__ for m in model.modules()}
    functions = {name: dict(vars(sys.modules[name])) for name in modeling if name in sys.modules}
    return {"modules": modules, "functions": functions, "attention": lm.config._attn_implementation}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_door_undoes_every_lever_exactly_also_when_the_block_raises(tokenizer, arch):
    model = _peft(arch, len(tokenizer), dropout=0.1)
    before = _state(model)
    with accelerated(model) as speed:
        assert speed.levers and set(speed.levers) <= set(LEVERS)
        assert _state(model) != before
    assert _state(model) == before
    with pytest.raises(RuntimeError, match="in flight"), accelerated(model):
        raise RuntimeError("in flight")
    assert _state(model) == before


def test_the_plain_path_changes_nothing(tokenizer, monkeypatch):
    model = _peft("llama", len(tokenizer))
    before = _state(model)
    with accelerated(model, fast=False) as speed:
        assert speed.levers == [] and _state(model) == before
    monkeypatch.setenv("SMOLORA_FAST", "0")
    with accelerated(model) as speed:
        assert speed.levers == [] and _state(model) == before


def test_a_lever_that_fails_is_skipped_with_one_warning_and_the_others_stay(tokenizer, monkeypatch, said):
    model = _peft("llama", len(tokenizer))
    before = _state(model)

    def half_then_fail(lm, patches):  # patches something, then meets a transformers it does not know
        patches.attribute(lm.model.norm, "forward", lambda x: x, "fused layers")
        raise AttributeError("'LlamaRMSNorm' object has no attribute 'variance_epsilon'")

    monkeypatch.setattr(smolora.fast.door, "patch_fused", half_then_fail)
    with accelerated(model) as speed:
        assert "fused layers" not in speed.levers and "fast dropout" in speed.levers
        assert "forward" not in vars(model.get_base_model().model.norm)  # its half-done patch was undone at once
    assert len(said) == 1 and said[0].startswith("[smolora] warning: fused layers skipped (AttributeError")
    assert _state(model) == before


def test_a_lever_undone_by_something_else_mid_run_warns_and_never_raises(tokenizer, said):
    """transformers >= 5.25 with hub kernels pops every kernel layer's ``forward`` on train()/eval()."""
    model = _peft("llama", len(tokenizer))
    with accelerated(model):
        for module in model.modules():
            if type(module).__name__ == "LlamaRMSNorm":
                module.__dict__.pop("forward", None)
    assert said == [
        "[smolora] warning: fused layers: something else replaced what it patched during the run; left as found"
    ]
    assert not any("forward" in vars(m) for m in model.modules())


def _examples(tokenizer, n: int = 16):
    return encode_records(chat_records(n), tokenizer, FormatOptions())[0]


def _train(tokenizer, tmp_path, arch: str, fast: bool, **settings):
    model = _peft(arch, len(tokenizer))
    settings = {"max_steps": 4, "gradient_accumulation_steps": 2, "learning_rate": 1e-2, "logging_steps": 2, **settings}
    cfg = TrainConfig(output_dir=str(tmp_path), seed=1, fast=fast, **settings)
    result = train(model, _examples(tokenizer), cfg)
    return result.losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_plain_path_trains_the_same_steps_as_the_speed_wing(tokenizer, tmp_path, arch):
    """Dropout 0: the wing's masks are drawn by another generator than torch's. SGD: Adam's first
    steps move each weight by about the learning rate whatever its gradient's size, so a gradient
    near 0 that the two paths round apart would flip that weight's step; SGD's update is the
    gradient's, so the adapters compare the gradients themselves."""
    settings = {"optim": "sgd", "learning_rate": 0.5}
    fast_losses, fast_adapter = _train(tokenizer, tmp_path / "fast", arch, fast=True, **settings)
    plain_losses, plain_adapter = _train(tokenizer, tmp_path / "plain", arch, fast=False, **settings)
    assert fast_losses == pytest.approx(plain_losses, rel=1e-4)
    for name, value in plain_adapter.items():
        torch.testing.assert_close(fast_adapter[name], value, rtol=1e-4, atol=1e-4)
    assert max(v.abs().max() for n, v in plain_adapter.items() if "lora_B" in n) > 1e-3  # a real update


def test_training_leaves_no_trace_on_a_model_used_after_it(tokenizer, tmp_path):
    """Two models trained one after the other in one process, then a plain transformers model: each
    behaves as if SmoLoRA had never run."""
    ids = torch.randint(0, len(tokenizer), (1, 10), generator=torch.Generator().manual_seed(0))
    bystander = build_tiny("llama", len(tokenizer), seed=5)
    with torch.no_grad():
        expected = bystander(input_ids=ids).logits
    first, second = (
        _train(tokenizer, tmp_path / "a", "llama", fast=True),
        _train(tokenizer, tmp_path / "b", "llama", fast=True),
    )
    assert first[0] == second[0]  # the second run is not changed by what the first left behind
    with torch.no_grad():
        assert torch.equal(bystander(input_ids=ids).logits, expected)
    assert not any("forward" in vars(m) for m in bystander.modules())


class _Stubborn:
    """Something whose patched attribute cannot be taken back."""

    def __delattr__(self, name):
        raise RuntimeError("transformers changed under us")


def test_a_failure_undoing_the_speed_wing_loses_nothing(tokenizer, tmp_path, monkeypatch, said):
    def stubborn_lever(lm, patches):
        patches.attribute(_Stubborn(), "forward", lambda x: x, "fused layers")
        return 1

    monkeypatch.setattr(smolora.fast.door, "patch_fused", stubborn_lever)
    model = _peft("llama", len(tokenizer))
    cfg = TrainConfig(output_dir=str(tmp_path), max_steps=2, learning_rate=1e-2, seed=1)
    result = train(model, _examples(tokenizer), cfg)
    assert result.steps == 2 and result.last_checkpoint is not None and result.last_checkpoint.is_dir()
    assert any("could not be undone (RuntimeError: transformers changed under us)" in w for w in said)


def test_a_failing_merge_names_the_adapter_it_leaves_and_peft_loads_it(
    tokenizer, tiny_model_dir, tmp_path, monkeypatch
):
    from peft import PeftModel

    import smolora.run
    from conftest import write_jsonl
    from smolora import SmoLoRA
    from smolora.errors import SmoLoRAError

    data = write_jsonl(tmp_path / "train.jsonl", chat_records(8))
    lora = SmoLoRA(base_model_name=str(tiny_model_dir), dataset_name=str(data), output_dir=str(tmp_path / "out"))
    lora.sft_config.max_steps = 2
    lora.train()

    def full_disk(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(smolora.run, "merge_adapter", full_disk)
    adapter = tmp_path / "out" / "adapter_checkpoint"
    with pytest.raises(SmoLoRAError, match=f"merging failed .*No space left.*the trained adapter is safe in {adapter}"):
        lora.save()
    base = build_tiny("llama", len(tokenizer))
    assert isinstance(PeftModel.from_pretrained(base, str(adapter)), PeftModel)
