"""Data parallelism under torchrun: ``torchrun --nproc-per-node N -m smolora.cli train ...``.

Every process builds the same optimizer step (the same examples: ``per_device_train_batch_size`` x
``gradient_accumulation_steps`` x N of them) and trains on its own share, balanced by tokens. The
adapter's gradients are summed across processes before clipping, and every loss is divided by
the whole step's supervised-token count, so every process makes the same update — the one a
single process makes on the whole step. No wrapper around the model: one all-reduce of the
(small) adapter gradients per step. Only process 0 writes files; each process's RNG state goes
into the checkpoint, so a resumed run draws the same dropout masks.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def processes() -> int:
    """How many processes torchrun (or another launcher that sets WORLD_SIZE) started; 1 alone."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched() -> bool:
    return processes() > 1


def is_main() -> bool:
    """Process 0 of a torchrun job, or the only process: the one that prints and writes."""
    return int(os.environ.get("RANK", "0")) == 0


def run_info() -> dict:
    """What a checkpoint records about the processes: their number, where there were several."""
    return {"processes": processes()} if launched() else {}


def world(device: torch.device | None = None) -> World:
    """This process's place; joins the process group on first use (gloo on CPU, nccl on CUDA)."""
    if not launched():
        return World()
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
        atexit.register(_leave)
    return World(dist.get_rank(), dist.get_world_size())


def _leave() -> None:
    """Leave the process group before the interpreter exits. Left to the exit's own teardown, the
    group's threads were at times destroyed still running: "terminate called without an active
    exception", a SIGABRT after a finished run, in about one torchrun exit in twenty here."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def local_device() -> torch.device | None:
    """Under torchrun with CUDA: this process's GPU (LOCAL_RANK)."""
    if launched() and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return None


def share(examples: list[int], lengths: list[int], w: World) -> list[int]:
    """This process's part of a step's examples: longest first, each to the process with the fewest
    tokens so far (ties to the lowest rank), then back in the step's order. The same on every process."""
    if w.size == 1:
        return examples
    load, owner = [0] * w.size, {}
    for position in sorted(range(len(examples)), key=lambda k: (-lengths[examples[k]], k)):
        r = min(range(w.size), key=lambda q: (load[q], q))
        owner[position] = r
        load[r] += lengths[examples[position]]
    return [i for k, i in enumerate(examples) if owner[k] == w.rank]


def all_sum(tensors: list[torch.Tensor], w: World) -> None:
    """Sum ``tensors`` in place across processes: one flat all-reduce per dtype."""
    if w.size == 1:
        return
    import torch.distributed as dist

    for dtype in dict.fromkeys(t.dtype for t in tensors):
        group = [t for t in tensors if t.dtype == dtype]
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat)
        for t, part in zip(group, flat.split([t.numel() for t in group])):
            t.copy_(part.view_as(t))


def gather_rng(w: World, device: torch.device) -> dict[str, torch.Tensor]:
    """Every process's torch RNG states (CPU, and its GPU's), for process 0's checkpoint:
    ``rng.torch.rankR``, ``rng.cuda.rankR``. Collective: every process must call it."""
    if w.size == 1:
        return {}
    import torch.distributed as dist

    mine = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device)
    states: list[dict | None] = [None] * w.size
    dist.all_gather_object(states, mine)
    return {f"rng.{kind}.rank{r}": state for r, per in enumerate(states) for kind, state in per.items()}


def agree(value, w: World):
    """Process 0's ``value`` on every process (a choice made by timing, which may come out otherwise
    on another process). Collective."""
    if w.size == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(w: World) -> None:
    if w.size > 1:
        import torch.distributed as dist

        dist.barrier()
