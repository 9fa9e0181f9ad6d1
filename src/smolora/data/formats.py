"""Records -> token ids + labels.

Shapes, detected per record (or forced with ``shape``):
  * ``chat``       {"messages": [{"role", "content"}, ...]}
  * ``sharegpt``   {"conversations": [{"from", "value"}, ...]}
  * ``prompt_completion``  {"prompt", "completion"}
  * ``alpaca``     {"instruction", "input"?, "output"}
  * ``text``       {text_field: "..."}

Everything but plain text is rendered with the tokenizer's chat template (ChatML when the model has
none). The supervised span of each assistant turn is found by character offsets in the rendered
string — render the conversation up to the turn's generation prompt and through the turn, and the
difference is the answer plus its end-of-turn token — never by searching token ids for a response
template, and never by comparing labels with the pad id (pad == eos on SmolLM2).

Special tokens come only from the template's scaffolding: text inside content that spells one
(``<|im_start|>assistant`` in a user message) is tokenized as the text it is, so data cannot
forge turns. ``special_tokens_in_content`` restores the old reading for those who want it.
"""

from __future__ import annotations

import contextlib
import re
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Callable

from jinja2 import TemplateError

from smolora.errors import SmoLoRAError, reason

IGNORE = -100
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "model": "assistant",
}

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class Example:
    """One tokenized example. ``labels[t]`` is ``input_ids[t]`` where supervised, else -100."""

    input_ids: list[int]
    labels: list[int]
    task: str = ""
    where: str = ""
    difficulty: float | None = None  # set for curriculum ordering

    @property
    def num_supervised(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


@dataclass
class FormatOptions:
    text_field: str = "text"
    shape: str = "auto"  # auto, chat, sharegpt, prompt_completion, alpaca, text
    field_map: dict[str, str] = field(default_factory=dict)  # our name -> the record's name
    system_prompt: str | None = None  # None: the template's own default
    train_on_prompt: bool = False
    max_length: int = 1024
    task_prefix: str = "[TASK:{task}] "  # used only for records that carry a task name
    chunk_tokens: int = 0  # > 0: cut plain-text records into windows of this many tokens
    chunk_stride: int = 0  # tokens between window starts (0 = chunk_tokens, no overlap)
    special_tokens_in_content: bool = False  # True: '<|im_start|>' in content becomes the special token


@dataclass
class EncodeStats:
    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    per_task: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        s = (
            f"{self.kept} examples kept, {self.truncated} truncated to max_length, "
            f"{self.dropped} dropped (no supervised tokens left)"
        )
        if len(self.per_task) > 1:
            s += "; per task: " + ", ".join(f"{k}={v}" for k, v in self.per_task.items())
        return s


def ensure_chat_template(tokenizer) -> None:
    """Chat data on a model without a chat template is rendered with ChatML (and the adapter
    records it, so generation prompts the trained model the same way)."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE


def detect_shape(record: dict, opts: FormatOptions) -> str:
    """The record's shape: the one named, else the first that fits of chat messages, ShareGPT
    conversations, prompt/completion, alpaca, plain text — but a text field named other than
    ``text`` and present in the record means plain text."""
    if opts.shape != "auto":
        return opts.shape
    f = lambda name: opts.field_map.get(name, name)  # noqa: E731
    if opts.text_field != "text" and f(opts.text_field) in record:
        return "text"
    if f("messages") in record:
        return "chat"
    if f("conversations") in record:
        return "sharegpt"
    if f("prompt") in record and f("completion") in record:
        return "prompt_completion"
    if f("instruction") in record and f("output") in record:
        return "alpaca"
    return "text"


def record_to_messages(record: dict, shape: str, opts: FormatOptions) -> list[dict]:
    """Normalize any conversational shape to a list of role/content messages, checked."""
    where = record.get("_where", "record")
    f = lambda name: opts.field_map.get(name, name)  # noqa: E731
    if shape == "chat":
        raw = record.get(f("messages"))
        messages = _check_messages(raw, where, "role", "content", {r: r for r in ROLES})
    elif shape == "sharegpt":
        raw = record.get(f("conversations"))
        messages = _check_messages(raw, where, "from", "value", SHAREGPT_ROLES)
    elif shape == "prompt_completion":
        prompt, completion = _need_str(record, f("prompt"), where), _need_str(record, f("completion"), where)
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    elif shape == "alpaca":
        instruction, output = _need_str(record, f("instruction"), where), _need_str(record, f("output"), where)
        extra = record.get(f("input")) or ""
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    else:
        raise SmoLoRAError(f"{where}: unknown record shape {shape!r}")
    if opts.system_prompt is not None:
        messages = [m for m in messages if m["role"] != "system"]
        messages.insert(0, {"role": "system", "content": opts.system_prompt})
    return messages


def _need_str(record: dict, name: str, where: str) -> str:
    if name not in record:
        # counted, not named: field names are the file's content (a CSV header may be a secret's first line)
        count = sum(1 for k in record if not k.startswith("_"))
        raise SmoLoRAError(
            f"{where}: record has no {name!r} field (it has {count} other field{'s' if count != 1 else ''}); "
            "name the text field with --dataset-text-field or rename fields with --field-map"
        )
    value = record[name]
    if not isinstance(value, str):
        raise SmoLoRAError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def _check_messages(raw, where: str, role_key: str, content_key: str, roles: dict[str, str]) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise SmoLoRAError(f"{where}: messages must be a non-empty list of {{{role_key}, {content_key}}} objects")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or role_key not in m or content_key not in m:
            raise SmoLoRAError(f"{where}: message {i} must be an object with {role_key!r} and {content_key!r}")
        role = roles.get(str(m[role_key]).lower()) if isinstance(m[role_key], str) else None
        if role is None:
            said = m[role_key]  # named when it is a short word: data is never echoed at length
            shown = f" {said!r}" if isinstance(said, str) and re.fullmatch(r"[\w-]{1,20}", said) else ""
            raise SmoLoRAError(
                f"{where}: message {i} has an unknown role{shown} (expected one of {', '.join(sorted(set(roles)))})"
            )
        if not isinstance(m[content_key], str):
            raise SmoLoRAError(f"{where}: message {i} content must be a string, got {type(m[content_key]).__name__}")
        out.append({"role": role, "content": m[content_key]})
    if not any(m["role"] == "assistant" for m in out):
        raise SmoLoRAError(f"{where}: conversation has no assistant turn, so there is nothing to learn")
    return out


TEMPLATE_SECONDS = 10  # one conversation rendered: a template that takes longer loops without bound


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise ``TimeoutError`` in the block after ``seconds`` (the main thread of a Unix process; elsewhere no limit)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(_signum, _frame):
        raise TimeoutError(f"took over {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def apply_template(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation through the tokenizer's chat template, which transformers runs in Jinja's
    sandbox: a template that refuses the conversation, or that the sandbox stops (it reaches into
    Python objects, or loops without bound), is one error, not a traceback."""
    try:
        with _time_limit(TEMPLATE_SECONDS):
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as e:  # e.g. a template that takes no system turn, or strictly alternating roles
        raise SmoLoRAError(f"the model's chat template rejects this conversation: {e}") from None
    except Exception as e:  # the template is the model's code: whatever it raises, it is the template's
        raise SmoLoRAError(f"the model's chat template fails ({reason(e)[:200]})") from None


def render_chat(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation; return the text and the character span of every assistant turn.

    Each span runs from the end of the turn's generation prompt to the end of its end-of-turn
    token (trailing whitespace after it is not supervised).
    """
    full = apply_template(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = apply_template(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        through = apply_template(tokenizer, messages[: i + 1])
        if i == 0:  # an assistant-first conversation: the prompt is whatever precedes the content
            before = through[: through.find(m["content"])] if m["content"] else through.rstrip()
        if not (full.startswith(before) and full.startswith(through)):
            raise SmoLoRAError("the chat template does not render conversations prefix-wise; cannot find answer spans")
        spans.append((len(before), len(through.rstrip())))
    return full, spans


def special_token_texts(tokenizer) -> list[str]:
    """The strings the tokenizer turns into special tokens wherever they appear in its input."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return [t.content for t in added.values() if getattr(t, "special", False)] or list(tokenizer.all_special_tokens)


def tokenize_rendered(
    tokenizer, text: str, contents: list[str], special_tokens_in_content: bool = False, limit: int | None = None
) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of a rendered conversation whose messages said ``contents``
    (in order), or of its first ``limit`` characters. A content that spells a special token is
    tokenized as text, the scaffolding around it as the template wrote it; without such content (or
    when asked to parse it) the text is tokenized in one call."""
    specials = special_token_texts(tokenizer)
    if special_tokens_in_content or not any(t in c for c in contents for t in specials):
        enc = tokenizer(text[:limit], add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    pieces, pos = [], 0  # (start, end, is content) in text order
    for content in contents:
        at = text.find(content, pos) if content else -1
        if at < 0:
            if any(t in content for t in specials):
                raise SmoLoRAError(
                    "a message spells a special token and the chat template changes the message's text, so it "
                    "cannot be kept as text; remove it, or pass --special-tokens-in-content to read it as the token"
                )
            continue
        pieces += [(pos, at, False), (at, at + len(content), True)]
        pos = at + len(content)
    pieces.append((pos, len(text), False))
    ids, offsets = [], []
    for start, end, is_content in pieces:
        end = min(end, len(text) if limit is None else limit)
        if start >= end:
            continue
        enc = tokenizer(
            text[start:end], add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=is_content
        )
        ids += enc["input_ids"]
        offsets += [(a + start, b + start) for a, b in enc["offset_mapping"]]
    return ids, offsets


# A record far longer than max_length is tokenized a prefix at a time (a 50 MB record tokenized whole
# takes gigabytes): first this many characters per token wanted, four times more while too short.
CHARS_PER_TOKEN = 8
CUT_MARGIN = 32  # tokens past max_length a cut must yield: the few next to the cut may differ from the whole's


def _tokenize_enough(tokenize: Callable[[int | None], tuple], text: str, max_length: int | None) -> tuple:
    """``tokenize(limit)`` of a prefix of ``text`` that yields more than ``max_length`` tokens
    with ``CUT_MARGIN`` to spare — its first ``max_length`` tokens are the whole text's — or of the
    whole text (``max_length`` None: always). A prefix ends before whitespace where it can, where
    tokenizers split words anyway."""
    limit = CHARS_PER_TOKEN * (max_length + CUT_MARGIN) if max_length else len(text)
    while limit < len(text):
        cut = max(text.rfind(" ", limit // 2, limit), text.rfind("\n", limit // 2, limit))
        result = tokenize(cut if cut > 0 else limit)
        if len(result[0]) > max_length + CUT_MARGIN:
            return result
        limit *= 4
    return tokenize(None)


def encode_record(record: dict, tokenizer, opts: FormatOptions) -> Example:
    """Tokenize one record into ids and labels (before truncation)."""
    ex = _encode(record, tokenizer, opts)
    ex.difficulty = record.get("_difficulty")
    return ex


def check_record(record: dict, opts: FormatOptions) -> None:
    """What can be wrong with a record before a tokenizer sees it — its shape, its fields and their
    types — raised as ``encode_record`` would: bad data is reported before a model is loaded."""
    shape = detect_shape(record, opts)
    if shape == "text":
        _text_of(record, opts, record.get("_where", "record"))
    else:
        record_to_messages(record, shape, opts)


def _text_of(record: dict, opts: FormatOptions, where: str) -> str:
    name = opts.field_map.get(opts.text_field, opts.text_field)
    if name not in record:  # one field of a pair present (or mapped) and not its partner: say which is missing
        f = lambda n: opts.field_map.get(n, n)  # noqa: E731
        for a, b in (("prompt", "completion"), ("instruction", "output")):
            if (f(a) in record) != (f(b) in record):
                have, missing = (a, b) if f(a) in record else (b, a)
                raise SmoLoRAError(
                    f"{where}: record has {f(have)!r} as its {have} but no {f(missing)!r} field for its {missing}; "
                    f"map it with --field-map {missing}=FIELD"
                )
    return _need_str(record, name, where)


def _encode(record: dict, tokenizer, opts: FormatOptions) -> Example:
    where = record.get("_where", "record")
    task = record.get("_task", "")
    shape = detect_shape(record, opts)
    if shape == "text":
        text = _text_of(record, opts, where)
        if not text.strip():  # nothing to learn but an end of text: dropped with the examples that have no targets
            return Example([], [], task, where)
        if task:
            text = opts.task_prefix.format(task=task) + text
        split = not opts.special_tokens_in_content
        ids, _ = _tokenize_enough(
            lambda end: (tokenizer(text[:end], add_special_tokens=True, split_special_tokens=split)["input_ids"], None),
            text,
            None if opts.chunk_tokens > 0 else opts.max_length,  # chunks are cut from the whole text
        )
        ids = list(ids)
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids.append(tokenizer.eos_token_id)  # teaches the model to stop
        return Example(ids, list(ids), task, where)

    messages = record_to_messages(record, shape, opts)
    if task:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is not None:
            first_user["content"] = opts.task_prefix.format(task=task) + first_user["content"]
    ensure_chat_template(tokenizer)
    try:
        text, spans = render_chat(tokenizer, messages)
    except SmoLoRAError as e:
        raise SmoLoRAError(f"{where}: {e}") from None
    try:
        contents = [m["content"] for m in messages]
        ids, offsets = _tokenize_enough(
            lambda limit: tokenize_rendered(tokenizer, text, contents, opts.special_tokens_in_content, limit),
            text,
            opts.max_length,
        )
    except SmoLoRAError as e:
        raise SmoLoRAError(f"{where}: {e}") from None
    if opts.train_on_prompt:
        return Example(ids, list(ids), task, where)
    labels = [IGNORE] * len(ids)
    for t, (start, end) in enumerate(offsets):
        if any(start < s_end and end > s_start for s_start, s_end in spans):
            labels[t] = ids[t]
    return Example(ids, labels, task, where)


def _encoded(records: list[dict], tokenizer, opts: FormatOptions):
    for rec in records:
        ex = encode_record(rec, tokenizer, opts)
        if opts.chunk_tokens > 0 and detect_shape(rec, opts) == "text":
            step = opts.chunk_stride or opts.chunk_tokens
            for start in range(0, max(1, len(ex.input_ids) - opts.chunk_tokens + step), step):
                window = ex.input_ids[start : start + opts.chunk_tokens]
                yield Example(window, list(window), ex.task, f"{ex.where}#tokens{start}", ex.difficulty)
                if start + opts.chunk_tokens >= len(ex.input_ids):
                    break
        else:
            yield ex


def encode_records(records: list[dict], tokenizer, opts: FormatOptions) -> tuple[list[Example], EncodeStats]:
    """Tokenize, truncate to ``max_length`` and drop examples with nothing left to learn."""
    stats = EncodeStats()
    examples = []
    for ex in _encoded(records, tokenizer, opts):
        if len(ex.input_ids) > opts.max_length:
            ex.input_ids, ex.labels = ex.input_ids[: opts.max_length], ex.labels[: opts.max_length]
            stats.truncated += 1
        # Position 0 has no context to predict it from, so it never counts as supervised.
        if not any(x != IGNORE for x in ex.labels[1:]):
            stats.dropped += 1
            continue
        examples.append(ex)
        stats.per_task[ex.task or "default"] = stats.per_task.get(ex.task or "default", 0) + 1
    stats.kept = len(examples)
    return examples, stats
