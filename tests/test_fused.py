"""Fused RMSNorm and rotary embedding: the same values and gradients as transformers' own modules."""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import ARCHITECTURES, build_tiny
from smolora.fast.fused import RMSNormFunction, RotaryFunction, SwiGLUFunction, apply_rotary_pos_emb, fused_layers


def test_fused_functions_pass_gradcheck():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: RMSNormFunction.apply(x, w, 1e-6), (x, w))
    cos, sin = (
        torch.randn(1, 1, 3, 8, dtype=torch.float64, generator=gen),
        torch.randn(1, 1, 3, 8, dtype=torch.float64, generator=gen),
    )
    q = torch.randn(1, 2, 3, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q: RotaryFunction.apply(q, cos, sin), (q,))


def test_fused_functions_equal_transformers_modules():
    from transformers.models.llama import modeling_llama as ml

    torch.manual_seed(0)
    norm = ml.LlamaRMSNorm(16, eps=1e-5)
    norm.weight.data.normal_()
    x = torch.randn(2, 5, 16, requires_grad=True)
    grad = torch.randn(2, 5, 16)
    expected = norm(x)
    (gx_expected,) = torch.autograd.grad(expected, x, grad)
    got = RMSNormFunction.apply(x, norm.weight, 1e-5)
    (gx_got,) = torch.autograd.grad(got, x, grad)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(gx_got, gx_expected)

    q, k = torch.randn(1, 4, 5, 8, requires_grad=True), torch.randn(1, 2, 5, 8, requires_grad=True)
    cos, sin = torch.randn(1, 5, 8), torch.randn(1, 5, 8)
    outs = [ml.apply_rotary_pos_emb(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)]
    grads = [torch.autograd.grad(sum((o * g).sum() for o, g in zip(out, (1.0, 2.0))), (q, k)) for out in outs]
    for a, b in zip(outs[0] + grads[0], outs[1] + grads[1]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fused_layers_keep_loss_and_gradients_and_restore_the_model(arch):
    model = build_tiny(arch, vocab_size=64).train()
    model.model.embed_tokens.weight.requires_grad_(False)
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(1))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    modeling = sys.modules[type(model.model.layers[0].self_attn).__module__]
    original_rotary = modeling.apply_rotary_pos_emb
    loss, grads = loss_and_grads()
    rng = torch.get_rng_state()
    with fused_layers(model):
        assert torch.equal(torch.get_rng_state(), rng)  # the probes draw from their own generator
        fused_norms = [m for m in model.modules() if "forward" in vars(m) and type(m).__name__.endswith("RMSNorm")]
        fused_mlps = [m for m in model.modules() if "forward" in vars(m) and type(m).__name__.endswith("MLP")]
        fused_loss, fused_grads = loss_and_grads()
        rotary_inside = modeling.apply_rotary_pos_emb
    if arch == "gemma":  # weight * (1 + w) and a GELU MLP: its own conventions, so they keep their code
        assert fused_norms == [] and fused_mlps == []
    else:
        assert len(fused_norms) == 2 * 2 + 1 + (2 * 2 if arch == "qwen3" else 0)  # per layer 2 (+ q/k norms), final
        assert len(fused_mlps) == 2  # SwiGLU, one per layer
    assert rotary_inside is apply_rotary_pos_emb
    assert modeling.apply_rotary_pos_emb is original_rotary
    assert not any("forward" in vars(m) for m in model.modules())
    torch.testing.assert_close(fused_loss, loss)
    assert grads.keys() == fused_grads.keys()
    for name in grads:
        torch.testing.assert_close(fused_grads[name], grads[name], rtol=1e-4, atol=1e-6)


def test_swiglu_saves_gate_and_up_only_and_matches_autograd():
    gate, up = (torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(SwiGLUFunction.apply, (gate, up))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = SwiGLUFunction.apply(gate, up)
    assert len(saved) == 2 and saved[0] is gate and saved[1] is up  # not silu(gate): it is recomputed
    expected = torch.nn.functional.silu(gate) * up
    g = torch.randn_like(out)
    torch.testing.assert_close(out, expected)
    for a, b in zip(torch.autograd.grad(out, (gate, up), g), torch.autograd.grad(expected, (gate, up), g)):
        torch.testing.assert_close(a, b)


def test_lora_input_after_a_fused_norm_is_recomputed_not_saved_and_gives_the_same_bits():
    from smolora.fast.dropout import DropoutLinear

    gen = torch.Generator().manual_seed(0)
    h = torch.randn(2, 7, 16, generator=gen, requires_grad=True)
    norm_weight = torch.randn(16, generator=gen)
    a = torch.randn(4, 16, generator=gen, requires_grad=True)
    keep = torch.rand(2, 7, 16, generator=gen) > 0.1
    grad = torch.randn(2, 7, 4, generator=gen)

    def run(from_norm: bool):
        x = RMSNormFunction.apply(h, norm_weight, 1e-6)
        if not from_norm:
            x = x.clone()  # the same values, with no record of the norm: saved as they are
        saved = set()
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.add(t.untyped_storage().data_ptr()) or t, lambda t: t
        ):
            y = DropoutLinear.apply(x, keep, 1 / 0.9, a)
        return (y, *torch.autograd.grad(y, (h, a), grad)), x.untyped_storage().data_ptr() in saved

    shared, x_saved = run(True)
    plain, x_saved_plain = run(False)
    assert x_saved_plain and not x_saved  # the norm's input and 1/rms are kept instead (the norm keeps them anyway)
    for got, expected in zip(shared, plain):
        assert torch.equal(got, expected)

    x = RMSNormFunction.apply(h, norm_weight, 1e-6)
    x.mul_(2)  # changed in place after the norm: no longer what the norm's saved tensors give, so saved as it is
    y = DropoutLinear.apply(x, keep, 1 / 0.9, a)
    torch.testing.assert_close(torch.autograd.grad(y, a, grad)[0], 2 * plain[2])  # A's gradient is linear in its input

    h64, a64 = h.detach().double().requires_grad_(), a.detach().double().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda h, a: DropoutLinear.apply(RMSNormFunction.apply(h, norm_weight.double(), 1e-6), keep, 1 / 0.9, a),
        (h64, a64),
    )
