"""The training objective on the library's own path: next-token cross-entropy summed over a
micro-batch's supervised positions, and the mean of it over a set of examples (validation, eval).

This is the reference every speed lever is tested against (``smolora.fast``): the model's own
forward, its own attention (a packed row's examples kept apart by a block mask, or by position
ids that restart at 0), all logits, torch's cross-entropy.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
import torch.nn.functional as F

from smolora.data.batching import MicroBatch, Segments, collate
from smolora.data.formats import IGNORE, Example
from smolora.errors import SmoLoRAError

LossSum = Callable[..., torch.Tensor]  # (model, micro-batch, step prefix or None) -> summed loss


def base_lm(model):
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def has_sliding_window(lm) -> bool:
    """Some of the model's layers attend only to a window of recent tokens (Mistral, Gemma 2 and 3)."""
    return bool(getattr(lm.config, "sliding_window", None))


def token_loss_sum(model, mb: MicroBatch, step_prefix=None) -> torch.Tensor:
    """Sum of next-token cross-entropy over the supervised positions of a micro-batch."""
    if step_prefix is not None:
        raise ValueError("a step prefix needs the speed wing's loss (smolora.fast)")
    lm = base_lm(model)
    inputs = dict(
        input_ids=mb.input_ids, position_ids=mb.position_ids, attention_mask=mb.attention_mask, use_cache=False
    )
    segments = mb.segments
    packs = segments is not None and (segments.prefix or len(segments.spans) > 1)
    if packs and (not keeps_packed_apart(lm) or segments.prefix):
        # a row's shared prefix, or a model whose mask ignores position ids (OPT): attention needs the block mask
        dtype = lm.get_input_embeddings().weight.dtype
        allowed = mb.segments.dense_mask(mb.input_ids.shape[1]).to(mb.input_ids.device)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        inputs["attention_mask"] = mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    # else: restarting position ids with no mask make transformers build the block mask itself
    keep = mb.targets != IGNORE  # (B, T)
    logits = lm(**inputs).logits[keep]  # (N, V)
    return F.cross_entropy(logits.float(), mb.targets[keep], reduction="sum")


_KEEPS_APART: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def keeps_packed_apart(lm) -> bool:
    """Whether ``lm`` keeps a packed row's examples apart given only position ids that restart at 0
    (transformers builds the block mask from them for most models; OPT's mask ignores them). Probed
    once per model, in eval mode, on a row holding the same four tokens twice: its halves must agree.
    A model that keeps them apart neither so nor with the block mask (Bloom's ALiBi reads a 2D mask)
    cannot train on packed rows: an error says so."""
    if lm not in _KEEPS_APART:
        device = next(lm.parameters()).device
        ids, positions = torch.arange(4, device=device).repeat(1, 2), torch.arange(4, device=device).repeat(1, 2)
        block = torch.zeros(1, 1, 8, 8, device=device, dtype=lm.get_input_embeddings().weight.dtype)
        block.masked_fill_(~Segments(0, ((0, 4), (4, 8))).dense_mask(8).to(device), torch.finfo(block.dtype).min)
        modes = {m: m.training for m in lm.modules()}
        lm.eval()
        try:
            for mask in (None, block):
                try:
                    out = lm(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=False).logits[0]
                except (ValueError, RuntimeError, TypeError, IndexError):
                    continue
                if torch.allclose(out[:4], out[4:], rtol=1e-4, atol=1e-5):
                    _KEEPS_APART[lm] = mask is None
                    break
        finally:
            for m, training in modes.items():
                m.training = training
    if lm not in _KEEPS_APART:
        raise SmoLoRAError(
            f"{type(lm).__name__} cannot keep the examples of a packed row apart (neither by position ids nor "
            "by a block mask); train with --no-packing"
        )
    return _KEEPS_APART[lm]


def can_pack(lm) -> bool:
    """Whether packed rows train ``lm`` exactly (``keeps_packed_apart`` does not refuse it)."""
    try:
        keeps_packed_apart(lm)
    except SmoLoRAError:
        return False
    return True


def to_device(mb: MicroBatch, device: torch.device) -> MicroBatch:
    if device.type == "cpu":
        return mb
    mask = mb.attention_mask.to(device) if mb.attention_mask is not None else None
    return MicroBatch(
        mb.input_ids.to(device),
        mb.position_ids.to(device),
        mb.targets.to(device),
        mask,
        mb.num_examples,
        mb.num_tokens,
        mb.segments,
    )


@torch.no_grad()
def evaluate_loss(
    model,
    examples: list[Example],
    batch_size: int = 8,
    packed: bool = True,
    pad_id: int = 0,
    loss_sum: LossSum = token_loss_sum,
) -> float:
    """Mean per-token loss over supervised tokens (exp of it is perplexity)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for s in range(0, len(examples), batch_size):
            mb = to_device(collate(examples[s : s + batch_size], packed, pad_id), device)
            total += float(loss_sum(model, mb))
            count += mb.num_targets
    finally:
        model.train(was_training)
    return total / max(1, count)
