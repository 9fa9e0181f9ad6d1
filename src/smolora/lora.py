"""LoRA adapters through PEFT: attach, check targets, report trainable parameters; rank growth
during training."""

from __future__ import annotations

import contextlib
import copy
import math
import re
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from smolora.errors import SmoLoRAError
from smolora.log import warn

# ---------------------------------------------------------------------------------------------
# targets: presets by role, resolved on the loaded model

# What each preset adapts, by role (LoRA §7.1 found q+v a good default; QLoRA §4 found adapting every
# linear layer matters most for quality). ``all-linear`` is PEFT's: every linear layer but the LM head.
PRESET_ROLES = {
    "qv": {"q", "v"},
    "qkv": {"q", "k", "v"},
    "attention": {"q", "k", "v", "o"},
    "mlp": {"mlp"},
    "all-linear": None,  # every role, and linear layers of none (e.g. LFM2's convolution projections)
    "all": None,
}
# Projections that compute queries, keys and values in one matrix (GPT-2, GPT-NeoX/Falcon/Bloom,
# Phi-3, Baichuan, MPT/ModernBERT): one adapter on them adapts all three.
FUSED_QKV = {"c_attn", "query_key_value", "qkv_proj", "w_pack", "wqkv", "qkv", "in_proj"}
ATTENTION_PARENT = re.compile(r"attn|attention", re.IGNORECASE)
MLP_PARENT = re.compile(r"mlp|feed_?forward|ffn|ffw|moe|experts", re.IGNORECASE)
MLP_LEAF = {
    "gate_proj", "up_proj", "down_proj", "gate_up_proj",  # Llama, Qwen, Gemma, Phi-3 (gate and up fused)
    "fc1", "fc2", "fc_in", "fc_out", "c_fc",  # OPT, Phi, GPT-J, GPT-2 (c_proj: by its parent)
    "dense_h_to_4h", "dense_4h_to_h", "w1", "w2", "w3",  # GPT-NeoX/Falcon/Bloom, LFM2/Mixtral
}  # fmt: skip
ROLE_NAMES = {"q": "query", "k": "key", "v": "value", "o": "attention output", "mlp": "MLP", "other": "other"}


def linear_types() -> tuple[type, ...]:
    """The layer types ``all-linear`` adapts: ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2's
    fan-in-fan-out linear), as PEFT's ``all-linear`` does."""
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


def layer_roles(name: str) -> frozenset[str]:
    """What a linear layer computes, from its place in the model: ``q``, ``k``, ``v``, ``o`` (inside an
    attention block; a fused projection holds several), ``mlp``, or ``other``."""
    *parents, leaf = name.split(".")
    low = leaf.lower()
    if any(ATTENTION_PARENT.search(p) for p in parents):
        if low in FUSED_QKV or "qkv" in low:
            return frozenset("qkv")
        if re.search(r"(^|_)kv(_|$)", low):
            return frozenset("kv")
        for role, pattern in (("q", r"w?q|query"), ("k", r"w?k|key"), ("v", r"w?v|value")):
            if re.fullmatch(rf"(?:{pattern})(?:_\w+)?", low):
                return frozenset(role)
        return frozenset("o")
    if low in MLP_LEAF or any(MLP_PARENT.search(p) for p in parents):
        return frozenset({"mlp"})
    return frozenset({"other"})


def candidate_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every ``nn.Linear`` / ``Conv1D`` of ``model`` by full name, except the output embedding (the LM
    head) and layers inside LoRA layers: what ``all-linear`` adapts."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inside_lora = ("lora_", "base_layer")
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, linear_types())
        and module is not head
        and not any(part.startswith(inside_lora) for part in name.split("."))
    }


def linear_module_names(model: nn.Module) -> dict[str, int]:
    """Short names of the model's linear layers (``Conv1D`` too, and the head) and how many of each it has."""
    counts: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, linear_types()):
            short = name.rsplit(".", 1)[-1]
            counts[short] = counts.get(short, 0) + 1
    return counts


def is_regex(target: str) -> bool:
    """A target written as a regular expression (PEFT's string form, matched against full module
    names) rather than a module name: it holds a character no module name has."""
    return re.fullmatch(r"[\w.\-]+", target) is None


def _by_name(model: nn.Module, target: str) -> set[str]:
    """Full names of the adaptable modules that ``target`` names, matched as PEFT matches a list entry:
    the whole name, or its last dotted parts."""
    kinds = (*linear_types(), nn.Embedding)
    return {n for n, m in model.named_modules() if isinstance(m, kinds) and (n == target or n.endswith("." + target))}


def resolve_targets(model: nn.Module, targets: Sequence[str] | str) -> list[str]:
    """The concrete module names a target list means on ``model``: presets (``all-linear``, ``attention``,
    ``mlp``, ``qv``, ``qkv``) by role, module names as PEFT matches them, a regular expression by full
    match on full names. Returned as the shortest name suffixes that pick exactly those modules (what
    PEFT's ``target_modules`` matches), sorted. A name matching nothing is refused, listing the model's
    linear layers; a name matching only some layers is warned about."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    candidates = candidate_layers(model)
    chosen: set[str] = set()
    names = []
    for target in targets:
        if target in PRESET_ROLES:
            wanted = PRESET_ROLES[target]
            chosen |= {n for n in candidates if wanted is None or layer_roles(n) & wanted}
        elif is_regex(target):
            try:
                pattern = re.compile(target)
            except re.error as e:
                raise SmoLoRAError(f"target_modules {target!r}: not a valid regular expression ({e})") from None
            found = {n for n in candidates if pattern.fullmatch(n)}
            if not found:
                raise SmoLoRAError(
                    f"target_modules {target!r} matches no linear layer's full name "
                    f"(e.g. {next(iter(candidates), 'none')!r})"
                )
            chosen |= found
        else:
            names.append(target)
            chosen |= _by_name(model, target)
    if names:
        check_targets(model, names)
    if not chosen:
        raise SmoLoRAError(f"target_modules {', '.join(targets)} match no linear layer of this model")
    return _shortest_suffixes(chosen, [n for n, _ in model.named_modules()])


def _shortest_suffixes(chosen: set[str], every: list[str]) -> list[str]:
    """For each chosen name, its shortest dotted suffix whose PEFT match (the name, or ``.suffix`` at its
    end) holds chosen modules only: ``q_proj`` on Llama, ``attn.c_proj`` for GPT-2's attention output
    where its MLP's ``c_proj`` is not chosen."""
    out = set()
    for name in chosen:
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if parts[-k].isdigit() and k < len(parts):  # h.1.attn.c_attn, not 1.attn.c_attn
                continue
            if all(n in chosen for n in every if n == suffix or n.endswith("." + suffix)):
                out.add(suffix)
                break
    return sorted(out)


def check_targets(model: nn.Module, targets: list[str]) -> None:
    """Refuse module names that match no layer; warn when a name matches only some layers."""
    missing = [t for t in targets if not _by_name(model, t)]
    if missing:
        available = linear_module_names(model)
        names = ", ".join(f"{k} (x{v})" for k, v in sorted(available.items()))
        raise SmoLoRAError(f"target_modules {', '.join(missing)} match no linear layer; the model has: {names}")
    num_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for t in targets:
        found = len(_by_name(model, t))
        if num_layers and found < num_layers:
            warn(f"target {t!r} matches only {found} of {num_layers} layers")


def describe_targets(model: nn.Module) -> str:
    """What the adapters sit on, for the run's log: each group of adapted layers by name, how many, and
    its role; fused projections said as such."""
    from peft.tuners.lora import LoraLayer

    groups: dict[tuple[str, frozenset[str]], list[str]] = {}  # (short name, roles): GPT-2 has two c_proj
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            groups.setdefault((name.rsplit(".", 1)[-1], layer_roles(name)), []).append(name)
    parts, fused = [], []
    for (short, roles), full in sorted(groups.items(), key=lambda kv: _role_order(kv[0][1])):
        label = ", ".join(ROLE_NAMES[r] for r in sorted(roles, key="qkvo".find) if r in ROLE_NAMES)
        if len(roles) > 1:
            fused.append(short)
            label = f"{'+'.join(sorted(roles, key='qkvo'.find))} fused"
        parts.append(f"{short} x{len(full)} ({label})")
    total = sum(len(f) for f in groups.values())
    line = f"LoRA on {total} layers: " + ", ".join(parts)
    if fused:
        line += f"; {', '.join(fused)} compute{'s' if len(fused) == 1 else ''} several projections in one matrix: "
        line += "one adapter adapts them together"
    return line


def _role_order(roles: frozenset[str]) -> int:
    return min("qkvo".find(r) if r in "qkvo" else 4 if r == "mlp" else 5 for r in roles)


def add_lora(model: nn.Module, peft_config):
    """Wrap ``model`` with fresh LoRA adapters; the base is frozen, only A and B train.

    ``peft_config.target_modules`` (presets, names or a regex) is resolved on this model first
    (``resolve_targets``); the caller's config is left as it was. Adapters on transformers' ``Conv1D``
    (GPT-2) get ``fan_in_fan_out``, as PEFT needs. An init that moves the base weights (PiSSA, OLoRA)
    keeps its initial factors, so that ``write_adapter`` can write an adapter for the untouched base.
    """
    from peft import get_peft_model
    from transformers.pytorch_utils import Conv1D

    peft_config = copy.deepcopy(peft_config)
    peft_config.target_modules = resolve_targets(model, peft_config.target_modules)
    adapted = [m for n, m in model.named_modules() if n in _matched(model, peft_config.target_modules)]
    if any(isinstance(m, Conv1D) for m in adapted):
        peft_config.fan_in_fan_out = True
    model.config.use_cache = False
    # PEFT freezes every base weight; only lora_A / lora_B (and biases if asked) require grad.
    # The embedding output then needs no gradient: the first adapted projection starts the graph.
    with quiet_peft():
        peft_model = get_peft_model(model, peft_config)
    if moves_base_weights(peft_config.init_lora_weights):
        from peft.utils import get_peft_model_state_dict

        peft_model.smolora_initial_adapter = {
            k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()
        }
    return peft_model


def _matched(model: nn.Module, suffixes: list[str]) -> set[str]:
    return {n for n, _ in model.named_modules() if any(n == s or n.endswith("." + s) for s in suffixes)}


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
# variants whose init moves the base weights (PiSSA, OLoRA): saved as a plain LoRA for the untouched base


def moves_base_weights(init_lora_weights) -> bool:
    """Whether an adapter's init rewrites the base weights: PiSSA and OLoRA start from W's principal
    (or QR) factors and train on ``W_res = W - s·B0·A0`` (Meng et al. 2024; Büyükakyüz 2024)."""
    init = str(init_lora_weights).lower()
    return init.startswith("pissa") or init in ("olora", "corda")


def write_adapter(model: nn.Module, folder: str | Path) -> None:
    """Write ``model``'s adapter in PEFT's format into ``folder``, loadable on the base as it was.

    Plain LoRA, rsLoRA and DoRA adapters are PEFT's own ``save_pretrained``. An adapter whose init moved
    the base weights (PiSSA, OLoRA) would only fit the moved base, which no file holds: PEFT's
    conversion writes it as a plain LoRA of twice the rank instead, ``[A | A0]`` and ``[B | -B0]``, so
    ``W + s·(B·A - B0·A0) = W_res + s·B·A`` on the untouched base. The initial factors are those
    ``add_lora`` kept."""
    initial = getattr(model, "smolora_initial_adapter", None)
    if initial is None:
        model.save_pretrained(str(folder), safe_serialization=True)
        return
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        start = Path(tmp) / "initial"
        config = copy.deepcopy(model.peft_config["default"])
        config.init_lora_weights = True  # loaded as it is: PEFT must not move the base a second time
        config.save_pretrained(str(start))
        save_file({k: v.contiguous() for k, v in initial.items()}, str(start / "adapter_model.safetensors"))
        with quiet_peft():
            model.save_pretrained(
                str(folder), safe_serialization=True, path_initial_model_for_weight_conversion=str(start)
            )


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
        if config.init_lora_weights not in (True, False, "gaussian", "orthogonal"):
            raise SmoLoRAError(
                f"rank growth supports the default, gaussian and orthogonal inits only (adapter {name!r}: "
                f"init_lora_weights={config.init_lora_weights!r}"
                + (
                    ", which moves the base weights by the initial factors)"
                    if moves_base_weights(config.init_lora_weights)
                    else ")"
                )
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
