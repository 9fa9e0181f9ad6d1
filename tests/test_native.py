"""The compiled kernels give the same bits as the torch and NumPy code they stand in for, which stays
as the fallback; the library is built once, whole, and left out where it cannot be built."""

from __future__ import annotations

import os
import platform
import shutil

import pytest
import torch

from smolora.fast import native
from smolora.fast.codes import Codes
from smolora.fast.dropout import FastDropout

needs_compiler = pytest.mark.skipif(native.library() is None, reason="no C compiler with OpenMP")


@pytest.fixture
def without_library(monkeypatch):
    """Inside the fixture's test, ``native.library()`` is None: the torch and NumPy code runs."""

    def switch(off: bool):
        if off:
            monkeypatch.setenv(native.ENV, "0")
        else:
            monkeypatch.delenv(native.ENV, raising=False)
        native.library.cache_clear()

    yield switch
    monkeypatch.delenv(native.ENV, raising=False)
    native.library.cache_clear()


def stored_q4_1(out: int, blocks: int, generator: torch.Generator) -> Codes:
    """Random Q4_1 codes as the codes file stores them (input-major) and ``read_codes`` returns them."""
    codes = torch.randint(0, 256, (blocks, 16, out), dtype=torch.uint8, generator=generator)
    scale = (torch.randn(blocks, 1, out, generator=generator) * 0.01).half()  # some negative, as GGUF allows
    low = (torch.randn(blocks, 1, out, generator=generator) * 0.1).half()
    return Codes(*(t.permute(2, 0, 1) for t in (codes, scale, low)))


@pytest.mark.skipif(
    shutil.which("cc") is None or platform.system() != "Linux" or os.environ.get(native.ENV) == "0",
    reason="no C compiler, or the kernels switched off",
)
def test_the_library_builds_here():
    assert native.library() is not None


@needs_compiler
@pytest.mark.parametrize("out, blocks", [(576, 18), (40, 1), (7, 3), (1, 2), (50, 9)])
def test_q4_1_weight_is_the_torch_rebuild_bit_for_bit(out, blocks, without_library):
    """In W^T's layout (the forward's) and in W's own (the backward's: 16 outputs' codes transposed
    at a time, 8 blocks a task — the shapes cover both remainders)."""
    codes = stored_q4_1(out, blocks, torch.Generator().manual_seed(out))
    rebuilt, rows = native.q4_1_weight(*codes), native.q4_1_weight(*codes, row_major=True)
    assert rebuilt is not None and rebuilt.shape == (out, blocks * 32) and rows.is_contiguous()
    without_library(True)
    assert torch.equal(rebuilt, codes.weight()) and torch.equal(rows, codes.weight())


@needs_compiler
def test_q4_1_weight_leaves_other_layouts_to_torch():
    codes = stored_q4_1(64, 2, torch.Generator().manual_seed(0))
    assert native.q4_1_weight(*(t[:8] for t in codes)) is None  # some rows: not one stored block
    assert native.q4_1_weight(*(t.contiguous() for t in codes)) is None  # row-major, as a fit makes them
    assert torch.equal(codes.weight(slice(0, 8)), codes.weight()[:8])


@needs_compiler
def test_q8_0_weight_is_the_torch_rebuild_bit_for_bit(without_library):
    generator = torch.Generator().manual_seed(1)
    codes = Codes(
        torch.randint(-127, 128, (300, 5, 32), dtype=torch.int8, generator=generator),
        (torch.randn(300, 5, 1, generator=generator) * 0.01).half(),
    )
    whole, part = (
        native.q8_0_weight(codes.codes, codes.scale),
        native.q8_0_weight(codes.codes[100:250], codes.scale[100:250]),
    )
    assert whole is not None and part is not None
    without_library(True)
    assert torch.equal(whole, codes.weight()) and torch.equal(part, codes.weight(slice(100, 250)))


@needs_compiler
def test_every_fp16_scale_converts_as_torch_converts_it(without_library):
    """The kernels read the fp16 scales and lows themselves: all 65536 values, as Q8_0 scales
    (through q = 1) and as Q4_1 lows (through q = 0 and scale 0, eight at a time where F16C is)."""
    halves = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    q8_0 = Codes(torch.ones(2048, 32, 32, dtype=torch.int8), halves.view(2048, 32, 1))
    stored = (
        torch.zeros(32, 16, 2048, dtype=torch.uint8),
        torch.zeros(32, 1, 2048, dtype=torch.float16),
        halves.view(32, 1, 2048),
    )
    q4_1 = Codes(*(t.permute(2, 0, 1) for t in stored))
    rebuilt = native.q8_0_weight(q8_0.codes, q8_0.scale), native.q4_1_weight(*q4_1)
    without_library(True)
    for kernel, torch_rebuild in zip(rebuilt, (q8_0.weight(), q4_1.weight())):
        torch.testing.assert_close(kernel, torch_rebuild, rtol=0, atol=0, equal_nan=True)


@needs_compiler
@pytest.mark.parametrize("p", [0.1, 0.5, 25.5 / 256, 1 - 2**-32, 2**-40])
@pytest.mark.parametrize("shape", [(300, 576), (7,), (3, 1, 9)])
def test_dropout_mask_is_numpys_bit_for_bit(p, shape, without_library):
    torch.manual_seed(5)
    drawn = FastDropout(p).mask(torch.empty(shape))
    without_library(True)
    torch.manual_seed(5)
    expected = FastDropout(p).mask(torch.empty(shape))
    assert drawn.dtype == expected.dtype == torch.bool and torch.equal(drawn, expected)


def test_switched_off_or_without_a_compiler_the_library_is_not_built(without_library, monkeypatch, tmp_path):
    monkeypatch.setenv("SMOLORA_HOME", str(tmp_path))
    without_library(True)
    assert native.library() is None
    without_library(False)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    native.library.cache_clear()
    assert native.library() is None
    monkeypatch.setenv("CC", "false")  # a compiler that fails
    native.library.cache_clear()
    assert native.library() is None
    assert not (tmp_path / "kernels").exists() or not any((tmp_path / "kernels").iterdir())  # nothing half-built left


@needs_compiler
def test_the_library_is_built_once_into_smolora_home(without_library, monkeypatch, tmp_path):
    monkeypatch.setenv("SMOLORA_HOME", str(tmp_path))
    without_library(False)
    assert native.library() is not None
    built = list((tmp_path / "kernels").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"
    stamp = built[0].stat().st_mtime_ns
    native.library.cache_clear()
    assert native.library() is not None
    assert list((tmp_path / "kernels").iterdir()) == built and built[0].stat().st_mtime_ns == stamp


@needs_compiler
@pytest.mark.parametrize("shape", [(1, 300, 576), (1, 7, 9, 64), (3, 5)])
def test_rms_norm_is_the_torch_function_up_to_the_order_of_its_sums(shape, without_library):
    from smolora.fast.fused import RMSNormFunction, rms_scale

    generator = torch.Generator().manual_seed(len(shape))
    x = torch.randn(shape, generator=generator, requires_grad=True)
    weight, grad = torch.randn(shape[-1], generator=generator), torch.randn(shape, generator=generator)
    out, r = native.rms_norm(x.detach(), weight, 1e-5)
    assert torch.equal(out, rms_scale(x.detach(), r, weight))  # what a consumer recomputes from (x, r, weight)
    got = RMSNormFunction.apply(x, weight, 1e-5)
    (grad_got,) = torch.autograd.grad(got, x, grad)
    without_library(True)
    expected = RMSNormFunction.apply(x, weight, 1e-5)
    (grad_expected,) = torch.autograd.grad(expected, x, grad)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_got, grad_expected, rtol=1e-5, atol=1e-6)


@needs_compiler
@pytest.mark.parametrize("heads, tokens, d", [(9, 300, 64), (2, 5, 8), (1, 1, 2)])
def test_rotary_is_the_torch_function_bit_for_bit(heads, tokens, d, without_library):
    from smolora.fast.fused import RotaryFunction

    generator = torch.Generator().manual_seed(d)
    x = (
        torch.randn(1, tokens, heads, d, generator=generator).transpose(1, 2).requires_grad_()
    )  # as q_proj's output is viewed
    cos, sin = (torch.randn(1, 1, tokens, d, generator=generator) for _ in range(2))
    grad = torch.randn(1, heads, tokens, d, generator=generator)
    got = RotaryFunction.apply(x, cos, sin)
    (grad_got,) = torch.autograd.grad(got, x, grad)
    assert native.rotary(x.detach(), cos, sin) is not None
    without_library(True)
    expected = RotaryFunction.apply(x, cos, sin)
    (grad_expected,) = torch.autograd.grad(expected, x, grad)
    assert torch.equal(got, expected) and torch.equal(grad_got, grad_expected)
    assert native.rotary(x.detach(), cos[..., :-1, :], sin[..., :-1, :]) is None  # another layout: torch's code


@needs_compiler
@pytest.mark.parametrize("after_norm", [True, False])
@pytest.mark.parametrize("rank, tokens, h", [(8, 300, 576), (3, 5, 40), (16, 1, 70)])
def test_adapter_dropout_and_a_product_are_the_torch_functions_up_to_the_order_of_their_sums(
    after_norm, rank, tokens, h, without_library
):
    """``DropoutLinear`` forward and backward, its dropped input recomputed from a fused RMSNorm's
    input (``normed_from``) or from the saved input itself."""
    from smolora.fast.dropout import DropoutLinear
    from smolora.fast.fused import RMSNormFunction

    generator = torch.Generator().manual_seed(rank)
    x0, norm_weight = torch.randn(1, tokens, h, generator=generator), torch.randn(h, generator=generator)
    a = (torch.randn(rank, h, generator=generator) * 0.1).requires_grad_()
    keep, grad = torch.rand(1, tokens, h, generator=generator) > 0.1, torch.randn(1, tokens, rank, generator=generator)

    def run():
        x = x0.clone().requires_grad_()
        y = DropoutLinear.apply(RMSNormFunction.apply(x, norm_weight, 1e-5) if after_norm else x, keep, 1 / 0.9, a)
        return (y, *torch.autograd.grad(y, (x, a), grad))

    assert native.dropout_linear(x0, keep, 1 / 0.9, a.detach()) is not None
    got = run()
    without_library(True)
    for value, expected in zip(got, run()):  # fp32 sums of up to 300 products of magnitude ~1, in two orders
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-4)


@needs_compiler
def test_swiglu_is_the_torch_function_up_to_its_exp(without_library):
    """Its exp is a polynomial within ~2 ulp of torch's, clamped where fp32's would over- or underflow:
    values and gradients over gates from -100 to 100 stay within a few ulp of torch's."""
    from smolora.fast.fused import SwiGLUFunction

    generator = torch.Generator().manual_seed(0)
    gate = (
        torch.cat([torch.linspace(-100, 100, 20001), torch.randn(3 * 1536 + 3, generator=generator) * 3])
        .view(1, -1, 7)
        .requires_grad_()
    )
    up, grad = (
        torch.randn(gate.shape, generator=generator).requires_grad_(),
        torch.randn(gate.shape, generator=generator),
    )

    def run():
        out = SwiGLUFunction.apply(gate, up)
        return (out, *torch.autograd.grad(out, (gate, up), grad))

    assert native.swiglu(gate.detach(), up.detach()) is not None
    got = run()
    without_library(True)
    for value, expected in zip(got, run()):  # the gate's gradient cancels to ~0 near g = -1.28: there absolute
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-5)


@needs_compiler
def test_kernels_write_fp32_whatever_torchs_default_dtype(without_library):
    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(1, 6, 8, 16, generator=generator), torch.randn(16, generator=generator)
    cos, sin = torch.randn(1, 1, 8, 16, generator=generator), torch.randn(1, 1, 8, 16, generator=generator)
    keep, a = torch.rand(1, 8, 16, generator=generator) > 0.5, torch.randn(4, 16, generator=generator)
    torch.set_default_dtype(torch.float64)
    try:
        got = (
            native.rms_norm(x, weight, 1e-5)[1],
            native.rotary(x, cos, sin),
            native.dropout_linear(x[0, :1], keep, 2.0, a),
        )
    finally:
        torch.set_default_dtype(torch.float32)
    without_library(True)
    from smolora.fast.fused import RMSNormFunction, RotaryFunction

    expected = (
        torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-5),
        RotaryFunction.apply(x, cos, sin),
        (x[0, :1] * keep * 2.0) @ a.T,
    )
    for value, reference in zip(got, expected):
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, reference, rtol=1e-5, atol=1e-5)
    assert RMSNormFunction.apply(x, weight, 1e-5).dtype == torch.float32


@needs_compiler
def test_span_attention_leaves_spans_that_do_not_tile_the_row_to_torch():
    """The kernels write each row once and read none outside the spans: anything else is refused."""
    q, k = torch.randn(10, 4, 8), torch.randn(10, 2, 8)
    good = torch.tensor([[0, 4, 0], [4, 10, 1]])
    assert native.span_attention(q, k, k, 4, good, 0.5) is not None
    for spans, context in [
        ([[0, 4, 0], [5, 10, 1]], 4),
        ([[0, 4, 0], [4, 11, 1]], 4),
        ([[0, 4, 0], [4, 9, 1]], 4),
        ([[0, 0, 0], [0, 10, 0]], 0),
        ([[0, 10, 1]], 11),
    ]:
        assert native.span_attention(q, k, k, context, torch.tensor(spans), 0.5) is None
