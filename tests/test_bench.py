"""The benchmark's own measurements (benchmarks/ is never imported by the library)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux /proc")
def test_worker_peak_rss_is_its_own_not_its_parents():
    held = b"\x01" * (600 * 2**20)  # this (parent) process holds 600 MiB more than its child will
    code = "import bench_train, resource; print(bench_train.peak_rss_mib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    out = subprocess.run([sys.executable, "-c", code], cwd=BENCH, capture_output=True, text=True, check=True).stdout
    del held
    own, inherited = map(float, out.split()[-2:])
    assert inherited >= 600  # ru_maxrss: at least what the parent held when it started the child
    assert 50 < own < inherited - 200  # the child's own: Python and torch, not the parent's 600 MiB
