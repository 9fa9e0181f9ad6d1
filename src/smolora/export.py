"""Export a model as one GGUF file, the format llama.cpp, Ollama and LM Studio run.

The weights are written under llama.cpp's tensor names (gguf-py's own name map, the one its
converter uses), with the architecture's hyperparameters, the tokenizer and the chat template as
metadata. Tokenizers: byte-level BPE (tokens, merges, special tokens; SmolLM2, Llama 3, Qwen) or
SentencePiece-style BPE with byte fallback (tokens, scores, types; Llama 2, Gemma, Phi-3:
``smolora.gguf_vocab``). Norms and biases stay float32; the
matrices are written as ``f32``, ``f16``, ``bf16`` or ``q8_0`` (8-bit blocks of 32 with an f16
scale; ``q5_1``, ``q5_0``, ``q4_1``, ``q4_0`` likewise at 5 and 4 bits, the token embedding and
output matrix kept at q8_0; a matrix whose rows do not split into blocks is written f16). Supported: Llama
(SmolLM2, Llama 2, others without rope scaling), Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3 (text: its norms
written as llama.cpp reads them, 1 + w) and Phi-3 (its fused q/k/v and gate/up matrices as they are).
transformers reads all but Gemma back from GGUF, which is how the tests check every export;
tests/test_llamacpp.py and tests/test_export_archs.py also run the files in a real llama.cpp (Gemma
there alone), and exporting the embedded model reproduces the file llama.cpp's converter
made (test). ``general.*`` metadata names the base and the fine-tune as the converter does; an Ollama
Modelfile is written beside each file (``smolora.ollama``). ``export_lora_gguf`` writes an adapter
alone as a llama.cpp LoRA file, applied to the base file at load time.
"""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path

import numpy as np
import torch

from smolora.errors import SmoLoRAError, check_writable_file
from smolora.gguf_vocab import spm_spec, write_spm_tokenizer
from smolora.paths import publish

LOW_BIT = ("q5_1", "q5_0", "q4_1", "q4_0")  # these keep the token embedding and output matrix at q8_0
# Named mixes: a low-bit type, with the matrices named (parts of GGUF names) kept at q8_0. q5_0_qv keeps
# attention's q and v, the spec's default LoRA targets, where a q/v fine-tune's update lives: on the
# demo's task (60 steps, two sets of 50 held-out dates) it kept 98% and 98% where q5_0 kept 96% and 98%
# and q4_0 70% and 82%, at a lower loss than q5_0 on both, 24% smaller than q8_0 (smolora.quantize).
MIXES = {"q5_0_qv": ("q5_0", ("attn_q", "attn_v"))}
TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", *MIXES)
# transformers' model_type -> llama.cpp's architecture (gguf-py's MODEL_ARCH name)
GGUF_ARCH = {
    "llama": "LLAMA",
    "qwen2": "QWEN2",
    "qwen3": "QWEN3",
    "gemma": "GEMMA",
    "gemma2": "GEMMA2",
    "gemma3_text": "GEMMA3",
    "phi3": "PHI3",
}
ARCHITECTURES = tuple(GGUF_ARCH)
READ_BACK = tuple(a for a in ARCHITECTURES if a != "gemma")  # what transformers' GGUF loader reads (export --check)
GEMMAS = ("gemma", "gemma2", "gemma3_text")  # norms stored as 1 + w
# llama.cpp splits text before BPE by the pre-tokenizer this key names, and refuses a name it does
# not know. Named here: GPT-2's own split, and the regexes of the Llama 3 and Qwen2 tokenizers.
GPT2_PRE = "gpt-2"
_WORDS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"  # contractions, then words
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"  # punctuation, newlines, spaces
SPLIT_PRE = {
    _WORDS + r"\p{N}{1,3}" + _REST: "llama-bpe",  # numbers in groups of up to 3 digits
    _WORDS + r"\p{N}" + _REST: "qwen2",  # numbers digit by digit
}


def check_output(path: str | Path, dtype: str, overwrite: bool = False) -> Path:
    """Refuse a bad output name or type before any model is loaded."""
    path = Path(path)
    if dtype not in TYPES:
        raise SmoLoRAError(f"--type {dtype!r}: expected one of {', '.join(TYPES)}")
    if path.suffix != ".gguf":
        raise SmoLoRAError(f"{path}: the output file's name must end in .gguf")
    check_writable_file(path, "--output")
    if path.exists() and not overwrite:
        raise SmoLoRAError(f"{path}: exists; pass --overwrite to replace it")
    return path


def check_exportable(config, tokenizer) -> None:
    """Refuse what cannot be written, from the model's config and tokenizer (before its weights load)."""
    arch = config.model_type
    if arch not in ARCHITECTURES:
        raise SmoLoRAError(
            f"{config.name_or_path or 'model'}: GGUF export supports {', '.join(ARCHITECTURES)} models, not {arch!r}"
        )
    for rope in _rope_parameters(config).values():
        if rope.get("rope_type", "default") != "default":
            raise SmoLoRAError(
                f"export: rope scaling {rope['rope_type']!r} is not supported; only plain rotary embeddings"
            )
    if arch in ("llama", "qwen2", "qwen3"):
        if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
            raise SmoLoRAError("export: models with sliding-window attention are not supported")
    elif arch in GEMMAS:
        _check_gemma(config)
    elif arch == "phi3" and config.hidden_act != "silu":
        raise SmoLoRAError(f"export: phi3 hidden_act {config.hidden_act!r}: llama.cpp runs Phi-3 with silu only")
    _tokenizer_spec(tokenizer, config.vocab_size)


def _check_gemma(config) -> None:
    """What llama.cpp fixes for a Gemma and a config could set otherwise: an error naming the first such field."""
    arch = config.model_type
    act = "hidden_activation" if getattr(config, "hidden_activation", None) else "hidden_act"
    rules = [
        (act, str(getattr(config, act)).startswith("gelu"), "GELU (its tanh form)"),
        ("tie_word_embeddings", arch == "gemma3_text" or config.tie_word_embeddings, "its head tied to the embedding"),
    ]
    if arch != "gemma":
        every = 2 if arch == "gemma2" else 6  # every 2nd (Gemma 2) or 6th (Gemma 3) layer global, the rest windowed
        layers = range(config.num_hidden_layers)
        pattern = ["sliding_attention" if (i + 1) % every else "full_attention" for i in layers]
        softcaps = (config.attn_logit_softcapping, config.final_logit_softcapping)
        rules += [
            ("query_pre_attn_scalar", config.query_pre_attn_scalar == config.head_dim, f"head_dim {config.head_dim}"),
            ("sliding_window", bool(config.sliding_window), "a window"),
            ("layer_types", list(config.layer_types) == pattern, f"a global layer every {every}"),
            (
                "attn_logit_softcapping",
                None not in softcaps if arch == "gemma2" else softcaps == (None, None),
                "attention and final softcaps" if arch == "gemma2" else "no softcaps",
            ),
        ]
    if arch == "gemma3_text":
        local = _rope_parameters(config).get("sliding_attention", {}).get("rope_theta", 10000.0)
        rules.append(("rope_parameters", local == 10000.0, "sliding_attention rope_theta 10000.0"))
    for field, ok, expected in rules:
        if not ok:
            value = getattr(config, field)
            raise SmoLoRAError(f"export: {arch} {field} {value!r}: llama.cpp runs it with {expected} only")


def _rope_parameters(config) -> dict[str, dict]:
    """The rotary settings by kind of layer: Gemma 3 keeps one for its sliding-window layers beside
    the global layers' (``full_attention``, the one llama.cpp's ``rope.freq_base`` holds)."""
    rope = getattr(config, "rope_parameters", None) or {}
    if rope and all(isinstance(v, dict) for v in rope.values()):
        return rope
    return {"full_attention": {"rope_theta": getattr(config, "rope_theta", 10000.0), **rope}}


def _tokenizer_spec(tokenizer, vocab_size: int) -> tuple[str, dict]:
    """(llama.cpp's tokenizer model, the tokenizer.json spec): byte-level BPE is ``gpt2``, SentencePiece-style
    BPE ``llama``; an error for any other kind, or for token ids beyond the model's embeddings."""
    spec, kind = spm_spec(tokenizer), "llama"
    if spec is None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        spec, kind = (json.loads(backend.to_str()) if backend is not None else {}), "gpt2"
        if (spec.get("model") or {}).get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
            raise SmoLoRAError(
                "export: only byte-level BPE tokenizers (GPT-2 style: SmolLM2, Llama 3, Qwen) or SentencePiece-style "
                "BPE with byte fallback (Llama 2, Gemma, Phi-3) can be written to GGUF"
            )
    top = max([*spec["model"]["vocab"].values(), *(t["id"] for t in spec.get("added_tokens", []))])
    if top >= vocab_size:
        raise SmoLoRAError(f"export: the tokenizer has token ids up to {top}, the model only {vocab_size} embeddings")
    return kind, spec


def export_gguf(
    model,
    tokenizer,
    path: str | Path,
    dtype: str = "f16",
    *,
    name: str | None = None,
    overwrite: bool = False,
    base: str | Path | None = None,
    finetune: str | None = None,
    modelfile: bool = True,
    q8_0_for: tuple[str, ...] = (),
) -> Path:
    """Write ``model`` (a transformers causal LM, merged: no adapters) and its tokenizer to ``path``.

    ``base`` (the .gguf file or model folder the fine-tune started from) and ``finetune`` (its name,
    default ``name``, else the file's stem) fill the ``general.*`` metadata as llama.cpp's converter does. With
    ``modelfile``, an Ollama Modelfile is written beside the file (``smolora.ollama``). The files
    appear only once complete; an existing file is replaced only with ``overwrite``. ``q8_0_for``:
    parts of GGUF tensor names (``attn_v``, ``ffn_down``) whose matrices stay q8_0 under a lower type.
    """
    import gguf

    path = check_output(path, dtype, overwrite)
    if dtype in MIXES:  # a named mix: its low-bit type, its matrices at q8_0
        dtype, q8_0_for = MIXES[dtype][0], (*q8_0_for, *MIXES[dtype][1])
    config = model.config
    check_exportable(config, tokenizer)
    if any("lora_" in n for n, _ in model.named_parameters()):
        raise SmoLoRAError("export: the model still has LoRA adapters; merge them first (smolora merge)")
    arch = config.model_type
    gguf_arch = getattr(gguf.MODEL_ARCH, GGUF_ARCH[arch])
    origin = base if base is not None else (config.name_or_path or None)

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf_arch])
        _write_general(writer, model, origin, name, finetune or name or path.stem)
        _write_hyperparameters(writer, config, dtype)
        _write_tokenizer(writer, tokenizer, config.vocab_size)
        names = gguf.get_tensor_name_map(gguf_arch, config.num_hidden_layers)
        _write_tensors(writer, model, names, arch, dtype, q8_0_for)
        _finish(writer)

    _publish_file(path, write)
    if modelfile:
        from smolora.ollama import modelfile_path, write_modelfile

        try:
            write_modelfile(path, tokenizer)
        except OSError as e:
            where = modelfile_path(path)
            raise SmoLoRAError(f"{where}: cannot write it ({e.strerror or e}); {path} is written whole") from None
    return path


def base_metadata(base: str | Path | None) -> dict:
    """What is known of the model a fine-tune started from, as ``general.*`` values (no prefix):
    from a .gguf file its own keys, from a folder its model card's (README.md) name, license, languages."""
    import gguf

    if base is None:
        return {}
    base = Path(base)
    if base.suffix == ".gguf" and base.is_file():
        try:
            fields = gguf.GGUFReader(base).fields
        except (ValueError, OSError):
            return {}
        keys = ("name", "organization", "basename", "finetune", "size_label", "license", "languages")
        return {k: fields[f"general.{k}"].contents() for k in keys if f"general.{k}" in fields}
    if not (base / "README.md").is_file():
        return {}  # a folder's name says little (final_merged, a cache): only a model card is read
    try:
        card = gguf.Metadata.load_model_card(base) or {}
    except Exception:  # noqa: BLE001 - a card whose front matter is not YAML says nothing here
        return {}
    languages = card.get("language") or card.get("languages")
    known = {
        "name": card.get("model_name"),
        "license": card.get("license"),
        "languages": [languages] if isinstance(languages, str) else languages,
    }
    return {k: v for k, v in known.items() if v}


def general_metadata(base: str | Path | None, total_params: int, name: str | None, finetune: str) -> dict:
    """The ``general.*`` values of a fine-tune of ``base``, as llama.cpp's converter names them: its
    base's basename, license and languages, its own size label and finetune, the base as base_model.0."""
    import gguf

    known = base_metadata(base)
    size = gguf.size_label(total_params, 0, 0, 0)
    basename = known.get("basename") or known.get("name")
    general = {
        "name": name or (f"{basename} {size} {finetune}" if basename else finetune),
        "basename": basename,
        "finetune": finetune,
        "size_label": size,
        "license": known.get("license"),
        "languages": known.get("languages"),
    }
    if known.get("name"):
        general["base_model"] = {"name": known["name"], "organization": known.get("organization")}
    return {k: v for k, v in general.items() if v}


def _write_general(writer, model, base, name: str | None, finetune: str) -> None:
    import gguf

    general = general_metadata(base, model.num_parameters(), name, finetune)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(general["name"])
    for key in ("basename", "finetune", "size_label"):
        if key in general:
            writer.add_string(f"general.{key}", general[key])
    if "license" in general:
        writer.add_license(",".join(general["license"]) if isinstance(general["license"], list) else general["license"])
    if "languages" in general:
        writer.add_languages(list(general["languages"]))
    if "base_model" in general:
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, general["base_model"]["name"])
        if general["base_model"]["organization"]:
            writer.add_base_model_organization(0, general["base_model"]["organization"])


def _write_hyperparameters(writer, config, dtype: str) -> None:
    import gguf

    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = _rope_parameters(config)["full_attention"]
    writer.add_file_type(
        gguf.LlamaFileType.ALL_F32 if dtype == "f32" else getattr(gguf.LlamaFileType, f"MOSTLY_{dtype.upper()}")
    )
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    if head_dim != config.hidden_size // heads or config.model_type in GEMMAS:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if config.model_type in ("gemma2", "gemma3_text"):  # the windowed layers' window
        writer.add_sliding_window(config.sliding_window)
    if config.model_type == "gemma2":
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    if config.model_type == "phi3":  # its sliding window is not written: llama.cpp turns Phi-3's off
        original = getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings
        writer.add_rope_scaling_orig_ctx_len(original)


def _write_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """The vocabulary (byte-level BPE as llama.cpp's ``gpt2`` model, SentencePiece-style BPE as its ``llama``
    model; padded to the embedding's rows), the special token ids, and the chat template."""
    kind, spec = _tokenizer_spec(tokenizer, vocab_size)
    if kind == "llama":
        write_spm_tokenizer(writer, tokenizer, spec, vocab_size)
    else:
        _write_byte_level_bpe(writer, spec, vocab_size)
    for token, add in (
        ("bos", writer.add_bos_token_id),
        ("eos", writer.add_eos_token_id),
        ("unk", writer.add_unk_token_id),
        ("pad", writer.add_pad_token_id),
    ):
        token_id = getattr(tokenizer, f"{token}_token_id", None)
        if token_id is not None:
            add(token_id)
    probe = tokenizer("a").input_ids
    writer.add_add_bos_token(bool(probe) and tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id)
    if kind == "llama":  # llama.cpp adds no EOS to a SentencePiece vocabulary that does not say so
        writer.add_add_eos_token(bool(probe) and probe[-1] == tokenizer.eos_token_id)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def _write_byte_level_bpe(writer, spec: dict, vocab_size: int) -> None:
    """Byte-level BPE as llama.cpp's ``gpt2`` tokenizer model: tokens, types, merges, pre-tokenizer."""
    import gguf

    bpe = spec["model"]
    ids = {**bpe["vocab"], **{t["content"]: t["id"] for t in spec.get("added_tokens", [])}}
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, i in ids.items():
        tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for t in spec.get("added_tokens", []):
        types[t["id"]] = gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    pre = _pre_tokenizer(spec.get("pre_tokenizer") or {}, tokens, merges)
    if pre:
        writer.add_tokenizer_pre(pre)
    else:
        warnings.warn(
            "export: this tokenizer's pre-tokenizer has no llama.cpp name; llama.cpp will split text "
            "its default way, which may tokenize some text differently",
            stacklevel=4,
        )
    byte_level = [
        p
        for p in [spec["pre_tokenizer"], *spec["pre_tokenizer"].get("pretokenizers", [])]
        if p.get("type") == "ByteLevel"
    ]
    writer.add_add_space_prefix(bool(byte_level[0].get("add_prefix_space")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)


def _pre_tokenizer(spec: dict, tokens: list[str], merges: list[str]) -> str | None:
    """llama.cpp's name for how this tokenizer splits text before BPE, where it has one."""
    steps = spec.get("pretokenizers", []) if spec.get("type") == "Sequence" else [spec]
    kinds = [(s.get("type"), s.get("use_regex", True), s.get("individual_digits")) for s in steps]
    if kinds == [("ByteLevel", True, None)]:
        # The embedded model's tokenizer as transformers rebuilds it from its GGUF; keep its name
        embedded_tokens, embedded_merges, pre = _embedded_tokenizer()
        return pre if (tokens, merges) == (embedded_tokens, embedded_merges) else GPT2_PRE
    if kinds == [("Digits", True, True), ("ByteLevel", True, None)]:
        return "smollm"
    if len(kinds) == 2 and kinds[0][0] == "Split" and kinds[1][:2] == ("ByteLevel", False):
        return SPLIT_PRE.get((steps[0].get("pattern") or {}).get("Regex"))
    return None


@functools.lru_cache(maxsize=1)  # reading the embedded GGUF's metadata takes seconds
def _embedded_tokenizer() -> tuple[list[str], list[str], str | None]:
    from gguf import GGUFReader

    from smolora.models import embedded_gguf_path

    try:
        fields = GGUFReader(embedded_gguf_path()).fields
    except (SmoLoRAError, OSError):
        return [], [], None

    def strings(key: str) -> list[str]:
        return [bytes(fields[key].parts[i]).decode("utf-8") for i in fields[key].data]

    return strings("tokenizer.ggml.tokens"), strings("tokenizer.ggml.merges"), fields["tokenizer.ggml.pre"].contents()


def _permute_rope(weight: np.ndarray, heads: int) -> np.ndarray:
    """HF's rotate-half layout of a q/k projection's rows (or bias) -> llama.cpp's interleaved pairs
    (what llama.cpp's converter does for Llama; transformers' GGUF reader undoes it)."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def _write_tensors(writer, model, names, arch: str, dtype: str, q8_0_for: tuple[str, ...] = ()) -> None:

    config = model.config
    tied = config.tie_word_embeddings
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp uses the token embedding when there is no output matrix
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise SmoLoRAError(f"export: no GGUF name for the model's tensor {hf_name!r}")
        data = tensor.detach().to("cpu", torch.float32).numpy()
        if arch in GEMMAS and gguf_name.endswith("norm.weight"):
            data = data + np.float32(1)  # Gemma scales by 1 + w, llama.cpp by the weight as stored
        if arch == "llama" and gguf_name.endswith(("attn_q.weight", "attn_k.weight", "attn_q.bias", "attn_k.bias")):
            heads = config.num_attention_heads if "attn_q" in gguf_name else config.num_key_value_heads
            data = _permute_rope(data, heads)
        kept = "q8_0" if dtype in LOW_BIT and gguf_name in ("token_embd.weight", "output.weight") else dtype
        kept = "q8_0" if dtype in LOW_BIT and any(f".{part}." in gguf_name for part in q8_0_for) else kept
        array, raw_dtype = _encode(data, kept)
        writer.add_tensor(gguf_name, array, raw_dtype=raw_dtype)


def _encode(data: np.ndarray, dtype: str):
    """(array, raw_dtype) for the writer: vectors stay f32, matrices take ``dtype`` (f16 where
    their rows do not split into the type's blocks)."""
    import gguf

    if data.ndim < 2 or dtype == "f32":
        return np.ascontiguousarray(data, dtype=np.float32), None
    if dtype == "f16":
        return data.astype(np.float16), None
    kind = getattr(gguf.GGMLQuantizationType, dtype.upper())
    if data.shape[-1] % gguf.GGML_QUANT_SIZES[kind][0]:
        return data.astype(np.float16), None
    return gguf.quants.quantize(data, kind), kind


LORA_TYPES = ("f32", "f16", "bf16", "q8_0")  # what llama.cpp's LoRA converter writes


def export_lora_gguf(
    adapter_dir: str | Path,
    base_config,
    path: str | Path,
    dtype: str = "f16",
    *,
    name: str | None = None,
    overwrite: bool = False,
    base: str | Path | None = None,
) -> Path:
    """Write a PEFT LoRA adapter as a llama.cpp LoRA adapter file (``--lora``, Ollama's ``ADAPTER``).

    As llama.cpp's convert_lora_to_gguf.py: ``general.type=adapter``, ``adapter.type=lora``,
    ``adapter.lora.alpha``, and per adapted matrix ``<gguf name>.lora_a`` (r, in) and ``.lora_b``
    (out, r), llama.cpp computing W + alpha/r·B·A. A q/k projection's B rows take the rotary
    reordering its base matrix took. Only ``base_config`` (the base model's config) is needed, no weights.
    """
    import gguf

    path = check_output(path, dtype, overwrite)
    if dtype not in LORA_TYPES:
        raise SmoLoRAError(f"--type {dtype!r}: an adapter GGUF is written as one of {', '.join(LORA_TYPES)}")
    arch = base_config.model_type
    if arch not in ARCHITECTURES:
        raise SmoLoRAError(f"{adapter_dir}: GGUF export supports {', '.join(ARCHITECTURES)} models, not {arch!r}")
    settings, pairs = _read_lora(Path(adapter_dir))
    gguf_arch = getattr(gguf.MODEL_ARCH, GGUF_ARCH[arch])
    names = gguf.get_tensor_name_map(gguf_arch, base_config.num_hidden_layers)
    alpha = float(settings["lora_alpha"])
    tensors = [_lora_tensors(module, a, b, settings, alpha, names, base_config) for module, (a, b) in pairs.items()]

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf_arch])
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        known = base_metadata(base)
        writer.add_name(name or " ".join(p for p in (known.get("name"), Path(adapter_dir).resolve().name, "LoRA") if p))
        writer.add_file_type(
            gguf.LlamaFileType.ALL_F32 if dtype == "f32" else getattr(gguf.LlamaFileType, f"MOSTLY_{dtype.upper()}")
        )
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for gguf_name, a, b in tensors:
            for suffix, data in ((".lora_a", a), (".lora_b", b)):
                array, raw_dtype = _encode(data, dtype)
                writer.add_tensor(gguf_name + suffix, array, raw_dtype=raw_dtype)
        _finish(writer)

    _publish_file(path, write)
    return path


def _read_lora(adapter_dir: Path) -> tuple[dict, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The adapter's settings and its (A, B) matrices by adapted module name; refuses what llama.cpp's
    LoRA format cannot hold (DoRA, LoRA biases, fully trained modules, adapted embeddings)."""
    from safetensors import safe_open

    config_file, weights_file = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise SmoLoRAError(f"{adapter_dir}: not an adapter folder (adapter_config.json, adapter_model.safetensors)")
    try:
        settings = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SmoLoRAError(f"{config_file}: not valid JSON ({e})") from None
    unheld = {"use_dora": "DoRA magnitudes", "lora_bias": "LoRA biases", "modules_to_save": "fully trained modules"}
    for key, what in unheld.items():
        if settings.get(key):
            raise SmoLoRAError(f"{config_file}: {key}: llama.cpp LoRA files cannot hold {what}; export the merged one")
    pairs: dict[str, list] = {}
    with safe_open(weights_file, framework="np") as f:
        for key in f.keys():
            module, _, part = key.removeprefix("base_model.model.").rpartition(".lora_")
            if part not in ("A.weight", "B.weight"):
                raise SmoLoRAError(f"{weights_file}: tensor {key!r} is not a LoRA A/B matrix; export the merged model")
            pairs.setdefault(module, [None, None])["AB".index(part[0])] = f.get_tensor(key).astype(np.float32)
    if not pairs or any(a is None or b is None for a, b in pairs.values()):
        raise SmoLoRAError(f"{weights_file}: expected a lora_A and a lora_B matrix for every adapted module")
    return settings, {m: (a, b) for m, (a, b) in pairs.items()}


def _lora_tensors(module: str, a: np.ndarray, b: np.ndarray, settings: dict, alpha: float, names, config):
    """(gguf name, A, B) for one adapted module; B carries whatever of PEFT's scale alpha/r lacks."""
    from peft.utils.other import get_pattern_key

    gguf_name = names.get_name(module + ".weight", try_suffixes=(".weight",))
    if gguf_name is None or not gguf_name.startswith("blk."):
        raise SmoLoRAError(f"export: no llama.cpp LoRA name for the adapted module {module!r}")
    rank = a.shape[0]
    expected = _matrix_shapes(config).get(gguf_name.split(".")[2])
    if expected is None or a.shape[1] != expected[1] or b.shape != (expected[0], rank):
        raise SmoLoRAError(
            f"export: the adapter's {module} (A {a.shape}, B {b.shape}) does not fit this base model's matrix "
            f"{expected or gguf_name}; export it with the base it was trained on (--model)"
        )
    own_alpha = settings.get("alpha_pattern", {}).get(
        get_pattern_key(settings.get("alpha_pattern", {}).keys(), module), alpha
    )
    scaling = own_alpha / (rank**0.5 if settings.get("use_rslora") else rank)
    factor = scaling * rank / alpha  # llama.cpp scales by alpha / rank
    if factor != 1.0:
        b = b * np.float32(factor)
    if config.model_type == "llama" and gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
        heads = config.num_attention_heads if "attn_q" in gguf_name else config.num_key_value_heads
        b = _permute_rope(b, heads)
    return gguf_name, np.ascontiguousarray(a), np.ascontiguousarray(b)


def base_origin(source) -> Path | None:
    """The file or folder a resolved model (``smolora.models.ModelSource``) came from, for ``base=``:
    the .gguf a converted model was read from (the embedded one included), else its local folder."""
    from smolora.models import EMBEDDED_NAME, embedded_gguf_path

    if source.name == EMBEDDED_NAME:
        return embedded_gguf_path()
    if str(source.name).endswith(".gguf"):
        return Path(source.name)
    return Path(source.folder) if source.is_local else None


def _matrix_shapes(config) -> dict[str, tuple[int, int]]:
    """(out, in) of each adaptable matrix of one block, by its llama.cpp name, from the config alone."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    inter = config.intermediate_size
    if config.model_type == "phi3":  # q, k, v in one matrix; gate and up in one (gate's rows first)
        return {
            "attn_qkv": ((heads + 2 * kv) * head_dim, hidden),
            "attn_output": (hidden, heads * head_dim),
            "ffn_up": (2 * inter, hidden),
            "ffn_down": (hidden, inter),
        }
    return {
        "attn_q": (heads * head_dim, hidden),
        "attn_k": (kv * head_dim, hidden),
        "attn_v": (kv * head_dim, hidden),
        "attn_output": (hidden, heads * head_dim),
        "ffn_gate": (inter, hidden),
        "ffn_up": (inter, hidden),
        "ffn_down": (hidden, inter),
    }


def _finish(writer) -> None:
    """Header, metadata and tensors written, in the order the GGUF format lays them out."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _publish_file(path: Path, write) -> None:
    """``write(tmp)`` makes the file; it appears at ``path`` whole or not at all."""
    try:
        publish(path, write, folder=False)
    except OSError as e:
        raise SmoLoRAError(f"{path}: cannot write it ({e.strerror or e})") from None
