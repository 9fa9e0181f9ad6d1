"""Recipes: the train command's settings as one YAML file.

A recipe's keys are the fields of ``LoraSettings``, ``TrainConfig`` and ``DataConfig`` (their help
texts document the recipe as they document the flags) plus ``data``, ``model``, ``output`` and
``report_to``. ``smolora train --config FILE`` reads one, every key checked against its field's
type, and a flag given as well wins over the file; every run writes its resolved settings back as
``OUTPUT/config.yaml``, which ``--config`` repeats; ``smolora init`` drafts one, commented, and
given data looks at it first to suggest the settings that depend on it.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from smolora.config import (
    TASK_RANKS,
    DataConfig,
    LoraSettings,
    TrainConfig,
    expand_targets,
    target_list,
    validate,
)
from smolora.errors import SmoLoRAError, check_writable_file
from smolora.log import say, warn
from smolora.paths import publish
from smolora.report import REPORT_TO

RUN_RECIPE = "config.yaml"  # in every output folder: the run's resolved settings
MAX_RECIPE_BYTES = 1 << 20  # a recipe is a page of settings; anything larger is the wrong file
SECTIONS = (("LoRA adapter", LoraSettings), ("training", TrainConfig), ("data", DataConfig))
RUN_KEYS = {
    "data": "training data: a path (.jsonl/.json/.csv/.parquet/.txt, a folder of .txt, a saved dataset), or "
    "tasks to mix as a mapping TASK: PATH or TASK: {path: PATH, weight: W}",
    "model": "base model: a HF folder, a .gguf file or a hub id; null: the embedded SmolLM2-135M-Instruct",
    "output": "output folder: checkpoints/, adapter_checkpoint/, final_merged/, metrics.jsonl, config.yaml",
    "report_to": f"also log the metrics to: {' or '.join(REPORT_TO)} (tensorboard needs its package)",
}
ALIASES = {"output_dir": "output"}  # TrainConfig's name (and flag) for the output folder
# Flags that say what to do this time, or switch a safety guard off: never read from a file.
FLAG_ONLY = (
    "resume",
    "overwrite",
    "allow_config_change",
    "no_merge",
    "skip_nonfinite_steps",
    "trust_remote_code",
    "allow_pickle",
    "config",
)


def _fields() -> dict[str, tuple[type, dataclasses.Field]]:
    """Every dataclass key: name -> (its dataclass, its field)."""
    return {f.name: (cls, f) for _, cls in SECTIONS for f in dataclasses.fields(cls) if f.name not in ALIASES}


KEYS = [*RUN_KEYS, *_fields()]


class _Loader(yaml.SafeLoader):
    """YAML 1.1 as PyYAML reads it, but ``1e-4`` is a number: YAML 1.1 needs a dot (``1.0e-4``),
    and a learning rate written the usual way would otherwise be the text '1e-4'."""


class _Dumper(yaml.SafeDumper):
    """Writes what ``_Loader`` reads back as the same value (text like '1e-4' quoted)."""


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )


class _Wrong(Exception):
    """A value of the wrong type; the argument says what was expected."""


@dataclass
class Recipe:
    """A checked recipe: its values by key (``output_dir`` read as ``output``) and each key's line."""

    path: Path
    values: dict[str, Any]
    lines: dict[str, int]
    applied: set[str] = field(default_factory=set)  # the keys no flag overrode

    @property
    def data(self) -> Any:
        return self.values.get("data")

    def where(self, key: str) -> str:
        return f"{self.path}:{self.lines[key]}"


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and check a recipe. Raises a one-line ``SmoLoRAError`` naming the file, the line and the
    key for bad YAML, an unknown or repeated key, or a value of the wrong type."""
    path = Path(path)
    text = _read(path)
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return Recipe(path, {}, {})
        if not isinstance(root, yaml.MappingNode):
            raise SmoLoRAError(
                f"{path}:{root.start_mark.line + 1}: a recipe is a mapping of settings, one `key: value` a line"
            )
        recipe = Recipe(path, {}, {})
        for key_node, value_node in root.value:
            key, line = _key(key_node, path, recipe)
            recipe.lines[key] = line
            recipe.values[key] = _checked(key, loader.construct_object(value_node, deep=True), f"{path}:{line}")
        return recipe
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 1
        what = ", ".join(filter(None, (e.context, e.problem)))
        raise SmoLoRAError(f"{path}:{line}: not valid YAML ({what})") from None
    except yaml.YAMLError as e:
        raise SmoLoRAError(f"{path}: not valid YAML ({str(e).splitlines()[0] if str(e) else 'unreadable'})") from None
    finally:
        loader.dispose()


def _read(path: Path) -> str:
    if not path.is_file():
        raise SmoLoRAError(f"{path}: recipe file does not exist" if not path.exists() else f"{path}: not a file")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise SmoLoRAError(f"{path}: {path.stat().st_size} bytes is too large for a recipe (at most 1 MiB)")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SmoLoRAError(f"{path}: not UTF-8 text (byte {e.start})") from None


def _key(node: yaml.Node, path: Path, recipe: Recipe) -> tuple[str, int]:
    """A top-level key, known and given once; ``output_dir`` as ``output``."""
    line = node.start_mark.line + 1
    if not isinstance(node, yaml.ScalarNode):
        raise SmoLoRAError(f"{path}:{line}: a key must be a setting's name")
    name = ALIASES.get(node.value, node.value)
    if name in FLAG_ONLY:
        flag = "--" + name.replace("_", "-")
        raise SmoLoRAError(f"{path}:{line}: {name} is not a recipe key: it is said each time, as {flag}")
    if name not in KEYS:
        close = difflib.get_close_matches(node.value.replace("-", "_").lower(), [*KEYS, *ALIASES], n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else "; `smolora init` writes a recipe with every key"
        raise SmoLoRAError(f"{path}:{line}: unknown key {_shown(node.value)}{hint}")
    if name in recipe.lines:
        raise SmoLoRAError(f"{path}:{line}: {node.value} is given twice (first on line {recipe.lines[name]})")
    return name, line


def _checked(key: str, value: Any, where: str) -> Any:
    """``value`` as its setting's type, or a one-line error naming the key and what it expected."""
    try:
        if key == "data":
            return _data(value)
        if key == "report_to":
            if value not in (None, *REPORT_TO):
                raise _Wrong(" or ".join(REPORT_TO))
            return value
        if key in RUN_KEYS:
            return _convert(value, str | None if key == "model" else str)
        cls, f = _fields()[key]
        return _convert(value, typing.get_type_hints(cls)[f.name])
    except _Wrong as e:
        raise SmoLoRAError(f"{where}: {key}: expected {e} (got {_shown(value)})") from None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _convert(value: Any, hint: Any) -> Any:
    """``value`` read as the type ``hint`` names: bool, int, float, str, an optional, a list of str
    or int (or one comma-separated text, as the flag takes it), a str -> str mapping."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return None if value is None and len(inner) < len(args) else _convert(value, inner[0])
    if origin is list:
        return _convert_list(value, args[0])
    if origin is dict:
        return _convert_map(value)
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, str):
        return value
    raise _Wrong({bool: "true or false", int: "a whole number", float: "a number", str: "text"}[hint])


def _convert_list(value: Any, item: type) -> list:
    what = "a list of whole numbers" if item is int else "a list of names (or one comma-separated text)"
    if isinstance(value, str):
        value = [t.strip() for t in value.split(",") if t.strip()]
        if item is int:
            if not all(re.fullmatch(r"[-+]?\d+", t) for t in value):
                raise _Wrong(what)
            value = [int(t) for t in value]
    elif item is int and isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list):
        raise _Wrong(what)
    try:
        return [_convert(v, item) for v in value]
    except _Wrong:
        raise _Wrong(what) from None


def _convert_map(value: Any) -> dict[str, str]:
    what = "a mapping NAME: FIELD (or one text NAME=FIELD,...)"
    if isinstance(value, str):
        pairs = [t.split("=", 1) for t in value.split(",") if t.strip()]
        if not all(len(p) == 2 for p in pairs):
            raise _Wrong(what)
        value = {k.strip(): v.strip() for k, v in pairs}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise _Wrong(what)
    return dict(value)


def _data(value: Any) -> Any:
    """A path, or tasks to mix: {task: (path, weight)} as ``load_source`` takes them; None: not given."""
    what = "a path, or a mapping TASK: PATH or TASK: {path: PATH, weight: W}"
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, dict) or not value:
        raise _Wrong(what)
    tasks = {}
    for name, spec in value.items():
        if isinstance(spec, dict) and set(spec) <= {"path", "weight"} and isinstance(spec.get("path"), str):
            weight = spec.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < math.inf:
                raise _Wrong(f"task {name!r} to have a positive weight")
            spec = (spec["path"], float(weight))
        elif isinstance(spec, str):
            spec = (spec, 1.0)
        else:
            raise _Wrong(what)
        tasks[str(name)] = spec
    return tasks


# --- the train command: recipe, then flags ------------------------------------------------------


def apply_recipe(args) -> Recipe | None:
    """With ``--config``: every recipe value whose flag was not given (its value None) set on ``args``.
    The recipe's data stays on the recipe (``Recipe.data``): ``--data`` given replaces it whole."""
    if not getattr(args, "config", None):
        return None
    recipe = load_recipe(args.config)
    for key, value in recipe.values.items():
        if key == "data":
            if not args.data:
                recipe.applied.add(key)
            continue
        flags = ("output", "output_dir") if key == "output" else (key,)
        if all(getattr(args, flag, None) is None for flag in flags):
            setattr(args, flags[0], value)
            recipe.applied.add(key)
    return recipe


def check_settings(recipe: Recipe | None, lora, train: TrainConfig, data: DataConfig) -> None:
    """``validate`` the settings; a problem with a value the recipe gave is named by its line."""
    try:
        validate(lora, train, data)
    except SmoLoRAError as e:
        if recipe is None or not str(e).startswith("invalid settings: "):
            raise
        problems = str(e).removeprefix("invalid settings: ").split("; ")
        raise SmoLoRAError("invalid settings: " + "; ".join(_located(recipe, p) for p in problems)) from None


def _located(recipe: Recipe, problem: str) -> str:
    key = problem.split(" ", 1)[0]
    return f"{recipe.where(key)}: {problem}" if key in recipe.applied else problem


# --- every run's resolved settings: OUTPUT/config.yaml ------------------------------------------


def save_run_recipe(run, sums: dict | None = None) -> Path:
    """``run``'s settings as ``OUTPUT/config.yaml``, whole or not at all; ``sums``: the CPU run's
    ``gemm`` and ``threads``, said in a comment (what repeats it bit for bit)."""
    text = run_recipe(run, sums)
    return publish(run.out / RUN_RECIPE, lambda tmp: tmp.write_text(text, encoding="utf-8"), folder=False)


def run_recipe(run, sums: dict | None = None) -> str:
    """The recipe that repeats ``run``: every setting, paths made absolute (a rerun may start elsewhere)."""
    out = run.out.absolute()
    lines = [
        f"# SmoLoRA recipe: the settings of the run in {out}, written by that run.",
        f"# Repeat it:  smolora train --config {out / RUN_RECIPE} --output OTHER_FOLDER   (or --overwrite)",
    ]
    if sums and sums.get("threads"):  # a fresh run times the GEMMs again and takes the cores it finds
        gemm = f"SMOLORA_GEMM={sums['gemm']} " if sums.get("gemm") in ("mkl", "onednn") else ""
        lines.append(
            f"# It summed on {sums['threads']} CPU threads"
            + (f" with the {sums['gemm']} GEMM" if gemm else "")
            + f": {gemm}OMP_NUM_THREADS={sums['threads']} before the command repeats its losses bit for bit."
        )
    lines.append("")
    data = _data_value(run.dataset)
    if data is None:
        lines.append("# data was given in Python (records or a Dataset), not as a file: pass --data to rerun")
    lines += [_line("data", data), _line("model", _path_value(run.base_model_name)), _line("output", str(out))]
    lines.append(_line("report_to", getattr(run, "report_to", None)))
    lora, lost = _lora_values(run.peft_config)
    if lost:
        note = ", ".join(f"{k}={v!r}" for k, v in lost.items())
        warn(f"{out / RUN_RECIPE}: {note} set through the Python API have no recipe key; a rerun uses their defaults")
        lines.append(f"# set through the Python API, not recipe keys (a rerun uses their defaults): {note}")
    values = {
        LoraSettings: lora,
        TrainConfig: dataclasses.asdict(run.train_config),
        DataConfig: dataclasses.asdict(run.data_config),
    }
    if isinstance(values[DataConfig].get("validation_data"), str):
        values[DataConfig]["validation_data"] = _path_value(values[DataConfig]["validation_data"])
    for title, cls in SECTIONS:
        lines += ["", f"# {title} ({cls.__name__})"]
        for f in dataclasses.fields(cls):
            if f.name not in ALIASES:
                default = _default(f)
                value = values[cls][f.name]
                note = "" if value == default else f"  # default: {_yaml(default)}"
                lines.append(_line(f.name, value) + note)
    return "\n".join(lines) + "\n"


_FROM_PEFT = {("init_lora_weights", True): "default"}  # PEFT's value -> the setting's


def _lora_values(peft_config) -> tuple[dict, dict]:
    """The ``LoraSettings`` keys read off the run's ``peft.LoraConfig``, and what else was set on it
    (through the Python API) that a recipe cannot carry."""
    names = [f.name for f in dataclasses.fields(LoraSettings)]
    held = {name: getattr(peft_config, name) for name in names if hasattr(peft_config, name)}
    reference = type(peft_config)(**held, task_type=peft_config.task_type).to_dict()  # the same keys, else defaults
    skip = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", *names}
    lost = {k: v for k, v in peft_config.to_dict().items() if k not in skip and reference.get(k) != v}
    values = {f.name: held.get(f.name, _default(f)) for f in dataclasses.fields(LoraSettings)}
    for (name, peft_value), value in _FROM_PEFT.items():
        if name in values and values[name] is peft_value:
            values[name] = value
    values["target_modules"] = expand_targets(target_list(values["target_modules"]))
    values["lora_alpha"] = float(values["lora_alpha"])
    return values, lost


def _data_value(dataset: Any) -> Any:
    if isinstance(dataset, (str, os.PathLike)):
        return _path_value(dataset)
    if isinstance(dataset, dict):
        tasks = {}
        for name, spec in dataset.items():
            src, weight = spec if isinstance(spec, tuple) else (spec, 1.0)
            if not isinstance(src, (str, os.PathLike)):
                return None
            tasks[str(name)] = {"path": _path_value(src), "weight": float(weight)}
        return tasks
    return None


def _path_value(reference: Any) -> str | None:
    """A file or folder that exists as an absolute path; anything else (a hub id, None) as it is."""
    if reference is None:
        return None
    return str(Path(reference).absolute()) if Path(reference).exists() else str(reference)


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _yaml(value: Any) -> str:
    """``value`` as a YAML flow value on one line (that ``_Loader`` reads back as the same value)."""
    if isinstance(value, str) and not value.isprintable():  # a line break, a tab: one line, double-quoted as JSON
        return json.dumps(value, ensure_ascii=False)
    text = yaml.dump({"v": value}, Dumper=_Dumper, default_flow_style=True, width=math.inf, allow_unicode=True)
    return text[4:-2]


def _line(key: str, value: Any) -> str:
    return f"{key}: {_yaml(value)}"


# --- smolora init: a commented recipe, fitted to the data ---------------------------------------

EPOCHS = 3  # the common choice for a fine-tune on a small dataset (Alpaca's recipe trains 3 epochs)
VAL_MIN_RECORDS = 200  # below this a held-out tenth is too small to say much and costs the training
SAMPLE = 2000  # records tokenized to measure lengths: a percentile needs no more


@dataclass
class DataLook:
    """What ``init`` saw in the data: records, their shapes, token lengths of a sample."""

    path: str
    records: int
    shapes: dict[str, int]
    lengths: list[int]  # tokens per example (prompt + reply, template included), sorted
    replies: list[int]  # supervised tokens per example, sorted
    context: int  # the model's context length: no max_length beyond it
    tokenizer_of: str

    def percentile(self, q: float, values: list[int] | None = None) -> int:
        values = self.lengths if values is None else values
        return values[max(0, math.ceil(q * len(values)) - 1)]


def write_init_recipe(
    path: str | os.PathLike,
    data: str | None = None,
    model: str | None = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """Write a commented recipe at ``path``: every key with its help and default; with ``data``, the
    settings that depend on it suggested from a look at it. Refuses to replace a file unless asked."""
    path = Path(path)
    if path.is_dir():
        raise SmoLoRAError(f"{path}: is a folder; expected a file name for the recipe")
    if path.exists() and not overwrite:
        raise SmoLoRAError(f"{path}: exists; pass --overwrite to replace it")
    check_writable_file(path, "init")
    look = look_at_data(data, model, trust_remote_code) if data is not None else None
    text = init_recipe_text(data, model, look, path)
    publish(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), folder=False)
    return path


def look_at_data(data: str, model: str | None, trust_remote_code: bool = False) -> DataLook:
    """Read the records as training would, check them, and count the tokens of a sample of them
    with the tokenizer of the model the recipe names (the embedded one by default)."""
    import random

    from smolora.data import check_records, format_options, load_source
    from smolora.data.formats import detect_shape, encode_record
    from smolora.models import load_config, load_tokenizer, resolve_model

    settings = DataConfig()
    records = load_source(data, settings)
    check_records(records, settings)  # bad data is one line now, not at training
    if not records:
        raise SmoLoRAError(f"{data}: holds no records")
    source = resolve_model(model)
    tokenizer = load_tokenizer(source, trust_remote_code)
    config = load_config(source, trust_remote_code)
    context = int(getattr(config, "max_position_embeddings", 0) or 8192)
    opts = format_options(dataclasses.replace(settings, max_length=context))
    shapes: dict[str, int] = {}
    for record in records:
        shape = detect_shape(record, opts)
        shapes[shape] = shapes.get(shape, 0) + 1
    sample = records if len(records) <= SAMPLE else random.Random(0).sample(records, SAMPLE)
    examples = [encode_record(r, tokenizer, opts) for r in sample]
    look = DataLook(
        str(data),
        len(records),
        shapes,
        sorted(len(ex.input_ids) for ex in examples),
        sorted(ex.num_supervised for ex in examples),
        context,
        source.name,
    )
    say(
        f"{data}: {look.records} records ({_counts(shapes)}); tokens per example: median {look.percentile(0.5)}, "
        f"99th percentile {look.percentile(0.99)}, longest {look.lengths[-1]}"
        + (f" (of {len(sample)} sampled)" if len(sample) < len(records) else "")
    )
    return look


def _counts(shapes: dict[str, int]) -> str:
    return ", ".join(f"{n} {shape}" for shape, n in sorted(shapes.items(), key=lambda kv: -kv[1]))


def suggest(look: DataLook) -> dict[str, tuple[Any, str]]:
    """Settings that depend on the data: key -> (value, why), each why a sentence for a comment."""
    train = TrainConfig()
    n = look.records
    val = min(round(n * 0.1), 200) if n >= VAL_MIN_RECORDS else 0
    per_step = train.per_device_train_batch_size * train.gradient_accumulation_steps
    steps = max(1, math.ceil(EPOCHS * (n - val) / per_step))
    p99 = look.percentile(0.99)
    max_length = min(look.context, max(64, math.ceil(p99 / 64) * 64))
    cut = sum(1 for x in look.lengths if x > max_length)
    out = {
        "max_length": (
            max_length,
            f"99% of the {len(look.lengths)} examples measured are at most {p99} tokens (median "
            f"{look.percentile(0.5)}, longest {look.lengths[-1]}), rounded up to a multiple of 64"
            + (f"; {cut} longer ones get truncated" if cut else "; none is truncated")
            + (f"; capped at the model's context of {look.context}" if max_length == look.context else ""),
        ),
        "max_steps": (
            steps,
            f"about {EPOCHS} epochs: {EPOCHS} x {n - val} training records / {per_step} per step "
            f"(per_device_train_batch_size x gradient_accumulation_steps); or max_steps -1 with num_train_epochs",
        ),
        "logging_steps": (
            min(10, max(1, steps // 20)),
            "about 20 or more points on the loss curve",
        ),
    }
    if val:
        out["val_size"] = (float(val), f"{n} records are enough to hold out {val} (a tenth, at most 200)")
        out["eval_steps"] = (max(1, steps // 5), "a validation loss every fifth of the run, and one at its end")
    else:
        out["val_size"] = (
            0.0,
            f"only {n} records (fewer than {VAL_MIN_RECORDS}): none is held out; "
            "check the result with `smolora eval` on separate data",
        )
    task, why = guess_task(look)
    ranks = ", ".join(f"{name} {r}" for name, r in TASK_RANKS.items())
    out["task"] = (task, f"{why}; the spec's rank by task: {ranks} (lora_alpha 2r)")
    return out


def guess_task(look: DataLook) -> tuple[str, str]:
    """domain, style or capability, from the record shape and the replies' length, with why."""
    if set(look.shapes) == {"text"}:
        return "domain", "plain text: a domain's words and facts"
    short = look.percentile(0.5, look.replies)
    if short <= 32:
        return "capability", f"replies are short (median {short} tokens): a structured answer, a skill to learn"
    return "style", f"replies are long (median {short} tokens): how to answer more than what to answer"


def init_recipe_text(
    data: str | None, model: str | None, look: DataLook | None, path: str | os.PathLike = "recipe.yaml"
) -> str:
    """The recipe ``init`` writes: a header, then every key with its help, default and any suggestion."""
    suggested = suggest(look) if look is not None else {}
    lines = [
        f"# SmoLoRA recipe. Train with:   smolora train --config {path}",
        f"# A flag given as well wins:   smolora train --config {path} --max-steps 50",
        "# Keys left out take their defaults; paths are relative to the folder smolora runs in.",
        "# Every run saves the settings it used as OUTPUT/config.yaml, which --config repeats.",
    ]
    if look is not None:
        lines += _comment(
            f"Looked at {look.path}: {look.records} records ({_counts(look.shapes)}), tokens counted with "
            f"{look.tokenizer_of}'s tokenizer. The keys marked 'suggested' were chosen from it."
        )
    lines += ["", "# --- what to train, on what, where to"]
    run_values = {"data": data, "model": model, "output": TrainConfig().output_dir, "report_to": None}
    for key, help_text in RUN_KEYS.items():
        lines += _comment(help_text)
        if key == "data" and data is None:
            lines += _comment("set it here, or pass --data")
        lines.append(_line(key, run_values[key]))
    for title, cls in SECTIONS:
        lines += ["", f"# --- {title} ({cls.__name__})"]
        for f in dataclasses.fields(cls):
            if f.name in ALIASES:
                continue
            default = _default(f)
            help_text = f.metadata.get("help", "")
            lines += _comment(help_text if "default:" in help_text else f"{help_text} (default: {_yaml(default)})")
            value = default
            if f.name in suggested:
                value, why = suggested[f.name]
                lines += _comment(f"suggested: {why}")
            if f.name in ("r", "lora_alpha") and "task" in suggested:  # left to the task, unless uncommented
                lines.append(f"# {_line(f.name, value)}   (the task picks it; uncomment to choose it yourself)")
            else:
                lines.append(_line(f.name, value))
    return "\n".join(lines) + "\n"


def _comment(text: str) -> list[str]:
    return textwrap.wrap(text, 100, initial_indent="# ", subsequent_indent="#   ", break_on_hyphens=False)
