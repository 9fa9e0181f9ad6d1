"""One optimizer step: which examples it trains on, their forward and backward, and the update.

An *iter* is one micro-batch forward/backward; a *step* is one optimizer update made of
``gradient_accumulation_steps`` iters per process. The loss of a step is the mean over every
supervised token in all of its micro-batches (on every process), so accumulating 8 micro-batches of
1 example gives exactly the update of one batch of the same 8 examples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from smolora import distributed
from smolora.checkpoint import TrainState
from smolora.config import TrainConfig
from smolora.data.batching import MicroBatch, collate, epoch_order, group_micro_batches, shared_prefix_length
from smolora.data.formats import Example
from smolora.loss import base_lm, to_device


class StepBatches:
    """The examples of every optimizer step, in order: each epoch's order (shuffled, curriculum,
    grouped by length) cut into micro-batches, ``gradient_accumulation_steps`` of them per process
    and step, rolling over into the next epoch. Where a run is lives in its ``TrainState``
    (``epoch``, ``cursor``), so a resumed run takes the same micro-batches."""

    def __init__(self, examples: list[Example], cfg: TrainConfig, world: distributed.World):
        self.examples, self.cfg, self.world = examples, cfg, world
        self.lengths = [len(e.input_ids) for e in examples]
        has_difficulty = any(e.difficulty is not None for e in examples)
        self.difficulty = [e.difficulty for e in examples] if has_difficulty else None
        self._epoch: tuple[int, list[list[int]]] | None = None  # the last epoch's micro-batches, reused
        self.total_micro = cfg.total_micro_batches(lambda e: len(self.epoch(e)))
        self.total_steps = cfg.total_steps(self.total_micro, world.size)

    def epoch(self, epoch: int) -> list[list[int]]:
        """Epoch ``epoch``'s micro-batches of example indices."""
        if self._epoch is None or self._epoch[0] != epoch:
            cfg = self.cfg
            order = epoch_order(
                len(self.examples),
                epoch,
                cfg.seed,
                difficulty=self.difficulty,
                bucket_shuffle=cfg.curriculum_shuffle,
                lengths=self.lengths,
                group_by_length=cfg.group_by_length,
            )
            self._epoch = epoch, self._group(order)
        return self._epoch[1]

    def _group(self, order: list[int]) -> list[list[int]]:
        budget = 0 if self.cfg.packing else self.cfg.max_tokens_per_batch
        return group_micro_batches(self.lengths, order, self.cfg.per_device_train_batch_size, budget)

    def take(self, state: TrainState) -> list[list[int]]:
        """This process's micro-batches of the step at ``state``, whose position moves past them."""
        per_step = self.cfg.gradient_accumulation_steps * self.world.size
        count = per_step
        if self.total_micro is not None:  # by epochs: the last step takes what is left
            count = min(per_step, self.total_micro - state.step * per_step)
        rows = []
        for _ in range(count):
            if state.cursor >= len(self.epoch(state.epoch)):
                state.epoch, state.cursor = state.epoch + 1, 0
            rows.append(self.epoch(state.epoch)[state.cursor])
            state.cursor += 1
        if self.world.size > 1:  # this process's share of the step, balanced by tokens
            rows = self._group(distributed.share([i for row in rows for i in row], self.lengths, self.world))
        if self.cfg.packing and self.cfg.max_tokens_per_batch > 0:  # repack the whole step by token budget
            mine = [i for row in rows for i in row]
            rows = group_micro_batches(self.lengths, mine, len(mine), self.cfg.max_tokens_per_batch)
        return rows

    def progress(self, state: TrainState) -> float:
        """Epochs done, with the current one's fraction."""
        return state.epoch + state.cursor / max(1, len(self.epoch(state.epoch)))


@dataclass
class Step:
    """A step's micro-batches for this process, ready to run."""

    micro: list[MicroBatch]
    prefix: object | None  # the speed wing's StepPrefix: a prefix all rows share, computed once
    num_targets: int  # supervised tokens in the whole step, every process's


def make_step(
    batches: StepBatches, rows: list[list[int]], speed, share_rows: bool, pad_id: int, device: torch.device
) -> Step:
    """Collate ``rows`` into micro-batches. A prefix every example of the step shares (the system
    prompt) is computed once: within a row by the row itself (``share_rows``), across rows by a
    step prefix the rows attend to, where the speed wing offers one."""
    cfg, world = batches.cfg, batches.world
    row_examples = [[batches.examples[i] for i in row] for row in rows]
    shared = 0
    if len(rows) > 1 and cfg.packing and cfg.share_prefix and speed.shares_step_prefix:
        shared = shared_prefix_length([e for exs in row_examples for e in exs])
    prefix = speed.step_prefix(row_examples[0][0].input_ids[:shared]) if shared else None
    micro = [collate(exs, cfg.packing, pad_id, share_rows, shared) for exs in row_examples]
    num_targets = sum(mb.num_targets for mb in micro)
    if world.size > 1:  # every loss is divided by the whole step's count
        counted = torch.tensor([num_targets], dtype=torch.float64, device=device)
        distributed.all_sum([counted], world)
        num_targets = int(counted.item())
    return Step(micro, prefix, num_targets)


def run_step(
    model,
    step: Step,
    params: list[torch.nn.Parameter],
    speed,
    autocast,
    scaler,
    stop_requested,
    world: distributed.World,
    device: torch.device,
) -> tuple[float, int, bool]:
    """Forward and backward of the step's micro-batches; each loss is divided by the step's target
    count, so the gradients add up to the step's mean. Across processes the gradients, the loss and
    the token count are summed, and a stop asked by any process stops all.

    Returns ``(loss, tokens, stop)``: with ``stop``, the step was given up part way.
    """
    loss_total = 0.0
    if step.prefix is not None:
        with autocast():
            step.prefix.forward(base_lm(model), device)
    for mb in step.micro:
        if stop_requested():  # Ctrl-C / SIGTERM: the step is given up (by the caller)
            break
        with autocast():
            loss = speed.loss_sum(model, to_device(mb, device), step.prefix) / step.num_targets
        (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_total += loss.item()
    tokens = sum(mb.num_tokens for mb in step.micro)
    if step.prefix is not None and not stop_requested():
        step.prefix.backward()
    stop = stop_requested()
    if world.size > 1:
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        shared = torch.tensor([loss_total, tokens, stop], dtype=torch.float64, device=device)
        distributed.all_sum([p.grad for p in params] + [shared], world)
        loss_total, tokens, stop = float(shared[0]), int(shared[1]), bool(shared[2] > 0)
    return loss_total, tokens, stop


@dataclass
class Update:
    grad_norm: float
    finite: bool  # False: a non-finite loss or gradient; nothing was updated
    overflow: bool  # fp16: the gradients overflowed at this loss scale; the scaler skipped the update


def apply_update(
    optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], scaler, max_grad_norm: float, loss: float
) -> Update:
    """Clip the gradients, then step the optimizer unless the loss or the gradients are non-finite.
    The gradients are cleared either way."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf")))
    # fp16: gradients that overflow at the current loss scale are routine; the scaler skips that
    # update and lowers the scale. A non-finite loss is not.
    overflow = scaler is not None and not math.isfinite(grad_norm)
    finite = math.isfinite(loss) and (math.isfinite(grad_norm) or overflow)
    if not finite:
        if scaler is not None:
            scaler.update()  # closes this step's unscale_
    elif scaler is not None:
        scaler.step(optimizer)  # skipped on overflow
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return Update(grad_norm, finite, overflow)
