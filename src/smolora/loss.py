"""The training objective on the library's own path: next-token cross-entropy summed over a
micro-batch's supervised positions, and the mean of it over a set of examples (validation, eval).

This is the reference every speed lever is tested against (``smolora.fast``): the model's own
forward, its own attention (a packed row's examples kept apart by a block mask, or by position
ids that restart at 0), all logits, torch's cross-entropy.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from smolora.data.batching import MicroBatch, collate
from smolora.data.formats import IGNORE, Example

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
    if mb.segments is not None and mb.segments.prefix:  # a row's shared prefix: attention needs the block mask
        dtype = lm.get_input_embeddings().weight.dtype
        allowed = mb.segments.dense_mask(mb.input_ids.shape[1]).to(mb.input_ids.device)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        inputs["attention_mask"] = mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    # else: restarting position ids with no mask make transformers build the block mask itself
    keep = mb.targets != IGNORE  # (B, T)
    logits = lm(**inputs).logits[keep]  # (N, V)
    return F.cross_entropy(logits.float(), mb.targets[keep], reduction="sum")


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
