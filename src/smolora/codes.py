"""Frozen weights held as their exact 4-bit codes during training, rebuilt per call.

A GGUF model quantized as Q4_1 (the embedded SmolLM2 is) stores each block of 32 weights as
``scale * q + low``, ``q`` in 0..15. Dequantized once into the fp32 cache folder, its linear
weights take 4 bytes each where the codes take half a byte. ``fit_codes`` finds those codes back
from an fp32 weight and keeps them only if every block rebuilds to the same bits, so a weight that
was never 4-bit is left alone. The GGUF conversion writes them beside the fp32 weights
(``CODES_FILE``).

Inside ``coded_linears(model)`` each frozen ``nn.Linear`` that has codes rebuilds its weight from
them for each forward and backward (``CodedLinear``) and never reads its fp32 weight, whose file
pages then stay out of memory: on the embedded model 405 MiB of fp32 layer weights become 76 MiB
of codes. Rebuilding is two element-wise passes, ~10% of the GEMM that follows at 300 tokens.
The products, and so the training, are the same bits as with the fp32 weights (tested).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from smolora.onednn import linear

CODES_FILE = "smolora-codes.safetensors"  # in a model folder: "<weight name>.codes" / ".scale" / ".low"
BLOCK = 32  # weights per (scale, low) pair along the input dimension, as in GGUF's Q4_1


def dequantize(codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """The fp32 weight ``scale * q + low``: ``codes`` (out, blocks, 16) uint8 hold a block's q's
    0-15 in their low nibbles and 16-31 in their high ones; ``scale``, ``low`` (out, blocks, 1)."""
    out, blocks, _ = codes.shape
    weight = torch.empty(out, blocks, BLOCK)
    torch.mul(codes & 15, scale, out=weight[..., : BLOCK // 2])
    torch.mul(codes >> 4, scale, out=weight[..., BLOCK // 2 :])
    return weight.add_(low).view(out, blocks * BLOCK)


def fit_codes(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(codes, scale, low)`` that ``dequantize`` rebuilds ``weight`` from bit for bit, or None.

    Q4_1 takes a block's minimum as ``low`` (its code is 0) and stores ``scale`` = (max - min) / 15
    as fp16; the fp16 values next to that estimate are tried in turn, block by block.
    """
    if weight.dim() != 2 or weight.dtype != torch.float32 or weight.shape[1] % BLOCK:
        return None
    out, width = weight.shape
    blocks = weight.detach().cpu().reshape(out, width // BLOCK, BLOCK)
    low = blocks.amin(-1, keepdim=True)
    estimate = ((blocks.amax(-1, keepdim=True) - low) / 15).half()
    scale, q = torch.zeros_like(low), torch.zeros(blocks.shape, dtype=torch.uint8)
    fitted = torch.zeros(low.shape, dtype=torch.bool)
    for ulps in (0, 1, -1, 2, -2):
        candidate = (estimate.view(torch.int16) + ulps).view(torch.float16).float() if ulps else estimate.float()
        codes = torch.where(candidate > 0, (blocks - low) / candidate, 0.0).round_().clamp_(0, 15).to(torch.uint8)
        exact = ~fitted & (codes * candidate + low == blocks).all(-1, keepdim=True)
        scale, q = torch.where(exact, candidate, scale), torch.where(exact, codes, q)
        fitted |= exact
    if not fitted.all():
        return None
    return q[..., : BLOCK // 2] | (q[..., BLOCK // 2 :] << 4), scale, low


def save_codes(model: nn.Module, folder: str | Path) -> int:
    """Write the codes of every ``nn.Linear`` weight of ``model`` that has exact ones to
    ``folder/CODES_FILE``; returns how many. Names are the model's own state-dict keys."""
    from safetensors.torch import save_file

    tensors = {}
    for name, module in model.named_modules():
        if type(module) is nn.Linear and (fit := fit_codes(module.weight)) is not None:
            for part, tensor in zip(("codes", "scale", "low"), fit):
                tensors[f"{name}.weight.{part}"] = tensor.contiguous()
    if tensors:
        save_file(tensors, str(Path(folder) / CODES_FILE))
    return len(tensors) // 3


class CodedLinear(torch.autograd.Function):
    """``x @ W^T + b`` for a frozen ``W`` held as codes: rebuilt for the forward and again for the
    backward to ``x``, so that no layer's fp32 weight is kept between the two."""

    @staticmethod
    def forward(ctx, x, codes, scale, low, bias):
        ctx.save_for_backward(codes, scale, low)
        return linear(x, dequantize(codes, scale, low), bias)

    @staticmethod
    def backward(ctx, grad):
        return linear(grad, dequantize(*ctx.saved_tensors).t()), None, None, None, None


def _coded_forward(module: nn.Linear, original, codes, scale, low):
    def forward(x):
        if x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
            return original(x)  # the rebuilt weight is fp32 on the CPU: anything else reads the module's own
        return CodedLinear.apply(x, codes, scale, low, module.bias)

    return forward


@contextlib.contextmanager
def coded_linears(model: nn.Module):
    """Inside the block, run each frozen ``nn.Linear`` of ``model`` that has codes in its model
    folder (``CODES_FILE``) through ``CodedLinear``. The codes are matched by name, and each
    weight's first row is checked against them, so a model changed since it was loaded (or a
    folder's stale file) keeps its own weights."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    path = Path(getattr(lm, "name_or_path", "") or "nonexistent") / CODES_FILE
    patched = []
    try:
        if path.is_file() and next(lm.parameters()).device.type == "cpu":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as file:
                names = set(file.keys())
                for name, module in lm.named_modules():
                    key = name.replace(".base_layer", "") + ".weight"  # PEFT wraps an adapted layer's own Linear
                    if (type(module) is not nn.Linear or module.weight.requires_grad or "forward" in vars(module)
                            or f"{key}.codes" not in names):
                        continue
                    codes, scale, low = (file.get_tensor(f"{key}.{part}") for part in ("codes", "scale", "low"))
                    if (codes.shape[0] != module.weight.shape[0] or codes.shape[1] * BLOCK != module.weight.shape[1]
                            or not torch.equal(dequantize(codes[:1], scale[:1], low[:1]), module.weight[:1].detach())):
                        continue
                    module.forward = _coded_forward(module, module.forward, codes, scale, low)
                    patched.append((module, module.forward))
        yield
    finally:
        for module, forward in patched:
            if vars(module).get("forward") is forward:
                del module.forward
