"""A SentencePiece-style BPE vocabulary as llama.cpp's ``llama`` tokenizer model (tokens, scores, types).

Llama 2, Gemma and Phi-3 tokenize with BPE over text whose spaces are ``▁`` (a ``▁`` prepended or not),
with byte fallback: a character outside the vocabulary becomes its UTF-8 bytes, tokens ``<0x00>`` to
``<0xFF>``. llama.cpp keeps no merges for these: its SentencePiece tokenizer joins, again and again,
the neighbouring pair whose joined text is the token with the highest score. Scoring each token by
minus the rank of the first merge that makes it replays the merges in their order, as SentencePiece's
own BPE models score their pieces; transformers' GGUF reader rebuilds the merges from the same order.
Tokens no merge makes (characters, bytes, special tokens) score below every merge.

With ``add_space_prefix`` llama.cpp, as SentencePiece itself, puts a ``▁`` before every run of text: at
the start and after each special token, even before a space. A tokenizer that prepends it by a
normalizer (Llama 2's tokenizer.json, Phi-3) does the same; one with a ``Metaspace`` pre-tokenizer that
prepends only to the first run (transformers' Llama tokenizer) may tokenize such text differently in
llama.cpp, as files llama.cpp's converter makes do.
"""

from __future__ import annotations

import json
import re

from smolora.errors import SmoLoRAError

BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")


def spm_spec(tokenizer) -> dict | None:
    """The tokenizer.json spec when the tokenizer is SentencePiece-style BPE (byte fallback, spaces as
    ``▁``), else None; an error when it is one but llama.cpp could not run it (byte tokens missing)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    bpe = spec.get("model") or {}
    if bpe.get("type") != "BPE" or not bpe.get("byte_fallback"):
        return None
    if _prepared(backend, "a b") not in ("a▁b", "▁a▁b"):
        return None
    missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in bpe["vocab"]]
    if missing:
        raise SmoLoRAError(
            f"export: the tokenizer falls back to bytes but has no token {missing[0]} "
            f"({len(missing)} of the 256 byte tokens missing); llama.cpp needs all of them"
        )
    return spec


def adds_space_prefix(tokenizer) -> bool:
    """Whether the tokenizer puts a ``▁`` before the text (llama.cpp's ``add_space_prefix``)."""
    return _prepared(tokenizer.backend_tokenizer, "a").startswith("▁")


def _prepared(backend, text: str) -> str:
    """``text`` as the BPE model sees it: normalized, pre-tokenized, the pieces joined again."""
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    if backend.pre_tokenizer is not None:
        text = "".join(piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text))
    return text


def spm_vocab(spec: dict, vocab_size: int, unk_id: int | None) -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, token types) padded to the embedding's ``vocab_size`` rows."""
    import gguf

    bpe = spec["model"]
    merges = [m.split(" ", 1) if isinstance(m, str) else m for m in bpe.get("merges", [])]
    rank: dict[str, int] = {}
    for i, (left, right) in enumerate(merges):
        rank.setdefault(left + right, i)
    unmerged = -float(len(merges) + 1)  # below every merge
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [unmerged] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, i in bpe["vocab"].items():
        tokens[i], scores[i] = text, -float(rank[text]) if text in rank else unmerged
        types[i] = gguf.TokenType.BYTE if BYTE_TOKEN.fullmatch(text) else gguf.TokenType.NORMAL
    for t in spec.get("added_tokens", []):
        tokens[t["id"]] = t["content"]
        types[t["id"]] = gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED
    if unk_id is not None:
        types[unk_id] = gguf.TokenType.UNKNOWN
    return tokens, scores, [int(t) for t in types]


def write_spm_tokenizer(writer, tokenizer, spec: dict, vocab_size: int) -> None:
    """The vocabulary as llama.cpp's ``llama`` tokenizer model, with ``add_space_prefix``."""
    tokens, scores, types = spm_vocab(spec, vocab_size, getattr(tokenizer, "unk_token_id", None))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(adds_space_prefix(tokenizer))
