"""The training loop, read top to bottom: ``train`` sets a run up, then each optimizer step is a
few named calls (``smolora.step``: which examples, forward/backward, update), then validation,
checkpoints and logging between steps. Rank growth, non-finite steps and Ctrl-C are one call each.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from tqdm.auto import tqdm

from smolora import checkpoint as ckpt
from smolora import distributed
from smolora.config import TrainConfig
from smolora.data.formats import Example
from smolora.errors import SmoLoRAError, reason
from smolora.fast import Speed, accelerated
from smolora.log import say, warn
from smolora.lora import adapter_rank, check_growable, grow_rank, pad_to, parameter_report, rank_at
from smolora.loss import base_lm, can_pack, evaluate_loss, has_sliding_window
from smolora.monitor import MetricsFile, diagnose, memory_line
from smolora.report import closing_entry, draw_safely, tensorboard_mirror
from smolora.step import StepBatches, apply_update, make_step, run_step


class NonFiniteLossError(SmoLoRAError):
    """The loss or gradient norm became NaN/inf."""


class TrainingInterrupted(Exception):
    """Ctrl-C or SIGTERM: a checkpoint was written at the last finished step."""

    def __init__(self, checkpoint: Path | None, message: str | None = None):
        super().__init__(message or f"training interrupted; resumable checkpoint: {checkpoint}")
        self.checkpoint = checkpoint


@dataclass
class TrainResult:
    steps: int
    losses: list[float]  # per optimizer step
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    tokens: int = 0  # the dataset's own tokens trained on
    seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)  # wall time of each optimizer step
    last_checkpoint: Path | None = None
    best_step: int | None = None  # early stopping: the step whose adapter was kept


def lr_at(step: int, total: int, peak: float, schedule: str, warmup: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then the schedule."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return peak * max(0.0, 1.0 - progress)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))  # cosine


def make_optimizer(named: list[tuple[str, torch.nn.Parameter]], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer of the trainable ``(name, parameter)`` pairs. With LoRA+ (``loraplus_lr_ratio``),
    the B factors are a group of their own whose learning rate is that multiple of the others'; each
    group's ``lr_scale`` says its multiple (kept in checkpoints with the groups)."""
    groups = [{"params": [p for _, p in named], "lr_scale": 1.0}]
    if cfg.loraplus_lr_ratio:
        is_b = [("lora_B" in n or "lora_embedding_B" in n) for n, _ in named]
        groups = [
            {"params": [p for (_, p), b in zip(named, is_b) if not b], "lr_scale": 1.0},
            {"params": [p for (_, p), b in zip(named, is_b) if b], "lr_scale": cfg.loraplus_lr_ratio},
        ]
    if cfg.optim == "sgd":
        return torch.optim.SGD(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, foreach=True)


_NATIVE_CPU_FLAGS = {torch.bfloat16: ("amx_bf16", "avx512_bf16"), torch.float16: ("amx_fp16", "avx512_fp16")}


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags (Linux); None where the system does not say."""
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return None


def mixed_precision(cfg: TrainConfig, device: torch.device):
    """``(autocast, scaler)`` for a run: a context factory for its forward passes (``nullcontext``
    in fp32) and, for fp16, the gradient scaler that keeps small gradients from underflowing."""
    dtype = torch.bfloat16 if cfg.bf16 else torch.float16 if cfg.fp16 else None
    if dtype is None:
        return contextlib.nullcontext, None
    name = "bf16" if cfg.bf16 else "fp16"
    if not torch.amp.is_autocast_available(device.type):
        raise SmoLoRAError(f"{name}: mixed precision is not available on {device.type}; train in fp32")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise SmoLoRAError("bf16: this GPU does not support bfloat16; use fp16")
    if device.type == "cpu":
        flags = _cpu_flags()
        if flags is not None and not flags & set(_NATIVE_CPU_FLAGS[dtype]):
            warn(
                f"{name}: this CPU has no native {name} matrix instructions "
                f"({' or '.join(_NATIVE_CPU_FLAGS[dtype])}); expect it to train slower than fp32"
            )
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    return functools.partial(torch.autocast, device.type, dtype=dtype), scaler


def train(
    model,
    examples: list[Example],
    cfg: TrainConfig,
    *,
    val_examples: list[Example] | None = None,
    run_info: dict | None = None,
    resume_from: Path | None = None,
    pad_id: int = 0,
    skip_nonfinite_steps: int = 0,
    report_to: str | None = None,
) -> TrainResult:
    """Train the model's trainable (adapter) parameters on ``examples``.

    Writes resumable checkpoints to ``cfg.output_dir/checkpoints`` every ``cfg.save_steps`` steps,
    at the end, and on Ctrl-C / SIGTERM; ``loss.png`` beside them. ``resume_from`` continues a run
    exactly. ``report_to="tensorboard"``: every metrics line as TensorBoard scalars too.
    """
    run = _start(model, examples, cfg, val_examples, run_info, pad_id, report_to)
    cfg = run.cfg  # (packing off where the model cannot keep packed examples apart)
    state, result = _resume(run, resume_from)
    batches, total = run.batches, run.batches.total_steps
    # A row's own shared prefix needs a (T, T) mask where attention is not block by block, and one
    # mask cannot hold a sliding window that only some layers use: such models share none.
    share_rows = cfg.share_prefix and not has_sliding_window(base_lm(model))
    bar = tqdm(
        total=total,
        initial=state.step,
        desc="train",
        unit="step",
        dynamic_ncols=True,
        disable=None if run.world.main else True,
    )  # None: on a terminal (or a notebook) only
    model.train()
    with _StopRequests() as stop, bar, contextlib.ExitStack() as wing:
        run.speed = wing.enter_context(
            accelerated(model, fast=cfg.fast, training=True, packed=cfg.packing, weight_codes=cfg.weight_codes)
        )
        say(run.speed.describe())
        while state.step < total and not state.stopped:
            started, position = time.perf_counter(), _position(state, run.device)
            _grow_rank_if_due(run, state, total)
            lr = _set_learning_rate(
                run.optimizer, lr_at(state.step, total, cfg.learning_rate, cfg.lr_scheduler_type, cfg.warmup_steps)
            )
            step = make_step(batches, batches.take(state), run.speed, share_rows, pad_id, run.device)
            if step.num_targets == 0:
                warn(f"step {state.step + 1} has no supervised tokens; skipped")
                state.step += 1
            else:
                loss, tokens, stopping = run_step(
                    model, step, run.params, run.speed, run.autocast, run.scaler, stop, run.world, run.device
                )
                if stopping:  # asked to stop (any process): checkpoint the last finished step, as it was, at once
                    _interrupt(run, state, result, position)
                result.tokens, run.window_tokens = result.tokens + tokens, run.window_tokens + tokens
                update = apply_update(run.optimizer, run.params, run.scaler, cfg.max_grad_norm, loss)
                if run.scaler is not None:
                    state.loss_scale = run.scaler.state_dict()
                if not update.finite:
                    _skip_nonfinite(run, state, loss, update, skip_nonfinite_steps)
                state.step += 1
                if update.finite:
                    _record_step(run, state, result, loss, tokens, lr, update, time.perf_counter() - started)
            bar.update(1)
            _after_step(run, state, result, stop)
        if val_examples and not (cfg.eval_steps and state.step % cfg.eval_steps == 0):  # not evaluated at this step
            _validate(run, state, result, scheduled=False)
        if not (result.last_checkpoint and result.last_checkpoint.name == f"step-{state.step:06d}"):
            result.last_checkpoint = _save(run, state)  # on disk before anything that could still fail
    _keep_best(run, state, result)
    result.steps = state.step
    result.seconds = time.perf_counter() - run.started
    if run.world.main:  # the run's closing numbers and its picture (smolora.report)
        counts = len(examples), len(val_examples or [])
        run.metrics.write(closing_entry(state.step, result.tokens, result.seconds, *counts, run.device))
        draw_safely(run.out)
    return result


@dataclass
class _Run:
    """What stays fixed through a run, and the few counters its log lines need."""

    model: Any
    cfg: TrainConfig
    world: distributed.World
    device: torch.device
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]  # the trainable ones; rank growth replaces them
    batches: StepBatches
    autocast: Callable
    scaler: Any  # fp16's gradient scaler, or None
    metrics: MetricsFile
    run_info: dict
    val_examples: list[Example] | None
    pad_id: int
    ranks: list[int]  # rank growth: the ranks in turn, each for an equal share of the steps; [] for none
    speed: Speed = field(default_factory=Speed)
    started: float = field(default_factory=time.perf_counter)
    window_tokens: int = 0  # since the last log line
    window_start: float = field(default_factory=time.perf_counter)
    logged_losses: list[float] = field(default_factory=list)
    nonfinite: int = 0  # steps skipped for non-finite values

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)

    def trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]


def _start(model, examples, cfg, val_examples, run_info, pad_id, report_to=None) -> _Run:
    device = next(model.parameters()).device
    world = distributed.world(device)  # torchrun: this process's share of every step
    if cfg.gradient_checkpointing:
        base_lm(model).activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in trainable]
    if not params:
        raise SmoLoRAError("the model has no trainable parameters")
    autocast, scaler = mixed_precision(cfg, device)
    if cfg.packing and not _can_pack(model, cfg):  # Bloom: ALiBi from a 2D padding mask
        warn(f"{type(base_lm(model)).__name__} cannot keep a packed row's examples apart: training on padded batches")
        cfg = dataclasses.replace(cfg, packing=False)
    batches = StepBatches(examples, cfg, world)
    ranks = [adapter_rank(model), *cfg.grow_rank] if cfg.grow_rank else []
    if ranks:
        check_growable(model)
        if batches.total_steps < len(ranks):
            raise SmoLoRAError(
                f"grow_rank: {batches.total_steps} steps cannot hold a step at each of the ranks {ranks}"
            )
    out = Path(cfg.output_dir)
    return _Run(
        model,
        cfg,
        world,
        device,
        make_optimizer(trainable, cfg),
        params,
        batches,
        autocast,
        scaler,
        MetricsFile(
            out / "metrics.jsonl" if world.main else None,
            tensorboard_mirror(out) if report_to == "tensorboard" and world.main else None,
        ),
        {**(run_info or {}), **distributed.run_info()},
        val_examples,
        pad_id,
        ranks,
    )


def _can_pack(model, cfg: TrainConfig) -> bool:
    """Whether packed rows train ``model`` exactly (``smolora.loss.can_pack``), asked of the frozen
    weights training will use: their codes where the model holds them, never the fp32 copies."""
    with accelerated(model, fast=cfg.fast, training=False, weight_codes=cfg.weight_codes, only=("weight codes",)):
        return can_pack(base_lm(model))


def _resume(run: _Run, resume_from: Path | None) -> tuple[ckpt.TrainState, TrainResult]:
    """The state to start from: a checkpoint's, or a fresh one (with this process's dropout seed)."""
    if resume_from is None:
        torch.manual_seed(run.cfg.seed + run.world.rank)  # dropout masks: each process its own
        state = ckpt.TrainState()
    else:
        saved_rank = json.loads((Path(resume_from) / "adapter_config.json").read_text()).get("r")
        if isinstance(saved_rank, int) and hasattr(run.model, "peft_config") and saved_rank > adapter_rank(run.model):
            _grow(run, saved_rank)  # the checkpoint holds the adapter grown so far
        try:
            state = ckpt.load_checkpoint(resume_from, run.model, run.optimizer, run.world.rank)
        except (KeyError, ValueError, TypeError, IndexError, RuntimeError, SafetensorError) as error:
            raise SmoLoRAError(f"{resume_from}: cannot resume from it ({reason(error)[:200]})") from None
        most_epochs = state.step * run.cfg.gradient_accumulation_steps * run.world.size + 1  # an epoch takes a batch
        if state.epoch > most_epochs or state.cursor > len(run.batches.epoch(state.epoch)):
            raise SmoLoRAError(f"{resume_from / ckpt.STATE_FILE}: its data position is not one this run can reach")
        if run.scaler is not None and state.loss_scale:
            run.scaler.load_state_dict(state.loss_scale)
        say(f"resumed from {resume_from} at step {state.step}")
        for folder in ckpt.set_aside_newer(run.out, state.step) if run.world.main else []:
            say(f"a checkpoint after the one resumed is set aside: {folder}")
    return state, TrainResult(steps=state.step, losses=state.losses)


def _grow(run: _Run, rank: int, generator: torch.Generator | None = None) -> float:
    alpha = grow_rank(run.model, rank, run.optimizer, generator)
    run.params = [p for _, p in run.trainable()]  # the grown ones are new
    return alpha


def _grow_rank_if_due(run: _Run, state: ckpt.TrainState, total: int) -> None:
    """Rank growth: the adapters grow to the next rank at its share of the steps, computing the same function."""
    if not run.ranks or (new_rank := rank_at(state.step, total, run.ranks)) <= (old_rank := adapter_rank(run.model)):
        return
    # the new A rows come from a generator of their own: torch's (dropout masks) is untouched
    alpha = _grow(run, new_rank, torch.Generator().manual_seed((run.cfg.seed * 1_000_003 + state.step) % 2**63))
    if state.best_weights is not None:  # zero-padded: the same function at the new rank
        state.best_weights = {n: pad_to(state.best_weights[n], p.shape) for n, p in run.trainable()}
    say(
        f"step {state.step + 1}: adapter rank {old_rank} -> {new_rank} (lora_alpha {alpha:g}, "
        f"same scaling; {parameter_report(run.model)[0]:,} trainable parameters)"
    )
    run.metrics.write({"step": state.step, "rank": new_rank, "lora_alpha": alpha})


def _set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> float:
    """Every group at ``lr`` times its ``lr_scale`` (LoRA+'s B factors: a multiple); returns ``lr``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


def _position(state: ckpt.TrainState, device: torch.device) -> tuple:
    """Where the step about to run begins: what a Ctrl-C in the middle of it goes back to."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return state.epoch, state.cursor, torch.get_rng_state(), cuda


def _interrupt(run: _Run, state: ckpt.TrainState, result: TrainResult, position: tuple) -> None:
    """Give up the step in progress: the state as it was before it, checkpointed at once; then stop."""
    run.optimizer.zero_grad(set_to_none=True)
    state.epoch, state.cursor, cpu_rng, cuda_rng = position
    torch.set_rng_state(cpu_rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state(cuda_rng, run.device)
    result.last_checkpoint = _save(run, state)
    raise TrainingInterrupted(result.last_checkpoint)


def _skip_nonfinite(run: _Run, state: ckpt.TrainState, loss: float, update, allowed: int) -> None:
    """A step with non-finite values updated nothing: tolerated ``allowed`` times, then the run stops."""
    run.nonfinite += 1
    what = f"loss {loss}, grad norm {update.grad_norm}"
    if run.nonfinite > allowed:
        last = ckpt.list_checkpoints(run.out)
        kept = f"; last good checkpoint: {last[-1]}" if last else ""
        raise NonFiniteLossError(f"non-finite values at step {state.step + 1} ({what}); stopped without updating{kept}")
    warn(f"step {state.step + 1} skipped: {what}")


def _record_step(
    run: _Run, state: ckpt.TrainState, result: TrainResult, loss: float, tokens: int, lr: float, update, seconds: float
) -> None:
    """Keep the step's loss and time; every ``logging_steps`` steps, a log line and a metrics entry."""
    state.losses.append(loss)
    result.step_seconds.append(seconds)
    if update.overflow:
        say(f"fp16: step {state.step} overflowed; update skipped, loss scale now {run.scaler.get_scale():g}")
    cfg = run.cfg
    if state.step % cfg.logging_steps and state.step != run.batches.total_steps:
        return
    elapsed = time.perf_counter() - run.window_start
    recent = state.losses[-cfg.logging_steps :]
    entry = {
        "step": state.step,
        "loss": round(sum(recent) / len(recent), 4),
        "learning_rate": lr,
        "epoch": round(run.batches.progress(state), 3),
        "grad_norm": round(update.grad_norm, 4) if math.isfinite(update.grad_norm) else None,
        "tokens_per_s": round(run.window_tokens / max(elapsed, 1e-9), 1),
    }
    run.logged_losses.append(entry["loss"])
    steps = min(len(recent), cfg.logging_steps)
    norm = f"{update.grad_norm:.3g}" if math.isfinite(update.grad_norm) else "inf"
    say(
        f"step {state.step}/{run.batches.total_steps}  loss {entry['loss']:.4f}  lr {lr:.2e}  "
        f"grad norm {norm}  {elapsed / steps:.2f} s/step  {entry['tokens_per_s']:.0f} tokens/s  "
        f"epoch {entry['epoch']:.2f}  {memory_line(run.device)}"
    )
    for warning in diagnose(run.logged_losses, cfg.learning_rate):
        warn(warning)
    run.metrics.write(entry)
    run.window_tokens, run.window_start = 0, time.perf_counter()


def _after_step(run: _Run, state: ckpt.TrainState, result: TrainResult, stop) -> None:
    """After every step, updated or skipped: validate, checkpoint, honour Ctrl-C / SIGTERM."""
    cfg = run.cfg
    if run.val_examples and cfg.eval_steps and state.step % cfg.eval_steps == 0:
        _validate(run, state, result)
    if cfg.save_steps and state.step % cfg.save_steps == 0:
        result.last_checkpoint = _save(run, state)
    if stop() and run.world.size == 1:  # (several processes agree on stopping inside the next step)
        result.last_checkpoint = _save(run, state)
        raise TrainingInterrupted(result.last_checkpoint)


def _save(run: _Run, state: ckpt.TrainState) -> Path:
    folder = ckpt.checkpoint_dir(run.out, state.step)
    process_rng = distributed.gather_rng(run.world, run.device)  # every process takes part
    if run.world.main:
        try:
            ckpt.save_checkpoint(folder, run.model, run.optimizer, state, run.run_info, process_rng)
        except (OSError, SafetensorError) as error:  # a full disk, a lost mount: what was written stays whole
            last = ckpt.list_checkpoints(run.out)
            kept = f"the last complete one is {last[-1]}" if last else "there is no earlier one"
            raise SmoLoRAError(f"{folder}: could not write the checkpoint ({reason(error)}); {kept}") from error
        ckpt.prune_checkpoints(run.out, run.cfg.save_total_limit)
        draw_safely(run.out)  # loss.png as of this checkpoint
    distributed.barrier(run.world)  # written before any process goes on (or stops)
    return folder


def _validate(run: _Run, state: ckpt.TrainState, result: TrainResult, scheduled: bool = True) -> None:
    """Validation loss; with early stopping, keep the best adapter and count evaluations since.
    The end-of-run evaluation off the eval_steps schedule may be the best, but counts for nothing."""
    cfg = run.cfg
    with run.autocast():
        loss = evaluate_loss(
            run.model,
            run.val_examples,
            max(1, cfg.per_device_train_batch_size),
            cfg.packing,
            run.pad_id,
            run.speed.loss_sum,
        )
    result.eval_losses.append((state.step, loss))
    entry = {"step": state.step, "eval_loss": round(loss, 4), "eval_perplexity": round(math.exp(min(loss, 50)), 3)}
    say(f"step {state.step}: validation loss {loss:.4f}  perplexity {entry['eval_perplexity']:.3f}")
    run.metrics.write(entry)
    if not cfg.early_stopping_patience:
        return
    if state.best_eval is None or loss < state.best_eval:
        state.best_eval, state.best_step = loss, state.step
        state.best_weights = {n: p.detach().clone() for n, p in run.trainable()}
        state.evals_since_best = 0 if scheduled else state.evals_since_best
    elif scheduled:
        state.evals_since_best += 1
        state.stopped = state.evals_since_best >= cfg.early_stopping_patience


def _keep_best(run: _Run, state: ckpt.TrainState, result: TrainResult) -> None:
    """Early stopping keeps the best adapter (the checkpoint keeps the last)."""
    if state.best_weights is None:
        return
    with torch.no_grad():
        for n, p in run.trainable():
            p.copy_(state.best_weights[n])
    result.best_step = state.best_step
    why = (
        f"stopped at step {state.step}, no lower validation loss in {run.cfg.early_stopping_patience} evaluations"
        if state.stopped
        else f"ran all {state.step} steps"
    )
    say(
        f"early stopping: {why}; keeping the adapter of step {state.best_step}, "
        f"the lowest validation loss ({state.best_eval:.4f})"
    )
    run.metrics.write({"step": state.step, "best_step": state.best_step, "best_eval_loss": round(state.best_eval, 4)})


class _StopRequests:
    """Ctrl-C and SIGTERM inside the block are noted, not raised: the loop stops at a step's edge.
    Calling it says whether a stop was asked. After a stop, more of them are ignored for
    ``GRACE`` seconds while the run winds down (an impatient second Ctrl-C must not break the
    checkpoint's last steps or the exit); then the handlers from before the block answer again."""

    GRACE = 10.0

    def __enter__(self) -> _StopRequests:
        self.signals: list[int] = []
        self.previous = {
            s: signal.signal(s, lambda signum, _frame: self.signals.append(signum))
            for s in (signal.SIGINT, signal.SIGTERM)
        }
        return self

    def __exit__(self, *_exc) -> None:
        if not self.signals:
            for s, handler in self.previous.items():
                signal.signal(s, handler)
            return
        until = time.monotonic() + self.GRACE

        def winding_down(signum, frame):
            if time.monotonic() < until:
                return
            for s, handler in self.previous.items():
                signal.signal(s, handler)
            signal.raise_signal(signum)  # past the grace: as if the block had never been

        for s in self.previous:
            signal.signal(s, winding_down)

    def __call__(self) -> bool:
        return bool(self.signals)
