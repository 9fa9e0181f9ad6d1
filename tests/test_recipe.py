"""Recipes: YAML settings read and checked by key and line, flags over the file, every run's
OUTPUT/config.yaml repeating it exactly, `smolora init` drafting one from the data, configs/."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from conftest import chat_records, write_jsonl
from smolora.cli import main, make_parser
from smolora.config import DataConfig, LoraSettings, TrainConfig, validate
from smolora.errors import SmoLoRAError
from smolora.recipe import (
    KEYS,
    SECTIONS,
    _Loader,
    apply_recipe,
    check_settings,
    init_recipe_text,
    load_recipe,
    look_at_data,
    suggest,
    write_init_recipe,
)

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def smolora(*args, cwd=None, env=ENV) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "smolora.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=cwd,
    )


def recipe(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_recipe_is_read_as_the_settings_types(tmp_path):
    got = load_recipe(
        recipe(
            tmp_path,
            "# comments are fine\n"
            "learning_rate: 1e-3            # a number, though YAML 1.1 reads 1e-3 as text\n"
            "lora_alpha: 32                 # a whole number where a float goes\n"
            "r: 16\n"
            "target_modules: q_proj, v_proj # the flag's comma form\n"
            "grow_rank: [32, 64]\n"
            "field_map: {prompt: question}\n"
            "system_prompt: null\n"
            "packing: false\n"
            "output_dir: out/a              # TrainConfig's name for output\n"
            "data:\n"
            "  dates: d.jsonl\n"
            "  chat: {path: c.jsonl, weight: 2}\n",
        )
    )
    assert got.values == {
        "learning_rate": 1e-3,
        "lora_alpha": 32.0,
        "r": 16,
        "target_modules": ["q_proj", "v_proj"],
        "grow_rank": [32, 64],
        "field_map": {"prompt": "question"},
        "system_prompt": None,
        "packing": False,
        "output": "out/a",
        "data": {"dates": ("d.jsonl", 1.0), "chat": ("c.jsonl", 2.0)},
    }
    assert type(got.values["learning_rate"]) is float and got.lines["r"] == 4 and got.lines["data"] == 11
    assert load_recipe(recipe(tmp_path, "# nothing but a comment\n", "empty.yaml")).values == {}


@pytest.mark.parametrize(
    "text, message",
    [
        ("r: 8\nlearnin_rate: 0.1\n", "recipe.yaml:2: unknown key 'learnin_rate'; did you mean 'learning_rate'?"),
        ("max-steps: 3\n", "recipe.yaml:1: unknown key 'max-steps'; did you mean 'max_steps'?"),
        ("flux_capacitor: 3\n", "recipe.yaml:1: unknown key 'flux_capacitor'; `smolora init` writes a recipe"),
        ("\n\nmax_steps: '40'\n", "recipe.yaml:3: max_steps: expected a whole number (got '40')"),
        ("learning_rate: fast\n", "recipe.yaml:1: learning_rate: expected a number (got 'fast')"),
        ("max_steps: 2.5\n", "recipe.yaml:1: max_steps: expected a whole number (got 2.5)"),
        ("r: true\n", "recipe.yaml:1: r: expected a whole number (got True)"),
        ("packing: 1\n", "recipe.yaml:1: packing: expected true or false (got 1)"),
        ("device: 0\n", "recipe.yaml:1: device: expected text (got 0)"),
        ("grow_rank: [8, x]\n", "recipe.yaml:1: grow_rank: expected a list of whole numbers"),
        ("target_modules: {q: 1}\n", "recipe.yaml:1: target_modules: expected a list of names"),
        ("field_map: [a]\n", "recipe.yaml:1: field_map: expected a mapping NAME: FIELD"),
        ("data: 3\n", "recipe.yaml:1: data: expected a path, or a mapping TASK: PATH"),
        ("data: {a: {path: x, weight: -1}}\n", "recipe.yaml:1: data: expected task 'a' to have a positive weight"),
        ("report_to: wandb\n", "recipe.yaml:1: report_to: expected none or tensorboard (got 'wandb')"),
        ("allow_pickle: true\n", "recipe.yaml:1: allow_pickle is not a recipe key: it is said each time, as --allow"),
        ("r: 4\nr: 8\n", "recipe.yaml:2: r is given twice (first on line 1)"),
        ("output: a\noutput_dir: b\n", "recipe.yaml:2: output_dir is given twice (first on line 1)"),
        ("r: 4\n  lora_alpha: 8\n", "recipe.yaml:2: not valid YAML"),
        ("- r\n- 8\n", "recipe.yaml:1: a recipe is a mapping of settings"),
        ("r: 4\n---\nr: 8\n", "recipe.yaml:2: not valid YAML (expected a single document"),
    ],
)
def test_a_bad_recipe_is_one_line_naming_the_key_and_its_line(tmp_path, text, message):
    with pytest.raises(SmoLoRAError) as e:
        load_recipe(recipe(tmp_path, text))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_missing_or_binary_recipe_is_one_line(tmp_path):
    with pytest.raises(SmoLoRAError, match="recipe file does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    (tmp_path / "bin.yaml").write_bytes(b"r: \xff\xfe\n")
    with pytest.raises(SmoLoRAError, match="not UTF-8"):
        load_recipe(tmp_path / "bin.yaml")


def parsed(*argv: str):
    return make_parser().parse_args(["train", *argv])


def test_flags_given_win_over_the_recipe_and_the_rest_comes_from_it(tmp_path):
    path = recipe(
        tmp_path,
        "data: from_recipe.jsonl\noutput: out/recipe\nmax_steps: 40\nlearning_rate: 1e-3\nr: 16\npacking: false\n",
    )
    args = parsed("--config", str(path), "--max-steps", "5", "--packing", "--output-dir", "out/flag")
    got = apply_recipe(args)
    assert (args.max_steps, args.learning_rate, args.r, args.packing) == (5, 1e-3, 16, True)
    assert args.output_dir == "out/flag" and args.output is None  # --output-dir is --output: the flag wins
    assert got.data == "from_recipe.jsonl" and got.applied == {"data", "learning_rate", "r"}
    args = parsed("--config", str(path), "--data", "flag.jsonl")
    got = apply_recipe(args)
    assert args.output == "out/recipe" and "data" not in got.applied
    assert apply_recipe(parsed("--data", "x.jsonl")) is None  # no --config: nothing changes


def test_a_bad_value_is_named_by_its_line_a_flags_by_itself(tmp_path):
    path = recipe(tmp_path, "data: d.jsonl\nr: 0\nlora_dropout: 0.5\nshape: tabular\n")
    args = parsed("--config", str(path), "--max-steps", "0")
    got = apply_recipe(args)
    build = lambda cls: cls(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name) is not None}
    )  # noqa: E731
    with pytest.raises(SmoLoRAError) as e:
        check_settings(got, build(LoraSettings), build(TrainConfig), build(DataConfig))
    message = str(e.value)
    assert f"{path}:2: r must be in [1, 65536] (got 0)" in message
    assert f"{path}:4: shape must be auto" in message
    assert "; max_steps must be > 0" in message and f"{path}:3" not in message


def test_bad_recipes_through_the_command_exit_2_with_one_line(tmp_path, capsys):
    typo = recipe(tmp_path, "data: d.jsonl\nmax_steps: 3\nlearning_rte: 0.001\n", "typo.yaml")
    r = smolora("train", "--config", typo)  # the command itself, in its own process
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"smolora: error: {typo}:3: unknown key 'learning_rte'; did you mean 'learning_rate'?"
    ]
    text = recipe(tmp_path, "data: d.jsonl\nmax_steps: three\n", "text.yaml")
    assert main(["train", "--config", str(text), "--max-steps", "3"]) == 2  # a flag given does not excuse the file
    assert capsys.readouterr().err.strip().splitlines() == [
        f"smolora: error: {text}:2: max_steps: expected a whole number (got 'three')"
    ]


def test_no_data_anywhere_is_one_line(tmp_path, capsys):
    assert main(["train", "--config", str(recipe(tmp_path, "max_steps: 3\n"))]) == 2
    assert "no training data: pass --data PATH" in capsys.readouterr().err


def losses(out: Path) -> list[tuple[int, float]]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(m["step"], m["loss"]) for m in lines if "loss" in m and "step" in m]


def test_init_train_with_overrides_then_repeat_from_config_yaml(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """A user's loop: `init` on the data, `train --config` with flags over it, then `train --config
    OUTPUT/config.yaml` from elsewhere: the same losses and the same adapter."""
    first = tmp_path / "first" / "out"
    first.parent.mkdir()
    write_jsonl(first.parent / "train.jsonl", chat_records(24))
    monkeypatch.chdir(first.parent)
    assert main(["init", "--data", "train.jsonl", "--model", str(tiny_model_dir)]) == 0  # ./recipe.yaml
    drafted = load_recipe(first.parent / "recipe.yaml").values
    assert drafted["data"] == "train.jsonl" and drafted["task"] == "capability" and drafted["max_length"] == 64
    env = {**ENV, "OMP_NUM_THREADS": "1"}  # the GEMM: whichever the first run's timing picks
    flags = ["--max-steps", 4, "--gradient-accumulation-steps", 2, "--learning-rate", "3e-3", "--val-size", 4]
    flags += ["--target-modules", "q_proj,v_proj,o_proj", "--lr-scheduler-type", "cosine", "--logging-steps", 1]
    flags += ["--system-prompt", "be brief", "--no-merge", "--output", "out"]
    r = smolora("train", "--config", "recipe.yaml", *flags, cwd=first.parent, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    saved = load_recipe(first / "config.yaml").values
    assert saved["data"] == str(first.parent / "train.jsonl") and saved["output"] == str(first)  # absolute
    assert saved["model"] == str(tiny_model_dir) and saved["max_length"] == 64  # from the recipe
    assert (saved["r"], saved["lora_alpha"]) == (16, 32.0)  # the task's rank, saved as such
    assert (saved["max_steps"], saved["learning_rate"], saved["system_prompt"]) == (4, 3e-3, "be brief")  # flags

    # the comment names the sums that repeat it bit for bit: the GEMM the first run timed, its threads
    note = re.search(
        r"(SMOLORA_GEMM)=(\w+) (OMP_NUM_THREADS)=(\d+) before the command", (first / "config.yaml").read_text()
    )
    assert note and note[4] == "1", (first / "config.yaml").read_text()[:600]
    env = {**ENV, note[1]: note[2], note[3]: note[4]}
    second = tmp_path / "second"
    again = smolora("train", "--config", first / "config.yaml", "--output", second, "--no-merge", cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert len(losses(first)) == 4 and losses(second) == losses(first)
    a = load_file(first / "adapter_checkpoint" / "adapter_model.safetensors")
    b = load_file(second / "adapter_checkpoint" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert (second / "config.yaml").read_text() == (first / "config.yaml").read_text().replace(str(first), str(second))

    # the same output folder again: refused without --overwrite (or --resume), before anything loads
    assert main(["train", "--config", str(first / "config.yaml")]) == 2
    assert "holds an earlier run" in capsys.readouterr().err


def test_every_setting_round_trips_through_the_recipe_text(tmp_path, said):
    """What a run writes reads back as the same values, for values YAML could mistake for others."""
    from smolora.recipe import run_recipe
    from smolora.run import Run

    odd = TrainConfig(output_dir=str(tmp_path / "o"), learning_rate=1e-12, grow_rank=[16, 32])
    data = DataConfig(
        max_length=77, system_prompt="yes", task_prefix="[{task}]: ", field_map={"prompt": "1e3"}, shape="chat"
    )
    lora = LoraSettings(r=4, lora_alpha=7.5, target_modules=["q_proj", "o_proj"])
    run = Run("some/hub-id", str(tmp_path / "missing.jsonl"), lora.to_peft(), odd, data)
    path = recipe(tmp_path, run_recipe(run), "config.yaml")
    values = load_recipe(path).values
    for cls, obj in ((TrainConfig, odd), (DataConfig, data), (LoraSettings, lora)):
        for f in dataclasses.fields(cls):
            if f.name != "output_dir":
                want = getattr(obj, f.name)
                assert values[f.name] == (sorted(want) if f.name == "target_modules" else want), f.name
    assert values["model"] == "some/hub-id" and values["output"] == str(tmp_path / "o")

    run.dataset = {"dates": (str(tmp_path / "config.yaml"), 2.0), "chat": "chat.jsonl"}  # tasks to mix
    mixed = load_recipe(recipe(tmp_path, run_recipe(run), "mixed.yaml")).values["data"]
    assert mixed == {"dates": (str(tmp_path / "config.yaml"), 2.0), "chat": ("chat.jsonl", 1.0)}
    run.dataset = [{"text": "records given in Python"}]  # no file to name: said, and --data needed to rerun
    run.peft_config.layers_to_transform = [0]  # a LoraConfig field with no recipe key: said, in the file and aloud
    text = run_recipe(run)
    assert "data: null" in text and "pass --data to rerun" in text
    assert (
        "# set through the Python API, not recipe keys (a rerun uses their defaults): layers_to_transform=[0]" in text
    )
    assert any("layers_to_transform=[0] set through the Python API have no recipe key" in line for line in said)


def test_init_writes_every_key_with_its_help_and_default(tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    assert main(["init", str(path)]) == 0
    text = path.read_text()
    values = load_recipe(path).values
    assert set(values) == set(KEYS) and values["data"] is None
    for _, cls in SECTIONS:
        for f in dataclasses.fields(cls):
            if f.name != "output_dir":
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                assert values[f.name] == default, f.name
                assert f.metadata["help"].split()[0] in text
    assert "# peak learning rate (default: 0.0002)\nlearning_rate: 0.0002\n" in text
    # not over an existing file, unless asked
    path.write_text("mine\n")
    assert main(["init", str(path)]) == 2 and "exists; pass --overwrite" in capsys.readouterr().err
    assert path.read_text() == "mine\n"
    assert main(["init", str(path), "--overwrite"]) == 0 and load_recipe(path).values == values


def test_init_looks_at_the_data_and_says_why(tmp_path, tiny_model_dir, tokenizer):
    many = [
        {"messages": [{"role": "user", "content": f"say {i} twice"}, {"role": "assistant", "content": f"{i} {i}"}]}
        for i in range(300)
    ]
    data = write_jsonl(tmp_path / "many.jsonl", many)
    look = look_at_data(str(data), str(tiny_model_dir))
    assert look.records == 300 and look.shapes == {"chat": 300} and len(look.lengths) == 300
    assert look.lengths[-1] == max(
        len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"]) for r in many
    )
    got = suggest(look)
    assert got["val_size"][0] == 30 and got["max_steps"][0] == math.ceil(3 * 270 / 8)
    assert got["max_length"][0] % 64 == 0 and got["max_length"][0] >= look.percentile(0.99)
    assert got["eval_steps"][0] == got["max_steps"][0] // 5

    path = tmp_path / "fitted.yaml"
    assert main(["init", str(path), "--data", str(data), "--model", str(tiny_model_dir)]) == 0
    text, values = path.read_text(), load_recipe(path).values
    assert values["data"] == str(data) and values["model"] == str(tiny_model_dir)
    assert (values["max_steps"], values["val_size"], values["max_length"]) == (102, 30.0, got["max_length"][0])
    assert "# suggested: about 3 epochs: 3 x 270 training records / 8 per step" in text
    assert "replies are short (median" in text  # a skill to learn: the higher rank, 16 (alpha 32)
    # the task picks r and alpha: they are left to it (commented out)
    assert values["task"] == "capability" and "r" not in values and "lora_alpha" not in values
    assert "# r: 8   (the task picks it; uncomment to choose it yourself)" in text
    assert f"smolora train --config {path}\n" in text
    validate(
        LoraSettings(),
        TrainConfig(**{k: values[k] for k in ("max_steps", "val_size")}),
        DataConfig(max_length=values["max_length"]),
    )

    few = write_jsonl(tmp_path / "few.txt.jsonl", [{"text": f"line {i} of a field manual"} for i in range(40)])
    fitted = init_recipe_text(str(few), None, look_at_data(str(few), str(tiny_model_dir)))
    few_values = yaml.load(fitted, Loader=_Loader)
    assert few_values["val_size"] == 0 and few_values["max_steps"] == 15 and "fewer than 200" in fitted
    assert few_values["task"] == "domain"


def test_init_refuses_bad_data_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": "not a list"}\n')
    assert main(["init", str(tmp_path / "r.yaml"), "--data", str(bad)]) == 2
    assert "bad.jsonl" in capsys.readouterr().err and not (tmp_path / "r.yaml").exists()
    with pytest.raises(SmoLoRAError, match="is a folder"):
        write_init_recipe(tmp_path)


CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_the_shipped_recipes_are_valid_and_their_data_is_there(path):
    values = load_recipe(path).values
    assert (ROOT / values["data"]).is_file() and values["model"] is None
    pick = lambda cls: cls(**{k: v for k, v in values.items() if k in {f.name for f in dataclasses.fields(cls)}})  # noqa: E731
    validate(pick(LoraSettings), pick(TrainConfig), pick(DataConfig))


def test_the_shipped_data_is_what_make_data_writes(tmp_path):
    r = subprocess.run([sys.executable, ROOT / "configs" / "make_data.py", tmp_path], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(p.name for p in (ROOT / "configs" / "data").iterdir())
    assert all((tmp_path / name).read_bytes() == (ROOT / "configs" / "data" / name).read_bytes() for name in written)


@pytest.mark.slow
def test_a_shipped_recipe_trains_the_embedded_model(tmp_path):
    out = tmp_path / "dates"
    short = ["--max-steps", 2, "--eval-steps", 1, "--logging-steps", 1, "--output", out]  # the rest as shipped
    r = smolora("train", "--config", "configs/dates-iso.yaml", *short, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [step for step, _ in losses(out)] == [1, 2]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged if "eval_loss" in m] == [1, 2]
    assert any(m.get("train_examples") == 547 and m.get("val_examples") == 50 for m in logged)
    assert (out / "final_merged" / "model.safetensors").is_file()
    saved = load_recipe(out / "config.yaml").values
    assert saved["max_steps"] == 2 and saved["learning_rate"] == 1e-3 and saved["val_size"] == 50


def test_a_symlinked_config_yaml_is_refused_before_anything_runs(tmp_path, tiny_model_dir, capsys):
    out, victim = tmp_path / "out", tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    out.mkdir()
    (out / "config.yaml").symlink_to(victim)
    data = write_jsonl(tmp_path / "train.jsonl", chat_records(4))
    argv = ["train", "--data", str(data), "--model", str(tiny_model_dir), "--output", str(out), "--overwrite"]
    assert main(argv) == 2
    assert "config.yaml: is a symbolic link" in capsys.readouterr().err and victim.read_text() == "keep me\n"
