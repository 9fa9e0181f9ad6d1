"""Training throughput and memory: SmoLoRA vs TRL's SFTTrainer (the anchor) vs a plain reference loop.

    python benchmarks/bench_train.py                  # short + long chat data, 3 repetitions, like-for-like pairs
    python benchmarks/bench_train.py --impls trl,smolora,reference   # the issue's pair and the loss check only
    python benchmarks/bench_train.py --reps 1 --steps 4 --variants short   # a quick look
    python benchmarks/bench_train.py --arch qwen3     # a second architecture (random weights, same size)
    python benchmarks/bench_train.py --arch qwen3 --arch-dtype bfloat16   # weights stored in bf16, as checkpoints are
    python benchmarks/bench_train.py --model DIR --variants my_chats.jsonl --data-seed 7   # your model, your data
    python benchmarks/bench_train.py --size 1.7b --reps 1 --steps 2 --accum 2 --variants short   # how far a laptop goes
    python benchmarks/bench_train.py --size 360m --size-format safetensors   # SmoLoRA from bf16 safetensors, not GGUF

Every run happens in its own subprocess (honest peak RSS), on the embedded SmolLM2-135M-Instruct
(or ``--model``/``--arch``), with the spec's config: LoRA r=8, alpha=16, dropout 0.1 on q_proj/v_proj;
batch 1 x accumulation 8;
lr 2e-4; AdamW; fp32; max_length 1024. TRL runs with its own default of gradient checkpointing on
(trl 1.x; the spec's config leaves it unset); ``trl_no_ckpt`` runs it off and ``smolora_ckpt`` runs
SmoLoRA with it on, for the like-for-like pairs (smolora / trl_no_ckpt, smolora_ckpt / trl).
Throughput counts the dataset's own tokens and examples, never tokens computed. The first
optimizer step of each run is a warm-up and is not timed.
MFU = FLOPs of the matmuls each implementation actually runs (counted analytically) / the fp32
GEMM peak measured at the model's shapes: the highest rate of the probe run before any worker and
the one each worker runs right after its training (the machine's speed drifts; the highest probe
never flatters), through torch's default fp32 GEMM and through oneDNN's, which SmoLoRA uses where
it is faster. A worker's peak RSS is read before its probe.

``--size 360m`` / ``1.7b``: random weights at SmolLM2-360M's / SmolLM2-1.7B's shapes, built once under
``--work-dir`` as a user's download comes: bf16 safetensors, and a Q4_1 GGUF quantized from them by
SmoLoRA's export. SmoLoRA (and the reference loop) trains from the one ``--size-format`` names, TRL
from the bf16 safetensors upcast to fp32; the one-time steps before the workers (building; SmoLoRA's
conversion of what it trains from, as a user's first run does) run in processes of their own, and their
time and peak RSS are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

USER_ENV = set(os.environ)  # before importing smolora, which sets oneDNN's cache sizes

from smolora.fast import allocator, native, onednn  # noqa: E402

HERE = Path(__file__).resolve().parent
WORDS = (
    "time person year way day thing man world life hand part child eye woman place work week case point government "
    "company number group problem fact water river mountain city music garden light paper story energy market "
    "simple quick bright quiet early strong small large green happy careful clear warm cold"
).split()
SPEC = dict(r=8, alpha=16, dropout=0.1, targets=["q_proj", "v_proj"], batch=1, accum=8, lr=2e-4, max_length=1024)


# ---------------------------------------------------------------------------------------------
# data: generated chat prompt/completion records, like real instruction data
def make_records(variant: str, count: int, seed: int) -> list[dict]:
    """``count`` records: generated ("short", "long") or drawn from a JSONL file of chat records."""
    if variant not in ("short", "long"):
        rows = [json.loads(line) for line in Path(variant).read_text().splitlines() if line.strip()]
        if len(rows) < count:
            raise SystemExit(f"{variant}: {len(rows)} records, the run needs {count} (steps x accumulation)")
        return random.Random(seed).sample(rows, count)
    rng = random.Random(seed)
    sentence = lambda n: " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."  # noqa: E731
    answer_words = {"short": (12, 22), "long": (320, 420)}[variant]
    records = []
    for _ in range(count):
        prompt = sentence(rng.randint(6, 12)) + " Explain?"
        words = rng.randint(*answer_words)
        answer = " ".join(sentence(min(12, words)) for _ in range(max(1, words // 12)))
        records.append({"prompt": prompt, "completion": answer})
    return records


# ---------------------------------------------------------------------------------------------
# a second architecture: random weights at the embedded model's sizes, with its tokenizer
ARCHS = {"qwen2": "Qwen2", "qwen3": "Qwen3", "gemma": "Gemma", "llama": "Llama"}


def build_arch(arch: str, dtype: str = "float32") -> str:
    """Save a randomly initialised ``arch`` model the size of SmolLM2-135M (same hidden size, layers,
    heads and vocabulary) with the embedded tokenizer, its weights stored in ``dtype`` (bfloat16:
    as real checkpoints are); returns the folder. Speed does not depend on the weights' values,
    and nothing is downloaded."""
    import shutil

    import transformers

    from smolora.models import resolve_model
    from smolora.paths import smolora_home

    base = resolve_model(None).folder
    folder = smolora_home() / "bench-models" / (arch if dtype == "float32" else f"{arch}-{dtype}")
    if (folder / "model.safetensors").is_file():
        return str(folder)
    ref = transformers.AutoConfig.from_pretrained(base)
    dims = {
        k: getattr(ref, k)
        for k in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
            "tie_word_embeddings",
            "bos_token_id",
            "eos_token_id",
            "pad_token_id",
        )
    }
    config = getattr(transformers, ARCHS[arch] + "Config")(**dims, head_dim=ref.hidden_size // ref.num_attention_heads)
    torch.manual_seed(0)
    model = getattr(transformers, ARCHS[arch] + "ForCausalLM")(config)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(getattr(torch, dtype)).save_pretrained(tmp)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (Path(base) / name).is_file():
            shutil.copy(Path(base) / name, tmp / name)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return str(folder)


# ---------------------------------------------------------------------------------------------
# larger models: random weights at SmolLM2-360M's and SmolLM2-1.7B's shapes, stored as a user's download is
# (the published config.json of each: Llama, vocabulary 49152, tied embeddings, context 8192)
SIZES = {
    "360m": dict(
        hidden_size=960,
        intermediate_size=2560,
        num_hidden_layers=32,
        num_attention_heads=15,
        num_key_value_heads=5,
        rope_theta=100000.0,
    ),
    "1.7b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=24,
        num_attention_heads=32,
        num_key_value_heads=32,
        rope_theta=130000.0,
    ),
}
FORMATS = ("gguf", "safetensors")


def size_config(size: str, **token_ids):
    """The ``LlamaConfig`` of SmolLM2 at ``size`` (``SIZES``); ``token_ids``: bos/eos/pad of the tokenizer."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True, **SIZES[size], **token_ids
    )


def size_paths(size: str, work_dir: Path) -> dict[str, Path]:
    """Where ``build_size`` keeps ``size``'s model, by format."""
    folder = Path(work_dir) / f"smollm2-{size}-random"
    return {"safetensors": folder / "bf16", "gguf": folder / f"smollm2-{size}-random.Q4_1.gguf"}


def build_size(size: str, work_dir: Path, tokenizer=None) -> dict[str, Path]:
    """Build a random SmolLM2-``size`` once (seeded) and keep it under ``work_dir`` as a user's download is:
    a Hugging Face folder of bf16 safetensors, and a Q4_1 GGUF quantized from the same bf16 weights by
    SmoLoRA's own export; both with ``tokenizer`` (default: the embedded model's). Later calls reuse them.
    Speed and memory do not depend on the weights' values, and nothing is downloaded."""
    from transformers import AutoModelForCausalLM

    from smolora.export import export_gguf
    from smolora.models import load_tokenizer, resolve_model
    from smolora.paths import publish

    paths = size_paths(size, work_dir)
    if paths["safetensors"].is_dir() and paths["gguf"].is_file():
        return paths
    tokenizer = tokenizer or load_tokenizer(resolve_model(None))
    ids = {f"{t}_token_id": getattr(tokenizer, f"{t}_token_id") for t in ("bos", "eos", "pad")}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(size_config(size, **ids), dtype=torch.bfloat16)  # bf16: half the memory

    def write(tmp: Path) -> None:  # no completion marker: SmoLoRA would take the folder for a cache of its own
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    if not paths["safetensors"].is_dir():
        publish(paths["safetensors"], write)
    if not paths["gguf"].is_file():
        export_gguf(model, tokenizer, paths["gguf"], "q4_1", name=f"SmolLM2-{size} random", modelfile=False)
    return paths


# ---------------------------------------------------------------------------------------------
# the machine: fp32 GEMM at the model's shapes
def model_config():
    from transformers import AutoConfig

    from smolora.models import resolve_model

    return AutoConfig.from_pretrained(resolve_model(MODEL).folder)


def gemm_peak(cfg, tokens: int = 512, dtype: torch.dtype = torch.float32) -> dict:
    """GFLOP/s of ``x @ W^T`` at the model's shapes, through torch's default (MKL's sgemm for fp32)
    and, in fp32, through oneDNN as well (``dnn_*``), which SmoLoRA uses where it is faster: on an
    AMD CPU MKL takes its AVX2 path, and the machine's fp32 peak is oneDNN's. ``peak``: the best."""
    hidden, inter, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    shapes = {
        "qo": (tokens, hidden, hidden),
        "kv": (tokens, hidden, 192),
        "up": (tokens, hidden, inter),
        "down": (tokens, inter, hidden),
        "head": (tokens, hidden, vocab),
    }
    backends = {"": lambda a, w: a @ w.T}
    if dtype == torch.float32 and onednn._available():
        backends["dnn_"] = onednn._onednn_linear
    out = {}
    for prefix, run in backends.items():
        for name, (m, k, n) in shapes.items():
            a, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
            for _ in range(3):
                run(a, w)
            best = float("inf")
            for _ in range(10):
                t = time.perf_counter()
                run(a, w)
                best = min(best, time.perf_counter() - t)
            out[prefix + name] = 2 * m * k * n / best / 1e9
    out["peak"] = max(out.values())
    return out


# ---------------------------------------------------------------------------------------------
# analytic FLOPs of the matmuls actually run in one optimizer step
def step_flops(cfg, rows: list[tuple[int, float, int]], r: int, targets: list[str]) -> float:
    """FLOPs of ``rows``: each (tokens computed, attention query-key pairs, LM-head positions).

    Per token: frozen linears 2·N forward, plus 2·N backward to their input (except layer 0's
    q/k/v, whose input needs no gradient); LoRA 2·r·(din+dout) forward and twice that backward
    (the weights' gradients and the input's); attention QK^T and AV at 4·pairs·hidden forward,
    twice that backward; the LM head 2·H·V forward and 2·H·V backward to the hidden state.
    Attention pairs are the useful ones for every implementation — each query against the keys it
    may see: L²/2 for a causal L-token example, n·p + n²/2 for n tokens after a p-token prefix —
    never the masked-out part of a block a kernel may compute anyway.
    """
    h, inter, layers, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    head_dim = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim
    dims = {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }
    total = 0.0
    for tokens, pairs, head_positions in rows:
        for layer in range(layers):
            for name, (din, dout) in dims.items():
                total += 2 * tokens * din * dout * (1 if layer == 0 and name in ("q_proj", "k_proj", "v_proj") else 2)
                if name in targets:
                    total += 3 * 2 * tokens * r * (din + dout)
            total += 3 * 4 * pairs * q
        total += 4 * head_positions * h * vocab
    return total


# ---------------------------------------------------------------------------------------------
# workers: each runs in a subprocess and prints one JSON line
MODEL: str | None = None  # a model folder or .gguf file; None: the embedded model
ANCHOR_MODEL: str | None = None  # what TRL loads, where not MODEL (--size: the bf16 safetensors folder)


def load_base(training: bool = False, weight_codes: bool = True):
    """The model, as every worker loads it; ``training``: as SmoLoRA's training does (``codes_source``:
    a checkpoint stored in 16 bits comes from the fp32 + codes folder written for it once)."""
    from smolora.models import codes_source, load_model, load_tokenizer, resolve_model

    source = resolve_model(MODEL)
    model = load_model(codes_source(source, "cpu", weight_codes) if training else source)
    return source, load_tokenizer(source), model


def peft_config():
    from peft import LoraConfig

    return LoraConfig(
        r=SPEC["r"],
        lora_alpha=SPEC["alpha"],
        lora_dropout=SPEC["dropout"],
        bias="none",
        task_type="CAUSAL_LM",
        target_modules=SPEC["targets"],
    )


def encode(records, tokenizer):
    from smolora.data.formats import FormatOptions, encode_records

    return encode_records(records, tokenizer, FormatOptions(max_length=SPEC["max_length"]))[0]


def step_order(n_examples: int, steps: int, seed: int) -> list[list[int]]:
    """The examples of each optimizer step, in SmoLoRA's own order (so the reference sees the same)."""
    from smolora.data.batching import epoch_order

    order = epoch_order(n_examples, 0, seed)
    per = SPEC["batch"] * SPEC["accum"]
    return [order[s * per : (s + 1) * per] for s in range(steps)]


def worker_smolora(
    records,
    steps,
    seed,
    gradient_checkpointing: bool = False,
    bf16: bool = False,
    fast: bool = True,
    weight_codes: bool = True,
) -> dict:
    from smolora.config import TrainConfig
    from smolora.lora import add_lora
    from smolora.train import train

    _, tok, model = load_base(training=True, weight_codes=weight_codes)
    examples = encode(records, tok)
    torch.manual_seed(seed)
    model = add_lora(model, peft_config())
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(
            output_dir=out,
            per_device_train_batch_size=SPEC["batch"],
            gradient_accumulation_steps=SPEC["accum"],
            learning_rate=SPEC["lr"],
            max_steps=steps,
            logging_steps=10**6,
            seed=seed,
            save_total_limit=1,
            gradient_checkpointing=gradient_checkpointing,
            bf16=bf16,
            fast=fast,
            weight_codes=weight_codes,
        )
        result = train(model, examples, cfg, pad_id=tok.pad_token_id)
    from smolora.data.batching import group_micro_batches, shared_prefix_length

    rows = []  # per step, what train() computes: (tokens, useful attention pairs, LM-head positions) of each forward
    for idx in step_order(len(examples), steps, seed):
        rows.append([])
        lengths = [len(examples[i].input_ids) for i in idx]
        groups = [
            [examples[idx[i]] for i in g]
            for g in group_micro_batches(lengths, list(range(len(idx))), len(idx), cfg.max_tokens_per_batch)
        ]
        step_p = (
            shared_prefix_length([e for g in groups for e in g]) if fast and cfg.share_prefix and len(groups) > 1 else 0
        )
        if step_p:  # one StepPrefix forward for the step's rows
            rows[-1].append((step_p, step_p * step_p / 2, 0))
        for exs in groups:
            p = step_p or (shared_prefix_length(exs) if cfg.share_prefix else 0)
            tokens = (0 if step_p else p) + sum(len(e.input_ids) - p for e in exs)
            pairs = (0 if step_p else p * p / 2) + sum(
                (len(e.input_ids) - p) * p + (len(e.input_ids) - p) ** 2 / 2 for e in exs
            )
            rows[-1].append((tokens, pairs, sum(1 for e in exs for x in e.labels[1:] if x != -100)))
    return {
        "step_seconds": result.step_seconds,
        "losses": result.losses,
        "flops_rows": rows,
        "tokens_per_step": [
            sum(len(examples[i].input_ids) for i in idx) for idx in step_order(len(examples), steps, seed)
        ],
    }


def worker_reference(records, steps, seed) -> dict:
    """Plain PyTorch + PEFT: one example per forward, full logits, HF-style shift, no packing."""
    import torch.nn.functional as F
    from peft import get_peft_model

    _, tok, model = load_base()
    examples = encode(records, tok)
    torch.manual_seed(seed)
    model = get_peft_model(model, peft_config())
    model.config.use_cache = False
    model.train()
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=SPEC["lr"], weight_decay=0.0
    )  # as SmoLoRA, TRL
    losses, times, rows = [], [], []
    for s, idx in enumerate(step_order(len(examples), steps, seed)):
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = SPEC["lr"] * (1 - s / steps)  # linear decay, SmoLoRA's default schedule
        n_targets = sum(sum(1 for x in examples[i].labels[1:] if x != -100) for i in idx)
        step_loss = 0.0
        rows.append([])
        for i in idx:
            ids = torch.tensor([examples[i].input_ids])
            labels = torch.tensor([examples[i].labels])
            logits = model(input_ids=ids, use_cache=False).logits
            loss = (
                F.cross_entropy(logits[0, :-1].float(), labels[0, 1:], ignore_index=-100, reduction="sum") / n_targets
            )
            loss.backward()
            step_loss += loss.item()
            rows[-1].append((ids.shape[1], ids.shape[1] ** 2 / 2, ids.shape[1]))
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(step_loss)
        times.append(time.perf_counter() - t0)
    return {
        "step_seconds": times,
        "losses": losses,
        "flops_rows": rows,
        "tokens_per_step": [
            sum(len(examples[i].input_ids) for i in idx) for idx in step_order(len(examples), steps, seed)
        ],
    }


def trl_row(record: dict) -> dict:
    """A record as TRL's conversational prompt/completion (the last assistant turn is the completion)."""
    if "messages" in record:
        msgs = record["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        return {"prompt": msgs[:last], "completion": msgs[last : last + 1]}
    return {
        "prompt": [{"role": "user", "content": record["prompt"]}],
        "completion": [{"role": "assistant", "content": record["completion"]}],
    }


def worker_trl(records, steps, seed, bf16: bool = False, gradient_checkpointing: bool = True) -> dict:
    """TRL's SFTTrainer + PEFT; gradient checkpointing set explicitly (TRL's own default, see above),
    so the anchor does not change under a new TRL."""
    import datasets
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    source, tok, model = load_base()
    examples = encode(records, tok)
    if len(examples) != len(records):
        raise RuntimeError(
            f"{len(records) - len(examples)} records have nothing to learn; the order would not match SmoLoRA's"
        )
    order = step_order(
        len(examples), steps, seed
    )  # SmoLoRA's examples per step, in its order; TRL samples sequentially
    rows = [trl_row(records[i]) for idx in order for i in idx]
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out,
            per_device_train_batch_size=SPEC["batch"],
            gradient_accumulation_steps=SPEC["accum"],
            learning_rate=SPEC["lr"],
            max_steps=steps,
            logging_steps=1,
            optim="adamw_torch",
            fp16=False,
            bf16=bf16,
            max_length=SPEC["max_length"],
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            seed=seed,
            dataloader_num_workers=0,
            disable_tqdm=True,
            gradient_checkpointing=gradient_checkpointing,
            train_sampling_strategy="sequential",
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=datasets.Dataset.from_list(rows),
            peft_config=peft_config(),
            processing_class=tok,
            callbacks=[Clock()],
        )
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    flops_rows = [
        [(len(examples[i].input_ids), len(examples[i].input_ids) ** 2 / 2, len(examples[i].input_ids)) for i in idx]
        for idx in order
    ]
    return {
        "step_seconds": times,
        "losses": losses,
        "flops_rows": flops_rows,
        "tokens_per_step": [sum(len(examples[i].input_ids) for i in idx) for idx in order],
    }


WORKERS = {
    "trl": worker_trl,
    "smolora": worker_smolora,
    "reference": worker_reference,
    "trl_no_ckpt": lambda records, steps, seed: worker_trl(records, steps, seed, gradient_checkpointing=False),
    "smolora_ckpt": lambda records, steps, seed: worker_smolora(records, steps, seed, gradient_checkpointing=True),
    # --no-fast: SmoLoRA's loop on the libraries' own path, to show what the speed wing buys
    "smolora_plain": lambda records, steps, seed: worker_smolora(records, steps, seed, fast=False),
    # bf16 autocast: only where the CPU has bf16 matrix units (AMX, AVX512-BF16); never the headline fp32 comparison
    "smolora_bf16": lambda records, steps, seed: worker_smolora(records, steps, seed, bf16=True),
    # --no-weight-codes: the frozen weights as fp32 tensors, what holding their codes saves
    "smolora_no_codes": lambda records, steps, seed: worker_smolora(records, steps, seed, weight_codes=False),
    "trl_bf16": lambda records, steps, seed: worker_trl(records, steps, seed, bf16=True),
}


def run_worker(impl: str, variant: str, steps: int, seed: int) -> dict:
    if not impl.startswith("smolora"):  # torch's own oneDNN cache sizes: undo what importing smolora set
        for name in set(onednn.CACHES) - USER_ENV:
            os.environ.pop(name, None)
    records = make_records(variant, steps * SPEC["accum"], seed)
    torch.set_num_threads(os.cpu_count() or 1)
    dtype = torch.bfloat16 if impl.endswith("_bf16") else torch.float32
    data = WORKERS[impl](records, steps, seed)
    data["peak_rss_mib"] = peak_rss_mib()  # before the probe: its buffers (a 100 MB head output) are not the run's
    # the machine right after the run, in the dtype of the run's matmuls
    data["gemm_peak"], data["gemm_dtype"] = (
        gemm_peak(model_config(), dtype=dtype)["peak"],
        str(dtype).removeprefix("torch."),
    )
    data["allocator"] = allocator.active()
    data["native_kernels"] = (
        impl.startswith("smolora") and impl != "smolora_plain" and native.library() is not None
    )  # smolora.fast.native: built and used
    data["examples_per_step"] = SPEC["batch"] * SPEC["accum"]
    return data


def peak_rss_mib() -> float:
    """This process's own peak resident set size, in MiB.

    Linux: the memory map's high-water mark (``VmHWM``). Not ``ru_maxrss``, which the kernel carries
    across exec: a worker started by ``subprocess`` would report at least its parent's peak — on a
    first run, where the parent converts the embedded GGUF, 1580 MiB for every implementation.
    """
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes, but bytes on macOS
        return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def spawn(impl: str, variant: str, steps: int, seed: int, tcmalloc: str = "smolora") -> dict:
    """Run one worker in a fresh process. SmoLoRA's run on the allocator the ``smolora`` command
    picks (tcmalloc where the system has it, ``smolora.fast.allocator``), the others on the system's
    malloc, as a script of theirs would; ``tcmalloc`` "all" or "none" puts every worker on one."""
    cmd = [sys.executable, __file__, "--worker", impl, "--variant", variant, "--steps", str(steps), "--seed", str(seed)]
    cmd += ["--accum", str(SPEC["accum"])]
    model = ANCHOR_MODEL if impl.startswith("trl") and ANCHOR_MODEL else MODEL
    if model:
        cmd += ["--model", str(model)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
    if not impl.startswith("smolora"):  # torch's own oneDNN cache sizes, not the ones importing smolora sets
        env = {k: v for k, v in env.items() if k not in onednn.CACHES or k in USER_ENV}
    if tcmalloc == "none":
        env["SMOLORA_ALLOCATOR"] = "system"
    elif tcmalloc == "all" or impl.startswith("smolora"):
        env = allocator.preload_env(env) or env
    return run_json(cmd, env, f"{impl} worker")


def run_json(cmd: list[str], env: dict, what: str) -> dict:
    """Run ``cmd``, a process that prints one JSON line last; that line."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def prepare(step: str, size: str | None, work_dir: Path) -> dict:
    """One step before the workers, in its own process (its own peak RSS): ``build`` ``size``'s random
    model (``build_size``), or ``convert`` what SmoLoRA's training reads (``codes_source``: a GGUF's fp32 +
    codes folder, a 16-bit checkpoint's fp32 + codes copy), which a user's first run does once."""
    from smolora.models import codes_source, resolve_model
    from smolora.paths import smolora_home

    caches = smolora_home() / "models"
    before = set(caches.iterdir()) if caches.is_dir() else set()
    t = time.perf_counter()
    if step == "build":
        made = not all(p.exists() for p in size_paths(size, work_dir).values())
        build_size(size, work_dir)
    else:
        codes_source(resolve_model(MODEL), "cpu")
        made = caches.is_dir() and bool(set(caches.iterdir()) - before)
    return {"step": step, "seconds": time.perf_counter() - t, "peak_rss_mib": peak_rss_mib(), "made": made}


def prepare_in_subprocess(step: str, size: str | None, work_dir: Path) -> dict:
    cmd = [sys.executable, __file__, "--prepare", step, "--work-dir", str(work_dir)]
    cmd += ["--size", size] if size else []
    cmd += ["--model", str(MODEL)] if MODEL else []
    return run_json(cmd, {**os.environ, "TOKENIZERS_PARALLELISM": "false"}, f"preparation ({step})")


def summarize(data: dict, flops_per_step: float, peak: float) -> dict:
    timed = data["step_seconds"][1:] or data["step_seconds"]  # the first step is a warm-up
    tokens = data["tokens_per_step"][1:] or data["tokens_per_step"]
    sec = sum(timed)
    return {
        "s_per_step": sec / len(timed),
        "tokens_per_s": sum(tokens) / sec,
        "examples_per_s": data["examples_per_step"] * len(timed) / sec,
        "peak_rss_mib": data["peak_rss_mib"],
        "first_loss": data["losses"][0],
        "last_loss": data["losses"][-1],
        "mfu": flops_per_step / (sec / len(timed)) / (peak * 1e9),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="short,long")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first is not timed)")
    ap.add_argument("--long-steps", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--accum",
        type=int,
        default=SPEC["accum"],
        help="examples per optimizer step (gradient accumulation; the spec's 8): fewer make a slow model's steps "
        "shorter, and SmoLoRA's packed rows shorter too",
    )
    ap.add_argument(
        "--impls",
        default="trl,trl_no_ckpt,smolora,smolora_ckpt,smolora_plain,reference",
        help="workers, comma-separated: " + ", ".join(WORKERS),
    )
    ap.add_argument("--json", default=None, metavar="FILE", help="also write every measurement to this JSON file")
    ap.add_argument("--model", help="a local model folder (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument(
        "--arch", choices=sorted(ARCHS), help="a random-weight model of this architecture at SmolLM2-135M's sizes"
    )
    ap.add_argument(
        "--arch-dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="how --arch's random weights are stored: float32 (default) or bfloat16, as real checkpoints are",
    )
    ap.add_argument(
        "--size",
        choices=("135m", *SIZES),
        default="135m",
        help="135m: the embedded SmolLM2-135M-Instruct (default); 360m, 1.7b: random weights at SmolLM2-360M's "
        "and SmolLM2-1.7B's shapes, built once under --work-dir as bf16 safetensors and a Q4_1 GGUF",
    )
    ap.add_argument(
        "--size-format",
        choices=FORMATS,
        default="gguf",
        help="which of --size's files SmoLoRA (and the reference loop) trains from: the Q4_1 GGUF (default) "
        "or the bf16 safetensors; TRL always loads the bf16 safetensors, upcast to fp32",
    )
    ap.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="where --size's models are kept (default: $SMOLORA_HOME/bench-models)",
    )
    ap.add_argument(
        "--data-seed", type=int, default=0, help="another seed gives data (and shuffles) no earlier run saw"
    )
    ap.add_argument(
        "--tcmalloc",
        choices=("smolora", "all", "none"),
        default="smolora",
        help="which workers run on tcmalloc where the system has it: SmoLoRA's, as the smolora command "
        "does (default), every worker's, or none",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--prepare", choices=("build", "convert"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    SPEC["accum"] = args.accum
    global MODEL, ANCHOR_MODEL
    from smolora.paths import smolora_home

    work_dir = args.work_dir or smolora_home() / "bench-models"
    if args.size != "135m" and (args.model or args.arch) and not (args.worker or args.prepare):
        ap.error("--size 360m/1.7b builds its own model: leave out --model and --arch")
    MODEL = build_arch(args.arch, args.arch_dtype) if args.arch else args.model
    if args.prepare:
        print(json.dumps(prepare(args.prepare, args.size, work_dir)))
        return
    if args.worker:
        print(json.dumps(run_worker(args.worker, args.variant, args.steps, args.seed)))
        return

    preparation = []
    if args.size != "135m":  # built in a process of its own, so that this one stays small for the workers
        preparation.append(prepare_in_subprocess("build", args.size, work_dir))
        paths = size_paths(args.size, work_dir)
        MODEL, ANCHOR_MODEL = str(paths[args.size_format]), str(paths["safetensors"])
    # any conversion SmoLoRA's training makes, once, before the workers: what a user's first run on the model does
    preparation.append(prepare_in_subprocess("convert", None, work_dir))
    for p in preparation:
        if p["made"]:
            what = "built the random model" if p["step"] == "build" else "SmoLoRA's one-time conversion for training"
            print(f"{what}: {p['seconds']:.0f} s, peak RSS {p['peak_rss_mib']:.0f} MiB", flush=True)
    model_cfg = model_config()
    print(f"model: {MODEL or 'embedded SmolLM2-135M-Instruct'} ({model_cfg.model_type})", flush=True)
    if ANCHOR_MODEL:
        print(f"TRL loads: {ANCHOR_MODEL} (bf16, upcast to fp32)", flush=True)
    gemm = gemm_peak(model_cfg)
    print("fp32 GEMM probe (GFLOP/s): " + ", ".join(f"{k} {v:.0f}" for k, v in gemm.items()), flush=True)
    report = {
        "gemm": gemm,
        "spec": SPEC,
        "tcmalloc": args.tcmalloc,
        "threads": torch.get_num_threads(),
        "model": MODEL or "embedded",
        "size": args.size,
        "trl_model": ANCHOR_MODEL or MODEL or "embedded",
        "preparation": preparation,
        "model_type": model_cfg.model_type,
        "data_seed": args.data_seed,
        "results": {},
    }
    steps = {variant: args.long_steps if variant == "long" else args.steps for variant in args.variants.split(",")}
    raw: dict[str, dict[str, list[dict]]] = {}
    for variant in steps:
        raw[variant] = {impl: [] for impl in args.impls.split(",")}
        impls = list(raw[variant])
        for rep in range(args.reps):
            # interleaved, so machine drift hits all alike; each repetition starts with the next
            # implementation, so none always runs first
            for impl in impls[rep % len(impls) :] + impls[: rep % len(impls)]:
                data = spawn(impl, variant, steps[variant], seed=args.data_seed + rep, tcmalloc=args.tcmalloc)
                per_step = [step_flops(model_cfg, rows, SPEC["r"], SPEC["targets"]) for rows in data["flops_rows"]]
                timed = per_step[1:] or per_step  # the steps summarize() times: not the warm-up
                data["flops_per_step"] = sum(timed) / len(timed)
                raw[variant][impl].append(data)
                print(
                    f"  {variant} rep {rep} {impl}: {summarize(data, 1, 1)['tokens_per_s']:.0f} tok/s "
                    f"(GEMM probe {data['gemm_peak']:.0f})",
                    flush=True,
                )
    # MFU against the best GEMM rate any probe of this invocation saw in the run's dtype: the machine
    # drifts (probes ranged 185-314 GFLOP/s on one day here), and the highest never flatters.
    runs_all = [d for runs in raw.values() for rs in runs.values() for d in rs]
    peaks = {"float32": gemm["peak"]}
    for d in runs_all:
        peaks[d["gemm_dtype"]] = max(peaks.get(d["gemm_dtype"], 0.0), d["gemm_peak"])
    report["gemm_peak_used"] = peaks["float32"]
    report["gemm_peaks_used"] = peaks
    built = sorted(
        {
            d["native_kernels"]
            for rs in raw.values()
            for impl, r in rs.items()
            if impl.startswith("smolora") and impl != "smolora_plain"
            for d in r
        }
    )
    report["native_kernels"] = built == [True]
    if built:
        print(
            "\nSmoLoRA's compiled kernels (smolora.fast.native): "
            + ("built and used." if built == [True] else "not built: torch fallback.")
        )
    print(
        "\nMFU is counted against the highest GEMM probe of this invocation in the run's dtype: "
        + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items())
        + "."
    )
    for variant, runs in raw.items():
        summaries = {
            impl: [
                summarize(d, d["flops_per_step"], peaks[d["gemm_dtype"]]) | {"gemm_probe": d["gemm_peak"]} for d in rs
            ]
            for impl, rs in runs.items()
        }
        med = {impl: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for impl, rs in summaries.items()}
        allocators = {impl: "/".join(sorted({d["allocator"] for d in rs})) for impl, rs in runs.items()}
        report["results"][variant] = {"median": med, "runs": summaries, "allocators": allocators}
        print_table(variant, steps[variant], med, allocators)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"\nJSON: {args.json}")


def print_table(variant: str, steps: int, med: dict, allocators: dict) -> None:
    print(
        f"\n### {variant} examples — medians, {steps} optimizer steps of {SPEC['batch'] * SPEC['accum']} examples "
        "per run (first not timed)\n"
    )
    print("| impl | allocator | examples/s | tokens/s | s/step | peak RSS MiB | first loss | last loss | MFU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for impl, m in med.items():
        print(
            f"| {impl} | {allocators[impl]} | {m['examples_per_s']:.2f} | {m['tokens_per_s']:.0f} | "
            f"{m['s_per_step']:.2f} | {m['peak_rss_mib']:.0f} | "
            f"{m['first_loss']:.4f} | {m['last_loss']:.4f} | {100 * m['mfu']:.0f}% |"
        )
    for ours, theirs in (
        ("smolora", "trl"),
        ("smolora", "trl_no_ckpt"),
        ("smolora_ckpt", "trl"),
        ("smolora_plain", "trl"),
        ("smolora", "smolora_plain"),
        ("smolora_bf16", "trl_bf16"),
        ("smolora_bf16", "trl"),
    ):
        if ours in med and theirs in med:
            s, t = med[ours], med[theirs]
            print(
                f"\n{ours} / {theirs}: tokens/s x{s['tokens_per_s'] / t['tokens_per_s']:.2f}, "
                f"peak RSS x{s['peak_rss_mib'] / t['peak_rss_mib']:.2f}"
            )
    for ours in ("smolora", "smolora_bf16"):
        if "reference" in med and ours in med:
            s, r = med[ours], med["reference"]
            print(
                f"{ours} vs reference (fp32) last loss: "
                f"{100 * (s['last_loss'] - r['last_loss']) / r['last_loss']:+.2f}%"
            )


if __name__ == "__main__":
    main()
