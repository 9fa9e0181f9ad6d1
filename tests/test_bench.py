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
    code = (
        "import bench_train, resource; "
        "print(bench_train.peak_rss_mib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=BENCH, capture_output=True, text=True, check=True).stdout
    del held
    own, inherited = map(float, out.split()[-2:])
    assert inherited >= 600  # ru_maxrss: at least what the parent held when it started the child
    assert 50 < own < inherited - 200  # the child's own: Python and torch, not the parent's 600 MiB


def test_step_flops_counts_lora_backward_twice_its_forward_and_attention_at_useful_pairs(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    from transformers import LlamaConfig

    from bench_train import step_flops

    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    row = [(10, 0.0, 0)]
    lora = step_flops(cfg, row, 8, ["q_proj", "v_proj"]) - step_flops(cfg, row, 8, [])
    assert lora == 2 * 3 * (2 * 10 * 8 * (64 + 64) + 2 * 10 * 8 * (64 + 32))  # layers x (fwd + 2x fwd) x (q + v)
    attention = step_flops(cfg, [(0, 50.0, 0)], 8, []) - step_flops(cfg, [(0, 0.0, 0)], 8, [])
    assert attention == 2 * 3 * 4 * 50 * 64  # layers x (fwd + bwd) x QK^T and AV at 2·pairs·head width each
