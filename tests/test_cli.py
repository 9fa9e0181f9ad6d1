"""The CLI end to end in real subprocesses: train -> merge -> generate, bad input, kill -9 + resume."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import chat_records, write_jsonl
from smolora.fast.allocator import find_tcmalloc

ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def smolora(*args, timeout=300, env=ENV, launcher=(), **kw) -> subprocess.CompletedProcess:
    """The CLI in a subprocess; ``launcher``: Python arguments before it (``-m torch.distributed.run ...``)."""
    return subprocess.run(
        [sys.executable, *launcher, "-m", "smolora.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        **kw,
    )


@pytest.fixture
def data_file(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", chat_records(24))


def test_train_merge_generate(tmp_path, tiny_model_dir, data_file):
    out = tmp_path / "run"
    r = smolora(
        "train",
        "--data",
        data_file,
        "--output",
        out,
        "--model",
        tiny_model_dir,
        "--max-steps",
        3,
        "--gradient-accumulation-steps",
        2,
        "--r",
        4,
        "--grow-rank",
        6,
        "--target-modules",
        "q_proj,v_proj",
        "--logging-steps",
        1,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Trainable params:" in r.stdout and "step 3/3  loss " in r.stderr + r.stdout
    assert "\r" not in r.stderr + r.stdout  # output to a pipe: log lines, no progress bars redrawn over them
    assert "step 2: adapter rank 4 -> 6 (lora_alpha 24, same scaling" in r.stderr + r.stdout
    # the command trains on tcmalloc where the system has it (smolora.fast.allocator), and says so
    assert ("RSS" in r.stderr + r.stdout) and ("(tcmalloc)" in r.stderr + r.stdout) == (
        sys.platform.startswith("linux") and find_tcmalloc() is not None
    )
    adapter_cfg = json.loads((out / "adapter_checkpoint" / "adapter_config.json").read_text())
    assert (
        adapter_cfg["r"] == 6
        and adapter_cfg["lora_alpha"] == 24
        and sorted(adapter_cfg["target_modules"]) == ["q_proj", "v_proj"]
    )
    assert (out / "final_merged" / "model.safetensors").is_file()

    r = smolora("merge", "--adapter", out / "adapter_checkpoint", "--output", tmp_path / "merged2")
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = load_file(out / "final_merged" / "model.safetensors"), load_file(tmp_path / "merged2" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # an existing folder is replaced only when asked, and never one holding what is being merged
    r = smolora("merge", "--adapter", out / "adapter_checkpoint", "--output", tmp_path / "merged2")
    assert r.returncode == 2 and "exists and is not empty; pass --overwrite" in r.stderr
    assert (
        smolora(
            "merge", "--adapter", out / "adapter_checkpoint", "--output", tmp_path / "merged2", "--overwrite"
        ).returncode
        == 0
    )
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    for output in (out, tiny_model_dir):  # the adapter's folder, the base model's
        r = smolora(
            "merge",
            "--adapter",
            out / "adapter_checkpoint",
            "--model",
            tiny_model_dir,
            "--output",
            output,
            "--overwrite",
        )
        assert r.returncode == 2 and "holds the adapter or the base model" in r.stderr
    assert (tiny_model_dir / "model.safetensors").is_file()
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before

    for extra in (["--model", out / "final_merged"], ["--adapter", out / "adapter_checkpoint"]):
        r = smolora(
            "generate", *extra, "--prompt", "what is 2 plus 2?", "--max-new-tokens", 5, "--greedy", "--no-stream"
        )
        assert r.returncode == 0, r.stderr[-2000:]

    # GGUF export of the merged folder, and of base + adapter merged in memory: the same file
    for name, extra in (
        ("merged", ["--model", out / "final_merged"]),
        ("adapter", ["--adapter", out / "adapter_checkpoint"]),
    ):
        r = smolora("export", *extra, "--output", tmp_path / f"{name}.gguf", "--type", "f32", "--name", "run")
        assert r.returncode == 0, r.stderr[-2000:]
        assert f"f32 GGUF saved to {tmp_path / f'{name}.gguf'}" in r.stdout
    assert (tmp_path / "merged.gguf").read_bytes() == (tmp_path / "adapter.gguf").read_bytes()
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 40, 41, 42, 2, 50]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(out / "final_merged", dtype=torch.float32)(ids).logits
        gguf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="merged.gguf", dtype=torch.float32)(ids).logits
    assert torch.equal(merged, gguf)
    r = smolora("export", "--adapter", out / "adapter_checkpoint", "--output", tmp_path / "merged.gguf")
    assert r.returncode == 2 and "exists; pass --overwrite" in r.stderr


def test_help_for_every_command():
    for cmd in ("train", "merge", "generate", "eval", "export", "demo"):
        r = smolora(cmd, "--help")
        assert r.returncode == 0 and "usage: smolora " + cmd in r.stdout
    assert "--learning-rate" in smolora("train", "--help").stdout


@pytest.mark.parametrize(
    "content, flags, message",
    [
        ('{"text": "a"}\n{"text": oops}\n', [], "train.jsonl:2: malformed JSON"),
        ('{"body": "a"}\n', [], "record has no 'text' field (it has 1 other field)"),
        (
            '{"text": "a"}\n',
            ["--r", "0", "--learning-rate", "-1"],
            "r must be in [1, 65536] (got 0); learning_rate must be > 0 (got -1.0)",
        ),
        ('{"text": "a"}\n', ["--lr-scheduler-type", "warp"], "lr_scheduler_type must be one of"),
        ('{"text": "a"}\n', ["--target-modules", "nonexistent_proj"], "match no linear layer; the model has: "),
        (
            '{"text": "a"}\n',
            ["--grow-rank", "16,4"],
            "grow_rank must be a list of increasing ranks above r=8, up to 65536 (got [16, 4])",
        ),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, tiny_model_dir, content, flags, message):
    (tmp_path / "train.jsonl").write_text(content)
    out = tmp_path / "run"
    r = smolora("train", "--data", tmp_path / "train.jsonl", "--output", out, "--model", tiny_model_dir, *flags)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("smolora: error:")]
    assert len(lines) == 1 and message in lines[0], r.stderr[-2000:]
    assert not (out / "adapter_checkpoint").exists() and not (out / "checkpoints").exists()


def test_missing_model_and_refusing_to_overwrite(tmp_path, tiny_model_dir, data_file):
    r = smolora("train", "--data", data_file, "--model", tmp_path / "nope")
    assert r.returncode == 2 and "model path does not exist" in r.stderr
    out = tmp_path / "run"
    args = ["train", "--data", data_file, "--output", out, "--model", tiny_model_dir, "--max-steps", 1]
    assert smolora(*args).returncode == 0 and (out / "final_merged").is_dir()
    r = smolora(*args)
    assert r.returncode == 2 and "holds an earlier run" in r.stderr
    r = smolora("train", "--data", data_file, "--output", out, "--model", out / "final_merged", "--overwrite")
    assert (
        r.returncode == 2
        and "which this run replaces" in r.stderr
        and (out / "final_merged" / "model.safetensors").is_file()
    )
    assert smolora(*args, "--overwrite", "--no-merge").returncode == 0
    assert (out / "adapter_checkpoint").is_dir() and not (out / "final_merged").exists()  # the earlier run's is gone


def final_state(out: Path):
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    state = json.loads((ckpts[-1] / "trainer_state.json").read_text())
    return load_file(out / "adapter_checkpoint" / "adapter_model.safetensors"), state["losses"], state["step"]


def test_kill_9_at_a_random_step_then_resume_is_exact(tmp_path, tiny_model_dir):
    data = tmp_path / "train.jsonl"
    write_jsonl(data, chat_records(64))
    common = [
        "--data",
        data,
        "--model",
        tiny_model_dir,
        "--max-steps",
        24,
        "--save-steps",
        1,
        "--no-merge",
        "--gradient-accumulation-steps",
        3,
        "--per-device-train-batch-size",
        2,
        "--lora-dropout",
        0.1,
        "--target-modules",
        "all",
        "--learning-rate",
        5e-3,
        "--logging-steps",
        4,
    ]
    r = smolora("train", *common, "--output", tmp_path / "full")
    assert r.returncode == 0, r.stderr[-2000:]

    out = tmp_path / "killed"
    kill_after = random.Random().randint(2, 12)
    proc = subprocess.Popen(
        [sys.executable, "-m", "smolora.cli", "train", *map(str, common), "--output", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=ENV,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoints" / f"step-{kill_after:06d}").exists():
        time.sleep(0.005)
    still_running = proc.poll() is None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert still_running, "the run finished before it could be killed"
    assert not (out / "adapter_checkpoint").exists()

    r = smolora("train", *common, "--output", out, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout + r.stderr
    full_adapter, full_losses, full_step = final_state(tmp_path / "full")
    res_adapter, res_losses, res_step = final_state(out)
    assert res_step == full_step == 24
    assert res_losses == full_losses
    assert full_adapter.keys() == res_adapter.keys()
    for k in full_adapter:
        assert torch.equal(full_adapter[k], res_adapter[k]), k


def test_resume_refuses_changed_settings(tmp_path, tiny_model_dir, data_file):
    out = tmp_path / "run"
    args = ["train", "--data", data_file, "--model", tiny_model_dir, "--output", out, "--no-merge", "--save-steps", 1]
    assert smolora(*args, "--max-steps", 2).returncode == 0
    r = smolora(*args, "--max-steps", 4, "--resume", "--learning-rate", 1e-3)
    assert r.returncode == 2 and "settings differ" in r.stderr and "learning_rate: 0.0002 -> 0.001" in r.stderr
    r = smolora(*args, "--max-steps", 4, "--resume", "--learning-rate", 1e-3, "--allow-config-change")
    assert r.returncode == 0, r.stderr[-2000:]


def test_sigterm_writes_a_checkpoint_and_resume_finishes_the_same(tmp_path, tiny_model_dir):
    data = tmp_path / "train.jsonl"
    write_jsonl(data, chat_records(64))
    common = [
        "--data",
        data,
        "--model",
        tiny_model_dir,
        "--max-steps",
        400,
        "--no-merge",
        "--save-steps",
        0,
        "--gradient-accumulation-steps",
        2,
        "--learning-rate",
        5e-3,
        "--logging-steps",
        1,
    ]
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "smolora.cli", "train", *map(str, common), "--output", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "training interrupted; resumable checkpoint" in err
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and (ckpts[0] / "COMPLETE").is_file()
    stopped_at = json.loads((ckpts[0] / "trainer_state.json").read_text())["step"]
    assert 0 < stopped_at < 400


def test_data_arguments(tmp_path, monkeypatch):
    from smolora.cli import parse_data_arg
    from smolora.errors import SmoLoRAError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "lr=1e-3").mkdir(parents=True)
    (tmp_path / "runs" / "lr=1e-3" / "train.jsonl").write_text("")
    (tmp_path / "me@home.jsonl").write_text("")
    assert parse_data_arg(["a.jsonl"]) == "a.jsonl"
    assert parse_data_arg(["runs/lr=1e-3/train.jsonl"]) == "runs/lr=1e-3/train.jsonl"  # an existing path, '=' and all
    assert parse_data_arg(["me@home.jsonl"]) == "me@home.jsonl"
    assert parse_data_arg(["qa=a.jsonl@2", "sum=me@home.jsonl"]) == {
        "qa": ("a.jsonl", 2.0),
        "sum": ("me@home.jsonl", 1.0),
    }
    assert parse_data_arg(["a.jsonl", "b.jsonl@3"]) == {"task1": ("a.jsonl", 1.0), "task2": ("b.jsonl", 3.0)}
    for bad, message in (
        (["qa=a.jsonl", "qa=b.jsonl"], "task 'qa' is given twice"),
        (["a=a.jsonl@nan", "b=b.jsonl"], "must be a positive number \\(got nan\\)"),
        (["a=a.jsonl@inf", "b=b.jsonl"], "must be a positive number"),
        (["a=a.jsonl@x", "b=b.jsonl"], "weight after @ must be a number"),
    ):
        with pytest.raises(SmoLoRAError, match=message):
            parse_data_arg(bad)


def test_bad_models_and_devices_exit_2_with_one_line(tmp_path, tiny_model_dir):
    """A file that is not GGUF, a device that is not there, and a hub id whose cached weights are
    pickled (read offline from a hand-made Hugging Face cache: never unpickled without --allow-pickle)."""
    from conftest import build_tiny_llama, build_tokenizer

    (tmp_path / "fake.gguf").write_bytes(b"not a gguf file")
    snapshot = tmp_path / "hub" / "models--someone--tiny-bin" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    tok = build_tokenizer()
    model = build_tiny_llama(len(tok))
    model.config.save_pretrained(snapshot)
    tok.save_pretrained(snapshot)
    torch.save(model.state_dict(), snapshot / "pytorch_model.bin")
    env = {**ENV, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    for args, message in (
        (["--model", tmp_path / "fake.gguf"], "not a GGUF file"),
        (["--model", tiny_model_dir, "--device", "gpu"], "device 'gpu': expected auto, cpu, cuda, cuda:N or mps"),
        (["--model", "someone/tiny-bin"], "pickled weights need --allow-pickle"),
    ):
        r = smolora("generate", *args, "--prompt", "hi", "--max-new-tokens", 2, env=env)
        errors = [line for line in r.stderr.splitlines() if line.startswith("smolora: error:")]
        assert r.returncode == 2 and len(errors) == 1 and message in errors[0], r.stderr[-2000:]
    # a hub id on a machine that cannot reach the hub: one line at once, no minute of retries
    proxies = ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
    env = {
        **{k: v for k, v in ENV.items() if k not in proxies},
        "HF_HUB_CACHE": str(tmp_path / "empty"),
        "HF_ENDPOINT": "http://127.0.0.1:9",
    }
    r = smolora("generate", "--model", "someone/not-cached", "--prompt", "hi", env=env)
    assert r.returncode == 2 and "the hub is not reachable from here" in r.stderr and "Retrying" not in r.stderr, (
        r.stderr[-2000:]
    )
    r = smolora("generate", "--model", tmp_path / "never-loaded", "--prompt", "hi", "--max-new-tokens", 0)
    assert r.returncode == 2 and "max_new_tokens must be >= 1 (got 0)" in r.stderr  # checked before any model loads
    if not torch.cuda.is_available():
        r = smolora("generate", "--model", tiny_model_dir, "--device", "cuda", "--prompt", "hi")
        assert r.returncode == 2 and "no such CUDA GPU here" in r.stderr


def test_hub_reachable_asks_the_endpoint_once(monkeypatch):
    import socket

    from smolora.models import hub_reachable

    for proxy in (
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
        "NO_PROXY",
        "no_proxy",
    ):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    hub_reachable.cache_clear()
    assert hub_reachable() is False  # nothing listens there
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub_reachable() is False  # asked once per process: the first answer stands
        hub_reachable.cache_clear()
        assert hub_reachable() is True
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        hub_reachable.cache_clear()
        assert hub_reachable() is False
        monkeypatch.delenv("HF_HUB_OFFLINE")
        monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # a proxy for the endpoint's scheme is trusted
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
        hub_reachable.cache_clear()
        assert hub_reachable() is True
    hub_reachable.cache_clear()


def test_interactive_chat_and_plain_completion_without_a_chat_template(tmp_path, tiny_model_dir):
    from conftest import build_tiny_llama, build_tokenizer

    plain = tmp_path / "no-template"
    tok = build_tokenizer(chat_template=None)
    build_tiny_llama(len(tok)).save_pretrained(plain)
    tok.save_pretrained(plain)
    for model, mode in ((tiny_model_dir, "chat: type a message"), (plain, "completion: each line")):
        r = smolora("generate", "--model", model, "--max-new-tokens", 3, "--greedy", input="hello\nthe quick\n\n")
        assert r.returncode == 0, r.stderr[-2000:]
        assert mode in r.stdout and r.stdout.count("model> ") == 2


def test_an_adapter_finds_a_base_named_by_a_relative_path_from_anywhere(tmp_path, tiny_model_dir, data_file):
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "base")
    r = smolora(
        "train",
        "--data",
        data_file,
        "--model",
        "./base",
        "--output",
        "run",
        "--max-steps",
        1,
        "--no-merge",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = smolora("merge", "--adapter", tmp_path / "run" / "adapter_checkpoint", "--output", "merged", cwd=elsewhere)
    assert r.returncode == 0, r.stderr[-2000:]


def test_bad_data_fails_before_the_embedded_model_is_converted(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": \n')
    r = smolora(
        "train",
        "--data",
        tmp_path / "bad.jsonl",
        "--output",
        tmp_path / "run",
        env={**ENV, "SMOLORA_HOME": str(tmp_path / "home")},
    )
    assert r.returncode == 2 and "bad.jsonl:2: malformed JSON" in r.stderr
    assert "converting" not in r.stdout and not (tmp_path / "home").exists()


def test_an_unknown_gemm_backend_exits_2_with_one_line_and_writes_nothing(tmp_path, tiny_model_dir, data_file):
    out = tmp_path / "run"
    r = smolora(
        "train",
        "--data",
        data_file,
        "--output",
        out,
        "--model",
        tiny_model_dir,
        "--max-steps",
        1,
        env={**ENV, "SMOLORA_GEMM": "blas"},
    )
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("smolora: error:")]
    assert lines == ["smolora: error: SMOLORA_GEMM='blas': expected auto, onednn or mkl"], r.stderr[-2000:]
    assert not out.exists() or not any(out.iterdir())


def test_quiet_prints_warnings_and_errors_only(tmp_path, tiny_model_dir, data_file):
    out = tmp_path / "run"
    r = smolora("train", "--data", data_file, "--output", out, "--model", tiny_model_dir, "--max-steps", 2, "--quiet")
    assert r.returncode == 0 and (out / "final_merged" / "model.safetensors").is_file(), r.stderr[-2000:]
    said = [ln for ln in r.stdout.splitlines() if ln.startswith("[smolora]")]
    assert all(ln.startswith("[smolora] warning:") for ln in said), said
    r = smolora("export", "--model", out / "final_merged", "--output", tmp_path / "m.gguf", "--quiet")
    assert r.returncode == 0 and "[smolora]" not in r.stdout and (tmp_path / "m.gguf").is_file()
    loud = smolora("export", "--model", out / "final_merged", "--output", tmp_path / "n.gguf")
    assert "[smolora] f16 GGUF saved to" in loud.stdout  # what --quiet kept quiet
