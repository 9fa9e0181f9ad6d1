"""GGUF export, read back by the real readers: gguf-py and transformers' GGUF loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import TINY_SIZES, build_tiny
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
    from transformers import MistralConfig, MistralForCausalLM

    mistral = MistralForCausalLM(MistralConfig(vocab_size=len(tokenizer), **TINY_SIZES))
    supported = "llama, qwen2, qwen3, gemma, gemma2, gemma3_text, phi3"
    with pytest.raises(SmoLoRAError, match=f"supports {supported} models, not 'mistral'"):
        export_gguf(mistral, tokenizer, tmp_path / "new" / "sub" / "m.gguf")
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


def test_general_metadata_carries_what_llama_cpps_converter_writes(tmp_path, tokenizer):
    """From the base's own GGUF (the embedded one, written by llama.cpp's converter): its basename, license,
    languages, and itself as base_model.0; the fine-tune's own size label and finetune."""
    import gguf

    from smolora.models import embedded_gguf_path

    baseline = GGUFReader(embedded_gguf_path()).fields
    model = tiny("llama", len(tokenizer))
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf", "f16", base=embedded_gguf_path(), finetune="dates")
    fields = GGUFReader(path).fields
    size = gguf.size_label(model.num_parameters(), 0, 0, 0)
    assert size.endswith("K") and fields["general.size_label"].contents() == size
    assert fields["general.type"].contents() == "model"
    assert fields["general.basename"].contents() == baseline["general.basename"].contents() == "smollm2"
    assert fields["general.finetune"].contents() == "dates"
    assert fields["general.name"].contents() == f"smollm2 {size} dates"
    assert fields["general.license"].contents() == baseline["general.license"].contents() == "apache-2.0"
    assert fields["general.languages"].contents() == ["en"]
    assert fields["general.base_model.0.name"].contents() == baseline["general.name"].contents()
    assert fields["general.base_model.0.organization"].contents() == "HuggingFaceTB"
    # every general.* key the converter wrote; the base's organization is the base model's, not the fine-tune's
    theirs = {k for k in baseline if k.startswith("general.")} - {"general.organization"}
    assert theirs <= set(fields)

    folder = tmp_path / "base"  # a model folder: its model card says what it knows
    folder.mkdir()
    (folder / "README.md").write_text("---\nlicense: mit\nlanguage: fr\nmodel_name: Petit Modèle\n---\n# Petit\n")
    fields = GGUFReader(export_gguf(model, tokenizer, tmp_path / "f.gguf", "f16", base=folder, name="Mine")).fields
    assert fields["general.license"].contents() == "mit" and fields["general.languages"].contents() == ["fr"]
    assert fields["general.name"].contents() == "Mine" and fields["general.finetune"].contents() == "Mine"
    assert fields["general.base_model.0.name"].contents() == "Petit Modèle"


def read_modelfile(path) -> dict:
    """FROM, TEMPLATE, SYSTEM and the stops of a Modelfile (triple-quoted values, as SmoLoRA writes them)."""
    import re

    text = path.read_text()
    quoted = dict(re.findall(r'^(TEMPLATE|SYSTEM) """(.*?)"""$', text, re.M | re.S))
    return {
        "from": re.search(r"^FROM (.+)$", text, re.M).group(1),
        "template": quoted.get("TEMPLATE"),
        "system": quoted.get("SYSTEM"),
        "stops": re.findall(r'^PARAMETER stop "(.*)"$', text, re.M),
    }


LLAMA3_STYLE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' "
    "+ m['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3_SPECIAL = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CONVERSATIONS = [
    [{"role": "user", "content": "what is 3 plus 3?"}],
    [{"role": "system", "content": "you are a date bot"}, {"role": "user", "content": "rewrite 5 march 2021"}],
    [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hello world"},
        {"role": "user", "content": "the quick brown fox?\n(2021-03-05)"},
    ],
]


@pytest.mark.parametrize("style", ["chatml", "llama3"])
def test_the_modelfile_renders_conversations_as_the_chat_template_token_for_token(tmp_path, style):
    from conftest import build_tokenizer
    from smolora.ollama import render_go

    tok = build_tokenizer() if style == "chatml" else build_tokenizer(LLAMA3_STYLE)
    if style == "llama3":
        tok.add_special_tokens({"additional_special_tokens": LLAMA3_SPECIAL})
    path = export_gguf(tiny("llama", len(tok)), tok, tmp_path / "m.gguf", "q8_0")
    modelfile = read_modelfile(tmp_path / "m.Modelfile")
    assert modelfile["from"] == "./m.gguf"
    assert modelfile["system"] == ("You are a test bot" if style == "chatml" else None)  # the template's default
    assert modelfile["stops"] == (["<|im_end|>"] if style == "chatml" else ["<|eot_id|>"])
    for conversation in CONVERSATIONS:
        messages = conversation
        if modelfile["system"] and conversation[0]["role"] != "system":  # Ollama puts SYSTEM first
            messages = [{"role": "system", "content": modelfile["system"]}, *conversation]
        ours = tok(render_go(modelfile["template"], messages), add_special_tokens=False).input_ids
        expected = tok.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True)
        assert ours == list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    assert path.is_file()


def test_a_template_that_cannot_be_translated_is_said_once_and_leaves_no_template(tmp_path, capsys):
    from conftest import build_tokenizer

    tok = build_tokenizer("{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}")
    export_gguf(tiny("llama", len(tok)), tok, tmp_path / "m.gguf", "f16")
    said = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert len(said) == 1 and "cannot be translated" in said[0]
    modelfile = read_modelfile(tmp_path / "m.Modelfile")
    assert modelfile["template"] is None and modelfile["stops"] == ["<|im_end|>"] and modelfile["from"] == "./m.gguf"


def test_the_go_template_renderer_reads_ollamas_own_chatml_form():
    """Ollama's hand-written ChatML template (if/else on .Role, trimming): the subset the renderer reads."""
    from smolora.ollama import render_go

    template = (
        '{{- range .Messages }}<|im_start|>{{ if eq .Role "user" }}user{{ else if eq .Role "system" }}system'
        "{{ else }}assistant{{ end }}\n{{ .Content }}<|im_end|>\n{{ end -}}\n  <|im_start|>assistant\n"
    )
    messages = [{"role": r, "content": r[0].upper()} for r in ("system", "user", "assistant")]
    expected = "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
    assert render_go(template, messages) == expected + "<|im_start|>assistant\n"
    with pytest.raises(ValueError, match="outside the subset"):
        render_go("{{ len .Messages }}", messages)


def save_adapter(tmp_path, tokenizer, **settings):
    from smolora.config import LoraSettings
    from smolora.lora import add_lora

    base = tiny("llama", len(tokenizer))
    targets = ["q_proj", "k_proj", "v_proj", "down_proj"]
    peft_model = add_lora(base, LoraSettings(r=4, lora_alpha=8, target_modules=targets, **settings).to_peft())
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    peft_model.save_pretrained(tmp_path / "adapter")
    return peft_model


@pytest.mark.parametrize("rslora", [False, True])
def test_a_lora_gguf_has_llama_cpps_keys_names_and_layout(tmp_path, tokenizer, rslora):
    from smolora.export import _permute_rope, export_lora_gguf

    peft_model = save_adapter(tmp_path, tokenizer, use_rslora=rslora)
    config = peft_model.get_base_model().config
    path = export_lora_gguf(tmp_path / "adapter", config, tmp_path / "a.gguf", "f32")
    reader = GGUFReader(path)
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["adapter.lora.alpha"].contents() == 8.0
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    parts = ("attn_q", "attn_k", "attn_v", "ffn_down")
    assert set(tensors) == {f"blk.{i}.{p}.weight.lora_{ab}" for i in range(2) for p in parts for ab in "ab"}
    attn = peft_model.base_model.model.model.layers[1].self_attn
    for name, proj, heads in (("attn_q", attn.q_proj, 4), ("attn_k", attn.k_proj, 2), ("attn_v", attn.v_proj, None)):
        a, b = proj.lora_A["default"].weight.detach().numpy(), proj.lora_B["default"].weight.detach().numpy()
        assert np.array_equal(tensors[f"blk.1.{name}.weight.lora_a"], a)  # (r, in): ggml ne = (in, r)
        b = b * 2 if rslora else b  # rsLoRA scales by alpha/sqrt(4) = 2 * alpha/4, llama.cpp by alpha/4
        expected = _permute_rope(b, heads) if heads else b  # B's rows take the rotary order of W's rows
        assert np.allclose(tensors[f"blk.1.{name}.weight.lora_b"], expected, rtol=1e-6)


def test_an_adapter_llama_cpps_lora_format_cannot_hold_is_refused(tmp_path, tokenizer):
    import json

    from smolora.export import export_lora_gguf

    peft_model = save_adapter(tmp_path, tokenizer)
    config = peft_model.get_base_model().config
    with pytest.raises(SmoLoRAError, match="adapter GGUF is written as one of f32, f16, bf16, q8_0"):
        export_lora_gguf(tmp_path / "adapter", config, tmp_path / "a.gguf", "q4_0")
    settings = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**settings, "use_dora": True}))
    with pytest.raises(SmoLoRAError, match="use_dora: llama.cpp LoRA files cannot hold DoRA magnitudes"):
        export_lora_gguf(tmp_path / "adapter", config, tmp_path / "a.gguf")
    with pytest.raises(SmoLoRAError, match="not an adapter folder"):
        export_lora_gguf(tmp_path, config, tmp_path / "a.gguf")
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(settings))
    wider = type(config).from_dict({**config.to_dict(), "intermediate_size": 96})
    with pytest.raises(SmoLoRAError, match=r"model.layers.0.mlp.down_proj .* does not fit this base model's matrix"):
        export_lora_gguf(tmp_path / "adapter", wider, tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()


def test_the_command_line_writes_an_adapter_gguf_and_a_modelfile(tmp_path, tiny_model_dir, tokenizer):
    """`smolora export --adapter DIR --lora-gguf FILE`, the adapter alone, and `--output`: merged, with a Modelfile."""
    from transformers import AutoModelForCausalLM

    from smolora.config import LoraSettings
    from smolora.lora import add_lora
    from test_cli import smolora

    peft_model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraSettings(r=4).to_peft())
    peft_model.save_pretrained(tmp_path / "adapter")
    adapter = ["--adapter", tmp_path / "adapter", "--model", tiny_model_dir, "--type", "f32"]
    r = smolora("export", *adapter, "--lora-gguf", tmp_path / "a.gguf", "--output", tmp_path / "m.gguf")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"f32 LoRA adapter GGUF saved to {tmp_path / 'a.gguf'}" in r.stdout
    fields = GGUFReader(tmp_path / "a.gguf").fields
    assert fields["general.type"].contents() == "adapter" and fields["adapter.lora.alpha"].contents() == 16.0
    assert read_modelfile(tmp_path / "m.Modelfile")["from"] == "./m.gguf"
    assert not (tmp_path / "a.Modelfile").exists()  # its base is a folder: Ollama's ADAPTER needs a GGUF base
    r = smolora("export", "--lora-gguf", tmp_path / "b.gguf")
    assert r.returncode == 2 and "expected --output FILE.gguf, or --adapter DIR --lora-gguf FILE.gguf" in r.stderr

    base = export_gguf(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer, tmp_path / "base.gguf", "f32")
    r = smolora("export", "--adapter", tmp_path / "adapter", "--model", base, "--lora-gguf", tmp_path / "c.gguf")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "c.Modelfile").read_text().startswith(f"FROM {base.resolve()}\nADAPTER ./c.gguf\n")


def test_an_adapter_files_modelfile_names_its_base_and_the_adapter(tmp_path, tokenizer):
    from smolora.ollama import write_modelfile

    base = export_gguf(tiny("llama", len(tokenizer)), tokenizer, tmp_path / "base.gguf", "f16")
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    text = write_modelfile(tmp_path / "a.gguf", tokenizer, base=base).read_text()
    assert text.startswith(f'FROM {base.resolve()}\nADAPTER ./a.gguf\nTEMPLATE """')
    assert (
        read_modelfile(tmp_path / "a.Modelfile")["template"] == read_modelfile(tmp_path / "base.Modelfile")["template"]
    )
