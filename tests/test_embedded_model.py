"""Integration on the real embedded SmolLM2-135M-Instruct (slow: about a minute in all)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from smolora.data.formats import IGNORE, FormatOptions, encode_record

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def embedded():
    from smolora.models import load_tokenizer, resolve_model

    source = resolve_model(None)
    return source, load_tokenizer(source)


def test_real_template_mask(embedded):
    _, tok = embedded
    ex = encode_record({"prompt": "Say hi", "completion": "Hi!"}, tok, FormatOptions())
    supervised = [t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE]
    assert tok.decode(supervised) == "Hi!<|im_end|>"
    assert supervised[-1] == tok.eos_token_id == tok.pad_token_id
    assert tok.decode(ex.input_ids).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert ex.input_ids.count(tok.bos_token_id) == 3  # system, user, assistant: no extra BOS


def test_twenty_steps_lower_the_loss_and_the_merged_model_stops(tmp_path, embedded):
    from smolora import SmoLoRA

    records = [{"prompt": f"Spell the number {n} backwards.", "completion": str(n)[::-1]} for n in range(1000, 1400, 5)]
    lora = SmoLoRA(dataset_name=records, output_dir=str(tmp_path))
    cfg = lora.sft_config
    cfg.max_steps, cfg.gradient_accumulation_steps, cfg.per_device_train_batch_size = 20, 2, 4
    cfg.learning_rate, cfg.logging_steps = 1e-3, 5
    result = lora.train()
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < 0.7 * first, (first, last)
    merged = lora.save()

    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Spell the number 1234 backwards."}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=30, do_sample=False)
    new = out[0, ids["input_ids"].shape[1] :].tolist()
    assert tok.eos_token_id in new, tok.decode(new)  # it learned to stop
    assert len(new) < 30


def test_gguf_export_matches_the_file_llama_cpp_made(tmp_path, embedded):
    """The embedded model is a GGUF written by llama.cpp's converter: exported again at f32, every
    tensor equals that file's, dequantized, under the same names, with the same tokenizer metadata."""
    import numpy as np
    from gguf import GGUFReader, dequantize

    from smolora.export import export_gguf
    from smolora.models import embedded_gguf_path, load_model

    source, tok = embedded
    path = export_gguf(load_model(source), tok, tmp_path / "smollm2.gguf", "f32")
    ours, theirs = GGUFReader(path), GGUFReader(embedded_gguf_path())
    mine = {t.name: t for t in ours.tensors}
    assert mine.keys() == {t.name for t in theirs.tensors}
    for t in theirs.tensors:
        expected = dequantize(t.data, t.tensor_type).reshape(mine[t.name].data.shape)
        assert np.array_equal(mine[t.name].data, expected), t.name
    for key, field in theirs.fields.items():
        if key.startswith(("tokenizer.", "llama.")):
            assert [bytes(p) for p in ours.fields[key].parts[3:]] == [bytes(p) for p in field.parts[3:]], key


def test_the_conversion_keeps_the_exact_codes_of_every_q4_1_tensor(embedded):
    """Every tensor llama.cpp stored as Q4_1 (the layers' linear weights) or Q8_0 (the embedding, tied
    to the head) has codes in the cache folder, and they rebuild the folder's fp32 weight bit for bit."""
    from gguf import GGMLQuantizationType, GGUFReader
    from safetensors import safe_open

    from smolora.fast.codes import CODES_FILE, read_codes
    from smolora.models import embedded_gguf_path

    source, _ = embedded
    kinds = [t.tensor_type for t in GGUFReader(embedded_gguf_path()).tensors]
    quantized = sum(kind in (GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0) for kind in kinds)
    with (
        safe_open(f"{source.folder}/{CODES_FILE}", "pt") as codes,
        safe_open(f"{source.folder}/model.safetensors", "pt") as fp32,
    ):
        names = {k.rsplit(".", 1)[0] for k in codes.keys()}
        assert len(names) == quantized == 30 * 7 + 1
        for name in names:
            assert torch.equal(read_codes(codes, name).weight(), fp32.get_tensor(name)), name


def test_the_cli_trains_the_same_steps_with_and_without_the_speed_wing_and_the_readers_agree(tmp_path, embedded):
    """``smolora train`` on the embedded model, default and ``--no-fast`` (dropout 0: the wing draws its
    masks from another generator; SGD: its update is the gradient's, where Adam's first steps are
    about the learning rate whatever the gradient): the same per-step losses and adapters; PEFT reads
    the adapter and transformers the merged model, and their logits agree."""
    import json
    import os
    import subprocess
    import sys

    from peft import PeftModel
    from safetensors.torch import load_file

    from smolora.models import load_model

    source, tok = embedded
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"Spell {n} backwards.", "completion": str(n)[::-1]}) + "\n" for n in range(100, 132)
        )
    )
    runs = {}
    for name, extra in (("fast", []), ("plain", ["--no-fast", "--no-merge"])):
        out = tmp_path / name
        cmd = [
            sys.executable,
            "-m",
            "smolora.cli",
            "train",
            "--data",
            str(data),
            "--output",
            str(out),
            "--max-steps",
            "3",
            "--lora-dropout",
            "0",
            "--logging-steps",
            "1",
            "--optim",
            "sgd",
            "--learning-rate",
            "0.5",
            *extra,
        ]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"}, timeout=600
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert ("speed levers: none (the plain path)" in proc.stdout) == (name == "plain"), proc.stdout[-2000:]
        losses = [
            row["loss"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in row
        ]
        runs[name] = losses, load_file(out / "adapter_checkpoint" / "adapter_model.safetensors")
    (fast_losses, fast_adapter), (plain_losses, plain_adapter) = runs["fast"], runs["plain"]
    assert len(fast_losses) == 3 and fast_losses == pytest.approx(
        plain_losses, rel=1e-4, abs=1e-4
    )  # logged to 4 decimals
    for key, value in plain_adapter.items():
        torch.testing.assert_close(fast_adapter[key], value, rtol=1e-4, atol=1e-4)
    assert max(v.abs().max() for k, v in plain_adapter.items() if "lora_B" in k) > 1e-3  # a real update

    ids = tok(["Spell 120 backwards.", "Hello there"], return_tensors="pt", padding=True)
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(load_model(source), str(tmp_path / "fast" / "adapter_checkpoint")).eval()
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "fast" / "final_merged", dtype=torch.float32).eval()
        torch.testing.assert_close(merged(**ids).logits, adapted(**ids).logits, rtol=1e-4, atol=1e-4)
