"""Frozen weights held as exact 4-bit codes: found back bit for bit, and training on them is training
on the fp32 weights — without reading those."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import build_tiny_llama, chat_records
from smolora.codes import BLOCK, CODES_FILE, coded_linears, dequantize, fit_codes, save_codes
from smolora.config import LoraSettings, TrainConfig
from smolora.data.formats import FormatOptions, encode_records
from smolora.lora import add_lora
from smolora.models import load_model, resolve_model
from smolora.train import train


def q4_1(out: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """A weight as a Q4_1 file dequantizes to: per block of 32, fp16 ``scale * q + low`` (fp32
    arithmetic), q in 0..15, the block's minimum coded 0 and its maximum 15 — and one constant block."""
    blocks = (out, width // BLOCK)
    q = torch.randint(0, 16, (*blocks, BLOCK), generator=generator)
    q[..., 0], q[..., 1] = 0, 15
    scale = (torch.rand(*blocks, 1, generator=generator) * 0.02 + 1e-4).half().float()
    low = (-8 * scale - torch.rand(*blocks, 1, generator=generator) * 1e-3).half().float()
    scale[0, 0] = 0.0
    return (q.float() * scale + low).reshape(out, width)


def test_codes_rebuild_a_q4_1_weight_bit_for_bit_and_nothing_else():
    generator = torch.Generator().manual_seed(0)
    weight = q4_1(96, 4 * BLOCK, generator)
    codes, scale, low = fit_codes(weight)
    assert codes.dtype == torch.uint8 and codes.shape == (96, 4, BLOCK // 2)  # two codes a byte
    assert torch.equal(dequantize(codes, scale, low), weight)
    assert fit_codes(torch.randn(96, 4 * BLOCK, generator=generator)) is None  # not 4-bit: kept as it is
    off = weight.clone()
    off[5, 7] = torch.nextafter(off[5, 7], torch.tensor(1.0))  # one weight one ulp away
    assert fit_codes(off) is None
    assert fit_codes(weight[:, :48]) is None and fit_codes(weight.double()) is None


def coded_folder(tmp_path, tokenizer, with_codes: bool):
    model = build_tiny_llama(len(tokenizer), seed=3)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if type(module) is nn.Linear and module is not model.lm_head:
                module.weight.copy_(q4_1(*module.weight.shape, generator))
    folder = tmp_path / ("coded" if with_codes else "plain")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if with_codes:
        assert save_codes(model, folder) == 14  # 2 layers x q, k, v, o, gate, up, down; not the tied head
    return folder


def train_on(folder, tokenizer, tmp_path, poison: bool = False, gradient_checkpointing: bool = False):
    model = load_model(resolve_model(folder))
    if poison:  # every coded weight but its first row, which coded_linears checks: training must not read them
        with torch.no_grad():
            for module in model.modules():
                if type(module) is nn.Linear and module is not model.lm_head:
                    module.weight[1:] = float("nan")
    torch.manual_seed(0)
    model = add_lora(model, LoraSettings(lora_dropout=0.1, target_modules=["all"]).to_peft(), warn=lambda *_: None)
    examples = encode_records(chat_records(16), tokenizer, FormatOptions())[0]
    cfg = TrainConfig(output_dir=str(tmp_path / "out"), max_steps=3, gradient_accumulation_steps=2, learning_rate=1e-2, seed=1,
                      eval_steps=2, gradient_checkpointing=gradient_checkpointing)
    result = train(model, examples, cfg, val_examples=examples[:4], log=lambda *_: None)
    assert not any("forward" in vars(m) for m in model.modules() if type(m) is nn.Linear)  # restored
    assert len(result.eval_losses) == 2
    return result.losses + [loss for _, loss in result.eval_losses], {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_training_on_codes_is_training_on_the_fp32_weights_and_never_reads_them(tokenizer, tmp_path, gradient_checkpointing):
    plain_losses, plain_adapter = train_on(coded_folder(tmp_path, tokenizer, False), tokenizer, tmp_path / "a", False, gradient_checkpointing)
    losses, adapter = train_on(coded_folder(tmp_path, tokenizer, True), tokenizer, tmp_path / "b", True, gradient_checkpointing)
    assert losses == plain_losses and all(x == x for x in losses)
    assert plain_adapter.keys() == adapter.keys() and all(torch.equal(plain_adapter[n], adapter[n]) for n in adapter)


def test_a_weight_changed_since_loading_keeps_its_own_forward(tokenizer, tmp_path):
    model = load_model(resolve_model(coded_folder(tmp_path, tokenizer, True))).requires_grad_(False)  # frozen, as a base trains
    assert (tmp_path / "coded" / CODES_FILE).is_file()

    def coded() -> int:
        return sum("forward" in vars(m) for m in model.modules())

    with coded_linears(model):
        assert coded() == 14
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.add_(1.0)  # as merging an adapter into the base would
    with coded_linears(model):
        assert coded() == 13
    assert coded() == 0
