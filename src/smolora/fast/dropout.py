"""Fast LoRA dropout on the CPU: masks drawn by SFC64 (or the compiled kernels), and a LoRA layer's
dropout and A product as one function that saves the input once."""

from __future__ import annotations

import threading

import numpy as np
import torch
from torch import nn

from smolora.fast import native
from smolora.fast.fused import normed_from, rms_scale
from smolora.fast.patch import Patches, patched


class _KeepScale(torch.autograd.Function):
    """x * keep / (1 - p), saving only the bool mask (as torch's own dropout does)."""

    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.mul(x, keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return torch.mul(grad, keep).mul_(ctx.scale), None, None


_generators = threading.local()


def _sfc64(seed: int) -> np.random.SFC64:
    """This thread's SFC64 generator, seeded as its author seeds one from 64 bits (a = b = c = seed,
    counter 1, 12 outputs discarded): a few microseconds where NumPy's ``SFC64(seed)`` runs a
    ``SeedSequence``, which costs more than the mask between a step's GEMMs."""
    generator = getattr(_generators, "sfc64", None)
    if generator is None:
        generator = _generators.sfc64 = np.random.SFC64(0)
    generator.state = {
        "bit_generator": "SFC64",
        "state": {"state": np.array([seed, seed, seed, 1], dtype=np.uint64)},
        "has_uint32": 0,
        "uinteger": 0,
    }
    generator.random_raw(12)
    return generator


class FastDropout(nn.Dropout):
    """``nn.Dropout`` with its CPU mask drawn by NumPy's SFC64 generator, far faster than torch's
    CPU ``bernoulli_``.

    Each call seeds the generator with one draw from torch's default generator, so the masks follow
    torch's RNG state exactly like ``nn.Dropout``'s do: a resumed run and gradient checkpointing's
    recomputed forward draw the same masks. An element is kept when a uniform 32-bit integer is at
    least ``round(p * 2**32)`` (p exact to 2**-32). The integer's high byte is drawn for every
    element and decides all but the 1/256 of them where it equals the threshold's; only those draw
    their low 24 bits: a quarter of the random bits, the same distribution. ``smolora.fast.native`` draws
    the same mask in C where it is built.
    """

    def active(self, x: torch.Tensor) -> bool:
        return self.training and x.device.type == "cpu" and 0.0 < self.p < 1.0 and not self.inplace

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """The next bool mask of elements kept, shaped like ``x``."""
        seed, threshold = int(torch.randint(0, 2**62, ())), min(round(self.p * 2**32), 2**32 - 1)
        if (keep := native.dropout_keep(seed, threshold, x.shape)) is not None:
            return keep  # the same mask, drawn in C
        generator, n = _sfc64(seed), x.numel()
        high, threshold_high = generator.random_raw((n + 7) // 8).view(np.uint8)[:n], np.uint8(threshold >> 24)
        keep = high > threshold_high
        ties = np.flatnonzero(high == threshold_high)
        low = generator.random_raw((ties.size + 1) // 2).view(np.uint32)[: ties.size] >> np.uint32(8)
        keep[ties] = low >= np.uint32(threshold & 0xFFFFFF)
        return torch.from_numpy(keep).view(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active(x):
            return super().forward(x)
        return _KeepScale.apply(x, self.mask(x), 1.0 / (1.0 - self.p))


class DropoutLinear(torch.autograd.Function):
    """``(x * keep / (1 - p)) @ A^T``, saving ``x`` and the bool mask instead of the dropped input.

    A layer's q_proj and v_proj adapters read the same normed hidden states, each through a
    dropout of its own: autograd through ``lora_A(dropout(x))`` keeps two dropped copies of it per
    layer, where this keeps ``x`` once, shared, and recomputes the dropped input for A's gradient.
    Where ``x`` is a fused RMSNorm's output (``smolora.fast.fused``), not even that: the norm's backward
    keeps its input and 1/rms already, and ``x`` is recomputed from them, bit for bit. Where
    ``smolora.fast.native``'s kernels are built, each direction is one pass over ``x``.
    """

    @staticmethod
    def forward(ctx, x, keep, scale: float, weight):
        ctx.save_for_backward(*(normed_from(x) or (x,)), keep, weight)
        ctx.scale = scale
        fused = native.dropout_linear(x, keep, scale, weight)  # one pass, where the kernels are built
        return fused if fused is not None else torch.mul(x, keep).mul_(scale) @ weight.T

    @staticmethod
    def backward(ctx, grad):
        *source, keep, weight = ctx.saved_tensors
        fused = native.dropout_linear_grad(grad, source, keep, ctx.scale, weight, *ctx.needs_input_grad[0:4:3])
        if fused is not None:
            return fused[0], None, None, fused[1]
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mul(grad @ weight, keep).mul_(ctx.scale)
        if ctx.needs_input_grad[3]:
            x = rms_scale(*source) if len(source) == 3 else source[0]
            dropped = torch.mul(x, keep).mul_(ctx.scale)
            grad_w = grad.reshape(-1, grad.shape[-1]).T @ dropped.reshape(-1, dropped.shape[-1])
        return grad_x, None, None, grad_w


def _dropout_lora_forward(layer, original):
    """PEFT's LoRA ``Linear.forward`` for one plain adapter, its dropout and ``lora_A`` in one
    ``DropoutLinear``; anything else (mixed adapters, variants, merged, autocast) goes to PEFT's."""

    def forward(x, *args, **kwargs):
        names = [a for a in layer.active_adapters if a in layer.lora_A]
        if (
            args
            or kwargs
            or layer.disable_adapters
            or layer.merged
            or len(names) != 1
            or names[0] in getattr(layer, "lora_variant", {})
            or getattr(layer, "use_dora", {}).get(names[0])
            or torch.is_autocast_enabled(x.device.type)
        ):
            return original(x, *args, **kwargs)
        name = names[0]
        lora_a, lora_b, drop = layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
        if (
            not isinstance(drop, FastDropout)
            or not drop.active(x)
            or type(lora_a) is not nn.Linear
            or lora_a.bias is not None
            or x.dtype != lora_a.weight.dtype
        ):
            return original(x, *args, **kwargs)
        result = layer.base_layer(x)
        dropped_a = DropoutLinear.apply(x, drop.mask(x), 1.0 / (1.0 - drop.p), lora_a.weight)
        return (result + lora_b(dropped_a) * layer.scaling[name]).to(result.dtype)

    return forward


def patch_dropout(model: nn.Module, patches: Patches) -> int:
    """Until ``patches`` are restored, swap PEFT's LoRA ``nn.Dropout`` modules for ``FastDropout``
    and run each plain LoRA linear layer's dropout and ``lora_A`` as one ``DropoutLinear``. Returns
    how many modules were patched."""
    from peft.tuners.lora import Linear as LoraLinear

    count = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if isinstance(drops, nn.ModuleDict):
            for name, drop in list(drops.items()):
                if type(drop) is nn.Dropout:
                    patches.item(drops, name, FastDropout(drop.p).train(drop.training), "fast dropout")
                    count += 1
            if type(module) is LoraLinear and "forward" not in vars(module):
                fused = _dropout_lora_forward(module, module.forward)
                _check_probe(module, fused)
                patches.attribute(module, "forward", fused, "fast dropout")
                count += 1
    return count


@torch.no_grad()
def _check_probe(layer, fused) -> None:
    """``fused`` gives PEFT's own output for the layer on a probe input, drawing the same dropout
    mask from the same RNG state (in training mode), or an error. The global RNG is left as it was."""
    lora_a = next(iter(layer.lora_A.values()), None)
    if lora_a is None or not isinstance(lora_a, nn.Linear):
        return
    generator = torch.Generator().manual_seed(lora_a.in_features)
    x = torch.randn(2, 3, lora_a.in_features, generator=generator).to(lora_a.weight)
    outputs = []
    for forward in (layer.forward, fused):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            outputs.append(forward(x))
    if not torch.allclose(outputs[0], outputs[1], rtol=1e-4, atol=1e-5):
        raise RuntimeError(f"the fused LoRA dropout differs from PEFT's layer on a probe ({type(layer).__name__})")


def fast_dropout(model: nn.Module):
    """``patch_dropout`` for the duration of a ``with`` block."""
    return patched(patch_dropout, model)
