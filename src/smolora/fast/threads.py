"""How a CPU run's threads wait, and how many there are.

OpenMP (torch's CPU threads) lets an idle worker spin a while before it sleeps. On a machine other
jobs also use, spinning workers take the cores those jobs and the run's own main thread need, and a
run slows several times over; on an idle machine, the spin saves waking the workers up between the
many small parallel regions of a step, and sleeping at once costs a run about a sixth of its speed.
So, unless the user chose (``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT``), SmoLoRA looks at how busy the
CPUs are when it starts: busy, idle workers sleep at once (``OMP_WAIT_POLICY=PASSIVE``); idle,
OpenMP's default stands. How threads wait changes no result. The number of threads stays torch's
(the physical cores, or ``OMP_NUM_THREADS``) whatever the load: a count that followed the load
would make results depend on it. A run records its count, and its resume uses the same.
"""

from __future__ import annotations

import os
import sys
import time

POLICY, SPIN = "OMP_WAIT_POLICY", "GOMP_SPINCOUNT"
BUSY = 0.5  # cores other jobs keep busy that make a machine count as busy


def calm_openmp(load: float | None = None) -> None:
    """Choose how idle OpenMP workers wait — before torch loads OpenMP, which reads it once.
    ``load``: the machine's, as ``os.getloadavg`` says it (read here when not given)."""
    if "torch" in sys.modules or POLICY in os.environ or SPIN in os.environ:
        return
    if load is None:
        load = busy_cores()
    if load >= BUSY:
        os.environ[POLICY] = "PASSIVE"


def busy_cores(window: float = 0.25) -> float:
    """How many cores other processes keep busy now: the CPU time not idle over ``window`` seconds
    (``/proc/stat``, Linux), or the load average over the last minute where the system says only that."""
    try:
        first = _cpu_times()
        time.sleep(window)
        second = _cpu_times()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    total, idle = (b - a for a, b in zip(first, second))
    return (total - idle) / max(total, 1) * (os.cpu_count() or 1)


def _cpu_times() -> tuple[int, int]:
    """All CPUs' time since boot, and the part of it idle (waiting for I/O included)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    return sum(fields), fields[3] + fields[4]


def describe_threads() -> str:
    import torch

    policy = os.environ.get(POLICY, "").upper()
    if policy in ("PASSIVE", "ACTIVE"):
        waiting = {"PASSIVE": "idle ones sleep", "ACTIVE": "idle ones spin"}[policy]
    elif SPIN in os.environ:
        waiting = f"idle ones spin {os.environ[SPIN]} times, then sleep"
    else:
        waiting = "OpenMP's default wait: the CPUs were idle at the start"
    return f"CPU threads: {torch.get_num_threads()} ({waiting})"


def use_threads(count: int) -> None:
    """Run on ``count`` threads: a resumed run does its sums as the run it continues did."""
    import torch

    if isinstance(count, int) and count > 0 and count != torch.get_num_threads():
        torch.set_num_threads(count)
