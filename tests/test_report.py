"""The run report: loss.png drawn by every run, `smolora report` and `--compare` in real subprocesses,
bad input, TensorBoard. The pictures are read back as images and looked at (size, colours)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import build_tiny_llama, build_tokenizer, chat_records, write_jsonl

ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def smolora(*args, env=ENV, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "smolora.cli", *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished runs on a tiny model: one with a validation split, rank growth and a mid-run
    checkpoint, one plain with another learning rate."""
    root = tmp_path_factory.mktemp("report")
    tokenizer = build_tokenizer()
    build_tiny_llama(len(tokenizer)).save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    data = write_jsonl(root / "train.jsonl", chat_records(24))
    common = ["--data", data, "--model", root / "tiny", "--max-steps", 6, "--gradient-accumulation-steps", 2]
    common += ["--no-merge", "--target-modules", "q_proj,v_proj"]
    first = smolora(
        "train", *common, "--output", root / "a", "--r", 4, "--grow-rank", 8, "--val-size", 4, "--eval-steps", 2,
        "--logging-steps", 1, "--save-steps", 3, "--learning-rate", 1e-2,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr[-2000:]
    from smolora.cli import main  # the second in this process: the same command, without a Python start-up

    assert main(["train", *map(str, common), "--output", str(root / "b"), "--r", "4", "--logging-steps", "2",
                 "--learning-rate", "3e-2", "--quiet"]) == 0  # fmt: skip
    return root


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def look_at(path: Path, size=(500, 900)) -> np.ndarray:
    """The PNG read back by matplotlib's reader: the expected size, not blank, with the plot's colours."""
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.shape[:2] == size
    rgb = image[..., :3]
    assert rgb.std() > 0.05  # not one flat colour
    blue = (np.abs(rgb - np.array([0x1F, 0x77, 0xB4]) / 255).sum(-1) < 0.1).sum()  # tab:blue, the training loss
    assert blue > 200
    return rgb


def test_every_run_draws_its_curves(runs):
    a = runs / "a"
    rgb = look_at(a / "loss.png")
    orange = (np.abs(rgb - np.array([0xFF, 0x7F, 0x0E]) / 255).sum(-1) < 0.1).sum()  # the validation loss
    purple = (np.abs(rgb - np.array([0x94, 0x67, 0xBD]) / 255).sum(-1) < 0.1).sum()  # the rank growth line
    assert orange > 100 and purple > 20
    assert not (runs / "b" / "loss.png").with_suffix(".png.tmp").exists()
    plain = look_at(runs / "b" / "loss.png")
    assert (np.abs(plain - np.array([0xFF, 0x7F, 0x0E]) / 255).sum(-1) < 0.1).sum() == 0  # no validation: no orange
    closing = metrics(a)[-1]
    assert closing["step"] == 6 and closing["train_examples"] == 20 and closing["val_examples"] == 4
    assert closing["tokens"] > 0 and closing["run_seconds"] > 0 and closing["peak_rss_mib"] > 50


def test_report_prints_the_run_and_redraws(runs):
    a = runs / "a"
    (a / "loss.png").unlink()
    r = smolora("report", a)
    assert r.returncode == 0, r.stderr
    evals = {e["step"]: e["eval_loss"] for e in metrics(a) if "eval_loss" in e}
    best_step = min(evals, key=evals.get)
    out = r.stdout
    assert f"validation loss: best {evals[best_step]:.4f} at step {best_step}" in out
    assert "LoRA r 4, grown to 8" in out and "targets q_proj,v_proj" in out and "lr 0.01 linear" in out
    assert "data: 20 training examples, 4 validation" in out
    assert "tokens/s; peak RSS" in out and "files: adapter_checkpoint, checkpoints/step-000006" in out
    assert len(out.splitlines()) <= 8
    look_at(a / "loss.png")


def test_report_compare_overlays_runs(runs, tmp_path):
    picture = tmp_path / "both.png"
    r = smolora("report", runs / "a", "--compare", runs / "b", "--plot", picture)
    assert r.returncode == 0, r.stderr
    table = r.stdout.splitlines()
    assert table[0].split()[:3] == ["run", "steps", "last", "loss"][:3]
    last_b = [e["loss"] for e in metrics(runs / "b") if "loss" in e][-1]
    assert table[2].split()[:3] == ["b", "6", f"{last_b:.4f}"]
    assert "differs: learning_rate: a=0.01 | b=0.03" in r.stdout and "differs: grow_rank: a=[8] | b=[]" in r.stdout
    rgb = look_at(picture)
    orange = (np.abs(rgb - np.array([0xFF, 0x7F, 0x0E]) / 255).sum(-1) < 0.1).sum()  # the second run's colour
    assert orange > 200


def test_report_bad_input_is_one_line(runs, tmp_path, capsys):
    from smolora.cli import main

    r = smolora("report", runs / "a", "--compare", tmp_path / "nowhere")
    assert r.returncode == 2 and r.stderr == (
        f"smolora: error: {tmp_path / 'nowhere'}: not a run folder (no such folder)\n"
    )
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\nnot json\n{"step": 2, "loss": 1.0}\n')
    for folder, expected in [(tmp_path, "metrics.jsonl: not found"), (broken, "metrics.jsonl:2: not a metrics line")]:
        assert main(["report", str(folder)]) == 2
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1, err


def test_a_torn_last_line_and_a_resume_are_read(tmp_path):
    from smolora.report import read_curves

    lines = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "loss": 2.4}]
    lines.append({"step": 3, "eval_loss": 2.0})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines) + '{"step": 4, "lo')
    curves = read_curves(tmp_path)
    assert curves.train == {1: 3.0, 2: 2.4} and curves.eval == {3: 2.0} and curves.best_eval() == (3, 2.0)


def test_a_failed_drawing_is_one_warning(tmp_path, said):
    from smolora.report import draw_safely

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "learning_rate": 0.001}\n')
    (tmp_path / "loss.png").mkdir()  # a folder where the picture goes: it cannot be written
    assert draw_safely(tmp_path) is None and draw_safely(tmp_path) is None
    warnings = [line for line in said if "warning" in line]
    assert len(warnings) == 1 and "loss.png: not drawn" in warnings[0]


def test_tensorboard_without_the_package_is_one_line(runs, tmp_path, capsys, monkeypatch):
    from smolora.cli import main

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as where it is not installed: import fails
    common = ["--data", str(runs / "train.jsonl"), "--model", str(runs / "tiny"), "--max-steps", "2"]
    assert main(["train", *common, "--output", str(tmp_path / "tb"), "--report-to", "tensorboard"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--report-to tensorboard: the tensorboard package is not" in err
    assert not (tmp_path / "tb").exists()  # refused before anything was written


def test_tensorboard_events_hold_the_metrics(runs, tmp_path):
    pytest.importorskip("tensorboard")  # optional: not a SmoLoRA dependency
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (tmp_path / "tb" / "tensorboard").mkdir(parents=True)  # an earlier run's, which --overwrite replaces
    (tmp_path / "tb" / "tensorboard" / "events.out.tfevents.0.old").write_bytes(b"")
    (tmp_path / "tb" / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    from smolora.cli import main  # in this process: the CLI's train runs in subprocesses above

    common = ["--data", runs / "train.jsonl", "--model", runs / "tiny", "--max-steps", 3, "--no-merge", "--overwrite"]
    common += ["--output", tmp_path / "tb", "--report-to", "tensorboard", "--logging-steps", 1, "--quiet"]
    assert main(["train", *map(str, common)]) == 0
    assert not (tmp_path / "tb" / "tensorboard" / "events.out.tfevents.0.old").exists()
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    events.Reload()
    logged = metrics(tmp_path / "tb")
    assert [(e.step, round(e.value, 4)) for e in events.Scalars("train/loss")] == [
        (m["step"], m["loss"]) for m in logged if "loss" in m
    ]
    assert events.Scalars("run/run_tokens_per_s")[0].value == pytest.approx(logged[-1]["run_tokens_per_s"])


def test_a_stopped_run_has_its_picture_as_of_its_last_checkpoint(runs, tmp_path, capsys):
    """SIGTERM mid-run: the checkpoint it writes draws loss.png; the report says the run has not finished."""
    import signal
    import time

    out = tmp_path / "stopped"
    common = ["--data", runs / "train.jsonl", "--model", runs / "tiny", "--max-steps", 100000, "--save-steps", 2]
    process = subprocess.Popen(
        [sys.executable, "-m", "smolora.cli", "train", *map(str, common), "--output", str(out), "--logging-steps", "1",
         "--gradient-accumulation-steps", "1", "--no-merge"],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoints" / "step-000002").is_dir():
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    look_at(out / "loss.png")
    assert not any("run_seconds" in m for m in metrics(out))
    from smolora.cli import main

    assert main(["report", str(out)]) == 0
    assert "time: the run has not finished" in capsys.readouterr().out


def test_eval_against_the_base(runs, tmp_path, capsys):
    """Both columns are what `eval` gives each model alone; the replies side by side are each model's."""
    from smolora.cli import main

    adapter, data = runs / "a" / "adapter_checkpoint", runs / "train.jsonl"
    common = ["eval", "--data", str(data), "--max-new-tokens", "4", "--exact-match", "--quiet"]
    assert main([*common, "--model", str(runs / "tiny"), "--json", str(tmp_path / "base.json")]) == 0
    assert main([*common, "--adapter", str(adapter), "--json", str(tmp_path / "tuned.json")]) == 0
    capsys.readouterr()
    r = smolora(*common, "--adapter", adapter, "--compare-base", "--samples", 2, "--json", tmp_path / "both.json")
    assert r.returncode == 0, r.stderr[-2000:]
    both = json.loads((tmp_path / "both.json").read_text())
    assert both["base"] == json.loads((tmp_path / "base.json").read_text())
    assert both["fine_tuned"] == json.loads((tmp_path / "tuned.json").read_text())
    assert both["base"]["loss"] != both["fine_tuned"]["loss"] and len(both["samples"]) == 2
    assert both["samples"][0]["expected"] == "0" and "what is 0 plus 0?" in both["samples"][0]["prompt"]
    rows = {line.split()[0]: line.split()[1:3] for line in r.stdout.splitlines()[2:5]}
    assert rows["loss"] == [f"{both['base']['loss']:.4f}", f"{both['fine_tuned']['loss']:.4f}"]
    assert rows["exact"][0] == "match" and "example 2:" in r.stdout and "  fine-tuned: " in r.stdout
    assert main(["eval", "--data", str(data), "--model", str(runs / "tiny"), "--compare-base"]) == 2
    assert "--compare-base: which base?" in capsys.readouterr().err
