"""Generation and chat: chat template for chat models, streaming tokens, prompt not echoed."""

from __future__ import annotations

import contextlib
import sys

import torch

from smolora.data.formats import apply_template, tokenize_rendered
from smolora.errors import SmoLoRAError
from smolora.fast import accelerated
from smolora.log import warn

MIN_TEMPERATURE = 1e-6


def prompt_ids(
    tokenizer, prompt: str | list[dict], chat: bool | None = None, special_tokens_in_content: bool = False
) -> torch.Tensor:
    """Token ids (1, T) for a prompt: through the chat template when the model has one. Text that
    spells a special token is text (``smolora.data.formats``), unless ``special_tokens_in_content``."""
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    if isinstance(prompt, list) or use_chat:
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        text = apply_template(tokenizer, messages, add_generation_prompt=True)
        ids, _ = tokenize_rendered(tokenizer, text, [m["content"] for m in messages], special_tokens_in_content)
        return torch.tensor([ids], dtype=torch.long)
    split = not special_tokens_in_content
    return tokenizer(prompt, return_tensors="pt", split_special_tokens=split)["input_ids"]


def stop_token_ids(tokenizer, model) -> list[int]:
    """The model's and tokenizer's end-of-sequence tokens, and a ChatML template's end-of-turn token
    (a base model given ChatML for chat data learns to end its reply with it, not with its eos)."""
    configured = model.generation_config.eos_token_id
    candidates = [*(configured if isinstance(configured, list) else [configured]), tokenizer.eos_token_id]
    if "<|im_end|>" in (getattr(tokenizer, "chat_template", None) or ""):
        end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if end_of_turn is not None and end_of_turn != tokenizer.unk_token_id:
            candidates.append(end_of_turn)
    return list(dict.fromkeys(int(t) for t in candidates if t is not None))


@contextlib.contextmanager
def folded_adapter(model):
    """Fold an unmerged LoRA adapter into its layers' weights while generating, then restore them.

    Decoding runs one token at a time, where every extra small op counts: PEFT's unmerged path
    adds two matmuls, a dropout call, a scale and an add per adapted layer. Each adapted layer gets
    a new weight W + s*B*A for the duration (one pass over W) and its original Parameter back
    afterwards — bit for bit, nothing copied back (merge-then-subtract would not be exact in fp32).
    A weight tied to another module (an adapted lm_head) stays as it is for that module, as in the
    unmerged forward. DoRA and LoRA biases go through PEFT's own merge with a saved copy instead.
    """
    from peft.tuners.lora import LoraLayer

    from smolora.lora import tied_adapted_embeddings

    layers = (  # (inside PEFT's ``disable_adapter()`` the base alone answers: nothing to fold)
        [m for m in model.modules() if isinstance(m, LoraLayer) and not m.merged and not m.disable_adapters]
        if hasattr(model, "merge_adapter")
        else []
    )
    if not layers:
        yield
        return
    plain = all(
        isinstance(m.get_base_layer(), torch.nn.Linear)
        and not any(m.use_dora.get(a) or getattr(m, "lora_bias", {}).get(a) for a in m.active_adapters)
        for m in layers
    )
    if not plain and tied_adapted_embeddings(model):  # merging in place would change both embeddings
        yield
        return
    if not plain:
        saved = [(m.get_base_layer().weight, m.get_base_layer().weight.detach().clone()) for m in layers]
        model.merge_adapter()
        try:
            yield
        finally:
            for m in layers:
                m.merged_adapters.clear()
            for weight, original in saved:
                weight.data.copy_(original)
        return
    swapped = []
    try:
        with torch.no_grad():
            for m in layers:
                base, active = m.get_base_layer(), [a for a in m.active_adapters if a in m.lora_A]
                if not active:
                    continue
                original = base.weight
                folded = original.detach() + m.get_delta_weight(active[0])
                for a in active[1:]:
                    folded += m.get_delta_weight(a)
                base.weight = torch.nn.Parameter(folded, requires_grad=False)
                m.merged_adapters.extend(active)  # PEFT's forward now runs the base layer alone
                swapped.append((m, base, original))
        yield
    finally:
        for m, base, original in swapped:
            base.weight = original
            m.merged_adapters.clear()


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompt: str | list[dict] | torch.Tensor,
    max_new_tokens: int = 200,
    do_sample: bool = True,
    temperature: float = 1.0,
    *,
    chat: bool | None = None,
    stream: bool = False,
    echo: bool = False,
    special_tokens_in_content: bool = False,
) -> str:
    """Generate a reply to a prompt (text, chat messages, or token ids (1, T) used as they are).
    Returns only the new text unless ``echo`` is set. See ``prompt_ids`` for special tokens."""
    check_sampling(max_new_tokens, do_sample, temperature)
    device = next(model.parameters()).device
    if not isinstance(prompt, torch.Tensor):
        prompt = prompt_ids(tokenizer, prompt, chat, special_tokens_in_content)
    ids = prompt.to(device)
    context = getattr(model.config, "max_position_embeddings", None)
    if isinstance(context, int) and ids.shape[1] + max_new_tokens > context:
        if ids.shape[1] >= context:
            raise SmoLoRAError(f"the prompt ({ids.shape[1]} tokens) fills the model's context ({context} tokens)")
        max_new_tokens = context - ids.shape[1]
        warn(f"max_new_tokens cut to {max_new_tokens}: the model's context is {context} tokens")
    streamer = None
    if stream:
        from transformers import TextStreamer

        streamer = TextStreamer(tokenizer, skip_prompt=not echo, skip_special_tokens=True)
    was_training = model.training
    model.eval()
    sampling = (
        {"do_sample": True, "temperature": temperature}
        if do_sample
        else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    )
    with folded_adapter(model), accelerated(model, training=False, only=("oneDNN linears",)):
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            eos_token_id=stop_token_ids(tokenizer, model),
            pad_token_id=tokenizer.pad_token_id,
            streamer=streamer,
            use_cache=True,
            **sampling,
        )
    model.train(was_training)
    new = out[0] if echo else out[0, ids.shape[1] :]
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def check_sampling(max_new_tokens: int, do_sample: bool, temperature: float) -> None:
    if max_new_tokens < 1:
        raise SmoLoRAError(f"max_new_tokens must be >= 1 (got {max_new_tokens})")
    if do_sample and not MIN_TEMPERATURE <= temperature < float("inf"):  # below it, logits / t overflow to inf
        raise SmoLoRAError(f"temperature must be a number >= {MIN_TEMPERATURE} when sampling (got {temperature})")


def chat_loop(
    model,
    tokenizer,
    max_new_tokens: int = 200,
    do_sample: bool = True,
    temperature: float = 1.0,
    system: str | None = None,
    raw: bool = False,
    special_tokens_in_content: bool = False,
) -> None:
    """Interactive chat on stdin/stdout; history is kept; empty line or Ctrl-D ends it. A model
    without a chat template (or ``raw``) continues each line as plain text instead, without history."""
    chat = not raw and bool(getattr(tokenizer, "chat_template", None))
    history: list[dict] = [{"role": "system", "content": system}] if system and chat else []
    if chat:
        print("chat: type a message; an empty line or Ctrl-D quits.", flush=True)
    else:
        print(
            "completion: each line you type is continued as plain text (no chat template); "
            "an empty line or Ctrl-D quits.",
            flush=True,
        )
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not line.strip():
            return
        sys.stdout.write("model> ")
        sys.stdout.flush()
        sample = dict(stream=True, special_tokens_in_content=special_tokens_in_content)
        if not chat:
            generate(model, tokenizer, line, max_new_tokens, do_sample, temperature, chat=False, **sample)
            continue
        history.append({"role": "user", "content": line})
        reply = generate(model, tokenizer, history, max_new_tokens, do_sample, temperature, **sample)
        history.append({"role": "assistant", "content": reply})
