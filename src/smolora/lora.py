"""LoRA adapters through PEFT: attach, check targets, report trainable parameters; rank growth
during training."""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from smolora.errors import SmoLoRAError
from smolora.log import warn


def linear_module_names(model: nn.Module) -> dict[str, int]:
    """Short names of the model's linear layers and how many of each it has."""
    counts: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            short = name.rsplit(".", 1)[-1]
            counts[short] = counts.get(short, 0) + 1
    return counts


def check_targets(model: nn.Module, targets: list[str]) -> None:
    """Refuse targets that match nothing; warn when a target matches only some layers."""
    available = linear_module_names(model)
    missing = [t for t in targets if t not in available]
    if missing:
        names = ", ".join(f"{k} (x{v})" for k, v in sorted(available.items()))
        raise SmoLoRAError(f"target_modules {', '.join(missing)} match no linear layer; the model has: {names}")
    num_layers = getattr(model.config, "num_hidden_layers", None)
    for t in targets:
        if num_layers and available[t] < num_layers:
            warn(f"target {t!r} matches only {available[t]} of {num_layers} layers")


def add_lora(model: nn.Module, peft_config):
    """Wrap ``model`` with fresh LoRA adapters; the base is frozen, only A and B train."""
    from peft import get_peft_model

    targets = (
        sorted(peft_config.target_modules)
        if not isinstance(peft_config.target_modules, str)
        else [peft_config.target_modules]
    )
    check_targets(model, targets)
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


# ---------------------------------------------------------------------------------------------
# rank growth: train at a low rank first, then grow the adapters without changing what they compute


def adapter_rank(model: nn.Module) -> int:
    """The rank of the model's LoRA adapters (one rank for all of them)."""
    if not getattr(model, "peft_config", None):
        raise SmoLoRAError("rank growth needs a model with LoRA adapters (add_lora)")
    ranks = {c.r for c in model.peft_config.values()}
    if len(ranks) != 1:
        raise SmoLoRAError(f"rank growth needs one rank for every adapter (found {sorted(ranks)})")
    return ranks.pop()


def rank_at(step: int, total_steps: int, ranks: Sequence[int]) -> int:
    """The rank during optimizer step ``step`` (0-based) of a run that trains at each of ``ranks`` in
    turn for an equal share of its ``total_steps`` (the first share at ``ranks[0]``)."""
    share = sum(1 for i in range(1, len(ranks)) if step >= i * total_steps // len(ranks))
    return ranks[share]


def check_growable(model: nn.Module) -> None:
    """Refuse, before training, what ``grow_rank`` cannot grow without changing the model."""
    from peft.tuners.lora import LoraLayer

    for name, config in model.peft_config.items():
        if config.rank_pattern or config.alpha_pattern:
            raise SmoLoRAError(
                f"rank growth needs one rank and alpha for every layer; "
                f"adapter {name!r} sets rank_pattern/alpha_pattern"
            )
        if config.init_lora_weights not in (True, False, "gaussian"):
            raise SmoLoRAError(
                f"rank growth supports PEFT's default or gaussian init only (adapter {name!r}: "
                f"init_lora_weights={config.init_lora_weights!r})"
            )
    for module in model.modules():
        if isinstance(module, LoraLayer) and not all(
            (a in module.lora_A and isinstance(module.lora_A[a], nn.Linear)) or a in module.lora_embedding_A
            for a in module.r
        ):
            raise SmoLoRAError(
                f"rank growth supports adapters on linear and embedding layers, not {type(module).__name__}"
            )
    adapter_rank(model)


def pad_to(t: torch.Tensor, shape: Sequence[int], fill: float = 0.0) -> torch.Tensor:
    """``t`` in the leading corner of a ``shape`` tensor filled with ``fill``."""
    out = t.new_full(tuple(shape), fill)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


def grow_rank(
    model: nn.Module,
    new_r: int,
    optimizer: torch.optim.Optimizer | None = None,
    generator: torch.Generator | None = None,
) -> float:
    """Grow every LoRA adapter of ``model`` to rank ``new_r``; return the new lora_alpha.

    A gains rows drawn as PEFT draws A's, B gains zero columns, so B·A, and the model's output, stay
    the same; lora_alpha grows with the rank so the scaling (alpha/r, alpha/sqrt(r) with rsLoRA)
    does too. Each grown factor is a new Parameter (a resized one would keep its autograd metadata),
    put in the old one's place in ``optimizer`` with its state grown: zero for the new entries,
    except Adam's second moment, which starts at the tensor's mean. (Adam's step count, and with it
    its bias correction, is shared with the old entries: from a zero second moment the new entries'
    first update would be ~3x a full one; from the mean, their updates ramp up as their first moment
    fills.) Embedding adapters grow the other way round: PEFT starts their A at zero, their B random.
    """
    from peft.tuners.lora import LoraLayer

    check_growable(model)
    old_r = adapter_rank(model)
    if new_r <= old_r:
        raise SmoLoRAError(f"rank growth: the new rank {new_r} must exceed the current {old_r}")
    alphas = {}
    for name, config in list(model.peft_config.items()):
        ratio = math.sqrt(new_r / old_r) if config.use_rslora else new_r / old_r
        alphas[name] = config.lora_alpha * ratio
        model.peft_config[name] = config = copy.copy(config)  # PEFT holds the caller's own LoraConfig
        config.r, config.lora_alpha = new_r, alphas[name]
    extra = new_r - old_r
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for name in list(module.r):
            if name in module.lora_A:
                a, b = module.lora_A[name], module.lora_B[name]
                rows = torch.empty(extra, a.in_features)
                if model.peft_config[name].init_lora_weights == "gaussian":
                    rows.normal_(0.0, 1.0 / new_r, generator=generator)
                else:  # kaiming_uniform_(a=sqrt(5)) on an (r, in) weight: U(-1/sqrt(in), 1/sqrt(in))
                    bound = 1.0 / math.sqrt(a.in_features)
                    rows.uniform_(-bound, bound, generator=generator)
                a.out_features = b.in_features = new_r
                a.weight = _grown(a.weight, torch.cat([a.weight.detach(), rows.to(a.weight)]), optimizer)
                b.weight = _grown(b.weight, pad_to(b.weight.detach(), (b.out_features, new_r)), optimizer)
            else:
                a, b = module.lora_embedding_A, module.lora_embedding_B
                columns = torch.empty(b[name].shape[0], extra).normal_(generator=generator)
                a[name] = _grown(a[name], pad_to(a[name].detach(), (new_r, a[name].shape[1])), optimizer)
                b[name] = _grown(b[name], torch.cat([b[name].detach(), columns.to(b[name])], dim=1), optimizer)
            module.r[name], module.lora_alpha[name] = new_r, alphas[name]
            rslora = module.use_rslora.get(name, False)
            module.scaling[name] = alphas[name] / (math.sqrt(new_r) if rslora else new_r)
    return next(iter(alphas.values()))


def _grown(old: nn.Parameter, value: torch.Tensor, optimizer: torch.optim.Optimizer | None) -> nn.Parameter:
    new = nn.Parameter(value, requires_grad=old.requires_grad)
    if optimizer is not None:
        for group in optimizer.param_groups:
            group["params"] = [new if p is old else p for p in group["params"]]
        state = optimizer.state.pop(old, None)
        if state:
            optimizer.state[new] = {
                k: pad_to(v, value.shape, v.mean().item() if k in ("exp_avg_sq", "max_exp_avg_sq") else 0.0)
                if torch.is_tensor(v) and v.shape == old.shape
                else v
                for k, v in state.items()
            }
    return new
