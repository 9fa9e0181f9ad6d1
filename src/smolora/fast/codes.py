"""Frozen weights held as their exact GGUF codes during training, rebuilt block by block per call.

A GGUF model quantized as Q4_1 (the embedded SmolLM2 is) stores each block of 32 weights as
``scale * q + low``, ``q`` in 0..15; its Q8_0 tensors (the embedding, tied to the LM head) as
``scale * q``, ``q`` in -127..127; Q4_0 as ``scale * (q - 8)`` and Q5_1 / Q5_0 as Q4_1 / Q4_0 with
``q`` in 0..31 — every block type SmoLoRA's GGUF export writes. Dequantized once into the fp32
cache folder, those weights take 4 bytes each where the codes take half a byte or one.
``fit_codes`` finds the codes back from an fp32 weight and keeps them only if every block
rebuilds to the same values, so a weight that was never quantized is left alone; a weight that
is a bf16 or fp16 value throughout (a Hugging Face checkpoint stored in 16 bits) is kept as such.
The GGUF conversion, and the fp32 copy training makes of a 16-bit checkpoint
(``smolora.models.half_cache_folder``), write them beside the fp32 weights (``CODES_FILE``).

Inside ``patch_codes(model, patches)`` each frozen ``nn.Linear`` and ``nn.Embedding`` that has codes
rebuilds its weight from them — a linear layer's whole weight for each forward and backward
(``CodedLinear``; under CPU autocast, cast to its dtype as autocast casts the fp32 weight), an
embedding only the rows it looks up, the LM-head loss a block of the vocabulary at a time
(``smolora.fast.head_loss.LinearCrossEntropy``) — and never reads its fp32 weight,
whose file pages then stay out of memory: on the embedded model about a fifth of the fp32
weights' bytes. Rebuilding a layer's weight is one pass through ``smolora.fast.native``'s compiled
kernel (a few element-wise torch calls where no C compiler is found). The products, and so the
training, are those of the fp32 weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from smolora.fast import native
from smolora.fast.onednn import linear
from smolora.fast.patch import Patches, patched

CODES_FILE = "smolora-codes.safetensors"  # in a model folder: "<weight name>.codes" / ".scale" (/ ".low")
BLOCK = 32  # weights per scale along the input dimension, as in GGUF's Q4_0/1, Q5_0/1 and Q8_0


class Codes(NamedTuple):
    """A weight as ``scale * q + low`` per block of 32 along its input dimension, or ``scale * q``.

    ``codes`` is one of: the weight itself as bf16 or fp16 (out, in), with no ``scale`` (a weight
    a checkpoint stores in 16 bits); uint8 (out, blocks, 16), two q's in 0..15 a byte, a block's first 16 in
    the low nibbles (GGUF's Q4_1, and Q4_0 as ``low = -8 * scale``); uint8 (out, blocks, 32), q in
    0..31 (Q5_1, and Q5_0 as ``low = -16 * scale``); int8 (out, blocks, 32) with no ``low``
    (Q8_0). ``scale`` and ``low`` (out, blocks, 1) are fp16, as the file stores them; a scale may
    be negative.

    Codes with a ``low`` may be input-major in memory (the same shapes, the output dimension
    innermost), as the codes file stores them: ``weight`` then rebuilds W in W^T's layout, each
    element-wise pass running along hundreds of outputs where row-major ones run along blocks of
    16.
    """

    codes: torch.Tensor
    scale: torch.Tensor | None = None  # None: ``codes`` is the weight in bf16 or fp16
    low: torch.Tensor | None = None

    def weight(self, rows: slice = slice(None), row_major: bool = False) -> torch.Tensor:
        """The fp32 weight's ``rows``, rebuilt (fp32 arithmetic: the product, then the sum). Input-major
        codes rebuild W in W^T's layout; ``row_major``: in W's own where the compiled kernels are
        built (the layout the backward's GEMM reads faster)."""
        if self.scale is None:
            return self.codes[rows].float()
        codes, scale, low = self.codes[rows], self.scale[rows], None if self.low is None else self.low[rows]
        if (
            rebuilt := native.q8_0_weight(codes, scale)
            if low is None
            else native.q4_1_weight(codes, scale, low, row_major)
        ) is not None:
            return rebuilt  # one pass, where the compiled kernels are built and the codes laid out as stored
        scale = scale.float()
        out, blocks, width = codes.shape
        if codes.stride(-1) != 1:  # input-major codes: W laid out as W^T
            weight = torch.empty(blocks, BLOCK, out, dtype=torch.float32).permute(2, 0, 1)
        else:
            weight = torch.empty(out, blocks, BLOCK, dtype=torch.float32)
        if self.low is None:  # a copy then an in-place product: torch's mixed-dtype product is ~1.4x slower
            return weight.copy_(codes).mul_(scale).view(out, blocks * BLOCK)
        if width == BLOCK:  # a code a byte
            weight.copy_(codes)
        else:  # two a byte
            weight[..., : BLOCK // 2].copy_(codes & 15)
            weight[..., BLOCK // 2 :].copy_(codes >> 4)
        # q * scale is exact in fp32 (5 bits times fp16's 11 at most), so + low rounds once whether or not it is fused
        return torch.addcmul(low.float(), weight, scale, out=weight).view(out, blocks * BLOCK)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """``weight()[index]`` (an embedding lookup) without rebuilding the other rows."""
        picked = Codes(*(t[index.reshape(-1)] if t is not None else None for t in self))
        return picked.weight().view(*index.shape, -1)


def _fit(blocks: torch.Tensor, estimate: torch.Tensor, low: torch.Tensor | None, top: int) -> Codes | None:
    """Codes for ``blocks`` (out, n, 32) with the fp16 scale ``estimate`` or one next to it, block by block,
    q in 0..top (-top..top without ``low``); None unless every block rebuilds to the same values."""
    shifted = blocks if low is None else blocks - low
    scale, q = torch.zeros_like(estimate, dtype=torch.float32), torch.zeros(blocks.shape)
    fitted = torch.zeros(estimate.shape, dtype=torch.bool)
    for ulps in (0, 1, -1, 2, -2):
        candidate = (estimate.view(torch.int16) + ulps).view(torch.float16).float() if ulps else estimate.float()
        codes = torch.where(candidate != 0, shifted / candidate, 0.0).round_().clamp_(-top if low is None else 0, top)
        rebuilt = codes * candidate if low is None else codes * candidate + low  # as Codes.weight computes it
        exact = ~fitted & (rebuilt == blocks).all(-1, keepdim=True)
        scale, q = torch.where(exact, candidate, scale), torch.where(exact, codes, q)
        fitted |= exact
    if not fitted.all() or (low is not None and not torch.equal(low.half().float(), low)):
        return None
    if low is None:
        return Codes(q.to(torch.int8), scale.half())
    q = q.to(torch.uint8)
    if top > 15:
        return Codes(q, scale.half(), low.half())
    return Codes(q[..., : BLOCK // 2] | (q[..., BLOCK // 2 :] << 4), scale.half(), low.half())


def _with_min(levels: int):
    """Q4_1 / Q5_1: a block's minimum is ``low`` (coded 0), (max - min) / levels the scale."""

    def fit(part: torch.Tensor) -> Codes | None:
        low = part.amin(-1, keepdim=True)
        return _fit(part, ((part.amax(-1, keepdim=True) - low) / levels).half(), low, levels)

    return fit


def _centred(half: int):
    """Q4_0 / Q5_0, ``scale * (q - half)``: the block's largest magnitude is coded 0, so it is
    ``low = -half * scale``, whichever the scale's sign."""

    def fit(part: torch.Tensor) -> Codes | None:
        low = part.gather(-1, part.abs().argmax(-1, keepdim=True))
        return _fit(part, (-low / half).half(), low, 2 * half - 1)

    return fit


def _q8_0(part: torch.Tensor) -> Codes | None:
    """Q8_0: ``scale * q``, q in -127..127, the block's largest magnitude coded +-127."""
    return _fit(part, (part.abs().amax(-1, keepdim=True) / 127).half(), None, 127)


FITS = (
    _with_min(15),
    _centred(8),
    _q8_0,
    _with_min(31),
    _centred(16),
)  # Q4_1, Q4_0, Q8_0, Q5_1, Q5_0: smallest codes first


def fit_codes(weight: torch.Tensor, rows: int = 4096) -> Codes | None:
    """Codes that rebuild ``weight`` to the same values, or None: the first of ``FITS`` that does,
    else the weight itself as bf16 or fp16 where that holds every value.

    Each takes a scale estimate from the block; the file stores the scale as fp16, so the fp16
    values at and next to it are tried. ``rows`` at a time, so that the temporaries stay a few
    times that many rows' size; one kind of codes for the whole weight.
    """
    if weight.dim() != 2 or weight.dtype != torch.float32 or not weight.numel():
        return None
    weight = weight.detach().cpu()
    if weight.shape[1] % BLOCK == 0:
        blocks = weight.reshape(weight.shape[0], -1, BLOCK)
        for fit in FITS:
            if fit(blocks[:1]) is None:  # the first row does not fit: the whole weight will not
                continue
            parts = []
            for start in range(0, len(blocks), rows):
                if (part := fit(blocks[start : start + rows])) is None:
                    break
                parts.append(part)
            else:
                return Codes(*(torch.cat(pieces) if pieces[0] is not None else None for pieces in zip(*parts)))
    for dtype in (torch.bfloat16, torch.float16):  # a checkpoint stored in 16 bits
        if torch.equal((half := weight.to(dtype)).float(), weight):
            return Codes(half)
    return None


def save_codes(model: nn.Module, folder: str | Path) -> int:
    """Write the codes of every ``nn.Linear`` and ``nn.Embedding`` weight of ``model`` that has
    exact ones to ``folder/CODES_FILE`` (a weight tied to another under the first name only);
    returns how many. Names are the model's own state-dict keys."""
    from safetensors.torch import save_file

    tensors, seen = {}, set()
    for name, module in model.named_modules():
        if type(module) not in (nn.Linear, nn.Embedding) or id(module.weight) in seen:
            continue
        seen.add(id(module.weight))
        if (fit := fit_codes(module.weight)) is not None:
            stored = (
                fit if fit.low is None else Codes(*(t.permute(1, 2, 0) for t in fit))
            )  # those with a low: input-major
            tensors.update(
                {f"{name}.weight.{part}": t.contiguous() for part, t in zip(Codes._fields, stored) if t is not None}
            )
    if tensors:
        save_file(tensors, str(Path(folder) / CODES_FILE))
    return sum(key.endswith(".codes") for key in tensors)


CODES_ATTR = "_smolora_codes"  # on a module inside coded_weights: its weight's Codes
CHANGED_ATTR = "_smolora_weights_changed"  # on a model whose weights are no longer its folder's


def forget_codes(model: nn.Module) -> None:
    """Mark ``model``'s weights as changed in memory (an adapter merged into them): ``coded_weights``
    then leaves every one alone, where its first-row check would miss a change that spared row 0."""
    setattr(model, CHANGED_ATTR, True)


def codes_of(module: nn.Module) -> Codes | None:
    """The codes ``module``'s weight is rebuilt from inside ``coded_weights``, if any."""
    return getattr(module, CODES_ATTR, None)


class CodedLinear(torch.autograd.Function):
    """``x @ W^T + b`` for a frozen ``W`` held as codes: rebuilt for the forward and again for the
    backward to ``x``, so that no layer's fp32 weight is kept between the two. Input-major codes
    rebuild W in W^T's layout for the forward and, where the compiled kernels are built, in W's own
    for the backward: the layouts oneDNN's GEMM reads fastest for each.

    ``dtype`` (under CPU autocast, its dtype): the product in that dtype, the rebuilt weight, ``x``
    and the bias cast to it, as autocast casts the module's own; the gradient comes back in ``x``'s
    dtype. The cast weight keeps the rebuild's layout (W^T's for input-major codes): a GEMM may sum
    in another order than on autocast's row-major copy (here bf16's does not, fp16's does: ~1e-6),
    where a transposing cast would cost far more than it changes.
    """

    @staticmethod
    def forward(ctx, x, codes, scale, low, bias, dtype):
        ctx.save_for_backward(codes, scale, low)
        ctx.dtype, ctx.x_dtype = dtype, x.dtype
        if dtype is None:
            return linear(x, Codes(codes, scale, low).weight(), bias)
        return F.linear(x.to(dtype), _cast(Codes(codes, scale, low), dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad):
        codes = Codes(*ctx.saved_tensors)
        if ctx.dtype is None:
            grad_x = linear(grad, codes.weight(row_major=True).t())
        else:
            grad_x = grad.to(ctx.dtype).matmul(_cast(codes, ctx.dtype)).to(ctx.x_dtype)
        return grad_x, None, None, None, None, None


def _cast(codes: Codes, dtype: torch.dtype) -> torch.Tensor:
    """The weight as autocast casts it to ``dtype``: a 16-bit weight in that dtype is its codes as they are."""
    return codes.codes if codes.scale is None and codes.codes.dtype == dtype else codes.weight().to(dtype)


def _coded_forward(module: nn.Linear, original, codes: Codes):
    def forward(x):
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            dtype = torch.get_autocast_dtype("cpu")
            if x.dtype in (torch.float32, dtype):
                return CodedLinear.apply(x, *codes, module.bias, dtype)
        elif x.device.type == "cpu" and x.dtype == torch.float32:
            return CodedLinear.apply(x, *codes, module.bias, None)
        return original(x)  # the rebuilt weight is fp32 on the CPU: anything else reads the module's own

    return forward


def read_codes(file, key: str, names: set[str] | None = None) -> Codes | None:
    """``key``'s codes from the open safetensors ``file`` (``CODES_FILE``, whose keys are ``names``
    if given), or None. Those with a low are stored input-major and come back as (out, blocks,
    width) views of that storage."""
    names = set(file.keys()) if names is None else names
    if f"{key}.codes" not in names:
        return None
    codes = Codes(*(file.get_tensor(f"{key}.{part}") if f"{key}.{part}" in names else None for part in Codes._fields))
    return codes if codes.low is None else Codes(*(t.permute(2, 0, 1) for t in codes))


def _load(file, names: set[str], key: str, weight: torch.Tensor) -> Codes | None:
    """``key``'s codes from the open ``file`` if they rebuild ``weight``'s shape and first row."""
    if weight.dtype != torch.float32 or (codes := read_codes(file, key, names)) is None:
        return None
    if codes.codes.shape[0] != weight.shape[0]:
        return None
    return codes if torch.equal(codes.weight(slice(0, 1)), weight[:1].detach()) else None  # unequal widths: unequal


def patch_codes(model: nn.Module, patches: Patches) -> int:
    """Until ``patches`` are restored, each frozen ``nn.Linear`` and ``nn.Embedding`` of ``model``
    that has codes in its model folder (``CODES_FILE``) rebuilds its weight from them
    (``CodedLinear``, ``Codes.rows``) and carries them (``codes_of``, for the LM-head loss). The
    codes are matched by name, and each weight's first row is checked against them, so a model
    changed since it was loaded (or a folder's stale file) keeps its own weights. Returns how many
    modules were patched."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    path = Path(getattr(lm, "name_or_path", "") or "nonexistent") / CODES_FILE
    if not path.is_file() or getattr(lm, CHANGED_ATTR, False) or next(lm.parameters()).device.type != "cpu":
        return 0
    from safetensors import safe_open

    count = 0
    with safe_open(str(path), "pt") as file:
        found: dict[int, Codes | None] = {}  # by weight: a tied one's codes are its first name's
        names = set(file.keys())
        for name, module in lm.named_modules():
            bias = getattr(module, "bias", None)  # CodedLinear's backward gives none to a bias
            if (
                type(module) not in (nn.Linear, nn.Embedding)
                or module.weight.requires_grad
                or (bias is not None and bias.requires_grad)
                or "forward" in vars(module)
                or getattr(module, "max_norm", None) is not None
            ):
                continue
            # PEFT wraps an adapted layer's own module as its base_layer
            key = ".".join(part for part in name.split(".") if part != "base_layer") + ".weight"
            weight = module.weight
            if id(weight) not in found:
                found[id(weight)] = _load(file, names, key, weight)
            if (codes := found[id(weight)]) is not None:
                embedding = type(module) is nn.Embedding  # a lookup: only its rows
                forward = codes.rows if embedding else _coded_forward(module, module.forward, codes)
                patches.attribute(module, "forward", forward, "weight codes")
                patches.attribute(module, CODES_ATTR, codes, "weight codes")
                count += 1
    return count


def coded_weights(model: nn.Module):
    """``patch_codes`` for the duration of a ``with`` block."""
    return patched(patch_codes, model)
