"""Hostile inputs and faults, through the CLI in subprocesses: each ends with exit 2 and one line,
nothing written or deleted outside the output folder, nothing of an earlier run lost."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from conftest import chat_records, write_jsonl
from test_cli import smolora


def one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("smolora: error:")]
    assert len(lines) == 1, r.stderr[-2000:]
    return lines[0]


def listing(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def data_file(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", chat_records(12))


@pytest.mark.parametrize("dangling", [True, False])
def test_a_symlinked_metrics_file_is_refused_and_its_target_untouched(tmp_path, tiny_model_dir, data_file, dangling):
    out, target = tmp_path / "run", tmp_path / "elsewhere" / "victim.txt"
    target.parent.mkdir()
    if not dangling:
        target.write_text("keep me\n")
    out.mkdir()
    (out / "metrics.jsonl").symlink_to(target)
    r = smolora(
        "train", "--data", data_file, "--output", out, "--model", tiny_model_dir, "--max-steps", 1, "--overwrite"
    )
    assert "metrics.jsonl: is a symbolic link" in one_error_line(r)
    assert target.exists() != dangling and (dangling or target.read_text() == "keep me\n")
    assert listing(out) == ["metrics.jsonl"]


@pytest.mark.parametrize("name", ["checkpoints", "adapter_checkpoint", "final_merged"])
def test_a_symlinked_run_folder_is_refused_before_anything_is_deleted(tmp_path, tiny_model_dir, data_file, name):
    out, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious").write_text("x")
    out.mkdir()
    (out / name).symlink_to(elsewhere, target_is_directory=True)
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')  # an earlier run's
    r = smolora(
        "train", "--data", data_file, "--output", out, "--model", tiny_model_dir, "--max-steps", 1, "--overwrite"
    )
    assert f"{name}: is a symbolic link" in one_error_line(r)
    assert (elsewhere / "precious").read_text() == "x" and (out / "metrics.jsonl").is_file()


def test_merge_overwrite_replaces_only_a_merged_model(tmp_path, tiny_model_dir, data_file):
    run = tmp_path / "run"
    assert (
        smolora(
            "train", "--data", data_file, "--output", run, "--model", tiny_model_dir, "--max-steps", 1, "--no-merge"
        ).returncode
        == 0
    )
    adapter = run / "adapter_checkpoint"
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a model")
    r = smolora("merge", "--adapter", adapter, "--output", folder, "--overwrite")
    assert "'notes.txt'" in one_error_line(r) and (folder / "notes.txt").read_text() == "not a model"
    merged = tmp_path / "merged"
    assert smolora("merge", "--adapter", adapter, "--output", merged).returncode == 0
    assert (
        smolora("merge", "--adapter", adapter, "--output", merged, "--overwrite").returncode == 0
    )  # its own: replaced
    assert (merged / "model.safetensors").is_file() and not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_a_second_run_on_the_same_output_folder_is_refused_while_the_first_writes(tmp_path, tiny_model_dir, data_file):
    out = tmp_path / "run"
    hold = (
        "import sys, time; from pathlib import Path; from smolora.paths import output_lock\n"
        "with output_lock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(120)"
    )
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = smolora("train", "--data", data_file, "--output", out, "--model", tiny_model_dir, "--max-steps", 1)
        assert f"(pid {holder.pid}) is writing there" in one_error_line(r)
        assert listing(out) == [".smolora.lock"]
    finally:
        holder.kill()
        holder.wait()
    assert (
        smolora("train", "--data", data_file, "--output", out, "--model", tiny_model_dir, "--max-steps", 1).returncode
        == 0
    )


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--learning-rate", "inf"], "learning_rate must be a finite number (got inf)"),
        (["--max-steps", "-1", "--num-train-epochs", "inf"], "num_train_epochs must be a finite number (got inf)"),
        (["--lora-dropout", "nan"], "lora_dropout must be a finite number (got nan)"),
        (["--seed", str(2**64)], "seed must be a whole number in [0, 2**63)"),
        (["--max-file-mb", "0"], "max_file_mb must be > 0"),
    ],
)
def test_non_finite_and_out_of_range_settings_exit_2_before_anything_runs(
    tmp_path, tiny_model_dir, data_file, flags, message
):
    out = tmp_path / "run"
    r = smolora("train", "--data", data_file, "--output", out, "--model", tiny_model_dir, *flags)
    assert message in one_error_line(r) and not out.exists()


def test_flag_abbreviations_are_not_guessed(tmp_path, data_file):
    r = smolora("train", "--data", data_file, "--output", tmp_path / "run", "--lr", "1e-3")
    assert r.returncode == 2 and "unrecognized arguments: --lr" in r.stderr and not (tmp_path / "run").exists()


def test_a_fifo_or_a_device_as_data_is_refused_at_once(tmp_path, tiny_model_dir):
    fifo = tmp_path / "data.jsonl"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.jsonl"
    zero.symlink_to("/dev/zero")
    for path in (fifo, zero):
        started = time.monotonic()
        r = smolora("train", "--data", path, "--output", tmp_path / "run", "--model", tiny_model_dir, timeout=60)
        assert "not a regular file" in one_error_line(r) and time.monotonic() - started < 30
    big = write_jsonl(tmp_path / "big.jsonl", chat_records(12) * 4000)  # ~2.3 MiB
    r = smolora("train", "--data", big, "--output", tmp_path / "run", "--model", tiny_model_dir, "--max-file-mb", "1")
    assert "larger than max_file_mb (1); raise --max-file-mb to read it" in one_error_line(r)
    assert not (tmp_path / "run").exists()


def test_an_unknown_file_is_never_echoed_in_an_error(tmp_path, tiny_model_dir):
    secret = tmp_path / "shadow.csv"
    secret.write_text("root:*:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n")
    r = smolora("train", "--data", secret, "--output", tmp_path / "run", "--model", tiny_model_dir)
    line = one_error_line(r)
    assert "root:" not in line and "daemon" not in line and "19000" not in line
    assert "record has no 'text' field (it has: 1 fields)" in line
