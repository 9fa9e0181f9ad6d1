"""`smolora export --check`: each type exported, read back and scored; the smallest that keeps the skill kept."""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import build_tiny_llama, write_jsonl
from smolora.data.formats import FormatOptions, encode_records
from smolora.errors import SmoLoRAError
from smolora.evaluate import evaluate
from smolora.export import MIXES
from smolora.generate import generate
from smolora.quantize import CANDIDATES, _load_gguf, check_tolerance, smallest_that_keeps
from test_cli import smolora

QUESTIONS = [f"what is {i} plus {i}?" for i in range(6)] + ["hello world", "the quick brown fox", "rewrite the date"]


def talkative(vocab_size: int):
    """A tiny Llama whose greedy replies differ from prompt to prompt (weights drawn wider than the init's)
    and mostly end with the end-of-turn token within a few tokens (its embedding, tied to the head, scaled up)."""
    model = build_tiny_llama(vocab_size, seed=3)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.4)
        model.get_input_embeddings().weight[2] *= 3
    return model


def own_replies(model, tokenizer) -> list[dict]:
    """Held-out records whose references are the model's own greedy replies: 100% for the model itself."""
    return [{"prompt": q, "completion": generate(model, tokenizer, q, 64, do_sample=False)} for q in QUESTIONS]


def size_bytes(text: str) -> float:
    number, unit = text.split()
    return float(number) * {"KiB": 2**10, "MiB": 2**20}[unit]


def test_check_keeps_the_smallest_file_within_tolerance(tmp_path, tokenizer):
    model = talkative(len(tokenizer))
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    held_out = write_jsonl(tmp_path / "held_out.jsonl", own_replies(model, tokenizer))
    out = tmp_path / "out" / "tuned.gguf"
    r = smolora("export", "--model", folder, "--output", out, "--check", held_out, "--tolerance", 12)
    assert r.returncode == 0, r.stderr[-2000:]
    row = r"^  (?P<type>\S+)\s+(?P<size>[\d.]+ .iB|\(in memory\))\s+(?P<em>[\d.]+)%\s+(?P<loss>[\d.]+)"
    rows = {m["type"]: m for m in re.finditer(row + r"(?P<kept>  within)?$", r.stdout, re.M)}
    assert list(rows) == ["unquantized", *CANDIDATES], r.stdout  # every type, largest first
    assert float(rows["unquantized"]["em"]) == 100.0
    within = {t: m for t, m in rows.items() if m["kept"]}
    assert all((float(m["em"]) >= 100.0 - 12) == (t in within) for t, m in rows.items() if t != "unquantized")
    chosen = min(within, key=lambda t: size_bytes(within[t]["size"]))
    # only the chosen file (and its Modelfile) is left, and it is the chosen type
    assert sorted(p.name for p in out.parent.iterdir()) == ["tuned.Modelfile", "tuned.gguf"]
    from gguf import GGUFReader, LlamaFileType

    file_type = GGUFReader(out).fields["general.file_type"].contents()
    low_bit = MIXES.get(chosen, (chosen,))[0]  # a mix's file type is its low-bit type's
    assert LlamaFileType(file_type).name.lower().endswith(low_bit), (file_type, chosen)
    # the table's score is the file's: read back, the kept file scores the same
    records = [json.loads(line) for line in held_out.read_text().splitlines()]
    examples, _ = encode_records(records, tokenizer, FormatOptions())
    result = evaluate(_load_gguf(out), tokenizer, examples, exact_match=True, progress=False)
    assert f"{result.exact_match:.1f}" == rows[chosen]["em"] and f"{result.loss:.4f}" == rows[chosen]["loss"]


def test_check_writes_nothing_when_no_type_keeps_the_skill(tmp_path, tokenizer):
    model = talkative(len(tokenizer))
    records = own_replies(model, tokenizer)
    examples, _ = encode_records(records, tokenizer, FormatOptions())
    out = tmp_path / "tuned.gguf"
    scores = []
    for dtype in ("q4_0", "q4_1"):  # find a 4-bit type that changes a reply of this model
        try:
            smallest_that_keeps(model, tokenizer, examples, out, tolerance=0, types=(dtype,), overwrite=True)
        except SmoLoRAError as e:
            assert "no type keeps exact match within 0 points" in str(e)
            assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing written, no candidate left
            return
        scores.append(dtype)
    pytest.fail(f"every 4-bit type kept every reply of the tiny model ({scores}); the test needs one that does not")


def test_bad_check_input_is_one_line_before_the_model_loads(tmp_path, tiny_model_dir):
    for tolerance in (-1, float("nan"), float("inf")):
        with pytest.raises(SmoLoRAError, match="--tolerance must be a number of points >= 0"):
            check_tolerance(tolerance)
    plain = tmp_path / "notes.txt"
    plain.write_text("plain text\nmore plain text\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{oops}\n')
    good = write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "a", "completion": "b"}])
    out = tmp_path / "out.gguf"
    for args, message in (
        (("--check", tmp_path / "missing.jsonl"), "missing.jsonl: no such file"),
        (("--check", bad), "bad.jsonl:2: malformed JSON"),
        (("--check", plain), "exact match needs examples with a prompt"),
        (("--check", good, "--tolerance", -1), "--tolerance must be a number of points >= 0"),
    ):
        r = smolora("export", "--model", tiny_model_dir, "--output", out, *args)
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()
    r = smolora("export", "--model", tiny_model_dir, "--check", good)  # no --output to keep the file at
    assert r.returncode == 2 and "expected --output" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_the_named_mix_keeps_attention_q_and_v_at_q8_0(tmp_path, tokenizer):
    from gguf import GGUFReader

    from smolora.export import export_gguf

    path = export_gguf(build_tiny_llama(len(tokenizer)), tokenizer, tmp_path / "m.gguf", "q5_0_qv", modelfile=False)
    types = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
    for layer in (0, 1):
        assert types[f"blk.{layer}.attn_q.weight"] == types[f"blk.{layer}.attn_v.weight"] == "Q8_0"
        for other in ("attn_k", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            assert types[f"blk.{layer}.{other}.weight"] == "Q5_0", other
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert _load_gguf(path).config.num_hidden_layers == 2  # transformers reads it back
