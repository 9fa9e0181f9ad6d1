"""The training loop: one function, read top to bottom.

An *iter* is one micro-batch forward/backward; a *step* is one optimizer update made of
``gradient_accumulation_steps`` iters. The loss of a step is the mean over every supervised token
in all of its micro-batches, so accumulating 8 micro-batches of 1 example gives exactly the update
of one batch of the same 8 examples.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import signal
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from smolora import checkpoint as ckpt
from smolora import distributed
from smolora.attention import NAME as ATTENTION_NAME
from smolora.attention import Segments, StepPrefix, has_sliding_window, supports_varlen, varlen_attention
from smolora.codes import coded_weights, codes_of
from smolora.config import TrainConfig
from smolora.data.batching import MicroBatch, collate, epoch_order, group_micro_batches, shared_prefix_length
from smolora.data.formats import IGNORE, Example
from smolora.errors import SmoLoRAError
from smolora.fused import fused_layers
from smolora.lora import adapter_rank, check_growable, fast_dropout, grow_rank, pad_to, parameter_report, rank_at
from smolora.monitor import MetricsFile, diagnose, memory_line
from smolora.onednn import linear, onednn_linears, usable


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


def token_loss_sum(model, mb: MicroBatch, step_prefix: StepPrefix | None = None) -> torch.Tensor:
    """Sum of next-token cross-entropy over the supervised positions of a micro-batch.

    Packed rows run attention block by block over their examples (``smolora.attention``). The LM
    head runs only on supervised positions: its (N, vocab) logits are the largest activation in a
    small model, and most positions of a chat example are prompt. A row whose examples continue
    the optimizer step's shared prefix needs that ``step_prefix``, already run forward.
    """
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    keep = mb.targets != IGNORE  # (B, T)
    inputs = dict(input_ids=mb.input_ids, position_ids=mb.position_ids, attention_mask=mb.attention_mask, use_cache=False)
    varlen = contextlib.nullcontext()
    if mb.segments is not None:
        if supports_varlen(lm):
            varlen = varlen_attention(lm)
            inputs["smolora_segments"] = mb.segments
            if mb.segments.step_prefix:
                inputs["smolora_step_prefix"] = step_prefix
        elif mb.segments.prefix:  # fall back to a dense additive mask
            dtype = lm.get_input_embeddings().weight.dtype
            allowed = mb.segments.dense_mask(mb.input_ids.shape[1]).to(mb.input_ids.device)
            inputs["attention_mask"] = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)
        # else: restarting position ids with no mask make transformers build the block mask itself
    head = lm.get_output_embeddings()
    with varlen:
        if not _logits_are_head_output(lm):  # softcapped or scaled logits: the model's own forward
            logits = lm(**inputs).logits[keep]
        else:
            hidden = lm.base_model(**inputs).last_hidden_state[keep]  # (N, H)
            if type(head) is torch.nn.Linear and head.bias is None:
                return LinearCrossEntropy.apply(hidden, head.weight, mb.targets[keep], codes_of(head))
            logits = head(hidden)  # a biased head, or one with an adapter of its own
    return F.cross_entropy(logits.float(), mb.targets[keep], reduction="sum")


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ W^T, target_i), never holding all (N, V) logits: the same math as
    ``F.cross_entropy(hidden @ W.T, targets, reduction="sum")``.

    The gradient is computed in the forward pass while the logits are at hand, so autograd saves
    only (N, H). A frozen W (the usual head) is read a block of the vocabulary at a time for all
    positions, or rebuilt from its ``codes`` a block at a time (``smolora.codes``): each block's
    logits update a running max and sum of exponentials, and the gradient's running sum of W's
    rows weighted by them (the online softmax of flash attention). A W that trains gets its own
    gradient chunk by chunk of positions, from each chunk's whole (chunk, V) logits.
    """

    ROWS = 128  # positions per chunk, a W that trains
    VOCAB = 4096  # vocabulary rows per block, a frozen W: (4096, 576) fp32 is 9 MiB
    POSITIONS = 1024  # positions per pass over the vocabulary, a frozen W: its (1024, 4096) block of logits 16 MiB

    @staticmethod
    def forward(ctx, hidden, weight, targets, codes=None):  # hidden (N, H), weight (V, H), targets (N,)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        device = hidden.device.type
        # Under autocast the matmuls run in its dtype (bf16/fp16); the softmax always in fp32.
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        with torch.autocast(device, enabled=False):
            if want_w:
                loss, grad_h, grad_w = _ce_by_positions(hidden, weight.to(dtype), targets, want_h)
            else:
                grad_w, step = None, LinearCrossEntropy.POSITIONS
                parts = [_ce_by_vocabulary(hidden[s : s + step].to(dtype), weight, targets[s : s + step], codes, want_h)
                         for s in range(0, hidden.shape[0], step)]
                loss = sum((part[0] for part in parts), torch.zeros((), device=hidden.device))
                grad_h = torch.cat([part[1] for part in parts] or [hidden.new_zeros(hidden.shape)]).to(hidden.dtype) if want_h else None
        ctx.save_for_backward(*(g for g in (grad_h, grad_w) if g is not None))
        ctx.want = (want_h, want_w)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        saved = list(ctx.saved_tensors)
        grad_h = saved.pop(0) * grad_loss if ctx.want[0] else None
        grad_w = saved.pop(0) * grad_loss if ctx.want[1] else None
        return grad_h, grad_w, None, None


def _ce_by_vocabulary(h, weight, targets, codes, want_h: bool):
    """(loss, d loss / d h) for a frozen ``weight`` (V, H), block by block of its rows."""
    n, dtype = h.shape[0], h.dtype
    top = torch.full((n, 1), -math.inf, device=h.device)  # the running max of each position's logits
    total = torch.zeros(n, 1, device=h.device)  # sum of exp(logit - top)
    grad = torch.zeros(n, h.shape[1], device=h.device) if want_h else None  # sum of exp(logit - top) * W's row
    picked = torch.empty(n, device=h.device)  # the target's logit
    target_rows = torch.empty(n, h.shape[1], dtype=dtype, device=h.device) if want_h else None
    for v in range(0, weight.shape[0], LinearCrossEntropy.VOCAB):
        rows = slice(v, v + LinearCrossEntropy.VOCAB)
        w = codes.weight(rows).to(dtype) if codes is not None else weight[rows].to(dtype)  # (b, H)
        logits = linear(h, w).float()  # (n, b): through oneDNN where faster (smolora.onednn)
        inside = ((targets >= v) & (targets < v + w.shape[0])).nonzero().squeeze(1)
        local = targets[inside] - v  # the targets in this block, as its rows
        picked[inside] = logits[inside, local]
        if want_h:
            target_rows[inside] = w[local]
        new_top = torch.maximum(top, logits.amax(1, keepdim=True))
        fade = (top - new_top).exp_()  # rescales what earlier blocks summed; 0 at the first
        top = new_top
        exp = logits.sub_(top).exp_()  # in place
        total.mul_(fade).add_(exp.sum(1, keepdim=True))
        if want_h:
            grad.mul_(fade).add_(linear(exp.to(dtype), w.t()))  # (n, b) @ (b, H)
        logits = exp = None  # freed before the next block allocates its own
    loss = (top + total.log()).sum() - picked.sum()
    return loss, (grad.div_(total).sub_(target_rows) if want_h else None)


def _ce_by_positions(hidden, w, targets, want_h: bool):
    """(loss, d loss / d hidden, d loss / d w) chunk by chunk of positions, for a ``w`` (V, H) that trains."""
    grad_h = torch.empty_like(hidden) if want_h else None
    grad_w = torch.zeros_like(w)
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    fast = usable(hidden, w)  # through oneDNN (smolora.onednn); fp32 only, so not under autocast
    chunk, dtype = LinearCrossEntropy.ROWS, w.dtype
    # torch's mm writes into one (chunk, V) buffer kept for all chunks: with glibc's malloc each fresh
    # 25 MB block was a fresh mapping, whose page faults cost more than its GEMM
    block = None if fast else hidden.new_empty(min(chunk, hidden.shape[0]), w.shape[0], dtype=dtype)
    block32 = block if dtype == torch.float32 else block.new_empty(block.shape, dtype=torch.float32)  # (oneDNN: fp32 only)
    for s in range(0, hidden.shape[0], chunk):
        h, t = hidden[s : s + chunk].to(dtype), targets[s : s + chunk]
        logits = linear(h, w) if fast else torch.mm(h, w.T, out=block[: len(t)])  # (c, V)
        if block32 is not block:
            logits = block32[: len(t)].copy_(logits)
        logp = torch.log_softmax(logits, dim=-1, out=logits)  # in place: one fused kernel, row by row
        rows = torch.arange(len(t), device=t.device)
        loss -= logp[rows, t].sum()
        probs = logp.exp_()  # softmax, in place
        probs[rows, t] -= 1.0  # d loss / d logits
        probs = probs.to(dtype)
        if want_h:  # torch's mm: as (W^T probs^T)^T, the vocabulary as the GEMM's long side (168 -> 197 GFLOP/s)
            grad_h[s : s + len(t)] = linear(probs, w.t()) if fast else (w.T @ probs.T).T
        grad_w += probs.T @ h
        logits = logp = probs = None  # oneDNN's (c, V) block: freed before the next chunk allocates its own
    return loss, grad_h, grad_w


_HEAD_IS_LOGITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _logits_are_head_output(lm) -> bool:
    """Whether the model's logits are its output embeddings' output as is, with nothing applied after
    (Gemma 2's softcapping, Granite's logits_scaling, Cohere's logit_scale, ...): found once per model
    by a forward on a probe input, where the two must be bit-equal."""
    if lm not in _HEAD_IS_LOGITS:
        head, captured = lm.get_output_embeddings(), []
        handle = head.register_forward_hook(lambda _module, _inputs, output: captured.append(output))
        was_training = lm.training
        lm.eval()
        try:
            with torch.no_grad():
                ids = torch.arange(min(8, lm.get_input_embeddings().num_embeddings), device=head.weight.device)[None]
                routed = lm.config._attn_implementation == ATTENTION_NAME  # inside varlen_attention
                extra = {"smolora_segments": Segments(0, ((0, ids.shape[1]),))} if routed else {}
                logits = lm(input_ids=ids, use_cache=False, **extra).logits
        finally:
            handle.remove()
            lm.train(was_training)
        _HEAD_IS_LOGITS[lm] = len(captured) == 1 and captured[0].shape == logits.shape and torch.equal(captured[0], logits)
    return _HEAD_IS_LOGITS[lm]


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optim == "sgd":
        return torch.optim.SGD(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, foreach=True)


_NATIVE_CPU_FLAGS = {torch.bfloat16: ("amx_bf16", "avx512_bf16"), torch.float16: ("amx_fp16", "avx512_fp16")}


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags (Linux); None where the system does not say."""
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return None


def mixed_precision(cfg: TrainConfig, device: torch.device, log=print):
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
            log(f"[smolora] warning: {name}: this CPU has no native {name} matrix instructions "
                f"({' or '.join(_NATIVE_CPU_FLAGS[dtype])}); expect it to train slower than fp32")
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    return functools.partial(torch.autocast, device.type, dtype=dtype), scaler


def _to_device(mb: MicroBatch, device: torch.device) -> MicroBatch:
    if device.type == "cpu":
        return mb
    mask = mb.attention_mask.to(device) if mb.attention_mask is not None else None
    return MicroBatch(mb.input_ids.to(device), mb.position_ids.to(device), mb.targets.to(device), mask, mb.num_examples,
                      mb.num_tokens, mb.segments)


@torch.no_grad()
def evaluate_loss(model, examples: list[Example], batch_size: int = 8, packed: bool = True, pad_id: int = 0,
                  weight_codes: bool = True) -> float:
    """Mean per-token loss over supervised tokens (exp of it is perplexity)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with coded_weights(model) if weight_codes else contextlib.nullcontext(), onednn_linears(model):
        for s in range(0, len(examples), batch_size):
            mb = _to_device(collate(examples[s : s + batch_size], packed, pad_id), device)
            total += float(token_loss_sum(model, mb))
            count += mb.num_targets
    model.train(was_training)
    return total / max(1, count)


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
    log=print,
) -> TrainResult:
    """Train the model's trainable (adapter) parameters on ``examples``.

    Writes resumable checkpoints to ``cfg.output_dir/checkpoints`` every ``cfg.save_steps`` steps,
    at the end, and on Ctrl-C / SIGTERM. ``resume_from`` continues a run exactly.
    """
    device = next(model.parameters()).device
    world = distributed.world(device)  # torchrun: this process's share of every step
    log = log if world.main else _silent  # process 0 speaks for all
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if cfg.gradient_checkpointing:
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in trainable]
    if not params:
        raise SmoLoRAError("the model has no trainable parameters")
    optimizer = make_optimizer(params, cfg)
    autocast, scaler = mixed_precision(cfg, device, log)
    lengths = [len(e.input_ids) for e in examples]
    difficulty = [e.difficulty for e in examples] if any(e.difficulty is not None for e in examples) else None

    def micro_batches(order: list[int]) -> list[list[int]]:
        return group_micro_batches(lengths, order, cfg.per_device_train_batch_size, 0 if cfg.packing else cfg.max_tokens_per_batch)

    def groups_for(epoch: int) -> list[list[int]]:
        return micro_batches(epoch_order(len(examples), epoch, cfg.seed, difficulty=difficulty, bucket_shuffle=cfg.curriculum_shuffle,
                                         lengths=lengths, group_by_length=cfg.group_by_length))

    groups = groups_for(0)
    total_micro = cfg.total_micro_batches(lambda e: len(groups if e == 0 else groups_for(e)))
    total_steps = cfg.total_steps(total_micro, world.size)
    run_info = {**(run_info or {}), **distributed.run_info()}
    ranks = [adapter_rank(model), *cfg.grow_rank] if cfg.grow_rank else []  # rank growth: equal shares of the steps
    if ranks:
        check_growable(model)
        if total_steps < len(ranks):
            raise SmoLoRAError(f"grow_rank: {total_steps} steps cannot hold a step at each of the ranks {ranks}")

    def grow(rank: int, generator: torch.Generator | None = None) -> float:
        alpha = grow_rank(model, rank, optimizer, generator)
        trainable[:] = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # the grown ones are new
        params[:] = [p for _, p in trainable]
        return alpha

    state = ckpt.TrainState()
    if resume_from is not None:
        saved_rank = json.loads((Path(resume_from) / "adapter_config.json").read_text()).get("r")
        if isinstance(saved_rank, int) and hasattr(model, "peft_config") and saved_rank > adapter_rank(model):
            grow(saved_rank)  # the checkpoint holds the adapter grown so far
        state = ckpt.load_checkpoint(resume_from, model, optimizer, world.rank)
        if scaler is not None and state.loss_scale:
            scaler.load_state_dict(state.loss_scale)
        groups = groups_for(state.epoch)
        log(f"[smolora] resumed from {resume_from} at step {state.step}")
        for folder in ckpt.set_aside_newer(cfg.output_dir, state.step) if world.main else []:
            log(f"[smolora] a checkpoint after the one resumed is set aside: {folder}")
    else:
        torch.manual_seed(cfg.seed + world.rank)  # dropout masks: each process its own
    out = Path(cfg.output_dir)
    metrics = MetricsFile(out / "metrics.jsonl" if world.main else None)
    result = TrainResult(steps=state.step, losses=state.losses)
    stop_signal: list[int] = []
    logged_losses: list[float] = []
    window_tokens, window_start, nonfinite = 0, time.perf_counter(), 0
    start_time = time.perf_counter()
    bar = tqdm(total=total_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True,
               disable=None if world.main else True)  # None: on a terminal (or a notebook) only
    write = bar.write if world.main else _silent

    def save(step_state: ckpt.TrainState) -> Path:
        folder = ckpt.checkpoint_dir(out, step_state.step)
        process_rng = distributed.gather_rng(world, device)  # every process takes part
        if world.main:
            ckpt.save_checkpoint(folder, model, optimizer, step_state, run_info, process_rng)
            ckpt.prune_checkpoints(out, cfg.save_total_limit)
        distributed.barrier(world)  # written before any process goes on (or stops)
        return folder

    def evaluate(write, scheduled: bool = True) -> None:
        """Validation loss; with early stopping, keep the best adapter and count evaluations since.
        The end-of-run evaluation off the eval_steps schedule may be the best, but counts for nothing."""
        loss = _log_eval(model, val_examples, cfg, pad_id, state.step, result, metrics, write, autocast)
        if not cfg.early_stopping_patience:
            return
        if state.best_eval is None or loss < state.best_eval:
            state.best_eval, state.best_step, state.best_weights = loss, state.step, {n: p.detach().clone() for n, p in trainable}
            state.evals_since_best = 0 if scheduled else state.evals_since_best
        elif scheduled:
            state.evals_since_best += 1
            state.stopped = state.evals_since_best >= cfg.early_stopping_patience

    def after_step() -> None:
        """After every step, updated or skipped: evaluate, checkpoint, honour Ctrl-C / SIGTERM."""
        bar.update(1)
        if val_examples and cfg.eval_steps and state.step % cfg.eval_steps == 0:
            evaluate(write)
        if cfg.save_steps and state.step % cfg.save_steps == 0:
            result.last_checkpoint = save(state)
        if stop_signal and world.size == 1:  # (several processes agree on stopping inside the next step)
            result.last_checkpoint = save(state)
            raise TrainingInterrupted(result.last_checkpoint)

    model.train()
    # A row's own shared prefix needs a (T, T) mask where attention is not block by block, and one
    # mask cannot hold a sliding window that only some layers use: such models share none.
    share_rows = cfg.share_prefix and not has_sliding_window(lm)
    cleanup = contextlib.ExitStack()
    previous = {s: signal.signal(s, lambda signum, _f: stop_signal.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:  # everything below is undone in the finally, however it ends (even while being set up)
        if cfg.packing and supports_varlen(lm):
            # Packed rows use block-by-block attention. Keep it switched on for the whole loop, so that
            # backward — and the forward that gradient checkpointing recomputes inside it — use it too.
            cleanup.enter_context(varlen_attention(lm))
        if cfg.weight_codes:  # first: the probes below then never read a weight that has codes
            cleanup.enter_context(coded_weights(model))
        cleanup.enter_context(fast_dropout(model))
        cleanup.enter_context(fused_layers(lm))
        cleanup.enter_context(onednn_linears(model))
        while state.step < total_steps and not state.stopped:
            step_start = time.perf_counter()
            if ranks and (new_rank := rank_at(state.step, total_steps, ranks)) > (old_rank := adapter_rank(model)):
                # the new A rows come from a generator of their own: torch's (dropout masks) is untouched
                alpha = grow(new_rank, torch.Generator().manual_seed((cfg.seed * 1_000_003 + state.step) % 2**63))
                if state.best_weights is not None:  # zero-padded: the same function at the new rank
                    state.best_weights = {n: pad_to(state.best_weights[n], p.shape) for n, p in trainable}
                write(f"[smolora] step {state.step + 1}: adapter rank {old_rank} -> {new_rank} (lora_alpha {alpha:g}, "
                      f"same scaling; {parameter_report(model)[0]:,} trainable parameters)")
                metrics.write({"step": state.step, "rank": new_rank, "lora_alpha": alpha})
            lr = lr_at(state.step, total_steps, cfg.learning_rate, cfg.lr_scheduler_type, cfg.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # 1. the next gradient_accumulation_steps micro-batches (per process), rolling over epochs
            step_begins = (state.epoch, state.cursor, groups, torch.get_rng_state(),  # Ctrl-C mid-step goes back here
                           torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
            rows, accum = [], cfg.gradient_accumulation_steps * world.size
            if total_micro is not None:  # by epochs: the last step takes what is left
                accum = min(accum, total_micro - state.step * accum)
            for _ in range(accum):
                if state.cursor >= len(groups):
                    state.epoch, state.cursor = state.epoch + 1, 0
                    groups = groups_for(state.epoch)
                rows.append(groups[state.cursor])
                state.cursor += 1
            if world.size > 1:  # this process's share of the step, balanced by tokens
                rows = micro_batches(distributed.share([i for row in rows for i in row], lengths, world))
            if cfg.packing and cfg.max_tokens_per_batch > 0:  # repack the whole step by token budget
                step_examples = [i for row in rows for i in row]
                rows = group_micro_batches(lengths, step_examples, len(step_examples), cfg.max_tokens_per_batch)
            row_examples = [[examples[i] for i in row] for row in rows]
            # A prefix all the step's examples share (the system prompt) is computed once per step:
            # within a row by the row itself, across rows by a StepPrefix the rows attend to.
            shared = 0
            if len(rows) > 1 and cfg.packing and cfg.share_prefix and supports_varlen(lm):
                shared = shared_prefix_length([e for exs in row_examples for e in exs])
            step_prefix = StepPrefix(row_examples[0][0].input_ids[:shared]) if shared else None
            micro = [collate(exs, cfg.packing, pad_id, share_rows, shared) for exs in row_examples]
            num_targets = sum(mb.num_targets for mb in micro)
            if world.size > 1:  # every loss is divided by the whole step's count
                counted = torch.tensor([num_targets], dtype=torch.float64, device=device)
                distributed.all_sum([counted], world)
                num_targets = int(counted.item())
            if num_targets == 0:
                log(f"[smolora] warning: step {state.step + 1} has no supervised tokens; skipped")
                state.step += 1
                after_step()
                continue
            # 2. forward/backward each micro-batch; each loss is scaled by the step's token count
            step_loss = 0.0
            if step_prefix is not None:
                with autocast():
                    step_prefix.forward(lm, device)
            for mb in micro:
                if stop_signal:  # Ctrl-C / SIGTERM: this step is given up (below)
                    break
                with autocast():
                    loss = token_loss_sum(model, _to_device(mb, device), step_prefix) / num_targets
                (scaler.scale(loss) if scaler is not None else loss).backward()
                step_loss += loss.item()
            step_tokens = sum(mb.num_tokens for mb in micro)
            if step_prefix is not None and not stop_signal:
                step_prefix.backward()
            stop = bool(stop_signal)
            if world.size > 1:  # the step's gradient: the sum of every process's; its loss and any stop request too
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                shared_sum = torch.tensor([step_loss, step_tokens, stop], dtype=torch.float64, device=device)
                distributed.all_sum([p.grad for p in params] + [shared_sum], world)
                step_loss, step_tokens, stop = float(shared_sum[0]), int(shared_sum[1]), bool(shared_sum[2] > 0)
            if stop:  # asked to stop (any process): checkpoint the last finished step, as it was, at once
                optimizer.zero_grad(set_to_none=True)
                state.epoch, state.cursor, groups, cpu_rng, cuda_rng = step_begins
                torch.set_rng_state(cpu_rng)
                if cuda_rng is not None:
                    torch.cuda.set_rng_state(cuda_rng, device)
                result.last_checkpoint = save(state)
                raise TrainingInterrupted(result.last_checkpoint)
            window_tokens += step_tokens
            result.tokens += step_tokens
            # 3. clip, guard, update
            if scaler is not None:
                scaler.unscale_(optimizer)
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            # fp16: gradients that overflow at the current loss scale are routine; the scaler skips
            # that update and lowers the scale. A non-finite loss is not.
            overflow = scaler is not None and not math.isfinite(grad_norm)
            if not math.isfinite(step_loss) or (not math.isfinite(grad_norm) and not overflow):
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.update()  # closes this step's unscale_
                    state.loss_scale = scaler.state_dict()
                nonfinite += 1
                what = f"loss {step_loss}, grad norm {grad_norm}"
                if nonfinite > skip_nonfinite_steps:
                    last = ckpt.list_checkpoints(out)
                    kept = f"; last good checkpoint: {last[-1]}" if last else ""
                    raise NonFiniteLossError(f"non-finite values at step {state.step + 1} ({what}); stopped without updating{kept}")
                log(f"[smolora] warning: step {state.step + 1} skipped: {what}")
                state.step += 1
                after_step()
                continue
            if scaler is not None:
                scaler.step(optimizer)  # skipped on overflow
                scaler.update()
                state.loss_scale = scaler.state_dict()
                if overflow:
                    write(f"[smolora] fp16: step {state.step + 1} overflowed; update skipped, loss scale now {scaler.get_scale():g}")
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.losses.append(step_loss)
            result.step_seconds.append(time.perf_counter() - step_start)
            # 4. log; then evaluate, checkpoint
            if state.step % cfg.logging_steps == 0 or state.step == total_steps:
                elapsed = time.perf_counter() - window_start
                recent = state.losses[-cfg.logging_steps :]
                entry = {"step": state.step, "loss": round(sum(recent) / len(recent), 4), "learning_rate": lr,
                         "epoch": round(state.epoch + state.cursor / max(1, len(groups)), 3),
                         "grad_norm": round(grad_norm, 4) if math.isfinite(grad_norm) else None, "tokens_per_s": round(window_tokens / max(elapsed, 1e-9), 1)}
                logged_losses.append(entry["loss"])
                write(str(entry))
                for w in diagnose(logged_losses, cfg.learning_rate):
                    write(w)
                write(memory_line(device))
                metrics.write(entry)
                window_tokens, window_start = 0, time.perf_counter()
            after_step()
    finally:
        cleanup.close()
        bar.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    if val_examples and not (cfg.eval_steps and state.step % cfg.eval_steps == 0):  # not evaluated at this step yet
        evaluate(log, scheduled=False)
    if not (result.last_checkpoint and result.last_checkpoint.name == f"step-{state.step:06d}"):
        result.last_checkpoint = save(state)
    if state.best_weights is not None:  # early stopping keeps the best adapter (the checkpoint keeps the last)
        with torch.no_grad():
            for n, p in trainable:
                p.copy_(state.best_weights[n])
        result.best_step = state.best_step
        why = (f"stopped at step {state.step}, no lower validation loss in {cfg.early_stopping_patience} evaluations"
               if state.stopped else f"ran all {state.step} steps")
        log(f"[smolora] early stopping: {why}; keeping the adapter of step {state.best_step}, "
            f"the lowest validation loss ({state.best_eval:.4f})")
        metrics.write({"step": state.step, "best_step": state.best_step, "best_eval_loss": round(state.best_eval, 4)})
    result.steps = state.step
    result.seconds = time.perf_counter() - start_time
    return result


def _silent(*_args, **_kwargs) -> None:
    pass


def _log_eval(model, val_examples, cfg, pad_id, step, result, metrics, write, autocast=contextlib.nullcontext) -> float:
    with autocast():
        loss = evaluate_loss(model, val_examples, max(1, cfg.per_device_train_batch_size), cfg.packing, pad_id, cfg.weight_codes)
    result.eval_losses.append((step, loss))
    entry = {"step": step, "eval_loss": round(loss, 4), "eval_perplexity": round(math.exp(min(loss, 50)), 3)}
    write(str(entry))
    metrics.write(entry)
    return loss
