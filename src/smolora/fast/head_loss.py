"""The training loss the fast way: packed rows attended span by span, and the LM head's cross-entropy
without ever holding all (positions, vocabulary) logits."""

from __future__ import annotations

import contextlib
import math
import weakref

import torch
import torch.nn.functional as F

from smolora.data.batching import MicroBatch, Segments
from smolora.data.formats import IGNORE
from smolora.fast.attention import NAME as ATTENTION_NAME
from smolora.fast.attention import StepPrefix, supports_varlen, varlen_attention
from smolora.fast.codes import codes_of
from smolora.fast.onednn import linear, usable
from smolora.loss import base_lm, token_loss_sum


def loss_sum(model, mb: MicroBatch, step_prefix: StepPrefix | None = None) -> torch.Tensor:
    """``smolora.loss.token_loss_sum``, fast: the sum of next-token cross-entropy over the supervised
    positions of a micro-batch.

    Packed rows run attention block by block over their examples (``smolora.fast.attention``). The LM
    head runs only on supervised positions: its (N, vocab) logits are the largest activation in a
    small model, and most positions of a chat example are prompt. A row whose examples continue
    the optimizer step's shared prefix needs that ``step_prefix``, already run forward.
    """
    lm = base_lm(model)
    if mb.segments is None or not supports_varlen(lm):  # padded rows, or a model without the attention interface
        if not _logits_are_head_output(lm) or mb.segments is not None:
            return token_loss_sum(model, mb, step_prefix)
    keep = mb.targets != IGNORE  # (B, T)
    inputs = dict(
        input_ids=mb.input_ids, position_ids=mb.position_ids, attention_mask=mb.attention_mask, use_cache=False
    )
    varlen = contextlib.nullcontext()
    if mb.segments is not None:
        varlen = varlen_attention(lm)
        inputs["smolora_segments"] = mb.segments
        if mb.segments.step_prefix:
            inputs["smolora_step_prefix"] = step_prefix
    head = lm.get_output_embeddings()
    with varlen:
        if not _logits_are_head_output(lm):  # softcapped or scaled logits: the model's own forward
            logits = lm(**inputs).logits[keep]
        else:
            hidden = lm.base_model(**inputs).last_hidden_state[keep]  # (N, H)
            if type(head) is torch.nn.Linear and head.bias is None:
                return LinearCrossEntropy.apply(hidden, head.weight, mb.targets[keep], codes_of(head))
            logits = head(hidden)  # a biased head, or one with an adapter of its own
    return F.cross_entropy(logits.float(), mb.targets[keep], reduction="sum")


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ W^T, target_i), never holding all (N, V) logits: the same math as
    ``F.cross_entropy(hidden @ W.T, targets, reduction="sum")``.

    The gradient is computed in the forward pass while the logits are at hand, so autograd saves
    only (N, H). A frozen W (the usual head) is read a block of the vocabulary at a time for all
    positions, or rebuilt from its ``codes`` a block at a time (``smolora.fast.codes``): each block's
    logits update a running max and sum of exponentials, and the gradient's running sum of W's
    rows weighted by them (the online softmax of flash attention). A W that trains gets its own
    gradient chunk by chunk of positions, from each chunk's whole (chunk, V) logits.
    """

    ROWS = 128  # positions per chunk, a W that trains
    VOCAB = 4096  # vocabulary rows per block, a frozen W: (4096, 576) fp32 is 9 MiB
    POSITIONS = 1024  # positions per pass over the vocabulary, a frozen W: its (1024, 4096) block of logits 16 MiB

    @staticmethod
    def forward(ctx, hidden, weight, targets, codes=None):  # hidden (N, H), weight (V, H), targets (N,)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        device = hidden.device.type
        # Under autocast the matmuls run in its dtype (bf16/fp16); the softmax always in fp32.
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        with torch.autocast(device, enabled=False):
            if want_w:
                loss, grad_h, grad_w = _ce_by_positions(hidden, weight.to(dtype), targets, want_h)
            else:
                grad_w, step = None, LinearCrossEntropy.POSITIONS
                parts = [
                    _ce_by_vocabulary(hidden[s : s + step].to(dtype), weight, targets[s : s + step], codes, want_h)
                    for s in range(0, hidden.shape[0], step)
                ]
                loss = sum((part[0] for part in parts), torch.zeros((), device=hidden.device))
                grad_h = (
                    torch.cat([part[1] for part in parts] or [hidden.new_zeros(hidden.shape)]).to(hidden.dtype)
                    if want_h
                    else None
                )
        ctx.save_for_backward(*(g for g in (grad_h, grad_w) if g is not None))
        ctx.want = (want_h, want_w)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        saved = list(ctx.saved_tensors)
        grad_h = saved.pop(0) * grad_loss if ctx.want[0] else None
        grad_w = saved.pop(0) * grad_loss if ctx.want[1] else None
        return grad_h, grad_w, None, None


def _ce_by_vocabulary(h, weight, targets, codes, want_h: bool):
    """(loss, d loss / d h) for a frozen ``weight`` (V, H), block by block of its rows."""
    n, dtype = h.shape[0], h.dtype
    top = torch.full((n, 1), -math.inf, device=h.device)  # the running max of each position's logits
    total = torch.zeros(n, 1, device=h.device)  # sum of exp(logit - top)
    grad = torch.zeros(n, h.shape[1], device=h.device) if want_h else None  # sum of exp(logit - top) * W's row
    picked = torch.empty(n, device=h.device)  # the target's logit
    target_rows = torch.empty(n, h.shape[1], dtype=dtype, device=h.device) if want_h else None
    for v in range(0, weight.shape[0], LinearCrossEntropy.VOCAB):
        rows = slice(v, v + LinearCrossEntropy.VOCAB)
        w = codes.weight(rows).to(dtype) if codes is not None else weight[rows].to(dtype)  # (b, H)
        logits = linear(h, w).float()  # (n, b): through oneDNN where faster (smolora.fast.onednn)
        inside = ((targets >= v) & (targets < v + w.shape[0])).nonzero().squeeze(1)
        local = targets[inside] - v  # the targets in this block, as its rows
        picked[inside] = logits[inside, local]
        if want_h:
            target_rows[inside] = w[local]
        new_top = torch.maximum(top, logits.amax(1, keepdim=True))
        fade = (top - new_top).exp_()  # rescales what earlier blocks summed; 0 at the first
        top = new_top
        exp = logits.sub_(top).exp_()  # in place
        total.mul_(fade).add_(exp.sum(1, keepdim=True))
        if want_h:
            grad.mul_(fade).add_(linear(exp.to(dtype), w.t()))  # (n, b) @ (b, H)
        logits = exp = None  # freed before the next block allocates its own
    loss = (top + total.log()).sum() - picked.sum()
    return loss, (grad.div_(total).sub_(target_rows) if want_h else None)


def _ce_by_positions(hidden, w, targets, want_h: bool):
    """(loss, d loss / d hidden, d loss / d w) chunk by chunk of positions, for a ``w`` (V, H) that trains."""
    grad_h = torch.empty_like(hidden) if want_h else None
    grad_w = torch.zeros_like(w)
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    fast = usable(hidden, w)  # through oneDNN (smolora.fast.onednn); fp32 only, so not under autocast
    chunk, dtype = LinearCrossEntropy.ROWS, w.dtype
    # torch's mm writes into one (chunk, V) buffer kept for all chunks: with glibc's malloc each fresh
    # 25 MB block was a fresh mapping, whose page faults cost more than its GEMM
    block = None if fast else hidden.new_empty(min(chunk, hidden.shape[0]), w.shape[0], dtype=dtype)
    block32 = (
        block if dtype == torch.float32 else block.new_empty(block.shape, dtype=torch.float32)
    )  # (oneDNN: fp32 only)
    for s in range(0, hidden.shape[0], chunk):
        h, t = hidden[s : s + chunk].to(dtype), targets[s : s + chunk]
        logits = linear(h, w) if fast else torch.mm(h, w.T, out=block[: len(t)])  # (c, V)
        if block32 is not block:
            logits = block32[: len(t)].copy_(logits)
        logp = torch.log_softmax(logits, dim=-1, out=logits)  # in place: one fused kernel, row by row
        rows = torch.arange(len(t), device=t.device)
        loss -= logp[rows, t].sum()
        probs = logp.exp_()  # softmax, in place
        probs[rows, t] -= 1.0  # d loss / d logits
        probs = probs.to(dtype)
        if want_h:  # torch's mm: as (W^T probs^T)^T, the vocabulary as the GEMM's long side (faster)
            grad_h[s : s + len(t)] = linear(probs, w.t()) if fast else (w.T @ probs.T).T
        grad_w += probs.T @ h
        logits = logp = probs = None  # oneDNN's (c, V) block: freed before the next chunk allocates its own
    return loss, grad_h, grad_w


_HEAD_IS_LOGITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _logits_are_head_output(lm) -> bool:
    """Whether the model's logits are its output embeddings' output as is, with nothing applied after
    (Gemma 2's softcapping, Granite's logits_scaling, Cohere's logit_scale, ...): found once per model
    by a forward on a probe input, where the two must be bit-equal."""
    if lm not in _HEAD_IS_LOGITS:
        head, captured = lm.get_output_embeddings(), []
        handle = head.register_forward_hook(lambda _module, _inputs, output: captured.append(output))
        was_training = lm.training
        lm.eval()
        try:
            with torch.no_grad():
                ids = torch.arange(min(8, lm.get_input_embeddings().num_embeddings), device=head.weight.device)[None]
                routed = lm.config._attn_implementation == ATTENTION_NAME  # inside varlen_attention
                extra = {"smolora_segments": Segments(0, ((0, ids.shape[1]),))} if routed else {}
                logits = lm(input_ids=ids, use_cache=False, **extra).logits
        finally:
            handle.remove()
            lm.train(was_training)
        _HEAD_IS_LOGITS[lm] = (
            len(captured) == 1 and captured[0].shape == logits.shape and torch.equal(captured[0], logits)
        )
    return _HEAD_IS_LOGITS[lm]
