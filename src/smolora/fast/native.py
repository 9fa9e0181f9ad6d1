"""CPU kernels in C (``native.c``), compiled on first use by the system's C compiler.

Rebuilding a frozen weight from its Q4_1 codes takes torch five element-wise calls (two casts of
the nibbles, a mask, a shift, a fused multiply-add) and two casts of the fp16 scales and lows, each
a pass over memory; a Q8_0 block of the LM head three; FastDropout's mask several NumPy arrays;
the fused RMSNorm six calls forward and eight backward; the rotary embedding three each way; a
LoRA adapter's dropout and A product (``DropoutLinear``) three forward and eight backward, two of
them rank-r products a BLAS runs far below its peak; the SwiGLU's backward four. ``q4_1_weight``
and ``q8_0_weight`` write each weight once, reading the fp16 values themselves — a Q4_1 weight in
W^T's layout or, for the backward's GEMM, which reads it faster, in W's own; ``dropout_keep``
writes the mask straight from the generator's stream; the others make one pass each way.
``span_attention`` attends all the spans of a packed row in one call per layer, where torch runs a
flash-kernel call per span and per direction, with the slicing and concatenation around it.

Each gives the same bits as the torch (or NumPy) code it stands in for — but for the sums
(RMSNorm's over a row, the adapter's products), added in another order (~1e-7 relative), and
SwiGLU's exp, a polynomial within ~2 ulp of torch's, and the span attention (its own order of
sums, the same exp: ~1e-6 relative against float64). That code stays as the fallback:
``library()`` is None where no compiler is found, where the build fails (the source needs
OpenMP), or with ``SMOLORA_NATIVE=0``.

The library is built once with ``-march=native`` into ``$SMOLORA_HOME/kernels``, keyed
by the source, the compiler and the CPU's name and flags, so that a home shared between machines
never loads one built for another CPU.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from smolora.paths import publish, smolora_home

ENV = "SMOLORA_NATIVE"  # 0: never build or load the library
SOURCE = Path(__file__).with_name("native.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC")
_pointer, _int64 = ctypes.c_void_p, ctypes.c_int64
_float, _int = ctypes.c_float, ctypes.c_int
SIGNATURES = {  # native.c's functions: (return type, argument types); threads last where they take them
    "q4_1_weight": (None, [_pointer] * 4 + [_int64, _int64, _int]),
    "q4_1_weight_rows": (None, [_pointer] * 4 + [_int64, _int64, _int]),
    "q8_0_weight": (None, [_pointer] * 3 + [_int64, _int64, _int]),
    "dropout_keep": (_int64, [ctypes.c_uint64, ctypes.c_uint32, _pointer, _int64]),
    "rms_norm_forward": (None, [_pointer, _pointer, _float, _pointer, _pointer, _int64, _int64, _int]),
    "rms_norm_backward": (None, [_pointer] * 5 + [_int64, _int64, _int]),
    "rotary": (None, [_pointer, _int64, _int64, _pointer, _pointer, _pointer, _int64, _int64, _int64, _float, _int]),
    "dropout_linear_forward": (None, [_pointer, _pointer, _float, _pointer, _pointer, _int64, _int64, _int64, _int]),
    "dropout_linear_backward": (None, [_pointer] * 5 + [_float] + [_pointer] * 3 + [_int64, _int64, _int64, _int]),
    "swiglu_forward": (None, [_pointer] * 3 + [_int64, _int]),
    "swiglu_backward": (None, [_pointer] * 5 + [_int64, _int]),
    "span_attention_forward": (
        None,
        [_pointer] * 5 + [_int64, _pointer] + [_int64] * 4 + [_float, _pointer, _pointer, _int],
    ),
    "span_attention_backward": (
        None,
        [_pointer] * 6 + [_int64, _pointer] + [_int64] * 4 + [_float] + [_pointer] * 7 + [_int],
    ),
}


def _cpu() -> str:
    """The CPU's name and instruction-set flags (Linux), else what ``platform`` knows of it."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        return "".join(line for line in info.splitlines(keepends=True) if line.startswith(("model name", "flags")))[
            :8192
        ]
    except OSError:
        return platform.processor() + platform.machine()


def _compile(compiler: str, output: Path) -> None:
    subprocess.run(
        [compiler, *FLAGS, "-o", str(output), str(SOURCE), "-lm"], check=True, capture_output=True, timeout=300
    )


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on the first call of the process and cached on disk; None if not available."""
    if os.environ.get(ENV, "").strip() == "0" or platform.system() == "Windows":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None
    key = hashlib.sha256(
        b"\0".join([SOURCE.read_bytes(), compiler.encode(), " ".join(FLAGS).encode(), _cpu().encode()])
    )
    path = smolora_home() / "kernels" / f"native-{key.hexdigest()[:16]}.so"
    try:
        if not path.is_file():  # written whole, then renamed: never half a library
            publish(path, functools.partial(_compile, compiler), folder=False)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError):
        return None
    for name, (restype, argtypes) in SIGNATURES.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes
    return lib


def q4_1_weight(
    codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, row_major: bool = False
) -> torch.Tensor | None:
    """W (out, in) from input-major Q4_1 codes (out, blocks, 16) and fp16 scale and low (out,
    blocks, 1) — as ``smolora.fast.codes.Codes.weight`` rebuilds it — in W^T's layout, or with
    ``row_major`` in W's own; or None where the library is missing or the tensors are not laid
    out as the codes file stores them."""
    lib = library()
    out, blocks, width = codes.shape
    stored = [t.permute(1, 2, 0) for t in (codes, scale, low)]  # (blocks, 16 or 1, out) as in memory
    if (
        lib is None
        or width != 16
        or codes.dtype != torch.uint8
        or scale.dtype != torch.float16
        or low.dtype != torch.float16
        or not all(t.is_contiguous() for t in stored)
    ):
        return None
    if row_major:
        weight = torch.empty(out, blocks * 32, dtype=torch.float32)
        lib.q4_1_weight_rows(*(t.data_ptr() for t in (*stored, weight)), blocks, out, torch.get_num_threads())
        return weight
    weight = torch.empty(blocks, 32, out, dtype=torch.float32)
    lib.q4_1_weight(*(t.data_ptr() for t in (*stored, weight)), blocks, out, torch.get_num_threads())
    return weight.view(blocks * 32, out).t()


def q8_0_weight(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """W (rows, blocks * 32) from row-major Q8_0 codes (rows, blocks, 32) and fp16 scales (rows,
    blocks, 1), or None where the library is missing or the codes are not contiguous."""
    lib = library()
    rows, blocks, width = codes.shape
    if (
        lib is None
        or width != 32
        or codes.dtype != torch.int8
        or scale.dtype != torch.float16
        or not codes.is_contiguous()
    ):
        return None
    scale = scale.contiguous()
    weight = torch.empty(rows, blocks * 32, dtype=torch.float32)
    lib.q8_0_weight(codes.data_ptr(), scale.data_ptr(), weight.data_ptr(), rows, blocks, torch.get_num_threads())
    return weight


def dropout_keep(seed: int, threshold: int, shape: torch.Size) -> torch.Tensor | None:
    """``smolora.lora.FastDropout``'s bool mask for ``seed`` and the 32-bit ``threshold``, or None
    where the library is missing."""
    lib = library()
    if lib is None or sys.byteorder != "little":  # the kernel reads the stream's bytes in little-endian order
        return None
    keep = torch.empty(shape, dtype=torch.bool)
    lib.dropout_keep(seed, threshold, keep.data_ptr(), keep.numel())
    return keep


def _fp32_cpu(*tensors: torch.Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(out, r)`` as ``smolora.fast.fused.RMSNormFunction`` computes them — ``r = 1 / rms(x)`` (..., 1),
    ``out = (x * r) * weight`` — in one pass, or None where the library is missing or ``x`` is not
    contiguous fp32. The sum of squares adds in another order than torch's (~1e-7 relative)."""
    lib = library()
    if lib is None or not _fp32_cpu(x, weight) or not x.is_contiguous() or not weight.is_contiguous() or not x.numel():
        return None
    out, r = torch.empty_like(x), torch.empty(*x.shape[:-1], 1, dtype=torch.float32)
    lib.rms_norm_forward(
        x.data_ptr(),
        weight.data_ptr(),
        eps,
        out.data_ptr(),
        r.data_ptr(),
        x.numel() // x.shape[-1],
        x.shape[-1],
        torch.get_num_threads(),
    )
    return out, r


def rms_norm_grad(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, r: torch.Tensor) -> torch.Tensor | None:
    """The RMSNorm's gradient to ``x`` (not to its weight) in one pass, or None as ``rms_norm``."""
    lib = library()
    if (
        lib is None
        or not _fp32_cpu(grad, x, weight, r)
        or not all(t.is_contiguous() for t in (x, weight, r))
        or grad.shape != x.shape
        or not x.numel()
    ):
        return None
    grad, grad_x = grad.contiguous(), torch.empty_like(x)
    lib.rms_norm_backward(
        grad.data_ptr(),
        x.data_ptr(),
        weight.data_ptr(),
        r.data_ptr(),
        grad_x.data_ptr(),
        x.numel() // x.shape[-1],
        x.shape[-1],
        torch.get_num_threads(),
    )
    return grad_x


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float = 1.0) -> torch.Tensor | None:
    """``x * cos + rotate_half(x) * sin`` for ``x`` (1, heads, tokens, d) and ``cos``, ``sin`` (1, 1,
    tokens, d) — with ``sign = -1``, its gradient — bit for bit as ``smolora.fast.fused.RotaryFunction``,
    or None where the library is missing or the layouts differ. The output is laid out (1, tokens,
    heads, d), as the attention's input projections make ``x``."""
    lib = library()
    if (
        lib is None
        or not _fp32_cpu(x, cos, sin)
        or x.dim() != 4
        or x.shape[0] != 1
        or x.shape[-1] % 2
        or x.stride(-1) != 1
        or any(t.shape != (1, 1, *x.shape[2:]) or not t.is_contiguous() for t in (cos, sin))
    ):
        return None
    _, heads, tokens, d = x.shape
    out = torch.empty(1, tokens, heads, d, dtype=torch.float32)
    lib.rotary(
        x.data_ptr(),
        x.stride(2),
        x.stride(1),
        cos.data_ptr(),
        sin.data_ptr(),
        out.data_ptr(),
        tokens,
        heads,
        d,
        sign,
        torch.get_num_threads(),
    )
    return out.transpose(1, 2)


MAX_RANK = 256  # the adapter kernels keep a row's r sums (and r x 64 of A's gradient) on the stack


def _adapter_layout(x: torch.Tensor, keep: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        _fp32_cpu(x, weight)
        and keep.dtype == torch.bool
        and keep.shape == x.shape
        and weight.dim() == 2
        and weight.shape[1] == x.shape[-1]
        and 0 < weight.shape[0] <= MAX_RANK
        and x.numel() > 0
        and all(t.is_contiguous() for t in (x, keep, weight))
    )


def dropout_linear(x: torch.Tensor, keep: torch.Tensor, scale: float, weight: torch.Tensor) -> torch.Tensor | None:
    """``((x * keep) * scale) @ weight^T`` for x (..., h), keep its bool mask, weight (r, h), in one
    pass, or None where the library is missing or the layouts differ. The products sum in another
    order than a BLAS's (~1e-7 relative)."""
    lib = library()
    if lib is None or not _adapter_layout(x, keep, weight):
        return None
    rank, h = weight.shape
    y = torch.empty(*x.shape[:-1], rank, dtype=torch.float32)
    lib.dropout_linear_forward(
        x.data_ptr(),
        keep.data_ptr(),
        scale,
        weight.data_ptr(),
        y.data_ptr(),
        x.numel() // h,
        h,
        rank,
        torch.get_num_threads(),
    )
    return y


def dropout_linear_grad(
    grad: torch.Tensor,
    source: tuple[torch.Tensor, ...],
    keep: torch.Tensor,
    scale: float,
    weight: torch.Tensor,
    want_x: bool,
    want_weight: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
    """The gradients of ``dropout_linear`` to x and to weight (each only if wanted), the dropped input
    recomputed from ``source``: ``(x,)``, or a fused RMSNorm's ``(input, r, weight)`` (see
    ``smolora.fast.fused.normed_from``); or None where the library is missing or the layouts differ."""
    lib = library()
    x = source[0]
    if (
        lib is None
        or not _adapter_layout(x, keep, weight)
        or grad.shape != (*x.shape[:-1], weight.shape[0])
        or not _fp32_cpu(grad, *source)
        or not all(t.is_contiguous() for t in source)
    ):
        return None
    norm_r, norm_w = source[1:] if len(source) == 3 else (None, None)
    if norm_r is not None and (norm_r.numel() != x.numel() // x.shape[-1] or norm_w.shape != x.shape[-1:]):
        return None
    rank, h = weight.shape
    grad = grad.contiguous()
    grad_x = torch.empty_like(x) if want_x else None
    grad_w = torch.empty_like(weight) if want_weight else None
    pointer = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    lib.dropout_linear_backward(
        grad.data_ptr(),
        x.data_ptr(),
        pointer(norm_r),
        pointer(norm_w),
        keep.data_ptr(),
        scale,
        weight.data_ptr(),
        pointer(grad_x),
        pointer(grad_w),
        x.numel() // h,
        h,
        rank,
        torch.get_num_threads(),
    )
    return grad_x, grad_w


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """``silu(gate) * up`` in one pass, its exp within ~2 ulp of torch's, or None where the library
    is missing or the inputs are not contiguous fp32 of one shape."""
    lib = library()
    if (
        lib is None
        or not _fp32_cpu(gate, up)
        or gate.shape != up.shape
        or not gate.is_contiguous()
        or not up.is_contiguous()
    ):
        return None
    out = torch.empty_like(gate)
    lib.swiglu_forward(gate.data_ptr(), up.data_ptr(), out.data_ptr(), gate.numel(), torch.get_num_threads())
    return out


def swiglu_grad(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The gradients of ``swiglu`` to gate and to up in one pass, or None as ``swiglu``."""
    lib = library()
    if (
        lib is None
        or not _fp32_cpu(grad, gate, up)
        or not grad.shape == gate.shape == up.shape
        or not gate.is_contiguous()
        or not up.is_contiguous()
    ):
        return None
    grad = grad.contiguous()
    grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
    lib.swiglu_backward(
        grad.data_ptr(),
        gate.data_ptr(),
        up.data_ptr(),
        grad_gate.data_ptr(),
        grad_up.data_ptr(),
        gate.numel(),
        torch.get_num_threads(),
    )
    return grad_gate, grad_up


def _span_layout(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    context: tuple[torch.Tensor, torch.Tensor] | int,
    spans: torch.Tensor,
) -> bool:
    """The layouts the span kernels read, and spans that tile the row's T rows in order (the kernels
    write each row once, and read no row outside them)."""
    tensors = (q, k, v, *(context if isinstance(context, tuple) else ()))
    if not (
        _fp32_cpu(*tensors)
        and all(t.is_contiguous() and t.dim() == 3 for t in tensors)
        and k.shape == v.shape
        and q.shape[0] == k.shape[0]
        and q.shape[2] == k.shape[2]
        and q.shape[1] % k.shape[1] == 0
        and (
            not isinstance(context, tuple)
            or context[0].shape == context[1].shape
            and context[0].shape[1:] == k.shape[1:]
        )
        and spans.dtype == torch.int64
        and spans.is_contiguous()
        and spans.dim() == 2
        and spans.shape[1] == 3
    ):
        return False
    bounds = spans.tolist()
    ends = [0] + [end for _, end, _ in bounds]
    return (
        0 <= (context if isinstance(context, int) else 0) <= q.shape[0]
        and ends[-1] == q.shape[0]
        and all(start == before and end > start for (start, end, _), before in zip(bounds, ends))
    )


def _context(
    k: torch.Tensor, v: torch.Tensor, context: tuple[torch.Tensor, torch.Tensor] | int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    if isinstance(context, tuple):
        return (*context, context[0].shape[0])
    return k, v, context  # the row's own first rows


def span_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    context: tuple[torch.Tensor, torch.Tensor] | int,
    spans: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Causal attention of a packed row's spans (``smolora.fast.attention.SpanAttention``): ``(out, lse)``,
    out (T, H, D) and each query's log-sum-exp (T, H), for q (T, H, D), k and v (T, KV, D), spans
    (S, 3) int64 rows ``[start, end, sees_context]``; ``context`` is the keys and values every marked
    span sees first — ``(ck, cv)`` each (P, KV, D), or an int P: the row's own first P rows. None
    where the library is missing or the layouts differ."""
    lib = library()
    if lib is None or not _span_layout(q, k, v, context, spans):
        return None
    ck, cv, length = _context(k, v, context)
    (tokens, heads, d), kv_heads = q.shape, k.shape[1]
    out, lse = torch.empty_like(q), torch.empty(tokens, heads, dtype=torch.float32)
    lib.span_attention_forward(
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        ck.data_ptr(),
        cv.data_ptr(),
        length,
        spans.data_ptr(),
        spans.shape[0],
        heads,
        kv_heads,
        d,
        scale,
        out.data_ptr(),
        lse.data_ptr(),
        torch.get_num_threads(),
    )
    return out, lse


def span_attention_grad(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    context: tuple[torch.Tensor, torch.Tensor] | int,
    spans: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> tuple[torch.Tensor, ...] | None:
    """The gradients of ``span_attention`` to q, k, v and, for a ``(ck, cv)`` context, to ck and cv
    (for a row's own prefix, they are in k's and v's); None as ``span_attention``."""
    lib = library()
    if lib is None or not _span_layout(q, k, v, context, spans) or grad.shape != q.shape or not _fp32_cpu(grad):
        return None
    ck, cv, length = _context(k, v, context)
    grad = grad.contiguous()
    grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)  # the spans write every row
    grad_ck, grad_cv = (torch.zeros_like(ck), torch.zeros_like(cv)) if isinstance(context, tuple) else (grad_k, grad_v)
    lib.span_attention_backward(
        grad.data_ptr(),
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        ck.data_ptr(),
        cv.data_ptr(),
        length,
        spans.data_ptr(),
        spans.shape[0],
        q.shape[1],
        k.shape[1],
        q.shape[2],
        scale,
        out.data_ptr(),
        lse.data_ptr(),
        grad_q.data_ptr(),
        grad_k.data_ptr(),
        grad_v.data_ptr(),
        grad_ck.data_ptr(),
        grad_cv.data_ptr(),
        torch.get_num_threads(),
    )
    return (grad_q, grad_k, grad_v) + ((grad_ck, grad_cv) if isinstance(context, tuple) else ())
