"""Every architecture SmoLoRA supports, as a tiny random model built from its transformers config:
``all-linear`` adapts every linear layer but the head (found by role, fused projections included),
a few steps lower the loss, PEFT loads the adapter to our logits, the merged model loads in
transformers to the adapter's logits, and packed rows stay exact. The speed wing's own tests
(tests/test_fast.py, tests/test_packing.py) cover Llama, Qwen2, Qwen3 and Gemma in depth; here each
further architecture gets the same checks once."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from peft import PeftModel

from conftest import ARCHITECTURES, TINY_SIZES, chat_records
from smolora.config import LoraSettings, TrainConfig
from smolora.data.batching import collate
from smolora.data.formats import FormatOptions, encode_records
from smolora.errors import SmoLoRAError
from smolora.fast import accelerated
from smolora.fast.attention import supports_varlen, varlen_attention
from smolora.lora import add_lora, candidate_layers, describe_targets, layer_roles, resolve_targets, write_adapter
from smolora.loss import evaluate_loss, token_loss_sum
from smolora.merge import merge_adapter
from smolora.train import train

# name: (config class, model class, sizes and the architecture's own conventions, tied embeddings)
MODELS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", TINY_SIZES, False),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", TINY_SIZES, True),  # q/k/v biases
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", TINY_SIZES, False),  # q/k norms
    "gemma": ("GemmaConfig", "GemmaForCausalLM", TINY_SIZES, True),  # GeGLU, scaled embeddings
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {**TINY_SIZES, "sliding_window": 16}, False),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {**TINY_SIZES, "partial_rotary_factor": 0.5}, True),  # fused
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_inner=64, n_layer=2, n_head=4, n_positions=256), True),
    "gpt_neox": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            rotary_pct=0.5,
        ),
        False,
    ),
    "opt": (
        "OPTConfig",
        "OPTForCausalLM",
        dict(
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=32,
            max_position_embeddings=256,
        ),
        True,
    ),
    "granite": (
        "GraniteConfig",
        "GraniteForCausalLM",
        {**TINY_SIZES, "logits_scaling": 4.0, "embedding_multiplier": 2.0, "residual_multiplier": 0.5},
        False,
    ),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", TINY_SIZES, True),  # no rope on every fourth layer
}
# What all-linear adapts in one decoder layer of each, as the run reports it (fused projections as one).
LAYER_TARGETS = {
    "llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
    "gpt2": {"c_attn", "c_proj", "c_fc"},  # c_proj twice: attention output and MLP down projection
    "gpt_neox": {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"},
    "opt": {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"},
}
for _name in ("qwen2", "qwen3", "gemma", "gemma3", "granite", "smollm3"):
    LAYER_TARGETS[_name] = LAYER_TARGETS["llama"]


def build(name: str, vocab_size: int, tie: bool | None = None, seed: int = 0):
    """A tiny random model of architecture ``name``; ``tie``: tied input and output embeddings
    (default: the one ``MODELS`` gives it, so that both kinds are covered)."""
    config_class, model_class, sizes, tied = MODELS[name]
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(
        vocab_size=vocab_size,
        tie_word_embeddings=tied if tie is None else tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        **sizes,
    )
    return getattr(transformers, model_class)(config).eval()


def examples_of(tokenizer, n: int = 12):
    records = chat_records(n)
    records[1]["messages"][1]["content"] = "a much longer answer: the quick brown fox jumps over the lazy dog"
    return encode_records(records, tokenizer, FormatOptions())[0]


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.mark.parametrize("name", MODELS)
def test_all_linear_adapts_every_linear_layer_but_the_head_by_role(tokenizer, name):
    model = build(name, len(tokenizer))
    head = model.get_output_embeddings()
    linear = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, transformers.Conv1D))]
    assert set(candidate_layers(model)) == {n for n in linear if model.get_submodule(n) is not head}
    targets = resolve_targets(model, ["all-linear"])
    assert {t.rsplit(".", 1)[-1] for t in targets} == LAYER_TARGETS[name]
    # attention and MLP presets split the same layers between them, nothing else in these models
    attention, mlp = set(resolve_targets(model, "attention")), set(resolve_targets(model, "mlp"))
    by_role = {n: layer_roles(n) for n in candidate_layers(model)}
    assert all(roles & {"q", "k", "v", "o"} or roles == {"mlp"} for roles in by_role.values())
    q_and_v = resolve_targets(model, "qv")
    fused = [n for n, roles in by_role.items() if len(roles) > 1]
    if fused:  # one matrix computes q, k and v: qv and qkv both adapt it, and nothing else
        assert q_and_v == resolve_targets(model, "qkv") == sorted({f.rsplit(".", 1)[-1] for f in fused})
    else:
        assert {t.rsplit(".", 1)[-1] for t in q_and_v} == {"q_proj", "v_proj"}
    assert set(q_and_v) <= attention and not attention & mlp


@pytest.mark.parametrize("name", MODELS)
def test_all_linear_trains_and_peft_and_transformers_load_it_back(tokenizer, tmp_path, name, said):
    """A few steps lower the loss; PEFT loads the adapter to our logits; ``smolora merge``'s folder
    loads in transformers to the adapter's logits. Each model in its own MODELS tying."""
    base = build(name, len(tokenizer))
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    model = add_lora(copy.deepcopy(base), LoraSettings(target_modules=["all-linear"]).to_peft())
    adapted = describe_targets(model)
    assert adapted.startswith(f"LoRA on {len(candidate_layers(base))} layers: ")
    examples = examples_of(tokenizer)
    before = evaluate_loss(model, examples)
    cfg = TrainConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=6,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        seed=1,
    )
    train(model, examples, cfg)
    assert evaluate_loss(model, examples) < before - 0.02  # (lowered by 0.04 to 0.19 on these models)
    levers = [line for line in said if line.startswith("[smolora] speed levers: ")]
    assert len(levers) == 1 and "fast dropout" in levers[0]  # the wing ran where its probes passed
    assert not any("skipped" in line for line in said)

    ids = torch.tensor([examples[1].input_ids])
    ours = logits_of(model, ids)
    write_adapter(model, tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter"
    )
    theirs = logits_of(loaded, ids)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    merge_adapter(tmp_path / "adapter", tmp_path / "merged", str(base_dir))
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits_of(merged, ids), theirs, atol=1e-4, rtol=0)
    assert merged.config.tie_word_embeddings == base.config.tie_word_embeddings


@pytest.mark.parametrize("name", ["gpt2", "opt", "phi3"])
def test_the_other_tying_merges_exactly_too(tokenizer, name):
    """The tying MODELS does not give these (the merge never writes through a shared embedding)."""
    from smolora.merge import merge_and_unload

    tie = not MODELS[name][3]
    model = add_lora(build(name, len(tokenizer), tie=tie), LoraSettings(target_modules=["all-linear"]).to_peft())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # as after training
    ids = torch.tensor([examples_of(tokenizer, 2)[0].input_ids])
    unmerged = logits_of(model, ids)
    merged = merge_and_unload(model)
    assert merged.config.tie_word_embeddings == tie
    torch.testing.assert_close(logits_of(merged, ids), unmerged, atol=1e-4, rtol=0)


def _state(model):
    from test_fast import _state as state  # every attribute a lever could change

    return state(model)


@pytest.mark.parametrize("name", [n for n in MODELS if n not in ARCHITECTURES])
def test_the_speed_wing_applies_where_its_probes_pass_and_leaves_no_trace(tokenizer, name):
    model = add_lora(build(name, len(tokenizer)), LoraSettings(target_modules=["all-linear"]).to_peft())
    before = _state(model)
    with accelerated(model) as speed:
        assert "fast dropout" in speed.levers  # on every LoRA layer, Conv1D ones too
        assert ("span attention" in speed.levers) == supports_varlen(model.get_base_model())
    assert _state(model) == before


@torch.no_grad()
@pytest.mark.parametrize("name", [n for n in MODELS if n not in ARCHITECTURES])
def test_packed_rows_equal_examples_alone(tokenizer, name):
    """Both paths: the library's (restarting position ids, or the block mask where the model's own mask
    ignores them: OPT) and the speed wing's span attention where the model takes it."""
    model = build(name, len(tokenizer))
    examples = examples_of(tokenizer, 5)
    mb = collate(examples, packed=True)
    alone = [model(input_ids=torch.tensor([e.input_ids]), use_cache=False).logits[0] for e in examples]
    total = sum(token_loss_sum(model, collate([e])) for e in examples)
    torch.testing.assert_close(token_loss_sum(model, mb), total, atol=1e-4, rtol=1e-6)
    if supports_varlen(model):
        with varlen_attention(model):
            row = model(
                input_ids=mb.input_ids, position_ids=mb.position_ids, use_cache=False, smolora_segments=mb.segments
            ).logits[0]
        for (start, end), logits in zip(mb.segments.spans, alone):
            torch.testing.assert_close(row[start:end], logits, atol=1e-5, rtol=0)


def test_a_regex_or_names_still_work_and_a_name_matching_nothing_lists_the_layers(tokenizer, said):
    model = build("gpt2", len(tokenizer))
    assert resolve_targets(model, r".*\.h\.1\.attn\.c_(attn|proj)") == ["h.1.attn.c_attn", "h.1.attn.c_proj"]
    assert resolve_targets(model, ["c_attn", "lm_head"]) == ["c_attn", "lm_head"]
    with pytest.raises(SmoLoRAError, match=r"q_proj match no linear layer; the model has: c_attn \(x2\), c_fc"):
        resolve_targets(model, ["q_proj"])
    with pytest.raises(SmoLoRAError, match="matches no linear layer's full name"):
        resolve_targets(model, r"nothing\..*")
    with pytest.raises(SmoLoRAError, match="not a valid regular expression"):
        resolve_targets(model, "c_(attn")
    peft_model = add_lora(model, LoraSettings(target_modules=["attention"]).to_peft())
    assert peft_model.peft_config["default"].fan_in_fan_out  # Conv1D stores its weight (in, out)
    assert sorted(peft_model.peft_config["default"].target_modules) == ["attn.c_proj", "c_attn"]
    assert describe_targets(peft_model) == (
        "LoRA on 4 layers: c_attn x2 (q+k+v fused), c_proj x2 (attention output); c_attn computes several "
        "projections in one matrix: one adapter adapts them together"
    )


def test_a_model_that_cannot_keep_packed_examples_apart_trains_on_padded_batches(tokenizer, tmp_path, said):
    """Bloom's ALiBi reads a 2D padding mask and no position ids: packed rows would mix examples, so a
    run trains it unpacked, saying so, and a packed loss is refused in one line."""
    torch.manual_seed(0)
    config = transformers.BloomConfig(vocab_size=len(tokenizer), hidden_size=32, n_layer=2, n_head=4)
    model = add_lora(transformers.BloomForCausalLM(config), LoraSettings(target_modules=["all-linear"]).to_peft())
    examples = examples_of(tokenizer)
    with pytest.raises(SmoLoRAError, match="BloomForCausalLM cannot keep the examples of a packed row apart"):
        token_loss_sum(model, collate(examples[:3], packed=True))
    before = evaluate_loss(model, examples, packed=False, pad_id=2)
    cfg = TrainConfig(
        output_dir=str(tmp_path),
        max_steps=6,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        seed=1,
    )
    train(model, examples, cfg, pad_id=2)
    assert (
        "[smolora] warning: BloomForCausalLM cannot keep a packed row's examples apart: training on padded batches"
        in said
    )
    assert evaluate_loss(model, examples, packed=False, pad_id=2) < before - 0.02


@pytest.fixture
def model_dir(tmp_path, tokenizer, request):
    """A saved tiny model of the architecture ``request.param`` with the test tokenizer."""
    folder = tmp_path / request.param
    build(request.param, len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("model_dir", ["gpt2"], indirect=True)
def test_the_command_line_trains_all_linear_on_gpt2_and_says_what_it_adapted(tmp_path, model_dir):
    """Conv1D layers, a fused q/k/v projection, tied embeddings: trained, merged, read back."""
    from conftest import write_jsonl
    from test_cli import smolora

    data = write_jsonl(tmp_path / "train.jsonl", chat_records(12))
    out = tmp_path / "run"
    r = smolora(
        *("train", "--data", data, "--output", out, "--model", model_dir, "--max-steps", 3),
        *("--target-modules", "all-linear", "--gradient-accumulation-steps", 2),
    )
    said = r.stdout + r.stderr
    assert r.returncode == 0, said[-2000:]
    assert (
        "LoRA on 8 layers: c_attn x2 (q+k+v fused), c_proj x2 (attention output), c_fc x2 (MLP), c_proj x2 (MLP); "
        "c_attn computes several projections in one matrix: one adapter adapts them together" in said
    )
    assert said.index("LoRA on 8 layers") < said.index("step 3/3")  # said before training
    ids = torch.tensor([list(range(3, 20))])
    adapter = PeftModel.from_pretrained(load_folder(model_dir), out / "adapter_checkpoint")
    merged = load_folder(out / "final_merged")
    torch.testing.assert_close(logits_of(merged, ids), logits_of(adapter, ids), atol=1e-4, rtol=0)
    assert not torch.equal(logits_of(merged, ids), logits_of(load_folder(model_dir), ids))


def load_folder(folder):
    """A saved model folder as transformers loads it."""
    return transformers.AutoModelForCausalLM.from_pretrained(folder)


@pytest.mark.slow
@pytest.mark.parametrize("model_dir", ["gpt_neox"], indirect=True)
def test_two_processes_train_gpt_neox_as_one_process_with_twice_the_accumulation(tmp_path, model_dir):
    from safetensors.torch import load_file

    from conftest import write_jsonl
    from test_cli import smolora
    from test_distributed import torchrun

    data = write_jsonl(tmp_path / "train.jsonl", chat_records(16))
    common = ["train", "--data", data, "--model", model_dir, "--max-steps", 3, "--lora-dropout", 0, "--no-merge"]
    common += ["--target-modules", "all-linear"]
    one = smolora(*common, "--gradient-accumulation-steps", 4, "--output", tmp_path / "one")
    assert one.returncode == 0, one.stderr[-2000:]
    two = torchrun(*common, "--gradient-accumulation-steps", 2, "--output", tmp_path / "two")
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (load_file(tmp_path / run / "adapter_checkpoint" / "adapter_model.safetensors") for run in ("one", "two"))
    assert a.keys() == b.keys() and any("query_key_value" in k for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5)
