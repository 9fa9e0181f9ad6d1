"""Typed configuration: LoRA settings and training settings, each field with a default and help.

``TrainConfig`` keeps the spec's SFTConfig field names (per_device_train_batch_size,
gradient_accumulation_steps, learning_rate, ...) so code written against the spec reads the same.
``validate_*`` report every bad field in one error, before anything heavy happens.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from smolora.errors import SmoLoRAError

SCHEDULERS = ("constant", "linear", "cosine")
OPTIMIZERS = ("adamw_torch", "adamw", "sgd")

# Target-module presets, found by role on the loaded model (smolora.lora.resolve_targets), so they
# mean the same on every architecture; a fused q/k/v projection counts as all three.
TARGET_PRESETS = {
    "qv": "query and value projections",
    "qkv": "query, key and value projections",
    "attention": "q, k, v and the attention output",
    "mlp": "the MLP's projections",
    "all-linear": "every linear layer but the LM head (PEFT's all-linear)",
    "all": "the same as all-linear",
}
# Inits PEFT gives a LoRA adapter without data or quantization (pissa_niter_N: PiSSA by a fast SVD).
LORA_INITS = ("default", "gaussian", "orthogonal", "pissa", "pissa_niter_N", "olora")
# The spec's rank selection guidelines: a simple domain shift needs few directions, a new capability more.
TASK_RANKS = {"domain": 4, "style": 8, "capability": 16}


def _help(text: str, default: Any = dataclasses.MISSING, **kw) -> Any:
    if default is dataclasses.MISSING:
        return field(metadata={"help": text}, **kw)
    return field(default=default, metadata={"help": text}, **kw)


class _Settings:
    """Setting a field the dataclass does not have is an error: a typo would otherwise do nothing."""

    IGNORED: ClassVar[dict[str, str]] = {}  # accepted for the spec's code, with why they do nothing

    def __setattr__(self, name: str, value: Any) -> None:
        names = [f.name for f in dataclasses.fields(self)]
        if name not in names:
            if name in self.IGNORED:
                warnings.warn(
                    f"{type(self).__name__}.{name} has no effect in SmoLoRA: {self.IGNORED[name]}", stacklevel=2
                )
                return
            close = difflib.get_close_matches(name, names, n=1)
            raise AttributeError(
                f"{type(self).__name__} has no setting {name!r}" + (f"; did you mean {close[0]!r}?" if close else "")
            )
        super().__setattr__(name, value)


@dataclass
class LoraSettings(_Settings):
    """LoRA adapter settings, the spec's defaults (LoRA paper, Hu et al. 2021)."""

    r: int = _help("rank of the adapter matrices A (r x d_in) and B (d_out x r)", 8)
    lora_alpha: float = _help("scaling numerator: the update is (lora_alpha / r) * B @ A", 16)
    lora_dropout: float = _help("dropout on the adapter's input, in [0, 1)", 0.1)
    bias: str = _help("which biases train: none, all or lora_only", "none")
    target_modules: list[str] = _help(
        f"module names to adapt, comma-separated, a regex on full module names (PEFT's form), or a preset "
        f"found by role on any architecture: {', '.join(TARGET_PRESETS)}",
        default_factory=lambda: ["q_proj", "v_proj"],
    )
    use_rslora: bool = _help("rsLoRA: scale the update by lora_alpha / sqrt(r) instead of lora_alpha / r", False)
    use_dora: bool = _help("DoRA: train each adapted weight's magnitude apart from its direction", False)
    init_lora_weights: str = _help(
        f"how A and B start: {', '.join(LORA_INITS)} (pissa and olora start from the weights' own "
        "factors and move the base; the adapter is saved as a plain LoRA of twice the rank)",
        "default",
    )
    task: str = _help(
        "what the adapter learns, which picks its rank: domain (r 4), style (8) or capability (16), "
        "lora_alpha 2r; --r and --lora-alpha override",
        "",
    )

    def for_task(self, r: int | None = None, lora_alpha: float | None = None) -> LoraSettings:
        """``task``'s rank and alpha (2r), except those given as ``r`` / ``lora_alpha``."""
        if self.task and self.task not in TASK_RANKS:
            raise SmoLoRAError(f"task must be one of {', '.join(TASK_RANKS)} (got {self.task!r})")
        if self.task:
            self.r = r if r is not None else TASK_RANKS[self.task]
            self.lora_alpha = lora_alpha if lora_alpha is not None else 2 * self.r
        return self

    def to_peft(self):
        from peft import LoraConfig

        init = {"default": True}.get(self.init_lora_weights, self.init_lora_weights)
        return LoraConfig(
            r=self.r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            bias=self.bias,
            task_type="CAUSAL_LM",
            target_modules=expand_targets(self.target_modules),
            use_rslora=self.use_rslora,
            use_dora=self.use_dora,
            init_lora_weights=init,
        )


def expand_targets(targets: list[str] | str) -> list[str]:
    """The target list without repeats; a string is one entry (PEFT's regex form, or a preset or name).
    Presets stay names: they are found by role on the loaded model (``smolora.lora.resolve_targets``)."""
    out: list[str] = []
    for t in [targets] if isinstance(targets, str) else targets:
        if t.strip() and t.strip() not in out:
            out.append(t.strip())
    return out


@dataclass
class TrainConfig(_Settings):
    """Training settings. Field names follow the spec's SFTConfig; its ``dataset_text_field`` and
    ``max_seq_length`` (``max_length``) shape examples, so they are ``DataConfig``'s."""

    IGNORED: ClassVar[dict[str, str]] = dict.fromkeys(
        ("dataloader_num_workers", "dataloader_pin_memory", "remove_unused_columns"),
        "examples are tokenized once and packed in the training loop; there is no DataLoader",
    )

    output_dir: str = _help("where checkpoints, the adapter and the merged model go", "./fine_tuned_model")
    per_device_train_batch_size: int = _help("examples per micro-batch (packed into one row)", 1)
    gradient_accumulation_steps: int = _help("micro-batches per optimizer step", 8)
    learning_rate: float = _help("peak learning rate", 2e-4)
    max_steps: int = _help("optimizer steps to run; -1 means use num_train_epochs", 500)
    num_train_epochs: float = _help("epochs to run when max_steps is -1", 1.0)
    logging_steps: int = _help("log every N optimizer steps", 10)
    optim: str = _help(f"optimizer: {', '.join(OPTIMIZERS)}", "adamw_torch")
    weight_decay: float = _help("AdamW weight decay", 0.0)
    loraplus_lr_ratio: float = _help(
        "LoRA+: train B at this multiple of A's learning rate (Hayou et al. 2024 suggest 16; 0 = off)", 0.0
    )
    lr_scheduler_type: str = _help(f"learning-rate schedule: {', '.join(SCHEDULERS)}", "linear")
    warmup_steps: int = _help("linear warmup steps from 0 to learning_rate", 0)
    max_grad_norm: float = _help("clip the gradient norm to this; 0 turns clipping off", 1.0)
    fp16: bool = _help(
        "matmuls in float16 autocast with loss scaling (GPUs without bf16); adapter weights stay fp32", False
    )
    bf16: bool = _help(
        "matmuls in bfloat16 autocast (GPUs, Apple silicon, CPUs with AMX or AVX512-BF16); adapter weights stay fp32",
        False,
    )
    seed: int = _help("seed for shuffling, dropout and initialisation", 42)
    packing: bool = _help("pack examples padding-free into one row per micro-batch", True)
    max_tokens_per_batch: int = _help(
        "with packing: an optimizer step's examples (batch x accumulation) are packed into rows of at most this "
        "many tokens, the same update with fewer, larger matmuls (0 = one row per micro-batch)",
        512,
    )
    share_prefix: bool = _help(
        "with packing: compute a prefix shared by a row's examples (e.g. the system prompt) once", True
    )
    grow_rank: list[int] = _help(
        "grow the adapters' rank during training through these ranks "
        "(e.g. r 4 with 8,16: a third of the steps at each of "
        "4, 8, 16); lora_alpha grows with the rank, so the scaling and the model's output stay the same",
        default_factory=list,
    )
    gradient_checkpointing: bool = _help(
        "recompute each layer's activations in backward: less memory, ~1/3 more compute", False
    )
    weight_codes: bool = _help(
        "on a CPU (fp32, or --bf16 autocast), hold the frozen weights as the exact codes they came from: "
        "a GGUF's Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 blocks (the embedded model: ~1/5 of the fp32 weights' memory), "
        "or the 16 bits a Hugging Face checkpoint stores (1/2; written "
        "once as fp32 + codes under $SMOLORA_HOME). The same training",
        True,
    )
    fast: bool = _help(
        "the speed wing (smolora.fast): span attention, weight codes, fused kernels, oneDNN; off (--no-fast, or "
        "SMOLORA_FAST=0): the libraries' own layers, attention and loss, the reference the wing is tested against",
        True,
    )
    group_by_length: bool = _help("order examples so micro-batches hold similar lengths", False)
    curriculum: str = _help("order examples easy-first by a difficulty: '' (off) or length", "")
    curriculum_shuffle: bool = _help("with curriculum, shuffle within 10 difficulty buckets", False)
    val_size: float = _help("validation split: a fraction (<1) or a count of examples (0 = none)", 0.0)
    eval_steps: int = _help("evaluate on the validation split every N steps (0 = only at the end)", 0)
    early_stopping_patience: int = _help(
        "stop after N evaluations without a lower validation loss; the adapter kept is the best one (0 = off)", 0
    )
    save_steps: int = _help("write a resumable checkpoint every N steps (0 = only at the end)", 0)
    save_total_limit: int = _help("keep only the newest N checkpoints (0 = keep all)", 2)
    device: str = _help("auto, cpu, cuda, cuda:N or mps", "auto")

    def total_micro_batches(self, micro_batches_in_epoch: Callable[[int], int]) -> int | None:
        """With ``max_steps`` -1, the micro-batches ``num_train_epochs`` epochs hold, given how many
        epoch ``e`` has (they can differ: a token budget groups each epoch's order its own way).
        None: ``max_steps`` counts."""
        if self.max_steps > 0:
            return None
        whole, part = int(self.num_train_epochs), self.num_train_epochs % 1
        total = sum(micro_batches_in_epoch(e) for e in range(whole))
        return max(1, total + (math.ceil(part * micro_batches_in_epoch(whole)) if part else 0))

    def total_steps(self, total_micro_batches: int | None, processes: int = 1) -> int:
        """Optimizer steps; by epochs, the last one takes whatever micro-batches are left, so every
        example is trained on exactly ``num_train_epochs`` times (whole epochs). A step holds
        ``gradient_accumulation_steps`` micro-batches per process."""
        if total_micro_batches is None:
            return self.max_steps
        return math.ceil(total_micro_batches / (self.gradient_accumulation_steps * processes))


@dataclass
class DataConfig(_Settings):
    """How records are read and rendered into examples (the data stage reads these alone)."""

    dataset_text_field: str = _help("record field that holds plain text", "text")
    shape: str = _help("record shape: auto, chat, sharegpt, prompt_completion, alpaca or text", "auto")
    max_length: int = _help("tokens per example; longer examples are truncated", 1024)
    train_on_prompt: bool = _help("supervise prompt tokens too (no completion-only masking)", False)
    system_prompt: str | None = _help(
        "system prompt for chat rendering ('' for an empty one; default: the template's)", None
    )
    field_map: dict[str, str] = _help("rename fields, e.g. prompt=question,completion=answer", default_factory=dict)
    txt_mode: str = _help("text files: line (one example per line), file, or chunk", "line")
    chunk_unit: str = _help("with txt_mode chunk: windows of words or of tokens", "words")
    chunk_words: int = _help("with txt_mode chunk: words (or tokens) per window", 256)
    chunk_stride: int = _help("with txt_mode chunk: words (or tokens) between window starts (0 = no overlap)", 0)
    dedupe: bool = _help("drop exact duplicate records", True)
    max_file_mb: int = _help("the largest data file read, in MiB: a guard against a runaway file", 2048)
    task_prefix: str = _help("prefix for multi-task records; {task} is the task name", "[TASK:{task}] ")
    validation_data: str | None = _help("a separate validation source (instead of val_size)", None)
    special_tokens_in_content: bool = _help(
        "read text in a message that spells a special token (e.g. <|im_start|>) as that token; "
        "off: content is always text and cannot forge turns",
        False,
    )


MAX_RANK = 2**16  # far above any layer's width here: a larger rank is a typo, and its allocation fails


def _formats_with_task(prefix: str) -> bool:
    try:
        prefix.format(task="x")
    except (IndexError, KeyError, ValueError, AttributeError):
        return False
    return True


def validate(lora=None, train: TrainConfig | None = None, data: DataConfig | None = None) -> None:
    """Check every setting given; raise one error listing all problems. ``lora``: a ``LoraSettings`` or
    the ``peft.LoraConfig`` the Python API holds (the same field names), checked as it is; ``train``
    is checked against it (grow_rank starts above r), so it comes with ``lora``."""
    problems: list[str] = []

    def need(ok: bool, msg: str) -> None:
        if not ok:
            problems.append(msg)

    for settings in (lora, train, data):  # inf or nan passes every comparison below that it should fail
        for f in dataclasses.fields(settings) if settings is not None else ():
            value = getattr(settings, f.name)
            need(
                not isinstance(value, float) or math.isfinite(value), f"{f.name} must be a finite number (got {value})"
            )
    if lora is not None:
        _check_lora(lora, need)
    if train is not None:
        _check_train(train, lora, data, need)
    if data is not None:
        _check_data(data, need)
    if problems:
        raise SmoLoRAError("invalid settings: " + "; ".join(problems))


def _check_lora(lora: LoraSettings, need: Callable[[bool, str], None]) -> None:
    need(0 < lora.r <= MAX_RANK, f"r must be in [1, {MAX_RANK}] (got {lora.r})")
    need(lora.lora_alpha > 0, f"lora_alpha must be > 0 (got {lora.lora_alpha})")
    need(0 <= lora.lora_dropout < 1, f"lora_dropout must be in [0, 1) (got {lora.lora_dropout})")
    need(lora.bias in ("none", "all", "lora_only"), f"bias must be none, all or lora_only (got {lora.bias!r})")
    need(bool(expand_targets(lora.target_modules)), "target_modules must name at least one module")
    init = getattr(lora, "init_lora_weights", True)
    need(
        init in (True, False)
        or (init in LORA_INITS and init != "pissa_niter_N")
        or re.fullmatch(r"pissa_niter_\d+", str(init)) is not None,
        f"init_lora_weights must be one of {', '.join(LORA_INITS)} (got {init!r})",
    )
    moves_base = str(init).startswith("pissa") or init == "olora"
    need(not (moves_base and getattr(lora, "use_dora", False)), f"init_lora_weights {init} cannot go with use_dora")
    need(init != "orthogonal" or lora.r % 2 == 0, f"init_lora_weights orthogonal needs an even r (got {lora.r})")
    need(
        getattr(lora, "task", "") in ("", *TASK_RANKS),
        f"task must be one of {', '.join(TASK_RANKS)} (got {getattr(lora, 'task', '')!r})",
    )


def _check_train(
    train: TrainConfig, lora: LoraSettings, data: DataConfig | None, need: Callable[[bool, str], None]
) -> None:
    need(
        isinstance(train.seed, int) and 0 <= train.seed < 2**63,
        f"seed must be a whole number in [0, 2**63) (got {train.seed})",
    )
    grow = train.grow_rank if isinstance(train.grow_rank, (list, tuple)) else None
    need(
        grow is not None
        and all(isinstance(g, int) and not isinstance(g, bool) for g in grow)
        and list(grow) == sorted(set(grow))
        and (not grow or grow[0] > lora.r)
        and (not grow or grow[-1] <= MAX_RANK),
        f"grow_rank must be a list of increasing ranks above r={lora.r}, up to {MAX_RANK} (got {train.grow_rank!r})",
    )
    if grow and train.max_steps > 0:
        need(
            train.max_steps > len(grow),
            f"grow_rank {list(grow)} needs max_steps >= {len(grow) + 1}: a step or more at each rank "
            f"(got {train.max_steps})",
        )
    need(train.learning_rate > 0, f"learning_rate must be > 0 (got {train.learning_rate})")
    need(
        train.max_steps > 0 or train.max_steps == -1,
        f"max_steps must be > 0, or -1 to use epochs (got {train.max_steps})",
    )
    need(train.num_train_epochs > 0, f"num_train_epochs must be > 0 (got {train.num_train_epochs})")
    need(
        train.per_device_train_batch_size >= 1,
        f"per_device_train_batch_size must be >= 1 (got {train.per_device_train_batch_size})",
    )
    need(
        train.gradient_accumulation_steps >= 1,
        f"gradient_accumulation_steps must be >= 1 (got {train.gradient_accumulation_steps})",
    )
    need(train.logging_steps >= 1, f"logging_steps must be >= 1 (got {train.logging_steps})")
    need(
        train.lr_scheduler_type in SCHEDULERS,
        f"lr_scheduler_type must be one of {', '.join(SCHEDULERS)} (got {train.lr_scheduler_type!r})",
    )
    need(train.optim in OPTIMIZERS, f"optim must be one of {', '.join(OPTIMIZERS)} (got {train.optim!r})")
    need(train.warmup_steps >= 0, f"warmup_steps must be >= 0 (got {train.warmup_steps})")
    need(train.max_grad_norm >= 0, f"max_grad_norm must be >= 0 (got {train.max_grad_norm})")
    need(train.weight_decay >= 0, f"weight_decay must be >= 0 (got {train.weight_decay})")
    need(train.loraplus_lr_ratio >= 0, f"loraplus_lr_ratio must be >= 0 (got {train.loraplus_lr_ratio})")
    need(train.max_tokens_per_batch >= 0, f"max_tokens_per_batch must be >= 0 (got {train.max_tokens_per_batch})")
    need(
        train.val_size >= 0 and (train.val_size < 1 or float(train.val_size).is_integer()),
        f"val_size must be a fraction below 1 or a whole count of examples (got {train.val_size})",
    )
    need(train.eval_steps >= 0, f"eval_steps must be >= 0 (got {train.eval_steps})")
    if train.eval_steps and not train.early_stopping_patience and data is not None:
        need(
            train.val_size > 0 or bool(data.validation_data),
            "eval_steps needs validation data (val_size or validation_data)",
        )
    need(
        train.early_stopping_patience >= 0,
        f"early_stopping_patience must be >= 0 (got {train.early_stopping_patience})",
    )
    if train.early_stopping_patience:
        need(train.eval_steps > 0, "early_stopping_patience needs eval_steps > 0 (evaluations to compare)")
        need(
            train.val_size > 0 or bool(data and data.validation_data),
            "early_stopping_patience needs validation data (val_size or validation_data)",
        )
    need(train.save_steps >= 0, f"save_steps must be >= 0 (got {train.save_steps})")
    need(train.save_total_limit >= 0, f"save_total_limit must be >= 0 (got {train.save_total_limit})")
    need(train.curriculum in ("", "length"), f"curriculum must be '' or length (got {train.curriculum!r})")
    need(not (train.fp16 and train.bf16), "fp16 and bf16 cannot both be on")
    need(
        re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", train.device) is not None,
        f"device must be auto, cpu, cuda, cuda:N or mps (got {train.device!r})",
    )


def _check_data(data: DataConfig, need: Callable[[bool, str], None]) -> None:
    need(
        data.shape in ("auto", "chat", "sharegpt", "prompt_completion", "alpaca", "text"),
        f"shape must be auto, chat, sharegpt, prompt_completion, alpaca or text (got {data.shape!r})",
    )
    need(data.txt_mode in ("line", "file", "chunk"), f"txt_mode must be line, file or chunk (got {data.txt_mode!r})")
    need(data.chunk_unit in ("words", "tokens"), f"chunk_unit must be words or tokens (got {data.chunk_unit!r})")
    need(data.chunk_words > 0, f"chunk_words must be > 0 (got {data.chunk_words})")
    need(data.chunk_stride >= 0, f"chunk_stride must be >= 0 (got {data.chunk_stride})")
    need(data.max_length >= 8, f"max_length must be >= 8 (got {data.max_length})")
    need(data.max_file_mb > 0, f"max_file_mb must be > 0 (got {data.max_file_mb})")
    need(_formats_with_task(data.task_prefix), "task_prefix may hold {task} and no other {...} field")


def target_list(targets) -> list[str]:
    """A peft config's ``target_modules`` (a set once peft has it, or one name) as a sorted list."""
    return [targets] if isinstance(targets, str) else sorted(targets)
