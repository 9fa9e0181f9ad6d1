"""The Python API with the spec's names: SmoLoRA(...).train() / save() / load_model() / inference()."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from smolora.config import DataConfig, LoraSettings, TrainConfig
from smolora.errors import SmoLoRAError
from smolora.generate import generate
from smolora.merge import load_adapter
from smolora.models import ModelSource, load_model, load_tokenizer, resolve_model
from smolora.run import Run, device_for, merge_run, train_adapter
from smolora.train import TrainResult


class SmoLoRA:
    """Fine-tune a causal LM with LoRA.

    Args:
        base_model_name: a local HF folder, a .gguf file, a hub id, or None for the embedded
            SmolLM2-135M-Instruct.
        dataset_name: a data path, a ``datasets.Dataset``, a list of records, or
            ``{task: source or (source, weight)}`` for multi-task mixing.
        text_field: the field holding plain text (``data_config.dataset_text_field``).
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
        self.sft_config = TrainConfig(output_dir=output_dir)
        self.data_config = DataConfig(dataset_text_field=text_field)
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
        """The field holding plain text: ``data_config.dataset_text_field``."""
        return self.data_config.dataset_text_field

    @text_field.setter
    def text_field(self, value: str) -> None:
        self.data_config.dataset_text_field = value

    @property
    def device(self) -> torch.device:
        return device_for(self.sft_config)

    def train(
        self,
        resume: str | bool | None = None,
        overwrite: bool = False,
        allow_config_change: bool = False,
        skip_nonfinite_steps: int = 0,
    ) -> TrainResult:
        """Train the adapter and save it to ``output_dir/adapter_checkpoint`` (``smolora.run.train_adapter``).

        Every setting and the data are checked before the model is loaded.
        """
        run = self._run()
        done = train_adapter(
            run,
            self.device,
            resume=resume,
            overwrite=overwrite,
            allow_config_change=allow_config_change,
            skip_nonfinite_steps=skip_nonfinite_steps,
        )
        self._source, self._tokenizer = run.source, run.tokenizer
        self.model, self.result, self.adapter_checkpoint = done.model, done.train, str(done.adapter)
        return self.result

    def save(self) -> str:
        """Free the training model, merge the adapter into a fresh base, save ``final_merged/``."""
        if self.adapter_checkpoint is None:
            raise SmoLoRAError("nothing to merge: call train() first")
        self.model = None
        self.merged_model_path = str(merge_run(self._run(), Path(self.adapter_checkpoint)))
        return self.merged_model_path

    def _run(self) -> Run:
        return Run(
            self.base_model_name,
            self.dataset_name,
            self.peft_config,
            self.sft_config,
            self.data_config,
            self.difficulty_fn,
            self.trust_remote_code,
            self.allow_pickle,
            self._source,
            self._tokenizer,
        )

    def load_model(self, path: str):
        """Load a merged model folder (or an adapter folder, attached to its base): (model, tokenizer)."""
        folder = Path(path)
        if (folder / "adapter_config.json").is_file():
            from smolora.merge import adapter_base_reference, adapter_tokenizer

            source = resolve_model(adapter_base_reference(folder))
            base = load_model(
                source, self.device, trust_remote_code=self.trust_remote_code, allow_pickle=self.allow_pickle
            )
            model = load_adapter(base, folder)
            self.tokenizer = adapter_tokenizer(source, folder, self.trust_remote_code)
        else:
            source = resolve_model(str(folder))
            model = load_model(
                source, self.device, trust_remote_code=self.trust_remote_code, allow_pickle=self.allow_pickle
            )
            self.tokenizer = load_tokenizer(source, self.trust_remote_code)
        model.eval()
        self.model = model
        return self.model, self.tokenizer

    def inference(
        self,
        prompt: str,
        max_new_tokens: int = 200,
        do_sample: bool = True,
        temperature: float = 1.0,
        echo: bool = False,
    ) -> str:
        """Generate a reply to ``prompt`` (chat template applied for chat models)."""
        if self.model is None:
            self.load_model(self.merged_model_path or self.adapter_checkpoint or self.source.folder)
        return generate(self.model, self.tokenizer, prompt, max_new_tokens, do_sample, temperature, echo=echo)
