"""Merge a LoRA adapter into a fresh copy of its base model and save a standalone model.

W' = W + (lora_alpha / r) · B · A for every adapted linear layer, computed in fp32 by PEFT's
``merge_and_unload``; every merged tensor is checked for NaN/inf before anything is written,
and the output folder appears only once complete.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError

from smolora.errors import SmoLoRAError, check_writable_place, load_mismatch, reason
from smolora.fast import forget_codes
from smolora.lora import moves_base_weights, quiet_peft, tied_adapted_embeddings
from smolora.models import ModelSource, load_model, load_tokenizer, resolve_model
from smolora.paths import publish

RUN_FILE = "smolora.json"  # written beside the adapter: its base model, the chat template it was trained with


def write_adapter_info(adapter_dir: Path, base_reference: str | None, chat_template: str | None = None) -> None:
    info = {"base_model": base_reference, **({"chat_template": chat_template} if chat_template else {})}
    (Path(adapter_dir) / RUN_FILE).write_text(json.dumps(info) + "\n")


def _read_json(path: Path) -> dict:
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SmoLoRAError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(info, dict):
        raise SmoLoRAError(f"{path}: expected a JSON object")
    return info


def adapter_tokenizer(source: ModelSource, adapter_dir: str | Path, trust_remote_code: bool = False):
    """The base model's tokenizer, given the chat template the adapter was trained with where the
    base has none (chat data on such a base is rendered with ChatML)."""
    tokenizer = load_tokenizer(source, trust_remote_code)
    info = Path(adapter_dir) / RUN_FILE
    trained_with = _read_json(info).get("chat_template") if info.is_file() else None
    if trained_with and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = trained_with
    return tokenizer


def adapter_base_reference(adapter_dir: str | Path) -> str | None:
    """The base model an adapter was trained on, as the user named it (None: embedded)."""
    adapter_dir = Path(adapter_dir)
    info = adapter_dir / RUN_FILE
    if info.is_file():
        return _read_json(info).get("base_model")
    config = adapter_dir / "adapter_config.json"
    if not config.is_file():
        raise SmoLoRAError(f"{adapter_dir}: not an adapter folder (no adapter_config.json)")
    return _read_json(config).get("base_model_name_or_path")


def check_adapter_dir(adapter_dir: str | Path) -> Path:
    path = Path(adapter_dir)
    if not (path / "adapter_config.json").is_file():
        raise SmoLoRAError(f"{path}: not an adapter folder (no adapter_config.json)")
    if not (path / "adapter_model.safetensors").is_file():
        raise SmoLoRAError(
            f"{path}: adapter weights must be adapter_model.safetensors (pickled .bin adapters are refused)"
        )
    return path


def load_adapter(base_model, adapter_dir: str | Path, trainable: bool = False):
    """Attach a saved adapter (safetensors only) to ``base_model``, unmerged."""
    from peft import PeftModel

    path = check_adapter_dir(adapter_dir)
    init = _read_json(path / "adapter_config.json").get("init_lora_weights")
    if moves_base_weights(init):  # a PiSSA/OLoRA run's checkpoint: its factors fit the moved base only
        raise SmoLoRAError(
            f"{path / 'adapter_config.json'}: init_lora_weights {init} fits only the base its init moved (a "
            "training checkpoint); use the run's adapter_checkpoint/, saved as a plain LoRA of the base"
        )
    try:
        with quiet_peft():
            return PeftModel.from_pretrained(base_model, str(path), is_trainable=trainable)
    except SafetensorError as e:
        raise SmoLoRAError(f"{path / 'adapter_model.safetensors'}: not readable ({reason(e)[:200]})") from None
    except RuntimeError as e:  # load_state_dict: shapes that do not match this base
        raise SmoLoRAError(f"{path}: the adapter does not fit this base model ({load_mismatch(e)})") from None
    except (ValueError, KeyError, TypeError) as e:  # a config PEFT refuses: an unknown type, a rank of 0
        raise SmoLoRAError(f"{path / 'adapter_config.json'}: PEFT refuses it ({reason(e)[:200]})") from None


def merge_and_unload(peft_model):
    """PEFT's ``merge_and_unload``, except for an adapted embedding or ``lm_head`` whose weight the two
    share: merged into the shared tensor, its update would change the other module too. It gets a
    weight of its own instead, and the config says the two are no longer tied."""
    lm = peft_model.get_base_model()
    adapted = tied_adapted_embeddings(peft_model)
    for module in adapted:
        base = module.get_base_layer()
        base.weight = torch.nn.Parameter(base.weight.detach().clone(), requires_grad=False)
    if adapted:
        for config in {id(c): c for c in (lm.config, lm.config.get_text_config())}.values():
            config.tie_word_embeddings = False
    forget_codes(lm)  # its weights are no longer its folder's
    return peft_model.merge_and_unload()


def merged_model(
    source: ModelSource,
    adapter_dir: str | Path,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    device: torch.device | str = "cpu",
):
    """Fresh fp32 base + adapter, merged and unloaded; raises if any weight is not finite."""
    base = load_model(source, device, torch.float32, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    model = merge_and_unload(load_adapter(base, adapter_dir))
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise SmoLoRAError(f"merge: {name} has NaN/inf values after merging; nothing was written")
    return model


# What a merged model folder holds: the model, its config and tokenizer files (as transformers saves them).
MODEL_FILES = re.compile(
    r"(config|generation_config|tokenizer|tokenizer_config|special_tokens_map|added_tokens|vocab"
    r"|merges|chat_template)\.(json|txt|jinja)|model(-\d+-of-\d+)?\.safetensors(\.index\.json)?"
    r"|tokenizer\.model|COMPLETE"
)


def merge_adapter(
    adapter_dir: str | Path,
    output_dir: str | Path,
    base_model: str | None = None,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    overwrite: bool = False,
) -> Path:
    """Merge ``adapter_dir`` into its base model and save a standalone HF folder at ``output_dir``.

    The folder holds config.json, generation_config.json, model.safetensors, the tokenizer files
    and chat template; transformers loads it with no smolora installed. A folder already at
    ``output_dir`` is replaced only with ``overwrite``, and never one holding the adapter or the base.
    """
    out = Path(output_dir)
    reference = base_model if base_model is not None else adapter_base_reference(adapter_dir)
    source = resolve_model(reference)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise SmoLoRAError(f"{out}: exists and is not empty; pass --overwrite to replace it")
        adapter = Path(adapter_dir).resolve()
        if source.lives_in(out) or out.resolve() in (adapter, *adapter.parents):
            raise SmoLoRAError(f"{out}: holds the adapter or the base model being merged; choose another output folder")
        foreign = (
            sorted(p.name for p in out.iterdir() if not MODEL_FILES.fullmatch(p.name)) if out.is_dir() else [out.name]
        )
        if foreign:  # --overwrite replaces a merged model, never a folder of other things
            raise SmoLoRAError(
                f"{out}: holds {foreign[0]!r}{' and more' if len(foreign) > 1 else ''}, which a merge does "
                "not write; --overwrite replaces only a merged model: choose another output folder"
            )
    check_writable_place(out, "merge output")
    model = merged_model(source, adapter_dir, allow_pickle, trust_remote_code)
    tokenizer = adapter_tokenizer(source, adapter_dir, trust_remote_code)
    model.config.use_cache = True

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))

    try:
        return publish(out, write)
    except (OSError, SafetensorError) as error:  # a full disk: nothing half-written is left
        raise SmoLoRAError(f"{out}: could not write the merged model ({reason(error)})") from error
