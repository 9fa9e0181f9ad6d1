"""GGUF export of Gemma, Gemma 2, Gemma 3 (text) and Phi-3, and of SentencePiece-style BPE tokenizers (byte
fallback, ``▁`` for spaces; on a Llama too), read back by the real readers: transformers' GGUF loader (the same
logits at f32, the same token ids; it has no Gemma (1) reader) and, where node-llama-cpp is installed, llama.cpp
itself (the same tokens and chat template, the same greedy continuation, a LoRA file applied as merged)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from conftest import TINY_SIZES
from smolora.errors import SmoLoRAError
from smolora.export import export_gguf

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is a tiny tokenizer for tests",
    "rewrite the date in iso format 2021-03-05 january february march",
    "question answer user assistant system you are a helpful bot",
    "naïve café in zürich, 0 1 2 3 4 5 6 7 8 9 . , ! ? : ; - ( )",
]
STRINGS = [
    "hello world",
    "  two  spaces,\ttab\nnewline   ",
    "naïve café, Zürich — 東京 and Москва",
    "emoji: 😀👍🏽 🇫🇷 ✨",
    "digits 1234567890 3.14159 2021-03-05 $12,000",
    "<start_of_turn>user\nthe quick fox<end_of_turn>\n",
]
GEMMA_TEMPLATE = (  # Gemma's: the assistant is "model"
    "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + m['content'] + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]


def build_spm_tokenizer(style: str):
    """A SentencePiece-style BPE: spaces as ``▁``, byte fallback to ``<0x00>``..``<0xFF>``; ids pad 0, eos 1,
    bos 2, unk 3 (Gemma's). ``style``: no ``▁`` before the text (``gemma``), one before each run of text by a
    normalizer (``llama2``: Llama 2's tokenizer.json, Phi-3's), or one before the first by a Metaspace
    pre-tokenizer (``metaspace``: transformers' Llama tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.BPE())  # learns merges within words, as SentencePiece does
    words.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=220, show_progress=False)
    words.train_from_iterator(CORPUS, trainer)
    learned = json.loads(words.to_str())["model"]
    vocab = {t: i for i, t in enumerate([*SPECIAL, *(f"<0x{b:02X}>" for b in range(256))])}
    for token in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if not isinstance(m, str) else tuple(m.split(" ")) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=True, unk_token="<unk>"))
    prepend = [normalizers.Prepend("▁")] if style == "llama2" else []
    tok.normalizer = normalizers.Sequence([*prepend, normalizers.Replace(" ", "▁")])
    if style == "metaspace":
        tok.normalizer = None
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.add_special_tokens({"additional_special_tokens": SPECIAL[4:]})
    fast.chat_template = GEMMA_TEMPLATE
    return fast


# Each architecture's style: the one transformers' GGUF reader rebuilds for it
STYLE = {"gemma": "gemma", "gemma2": "gemma", "gemma3_text": "gemma", "phi3": "llama2", "llama": "metaspace"}


@pytest.fixture(scope="module")
def toks():
    return {style: build_spm_tokenizer(style) for style in ("gemma", "llama2", "metaspace")}


@pytest.fixture(scope="module")
def gemma_tok(toks):
    return toks["gemma"]


def build_arch(arch: str, vocab_size: int, tie: bool = True, seed: int = 0, scale: float = 1.0):
    """A tiny random model; norms random too (Gemma's are stored as 1 + w), weights times ``scale``.

    Gemma's head_dim is 256 and its window 8 tokens: transformers reads a Gemma GGUF with
    query_pre_attn_scalar 256 (its default), and llama.cpp scales queries by 1/sqrt(head_dim)."""
    import transformers

    sizes = dict(TINY_SIZES, vocab_size=vocab_size, tie_word_embeddings=tie)
    sizes.update(pad_token_id=0, eos_token_id=1, bos_token_id=2)  # the tokenizer's ids
    if arch in ("gemma2", "gemma3_text"):
        sizes.update(head_dim=256, query_pre_attn_scalar=256, sliding_window=8)
        if arch == "gemma3_text":
            sizes["num_hidden_layers"] = 7  # one global layer after six windowed ones
    name = {"llama": "Llama", "gemma": "Gemma", "gemma2": "Gemma2", "gemma3_text": "Gemma3Text", "phi3": "Phi3"}[arch]
    torch.manual_seed(seed)
    config = getattr(transformers, name + "Config")(**sizes)
    cls = transformers.Gemma3ForCausalLM if arch == "gemma3_text" else getattr(transformers, name + "ForCausalLM")
    model = cls(config).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.normal_(0, 0.1 if arch != "phi3" else 1.0)
            elif p.ndim == 2:
                p.mul_(scale)
        if not tie:
            model.lm_head.weight.normal_(0, 0.1 * scale)
    return model


def read_back(path):
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


CASES = [
    ("gemma2", True),
    ("gemma3_text", True),
    ("gemma3_text", False),
    ("phi3", False),
    ("phi3", True),
    ("llama", False),
]


@pytest.mark.parametrize(("arch", "tie"), CASES)
def test_an_f32_export_reads_back_as_the_same_model_and_tokenizer(tmp_path, toks, arch, tie):
    tok = toks[STYLE[arch]]
    model = build_arch(arch, len(tok), tie=tie)
    path = export_gguf(model, tok, tmp_path / "m.gguf", "f32")
    back, back_tok = read_back(path)
    assert type(back) is type(model) and back.config.tie_word_embeddings == tie
    text = " ".join(STRINGS[:5])  # longer than the window: windowed and global layers differ
    ids = tok(text, return_tensors="pt").input_ids
    assert ids.shape[1] > 3 * (getattr(model.config, "sliding_window", None) or 8)  # Gemma's window: 8
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)
    for s in STRINGS:
        assert back_tok(s).input_ids == tok(s).input_ids, s
    assert back_tok.decode(tok(STRINGS[2]).input_ids, skip_special_tokens=True) == STRINGS[2]
    assert back_tok.chat_template == tok.chat_template
    assert (back_tok.bos_token, back_tok.eos_token, back_tok.pad_token) == ("<bos>", "<eos>", "<pad>")
    fields = GGUFReader(path).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is (STYLE[arch] != "gemma")
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[4 + 0x41] == 6 and types[2] == 3 and types[3] == 2  # <0x41> BYTE, <bos> CONTROL, <unk> UNKNOWN


@pytest.mark.parametrize(("arch", "dtype", "rtol"), [("gemma3_text", "q8_0", 0.08), ("phi3", "q4_0", 0.25)])
def test_smaller_types_stay_close_and_gemma_norms_are_stored_as_llama_cpp_reads_them(tmp_path, toks, arch, dtype, rtol):
    """Within ``rtol`` of the largest logit: q8_0 keeps each weight within ~1/127 of its block's largest,
    an error seven random Gemma 3 layers carry to ~5% of the logits (f16: 0.2%)."""
    tok = toks[STYLE[arch]]
    model = build_arch(arch, len(tok), tie=False)
    path = export_gguf(model, tok, tmp_path / "m.gguf", dtype)
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    fused = "attn_qkv" if arch == "phi3" else "attn_q"
    assert tensors[f"blk.0.{fused}.weight"].tensor_type.name == dtype.upper()
    assert tensors["token_embd.weight"].tensor_type.name == "Q8_0"
    norm = model.model.layers[0].input_layernorm.weight.detach().numpy()
    stored = np.asarray(tensors["blk.0.attn_norm.weight"].data)
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    assert np.array_equal(stored, norm + np.float32(1) if arch != "phi3" else norm)  # Gemma's 1 + w, as stored
    back, _ = read_back(path)
    ids = tok(" ".join(STRINGS[:5]), return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model(ids).logits
        assert 0 < (back(ids).logits - expected).abs().max() < rtol * expected.abs().max()


def test_what_llama_cpp_would_run_otherwise_is_refused_in_one_line(tmp_path, gemma_tok):
    """Settings llama.cpp fixes for these architectures, a tokenizer it cannot hold: one line naming the field,
    before anything is written."""
    import copy

    import transformers
    from tokenizers import Tokenizer, models

    from smolora.export import check_exportable

    def config(arch: str, **changes):
        good = build_arch(arch, len(gemma_tok)).config
        return type(good)(**{**good.to_dict(), **changes})

    longrope = {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4, "rope_theta": 1e4}

    refused = [
        (config("gemma2", hidden_activation="silu"), "gemma2 hidden_activation 'silu': .* GELU"),
        (config("gemma2", tie_word_embeddings=False), "gemma2 tie_word_embeddings False: .* head tied"),
        (config("gemma2", query_pre_attn_scalar=144), "gemma2 query_pre_attn_scalar 144: .* head_dim 256 only"),
        (config("gemma2", final_logit_softcapping=None), "gemma2 attn_logit_softcapping 50.0: .* and final softcaps"),
        (config("gemma3_text", layer_types=["full_attention"] * 7), "gemma3_text layer_types .* every 6 only"),
        (
            config(
                "gemma3_text",
                rope_parameters={
                    "full_attention": {"rope_type": "default", "rope_theta": 1e6},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 5e4},
                },
            ),
            "sliding_attention rope_theta 10000.0 only",
        ),
        (config("phi3", rope_parameters=longrope, original_max_position_embeddings=128), "rope scaling 'longrope'"),
        (config("phi3", hidden_act="gelu"), "phi3 hidden_act 'gelu': llama.cpp runs Phi-3 with silu only"),
        (
            transformers.Gemma3Config(),
            "supports .*gemma3_text, phi3 models, not 'gemma3'",
        ),  # with vision: not text alone
    ]
    for bad, message in refused:
        with pytest.raises(SmoLoRAError, match=message) as error:
            check_exportable(bad, gemma_tok)
        assert "\n" not in str(error.value)

    unigram = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0)], 0)))
    no_bytes = copy.deepcopy(gemma_tok)
    spec = json.loads(no_bytes.backend_tokenizer.to_str())
    del spec["model"]["vocab"]["<0x7F>"]
    no_bytes._tokenizer = Tokenizer.from_str(json.dumps(spec))
    model = build_arch("phi3", len(gemma_tok))
    for tok, message in (
        (unigram, "only byte-level BPE tokenizers .* or SentencePiece-style BPE with byte fallback"),
        (no_bytes, "falls back to bytes but has no token <0x7F> .* llama.cpp needs all of them"),
    ):
        with pytest.raises(SmoLoRAError, match=message):
            export_gguf(model, tok, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_export_check_refuses_gemma_which_transformers_cannot_read_back(tmp_path, gemma_tok):
    """`--check` scores each file read back by transformers, which has no Gemma (1) GGUF reader."""
    from conftest import chat_records, write_jsonl
    from test_cli import smolora

    build_arch("gemma", len(gemma_tok)).save_pretrained(tmp_path / "base")
    gemma_tok.save_pretrained(tmp_path / "base")
    held_out = write_jsonl(tmp_path / "held.jsonl", chat_records(4))
    r = smolora("export", "--model", tmp_path / "base", "--output", tmp_path / "m.gguf", "--check", held_out)
    assert r.returncode == 2 and "export --check: transformers cannot read a gemma GGUF back" in r.stderr, r.stderr
    assert not (tmp_path / "m.gguf").exists()


TARGETS = {"gemma3_text": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"], "phi3": ["qkv_proj", "gate_up_proj"]}


def with_lora(arch: str, tok, folder):
    """A tiny base saved as a model folder (with ``tok``), and a LoRA on it with random B saved to
    ``folder / "adapter"``: (the base, the peft model)."""
    import copy

    from smolora.config import LoraSettings
    from smolora.lora import add_lora

    base = build_arch(arch, len(tok), tie=False, seed=1, scale=4)
    base.save_pretrained(folder / "base")
    tok.save_pretrained(folder / "base")
    settings = LoraSettings(r=4, lora_alpha=8, target_modules=TARGETS[arch])
    peft_model = add_lora(copy.deepcopy(base), settings.to_peft())
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(folder / "adapter")
    return base, peft_model


@pytest.mark.parametrize("arch", ["gemma3_text", "phi3"])
def test_the_command_line_exports_a_fine_tunes_merged_model_and_its_adapter(tmp_path, toks, arch):
    """`smolora export --adapter --model BASE --output --lora-gguf`: the merged file reads back as the merged
    model (f32: the same logits); the adapter file names llama.cpp's matrices (Phi-3's fused ones)."""
    from smolora.merge import merge_and_unload
    from test_cli import smolora

    tok = toks[STYLE[arch]]
    _, peft_model = with_lora(arch, tok, tmp_path)
    merged = merge_and_unload(peft_model)
    out = ["--output", tmp_path / "m.gguf", "--lora-gguf", tmp_path / "a.gguf", "--type", "f32"]
    r = smolora("export", "--adapter", tmp_path / "adapter", "--model", tmp_path / "base", *out)
    assert r.returncode == 0, r.stderr[-2000:]
    back, back_tok = read_back(tmp_path / "m.gguf")
    ids = tok(" ".join(STRINGS[:5]), return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(back(ids).logits, merged(ids).logits)
    assert back_tok(STRINGS[3]).input_ids == tok(STRINGS[3]).input_ids
    tensors = {t.name: tuple(int(n) for n in t.shape) for t in GGUFReader(tmp_path / "a.gguf").tensors}
    parts = ["attn_qkv", "ffn_up"] if arch == "phi3" else ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_up"]
    layers = range(merged.config.num_hidden_layers)
    assert set(tensors) == {f"blk.{i}.{p}.weight.lora_{ab}" for i in layers for p in parts for ab in "ab"}
    if arch == "phi3":  # ggml shapes: A (in, r), B (r, out)
        assert tensors["blk.0.attn_qkv.weight.lora_a"] == tensors["blk.0.ffn_up.weight.lora_a"] == (32, 4)
        assert tensors["blk.0.attn_qkv.weight.lora_b"] == (4, (4 + 2 * 2) * 8)  # q, k and v rows
        assert tensors["blk.0.ffn_up.weight.lora_b"] == (4, 2 * 64)  # gate and up rows


def test_a_trained_gemma3_fine_tunes_merged_folder_exports_as_itself(tmp_path, gemma_tok):
    """`smolora train` on a tiny Gemma 3, then `smolora export --model RUN/final_merged`: the file reads back
    as the merged folder (f32: the same logits), which training changed."""
    from conftest import chat_records, write_jsonl
    from test_cli import smolora

    build_arch("gemma3_text", len(gemma_tok)).save_pretrained(tmp_path / "base")
    gemma_tok.save_pretrained(tmp_path / "base")
    data = write_jsonl(tmp_path / "train.jsonl", chat_records(12))
    train = ["--data", data, "--model", tmp_path / "base", "--output", tmp_path / "run", "--max-steps", 3]
    r = smolora("train", *train, "--learning-rate", "1e-2")
    assert r.returncode == 0, r.stderr[-2000:]
    merged_dir = tmp_path / "run" / "final_merged"
    r = smolora("export", "--model", merged_dir, "--output", tmp_path / "m.gguf", "--type", "f32")
    assert r.returncode == 0, r.stderr[-2000:]
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    back, _ = read_back(tmp_path / "m.gguf")
    ids = gemma_tok(" ".join(STRINGS[:5]), return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(back(ids).logits, merged(ids).logits)
        assert not torch.equal(merged(ids).logits, base(ids).logits)


# --- llama.cpp (node-llama-cpp's CPU build; skipped where node and npm are missing) ---
from test_llamacpp import CONVERSATIONS, assert_same_greedy, llamacpp  # noqa: E402, F401 - the module's llama.cpp process

PROMPTS = ["the quick brown fox", "hello world, this is", "2021-03-05 means", "naïve café 😀 and"]


def near_tie(arch: str) -> float:
    """Logit gaps below which llama.cpp may choose otherwise at f32: ggml's CPU GELU (Gemma's MLP) reads
    its result from a table indexed by the input rounded to f16."""
    return 0.05 if arch.startswith("gemma") else 1e-3


def greedy(model, ids: list[int], max_new_tokens: int = 12) -> tuple[list[int], list[float]]:
    """transformers' greedy continuation (up to eos, dropped) and the gap between its two best logits at each step."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),  # <bos> is a token here, not padding
            max_new_tokens=max_new_tokens,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, len(ids) :].tolist()
    gaps = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
    return (tokens[:-1] if tokens and tokens[-1] == model.generation_config.eos_token_id else tokens), gaps


@pytest.mark.parametrize(("arch", "tie"), [("gemma", True), ("gemma2", True), *CASES[1:]])
def test_llama_cpp_tokenizes_and_generates_as_transformers(tmp_path, llamacpp, toks, arch, tie):  # noqa: F811
    """Gemma (1) too, which transformers cannot read back: llama.cpp is its only check. A Llama with Llama 2's
    tokenizer.json style: llama.cpp puts a ``▁`` before each run of text, where a Metaspace tokenizer does not."""
    tok = toks["llama2" if arch == "llama" else STYLE[arch]]
    model = build_arch(arch, len(tok), tie=tie, scale=4)  # larger weights: greedy choices rarely near-ties
    path = export_gguf(model, tok, tmp_path / "m.gguf", "f32")
    prompts = [tok(p).input_ids for p in PROMPTS]
    chats = [{"messages": c, "add_generation_prompt": True} for c in CONVERSATIONS]
    requests = [{"ids": ids, "max_tokens": 12} for ids in prompts]
    answer = llamacpp.ask(model=path, tokenize=STRINGS, chat=chats, generate=requests)
    assert answer["warnings"] == []
    assert answer["tokens"] == [tok(s, add_special_tokens=False).input_ids for s in STRINGS]
    for conversation, text, ids in zip(CONVERSATIONS, answer["chat"], answer["chat_tokens"], strict=True):
        assert text == tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        expected = tok.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True)
        assert ids == list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    expected = [greedy(model, ids) for ids in prompts]
    compared = [assert_same_greedy(e, got, near_tie(arch)) for e, got in zip(expected, answer["generated"])]
    assert sum(compared) >= 0.75 * 12 * len(PROMPTS), compared


@pytest.mark.parametrize("arch", ["gemma3_text", "phi3"])
def test_a_lora_gguf_on_its_base_generates_in_llama_cpp_what_the_merged_model_does(
    tmp_path,
    llamacpp,  # noqa: F811
    toks,
    arch,
):
    from smolora.export import export_lora_gguf
    from smolora.merge import merge_and_unload

    tok = toks[STYLE[arch]]
    base, peft_model = with_lora(arch, tok, tmp_path)
    base_path = export_gguf(base, tok, tmp_path / "base.gguf", "f32")
    lora_path = export_lora_gguf(tmp_path / "adapter", base.config, tmp_path / "a.gguf", "f32")
    prompts = [tok(p).input_ids for p in PROMPTS]
    merged = merge_and_unload(peft_model)
    expected = [greedy(merged, ids) for ids in prompts]
    assert [e[0] for e in expected] != [greedy(base, ids)[0] for ids in prompts]  # the adapter matters

    requests = [{"ids": ids, "max_tokens": 12} for ids in prompts]
    answer = llamacpp.ask(model=base_path, lora=lora_path, generate=requests)
    assert answer["warnings"] == []
    compared = [assert_same_greedy(e, got, near_tie(arch)) for e, got in zip(expected, answer["generated"])]
    assert sum(compared) >= 0.75 * 12 * len(PROMPTS), compared
