"""Fused RMSNorm, rotary embedding and SwiGLU for training: the same math as transformers' eager
modules in fewer passes over memory, or with less of it saved for backward.

Autograd through transformers' RMSNorm runs six element-wise kernels forward and about eight
backward; through its rotary embedding (``x * cos + rotate_half(x) * sin``), five each way. On a
CPU those passes, not arithmetic, are the cost. The functions here do each in three or four
passes with a hand-written backward, or in one where ``smolora.fast.native``'s kernels are built.
The SwiGLU MLP's ``silu(gate) * up`` saves gate and up only and recomputes ``silu(gate)`` in
backward: a sixth of a row's saved activations.

``patch_fused(lm, patches)`` switches them on for the duration of a training loop, and only where they
reproduce the model's own module on a probe input, so a model whose norm, rotary or MLP convention
differs (Gemma's ``1 + weight`` and GELU MLP, interleaved rotary) keeps its own code.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from smolora.fast import native
from smolora.fast.patch import Patches, patched


def rms_scale(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """An RMSNorm's output from its input ``x``, ``r = 1 / rms(x)`` and its weight: the one
    expression for the forward and for any recomputation of it, so both give the same bits."""
    return (x * r).mul_(weight)


NORMED_FROM = "_smolora_normed_from"  # on an RMSNormFunction output: ((x, r, weight) detached, the output's version)


def normed_from(out: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """``(x, r, weight)`` that ``rms_scale`` makes ``out`` from, if ``out`` is an RMSNormFunction
    output not modified in place since; else None."""
    source = getattr(out, NORMED_FROM, None)
    return source[0] if source is not None and source[1] == out._version else None


class RMSNormFunction(torch.autograd.Function):
    """``weight * x / sqrt(mean(x**2) + eps)`` over the last dimension.

    The output carries what its backward saves (``normed_from``), so that a consumer which would
    otherwise save the output itself (``smolora.lora.DropoutLinear``: the q/v adapters' input) can
    keep references to those instead and recompute it: one (tokens, hidden) tensor less per norm.
    """

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        if (fused := native.rms_norm(x, weight, eps)) is not None:  # one pass, where the kernels are built
            out, r = fused
        else:
            r = torch.rsqrt(x.square().mean(-1, keepdim=True).add_(eps))  # (..., 1)
            out = rms_scale(x, r, weight)
        ctx.save_for_backward(x, weight, r)
        setattr(out, NORMED_FROM, ((x.detach(), r, weight.detach()), out._version))
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, r = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad * x * r).reshape(-1, x.shape[-1]).sum(0)
        if ctx.needs_input_grad[0]:
            grad_x = native.rms_norm_grad(grad, x, weight, r)  # one pass, where the kernels are built
            if grad_x is None:
                gw = grad * weight
                # d/dx of x·r: r·gw − x·r³·mean(gw·x)
                coef = (gw * x).sum(-1, keepdim=True).mul_(r.pow(3)).div_(-x.shape[-1])
                grad_x = torch.addcmul(gw.mul_(r), x, coef)
        return grad_x, grad_w, None


class RotaryFunction(torch.autograd.Function):
    """Rotary position embedding in the rotate-half layout: ``x * cos + rotate_half(x) * sin``,
    where ``rotate_half(x) = cat(-x2, x1)``. cos/sin carry no gradient."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        if (out := native.rotary(x, cos, sin)) is not None:
            return out
        half = x.shape[-1] // 2
        out = x * cos
        out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
        out[..., half:].addcmul_(x[..., :half], sin[..., half:])
        return out

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        if (grad_x := native.rotary(grad, cos, sin, -1.0)) is not None:
            return grad_x, None, None
        half = grad.shape[-1] // 2
        grad_x = grad * cos
        grad_x[..., :half].addcmul_(grad[..., half:], sin[..., half:])
        grad_x[..., half:].addcmul_(grad[..., :half], sin[..., :half], value=-1)
        return grad_x, None, None


class SwiGLUFunction(torch.autograd.Function):
    """``silu(gate) * up``, saving only ``gate`` and ``up``: ``silu(gate)`` is recomputed in backward.
    Autograd through ``act_fn(gate) * up`` keeps it as well, a third of the MLP's saved activations."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        out = native.swiglu(gate, up)  # one pass, where the kernels are built
        return out if out is not None else F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        if all(ctx.needs_input_grad) and (grads := native.swiglu_grad(grad, gate, up)) is not None:
            return grads
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim: int = 1):
    """Drop-in for transformers' function of the same name."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return RotaryFunction.apply(q, cos, sin), RotaryFunction.apply(k, cos, sin)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def _probe(*shape: int, like: torch.Tensor) -> torch.Tensor:
    """A random probe input from a private generator: the global RNG (dropout masks) is untouched."""
    generator = torch.Generator().manual_seed(sum(shape))
    return torch.randn(shape, generator=generator).to(like)


@torch.no_grad()
def _norm_matches(module, eps: float) -> bool:
    x = _probe(2, 3, module.weight.shape[0], like=module.weight)
    return _close(module.forward(x), RMSNormFunction.apply(x, module.weight, eps))


@torch.no_grad()
def _mlp_matches(module) -> bool:
    """The module's output equals ``down(silu(gate(x)) * up(x))`` on a probe (in eval mode: no dropout)."""
    was_training = module.training
    module.eval()
    try:
        x = _probe(2, 3, module.gate_proj.in_features, like=module.gate_proj.weight)
        return _close(module.forward(x), _fused_mlp_forward(module)(x))
    except (AttributeError, RuntimeError, TypeError):
        return False
    finally:
        module.train(was_training)


@torch.no_grad()
def _rotary_matches(original, like: torch.Tensor) -> bool:
    """Same results as ``original`` with cos/sin as wide as the head, and — where ``original`` also
    rotates only part of each head (Phi-3's partial_rotary_factor) — with narrower ones too."""
    q, k = _probe(1, 2, 5, 8, like=like), _probe(1, 1, 5, 8, like=like)
    for width in (8, 6):
        cos, sin = _probe(1, 5, width, like=like), _probe(5, width, like=like)[None]
        try:
            expected = original(q, k, cos, sin)
        except TypeError:  # another signature
            return False
        except RuntimeError:  # cos/sin narrower than the head: not this model's convention
            if width == 8:
                return False
            continue
        try:
            if not all(_close(a, b) for a, b in zip(expected, apply_rotary_pos_emb(q, k, cos, sin))):
                return False
        except RuntimeError:
            return False
    return True


def patch_fused(lm, patches: Patches) -> int:
    """Run ``lm``'s RMSNorms, rotary embedding and SwiGLU MLPs through the fused functions until
    ``patches`` are restored; each only where it reproduces the model's own on a probe. Returns how
    many modules and functions were patched.

    Rotary embedding is looked up by name in the model's modeling module, so until then it is
    replaced for every model of that architecture in the process.
    """
    count = 0
    for module in lm.modules():
        if (
            all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj"))
            and "forward" not in vars(module)
            and _mlp_matches(module)
        ):
            patches.attribute(module, "forward", _fused_mlp_forward(module), "fused SwiGLU")
            count += 1
            continue
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        weight = getattr(module, "weight", None)
        if (
            type(module).__name__.endswith("RMSNorm")
            and isinstance(eps, float)
            and weight is not None
            and weight.dim() == 1
            and "forward" not in vars(module)
            and _norm_matches(module, eps)
        ):
            patches.attribute(module, "forward", _fused_norm_forward(module, module.forward, eps), "fused RMSNorm")
            count += 1
    for name in {type(m).__module__ for m in lm.modules() if type(m).__name__.endswith("Attention")}:
        modeling = sys.modules.get(name)
        original = getattr(modeling, "apply_rotary_pos_emb", None)
        if (
            callable(original)
            and original is not apply_rotary_pos_emb
            and _rotary_matches(original, next(lm.parameters()))
        ):
            patches.attribute(modeling, "apply_rotary_pos_emb", apply_rotary_pos_emb, "fused rotary")
            count += 1
    return count


def fused_layers(lm):
    """``patch_fused`` for the duration of a ``with`` block."""
    return patched(patch_fused, lm)


def _fused_norm_forward(module, original, eps: float):
    def forward(x):
        if x.dtype != module.weight.dtype:  # mixed dtypes: the module's own casting rules
            return original(x)
        return RMSNormFunction.apply(x, module.weight, eps)

    return forward


def _fused_mlp_forward(module):
    def forward(x):
        return module.down_proj(SwiGLUFunction.apply(module.gate_proj(x), module.up_proj(x)))

    return forward
