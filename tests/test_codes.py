"""Frozen weights held as the exact codes they came from (a GGUF's Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 blocks, a
checkpoint's 16 bits): found back bit for bit, and training on them is training on the fp32 weights —
without reading those."""

from __future__ import annotations

import json
import math
import signal

import pytest
import torch
from safetensors import safe_open
from torch import nn

import smolora.fast.onednn
from conftest import build_tiny, build_tiny_llama, chat_records, write_jsonl
from smolora.config import LoraSettings, TrainConfig
from smolora.data.formats import FormatOptions, encode_records
from smolora.errors import SmoLoRAError
from smolora.evaluate import evaluate
from smolora.fast.codes import BLOCK, CODES_FILE, Codes, coded_weights, codes_of, fit_codes, read_codes, save_codes
from smolora.lora import add_lora
from smolora.merge import merge_and_unload
from smolora.models import codes_source, half_cache_folder, load_model, resolve_model
from smolora.train import NonFiniteLossError, train
from test_cli import ENV
from test_cli import smolora as run_cli


def q4_1(out: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """A weight as a Q4_1 file dequantizes to: per block of 32, fp16 ``scale * q + low`` (fp32
    arithmetic), q in 0..15, the block's minimum coded 0 and its maximum 15 — and one constant block."""
    blocks = (out, width // BLOCK)
    q = torch.randint(0, 16, (*blocks, BLOCK), generator=generator)
    q[..., 0], q[..., 1] = 0, 15
    scale = (torch.rand(*blocks, 1, generator=generator) * 0.02 + 1e-4).half().float()
    low = (-8 * scale - torch.rand(*blocks, 1, generator=generator) * 1e-3).half().float()
    scale[0, 0] = 0.0
    return (q.float() * scale + low).reshape(out, width)


def q4_0(out: int, width: int, generator: torch.Generator, bits: int = 4) -> torch.Tensor:
    """A weight as a Q4_0 file (``bits`` 5: Q5_0) dequantizes to: per block of 32, fp16 ``d * (q - 8)``
    (``q - 16``), q in 0..15 (0..31), the block's largest magnitude coded 0 — ``d`` of either sign."""
    half, blocks = 2 ** (bits - 1), (out, width // BLOCK)
    q = torch.randint(0, 2 * half, (*blocks, BLOCK), generator=generator)
    q[..., 0] = 0
    d = ((torch.rand(*blocks, 1, generator=generator) - 0.5) * 0.02).half().float()
    return ((q - half).float() * d).reshape(out, width)


def q5_1(out: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """A weight as a Q5_1 file dequantizes to: per block of 32, fp16 ``scale * q + low``, q in 0..31."""
    blocks = (out, width // BLOCK)
    q = torch.randint(0, 32, (*blocks, BLOCK), generator=generator)
    q[..., 0], q[..., 1] = 0, 31
    scale = (torch.rand(*blocks, 1, generator=generator) * 0.02 + 1e-4).half().float()
    low = (-16 * scale - torch.rand(*blocks, 1, generator=generator) * 1e-3).half().float()
    return (q.float() * scale + low).reshape(out, width)


def q8_0(out: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """A weight as a Q8_0 file dequantizes to: per block of 32, fp16 ``scale * q``, q in -127..127,
    the block's largest magnitude coded +-127."""
    blocks = (out, width // BLOCK)
    q = torch.randint(-127, 128, (*blocks, BLOCK), generator=generator)
    q[..., 0] = 127 * torch.randint(0, 2, blocks, generator=generator).mul(2).sub(1)
    scale = (torch.rand(*blocks, 1, generator=generator) * 0.001 + 1e-5).half().float()
    return (q.float() * scale).reshape(out, width)


def test_codes_rebuild_a_q4_1_weight_bit_for_bit_and_nothing_else():
    generator = torch.Generator().manual_seed(0)
    weight = q4_1(96, 4 * BLOCK, generator)
    fit = fit_codes(weight)
    assert fit.codes.dtype == torch.uint8 and fit.codes.shape == (96, 4, BLOCK // 2)  # two codes a byte
    assert fit.scale.dtype == fit.low.dtype == torch.float16
    assert torch.equal(fit.weight(), weight) and torch.equal(fit.weight(slice(5, 9)), weight[5:9])
    stored = Codes(*(t.permute(1, 2, 0).contiguous().permute(2, 0, 1) for t in fit))  # input-major, as in the file
    assert torch.equal(stored.weight(), weight) and torch.equal(stored.weight(slice(5, 9)), weight[5:9])
    assert all(torch.equal(a, b) for a, b in zip(fit_codes(weight, rows=7), fit))  # found a few rows at a time
    assert fit_codes(torch.randn(96, 4 * BLOCK, generator=generator)) is None  # not 4- or 8-bit: kept as it is
    off = weight.clone()
    off[5, 7] = torch.nextafter(off[5, 7], torch.tensor(1.0))  # one weight one ulp away
    assert fit_codes(off) is None
    assert fit_codes(weight[:, :48]) is None and fit_codes(weight.double()) is None


@pytest.mark.parametrize(
    ("kind", "make", "per_byte"), [("q4_0", q4_0, 2), ("q5_0", lambda *a: q4_0(*a, bits=5), 1), ("q5_1", q5_1, 1)]
)
def test_codes_rebuild_the_other_block_types_smolora_exports(kind, make, per_byte):
    generator = torch.Generator().manual_seed(0)
    weight = make(96, 4 * BLOCK, generator)
    fit = fit_codes(weight)
    assert fit.codes.dtype == torch.uint8 and fit.codes.shape == (96, 4, BLOCK // per_byte), kind
    assert (fit.scale < 0).any() == kind.endswith("_0")  # Q4_0 / Q5_0 as scale * q + low, the scale of either sign
    assert torch.equal(fit.weight(), weight) and torch.equal(fit.weight(slice(5, 9)), weight[5:9])
    stored = Codes(*(t.permute(1, 2, 0).contiguous().permute(2, 0, 1) if fit.low is not None else t for t in fit))
    ids = torch.tensor([[9, 2], [0, 9]])
    assert torch.equal(stored.weight(), weight) and torch.equal(stored.rows(ids), weight[ids])  # an embedding lookup
    off = weight.clone()
    off[5, 7] = torch.nextafter(off[5, 7], torch.tensor(1.0))
    assert fit_codes(off) is None


def test_codes_rebuild_a_q8_0_weight_and_its_rows():
    generator = torch.Generator().manual_seed(0)
    weight = q8_0(50, 2 * BLOCK, generator)
    fit = fit_codes(weight)
    assert fit.codes.dtype == torch.int8 and fit.low is None
    assert torch.equal(fit.weight(), weight)
    ids = torch.tensor([[3, 3, 49], [0, 7, 1]])
    assert torch.equal(fit.rows(ids), weight[ids])  # an embedding lookup
    mixed = torch.cat([q4_1(20, 2 * BLOCK, generator), weight[20:]])  # Q4_1 rows, then Q8_0 ones: one kind per weight
    assert fit_codes(mixed, rows=20) is None and fit_codes(mixed[:20], rows=20) is not None
    weight[2, 0] = weight[2, 0] * 1.5
    assert fit_codes(weight) is None


def coded_folder(tmp_path, tokenizer, with_codes: bool, arch: str = "llama"):
    model = build_tiny(arch, len(tokenizer), seed=3)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if type(module) is nn.Linear and module is not model.lm_head:
                module.weight.copy_(q4_1(*module.weight.shape, generator))
        model.get_input_embeddings().weight.copy_(
            q8_0(*model.get_input_embeddings().weight.shape, generator)
        )  # tied to the head
    folder = tmp_path / ("coded" if with_codes else "plain")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if with_codes:
        assert (
            save_codes(model, folder) == 15
        )  # 2 layers x q, k, v, o, gate, up, down; the embedding, once for the tied head
    return folder


def load_poisoned(folder):
    """The folder's model with every linear and embedding weight NaN but its first row, which
    coded_weights checks: what reads the codes never sees the NaNs."""
    model = load_model(resolve_model(folder))
    with torch.no_grad():
        for module in model.modules():
            if type(module) in (nn.Linear, nn.Embedding):
                module.weight[1:] = float("nan")
    return model


def train_on(
    folder,
    tokenizer,
    tmp_path,
    poison: bool = False,
    gradient_checkpointing: bool = False,
    weight_codes: bool = True,
    bias: str = "none",
    precision: str = "fp32",
):
    model = load_poisoned(folder) if poison else load_model(resolve_model(folder))
    torch.manual_seed(0)
    model = add_lora(model, LoraSettings(lora_dropout=0.1, target_modules=["all"], bias=bias).to_peft())
    examples = encode_records(chat_records(16), tokenizer, FormatOptions())[0]
    cfg = TrainConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        seed=1,
        eval_steps=2,
        gradient_checkpointing=gradient_checkpointing,
        weight_codes=weight_codes,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
    )
    result = train(model, examples, cfg, val_examples=examples[:4])
    assert not any("forward" in vars(m) for m in model.modules() if type(m) is nn.Linear)  # restored
    assert len(result.eval_losses) == 2
    return result.losses + [loss for _, loss in result.eval_losses], {
        n: p.detach() for n, p in model.named_parameters() if p.requires_grad
    }


@pytest.mark.parametrize(("gradient_checkpointing", "onednn"), [(False, True), (True, True), (False, False)])
def test_training_on_codes_is_training_on_the_fp32_weights_and_never_reads_them(
    tokenizer, tmp_path, monkeypatch, gradient_checkpointing, onednn
):
    if not onednn:  # torch's own GEMM (MKL's), as on a CPU where oneDNN's is not faster
        monkeypatch.setattr(smolora.fast.onednn, "onednn_is_faster", lambda: False)
    plain_losses, plain_adapter = train_on(
        coded_folder(tmp_path, tokenizer, False), tokenizer, tmp_path / "a", False, gradient_checkpointing
    )
    losses, adapter = train_on(
        coded_folder(tmp_path, tokenizer, True), tokenizer, tmp_path / "b", True, gradient_checkpointing
    )
    assert losses == plain_losses and all(x == x for x in losses)
    assert plain_adapter.keys() == adapter.keys() and all(torch.equal(plain_adapter[n], adapter[n]) for n in adapter)


@pytest.mark.parametrize(("precision", "gradient_checkpointing"), [("bf16", False), ("bf16", True), ("fp16", False)])
def test_training_on_codes_under_autocast_is_training_on_the_fp32_weights_under_it(
    tokenizer, tmp_path, precision, gradient_checkpointing
):
    """``--bf16`` / ``--fp16`` on a CPU: the rebuilt weight cast to autocast's dtype is the one autocast
    casts from the fp32 weight (in W^T's layout, so a GEMM may sum in another order: not to the bit)."""
    plain_losses, plain_adapter = train_on(
        coded_folder(tmp_path, tokenizer, False),
        tokenizer,
        tmp_path / "a",
        gradient_checkpointing=gradient_checkpointing,
        precision=precision,
    )
    losses, adapter = train_on(
        coded_folder(tmp_path, tokenizer, True),
        tokenizer,
        tmp_path / "b",
        True,
        gradient_checkpointing=gradient_checkpointing,
        precision=precision,
    )
    assert all(
        math.isclose(x, y, rel_tol=1e-5) for x, y in zip(losses, plain_losses, strict=True)
    )  # NaN if a fp32 weight was read
    assert all(torch.allclose(plain_adapter[n], adapter[n], rtol=1e-3, atol=1e-6) for n in adapter)


def test_weight_codes_off_reads_the_fp32_weights(tokenizer, tmp_path):
    folder = coded_folder(tmp_path, tokenizer, True)
    with pytest.raises(NonFiniteLossError):  # the poisoned rows are read
        train_on(folder, tokenizer, tmp_path / "b", True, weight_codes=False)
    model, examples = (
        load_poisoned(folder).requires_grad_(False),
        encode_records(chat_records(4), tokenizer, FormatOptions())[0],
    )
    assert math.isfinite(evaluate(model, tokenizer, examples, progress=False).loss)
    assert math.isnan(
        evaluate(model, tokenizer, examples, progress=False, weight_codes=False).loss
    )  # smolora eval --no-weight-codes


def test_a_layer_whose_bias_trains_keeps_its_own_forward(tokenizer, tmp_path):
    """A coded layer's backward gives its bias no gradient: a layer whose bias trains is left alone."""
    folder = coded_folder(tmp_path, tokenizer, True, arch="qwen2")  # q/k/v have biases
    plain_losses, plain = train_on(folder, tokenizer, tmp_path / "a", weight_codes=False, bias="all")
    losses, trained = train_on(folder, tokenizer, tmp_path / "b", bias="all")
    assert any(name.endswith("q_proj.base_layer.bias") for name in trained)
    assert losses == plain_losses and all(torch.equal(plain[n], trained[n]) for n in trained)


def test_a_weight_changed_since_loading_keeps_its_own_forward(tokenizer, tmp_path):
    model = load_model(resolve_model(coded_folder(tmp_path, tokenizer, True))).requires_grad_(
        False
    )  # frozen, as a base trains
    assert (tmp_path / "coded" / CODES_FILE).is_file()

    def coded() -> int:
        return sum("forward" in vars(m) for m in model.modules())

    with coded_weights(model):
        assert coded() == 16  # the 14 layer weights, the embedding and the head tied to it
        assert codes_of(model.lm_head) is codes_of(model.get_input_embeddings()) is not None
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.add_(1.0)  # as merging an adapter into the base would
    with coded_weights(model):
        assert coded() == 15
    assert coded() == 0 and codes_of(model.lm_head) is None
    # a merge marks the whole model, whichever rows it changed: here none (a new adapter's B is 0)
    model = merge_and_unload(add_lora(model, LoraSettings(target_modules=["q_proj"]).to_peft()))
    with coded_weights(model):
        assert coded() == 0


def test_a_failure_while_setting_up_training_undoes_what_was_set_up(tokenizer, tmp_path, monkeypatch):
    model = add_lora(
        load_model(resolve_model(coded_folder(tmp_path, tokenizer, True))),
        LoraSettings().to_peft(),
    )
    monkeypatch.setenv(smolora.fast.onednn.ENV, "neither")  # read by the first GEMM: the fused layers' probes
    smolora.fast.onednn.onednn_is_faster.cache_clear()
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SmoLoRAError, match="SMOLORA_GEMM"):
            train(
                model,
                encode_records(chat_records(4), tokenizer, FormatOptions())[0],
                TrainConfig(output_dir=str(tmp_path / "out"), max_steps=1),
            )
    finally:
        smolora.fast.onednn.onednn_is_faster.cache_clear()
    assert signal.getsignal(signal.SIGINT) is handler
    assert not any("forward" in vars(m) or codes_of(m) is not None for m in model.modules())
    assert model.get_base_model().config._attn_implementation != "smolora_varlen"


def half_folder(tmp_path, tokenizer, dtype: torch.dtype):
    """A tiny Llama saved as a Hugging Face checkpoint in ``dtype``, as most are: loaded, its weights are
    fp32 copies."""
    folder = tmp_path / str(dtype).removeprefix("torch.")
    build_tiny("llama", len(tokenizer), seed=3).to(dtype).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_codes_hold_a_weight_a_checkpoint_stored_in_16_bits_as_such():
    weight = torch.randn(8, 40).to(torch.bfloat16).float()  # 40: not whole blocks of 32
    codes = fit_codes(weight)
    assert codes.codes.dtype == torch.bfloat16 and codes.scale is None and torch.equal(codes.weight(), weight)
    index = torch.tensor([[3, 1]])
    assert torch.equal(codes.rows(index), weight[index])
    assert fit_codes(torch.randn(8, 40).half().float()).codes.dtype == torch.float16
    assert fit_codes(torch.randn(8, 40)) is None
    generator = torch.Generator().manual_seed(0)
    assert fit_codes(q4_1(8, 64, generator)).codes.dtype == torch.uint8  # the smaller codes first


@pytest.mark.parametrize(
    ("dtype", "precision"), [(torch.bfloat16, "fp32"), (torch.float16, "fp32"), (torch.bfloat16, "bf16")]
)
def test_a_16_bit_checkpoint_trains_on_its_16_bit_weights_from_a_cache_written_once(
    tokenizer, tmp_path, monkeypatch, dtype, precision
):
    monkeypatch.setenv("SMOLORA_HOME", str(tmp_path / "home"))
    folder = half_folder(tmp_path, tokenizer, dtype)
    cache = half_cache_folder(folder)
    assert cache.parent == tmp_path / "home" / "models" and (cache / CODES_FILE).is_file()
    assert (
        half_cache_folder(folder) == cache
        and (cache / "model.safetensors").stat().st_mtime_ns
        == (half_cache_folder(folder) / "model.safetensors").stat().st_mtime_ns
    )  # reused, not rewritten
    assert (cache / "config.json").read_text() == (folder / "config.json").read_text()
    with safe_open(str(cache / CODES_FILE), "pt") as file:
        assert len(list(file.keys())) == 15 and all(file.get_tensor(k).dtype == dtype for k in file.keys())
    plain_losses, plain_adapter = train_on(folder, tokenizer, tmp_path / "a", weight_codes=False, precision=precision)
    losses, adapter = train_on(
        cache, tokenizer, tmp_path / "b", poison=True, precision=precision
    )  # the fp32 copies are never read
    assert losses == plain_losses and all(torch.equal(plain_adapter[n], adapter[n]) for n in adapter)


def test_training_through_the_api_uses_the_16_bit_cache_only_where_codes_are_on(tokenizer, tmp_path, monkeypatch):
    from smolora import SmoLoRA

    monkeypatch.setenv("SMOLORA_HOME", str(tmp_path / "home"))
    folder, adapters = half_folder(tmp_path, tokenizer, torch.bfloat16), []
    for weight_codes in (False, True):
        lora = SmoLoRA(
            base_model_name=str(folder), dataset_name=chat_records(8), output_dir=str(tmp_path / str(weight_codes))
        )
        lora.sft_config.max_steps, lora.sft_config.weight_codes = 2, weight_codes
        lora.train()
        adapters.append({n: p.detach() for n, p in lora.model.named_parameters() if p.requires_grad})
        assert (tmp_path / "home" / "models").is_dir() == weight_codes
        assert lora.source.folder == str(folder)
    assert all(torch.equal(adapters[0][n], adapters[1][n]) for n in adapters[0])


def test_smolora_eval_of_a_16_bit_checkpoint_reads_it_from_the_cache(tokenizer, tmp_path):
    folder, data = half_folder(tmp_path, tokenizer, torch.bfloat16), write_jsonl(tmp_path / "v.jsonl", chat_records(6))
    env = {**ENV, "SMOLORA_HOME": str(tmp_path / "home")}
    plain = run_cli(
        "eval", "--model", folder, "--data", data, "--json", tmp_path / "plain.json", "--no-weight-codes", env=env
    )
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert not (tmp_path / "home" / "models").exists()  # (its compiled kernels may be there)
    coded = run_cli("eval", "--model", folder, "--data", data, "--json", tmp_path / "coded.json", env=env)
    assert coded.returncode == 0, coded.stderr[-2000:]
    assert (
        "16-bit weights as fp32 + codes (once)" in coded.stdout
        and len(list((tmp_path / "home" / "models").iterdir())) == 1
    )
    assert (
        json.loads((tmp_path / "coded.json").read_text())["loss"]
        == json.loads((tmp_path / "plain.json").read_text())["loss"]
    )


def test_a_16_bit_cache_only_for_cpu_training_of_a_model_transformers_implements(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("SMOLORA_HOME", str(tmp_path / "home"))
    assert half_cache_folder(coded_folder(tmp_path, tokenizer, False)) is None  # fp32
    folder = half_folder(tmp_path, tokenizer, torch.bfloat16)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"auto_map": {"AutoModelForCausalLM": "modeling.Model"}}))
    assert half_cache_folder(folder) is None and not (tmp_path / "home").exists()
    (folder / "config.json").write_text(json.dumps(config))
    source = resolve_model(folder)
    assert codes_source(source, "cuda") == codes_source(source, "mps") == codes_source(source, "cpu", False) == source
    assert not (tmp_path / "home").exists()
    assert codes_source(source, "cpu").folder != source.folder and codes_source(source, "cpu").name == source.name


@pytest.mark.parametrize("kind", ["q4_1", "q4_0", "q5_0", "q5_1", "q8_0", "f16", "bf16"])
def test_a_gguf_converts_with_codes_that_rebuild_each_of_its_quantized_tensors(tmp_path, tokenizer, monkeypatch, kind):
    """The real path: gguf-py quantizes (SmoLoRA's own export, each block type it writes, and its
    16-bit files), transformers' GGUF loader dequantizes, and the conversion finds every quantized
    tensor's codes back (a 16-bit one's as its 16 bits)."""
    from gguf import GGMLQuantizationType, GGUFReader
    from safetensors import safe_open

    from smolora.export import export_gguf

    monkeypatch.setenv("SMOLORA_HOME", str(tmp_path / "home"))
    path = export_gguf(build_tiny_llama(len(tokenizer), seed=3), tokenizer, tmp_path / "tiny.gguf", kind)
    kinds = [t.tensor_type for t in GGUFReader(path).tensors]
    layers = GGMLQuantizationType[kind.upper()]
    half = kind in ("f16", "bf16")  # the embedding too; a quantized file's embedding is Q8_0
    assert kinds.count(GGMLQuantizationType.Q8_0) == (0 if half else 1) + (14 if kind == "q8_0" else 0)
    folder = resolve_model(path).folder
    with safe_open(f"{folder}/{CODES_FILE}", "pt") as codes, safe_open(f"{folder}/model.safetensors", "pt") as fp32:
        names = {key.rsplit(".", 1)[0] for key in codes.keys()}
        assert len(names) == sum(t in (layers, GGMLQuantizationType.Q8_0) for t in kinds) == 15
        for name in names:
            assert torch.equal(read_codes(codes, name).weight(), fp32.get_tensor(name)), name


@pytest.mark.parametrize("tie", [True, False])
def test_a_converted_gguf_is_the_model_transformers_reads_from_it_with_its_ties(tmp_path, tokenizer, monkeypatch, tie):
    """The conversion hands transformers' GGUF-loaded tensors to a plainly built model (weights in memory
    once): the converted folder computes the same logits, and a tied head is the embedding again."""
    from transformers import AutoModelForCausalLM

    from smolora.export import export_gguf

    monkeypatch.setenv("SMOLORA_HOME", str(tmp_path / "home"))
    path = export_gguf(build_tiny_llama(len(tokenizer), tie=tie, seed=4), tokenizer, tmp_path / "tiny.gguf", "q8_0")
    folder = resolve_model(path).folder
    converted = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    direct = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32).eval()
    ids = torch.tensor([[1, 17, 230, 5, 99, 3]])
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, direct(ids).logits)
    with safe_open(f"{folder}/{CODES_FILE}", "pt") as codes:  # a tied head: codes under the embedding's name only
        assert ("lm_head.weight.codes" in codes.keys()) != tie and "model.embed_tokens.weight.codes" in codes.keys()
