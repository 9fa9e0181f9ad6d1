"""The speed wing: everything that makes training fast on a CPU, entered through one door.

``accelerated(model, ...)`` switches the levers on for the duration of a ``with`` block and yields
a ``Speed``: the loss function the loop calls and whether rows may share a step's prefix. Each
lever proves itself on a probe before it is used, changes only attributes it records
(``smolora.fast.patch``), and is undone exactly when the block ends. A lever that does not fit
this model or this transformers release is skipped with one warning, and training runs on the
library's own path for it. ``fast=False`` (``--no-fast``, or ``SMOLORA_FAST=0``) runs the plain
path throughout: PEFT's LoRA layers, transformers' modules and attention, torch's GEMMs and loss.

The levers, in the order they are applied:
  span attention   a packed row's examples attended span by span (``attention``)
  weight codes     frozen weights rebuilt from their GGUF codes per call (``codes``)
  fast dropout     LoRA dropout masks drawn in C or by SFC64, dropout and A in one pass (``dropout``)
  fused layers     RMSNorm, rotary embedding and SwiGLU in one pass each (``fused``)
  oneDNN linears   frozen linear layers through oneDNN where it is the faster GEMM (``onednn``)
and, inside the loss, the LM head's cross-entropy a block of the vocabulary at a time
(``head_loss``). ``native`` compiles the C kernels several of them use; ``allocator`` picks tcmalloc;
``threads`` makes idle CPU threads sleep rather than spin.
"""

from __future__ import annotations

import importlib

# What the core may use, and the module each comes from. Imported on first use, so that the command
# line can pick its allocator (and re-run itself) before torch is imported.
_EXPORTS = {
    "accelerated": "door",
    "enabled": "door",
    "Speed": "door",
    "LEVERS": "door",
    "ENV": "door",
    "CODES_FILE": "codes",
    "forget_codes": "codes",
    "save_codes": "codes",
    "gemm_choice": "onednn",
    "use_gemm": "onednn",
    "reexec_with_tcmalloc": "allocator",
    "release_free_memory": "allocator",
    "calm_openmp": "threads",
    "describe_threads": "threads",
    "use_threads": "threads",
}
__all__ = [*_EXPORTS, "allocator_name"]


def __getattr__(name: str):
    if name == "allocator_name":
        return importlib.import_module("smolora.fast.allocator").active
    if name not in _EXPORTS:
        raise AttributeError(f"module 'smolora.fast' has no attribute {name!r}")
    return getattr(importlib.import_module(f"smolora.fast.{_EXPORTS[name]}"), name)
