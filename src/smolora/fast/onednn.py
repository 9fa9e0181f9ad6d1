"""Frozen linear layers and the LM head through oneDNN's fp32 GEMM, where it is faster on this CPU.

torch multiplies fp32 matrices on a CPU with MKL's ``sgemm``. MKL runs its AVX-512 kernels only
on Intel processors: on an AMD CPU with AVX-512 it takes its AVX2 path, where oneDNN's brgemm
(also in every x86 torch build) uses AVX-512. Which is faster depends on the CPU, so it is timed
once per process (``onednn_is_faster``), not assumed; ``SMOLORA_GEMM=mkl`` or ``onednn`` decides it
instead, and a resumed run takes the choice its checkpoint recorded (``use_gemm``).

Either way the products are fp32 GEMMs: only the summation order differs (~1e-7 relative, as
between any two BLAS libraries).

``patch_onednn(model, patches)`` routes every frozen ``nn.Linear`` through ``FrozenLinear``: its
forward and its backward to the input (``g @ W``, the weight read transposed in place)
are both oneDNN calls. ``linear`` is the same call with no autograd, for the LM-head loss.

oneDNN JIT-compiles a kernel per GEMM shape, and two caches keep them, 1024 entries each by
default (oneDNN's primitive cache and ideep's LRU) at up to ~1 MB an entry. Training rows of
every length make hundreds of shapes: the caches would grow by hundreds of MiB. A row needs
about 20, so both are capped at 32 when this module is imported, before the process's first
oneDNN call, unless the environment already names them; an evicted kernel is cheap to re-create.
"""

from __future__ import annotations

import functools
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from smolora.errors import SmoLoRAError
from smolora.fast.patch import Patches, patched

ENV = "SMOLORA_GEMM"  # auto (measure), onednn, or mkl (torch's default)
CACHES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")  # read once, at the process's first oneDNN call
for _name in CACHES:
    os.environ.setdefault(_name, "32")


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _available() -> bool:
    return (
        torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


@functools.lru_cache(maxsize=None)
def onednn_is_faster() -> bool:
    """Whether fp32 linear layers run faster through oneDNN than through torch's default on this
    CPU: a 256 x 1024 x 1024 GEMM timed both ways, best of 5 each after a warm-up."""
    choice = os.environ.get(ENV, "").strip().lower() or "auto"  # set but empty: the default
    if choice not in ("auto", "onednn", "mkl"):
        raise SmoLoRAError(f"{ENV}={choice!r}: expected auto, onednn or mkl")
    if choice == "mkl" or not _available():
        return False
    generator = torch.Generator().manual_seed(0)
    x, w = torch.randn(256, 1024, generator=generator), torch.randn(1024, 1024, generator=generator)
    try:
        _onednn_linear(x, w)  # also the warm-up
    except RuntimeError:  # a build without the op's CPU kernel
        return False
    if choice == "onednn":
        return True
    x @ w.T  # warm-up

    def seconds(run) -> float:
        start = time.perf_counter()
        run()
        return time.perf_counter() - start

    onednn = mkl = float("inf")
    for _ in range(5):  # interleaved
        onednn = min(onednn, seconds(lambda: _onednn_linear(x, w)))
        mkl = min(mkl, seconds(lambda: x @ w.T))
    return mkl > 1.2 * onednn  # a margin, so that noise does not flip the choice


def gemm_choice() -> str:
    """The fp32 GEMM this process uses for the frozen layers: "onednn" or "mkl" (torch's default)."""
    return "onednn" if onednn_is_faster() else "mkl"


def use_gemm(choice: str) -> None:
    """Use ``choice`` ("onednn" or "mkl") from now on in this process instead of timing the two: a
    resumed run takes the GEMM its checkpoint was trained with, so its sums come out the same."""
    os.environ[ENV] = choice
    onednn_is_faster.cache_clear()


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x @ weight.T`` can go through oneDNN here: fp32 on the CPU, no autocast, and
    oneDNN measured faster."""
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and weight.device.type == "cpu"
        and not torch.is_autocast_enabled("cpu")
        and onednn_is_faster()
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with no autograd, through oneDNN where ``usable``."""
    return _onednn_linear(x, weight, bias) if usable(x, weight) else F.linear(x, weight, bias)


class FrozenLinear(torch.autograd.Function):
    """``x @ W^T + b`` for a frozen ``W`` and ``b``: forward and backward to ``x`` through oneDNN."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return _onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return _onednn_linear(grad, weight.t()), None, None


def _frozen_forward(module: nn.Linear, original):
    def forward(x):
        weight, bias = module.weight, module.bias
        trains = torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad))
        if trains or not usable(x, weight) or (bias is not None and bias.dtype != weight.dtype):
            return original(x)
        return FrozenLinear.apply(x, weight, bias)

    return forward


def patch_onednn(model: nn.Module, patches: Patches) -> int:
    """Until ``patches`` are restored, run ``model``'s frozen ``nn.Linear`` layers through
    ``FrozenLinear`` where oneDNN is faster on this CPU; a layer whose weight or bias trains keeps
    its own forward. Returns how many layers were patched."""
    if not onednn_is_faster():
        return 0
    count, probed = 0, set()
    for module in model.modules():
        if type(module) is nn.Linear and "forward" not in vars(module):
            if (shape := (module.weight.shape, module.weight.dtype)) not in probed:
                _check_probe(module)
                probed.add(shape)
            patches.attribute(module, "forward", _frozen_forward(module, module.forward), "oneDNN linears")
            count += 1
    return count


@torch.no_grad()
def _check_probe(module: nn.Linear) -> None:
    """oneDNN's product equals ``F.linear``'s on a probe input (to fp32 rounding), or an error."""
    generator = torch.Generator().manual_seed(module.in_features)  # not the global RNG: dropout masks are untouched
    x = torch.randn(3, module.in_features, generator=generator).to(module.weight)
    if usable(x, module.weight) and (module.bias is None or module.bias.dtype == module.weight.dtype):
        expected, got = F.linear(x, module.weight, module.bias), _onednn_linear(x, module.weight, module.bias)
        if not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
            raise RuntimeError(f"oneDNN's product differs from F.linear's on a probe ({tuple(module.weight.shape)})")


def onednn_linears(model: nn.Module):
    """``patch_onednn`` for the duration of a ``with`` block."""
    return patched(patch_onednn, model)
