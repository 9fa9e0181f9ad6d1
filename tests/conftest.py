"""Fixtures: a tiny random Llama and a tokenizer built in-process — no downloads, seconds per test."""

from __future__ import annotations

import os

from smolora.fast.threads import calm_openmp

calm_openmp()  # as the command line does: idle OpenMP threads sleep, so a busy machine slows the suite less

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests compare separate runs bit for bit (resumed against uninterrupted, one recipe run against its
# repeat). Each fresh run picks its GEMM by timing both (smolora.fast.onednn), and on a loaded machine
# two runs can pick differently: the suite fixes the choice, as a user's environment can. The tests of
# the choice itself set SMOLORA_GEMM per test.
os.environ.setdefault("SMOLORA_GEMM", "mkl")
torch.set_num_threads(2)

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is a tiny tokenizer for tests",
    "rewrite the date in iso format 2021-03-05 january february march",
    "question answer user assistant system you are a helpful bot",
    "0 1 2 3 4 5 6 7 8 9 . , ! ? : ; - ( ) [ ] { } \" '",
]
CHATML_WITH_DEFAULT_SYSTEM = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a test bot<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer(chat_template: str | None = CHATML_WITH_DEFAULT_SYSTEM):
    """A byte-level BPE like SmolLM2's: bos <|im_start|>, pad == eos == <|im_end|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = chat_template
    return fast


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


def build_tiny_llama(vocab_size: int, tie: bool = True, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        **TINY_SIZES,  # head_dim 8 is Llama's own hidden_size / heads
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = 2
    return model.eval()


# The tiny models' sizes, for every Llama-like architecture the tests build.
TINY_SIZES = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=256,
)
ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma")  # bias on q/k/v; q/k norms; GeGLU + scaled embeddings


def build_tiny(arch: str, vocab_size: int, seed: int = 0):
    """A tiny random model of another architecture than Llama, same sizes as ``build_tiny_llama``."""
    if arch == "llama":
        return build_tiny_llama(vocab_size, seed=seed)
    import transformers

    name = {"qwen2": "Qwen2", "qwen3": "Qwen3", "gemma": "Gemma"}[arch]
    torch.manual_seed(seed)
    config = getattr(transformers, name + "Config")(
        vocab_size=vocab_size,
        **TINY_SIZES,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return getattr(transformers, name + "ForCausalLM")(config).eval()


@pytest.fixture
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A saved tiny Llama folder (safetensors) with the test tokenizer: a 'base model' on disk."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = build_tiny_llama(len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir_session(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tiny-llama-session")
    build_tiny_llama(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path, records: list[dict]):
    """``records`` as a JSON-lines file at ``path``; returns the path."""
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def chat_records(n: int = 12) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"what is {i} plus {i}?"},
                {"role": "assistant", "content": f"{2 * i}"},
            ]
        }
        for i in range(n)
    ]


@pytest.fixture
def said():
    """The lines the smolora logger says during the test, as the console shows them."""
    import logging

    from smolora.log import ConsoleFormat, logger

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    keep = Keep()
    keep.setFormatter(ConsoleFormat())
    logger.addHandler(keep)
    yield lines
    logger.removeHandler(keep)
