"""Variable-length attention for packed rows: each example attends only to itself (and to a prefix
shared by the row), computed block by block — no (T, T) mask, and none of the wasted work of
masked-out blocks.

Registered with transformers' AttentionInterface under ``smolora_varlen`` and switched on only
for the duration of a training forward (``varlen_attention`` context), so the model's config, its
generation path and everything saved from it keep the model's own attention implementation.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

NAME = "smolora_varlen"


@dataclass(frozen=True)
class Segments:
    """Layout of a packed row: ``prefix`` shared tokens, then one span [start, end) per example."""

    prefix: int
    spans: tuple[tuple[int, int], ...]

    def dense_mask(self, length: int) -> torch.Tensor:
        """(1, 1, T, T) bool mask, True where a query may attend: for models without the interface."""
        seg = torch.zeros(length, dtype=torch.long)
        for k, (s, e) in enumerate(self.spans, start=1):
            seg[s:e] = k
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        return (causal & ((seg[:, None] == seg[None, :]) | (seg[None, :] == 0)))[None, None]


@functools.lru_cache(maxsize=256)
def _prefix_mask(prefix: int, n: int, device: torch.device) -> torch.Tensor:
    """(n, prefix + n) bool: every query sees the whole prefix, then its own tokens causally."""
    mask = torch.ones(n, prefix + n, dtype=torch.bool, device=device)
    mask[:, prefix:] = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    return mask


def varlen_attention_forward(module, query, key, value, attention_mask=None, dropout=0.0, scaling=None,
                             smolora_segments: Segments | None = None, **kwargs):
    """query (1, H, T, D), key/value (1, KV, T, D) -> ((1, T, H, D), None)."""
    seg = smolora_segments
    if seg is None:
        raise RuntimeError("smolora_varlen attention needs smolora_segments")
    attend = functools.partial(F.scaled_dot_product_attention, dropout_p=dropout if module.training else 0.0,
                               scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    # The spans tile the row in order after the prefix: split once (its backward is one cat,
    # where per-span slicing would allocate and zero a full-size gradient per span).
    sizes = ([seg.prefix] if seg.prefix else []) + [end - start for start, end in seg.spans]
    qs, ks, vs = (t.split(sizes, dim=2) for t in (query, key, value))
    if not seg.prefix:
        outputs = [attend(q, k, v, is_causal=True) for q, k, v in zip(qs, ks, vs)]
    else:
        kp, vp = ks[0], vs[0]
        outputs = [attend(qs[0], kp, vp, is_causal=True)]
        for q, k, v in zip(qs[1:], ks[1:], vs[1:]):
            mask = _prefix_mask(seg.prefix, q.shape[2], q.device)
            outputs.append(attend(q, torch.cat([kp, k], dim=2), torch.cat([vp, v], dim=2), attn_mask=mask))
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
    """Models written against transformers' attention interface (Llama, Qwen, Mistral, Gemma, ...)."""
    return bool(getattr(lm, "_supports_attention_backend", False)) and not getattr(lm.config, "sliding_window", None)


@contextlib.contextmanager
def varlen_attention(lm):
    """Route the model's attention through ``smolora_varlen`` for one forward."""
    _register()
    previous = lm.config._attn_implementation  # one config object, shared by every layer
    lm.config._attn_implementation = NAME
    try:
        yield
    finally:
        lm.config._attn_implementation = previous
