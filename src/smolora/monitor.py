"""Training diagnostics and memory monitoring (the spec's "Monitoring and Debugging")."""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from smolora.fast import allocator_name
from smolora.log import say


def diagnose(logged_losses: list[float], lr: float, window: int = 10) -> list[str]:
    """The spec's warnings: loss rising over the recent logs, learning rate very low. ``lr`` is the
    configured (peak) rate: a schedule's warmup start and decayed tail are low by design."""
    warnings = []
    recent = logged_losses[-window:]
    if len(recent) > 5 and recent[-1] - recent[0] > 0:
        warnings.append(f"Loss increasing recently ({recent[0]:.4f} -> {recent[-1]:.4f} over {len(recent)} logs)")
    if 0 < lr < 1e-6:
        warnings.append(f"Learning rate very low ({lr:.2e})")
    return warnings


@functools.cache
def _allocator_note() -> str:
    return " (tcmalloc)" if allocator_name() == "tcmalloc" else ""


def memory_line(device: torch.device | str = "cpu") -> str:
    """Process RSS and system memory use, plus accelerator memory where present."""
    parts = []
    try:
        import psutil

        parts.append(f"RSS {psutil.Process().memory_info().rss / 2**20:.0f} MiB{_allocator_note()}")
        parts.append(f"system RAM {psutil.virtual_memory().percent:.1f}% used")
    except ImportError:  # psutil is optional: fall back to /proc on Linux
        status = Path(f"/proc/{os.getpid()}/status")
        if status.exists():
            rss = next((ln.split()[1] for ln in status.read_text().splitlines() if ln.startswith("VmRSS")), None)
            if rss:
                parts.append(f"RSS {int(rss) / 1024:.0f} MiB{_allocator_note()}")
    kind = torch.device(device).type
    if kind == "cuda" and torch.cuda.is_available():
        parts.append(f"CUDA allocated {torch.cuda.memory_allocated() / 2**30:.2f} GiB")
    elif kind == "mps" and hasattr(torch, "mps"):
        parts.append(f"MPS allocated {torch.mps.current_allocated_memory() / 2**30:.2f} GiB")
    return "memory " + ", ".join(parts)


class MetricsFile:
    """Appends one JSON object per log line to OUTPUT/metrics.jsonl (and hands it to ``mirror``, e.g.
    TensorBoard's writer, where there is one)."""

    def __init__(self, path: Path | None, mirror: Callable[[dict], None] | None = None):
        self.path, self.mirror = path, mirror
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        # never through a symbolic link: the file is the output folder's own
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        with os.fdopen(fd, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.mirror is not None:
            self.mirror(record)


def progress(items: Iterable, desc: str, unit: str, every: float = 30.0) -> Iterator:
    """``items`` with a progress bar on a terminal; elsewhere (a log file, a pipe: no bar is drawn)
    a line every ``every`` seconds, so that a long phase is never silent."""
    from tqdm.auto import tqdm

    bar = tqdm(items, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
    if not bar.disable:
        yield from bar
        return
    total = f"/{len(items)}" if hasattr(items, "__len__") else ""
    start = last = time.monotonic()
    for done, item in enumerate(items, 1):
        yield item
        if (now := time.monotonic()) - last >= every:
            say(f"{desc}: {done}{total} {unit}s, {now - start:.0f} s")
            last = now
