"""Fused RMSNorm and rotary embedding for training: the same math as transformers' eager modules
in fewer passes over memory.

Autograd through transformers' RMSNorm runs six element-wise kernels forward and about eight
backward; through its rotary embedding (``x * cos + rotate_half(x) * sin``), five each way. On a
CPU those passes, not arithmetic, are the cost. The functions here do each in three or four
passes, with a hand-written backward: about 3% of a decoder layer's forward and backward at
300-450 tokens (benchmarks/RESULTS.md).

``fused_layers(lm)`` switches them on for the duration of a training loop, and only where they
reproduce the model's own module on a probe input, so a model whose norm or rotary convention
differs (Gemma's ``1 + weight``, interleaved rotary) keeps its own code.
"""

from __future__ import annotations

import contextlib
import sys

import torch


class RMSNormFunction(torch.autograd.Function):
    """``weight * x / sqrt(mean(x**2) + eps)`` over the last dimension."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        r = torch.rsqrt(x.square().mean(-1, keepdim=True).add_(eps))  # (..., 1)
        ctx.save_for_backward(x, weight, r)
        return (x * r).mul_(weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight, r = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad * x * r).reshape(-1, x.shape[-1]).sum(0)
        if ctx.needs_input_grad[0]:
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
        half = x.shape[-1] // 2
        out = x * cos
        out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
        out[..., half:].addcmul_(x[..., :half], sin[..., half:])
        return out

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        half = grad.shape[-1] // 2
        grad_x = grad * cos
        grad_x[..., :half].addcmul_(grad[..., half:], sin[..., half:])
        grad_x[..., half:].addcmul_(grad[..., :half], sin[..., :half], value=-1)
        return grad_x, None, None


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


@contextlib.contextmanager
def fused_layers(lm):
    """Run ``lm``'s RMSNorms and rotary embedding through the fused functions inside the block.

    Rotary embedding is looked up by name in the model's modeling module, so inside the block it
    is replaced for every model of that architecture in the process.
    """
    norms, patched = [], []
    try:
        for module in lm.modules():
            eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
            weight = getattr(module, "weight", None)
            if (type(module).__name__.endswith("RMSNorm") and isinstance(eps, float) and weight is not None
                    and weight.dim() == 1 and "forward" not in vars(module) and _norm_matches(module, eps)):
                module.forward = _fused_norm_forward(module, module.forward, eps)
                norms.append(module)
        for name in {type(m).__module__ for m in lm.modules() if type(m).__name__.endswith("Attention")}:
            modeling = sys.modules.get(name)
            original = getattr(modeling, "apply_rotary_pos_emb", None)
            if callable(original) and original is not apply_rotary_pos_emb and _rotary_matches(original, next(lm.parameters())):
                modeling.apply_rotary_pos_emb = apply_rotary_pos_emb
                patched.append((modeling, original))
        yield
    finally:
        for module in norms:
            del module.forward
        for modeling, original in patched:
            modeling.apply_rotary_pos_emb = original


def _fused_norm_forward(module, original, eps: float):
    def forward(x):
        if x.dtype != module.weight.dtype:  # mixed dtypes: the module's own casting rules
            return original(x)
        return RMSNormFunction.apply(x, module.weight, eps)

    return forward
