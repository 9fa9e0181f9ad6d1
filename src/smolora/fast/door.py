"""The door itself: ``accelerated`` applies the levers in order and undoes them exactly."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from smolora.fast.attention import StepPrefix, route_attention, supports_varlen
from smolora.fast.codes import patch_codes
from smolora.fast.dropout import patch_dropout
from smolora.fast.fused import patch_fused
from smolora.fast.head_loss import loss_sum as fast_loss_sum
from smolora.fast.onednn import patch_onednn
from smolora.fast.patch import Patches
from smolora.log import warn
from smolora.loss import LossSum, base_lm, token_loss_sum

ENV = "SMOLORA_FAST"  # "0": the plain path, whatever the settings say
LEVERS = ("span attention", "weight codes", "fast dropout", "fused layers", "oneDNN linears")


@dataclass
class Speed:
    """What the loop gets from the door: the levers on, and the loss to call."""

    levers: list[str] = field(default_factory=list)
    loss_sum: LossSum = token_loss_sum  # (model, micro-batch, step prefix or None) -> summed loss
    shares_step_prefix: bool = False  # rows may attend to one StepPrefix computed once per step

    def step_prefix(self, input_ids: list[int]) -> StepPrefix | None:
        """A prefix every example of a step starts with, to compute once (None on the plain path)."""
        return StepPrefix(input_ids) if self.shares_step_prefix and input_ids else None

    def describe(self) -> str:
        return "speed levers: " + (", ".join(self.levers) if self.levers else "none (the plain path)")


def enabled(fast: bool = True) -> bool:
    """Whether the speed wing runs: asked for, and not switched off by ``SMOLORA_FAST=0``."""
    return fast and os.environ.get(ENV, "").strip() != "0"


@contextlib.contextmanager
def accelerated(
    model,
    *,
    fast: bool = True,
    training: bool = True,
    packed: bool = True,
    weight_codes: bool = True,
    only: Sequence[str] | None = None,
) -> Iterator[Speed]:
    """Switch the speed levers on for ``model`` inside the block; yield the ``Speed`` to train with.

    ``training``: the block runs forward and backward (dropout, and attention routed for the
    whole block so that checkpointing's recomputation uses it too); ``packed``: rows are packed;
    ``weight_codes``: frozen weights from their GGUF codes where the model folder has them;
    ``only``: just these levers (generation uses the oneDNN linears alone). Every lever is undone
    when the block ends, however it ends; undoing never raises (a failure is a warning).
    """
    if not enabled(fast):
        yield Speed()
        return
    lm = base_lm(model)
    varlen = supports_varlen(lm)
    wanted = {
        "span attention": training and packed and varlen,
        "weight codes": weight_codes,
        "fast dropout": training,
        "fused layers": True,
        "oneDNN linears": True,
    }
    if getattr(lm, "use_kernels", False):  # transformers' hub kernels replace layers' forwards on train()/eval()
        if wanted["fused layers"]:
            warn("fused layers skipped: this model uses transformers' hub kernels (use_kernels), which replace them")
        wanted["fused layers"] = False
    appliers = {
        "span attention": lambda patches: route_attention(lm, patches) or 1,
        "weight codes": lambda patches: patch_codes(model, patches),
        "fast dropout": lambda patches: patch_dropout(model, patches),
        "fused layers": lambda patches: patch_fused(lm, patches),
        "oneDNN linears": lambda patches: patch_onednn(model, patches),
    }
    applied: list[tuple[str, Patches]] = []
    speed = Speed(loss_sum=fast_loss_sum, shares_step_prefix=varlen)
    try:
        for name in LEVERS:
            if not wanted[name] or (only is not None and name not in only):
                continue
            patches = Patches()
            try:
                count = appliers[name](patches)
            except Exception as error:  # noqa: BLE001  a lever that does not fit: its own path instead
                _undo(name, patches)
                warn(f"{name} skipped ({type(error).__name__}: {error}); the library's own path runs instead")
                continue
            applied.append((name, patches))
            if count:
                speed.levers.append(name)
        yield speed
    finally:
        for name, patches in reversed(applied):
            _undo(name, patches)


def _undo(name: str, patches: Patches) -> None:
    try:
        disturbed = patches.restore()
    except Exception as error:  # noqa: BLE001  never lose a run to the undoing of a speed lever
        warn(f"{name}: could not be undone ({type(error).__name__}: {error})")
        return
    if disturbed:
        warn(f"{name}: something else replaced what it patched during the run; left as found")
