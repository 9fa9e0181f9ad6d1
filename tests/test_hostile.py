"""Hostile inputs and faults, through the CLI in subprocesses: each ends with exit 2 and one line,
nothing written or deleted outside the output folder, nothing of an earlier run lost."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import chat_records, write_jsonl
from test_cli import ENV, smolora


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
    assert "record has no 'text' field (it has 1 other field)" in line


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated adapter": ("adapter_model.safetensors", _truncate),
    "flipped optimizer byte": ("optimizer.safetensors", _flip_a_byte),
    "nonsense trainer state": ("trainer_state.json", lambda p: p.write_text("{not json")),
    "missing adapter config": ("adapter_config.json", lambda p: p.unlink()),
    "empty trainer state": ("trainer_state.json", lambda p: p.write_text("{}")),
}


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory, tiny_model_dir_session):
    """A run of three steps, a checkpoint at each, and the adapter it ends with."""
    root = tmp_path_factory.mktemp("three_steps")
    data = write_jsonl(root / "train.jsonl", chat_records(12))
    args = ["--data", data, "--model", tiny_model_dir_session, "--max-steps", 3, "--save-steps", 1, "--no-merge"]
    r = smolora("train", *args, "--output", root / "run", "--save-total-limit", 0)
    assert r.returncode == 0, r.stderr[-2000:]
    return root / "run", args


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_newest_checkpoint_is_passed_over_naming_the_file_and_resume_is_exact(tmp_path, three_steps, damage):
    from safetensors.torch import load_file

    done, args = three_steps
    out = tmp_path / "run"
    shutil.copytree(done, out)
    shutil.rmtree(out / "adapter_checkpoint")
    name, harm = DAMAGE[damage]
    harm(out / "checkpoints" / "step-000003" / name)
    r = smolora("train", *args, "--output", out, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    said = r.stdout + r.stderr
    assert f"damaged checkpoint: {out / 'checkpoints' / 'step-000003'}" in said and name in said, said[-2000:]
    assert "resumed from" in said and "step-000002" in said
    assert (out / "checkpoints" / "abandoned-step-000003").is_dir()  # set aside, not deleted
    ours, clean = (load_file(str(d / "adapter_checkpoint" / "adapter_model.safetensors")) for d in (out, done))
    assert ours.keys() == clean.keys() and all(torch.equal(ours[k], clean[k]) for k in ours)


def test_when_no_checkpoint_verifies_resume_names_the_newest_bad_file(tmp_path, three_steps):
    done, args = three_steps
    out = tmp_path / "run"
    shutil.copytree(done, out)
    for step in (1, 2, 3):
        _truncate(out / "checkpoints" / f"step-{step:06d}" / "optimizer.safetensors")
    before = listing(out)
    line = one_error_line(smolora("train", *args, "--output", out, "--resume"))
    assert f"{out / 'checkpoints' / 'step-000003' / 'optimizer.safetensors'} does not match its checksum" in line
    assert listing(out) == before
    named = out / "checkpoints" / "step-000002"
    line = one_error_line(smolora("train", *args, "--output", out, "--resume", named))
    assert f"cannot resume: {named / 'optimizer.safetensors'}" in line


def test_a_checkpoint_is_never_written_with_non_finite_weights(tmp_path, tokenizer):
    from conftest import build_tiny_llama
    from smolora import checkpoint as ckpt
    from smolora.config import LoraSettings
    from smolora.lora import add_lora

    model = add_lora(build_tiny_llama(len(tokenizer)), LoraSettings().to_peft())
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    for bad in (float("nan"), float("inf")):
        with torch.no_grad():
            trainable[-1].view(-1)[0] = bad
        with pytest.raises(ckpt.NonFiniteWeights, match="non-finite values .*no checkpoint written"):
            ckpt.save_checkpoint(ckpt.checkpoint_dir(tmp_path, 1), model, optimizer, ckpt.TrainState(step=1), {})
        assert listing(tmp_path) == []  # nothing written


def test_the_first_lines_say_the_threads_and_a_resume_keeps_the_count_it_continues(tmp_path, tiny_model_dir, data_file):
    env = {k: v for k, v in ENV.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}  # the command's own choice
    args = ["train", "--data", data_file, "--output", tmp_path / "run", "--model", tiny_model_dir, "--no-merge"]
    r = smolora(*args, "--max-steps", 2, "--save-steps", 1, env={**env, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(
        r"\[smolora\] CPU threads: 1 \((idle ones sleep|OpenMP's default wait: the CPUs were idle at the start)\); ",
        r.stdout,
    )
    r = smolora(*args, "--max-steps", 2, "--resume", env={**env, "OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "passive"})
    assert r.returncode == 0 and "[smolora] CPU threads: 1 (idle ones sleep)" in r.stdout, r.stderr[-2000:]
    r = smolora(
        *args, "--max-steps", 1, "--overwrite", env={**env, "OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "active"}
    )
    assert r.returncode == 0 and "[smolora] CPU threads: 2 (idle ones spin)" in r.stdout, r.stderr[-2000:]


@pytest.mark.parametrize("load, chosen", [(0.1, {}), (1.7, {"OMP_WAIT_POLICY": "PASSIVE"})])
def test_idle_threads_sleep_at_once_on_a_busy_machine_and_wait_as_openmp_does_on_an_idle_one(monkeypatch, load, chosen):
    from smolora.fast import threads

    monkeypatch.delitem(sys.modules, "torch")  # as before the command imports it
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(name, raising=False)
    threads.calm_openmp(load)
    assert {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ} == chosen
    monkeypatch.setenv("OMP_WAIT_POLICY", "active")
    threads.calm_openmp(load)  # the user's choice stands
    assert os.environ["OMP_WAIT_POLICY"] == "active"


def _file_size_limit(limit: int):
    """For a child process: no file may grow past ``limit`` bytes (a write past it fails with EFBIG).
    A full disk's stand-in that needs no privileges."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def _temporaries(folder) -> list[str]:
    return [p.name for p in folder.rglob(".*") if p.name != ".smolora.lock"]


def test_a_full_disk_in_checkpoint_merge_or_export_ends_in_one_line_and_leaves_no_partial_file(
    tmp_path, tiny_model_dir, data_file
):
    full = _file_size_limit(16 * 1024)  # a tiny model's adapter and checkpoint files are larger
    done = tmp_path / "done"
    train = ["train", "--data", data_file, "--model", tiny_model_dir, "--max-steps", 2, "--no-merge"]
    assert smolora(*train, "--output", done).returncode == 0
    out = tmp_path / "run"
    line = one_error_line(smolora(*train, "--output", out, "--save-steps", 1, preexec_fn=full))
    assert (
        f"{out / 'checkpoints' / 'step-000001'}: could not write the checkpoint" in line
        and "there is no earlier" in line
    )
    assert not any((out / "checkpoints").iterdir()) and not (out / "adapter_checkpoint").exists()
    merged = tmp_path / "merged"
    line = one_error_line(
        smolora("merge", "--adapter", done / "adapter_checkpoint", "--output", merged, preexec_fn=full)
    )
    assert str(merged) in line and not merged.exists()
    gguf = tmp_path / "model.gguf"
    line = one_error_line(
        smolora("export", "--model", tiny_model_dir, "--output", gguf, "--type", "f16", preexec_fn=full)
    )
    assert str(gguf) in line and not gguf.exists()
    assert _temporaries(tmp_path) == []


def _with_template(folder, template):
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return folder


@pytest.mark.parametrize(
    "template, said",
    [
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe"),  # reaches into Python: the sandbox stops it
        ("{% for i in range(10**9) %}x{% endfor %}", "Range too big"),  # a loop without bound
        ("{{ messages[0]['content'] ", "unexpected end of template"),  # not a template
        ("{{ raise_exception('no system turns here') }}", "no system turns here"),  # the template's own refusal
    ],
)
def test_a_hostile_or_broken_chat_template_is_one_line_in_train_and_generate(
    tmp_path, tiny_model_dir, data_file, template, said
):
    model = _with_template(tiny_model_dir, template)
    out = tmp_path / "run"
    line = one_error_line(smolora("train", "--data", data_file, "--model", model, "--output", out, "--max-steps", 1))
    assert line.startswith(f"smolora: error: {data_file}:1: the model's chat template") and said in line
    assert not out.exists() or listing(out) == []
    line = one_error_line(smolora("generate", "--model", model, "--prompt", "hi", "--max-new-tokens", 2))
    assert "the model's chat template" in line and said in line


def test_a_model_that_asks_for_its_own_code_never_runs_it_and_every_command_says_so(
    tmp_path, tiny_model_dir, data_file
):
    ran = tmp_path / "custom code ran"
    config = json.loads((tiny_model_dir / "config.json").read_text())
    auto_map = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    config.update(model_type="not_a_known_type", architectures=["XForCausalLM"], auto_map=auto_map)
    (tiny_model_dir / "config.json").write_text(json.dumps(config))
    for name in ("configuration_x.py", "modeling_x.py"):
        (tiny_model_dir / name).write_text(f"open({str(ran)!r}, 'w').write('ran')\n")
    commands = [
        ["train", "--data", data_file, "--output", tmp_path / "run", "--max-steps", 1],
        ["generate", "--prompt", "hi"],
        ["eval", "--data", data_file],
        ["export", "--output", tmp_path / "model.gguf"],
    ]
    for command in commands:
        line = one_error_line(smolora(*command, "--model", tiny_model_dir))
        assert "needs its own code (auto_map in config.json)" in line and "--trust-remote-code" in line
    assert not ran.exists() and not (tmp_path / "model.gguf").exists()


def test_a_truncated_or_garbage_gguf_as_model_is_one_line(tmp_path, tiny_model_dir, data_file):
    whole = tmp_path / "whole.gguf"
    assert smolora("export", "--model", tiny_model_dir, "--output", whole, "--type", "f16").returncode == 0
    data = whole.read_bytes()
    broken = {
        "half.gguf": data[: len(data) // 2],
        "header.gguf": data[:8],
        "garbage.gguf": b"GGUF" + os.urandom(4096),
        "not.gguf": os.urandom(4096),
    }
    env = {**ENV, "SMOLORA_HOME": str(tmp_path / "home")}
    for name, content in broken.items():
        (tmp_path / name).write_bytes(content)
        for command in (["generate", "--prompt", "hi"], ["train", "--data", data_file, "--output", tmp_path / "run"]):
            line = one_error_line(smolora(*command, "--model", tmp_path / name, env=env))
            assert f"{tmp_path / name}: " in line and ("cannot read it as a model" in line or "not a GGUF file" in line)
    assert not (tmp_path / "run").exists()
    assert not list((tmp_path / "home").rglob("model.safetensors"))  # no conversion left behind


@pytest.mark.parametrize(
    "record, said",
    [
        ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}, "must be a string"),
        ({"body": "no text field"}, "record has no 'text' field"),
        ({"prompt": "a question and no answer"}, "no 'completion' field"),
        ({"messages": []}, "messages must be a non-empty list"),
    ],
)
def test_bad_data_is_reported_before_the_embedded_model_is_converted(tmp_path, data_file, record, said):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(data_file.read_text() + json.dumps(record) + "\n")
    env = {**ENV, "SMOLORA_HOME": str(tmp_path / "fresh home")}  # nothing converted yet
    for command in (["train", "--output", tmp_path / "run"], ["eval"]):
        line = one_error_line(smolora(*command, "--data", bad, env=env, timeout=60))
        assert f"{bad}:13: " in line and said in line
    assert not (tmp_path / "fresh home").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "line, said",
    [
        (
            '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}",
            "train.jsonl:13: JSON this reader refuses (arrays or objects",
        ),
        ('{"text": "a", "n": ' + "7" * 6000 + "}", "train.jsonl:13: JSON this reader refuses (a number with too many"),
    ],
)
def test_json_beyond_what_the_parser_takes_is_one_line_at_its_line(tmp_path, tiny_model_dir, data_file, line, said):
    data_file.write_text(data_file.read_text() + line + "\n")
    r = smolora("train", "--data", data_file, "--output", tmp_path / "run", "--model", tiny_model_dir)
    assert said in one_error_line(r) and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "flags, said",
    [
        (["--r", str(2**31)], "r must be in [1, 65536]"),
        (["--r", str(10**20)], "r must be in [1, 65536]"),
        (["--grow-rank", f"16,{2**31}", "--max-steps", 3], "up to 65536"),
        (["--task-prefix", "{0} "], "task_prefix may hold {task} and no other"),
        (["--task-prefix", "{task.x} "], "task_prefix may hold {task} and no other"),
    ],
)
def test_settings_that_would_fail_deep_inside_are_refused_up_front(tmp_path, tiny_model_dir, data_file, flags, said):
    r = smolora("train", "--data", data_file, "--output", tmp_path / "run", "--model", tiny_model_dir, *flags)
    assert said in one_error_line(r) and not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory, tiny_model_dir_session):
    root = tmp_path_factory.mktemp("adapter")
    data = write_jsonl(root / "train.jsonl", chat_records(12))
    args = ["--data", data, "--model", tiny_model_dir_session, "--max-steps", 1, "--no-merge", "--output", root / "run"]
    assert smolora("train", *args).returncode == 0
    return root / "run" / "adapter_checkpoint"


def _adapter_config(folder, **changes):
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize(
    "harm, names",
    [
        (lambda a: _truncate(a / "adapter_model.safetensors"), "adapter_model.safetensors"),
        (
            lambda a: (a / "adapter_model.safetensors").write_bytes(b"\x10\x00" + b"\xff" * 64),
            "adapter_model.safetensors",
        ),
        (lambda a: _adapter_config(a, peft_type="NOPE"), "adapter_config.json"),
        (lambda a: _adapter_config(a, r=0), "adapter_config.json"),
    ],
)
def test_a_damaged_adapter_is_one_line_naming_its_file_in_merge_generate_and_export(
    tmp_path, trained_adapter, harm, names
):
    adapter = tmp_path / "adapter"
    shutil.copytree(trained_adapter, adapter)
    harm(adapter)
    commands = [
        ["merge", "--output", tmp_path / "merged"],
        ["generate", "--prompt", "hi", "--max-new-tokens", 2],
        ["export", "--output", tmp_path / "m.gguf"],
    ]
    for command in commands:
        line = one_error_line(smolora(*command, "--adapter", adapter))
        assert str(adapter / names) in line, line
    assert not (tmp_path / "merged").exists()
    assert not (tmp_path / "m.gguf").exists() and _temporaries(tmp_path) == []


def test_eval_json_through_a_symlink_is_refused_and_its_target_untouched(tmp_path, tiny_model_dir, data_file):
    victim = tmp_path / "elsewhere.txt"
    victim.write_text("keep me\n")
    (tmp_path / "results.json").symlink_to(victim)
    r = smolora("eval", "--data", data_file, "--model", tiny_model_dir, "--json", tmp_path / "results.json")
    assert "is a symbolic link" in one_error_line(r) and victim.read_text() == "keep me\n"


def test_sampling_settings_that_overflow_or_never_end_are_refused_or_bounded(tmp_path, tiny_model_dir):
    line = one_error_line(smolora("generate", "--model", tiny_model_dir, "--prompt", "hi", "--temperature", "1e-320"))
    assert "temperature must be a number >= 1e-06 when sampling (got 1e-320)" in line
    r = smolora(
        "generate", "--model", tiny_model_dir, "--prompt", "hi", "--max-new-tokens", 10**9, "--greedy", timeout=120
    )
    assert r.returncode == 0 and "max_new_tokens cut to" in r.stdout and "the model's context is 256 tokens" in r.stdout


def test_a_chat_template_that_runs_without_bound_is_stopped_by_a_time_limit(tmp_path, tiny_model_dir, data_file):
    model = _with_template(
        tiny_model_dir, "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}"
    )
    started = time.monotonic()
    line = one_error_line(smolora("train", "--data", data_file, "--model", model, "--output", tmp_path / "run"))
    assert "the model's chat template fails (TimeoutError: took over 10 s)" in line
    assert time.monotonic() - started < 60 and not (tmp_path / "run").exists()


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_payload_never_runs_even_with_allow_pickle(tmp_path, tiny_model_dir, data_file):
    (tiny_model_dir / "model.safetensors").unlink()
    marker = tmp_path / "payload ran"
    torch.save({"model.embed_tokens.weight": _Payload(marker)}, tiny_model_dir / "pytorch_model.bin")
    train = ["train", "--data", data_file, "--model", tiny_model_dir, "--output", tmp_path / "run"]
    assert "weights are pickled" in one_error_line(smolora(*train))
    line = one_error_line(smolora(*train, "--allow-pickle"))
    assert f"{tiny_model_dir}: cannot load the model (UnpicklingError" in line
    assert not marker.exists() and not (tmp_path / "run" / "adapter_checkpoint").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: through the 16-bit weights' cache
def test_a_truncated_model_file_is_one_line_naming_the_model(tmp_path, tiny_model_dir, data_file, dtype):
    from safetensors.torch import load_file, save_file

    weights = tiny_model_dir / "model.safetensors"
    save_file({k: v.to(dtype) for k, v in load_file(str(weights)).items()}, str(weights), metadata={"format": "pt"})
    _truncate(weights)
    env = {**ENV, "SMOLORA_HOME": str(tmp_path / "home")}
    line = one_error_line(
        smolora("train", "--data", data_file, "--model", tiny_model_dir, "--output", tmp_path / "run", env=env)
    )
    assert f"{tiny_model_dir / 'model.safetensors'}: cannot load the model (SafetensorError" in line
    assert not (tmp_path / "run" / "adapter_checkpoint").exists()
