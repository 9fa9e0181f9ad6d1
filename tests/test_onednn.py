"""Frozen linear layers through oneDNN: the same values and gradients as torch's own GEMM, only frozen
layers routed, the choice measured or named, and oneDNN's per-shape kernel caches kept small."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import build_tiny_llama, chat_records
from smolora.config import LoraSettings, TrainConfig
from smolora.data.formats import FormatOptions, encode_records
from smolora.errors import SmoLoRAError
from smolora.fast import onednn
from smolora.lora import add_lora
from smolora.train import train

needs_onednn = pytest.mark.skipif(not onednn._available(), reason="torch built without oneDNN")


@pytest.fixture
def gemm(monkeypatch):
    """Set SMOLORA_GEMM for one test; the per-process choice is measured again after it."""

    def choose(value: str) -> None:
        monkeypatch.setenv(onednn.ENV, value)
        onednn.onednn_is_faster.cache_clear()

    yield choose
    monkeypatch.undo()
    onednn.onednn_is_faster.cache_clear()


@needs_onednn
def test_frozen_linear_gives_fp32_values_and_input_gradients():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 37, 96, generator=gen, requires_grad=True)
    w, b = torch.randn(160, 96, generator=gen) * 0.1, torch.randn(160, generator=gen)
    grad = torch.randn(2, 37, 160, generator=gen)
    y = onednn.FrozenLinear.apply(x, w, b)
    (gx,) = torch.autograd.grad(y, x, grad)
    y64 = F.linear(x.double(), w.double(), b.double())
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx.double(), grad.double() @ w.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)  # and torch's fp32 GEMM


@needs_onednn
def test_only_frozen_linear_layers_are_routed_and_restored(gemm):
    gemm("onednn")
    torch.manual_seed(0)
    frozen, trained = nn.Linear(8, 8), nn.Linear(8, 8)
    frozen.requires_grad_(False)
    model = nn.Sequential(frozen, trained)
    x = torch.randn(3, 8, requires_grad=True)
    with onednn.onednn_linears(model):
        assert type(frozen(x).grad_fn).__name__ == "FrozenLinearBackward"
        assert type(trained(x).grad_fn).__name__ == "AddmmBackward0"  # trains: torch's own, with its weight gradient
        with torch.no_grad():  # inference: any weight
            torch.testing.assert_close(trained(x), F.linear(x, trained.weight, trained.bias))
        with onednn.onednn_linears(model):  # nested: the outer patch stays
            pass
        assert "forward" in vars(frozen)
        model(x).sum().backward()
    assert trained.weight.grad is not None and frozen.weight.grad is None
    assert "forward" not in vars(frozen) and "forward" not in vars(trained)


def test_mkl_keeps_torch_s_forward(gemm):
    gemm("mkl")
    layer = nn.Linear(4, 4).requires_grad_(False)
    with onednn.onednn_linears(layer):
        assert "forward" not in vars(layer)
        assert not onednn.usable(torch.randn(2, 4), layer.weight)


def test_an_unknown_gemm_choice_is_refused(gemm):
    gemm("blas")
    with pytest.raises(SmoLoRAError, match="SMOLORA_GEMM='blas': expected auto, onednn or mkl"):
        onednn.onednn_is_faster()


@pytest.mark.parametrize("value", ["", " "])
def test_an_empty_gemm_choice_is_the_default(gemm, value):
    gemm(value)
    assert isinstance(onednn.onednn_is_faster(), bool)  # measured, as when unset: not refused as an unknown choice
    gemm(" MKL ")
    assert onednn.onednn_is_faster() is False


def _losses_and_adapter(tokenizer, tmp_path, monkeypatch, **settings):
    calls = []
    apply = onednn.FrozenLinear.apply
    monkeypatch.setattr(onednn.FrozenLinear, "apply", lambda *a: calls.append(1) or apply(*a))
    model = build_tiny_llama(len(tokenizer))
    torch.manual_seed(0)
    model = add_lora(model, LoraSettings(lora_dropout=0.1, target_modules=["q_proj", "v_proj"]).to_peft())
    examples = encode_records(chat_records(16), tokenizer, FormatOptions())[0]
    cfg = TrainConfig(
        output_dir=str(tmp_path), max_steps=3, gradient_accumulation_steps=2, learning_rate=1e-2, seed=1, **settings
    )
    result = train(model, examples, cfg)
    return result.losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, len(calls)


@needs_onednn
@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_training_through_onednn_learns_what_torch_s_gemm_does(
    tokenizer, tmp_path, gemm, monkeypatch, gradient_checkpointing
):
    gemm("mkl")
    losses, adapter, calls = _losses_and_adapter(
        tokenizer, tmp_path / "mkl", monkeypatch, gradient_checkpointing=gradient_checkpointing
    )
    assert calls == 0
    gemm("onednn")
    losses_dnn, adapter_dnn, calls = _losses_and_adapter(
        tokenizer, tmp_path / "dnn", monkeypatch, gradient_checkpointing=gradient_checkpointing
    )
    assert calls > 0  # the frozen q/k/v/o and MLP layers went through oneDNN
    torch.testing.assert_close(losses_dnn, losses, rtol=1e-5, atol=0)
    for name, value in adapter.items():
        torch.testing.assert_close(adapter_dnn[name], value, rtol=1e-4, atol=1e-6)


@needs_onednn
def test_kernel_caches_stay_small_over_many_row_lengths():
    """Every new GEMM shape gets a JIT-compiled kernel; with torch's default caches (1024 entries
    each) 100 row lengths grew this process by ~700 MiB; capped at 32, by ~50."""
    script = textwrap.dedent("""
        import re, torch
        from smolora.fast import onednn
        assert onednn.onednn_is_faster()
        rss = lambda: int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) // 1024
        weights = [torch.randn(o, i) for i, o in ((576, 1536), (1536, 576), (576, 576), (576, 192))]
        start = rss()
        for m in range(300, 400):
            for w in weights:
                x = torch.randn(m, w.shape[1], requires_grad=True)
                onednn.FrozenLinear.apply(x, w, None).sum().backward()
        print(rss() - start)
    """)
    env = {k: v for k, v in os.environ.items() if k not in onednn.CACHES} | {onednn.ENV: "onednn"}
    grown = int(
        subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    )
    assert grown < 150, f"{grown} MiB"


def test_importing_caps_the_kernel_caches_unless_the_user_set_them():
    script = (
        "import os, smolora.fast.onednn; "
        "print(os.environ['LRU_CACHE_CAPACITY'], os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"
    )
    env = {k: v for k, v in os.environ.items() if k not in onednn.CACHES} | {"LRU_CACHE_CAPACITY": "7"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["7", "32"]
