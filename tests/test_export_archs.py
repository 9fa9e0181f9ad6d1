"""GGUF export of Gemma 2, Gemma 3 and Phi-3, with SentencePiece-style tokenizers, read back by the real
readers: transformers' GGUF loader (same logits at f32, same token ids) and, where node-llama-cpp is
installed, llama.cpp itself (same tokens, same greedy continuation)."""

from __future__ import annotations

import json

import pytest
import torch
from gguf import GGUFReader
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import TINY_SIZES
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
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<start_of_turn>' + m['role'] + '\n' + m['content'] + "
    "'<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]


def build_spm_tokenizer(prefix: bool):
    """A SentencePiece-style BPE: spaces as ``▁`` (a ``▁`` before the text with ``prefix``, as Llama 2 and
    Phi-3; none, as Gemma), byte fallback to ``<0x00>``..``<0xFF>``. Ids: pad 0, eos 1, bos 2, unk 3 (Gemma's)."""
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
    prepend = [normalizers.Prepend("▁")] if prefix else []
    tok.normalizer = normalizers.Sequence([*prepend, normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.add_special_tokens({"additional_special_tokens": SPECIAL[4:]})
    fast.chat_template = GEMMA_TEMPLATE
    return fast


@pytest.fixture(scope="module")
def gemma_tok():
    return build_spm_tokenizer(prefix=False)


@pytest.fixture(scope="module")
def phi3_tok():
    return build_spm_tokenizer(prefix=True)


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
    name = {"gemma": "Gemma", "gemma2": "Gemma2", "gemma3_text": "Gemma3Text", "phi3": "Phi3"}[arch]
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
            model.lm_head.weight.normal_(0, 0.02 * scale)
    return model


def read_back(path):
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


CASES = [("gemma2", True), ("gemma3_text", True), ("gemma3_text", False), ("phi3", False), ("phi3", True)]


@pytest.mark.parametrize(("arch", "tie"), CASES)
def test_an_f32_export_reads_back_as_the_same_model_and_tokenizer(tmp_path, gemma_tok, phi3_tok, arch, tie):
    tok = phi3_tok if arch == "phi3" else gemma_tok
    model = build_arch(arch, len(tok), tie=tie)
    path = export_gguf(model, tok, tmp_path / "m.gguf", "f32")
    back, back_tok = read_back(path)
    assert type(back) is type(model) and back.config.tie_word_embeddings == tie
    text = " ".join(STRINGS[:5])  # longer than the window: windowed and global layers differ
    ids = tok(text, return_tensors="pt").input_ids
    assert ids.shape[1] > 3 * model.config.sliding_window if arch != "phi3" else True
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
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is (arch == "phi3")
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[4 + 0x41] == 6 and types[2] == 3 and types[3] == 2  # <0x41> BYTE, <bos> CONTROL, <unk> UNKNOWN


# --- llama.cpp (node-llama-cpp's CPU build; skipped where node and npm are missing) ---
from test_llamacpp import assert_same_greedy, llamacpp  # noqa: E402, F401 - the module's llama.cpp process

PROMPTS = ["the quick brown fox", "hello world, this is", "2021-03-05 means", "naïve café 😀 and"]


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


@pytest.mark.parametrize(("arch", "tie"), [("gemma", True), ("gemma2", True), ("gemma3_text", False), ("phi3", False)])
def test_llama_cpp_tokenizes_and_generates_as_transformers(tmp_path, llamacpp, gemma_tok, phi3_tok, arch, tie):  # noqa: F811
    tok = phi3_tok if arch == "phi3" else gemma_tok
    model = build_arch(arch, len(tok), tie=tie, scale=4)  # larger weights: greedy choices rarely near-ties
    path = export_gguf(model, tok, tmp_path / "m.gguf", "f32")
    prompts = [tok(p).input_ids for p in PROMPTS]
    answer = llamacpp.ask(
        model=path, tokenize=STRINGS, generate=[{"ids": ids, "max_tokens": 12} for ids in prompts]
    )
    print(answer["warnings"])
    assert answer["tokens"] == [tok(s, add_special_tokens=False).input_ids for s in STRINGS]
    compared = [assert_same_greedy(greedy(model, ids), got, 1e-3) for ids, got in zip(prompts, answer["generated"])]
    assert sum(compared) >= 0.75 * 12 * len(PROMPTS), compared
