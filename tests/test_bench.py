"""The benchmark's own measurements (benchmarks/ is never imported by the library)."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux /proc")
def test_worker_peak_rss_is_its_own_not_its_parents():
    held = b"\x01" * (600 * 2**20)  # raise this (parent) process's peak well above the child's
    parent_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    code = "import bench_train, resource; print(bench_train.peak_rss_mib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    out = subprocess.run([sys.executable, "-c", code], cwd=BENCH, capture_output=True, text=True, check=True).stdout
    own, inherited = map(float, out.split()[-2:])
    del held
    assert parent_peak >= 600
    assert inherited >= parent_peak - 1  # what ru_maxrss would have reported: the parent's peak
    assert 50 < own < parent_peak - 300  # the child imported torch (~220 MiB), nothing more
