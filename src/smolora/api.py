"""The Python API with the spec's names: SmoLoRA(...).train() / save() / load_model() / inference()."""

from __future__ import annotations

import copy
import gc
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

from smolora import checkpoint as ckpt
from smolora import distributed
from smolora.config import DataConfig, LoraSettings, TrainConfig, expand_targets, lora_settings_from_peft, validate
from smolora.data import load_source, prepare_data
from smolora.errors import SmoLoRAError
from smolora.generate import generate
from smolora.lora import add_lora, format_parameter_report
from smolora.merge import load_adapter, merge_adapter, write_adapter_info
from smolora.models import ModelSource, base_reference, codes_source, load_model, load_tokenizer, pick_device, resolve_model
from smolora.train import TrainResult, train

RUN_FOLDERS = ("checkpoints", "adapter_checkpoint", "final_merged")  # what a run writes in output_dir, and --overwrite removes


class SmoLoRA:
    """Fine-tune a causal LM with LoRA.

    Args:
        base_model_name: a local HF folder, a .gguf file, a hub id, or None for the embedded
            SmolLM2-135M-Instruct.
        dataset_name: a data path, a ``datasets.Dataset``, a list of records, or
            ``{task: source or (source, weight)}`` for multi-task mixing.
        text_field: the field holding plain text (``sft_config.dataset_text_field``).
        output_dir: where ``adapter_checkpoint/``, ``final_merged/`` and checkpoints go.

    ``peft_config`` (a ``peft.LoraConfig``), ``sft_config`` (a ``TrainConfig``) and
    ``data_config`` may be edited after construction; edits take effect at ``train()``.
    """

    def __init__(
        self,
        base_model_name: str | None = None,
        dataset_name: Any = None,
        text_field: str = "text",
        output_dir: str = "./fine_tuned_model",
        *,
        trust_remote_code: bool = False,
        allow_pickle: bool = False,
    ):
        self.base_model_name = base_model_name
        self.output_dir = output_dir
        self.trust_remote_code = trust_remote_code
        self.allow_pickle = allow_pickle
        self.peft_config = LoraSettings().to_peft()
        self.sft_config = TrainConfig(output_dir=output_dir, dataset_text_field=text_field)
        self.data_config = DataConfig()
        self.dataset_name = dataset_name
        self.difficulty_fn: Callable[[Any], float] | None = None
        self._source: ModelSource | None = None  # resolved, and the tokenizer loaded, when first needed:
        self._tokenizer = None  # a first use of a GGUF converts it, which bad data should not wait for
        self.model = None
        self.adapter_checkpoint: str | None = None
        self.merged_model_path: str | None = None
        self.result: TrainResult | None = None

    @property
    def source(self) -> ModelSource:
        if self._source is None:
            self._source = resolve_model(self.base_model_name)
        return self._source

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.source, self.trust_remote_code)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, value) -> None:
        self._tokenizer = value

    @property
    def text_field(self) -> str:
        """The field holding plain text: ``sft_config.dataset_text_field``."""
        return self.sft_config.dataset_text_field

    @text_field.setter
    def text_field(self, value: str) -> None:
        self.sft_config.dataset_text_field = value

    @property
    def device(self) -> torch.device:
        device = pick_device(self.sft_config.device)
        return (distributed.local_device() or device) if device.type == "cuda" else device  # torchrun: one GPU each

    def train(self, resume: str | bool | None = None, overwrite: bool = False, allow_config_change: bool = False,
              skip_nonfinite_steps: int = 0) -> TrainResult:
        """Train the adapter and save it to ``output_dir/adapter_checkpoint``.

        Every setting and the data are checked before the model is loaded.
        """
        cfg, lora, data = self.sft_config, lora_settings_from_peft(self.peft_config), self.data_config
        validate(lora, cfg, data)
        out = Path(cfg.output_dir)
        resume_from = ckpt.find_resume_checkpoint(out, resume)
        _check_output_dir(out, resuming=resume_from is not None, overwrite=overwrite, asked_to_resume=bool(resume))
        if resume and resume_from is None and distributed.is_main():
            print(f"[smolora] nothing to resume in {out} yet: starting at step 0", flush=True)
        if self.dataset_name is None:
            raise SmoLoRAError("no training data: pass dataset_name")
        records = load_source(self.dataset_name, data, cfg.seed)
        val_records = load_source(data.validation_data, data, cfg.seed) if data.validation_data else None
        if any(self.source.lives_in(out / name) for name in RUN_FOLDERS):
            raise SmoLoRAError(f"{self.source.name}: the base model is inside {out}'s checkpoints/, adapter_checkpoint/ "
                               "or final_merged/, which this run replaces; copy it elsewhere or choose another output folder")
        prepared = prepare_data(records, self.tokenizer, cfg, data, val_records=val_records, difficulty=self.difficulty_fn,
                                log=print if distributed.is_main() else lambda *_: None)

        peft_config = copy.deepcopy(self.peft_config)  # every LoraConfig field the user set, presets expanded
        peft_config.target_modules = expand_targets(lora.target_modules)
        lora_config = json.loads(json.dumps(peft_config.to_dict(), default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
        run_info = {
            # as JSON writes them (a tuple setting reads back as a list): resume compares them with the checkpoint's
            "train_config": json.loads(json.dumps(asdict(cfg))), "lora_config": lora_config, "data_config": json.loads(json.dumps(asdict(data))),
            "base_model": self.base_model_name,
            "data_fingerprint": ckpt.fingerprint_examples(prepared.train), "val_fingerprint": ckpt.fingerprint_examples(prepared.val),
            **distributed.run_info(),
        }
        saved = ckpt.read_run_info(resume_from) if resume_from is not None else None
        if saved is not None:  # settings and data before the model loads; the model after
            ckpt.check_compatible(saved, run_info, allow_config_change)
        torch.manual_seed(cfg.seed)  # LoRA A init
        source = codes_source(self.source, self.device, cfg.weight_codes)  # 16-bit weights held as such (smolora.fast.codes)
        base = load_model(source, self.device, trust_remote_code=self.trust_remote_code, allow_pickle=self.allow_pickle)
        self.model = add_lora(base, peft_config)
        if distributed.is_main():
            print(format_parameter_report(self.model), flush=True)
        run_info["model_fingerprint"] = ckpt.fingerprint_model(self.model)
        if saved is not None:
            ckpt.check_compatible(saved, run_info, allow_config_change)
        if overwrite and resume_from is None and out.exists() and distributed.is_main():  # nothing of the earlier run may pass for this one's
            for name in RUN_FOLDERS:
                shutil.rmtree(out / name, ignore_errors=True)
            (out / "metrics.jsonl").unlink(missing_ok=True)
        self.result = train(self.model, prepared.train, cfg, val_examples=prepared.val, run_info=run_info,
                            resume_from=resume_from, pad_id=self.tokenizer.pad_token_id or 0,
                            skip_nonfinite_steps=skip_nonfinite_steps)
        folder = ckpt.safe_child(out, "adapter_checkpoint")
        if distributed.is_main():
            self._save_adapter(folder)
            print(f"[smolora] adapter saved to {folder}", flush=True)
        distributed.barrier(distributed.world(self.device))  # on disk before any process uses it
        self.adapter_checkpoint = str(folder)
        return self.result

    def _save_adapter(self, folder: Path) -> Path:
        def write(tmp: Path) -> None:
            self.model.save_pretrained(str(tmp), safe_serialization=True)
            write_adapter_info(tmp, base_reference(self.base_model_name), getattr(self.tokenizer, "chat_template", None))

        folder = ckpt.atomic_folder(folder, write)
        (folder / ckpt.MARKER).unlink(missing_ok=True)
        return folder

    def save(self) -> str:
        """Free the training model, merge the adapter into a fresh base, save ``final_merged/``."""
        if self.adapter_checkpoint is None:
            raise SmoLoRAError("nothing to merge: call train() first")
        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            torch.mps.empty_cache()
        out = ckpt.safe_child(self.sft_config.output_dir, "final_merged")
        if not distributed.is_main():  # torchrun: process 0 merges
            self.merged_model_path = str(out)
            return self.merged_model_path
        merge_adapter(self.adapter_checkpoint, out, self.base_model_name,  # this run's own final_merged/
                      allow_pickle=self.allow_pickle, trust_remote_code=self.trust_remote_code, overwrite=True)
        self.merged_model_path = str(out)
        print(f"[smolora] merged model saved to {out}", flush=True)
        return self.merged_model_path

    def load_model(self, path: str):
        """Load a merged model folder (or an adapter folder, attached to its base): (model, tokenizer)."""
        folder = Path(path)
        if (folder / "adapter_config.json").is_file():
            from smolora.merge import adapter_base_reference, adapter_tokenizer

            source = resolve_model(adapter_base_reference(folder))
            base = load_model(source, self.device, trust_remote_code=self.trust_remote_code, allow_pickle=self.allow_pickle)
            model = load_adapter(base, folder)
            self.tokenizer = adapter_tokenizer(source, folder, self.trust_remote_code)
        else:
            source = resolve_model(str(folder))
            model = load_model(source, self.device, trust_remote_code=self.trust_remote_code, allow_pickle=self.allow_pickle)
            self.tokenizer = load_tokenizer(source, self.trust_remote_code)
        model.eval()
        self.model = model
        return self.model, self.tokenizer

    def inference(self, prompt: str, max_new_tokens: int = 200, do_sample: bool = True, temperature: float = 1.0,
                  echo: bool = False) -> str:
        """Generate a reply to ``prompt`` (chat template applied for chat models)."""
        if self.model is None:
            self.load_model(self.merged_model_path or self.adapter_checkpoint or self.source.folder)
        return generate(self.model, self.tokenizer, prompt, max_new_tokens, do_sample, temperature, echo=echo)


def earlier_run(out: Path) -> list[str]:
    """What an earlier run left in ``out`` (its folders and metrics file), which a new run replaces."""
    return [name for name in (*RUN_FOLDERS, "metrics.jsonl") if (out / name).exists()]


def _check_output_dir(out: Path, resuming: bool, overwrite: bool, asked_to_resume: bool = False) -> None:
    """Refuse to train over another run's output unless resuming it or told to overwrite."""
    if out.exists() and not out.is_dir():
        raise SmoLoRAError(f"{out}: output_dir exists and is not a folder")
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not os.access(probe, os.W_OK):
        raise SmoLoRAError(f"{out}: output folder is not writable")
    earlier = earlier_run(out)  # what this run would replace
    if not resuming and not overwrite and earlier:
        if asked_to_resume:
            raise SmoLoRAError(f"{out}: holds an earlier run ({', '.join(earlier)}) but no complete checkpoint to resume; "
                               "pass --overwrite to start over")
        raise SmoLoRAError(f"{out}: holds an earlier run ({', '.join(earlier)}); pass --resume to continue it or --overwrite to replace it")
