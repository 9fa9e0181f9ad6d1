"""The adapter format is the contract: PEFT loads it; merged logits equal adapter logits."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from smolora.config import LoraSettings
from smolora.errors import SmoLoRAError
from smolora.lora import add_lora
from smolora.merge import merge_adapter


def trained_looking_adapter(model_dir, out, seed=0):
    """Attach LoRA to the saved tiny base and give it non-zero B so the adapter does something."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    model = add_lora(base, LoraSettings(target_modules=["all"]).to_peft())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    model.eval()
    model.save_pretrained(out)
    return model


IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 2, 50, 51]])


@pytest.mark.parametrize("tie", [True, False])
def test_peft_loads_adapter_and_merged_equals_unmerged(tmp_path, tokenizer, tie):
    from conftest import build_tiny_llama

    model_dir = tmp_path / "base"
    build_tiny_llama(len(tokenizer), tie=tie).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    ours = trained_looking_adapter(model_dir, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and cfg["peft_type"] == "LORA"
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    with torch.no_grad():
        ours_logits = ours(IDS).logits
        fresh = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        peft_logits = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()(IDS).logits
        torch.testing.assert_close(peft_logits, ours_logits, atol=1e-5, rtol=0)

        out = merge_adapter(tmp_path / "adapter", tmp_path / "merged", str(model_dir))
        assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= {
            p.name for p in out.iterdir()
        }
        merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        merged_logits = merged(IDS).logits
        base_logits = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()(IDS).logits
    torch.testing.assert_close(merged_logits, peft_logits, atol=1e-4, rtol=0)
    assert (merged_logits - base_logits).abs().max() > 1e-2
    assert merged.config.tie_word_embeddings == tie
    if tie:
        assert merged.get_input_embeddings().weight.data_ptr() == merged.get_output_embeddings().weight.data_ptr()


def test_merge_refuses_nan_and_writes_nothing(tmp_path, tiny_model_dir):
    model = trained_looking_adapter(tiny_model_dir, tmp_path / "adapter")
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n)[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(SmoLoRAError, match="NaN/inf"):
        merge_adapter(tmp_path / "adapter", tmp_path / "merged", str(tiny_model_dir))
    assert not (tmp_path / "merged").exists()


def test_pickled_adapter_is_refused(tmp_path, tiny_model_dir):
    trained_looking_adapter(tiny_model_dir, tmp_path / "adapter")
    (tmp_path / "adapter" / "adapter_model.safetensors").rename(tmp_path / "adapter" / "adapter_model.bin")
    with pytest.raises(SmoLoRAError, match="pickled .bin adapters are refused"):
        merge_adapter(tmp_path / "adapter", tmp_path / "merged", str(tiny_model_dir))


def test_pickled_base_model_is_refused(tmp_path, tiny_model_dir):
    from smolora.models import load_model, resolve_model

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    with pytest.raises(SmoLoRAError, match="pickled"):
        load_model(resolve_model(str(tmp_path)))


def test_generation_with_unmerged_adapter_folds_then_restores_bit_exactly(tmp_path, tiny_model_dir, tokenizer):
    from smolora.generate import folded_adapter, generate

    model = trained_looking_adapter(tiny_model_dir, tmp_path / "adapter")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    objects = {n: p for n, p in model.named_parameters()}
    with torch.no_grad():
        unmerged_logits = model(IDS).logits
        with folded_adapter(model):
            folded_logits = model(IDS).logits
            assert any(p is not objects[n] for n, p in model.named_parameters())  # folded weights in place
    assert all(p is objects[n] for n, p in model.named_parameters())  # the same Parameter objects are back
    torch.testing.assert_close(folded_logits, unmerged_logits, atol=1e-5, rtol=0)
    generate(model, tokenizer, "hello", max_new_tokens=4, do_sample=False)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, unmerged_logits)  # the adapter is live again, unmerged


def test_merging_an_adapter_on_a_tied_lm_head_unties_it_and_leaves_the_embedding_alone(tmp_path, tokenizer):
    from peft import LoraConfig

    from conftest import build_tiny_llama

    model_dir = tmp_path / "base"
    build_tiny_llama(len(tokenizer), tie=True).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = add_lora(base, LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        fresh = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        unmerged = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()(IDS).logits
        merged = AutoModelForCausalLM.from_pretrained(
            merge_adapter(tmp_path / "adapter", tmp_path / "merged", str(model_dir)), dtype=torch.float32
        ).eval()
        torch.testing.assert_close(merged(IDS).logits, unmerged, atol=1e-4, rtol=0)
    original = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert torch.equal(merged.get_input_embeddings().weight, original.get_input_embeddings().weight)
    assert not merged.config.tie_word_embeddings
    assert not torch.equal(merged.get_output_embeddings().weight, merged.get_input_embeddings().weight)


def test_folding_an_adapter_on_a_tied_lm_head_leaves_the_embedding_alone_and_restores(tokenizer):
    from peft import LoraConfig

    from conftest import build_tiny_llama
    from smolora.generate import folded_adapter

    model = add_lora(
        build_tiny_llama(len(tokenizer), tie=True),
        LoraConfig(r=4, target_modules=["q_proj", "lm_head"]),
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        unmerged = model(IDS).logits
        with folded_adapter(model):
            torch.testing.assert_close(model(IDS).logits, unmerged, atol=1e-5, rtol=0)
        for n, p in model.named_parameters():
            assert torch.equal(p, before[n]), n
        assert torch.equal(model(IDS).logits, unmerged)


@pytest.mark.parametrize("records", ["chat", "text"])
def test_a_base_without_chat_template_keeps_the_one_it_was_trained_with(tmp_path, records):
    from transformers import AutoTokenizer

    from conftest import build_tiny_llama, build_tokenizer, chat_records
    from smolora import SmoLoRA
    from smolora.data.formats import CHATML_TEMPLATE
    from smolora.generate import prompt_ids, stop_token_ids

    plain = build_tokenizer(chat_template=None)
    plain.eos_token = "<|endoftext|>"  # a base model whose eos is not ChatML's end of turn
    build_tiny_llama(len(plain)).save_pretrained(tmp_path / "base")
    plain.save_pretrained(tmp_path / "base")
    data = chat_records(8) if records == "chat" else [{"text": f"the quick brown fox {i}"} for i in range(8)]
    lora = SmoLoRA(base_model_name=str(tmp_path / "base"), dataset_name=data, output_dir=str(tmp_path / "out"))
    lora.sft_config.max_steps, lora.sft_config.gradient_accumulation_steps = 1, 1
    lora.train()
    merged = AutoTokenizer.from_pretrained(lora.save())
    _, with_adapter = lora.load_model(lora.adapter_checkpoint)
    for tok in (merged, with_adapter):
        if records == "chat":  # prompted, and stopped, the way it was trained
            assert tok.chat_template == CHATML_TEMPLATE
            assert tok.decode(prompt_ids(tok, "hi")[0]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
            model = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final_merged")
            assert tok.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(tok, model)
        else:  # trained on plain text: prompted with plain text
            assert not tok.chat_template


def test_a_model_lives_in_its_folder_and_beside_the_gguf_it_came_from(tmp_path):
    from smolora.models import ModelSource

    converted = ModelSource(str(tmp_path / "cache" / "model-1234"), str(tmp_path / "gguf" / "model.gguf"), True)
    assert (
        converted.lives_in(tmp_path / "gguf")
        and converted.lives_in(tmp_path / "cache")
        and converted.lives_in(tmp_path)
    )
    assert not converted.lives_in(tmp_path / "elsewhere")
    assert not ModelSource("someone/model", "someone/model", False).lives_in(".")


def test_an_adapter_on_tied_input_embeddings_merges_and_folds_without_touching_lm_head(tokenizer):
    from peft import LoraConfig, get_peft_model

    from conftest import build_tiny_llama
    from smolora.generate import folded_adapter
    from smolora.merge import merge_and_unload

    model = get_peft_model(
        build_tiny_llama(len(tokenizer), tie=True),
        LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"], init_lora_weights=False),
    ).eval()
    with torch.no_grad():
        unmerged = model(IDS).logits
        with folded_adapter(model):
            torch.testing.assert_close(model(IDS).logits, unmerged, atol=1e-5, rtol=0)
        merged = merge_and_unload(model)
        torch.testing.assert_close(merged(IDS).logits, unmerged, atol=1e-5, rtol=0)
    assert not merged.config.tie_word_embeddings


def test_an_adapter_for_another_base_or_with_broken_info_is_a_one_line_error(tmp_path, tiny_model_dir, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    trained_looking_adapter(tiny_model_dir, tmp_path / "adapter")
    other = tmp_path / "other"
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).save_pretrained(other)
    tokenizer.save_pretrained(other)
    with pytest.raises(SmoLoRAError, match="the adapter does not fit this base model \\(size mismatch for "):
        merge_adapter(tmp_path / "adapter", tmp_path / "merged", str(other))
    (tmp_path / "adapter" / "smolora.json").write_text('{"base_model": "x"')
    with pytest.raises(SmoLoRAError, match="smolora.json: not valid JSON"):
        merge_adapter(tmp_path / "adapter", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_demo_refuses_empty_sizes_before_writing(tmp_path):
    from smolora.demo import run_demo

    with pytest.raises(SmoLoRAError, match="eval_size must be >= 1"):
        run_demo(str(tmp_path / "demo"), eval_size=0)
    assert not (tmp_path / "demo").exists()


def test_demo_replaces_only_its_own_run_and_continues_an_interrupted_one(tmp_path, tiny_model_dir, capsys):
    from smolora.demo import run_demo

    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    (other / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(SmoLoRAError, match="holds a training run the demo did not make"):
        run_demo(str(other), model=str(tiny_model_dir), train_size=12, eval_size=1, max_steps=2)
    assert sorted(p.name for p in other.iterdir()) == ["checkpoints", "metrics.jsonl"]  # untouched

    demo = dict(model=str(tiny_model_dir), train_size=12, eval_size=1, max_steps=2)
    out = tmp_path / "demo"
    run_demo(str(out), **demo)
    (out / "demo_results.json").unlink()  # as if Ctrl-C had stopped it after its last checkpoint
    capsys.readouterr()
    run_demo(str(out), **demo)
    assert "resumed from" in capsys.readouterr().out
    (out / "demo_results.json").unlink()
    run_demo(str(out), **{**demo, "max_steps": 3})  # other options: it starts over
    printed = capsys.readouterr().out
    assert "had other options" in printed and "resumed from" not in printed
    assert json.loads((out / "demo_results.json").read_text())["train_steps"] == 3
    run_demo(str(out), **demo)  # a finished demo is replaced, not continued
    assert "resumed from" not in capsys.readouterr().out
