"""Data parallelism under torchrun, in real processes (gloo on CPU): the same updates as one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import chat_records, write_jsonl
from smolora.distributed import World, share
from test_cli import ENV, smolora

TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2")  # two processes


def torchrun(*args) -> subprocess.CompletedProcess:
    return smolora(*args, launcher=TORCHRUN)


def adapter(folder):
    return load_file(folder / "adapter_model.safetensors")


def test_share_splits_a_step_by_tokens_the_same_way_everywhere():
    lengths = [50, 10, 40, 30, 20, 60, 5]
    step = [6, 0, 2, 4, 5, 1, 3]
    parts = [share(step, lengths, World(r, 3)) for r in range(3)]
    assert sorted(i for p in parts for i in p) == sorted(step)
    assert all([i for i in step if i in p] == p for p in parts)  # each share in the step's order
    loads = [sum(lengths[i] for i in p) for p in parts]
    assert max(loads) - min(loads) <= max(lengths)
    assert share(step, lengths, World(0, 1)) == step
    assert share([3], lengths, World(1, 2)) == []  # more processes than examples: some get none


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", chat_records(21))


def test_two_processes_make_the_updates_one_process_makes(tmp_path, tiny_model_dir, data):
    """An epoch of 21 examples, 4 per step: 6 steps, the last one example (one process gets nothing)."""
    common = [
        "train",
        "--data",
        data,
        "--model",
        tiny_model_dir,
        "--max-steps",
        -1,
        "--lora-dropout",
        0,
        "--logging-steps",
        1,
        "--no-merge",
        "--no-dedupe",
    ]
    one = smolora(*common, "--gradient-accumulation-steps", 4, "--output", tmp_path / "one")
    assert one.returncode == 0, one.stderr[-2000:]
    two = torchrun(*common, "--gradient-accumulation-steps", 2, "--output", tmp_path / "two")
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = adapter(tmp_path / "one" / "adapter_checkpoint"), adapter(tmp_path / "two" / "adapter_checkpoint")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5)
    logs = [
        [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("one", "two")
    ]
    assert len(logs[0]) == len(logs[1]) == 7  # one writer: 6 steps, then the run's closing numbers
    assert logs[1][-1]["train_examples"] == logs[0][-1]["train_examples"] and "run_seconds" in logs[1][-1]
    for x, y in zip(logs[0][:-1], logs[1][:-1]):
        assert x["loss"] == pytest.approx(y["loss"], abs=2e-4) and x["grad_norm"] == pytest.approx(
            y["grad_norm"], abs=2e-4
        )
    assert "adapter saved to" in two.stdout and two.stdout.count("adapter saved to") == 1


def test_a_resumed_two_process_run_is_bit_identical_and_the_process_count_is_kept(tmp_path, tiny_model_dir, data):
    """Dropout on: each process draws its own masks, and the checkpoint keeps each one's RNG state."""
    common = [
        "train",
        "--data",
        data,
        "--model",
        tiny_model_dir,
        "--lr-scheduler-type",
        "constant",
        "--no-merge",
        "--gradient-accumulation-steps",
        2,
        "--save-steps",
        1,
    ]
    whole = torchrun(*common, "--max-steps", 4, "--output", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    part = torchrun(*common, "--max-steps", 2, "--output", tmp_path / "part")
    assert part.returncode == 0, part.stderr[-3000:]
    rest = torchrun(*common, "--max-steps", 4, "--output", tmp_path / "part", "--resume")
    assert rest.returncode == 0, rest.stderr[-3000:]
    a, b = adapter(tmp_path / "whole" / "adapter_checkpoint"), adapter(tmp_path / "part" / "adapter_checkpoint")
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = json.loads((tmp_path / "part" / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    assert state["processes"] == 2

    alone = smolora(*common, "--max-steps", 4, "--output", tmp_path / "part", "--resume")
    assert alone.returncode == 2 and "processes: 2 -> 1" in alone.stderr


def test_ctrl_c_inside_a_long_step_checkpoints_the_last_finished_one_at_once(tmp_path, tiny_model_dir, data):
    """Both processes give up the step under way (torchrun kills them 30 s after Ctrl-C); resuming is exact."""
    common = [
        "train",
        "--data",
        data,
        "--model",
        tiny_model_dir,
        "--max-steps",
        3,
        "--no-merge",
        "--save-steps",
        0,
        "--lr-scheduler-type",
        "constant",
        "--gradient-accumulation-steps",
        1500,
        "--logging-steps",
        1,
    ]
    whole = torchrun(*common, "--output", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    out = tmp_path / "cut"
    proc = subprocess.Popen(
        [sys.executable, *TORCHRUN, "-m", "smolora.cli", *map(str, common), "--output", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists():  # step 1 done: step 2 under way
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    sent = time.time()
    _, err = proc.communicate(timeout=60)
    assert time.time() - sent < 25, "the processes finished the step instead of stopping"
    assert err.count("training interrupted; resumable checkpoint") == 1, err[-3000:]
    (ckpt,) = (out / "checkpoints").glob("step-*")
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 1  # step 2 (seconds long) was given up
    rest = torchrun(*common, "--output", out, "--resume")
    assert rest.returncode == 0, rest.stderr[-3000:]
    a, b = adapter(tmp_path / "whole" / "adapter_checkpoint"), adapter(out / "adapter_checkpoint")
    assert all(torch.equal(a[k], b[k]) for k in a)
