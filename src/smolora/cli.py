"""`smolora` command line: train, merge, generate, eval, export, demo.

Every TrainConfig, LoraSettings and DataConfig field is a flag in dashed form (``--max-steps 40``,
``--learning-rate 1e-3``, ``--r 16``, ``--target-modules q_proj,v_proj``), with its help text
taken from the field. Bad input exits with code 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import math
import os
import sys
import types
import typing
from pathlib import Path

from smolora.config import DataConfig, LoraSettings, TrainConfig
from smolora.errors import SmoLoRAError, check_writable_file
from smolora.log import quiet, say

EXIT_BAD_INPUT = 2


def _field_type(f: dataclasses.Field, owner) -> type:
    hint = typing.get_type_hints(owner)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and args:
        hint = args[0]
    return typing.get_origin(hint) or hint


def _parse_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _parse_ints(text: str) -> list[int]:
    try:
        return [int(t) for t in _parse_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers separated by commas, got {text!r}") from None


def _parse_map(text: str) -> dict[str, str]:
    pairs = {}
    for item in _parse_list(text):
        if "=" not in item:
            raise argparse.ArgumentTypeError(f"expected NAME=FIELD pairs, got {item!r}")
        k, v = item.split("=", 1)
        pairs[k.strip()] = v.strip()
    return pairs


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    group = parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip().splitlines()[0])
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind = _field_type(f, cls)
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = _with_default(f.metadata.get("help", ""), default)
        if kind is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif kind is list:
            ints = typing.get_args(typing.get_type_hints(cls)[f.name]) == (int,)
            group.add_argument(
                flag,
                dest=f.name,
                type=_parse_ints if ints else _parse_list,
                default=None,
                metavar="N,M" if ints else "A,B",
                help=help_text,
            )
        elif kind is dict:
            group.add_argument(flag, dest=f.name, type=_parse_map, default=None, metavar="K=V,..", help=help_text)
        else:
            group.add_argument(
                flag, dest=f.name, type=kind, default=None, metavar=kind.__name__.upper(), help=help_text
            )


def _with_default(text: str, default) -> str:
    """A flag's help with its default said once, plainly (a list as ``a,b``; none where the help says it)."""
    if default is None or "default" in text:
        return text
    shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
    shown = ",".join(f"{k}={v}" for k, v in default.items()) if isinstance(default, dict) else shown
    return f"{text} (default: {shown if shown not in ('', []) else 'none'})"


def build_from(cls, args: argparse.Namespace, base=None):
    """A dataclass instance: ``base`` (or defaults) with every flag the user gave applied."""
    obj = base if base is not None else cls()
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if value is not None:
            setattr(obj, f.name, value)
    return obj


def parse_data_arg(items: list[str]):
    """``--data PATH`` once, or several ``--data TASK=PATH[@WEIGHT]`` for multi-task mixing. A value
    that names an existing file or folder is always a path, even with '=' or '@' in it."""
    tasks = {}
    for i, item in enumerate(items):
        name, sep, rest = item.partition("=")
        if Path(item).exists() or not sep or "/" in name or os.sep in name:
            name, rest = None, item
        path, weight = rest, None
        if not Path(rest).exists() and "@" in rest:
            path, _, text = rest.rpartition("@")
            try:
                weight = float(text)
            except ValueError:
                raise SmoLoRAError(f"--data {item}: weight after @ must be a number") from None
            if not (math.isfinite(weight) and weight > 0):
                raise SmoLoRAError(f"--data {item}: weight after @ must be a positive number (got {text})")
        if len(items) == 1 and name is None and weight is None:
            return path
        name = name or f"task{i + 1}"
        if name in tasks:
            raise SmoLoRAError(f"--data {item}: task {name!r} is given twice")
        tasks[name] = (path, 1.0 if weight is None else weight)
    return tasks


def train_data(args, recipe) -> typing.Any:
    """``--data`` as given, else the ``--config`` recipe's data."""
    if args.data:
        return parse_data_arg(args.data)
    if recipe is None or recipe.data is None:
        raise SmoLoRAError("no training data: pass --data PATH, or name it (data: PATH) in a --config recipe")
    return recipe.data


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smolora", description="LoRA fine-tuning of small causal LMs, offline.", allow_abbrev=False
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _train_command(sub)
    _merge_command(sub)
    _generate_command(sub)
    _eval_command(sub)
    _export_command(sub)
    _demo_command(sub)
    _init_command(sub)
    _report_command(sub)
    _chat_command(sub)
    for command in sub.choices.values():
        command.add_argument("--quiet", action="store_true", help="print warnings and errors only")
    return parser


def _train_command(sub) -> None:
    p = sub.add_parser(
        "train",
        allow_abbrev=False,
        help="train a LoRA adapter, then merge it",
        description="Train a LoRA adapter on your data, save it (PEFT format) and merge it into a standalone model.",
    )
    p.add_argument(
        "--config",
        default=None,
        metavar="RECIPE.yaml",
        help="read the settings from this YAML recipe (`smolora init` writes one; every run saves its own as "
        "OUTPUT/config.yaml); flags given as well override it",
    )
    p.add_argument(
        "--data",
        action="append",
        default=None,
        metavar="PATH",
        help="training data: .jsonl/.json/.csv/.parquet/.txt, a folder of .txt, a saved dataset, or a hub name; "
        "repeat as TASK=PATH[@WEIGHT] to mix tasks (needed unless the --config recipe names data)",
    )
    p.add_argument("--output", default=None, help="output folder (default: ./fine_tuned_model); same as --output-dir")
    p.add_argument(
        "--model",
        default=None,
        help="base model: a HF folder, a .gguf file or a hub id (default: embedded SmolLM2-135M-Instruct)",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        metavar="CHECKPOINT",
        help="continue the newest complete checkpoint in the output folder, or the one given",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in the output folder")
    p.add_argument("--allow-config-change", action="store_true", help="resume even though settings changed")
    p.add_argument("--no-merge", action="store_true", help="save the adapter only; skip final_merged/")
    p.add_argument(
        "--skip-nonfinite-steps",
        type=int,
        default=0,
        metavar="N",
        help="tolerate N steps with NaN/inf loss (skipped) before stopping",
    )
    p.add_argument(
        "--report-to",
        choices=["none", "tensorboard"],
        default=None,
        help="also log every metrics line to TensorBoard (OUTPUT/tensorboard; needs the tensorboard package)",
    )
    _add_safety_flags(p)
    add_dataclass_flags(p, TrainConfig)
    add_dataclass_flags(p, LoraSettings)
    add_dataclass_flags(p, DataConfig)


def _merge_command(sub) -> None:
    p = sub.add_parser(
        "merge",
        allow_abbrev=False,
        help="merge an adapter into its base model",
        description="Merge a LoRA adapter into a fresh base: W' = W + (alpha/r)·B·A; save a standalone HF folder.",
    )
    p.add_argument("--adapter", required=True, help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--output", required=True, help="folder for the merged model")
    p.add_argument("--model", default=None, help="base model (default: the one the adapter was trained on)")
    p.add_argument("--overwrite", action="store_true", help="replace what is in the output folder")
    _add_safety_flags(p)


def _generate_command(sub) -> None:
    p = sub.add_parser(
        "generate",
        allow_abbrev=False,
        help="generate from a prompt, or chat interactively",
        description="Generate text; without --prompt, an interactive chat. Tokens stream as they come.",
    )
    p.add_argument(
        "--model", default=None, help="a merged model folder, a base model, or nothing for the embedded default"
    )
    p.add_argument("--adapter", default=None, help="generate with this adapter attached, unmerged")
    p.add_argument("--prompt", default=None, help="the prompt (omit for interactive chat)")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    _add_generation_flags(p)


def _eval_command(sub) -> None:
    p = sub.add_parser(
        "eval",
        allow_abbrev=False,
        help="loss, perplexity and exact match of a model on a data file",
        description="Evaluate a model (or base + adapter) on held-out data: loss and perplexity over the "
        "reply tokens, and with --exact-match greedy exact match of each last reply.",
    )
    p.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="PATH",
        help="evaluation data, in any format train reads; repeat as TASK=PATH for several tasks "
        "(each record once, with its task prefix)",
    )
    p.add_argument(
        "--model", default=None, help="a merged model folder, a base model, or nothing for the embedded default"
    )
    p.add_argument("--adapter", default=None, help="evaluate with this adapter (merged in memory)")
    p.add_argument(
        "--exact-match", action="store_true", help="also generate each example's last reply greedily and compare"
    )
    p.add_argument(
        "--max-new-tokens", type=int, default=64, help="with --exact-match: tokens to generate at most (default: 64)"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="with --exact-match: replies generated at once, each the same as generated alone (default: 16)",
    )
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results to this JSON file")
    p.add_argument(
        "--compare-base",
        action="store_true",
        help="evaluate the base model on the same data too: both columns, and a few replies of each side by side",
    )
    p.add_argument(
        "--base",
        default=None,
        metavar="MODEL",
        help="with --compare-base: the base (default: the adapter's, or for OUTPUT/final_merged the run's)",
    )
    p.add_argument(
        "--samples", type=int, default=3, help="with --compare-base: replies shown side by side (default: 3)"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument(
        "--no-weight-codes",
        dest="weight_codes",
        action="store_false",
        help="compute the loss from the fp32 weights, not the codes a converted model keeps beside them",
    )
    p.add_argument(
        "--no-fast",
        dest="fast",
        action="store_false",
        help="the libraries' own layers, attention and loss instead of the speed wing (also SMOLORA_FAST=0)",
    )
    _add_safety_flags(p)
    add_dataclass_flags(p, DataConfig, skip=("validation_data",))


def _export_command(sub) -> None:
    p = sub.add_parser(
        "export",
        allow_abbrev=False,
        help="write a model as one GGUF file (llama.cpp, Ollama)",
        description="Write a merged model, or a base model with an adapter merged in memory, as one GGUF file "
        "(Llama, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3 text, Phi-3).",
    )
    p.add_argument("--output", default=None, help="the .gguf file to write (an Ollama Modelfile is written beside it)")
    p.add_argument(
        "--model", default=None, help="a merged model folder, a base model, or nothing for the embedded default"
    )
    p.add_argument("--adapter", default=None, help="merge this adapter into its base (or --model) first")
    p.add_argument(
        "--lora-gguf", default=None, help="write --adapter alone as a llama.cpp LoRA file (--lora, Ollama's ADAPTER)"
    )
    p.add_argument(
        "--type",
        default="f16",
        help="how the matrices are stored: f16 (default), f32, bf16, q8_0, or q5_1, q5_0, "
        "q4_1, q4_0 (these keep the token embedding at q8_0), q5_0_qv (q5_0 with attention q/v at q8_0); "
        "norms stay f32",
    )
    p.add_argument("--name", default=None, help="the model name recorded in the file (default: the file's name)")
    p.add_argument(
        "--check",
        default=None,
        metavar="HELD_OUT",
        help="export each type from f16 down to q4_0, score each file's greedy exact match on these held-out "
        "records, and keep the smallest within --tolerance points of the unquantized model (instead of --type)",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=2.0,
        help="with --check: exact-match points a smaller file may lose (default: 2)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    _add_safety_flags(p)


def _demo_command(sub) -> None:
    p = sub.add_parser(
        "demo",
        allow_abbrev=False,
        help="fine-tune the embedded model on a built-in task; show before/after",
        description="Teach the embedded SmolLM2-135M to rewrite dates as ISO 8601; "
        "report held-out exact match before and after.",
    )
    p.add_argument("--output", default="./smolora_demo", help="output folder (default: ./smolora_demo)")
    p.add_argument("--max-steps", type=int, default=60, help="optimizer steps (default: 60)")
    p.add_argument("--train-size", type=int, default=600, help="training examples (default: 600)")
    p.add_argument("--eval-size", type=int, default=50, help="held-out examples (default: 50)")
    p.add_argument(
        "--preset",
        default="qv",
        choices=["qv", "qkv", "attention", "mlp", "all", "all-linear"],
        help="LoRA target preset (default: qv, the spec's)",
    )
    p.add_argument("--r", type=int, default=8, help="LoRA rank; alpha is 2r (default: 8)")


def _chat_command(sub) -> None:
    p = sub.add_parser(
        "chat",
        allow_abbrev=False,
        help="chat with a model and its adapters, switching between them",
        description="An interactive chat (also from a pipe) through the chat template, replies streamed. "
        "Load one or more adapters on one base and switch with /adapter NAME (or base); /compare answers the "
        "last prompt with each; /system TEXT, /reset, /save FILE.json|.jsonl, /quit.",
    )
    p.add_argument(
        "--model", default=None, help="the base model (default: the one the first adapter was trained on, or embedded)"
    )
    p.add_argument(
        "--adapter",
        action="append",
        default=None,
        metavar="NAME=PATH",
        help="an adapter folder to load under NAME (repeat for several; the first answers first)",
    )
    p.add_argument("--system", default=None, help="the system prompt to start with")
    _add_generation_flags(p)


def _report_command(sub) -> None:
    p = sub.add_parser(
        "report",
        allow_abbrev=False,
        help="a run in a few lines, and its loss curves as a picture",
        description="Print a run's settings, data, losses, time, speed, memory and files, and redraw "
        "OUTPUT/loss.png; with --compare, several runs' curves in one picture and a table of their numbers.",
    )
    p.add_argument("output", help="a run's output folder (where metrics.jsonl is)")
    p.add_argument("--compare", nargs="+", default=None, metavar="OTHER_OUTPUT", help="other runs to set beside it")
    p.add_argument(
        "--plot",
        default=None,
        metavar="FILE",
        help="where the picture goes (default: OUTPUT/loss.png; with --compare, OUTPUT/compare.png)",
    )


def _init_command(sub) -> None:
    p = sub.add_parser(
        "init",
        allow_abbrev=False,
        help="write a commented recipe for train --config",
        description="Write a YAML recipe with every training setting, its default and its help. Given --data, "
        "look at the data first (record shapes, count, token lengths) and suggest max_length, max_steps, a "
        "validation split and the rank, saying why in comments.",
    )
    p.add_argument("recipe", nargs="?", default="recipe.yaml", help="the file to write (default: recipe.yaml)")
    p.add_argument("--data", default=None, metavar="PATH", help="training data to look at and name in the recipe")
    p.add_argument(
        "--model", default=None, help="base model whose tokenizer counts the tokens (default: the embedded one)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    _add_safety_flags(p)


def _add_generation_flags(p: argparse.ArgumentParser) -> None:
    """How replies are generated, shared by generate and chat."""
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate at most (default: 200)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--no-stream", action="store_true", help="print each reply at its end instead of streaming it")
    p.add_argument(
        "--special-tokens-in-content",
        action="store_true",
        help="read text that spells a special token (e.g. <|im_start|>) as that token; off: it stays text",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    _add_safety_flags(p)


def _add_safety_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow a model folder's own Python code to run (off by default)",
    )
    p.add_argument(
        "--allow-pickle", action="store_true", help="allow pickled .bin weights (read with weights_only=True)"
    )


def cmd_train(args) -> int:
    from smolora.recipe import apply_recipe, check_settings
    from smolora.run import Run, device_for, merge_run, train_adapter

    recipe = apply_recipe(args)  # --config: the recipe's value wherever no flag was given
    args.output_dir = args.output or args.output_dir or "./fine_tuned_model"
    cfg = build_from(TrainConfig, args, TrainConfig(output_dir=args.output_dir))
    check_settings(recipe, build_from(LoraSettings, args), cfg, build_from(DataConfig, args))  # with recipe lines
    run = Run(
        args.model,
        train_data(args, recipe),
        _lora_settings(args).to_peft(),
        cfg,
        build_from(DataConfig, args),
        trust_remote_code=args.trust_remote_code,
        allow_pickle=args.allow_pickle,
        report_to=args.report_to,
    )
    done = train_adapter(
        run,
        device_for(cfg),
        resume=args.resume,
        overwrite=args.overwrite,
        allow_config_change=args.allow_config_change,
        skip_nonfinite_steps=args.skip_nonfinite_steps,
    )
    if not args.no_merge:
        done.model = None  # freed before the merge loads a fresh base
        merge_run(run, done.adapter)
    return 0


def _lora_settings(args) -> LoraSettings:
    """The LoRA flags given; with --task, its rank and alpha where --r / --lora-alpha do not say them."""
    settings = build_from(LoraSettings, args).for_task(args.r, args.lora_alpha)
    if settings.task:
        say(f"task {settings.task}: r {settings.r}, lora_alpha {settings.lora_alpha:g}")
    return settings


def cmd_merge(args) -> int:
    from smolora.merge import merge_adapter

    out = merge_adapter(
        args.adapter,
        args.output,
        args.model,
        allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code,
        overwrite=args.overwrite,
    )
    say(f"merged model saved to {out}")
    return 0


def _source_and_tokenizer(args):
    """The base model to load — --model, else the one --adapter was trained on, else the embedded
    default — and its tokenizer (with the chat template the adapter was trained with)."""
    from smolora.merge import adapter_base_reference, adapter_tokenizer, check_adapter_dir
    from smolora.models import load_tokenizer, resolve_model

    reference = args.model
    if args.adapter:
        check_adapter_dir(args.adapter)
        if reference is None:
            reference = adapter_base_reference(args.adapter)
    source = resolve_model(reference)
    if args.adapter:
        return source, adapter_tokenizer(source, args.adapter, args.trust_remote_code)
    return source, load_tokenizer(source, args.trust_remote_code)


def _load_model(args, source, device):
    """The model to run: with --adapter, folded into the weights in memory once (the math of
    `smolora merge`, nothing written) instead of PEFT's extra ops on every forward."""
    from smolora.merge import merged_model
    from smolora.models import load_model

    safety = dict(trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle)
    if args.adapter:
        return merged_model(source, args.adapter, device=device, **safety).eval()
    return load_model(source, device, **safety).eval()


def cmd_generate(args) -> int:
    from smolora.generate import chat_loop, check_sampling, generate
    from smolora.models import pick_device

    check_sampling(args.max_new_tokens, not args.greedy, args.temperature)  # before the model loads
    source, tokenizer = _source_and_tokenizer(args)
    model = _load_model(args, source, pick_device(args.device))
    sample = dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=not args.greedy,
        temperature=args.temperature,
        special_tokens_in_content=args.special_tokens_in_content,
    )
    if args.prompt is None and (args.raw or not getattr(tokenizer, "chat_template", None)):
        chat_loop(model, tokenizer, **sample, raw=True)  # plain text continued line by line
        return 0
    if args.prompt is None:  # `smolora chat` with this one model
        from smolora.chat import chat_repl, open_chat

        chat_repl(open_chat(model, tokenizer, {}, sample, stream=not args.no_stream))
        return 0
    stream = not args.no_stream
    reply = generate(model, tokenizer, args.prompt, **sample, chat=False if args.raw else None, stream=stream)
    if not stream:
        print(reply)
    return 0


def cmd_eval(args) -> int:
    from smolora.compare import base_of
    from smolora.config import validate
    from smolora.data import check_records, load_source, prepare_data
    from smolora.evaluate import evaluate, replies_to_score
    from smolora.generate import check_sampling
    from smolora.models import codes_source, pick_device, resolve_model

    # everything about the input is checked before the model loads
    check_sampling(args.max_new_tokens, False, 1.0)
    if args.batch_size < 1:
        raise SmoLoRAError(f"--batch-size must be >= 1 (got {args.batch_size})")
    if args.json and Path(args.json).is_symlink():
        raise SmoLoRAError(f"--json {args.json}: is a symbolic link; refusing to write through it")
    data = build_from(DataConfig, args)
    validate(data=data)
    records = load_source(parse_data_arg(args.data), data, mix=False)  # several tasks: each record once
    check_records(records, data)
    if args.json:
        check_writable_file(Path(args.json), "--json")
    source, tokenizer = _source_and_tokenizer(args)
    base_source = resolve_model(base_of(args.model, args.adapter, args.base)) if args.compare_base else None
    examples = prepare_data(records, tokenizer, data).train
    if args.exact_match:
        replies_to_score(examples)
    device = pick_device(args.device)
    if base_source is not None:
        return _eval_against_base(args, base_source, source, tokenizer, examples, device)
    model = _load_model(
        args, codes_source(source, device, args.weight_codes and not args.adapter), device
    )  # merged: no codes
    result = evaluate(
        model,
        tokenizer,
        examples,
        exact_match=args.exact_match,
        max_new_tokens=args.max_new_tokens,
        generation_batch_size=args.batch_size,
        weight_codes=args.weight_codes,
        fast=args.fast,
    )
    print(result.summary())
    _write_json(args.json, result.to_dict())
    return 0


def _write_json(target: str | None, doc: dict) -> None:
    """``--json``: whole or not at all, and never through a symbolic link."""
    import json

    from smolora.paths import publish

    if target:
        text = json.dumps(doc, indent=1) + "\n"
        try:
            publish(Path(target), lambda tmp: tmp.write_text(text), folder=False)
        except OSError as e:
            raise SmoLoRAError(f"--json {target}: cannot write it ({e.strerror})") from None


def _eval_against_base(args, base_source, source, tokenizer, examples, device) -> int:
    """``eval --compare-base``: the fine-tune, then the base, on the same token ids; exact match
    wherever the examples have prompts."""
    from smolora.compare import comparison, measure, sample_pairs
    from smolora.models import codes_source, load_model
    from smolora.run import free_memory

    pairs = sample_pairs(examples, max(0, args.samples))
    scored = args.exact_match or bool(sample_pairs(examples, 1))
    options = dict(weight_codes=args.weight_codes, fast=args.fast, generation_batch_size=args.batch_size)
    model = _load_model(args, codes_source(source, device, args.weight_codes and not args.adapter), device)
    tuned = measure(model, tokenizer, examples, pairs, scored, args.max_new_tokens, **options)
    model = None
    free_memory()
    safety = dict(trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle)
    base = load_model(codes_source(base_source, device, args.weight_codes), device, **safety).eval()
    before = measure(base, tokenizer, examples, pairs, scored, args.max_new_tokens, **options)
    result = comparison(before, tuned, tokenizer, pairs)
    print(result.table())
    _write_json(args.json, result.to_dict())
    return 0


def cmd_export(args) -> int:
    from smolora.export import READ_BACK, base_origin, check_exportable, check_output, export_gguf, export_lora_gguf
    from smolora.models import load_config
    from smolora.ollama import write_modelfile
    from smolora.quantize import check_examples, check_tolerance, smallest_that_keeps

    if not (args.output or args.lora_gguf) or (args.lora_gguf and not args.adapter):
        raise SmoLoRAError("export: expected --output FILE.gguf, or --adapter DIR --lora-gguf FILE.gguf (or both)")
    for path in filter(None, (args.output, args.lora_gguf)):
        check_output(path, args.type, args.overwrite)  # before the model loads
    if args.check and not args.output:
        raise SmoLoRAError("export --check: expected --output FILE.gguf, where the file kept goes")
    check_tolerance(args.tolerance)
    source, tokenizer = _source_and_tokenizer(args)
    held_out = check_examples(args.check, tokenizer) if args.check else None
    config = load_config(source, args.trust_remote_code)
    if held_out is not None and config.model_type not in READ_BACK:
        raise SmoLoRAError(f"export --check: transformers cannot read a {config.model_type} GGUF back to score it")
    if args.lora_gguf:
        lora = export_lora_gguf(
            args.adapter, config, args.lora_gguf, args.type, overwrite=args.overwrite, base=base_origin(source)
        )
        say(f"{args.type} LoRA adapter GGUF saved to {lora} ({lora.stat().st_size / 2**20:.1f} MiB)")
        if str(base_origin(source)).endswith(".gguf"):  # Ollama's ADAPTER needs its base as a GGUF file
            write_modelfile(lora, tokenizer, base=base_origin(source))
    if args.output:
        check_exportable(config, tokenizer)
        model = _load_model(args, source, "cpu")
        if held_out is not None:
            options = dict(tolerance=args.tolerance, overwrite=args.overwrite, name=args.name, base=base_origin(source))
            smallest_that_keeps(model, tokenizer, held_out, args.output, **options)
            return 0
        out = export_gguf(
            model, tokenizer, args.output, args.type, name=args.name, overwrite=args.overwrite, base=base_origin(source)
        )
        size = out.stat().st_size / 2**20
        say(f"{args.type} GGUF saved to {out} ({size:.0f} MiB), the Ollama Modelfile beside it")
    return 0


def cmd_report(args) -> int:
    from smolora.report import compare_table, describe_run, draw_compare, draw_run, read_curves

    runs = [read_curves(folder) for folder in [args.output, *(args.compare or [])]]  # all read before drawing
    out = Path(args.output)
    if args.plot:
        check_writable_file(Path(args.plot), "--plot")
    if not args.compare:
        print("\n".join(describe_run(runs[0])))
        plot = draw_run(runs[0], Path(args.plot) if args.plot else None)
    else:
        print("\n".join(compare_table(runs)))
        plot = draw_compare(runs, Path(args.plot) if args.plot else out / "compare.png")
    print(f"plot: {plot}")
    return 0


def cmd_init(args) -> int:
    from smolora.recipe import write_init_recipe

    path = write_init_recipe(
        args.recipe, args.data, args.model, overwrite=args.overwrite, trust_remote_code=args.trust_remote_code
    )
    say(f"recipe written to {path}; train with: smolora train --config {path}")
    return 0


def cmd_chat(args) -> int:
    from smolora.chat import chat_repl, open_chat, parse_adapters
    from smolora.generate import check_sampling
    from smolora.merge import adapter_base_reference, adapter_tokenizer
    from smolora.models import load_model, load_tokenizer, pick_device, resolve_model

    check_sampling(args.max_new_tokens, not args.greedy, args.temperature)  # before the model loads
    adapters = parse_adapters(args.adapter)
    first = next(iter(adapters.values()), None)
    source = resolve_model(args.model if args.model or first is None else adapter_base_reference(first))
    remote = args.trust_remote_code
    tokenizer = adapter_tokenizer(source, first, remote) if first else load_tokenizer(source, remote)
    if not getattr(tokenizer, "chat_template", None):
        raise SmoLoRAError(f"{source.name}: has no chat template; use `smolora generate --raw` to continue plain text")
    safety = dict(trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle)
    base = load_model(source, pick_device(args.device), **safety).eval()
    sample = dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=not args.greedy,
        temperature=args.temperature,
        special_tokens_in_content=args.special_tokens_in_content,
    )
    chat_repl(open_chat(base, tokenizer, adapters, sample, system=args.system, stream=not args.no_stream))
    return 0


def cmd_demo(args) -> int:
    from smolora.demo import run_demo

    run_demo(
        args.output,
        train_size=args.train_size,
        eval_size=args.eval_size,
        max_steps=args.max_steps,
        preset=args.preset,
        r=args.r,
    )
    return 0


SYSTEM_REFUSALS = {
    getattr(errno, name)
    for name in ("ENOSPC", "EDQUOT", "EFBIG", "EROFS", "EACCES", "EPERM", "EIO", "ENOENT", "ENOTDIR", "EISDIR", "ELOOP")
    if hasattr(errno, name)
}


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the command itself, not a call from Python: train on tcmalloc where the system has it
        from smolora.fast import calm_openmp, reexec_with_tcmalloc

        calm_openmp()  # before torch loads OpenMP, and in the environment of a re-run
        reexec_with_tcmalloc()
        if not sys.stderr.isatty():  # a log file or a pipe: no progress bars, whose \r redraws pile up in one line
            os.environ.setdefault("TQDM_DISABLE", "1")  # (read by tqdm when it is imported, not yet here)
            os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()  # "Loading weights", "Writing model shards"
    parser = make_parser()
    args = parser.parse_args(argv)
    quiet(args.quiet)
    handlers = {
        "train": cmd_train,
        "merge": cmd_merge,
        "generate": cmd_generate,
        "eval": cmd_eval,
        "export": cmd_export,
        "demo": cmd_demo,
        "init": cmd_init,
        "report": cmd_report,
        "chat": cmd_chat,
    }
    try:
        return handlers[args.command](args)
    except SmoLoRAError as e:
        print(f"smolora: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:  # the system refused a read or a write: a full disk, a read-only or vanished folder
        if e.errno not in SYSTEM_REFUSALS:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"smolora: error: {where}{e.strerror or e}; what was there before is as it was", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("smolora: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from smolora.train import TrainingInterrupted

        if isinstance(e, TrainingInterrupted):
            from smolora.distributed import is_main

            if is_main():  # under torchrun, every process stops the same way
                print(f"smolora: {e}", file=sys.stderr)
            return 130
        raise


if __name__ == "__main__":
    sys.exit(main())
