"""How a CPU run's threads wait, and how many there are.

OpenMP (torch's CPU threads) lets an idle worker spin before it sleeps. On a machine other jobs
also use, spinning workers take the cores those jobs and the run's own main thread need, and a run
slows several times over. SmoLoRA asks OpenMP to put idle workers to sleep at once
(``OMP_WAIT_POLICY=PASSIVE``) unless the user set a policy. The number of threads stays torch's
(the physical cores, or ``OMP_NUM_THREADS``) whatever the load: a count that followed the load
would make results depend on it. A run records its count, and its resume uses the same.
"""

from __future__ import annotations

import os
import sys

POLICY = "OMP_WAIT_POLICY"


def calm_openmp() -> None:
    """Idle OpenMP workers sleep instead of spinning — where torch is not loaded yet (OpenMP reads
    the setting once, when it loads)."""
    if "torch" not in sys.modules:
        os.environ.setdefault(POLICY, "PASSIVE")


def describe_threads() -> str:
    import torch

    policy = os.environ.get(POLICY, "").upper()
    waiting = {"PASSIVE": "idle ones sleep", "ACTIVE": "idle ones spin"}.get(policy, "OpenMP's default wait")
    return f"CPU threads: {torch.get_num_threads()} ({waiting})"


def use_threads(count: int) -> None:
    """Run on ``count`` threads: a resumed run does its sums as the run it continues did."""
    import torch

    if isinstance(count, int) and count > 0 and count != torch.get_num_threads():
        torch.set_num_threads(count)
