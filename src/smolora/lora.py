"""LoRA adapters through PEFT: attach, check targets, report trainable parameters; fast CPU dropout."""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import torch
from torch import nn

from smolora.errors import SmoLoRAError


def linear_module_names(model: nn.Module) -> dict[str, int]:
    """Short names of the model's linear layers and how many of each it has."""
    counts: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            short = name.rsplit(".", 1)[-1]
            counts[short] = counts.get(short, 0) + 1
    return counts


def check_targets(model: nn.Module, targets: list[str], warn=print) -> None:
    """Refuse targets that match nothing; warn when a target matches only some layers."""
    available = linear_module_names(model)
    missing = [t for t in targets if t not in available]
    if missing:
        names = ", ".join(f"{k} (x{v})" for k, v in sorted(available.items()))
        raise SmoLoRAError(f"target_modules {', '.join(missing)} match no linear layer; the model has: {names}")
    num_layers = getattr(model.config, "num_hidden_layers", None)
    for t in targets:
        if num_layers and available[t] < num_layers:
            warn(f"[smolora] warning: target {t!r} matches only {available[t]} of {num_layers} layers")


def add_lora(model: nn.Module, peft_config, warn=print):
    """Wrap ``model`` with fresh LoRA adapters; the base is frozen, only A and B train."""
    from peft import get_peft_model

    targets = sorted(peft_config.target_modules) if not isinstance(peft_config.target_modules, str) else [peft_config.target_modules]
    check_targets(model, targets, warn)
    model.config.use_cache = False
    # PEFT freezes every base weight; only lora_A / lora_B (and biases if asked) require grad.
    # The embedding output then needs no gradient: the first adapted projection starts the graph.
    with quiet_peft():
        return get_peft_model(model, peft_config)


def tied_adapted_embeddings(model: nn.Module) -> list[nn.Module]:
    """The adapted one(s) of the input and output embeddings, where the two share one weight: merging
    an adapter into that shared tensor would change the other module too."""
    from peft.tuners.lora import LoraLayer

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    pair = [lm.get_input_embeddings(), lm.get_output_embeddings()]
    if any(m is None for m in pair):
        return []
    base = [m.get_base_layer() if isinstance(m, LoraLayer) else m for m in pair]
    if base[0].weight is not base[1].weight:
        return []
    return [m for m in pair if isinstance(m, LoraLayer)]


@contextlib.contextmanager
def quiet_peft():
    """PEFT calls a transformers attribute deprecated in v5; its warning is noise to our users."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def parameter_report(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def format_parameter_report(model: nn.Module) -> str:
    """The spec's report: trainable params, all params, trainable %."""
    trainable, total = parameter_report(model)
    return f"Trainable params: {trainable:,}\nAll params: {total:,}\nTrainable %: {100 * trainable / total:.2f}"


class _KeepScale(torch.autograd.Function):
    """x * keep / (1 - p), saving only the bool mask (as torch's own dropout does)."""

    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.mul(x, keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return torch.mul(grad, keep).mul_(ctx.scale), None, None


class FastDropout(nn.Dropout):
    """``nn.Dropout`` with its CPU mask drawn by NumPy's SFC64 generator, about 4x faster than
    torch's CPU ``bernoulli_`` (which was 8-9% of a training step here).

    Each call seeds the generator with one draw from torch's default generator, so the masks follow
    torch's RNG state exactly like ``nn.Dropout``'s do: a resumed run and gradient checkpointing's
    recomputed forward draw the same masks. An element is kept when a uniform 32-bit integer is at
    least ``round(p * 2**32)`` (p exact to 2**-32).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.device.type != "cpu" or not 0.0 < self.p < 1.0 or self.inplace:
            return super().forward(x)
        seed = int(torch.randint(0, 2**62, ()))
        n = x.numel()
        bits = np.random.SFC64(seed).random_raw((n + 1) // 2).view(np.uint32)[:n]
        keep = torch.from_numpy(bits >= np.uint32(round(self.p * 2**32))).view(x.shape)
        return _KeepScale.apply(x, keep, 1.0 / (1.0 - self.p))


@contextlib.contextmanager
def fast_dropout(model: nn.Module):
    """Swap PEFT's LoRA ``nn.Dropout`` modules for ``FastDropout`` while training on CPU."""
    swapped = []
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if isinstance(drops, nn.ModuleDict):
            for name, drop in drops.items():
                if type(drop) is nn.Dropout:
                    drops[name] = FastDropout(drop.p).train(drop.training)
                    swapped.append((drops, name, drop))
    try:
        yield
    finally:
        for drops, name, drop in swapped:
            drops[name] = drop
