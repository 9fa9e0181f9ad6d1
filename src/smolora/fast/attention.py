"""Variable-length attention for packed rows: each example attends only to itself (and to a prefix
shared by the row, or by every row of the optimizer step), computed block by block — no (T, T)
mask, and none of the wasted work of masked-out blocks. Where ``smolora.fast.native``'s kernels are
built, a row's spans are one ``SpanAttention`` call per layer (a short step -11%, a long one -8%).
Otherwise a block is torch's flash kernel or, for a span of ``GEMM_MIN_QUERIES`` or more on a CPU
where oneDNN's GEMM is the faster one, ``GemmAttention``: its products as oneDNN GEMMs (a quarter
less attention time on long examples).

Registered with transformers' AttentionInterface under ``smolora_varlen`` and switched on only
for the duration of a training forward (``varlen_attention`` context), so the model's config, its
generation path and everything saved from it keep the model's own attention implementation.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from smolora.data.batching import Segments
from smolora.fast import native
from smolora.fast.onednn import linear, usable
from smolora.fast.patch import Patches, patched
from smolora.loss import has_sliding_window

NAME = "smolora_varlen"


# Torch's CPU flash kernel takes all keys as one block below 512 of them, so a causal call saves
# nothing there. On CPU a span this long is attended in two halves instead, the first seeing only
# the keys it can: ~25% less work (fwd+bwd -13% at 450 tokens); a half shorter than 192 queries gets
# the kernel's smaller tiles and loses more than that saves. GPU kernels skip masked blocks themselves.
SPLIT_QUERIES = 384


@functools.lru_cache(maxsize=64)  # a row's spans, reused by every layer; a 450-token one is ~0.2 MB
def _causal_mask(prefix: int, start: int, end: int, device: torch.device) -> torch.Tensor:
    """(end - start, prefix + end) bool: queries start..end-1 of a span see the whole prefix, then
    the span's tokens up to their own."""
    i = torch.arange(start, end, device=device)[:, None]
    return torch.arange(prefix + end, device=device)[None, :] <= prefix + i


# Where oneDNN's GEMM is the faster one (``smolora.fast.onednn``: an AMD CPU, where the flash kernel's
# inner products run on MKL's AVX2 path), a span of this many queries or more is attended by
# ``GemmAttention`` instead; below it the two take the same time. Its probabilities are one
# (heads of a group x queries x keys) block: above GEMM_MAX_SCORES the flash kernel's tiles win.
GEMM_MIN_QUERIES = 128
GEMM_MAX_SCORES = 1 << 22  # 16 MiB of fp32 scores per KV group


@functools.lru_cache(maxsize=64)
def _future_keys(n: int, device: torch.device) -> torch.Tensor:
    """(n, n) bool, True above the diagonal: the keys among a part's own n that a query may not see."""
    return torch.ones(n, n, dtype=torch.bool, device=device).triu_(1)


def _probabilities(q: torch.Tensor, k: torch.Tensor, n: int) -> torch.Tensor:
    """softmax(q k^T) over the keys, q (group, n, D) scaled, k (m, D): (group, n, m), causal in the last n keys."""
    scores = linear(q.view(-1, q.shape[-1]), k).view(*q.shape[:2], -1)
    scores[..., k.shape[0] - n :].masked_fill_(_future_keys(n, q.device), float("-inf"))
    return torch.softmax(scores, dim=-1)


class GemmAttention(torch.autograd.Function):
    """Causal attention of queries (1, H, n, D) on keys and values (1, KV, m, D), m >= n: query i
    sees keys 0 .. m - n + i. Per KV group its H / KV query heads are one (H / KV * n, D) matrix,
    so each product is one oneDNN GEMM (``smolora.fast.onednn.linear``) and the softmax one fused
    kernel over the group's scores. Backward recomputes the probabilities from q and k, as flash
    attention does, instead of keeping them."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float):
        n, groups = q.shape[2], k.shape[1]
        group = q.shape[1] // groups
        qs = torch.mul(q[0], scale, out=torch.empty(q.shape[1:], dtype=q.dtype, device=q.device))  # (H, n, D)
        ks, vs = k[0].contiguous(), v[0].contiguous()  # (KV, m, D): oneDNN reads a strided weight far slower
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        for g in range(groups):
            heads = slice(g * group, (g + 1) * group)
            p = _probabilities(qs[heads], ks[g], n)
            out[0, heads] = linear(p.view(-1, p.shape[-1]), vs[g].t()).view(group, n, -1)
        ctx.save_for_backward(qs, ks, vs)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):
        qs, ks, vs = ctx.saved_tensors  # q scaled, k and v, each contiguous
        n, groups, scale = qs.shape[1], ks.shape[0], ctx.scale
        group, m = qs.shape[0] // groups, ks.shape[1]
        grad_out = grad[0].contiguous()  # (H, n, D)
        grad_q, grad_k, grad_v = (torch.empty((1, *t.shape), dtype=t.dtype, device=t.device) for t in (qs, ks, vs))
        for g in range(groups):
            heads = slice(g * group, (g + 1) * group)
            q, grad_o = qs[heads].view(-1, qs.shape[-1]), grad_out[heads].view(-1, qs.shape[-1])
            p = _probabilities(qs[heads], ks[g], n)
            # p * (dp - rowsum(dp * p)): softmax's own backward kernel, one pass
            grad_s = torch._softmax_backward_data(linear(grad_o, vs[g]).view(group, n, m), p, -1, p.dtype).view(-1, m)
            grad_q[0, heads] = linear(grad_s, ks[g].t()).view(group, n, -1).mul_(scale)
            # summed over the group's heads and queries; as (D, m) products, so that the large
            # operand is oneDNN's weight, which it reads transposed in place, not its input, which it copies
            grad_k[0, g] = linear(q.t(), grad_s.t()).t()
            grad_v[0, g] = linear(grad_o.t(), p.view(-1, m).t()).t()
        return grad_q, grad_k, grad_v, None


# A row whose spans are all shorter than this goes through ``SpanAttention`` where the compiled
# kernels are built: one call for all its spans where the flash kernel takes one per span. Where
# GemmAttention would take the long spans (``gemm_attention_pays``: the flash kernel's inner
# products are slow there), spans up to SPAN_MAX_QUERIES_OVER_GEMM (longer ones were not measured).
SPAN_MAX_QUERIES = 128
SPAN_MAX_QUERIES_OVER_GEMM = 1024


class SpanAttention(torch.autograd.Function):
    """Causal attention of a packed row's spans by ``smolora.fast.native.span_attention``: all spans
    and heads of a layer in one call, each span seeing the context first where it is marked to. q
    (T, H, D), k and v (T, KV, D); the context ``ck``, ``cv`` (P, KV, D), or None and ``context`` P:
    the row's own first P rows; ``spans`` (S, 3) int64 rows [start, end, sees_context]. Backward
    recomputes the probabilities from q, k and the kept log-sum-exp, as flash attention does."""

    @staticmethod
    def forward(ctx, q, k, v, ck, cv, spans: torch.Tensor, context: int, scale: float):
        context_arg = (ck, cv) if ck is not None else context
        out, lse = native.span_attention(q, k, v, context_arg, spans, scale)
        ctx.save_for_backward(q, k, v, ck, cv, out, lse)
        ctx.spans, ctx.context, ctx.scale = spans, context, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, ck, cv, out, lse = ctx.saved_tensors
        context = (ck, cv) if ck is not None else ctx.context
        grads = native.span_attention_grad(grad, q, k, v, context, ctx.spans, ctx.scale, out, lse)
        return (*grads, *(() if ck is not None else (None, None)), None, None, None)


def _span_rows(seg: Segments, dropout: float, query: torch.Tensor, *others: torch.Tensor | None) -> torch.Tensor | None:
    """The row's spans as ``SpanAttention`` takes them, where it runs this layer: the compiled
    kernels built, fp32 on the CPU, no attention dropout, every span (and the row's prefix) shorter
    than SPAN_MAX_QUERIES (SPAN_MAX_QUERIES_OVER_GEMM where GemmAttention would take the long ones).
    ``others``: the keys, values and any context's."""
    sizes = [end - start for start, end in seg.spans] + [seg.prefix]
    tensors = [query, *(t for t in others if t is not None)]
    if (
        dropout
        or native.library() is None
        or any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors)
        or query.shape[1] % others[0].shape[1]
    ):
        return None
    if max(sizes) >= (
        SPAN_MAX_QUERIES_OVER_GEMM if gemm_attention_pays(query, others[0], dropout) else SPAN_MAX_QUERIES
    ):
        return None
    rows = ([[0, seg.prefix, 0]] if seg.prefix else []) + [
        [start, end, int(bool(seg.prefix or seg.step_prefix))] for start, end in seg.spans
    ]
    return torch.tensor(rows, dtype=torch.int64)


def _span_attention(attend, q, k, v, scale: float | None = None) -> list[torch.Tensor]:
    """One span's queries (1, H, n, D) against its keys and values (1, KV, prefix + n, D).
    ``scale``: attention by ``GemmAttention`` where it is the faster (``gemm_attention_pays``)."""
    n = q.shape[2]
    prefix = k.shape[2] - n
    outputs, start = [], 0
    halves = n >= SPLIT_QUERIES and q.device.type == "cpu"
    group = q.shape[1] // k.shape[1]
    for part in q.split([n // 2, n - n // 2] if halves else [n], dim=2):
        end = start + part.shape[2]
        keys, values = k[:, :, : prefix + end], v[:, :, : prefix + end]
        if scale is not None and n >= GEMM_MIN_QUERIES and group * part.shape[2] * (prefix + end) <= GEMM_MAX_SCORES:
            outputs.append(GemmAttention.apply(part, keys, values, scale))
        elif prefix == 0 and start == 0:
            outputs.append(attend(part, keys, values, is_causal=True))
        else:
            outputs.append(attend(part, keys, values, attn_mask=_causal_mask(prefix, start, end, q.device)))
        start = end
    return outputs


def gemm_attention_pays(query: torch.Tensor, key: torch.Tensor, dropout: float) -> bool:
    """Whether long spans go through ``GemmAttention``: fp32 on a CPU where oneDNN's GEMM is the
    faster one, no attention dropout."""
    return dropout == 0.0 and usable(query, key) and query.shape[1] % key.shape[1] == 0


class StepPrefix:
    """A prefix every example of an optimizer step starts with, computed once for all its rows.

    ``forward`` runs the prefix alone and keeps each attention layer's keys and values. Rows then
    attend to detached copies of them, on which their gradients add up; ``backward`` sends the sum
    through the prefix's forward once. The gradient is the one the rows would get computing the
    prefix themselves: the prefix's activations are the same for every example.
    """

    def __init__(self, input_ids: list[int]):
        self.input_ids = input_ids
        self.recording = False
        self.computed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(attention module) -> (k, v)
        self.leaves: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.input_ids)

    def forward(self, lm, device: torch.device | str = "cpu") -> None:
        """Run the prefix through ``lm`` (inside ``varlen_attention``)."""
        n = len(self.input_ids)
        layers = [m for m in lm.modules() if getattr(m, "gradient_checkpointing", False)]
        for m in layers:  # a few dozen tokens: nothing to save by recomputing them
            m.gradient_checkpointing = False
        self.recording = True
        try:
            ids = torch.tensor([self.input_ids], device=device)
            lm.base_model(
                input_ids=ids,
                position_ids=torch.arange(n, device=device)[None],
                use_cache=False,
                smolora_segments=Segments(0, ((0, n),)),
                smolora_step_prefix=self,
            )
        finally:
            self.recording = False
            for m in layers:
                m.gradient_checkpointing = True
        self.leaves = {
            key: (k.detach().requires_grad_(k.requires_grad), v.detach().requires_grad_(v.requires_grad))
            for key, (k, v) in self.computed.items()
        }

    def backward(self) -> None:
        """Backpropagate the rows' gradients on the prefix's keys and values through its forward."""
        outputs, grads = [], []
        for key, pair in self.computed.items():
            for computed, leaf in zip(pair, self.leaves[key]):
                if leaf.grad is not None:
                    outputs.append(computed)
                    grads.append(leaf.grad)
        if outputs:
            torch.autograd.backward(outputs, grads)
        self.computed, self.leaves = {}, {}


def varlen_attention_forward(
    module,
    query,
    key,
    value,
    attention_mask=None,
    dropout=0.0,
    scaling=None,
    smolora_segments: Segments | None = None,
    smolora_step_prefix: StepPrefix | None = None,
    **kwargs,
):
    """query (1, H, T, D), key/value (1, KV, T, D) -> ((1, T, H, D), None)."""
    seg = smolora_segments
    if seg is None:
        raise RuntimeError("smolora_varlen attention needs smolora_segments")
    step = smolora_step_prefix
    if step is not None and step.recording:
        step.computed[id(module)] = (key, value)
    kp = vp = None  # keys and values every span sees before its own
    if seg.step_prefix:
        if step is None or len(step) != seg.step_prefix:
            raise RuntimeError("a row continuing a step prefix needs that StepPrefix (smolora_step_prefix)")
        kp, vp = step.leaves[id(module)]
    dropout = dropout if module.training else 0.0
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    if (spans := _span_rows(seg, dropout, query, key, value, kp, vp)) is not None:
        rows = lambda t: t[0].transpose(0, 1).contiguous()  # noqa: E731  (1, heads, T, D) -> (T, heads, D)
        ck, cv = (rows(kp), rows(vp)) if kp is not None else (None, None)
        out = SpanAttention.apply(rows(query), rows(key), rows(value), ck, cv, spans, seg.prefix, scale)
        return out[None], None
    attend = functools.partial(
        F.scaled_dot_product_attention, dropout_p=dropout, scale=scaling, enable_gqa=query.shape[1] != key.shape[1]
    )
    gemm_scale = scale if gemm_attention_pays(query, key, dropout) else None
    span = functools.partial(_span_attention, attend, scale=gemm_scale)  # (q, k, v) -> its outputs
    # The spans tile the row in order after the prefix: split once (its backward is one cat,
    # where per-span slicing would allocate and zero a full-size gradient per span).
    sizes = ([seg.prefix] if seg.prefix else []) + [end - start for start, end in seg.spans]
    qs, ks, vs = (t.split(sizes, dim=2) for t in (query, key, value))
    outputs = []
    if seg.prefix:
        kp, vp = ks[0], vs[0]
        outputs += span(qs[0], kp, vp)
        qs, ks, vs = qs[1:], ks[1:], vs[1:]
    for q, k, v in zip(qs, ks, vs):
        if kp is not None:
            k, v = torch.cat([kp, k], dim=2), torch.cat([vp, v], dim=2)
        outputs += span(q, k, v)
    out = torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]  # (1, H, T, D)
    return out.transpose(1, 2).contiguous(), None


_registered = False


def _register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(NAME, varlen_attention_forward)
        _registered = True


def supports_varlen(lm) -> bool:
    """Models written against transformers' attention interface (Llama, Qwen, Gemma, ...), without a
    sliding window."""
    return bool(getattr(lm, "_supports_attention_backend", False)) and not has_sliding_window(lm)


def route_attention(lm, patches: Patches) -> None:
    """Route the model's attention through ``smolora_varlen`` until ``patches`` are restored."""
    _register()
    patches.attribute(lm.config, "_attn_implementation", NAME, "span attention")  # one config, shared by every layer


def varlen_attention(lm):
    """Route the model's attention through ``smolora_varlen`` inside a ``with`` block."""
    return patched(route_attention, lm)
