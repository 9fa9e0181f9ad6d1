"""An Ollama Modelfile beside an exported GGUF: the chat template translated to Ollama's Go-template
syntax, the end-of-turn stop token(s), and the system prompt training used by default.

The translation reads the chat template by rendering it (never by parsing its Jinja): a conversation
with placeholder contents shows the text around each message. Templates that wrap every message as
``X + role + Y + content + Z`` (ChatML, Llama 3 style headers) translate to::

    START{{ range .Messages }}X{{ .Role }}Y{{ .Content }}Z{{ end }}XassistantY

and a default system turn the template inserts becomes the Modelfile's ``SYSTEM`` (Ollama puts it
first when a request has none, as the template did). The result is rendered back with the small
Go-template renderer below for several conversations and must equal the chat template's own
rendering; otherwise no TEMPLATE is written and one warning says so.
"""

from __future__ import annotations

import re
from pathlib import Path

from smolora.errors import SmoLoRAError
from smolora.log import warn
from smolora.paths import publish

# Placeholder contents: plain words no template rewrites
SYSTEM, USER, ASSISTANT, USER2 = "SYSTEMQX7", "USERQX7A", "ASSISTANTQX7A", "USERQX7B"


class Untranslatable(ValueError):
    """The chat template does not follow a form this module can write in Go-template syntax."""


def modelfile_path(gguf_path: str | Path) -> Path:
    """``my-model.gguf`` -> ``my-model.Modelfile`` (``ollama create NAME -f my-model.Modelfile``)."""
    return Path(gguf_path).with_suffix(".Modelfile")


def write_modelfile(gguf_path: str | Path, tokenizer, base: str | Path | None = None) -> Path:
    """Write the Modelfile for ``gguf_path`` beside it, whole or not at all; returns its path. With
    ``base`` (a GGUF file), ``gguf_path`` is a LoRA adapter file: ``FROM base`` + ``ADAPTER``."""
    text = modelfile_text(Path(gguf_path).name, tokenizer)
    if base is not None:
        text = text.replace(
            f"FROM ./{Path(gguf_path).name}\n", f"FROM {Path(base).resolve()}\nADAPTER ./{Path(gguf_path).name}\n", 1
        )
    path = modelfile_path(gguf_path)
    publish(path, lambda tmp: tmp.write_text(text), folder=False)
    return path


def modelfile_text(gguf_name: str, tokenizer) -> str:
    """The Modelfile: FROM, TEMPLATE, SYSTEM (where the template has a default), PARAMETER stop."""
    lines = [f"FROM ./{gguf_name}"]
    try:
        translated = translate(tokenizer)
    except Untranslatable as e:
        warn(f"Modelfile: the chat template cannot be translated to Ollama's syntax ({e}); no TEMPLATE written")
        eos = getattr(tokenizer, "eos_token", None)
        return "\n".join([*lines, *([f'PARAMETER stop "{eos}"'] if eos else [])]) + "\n"
    lines.append(f'TEMPLATE """{translated["template"]}"""')
    if translated["system"]:
        lines.append(f'SYSTEM """{translated["system"]}"""')
    lines += [f'PARAMETER stop "{stop}"' for stop in translated["stops"]]
    return "\n".join(lines) + "\n"


def translate(tokenizer) -> dict:
    """{"template": Go template, "system": default system prompt or None, "stops": [end-of-turn tokens]}.

    Raises Untranslatable when the template has no chat template or another form than the one above.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise Untranslatable("the tokenizer has none")
    start, x, y, z = _message_frame(tokenizer)
    template = f"{start}{{{{ range .Messages }}}}{x}{{{{ .Role }}}}{y}{{{{ .Content }}}}{z}{{{{ end }}}}{x}assistant{y}"
    system = _default_system(tokenizer, start, x, y, z)
    for text in (template, system or ""):
        if '"""' in text:
            raise Untranslatable('it contains """, which a Modelfile cannot quote')
    for conversation in _checks():
        expected = _render_jinja(tokenizer, conversation)
        if system and conversation[0]["role"] != "system":
            conversation = [{"role": "system", "content": system}, *conversation]  # what Ollama does with SYSTEM
        if render_go(template, conversation) != expected:
            raise Untranslatable("its rendering of a test conversation differs from the translation's")
    return {"template": template, "system": system, "stops": _stops(tokenizer, z)}


def _render_jinja(tokenizer, messages: list[dict]) -> str:
    from smolora.data.formats import apply_template

    try:
        return apply_template(tokenizer, messages, add_generation_prompt=True)
    except SmoLoRAError as e:
        raise Untranslatable(str(e)) from None


def _message_frame(tokenizer) -> tuple[str, str, str, str]:
    """(START, X, Y, Z) such that each message renders as X + role + Y + content + Z after START."""
    rendered = _render_jinja(
        tokenizer,
        [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": USER},
            {"role": "assistant", "content": ASSISTANT},
            {"role": "user", "content": USER2},
        ],
    )
    pieces = re.split(f"{SYSTEM}|{USER}|{ASSISTANT}|{USER2}", rendered)
    if len(pieces) != 5 or [m for m in re.findall("QX7[AB]?", rendered)] != ["QX7", "QX7A", "QX7A", "QX7B"]:
        raise Untranslatable("a message's content is not rendered as it is, once, in order")
    head, to_user, to_assistant, to_user2, tail = pieces
    if to_user != to_user2 or "user" not in to_user:
        raise Untranslatable("user turns are not framed alike, with the role's name")
    cut = to_user.rindex("user")
    zx, y = to_user[:cut], to_user[cut + len("user") :]
    if to_assistant != f"{zx}assistant{y}" or tail != to_assistant or not head.endswith(f"system{y}"):
        raise Untranslatable("roles are not framed alike, with the role's name")
    start_x = head[: -len(f"system{y}")]
    cut = len(zx) - _common_suffix_length(start_x, zx)
    for token in getattr(tokenizer, "all_special_tokens", []):  # X starts where a special token ends, not in one
        cut = max([cut, *(i + len(token) for i in _occurrences(zx, token) if i < cut < i + len(token))])
    x = zx[cut:]
    return start_x[: len(start_x) - len(x)], x, y, zx[:cut]


def _common_suffix_length(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[len(a) - 1 - n] == b[len(b) - 1 - n]:
        n += 1
    return n


def _occurrences(text: str, part: str) -> list[int]:
    return [m.start() for m in re.finditer(re.escape(part), text)] if part else []


def _default_system(tokenizer, start: str, x: str, y: str, z: str) -> str | None:
    """The system prompt the template inserts when a conversation has none (None: it inserts nothing)."""
    rendered = _render_jinja(tokenizer, [{"role": "user", "content": USER}])
    user_turn = f"{x}user{y}{USER}{z}{x}assistant{y}"
    if rendered == start + user_turn:
        return None
    opening = f"{start}{x}system{y}"
    if not (rendered.startswith(opening) and rendered.endswith(z + user_turn)):
        raise Untranslatable("a conversation without a system message is rendered in another form")
    return rendered[len(opening) : len(rendered) - len(z + user_turn)] or None


def _checks() -> list[list[dict]]:
    """Conversations the translation must render exactly as the chat template does."""
    return [
        [{"role": "user", "content": "Hi there!"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
        [
            {"role": "user", "content": "Rewrite 5 March 2021 as ISO."},
            {"role": "assistant", "content": "2021-03-05"},
            {"role": "user", "content": "And 1 Jan 1999?\nThanks 😀"},
        ],
    ]


def _stops(tokenizer, z: str) -> list[str]:
    """The special tokens that end a turn (in Z, the text after each message's content)."""
    special = [t for t in getattr(tokenizer, "all_special_tokens", []) if t and t in z]
    eos = getattr(tokenizer, "eos_token", None)
    stops = sorted(set(special), key=z.index) or ([z.strip()] if z.strip() else [])
    return stops or ([eos] if eos else [])


# --- a renderer for the subset of Go's text/template this module writes (and tests read) ---------------

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)
_FIELDS = ("Role", "Content", "System", "Prompt", "Response")


def render_go(template: str, messages: list[dict], system: str = "", prompt: str = "", response: str = "") -> str:
    """Render ``template`` as Ollama would for ``messages`` (a subset of Go templates: literal text,
    ``{{ .Field }}``, ``{{ range .Messages }}``, ``{{ if .Field }}``, ``{{ if eq .Role "x" }}``,
    ``{{ else }}``, ``{{ else if ... }}``, ``{{ end }}``, and ``{{-``/``-}}`` trimming)."""
    nodes, rest = _parse(_tokens(template), stop=())
    if rest:
        raise ValueError(f"Go template: unexpected {{{{ {rest[0][1]} }}}}")
    top = {"Messages": messages, "System": system, "Prompt": prompt, "Response": response}
    return _run(nodes, top, top)


def _tokens(template: str) -> list[tuple[str, str]]:
    """[("text", s) | ("action", a)], with trimming markers applied to the neighbouring text."""
    out: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for m in _ACTION.finditer(template):
        text = template[pos : m.start()]
        text = text.lstrip() if trim_next else text
        out.append(("text", text.rstrip() if m.group(1) else text))
        out.append(("action", m.group(2)))
        pos, trim_next = m.end(), bool(m.group(3))
    tail = template[pos:]
    out.append(("text", tail.lstrip() if trim_next else tail))
    return out


def _parse(tokens: list, stop: tuple[str, ...]) -> tuple[list, list]:
    """Nodes up to an action starting with one of ``stop`` (returned unconsumed with the rest)."""
    nodes = []
    while tokens:
        kind, value = tokens[0]
        if kind == "action" and value.split(" ", 1)[0] in stop:
            return nodes, tokens
        tokens = tokens[1:]
        if kind == "text":
            nodes.append(("text", value))
        elif value == "range .Messages":
            body, tokens = _parse(tokens, stop=("end",))
            nodes.append(("range", body))
            tokens = _expect_end(tokens)
        elif value.startswith("if "):
            node, tokens = _parse_if(value[3:], tokens)
            nodes.append(node)
        elif value.startswith(".") and value[1:] in _FIELDS:
            nodes.append(("field", value[1:]))
        else:
            raise ValueError(f"Go template: {{{{ {value} }}}} is outside the subset this renderer reads")
    return nodes, tokens


def _parse_if(condition: str, tokens: list) -> tuple[tuple, list]:
    then, tokens = _parse(tokens, stop=("else", "end"))
    otherwise: list = []
    if tokens and tokens[0][1] == "else":
        otherwise, tokens = _parse(tokens[1:], stop=("end",))
    elif tokens and tokens[0][1].startswith("else if "):
        nested, tokens = _parse_if(tokens[0][1][len("else if ") :], tokens[1:])
        return ("if", condition, then, [nested]), tokens
    return ("if", condition, then, otherwise), _expect_end(tokens)


def _expect_end(tokens: list) -> list:
    if not tokens or tokens[0] != ("action", "end"):
        raise ValueError("Go template: a block has no {{ end }}")
    return tokens[1:]


def _run(nodes: list, dot: dict, top: dict) -> str:
    out = []
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "field":
            out.append(str(_field(dot, node[1])))
        elif node[0] == "range":
            out += [_run(node[1], {k.capitalize(): v for k, v in m.items()}, top) for m in top["Messages"]]
        else:
            _, condition, then, otherwise = node
            out.append(_run(then if _true(condition, dot) else otherwise, dot, top))
    return "".join(out)


def _field(dot: dict, name: str):
    if name not in dot:
        raise ValueError(f"Go template: .{name} is not defined here")
    return dot[name]


def _true(condition: str, dot: dict) -> bool:
    m = re.fullmatch(r'eq \.(\w+) "([^"]*)"', condition)
    if m:
        return _field(dot, m.group(1)) == m.group(2)
    m = re.fullmatch(r"\.(\w+)", condition)
    if m:
        return bool(_field(dot, m.group(1)))
    raise ValueError(f"Go template: condition {condition!r} is outside the subset this renderer reads")
