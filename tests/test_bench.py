"""The benchmark's own measurements (benchmarks/ is never imported by the library)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux /proc")
def test_worker_peak_rss_is_its_own_not_its_parents():
    held = b"\x01" * (600 * 2**20)  # this (parent) process holds 600 MiB more than its child will
    code = (
        "import bench_train, resource; "
        "print(bench_train.peak_rss_mib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=BENCH, capture_output=True, text=True, check=True).stdout
    del held
    own, inherited = map(float, out.split()[-2:])
    assert inherited >= 600  # ru_maxrss: at least what the parent held when it started the child
    assert 50 < own < inherited - 200  # the child's own: Python and torch, not the parent's 600 MiB


def test_step_flops_counts_lora_backward_twice_its_forward_and_attention_at_useful_pairs(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    from transformers import LlamaConfig

    from bench_train import step_flops

    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    row = [(10, 0.0, 0)]
    lora = step_flops(cfg, row, 8, ["q_proj", "v_proj"]) - step_flops(cfg, row, 8, [])
    assert lora == 2 * 3 * (2 * 10 * 8 * (64 + 64) + 2 * 10 * 8 * (64 + 32))  # layers x (fwd + 2x fwd) x (q + v)
    attention = step_flops(cfg, [(0, 50.0, 0)], 8, []) - step_flops(cfg, [(0, 0.0, 0)], 8, [])
    assert attention == 2 * 3 * 4 * 50 * 64  # layers x (fwd + bwd) x QK^T and AV at 2·pairs·head width each


def test_size_shapes_have_smollm2s_parameter_counts(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    from transformers import AutoModelForCausalLM

    from bench_train import size_config

    counts = {}
    for size in ("360m", "1.7b"):
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            counts[size] = AutoModelForCausalLM.from_config(size_config(size)).num_parameters()
    # SmolLM2-360M's and SmolLM2-1.7B's published counts (tied embeddings: the LM head is the embedding)
    assert counts == {"360m": 361_821_120, "1.7b": 1_711_376_384}


def test_build_size_writes_bf16_safetensors_and_a_q4_1_gguf_of_the_same_weights_once(monkeypatch, tmp_path, tokenizer):
    monkeypatch.syspath_prepend(str(BENCH))
    import gguf
    from gguf.quants import dequantize
    from transformers import AutoModelForCausalLM

    import bench_train

    tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    monkeypatch.setitem(bench_train.SIZES, "tiny", {**tiny, "rope_theta": 100000.0})
    paths = bench_train.build_size("tiny", tmp_path, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(paths["safetensors"])  # the real reader, its stored dtype
    assert (
        model.dtype == torch.bfloat16
        and model.num_parameters() == 49152 * 32 + 2 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64 + 2 * 32) + 32
    )
    tensors = {t.name: t for t in gguf.GGUFReader(paths["gguf"]).tensors}
    assert tensors["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_1
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0  # as export keeps it
    t = tensors["blk.1.ffn_up.weight"]
    rebuilt = torch.from_numpy(dequantize(t.data, t.tensor_type).reshape(64, 32))
    original = model.model.layers[1].mlp.up_proj.weight.float()
    step = (original.max(dim=1).values - original.min(dim=1).values) / 15  # a Q4_1 block's code step, at most
    assert ((rebuilt - original).abs() <= step[:, None] / 2 + 1e-3).all()  # the same weights, at 4 bits
    stamp = paths["gguf"].stat().st_mtime_ns
    assert bench_train.build_size("tiny", tmp_path, tokenizer) == paths  # reused, not rebuilt
    assert paths["gguf"].stat().st_mtime_ns == stamp
