"""GGUF export, read back by the real readers: gguf-py and transformers' GGUF loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import build_tiny
from smolora.errors import SmoLoRAError
from smolora.export import export_gguf

TEXT = "the quick brown fox <|im_end|> hello world 2021-03-05"


def tiny(arch: str, vocab_size: int):
    if arch == "llama_bias":  # biased q/k/v/o: the q/k biases take the rotary reordering too
        from transformers import LlamaForCausalLM

        config = build_tiny("llama", vocab_size).config
        config.attention_bias = True
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("proj.bias"):
                    p.normal_()
        return model
    model = build_tiny(arch, vocab_size)
    if arch == "qwen3":  # transformers reads a Qwen3 GGUF with its default head_dim (128, as real Qwen3 models have)
        import transformers

        torch.manual_seed(0)
        config = model.config
        config.head_dim = 128
        model = transformers.Qwen3ForCausalLM(config).eval()
    return model


def read_back(path):
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_an_f32_export_reads_back_as_the_same_model_and_tokenizer(tmp_path, tokenizer, arch):
    model = tiny(arch, len(tokenizer))
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    back, back_tok = read_back(path)
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)
    assert back_tok(TEXT).input_ids == ids[0].tolist()
    assert back_tok.chat_template == tokenizer.chat_template
    assert (back_tok.bos_token, back_tok.eos_token, back_tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    fields = GGUFReader(path).fields
    assert fields["general.name"].contents() == "m"
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False
    assert len(fields["tokenizer.ggml.tokens"].data) == model.config.vocab_size


@pytest.mark.parametrize(
    ("dtype", "atol"), [("f16", 2e-3), ("bf16", 1e-2), ("q8_0", 2e-2), ("q5_1", 5e-2), ("q4_0", 2e-1)]
)
def test_smaller_types_stay_close_and_keep_norms_f32(tmp_path, tokenizer, dtype, atol):
    model = tiny("llama", len(tokenizer))
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf", dtype)
    types = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == "F32"
    assert types["blk.0.ffn_up.weight"] == dtype.upper()
    assert types["token_embd.weight"] == ("Q8_0" if dtype in ("q5_1", "q4_0") else dtype.upper())
    assert "output.weight" not in types  # tied: llama.cpp uses token_embd
    back, _ = read_back(path)
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        expected, got = model(ids).logits, back(ids).logits
    assert 0 < (got - expected).abs().max() < atol


def test_an_untied_head_is_written_and_rows_that_do_not_split_into_blocks_fall_back_to_f16(tmp_path, tokenizer):
    from conftest import build_tiny_llama

    model = build_tiny_llama(len(tokenizer) + 3, tie=False)  # padded vocabulary: 3 rows no token uses
    with torch.no_grad():
        model.lm_head.weight.normal_()
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf", "q8_0")
    reader = GGUFReader(path)
    assert {t.name for t in reader.tensors} >= {"output.weight", "token_embd.weight"}
    tokens = reader.fields["tokenizer.ggml.tokens"]
    assert [bytes(tokens.parts[i]).decode() for i in tokens.data[-3:]] == ["[PAD300]", "[PAD301]", "[PAD302]"]
    back, _ = read_back(path)
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model(ids).logits
        assert (back(ids).logits - expected).abs().max() < 0.02 * expected.abs().max()  # 8-bit blocks

    odd = build_tiny("qwen2", len(tokenizer))  # k/v rows of 32 split; a 48-wide MLP does not
    odd.config.intermediate_size = 48
    odd = type(odd)(odd.config).eval()
    path = export_gguf(odd, tokenizer, tmp_path / "odd.gguf", "q8_0")
    types = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_up.weight"] == "Q8_0"


def test_bad_requests_are_one_line_errors_and_leave_nothing(tmp_path, tokenizer):
    model = tiny("llama", len(tokenizer))
    with pytest.raises(SmoLoRAError, match="must end in .gguf"):
        export_gguf(model, tokenizer, tmp_path / "m.bin")
    with pytest.raises(SmoLoRAError, match="expected one of f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0"):
        export_gguf(model, tokenizer, tmp_path / "m.gguf", "q4_k")
    with pytest.raises(SmoLoRAError, match="supports llama, qwen2, qwen3 models, not 'gemma'"):
        export_gguf(build_tiny("gemma", len(tokenizer)), tokenizer, tmp_path / "new" / "sub" / "m.gguf")
    (tmp_path / "afile").write_text("")
    with pytest.raises(SmoLoRAError, match="cannot write there"):
        export_gguf(model, tokenizer, tmp_path / "afile" / "m.gguf")
    (tmp_path / "afile").unlink()
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    wordlevel = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    )
    with pytest.raises(SmoLoRAError, match="only byte-level BPE"):
        export_gguf(model, wordlevel, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []  # no partial file, no temporary left behind

    existing = tmp_path / "keep.gguf"
    existing.write_bytes(b"mine")
    with pytest.raises(SmoLoRAError, match="exists; pass --overwrite"):
        export_gguf(model, tokenizer, existing)
    assert existing.read_bytes() == b"mine"
    export_gguf(model, tokenizer, existing, overwrite=True)
    assert existing.read_bytes()[:4] == b"GGUF"
    assert oct(existing.stat().st_mode & 0o777) != oct(0o600)


def test_a_model_with_adapters_still_attached_is_refused(tmp_path, tokenizer):
    from smolora.config import LoraSettings
    from smolora.lora import add_lora

    model = add_lora(tiny("llama", len(tokenizer)), LoraSettings().to_peft())
    with pytest.raises(SmoLoRAError, match="merge them first"):
        export_gguf(model.get_base_model(), tokenizer, tmp_path / "m.gguf")


def test_llama_q_and_k_biases_are_reordered_with_their_weights(tmp_path, tokenizer):
    """As llama.cpp's converter does (transformers' GGUF reader drops a Llama's biases, so gguf-py checks this one)."""
    from smolora.export import _permute_rope

    model = tiny("llama_bias", len(tokenizer))
    tensors = {t.name: t.data for t in GGUFReader(export_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")).tensors}
    attn = model.model.layers[0].self_attn
    for name, proj, heads in (("q", attn.q_proj, 4), ("k", attn.k_proj, 2)):
        for kind in ("weight", "bias"):
            expected = _permute_rope(getattr(proj, kind).detach().numpy(), heads)
            assert np.array_equal(tensors[f"blk.0.attn_{name}.{kind}"], expected)
    assert np.array_equal(tensors["blk.0.attn_v.bias"], attn.v_proj.bias.detach().numpy())


def test_rope_permutation_is_llama_cpp_layout():
    """llama.cpp pairs rotary dimensions (0,1), (2,3)...; HF rotates halves (0, d/2), (1, d/2+1)..."""
    from smolora.export import _permute_rope

    w = np.arange(8)[:, None].repeat(2, axis=1)  # one head of dim 8: rows 0..7
    assert _permute_rope(w, 1)[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_the_pre_tokenizer_is_named_for_llama_cpp_and_read_back_the_same(tmp_path, tokenizer):
    """A Qwen2-style split (digits one by one) is written as llama.cpp's "qwen2", GPT-2's own as "gpt-2"."""
    import copy

    from tokenizers import Regex, pre_tokenizers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    qwen_style = copy.deepcopy(tokenizer)
    qwen_style.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    assert qwen_style(TEXT).input_ids != tokenizer(TEXT).input_ids  # the split matters for this text
    for tok, pre in ((qwen_style, "qwen2"), (tokenizer, "gpt-2")):
        path = export_gguf(tiny("qwen2", len(tok)), tok, tmp_path / f"{pre}.gguf", "f32")
        assert GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == pre
        _, back_tok = read_back(path)
        assert back_tok(TEXT).input_ids == tok(TEXT).input_ids

    digits = copy.deepcopy(tokenizer)  # SmolLM2's own tokenizer.json: digits one by one, then GPT-2's split
    digits.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    path = export_gguf(tiny("llama", len(digits)), digits, tmp_path / "smollm.gguf", "f32")
    assert GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == "smollm"

    unknown = copy.deepcopy(tokenizer)
    unknown.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Punctuation(), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    with pytest.warns(UserWarning, match="no llama.cpp name"):
        path = export_gguf(tiny("llama", len(unknown)), unknown, tmp_path / "unknown.gguf", "f32")
    assert "tokenizer.ggml.pre" not in GGUFReader(path).fields
