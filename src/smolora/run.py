"""One fine-tuning run, from settings to files: check everything, read the data, load the model,
add LoRA, train, save the adapter, merge. The command line and the Python API (``SmoLoRA``) both
run through ``train_adapter`` and ``merge_run``."""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from smolora import checkpoint as ckpt
from smolora import distributed
from smolora.config import DataConfig, TrainConfig, expand_targets, target_list, validate
from smolora.data import check_records, load_source, prepare_data
from smolora.errors import SmoLoRAError, reason
from smolora.fast import describe_threads, gemm_choice, use_gemm, use_threads
from smolora.log import say
from smolora.lora import add_lora, describe_targets, format_parameter_report, write_adapter
from smolora.merge import merge_adapter, write_adapter_info
from smolora.models import (
    ModelSource,
    base_reference,
    codes_source,
    load_model,
    load_tokenizer,
    pick_device,
    resolve_model,
)
from smolora.paths import output_lock, publish
from smolora.recipe import RUN_RECIPE, save_run_recipe
from smolora.report import check_report_to
from smolora.train import TrainResult, train

RUN_FOLDERS = ("checkpoints", "adapter_checkpoint", "final_merged")  # what marks an earlier run in output_dir
REPLACED = (*RUN_FOLDERS, "metrics.jsonl", "loss.png", "tensorboard")  # what --overwrite removes


@dataclass
class Run:
    """What a run is made of: where the base model and the data come from, and every setting."""

    base_model_name: str | None  # a HF folder, a .gguf file, a hub id, or None: the embedded model
    dataset: Any  # a path, a datasets.Dataset, a list of records, or {task: source or (source, weight)}
    peft_config: Any  # a peft.LoraConfig
    train_config: TrainConfig
    data_config: DataConfig
    difficulty: Callable[[Any], float] | None = None  # curriculum: a record's difficulty
    trust_remote_code: bool = False
    allow_pickle: bool = False
    source: ModelSource | None = None  # resolved when first needed: bad data is reported before a GGUF converts
    tokenizer: Any = None
    report_to: str | None = None  # "tensorboard": metrics as TensorBoard scalars too (smolora.report)

    @property
    def out(self) -> Path:
        return Path(self.train_config.output_dir)

    def resolved(self) -> ModelSource:
        if self.source is None:
            self.source = resolve_model(self.base_model_name)
        return self.source

    def loaded_tokenizer(self):
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.resolved(), self.trust_remote_code)
        return self.tokenizer


@dataclass
class RunResult:
    train: TrainResult
    model: Any  # the trained model, adapters attached
    adapter: Path  # output_dir/adapter_checkpoint


def device_for(cfg: TrainConfig) -> torch.device:
    """The device a run trains on: ``cfg.device``, or the best there is; under torchrun, this process's GPU."""
    device = pick_device(cfg.device)
    return (distributed.local_device() or device) if device.type == "cuda" else device


def train_adapter(
    run: Run,
    device: torch.device,
    *,
    resume: str | bool | None = None,
    overwrite: bool = False,
    allow_config_change: bool = False,
    skip_nonfinite_steps: int = 0,
) -> RunResult:
    """Train the adapter and save it to ``output_dir/adapter_checkpoint``. Every setting and the data
    are checked before the model is loaded; nothing of an earlier run is deleted before then."""
    cfg, data, out = run.train_config, run.data_config, run.out
    validate(run.peft_config, cfg, data)
    check_report_to(run.report_to)
    resume_from = ckpt.find_resume_checkpoint(out, resume)
    check_output_dir(out, resuming=resume_from is not None, overwrite=overwrite, asked_to_resume=bool(resume))
    if resume and resume_from is None:
        say(f"nothing to resume in {out} yet: starting at step 0")
    if run.dataset is None:
        raise SmoLoRAError("no training data: pass dataset_name")
    records = load_source(run.dataset, data, cfg.seed)
    val_records = load_source(data.validation_data, data, cfg.seed) if data.validation_data else None
    check_records(records + (val_records or []), data)  # before a model (the embedded one: converted) loads
    if any(run.resolved().lives_in(out / name) for name in RUN_FOLDERS):
        raise SmoLoRAError(
            f"{run.resolved().name}: the base model is inside {out}'s checkpoints/, adapter_checkpoint/ "
            "or final_merged/, which this run replaces; copy it elsewhere or choose another output folder"
        )
    prepared = prepare_data(
        records, run.loaded_tokenizer(), data, cfg, val_records=val_records, difficulty=run.difficulty
    )

    peft_config = copy.deepcopy(run.peft_config)  # every LoraConfig field the user set, presets expanded
    peft_config.target_modules = expand_targets(target_list(run.peft_config.target_modules))
    run_info = _run_info(run, peft_config, prepared)
    saved = ckpt.read_run_info(resume_from) if resume_from is not None else None
    if saved is not None:  # settings and data before the model loads; the model after
        ckpt.check_compatible(saved, run_info, allow_config_change)
    run_info |= _cpu_sums(saved, cfg.fast, device)
    torch.manual_seed(cfg.seed)  # LoRA A init
    source = codes_source(run.resolved(), device, cfg.weight_codes)  # 16-bit weights held as such (smolora.fast.codes)
    base = load_model(source, device, trust_remote_code=run.trust_remote_code, allow_pickle=run.allow_pickle)
    model = add_lora(base, peft_config)
    say(describe_targets(model))
    say(format_parameter_report(model))
    run_info["model_fingerprint"] = ckpt.fingerprint_model(model)
    if saved is not None:
        ckpt.check_compatible(saved, run_info, allow_config_change)
    folder = ckpt.safe_child(out, "adapter_checkpoint")
    with output_lock(out) if distributed.is_main() else contextlib.nullcontext():
        # again, now that no other process writes there: one may have finished a run meanwhile
        check_output_dir(out, resuming=resume_from is not None, overwrite=overwrite, asked_to_resume=bool(resume))
        if overwrite and resume_from is None and distributed.is_main():  # nothing of the earlier run may stay
            for path in (out / name for name in REPLACED):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        if distributed.is_main():
            # OUTPUT/config.yaml: `smolora train --config` with it repeats this run (on a CPU, with its sums)
            save_run_recipe(run, run_info if device.type == "cpu" else None)
        result = train(
            model,
            prepared.train,
            cfg,
            val_examples=prepared.val,
            run_info=run_info,
            resume_from=resume_from,
            pad_id=run.loaded_tokenizer().pad_token_id or 0,
            skip_nonfinite_steps=skip_nonfinite_steps,
            report_to=run.report_to,
        )
        if distributed.is_main():
            try:
                save_adapter(model, folder, run)
            except Exception as error:  # the checkpoint holds the trained adapter: say so, whatever failed
                raise SmoLoRAError(
                    f"{folder}: could not write the adapter ({reason(error)}); the trained adapter "
                    f"is in the checkpoint {result.last_checkpoint}"
                ) from error
            say(f"adapter saved to {folder}")
    distributed.barrier(distributed.world(device))  # on disk before any process uses it
    return RunResult(result, model, folder)


def _cpu_sums(saved: dict | None, fast: bool, device: torch.device) -> dict:
    """How this run sums: its fp32 GEMM and thread count, said in its first lines. A resumed run takes
    its checkpoint's (the same sums, not a new timing); every process of a torchrun job takes process
    0's GEMM, whatever its own timing said."""
    if saved is not None and fast and saved.get("gemm") in ("onednn", "mkl"):
        use_gemm(saved["gemm"])
    if saved is not None and device.type == "cpu":
        use_threads(saved.get("threads"))
    gemm = distributed.agree(gemm_choice(), distributed.world(device)) if fast else "torch"
    if fast:
        use_gemm(gemm)
    if device.type == "cpu":
        say(f"{describe_threads()}; GEMM: {gemm}")
    return {"gemm": gemm, "threads": torch.get_num_threads()}


def _as_json(value):
    """``value`` as JSON reads it back (a tuple as a list, a set as a sorted list)."""
    return json.loads(json.dumps(value, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))


def _run_info(run: Run, peft_config, prepared) -> dict:
    """What made the run, as JSON writes it: resume compares it with the checkpoint's."""
    return {
        "train_config": _as_json(asdict(run.train_config)),
        "lora_config": _as_json(peft_config.to_dict()),
        "data_config": _as_json(asdict(run.data_config)),
        "base_model": run.base_model_name,
        "data_fingerprint": ckpt.fingerprint_examples(prepared.train),
        "val_fingerprint": ckpt.fingerprint_examples(prepared.val),
        **distributed.run_info(),
    }


def save_adapter(model, folder: Path, run: Run) -> Path:
    """The adapter in PEFT's format, with the base it was trained on and the chat template it used."""

    def write(tmp: Path) -> None:
        write_adapter(model, tmp)  # PiSSA/OLoRA: as a plain LoRA of the untouched base
        write_adapter_info(tmp, base_reference(run.base_model_name), getattr(run.tokenizer, "chat_template", None))

    return publish(folder, write)


def merge_run(run: Run, adapter: Path) -> Path:
    """Merge the run's adapter into a fresh base: ``output_dir/final_merged``. A failure says where the
    adapter is, which it leaves as it was."""
    free_memory()
    out = ckpt.safe_child(run.out, "final_merged")
    if not distributed.is_main():  # torchrun: process 0 merges
        return out
    try:
        with output_lock(run.out):
            merge_adapter(
                adapter,
                out,
                run.base_model_name,
                allow_pickle=run.allow_pickle,
                trust_remote_code=run.trust_remote_code,
                overwrite=True,
            )  # this run's own final_merged/
    except Exception as error:  # the adapter is on disk already: nothing of the training is lost
        raise SmoLoRAError(
            f"{out}: merging failed ({reason(error)}); the trained adapter is safe in {adapter}: "
            f"merge it later with `smolora merge --adapter {adapter} --output DIR`"
        ) from error
    say(f"merged model saved to {out}")
    return out


def free_memory() -> None:
    """Give back what a model that is no longer referenced held (before the next one loads)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        torch.mps.empty_cache()


def earlier_run(out: Path) -> list[str]:
    """What an earlier run left in ``out`` (its folders and metrics file), which a new run replaces."""
    return [name for name in (*RUN_FOLDERS, "metrics.jsonl") if (out / name).exists()]


def check_output_dir(out: Path, resuming: bool, overwrite: bool, asked_to_resume: bool = False) -> None:
    """Refuse to train over another run's output unless resuming it or told to overwrite, and to
    write through a symbolic link."""
    if out.exists() and not out.is_dir():
        raise SmoLoRAError(f"{out}: output_dir exists and is not a folder")
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not os.access(probe, os.W_OK):
        raise SmoLoRAError(f"{out}: output folder is not writable")
    for name in (*RUN_FOLDERS, "metrics.jsonl", RUN_RECIPE):  # found before anything of an earlier run is deleted
        if (out / name).is_symlink():
            raise SmoLoRAError(
                f"{out / name}: is a symbolic link; SmoLoRA writes its outputs only inside the output "
                "folder: remove the link or choose another output folder"
            )
    earlier = earlier_run(out)  # what this run would replace
    if not resuming and not overwrite and earlier:
        if asked_to_resume:
            raise SmoLoRAError(
                f"{out}: holds an earlier run ({', '.join(earlier)}) but no complete checkpoint to resume; "
                "pass --overwrite to start over"
            )
        raise SmoLoRAError(
            f"{out}: holds an earlier run ({', '.join(earlier)}); "
            "pass --resume to continue it or --overwrite to replace it"
        )
