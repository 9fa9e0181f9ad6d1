"""`smolora chat`: talk to a model, and to its adapters side by side.

One base model is loaded once; every ``--adapter NAME=PATH`` is attached to it as a named PEFT
adapter (``load_adapter(..., adapter_name=NAME)``). ``/adapter NAME`` switches with PEFT's
``set_adapter`` and ``/adapter base`` answers inside ``disable_adapter()``: nothing is reloaded. The
conversation (with its system prompt) goes through the chat template; replies stream as they come.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from smolora.errors import SmoLoRAError, reason
from smolora.log import say, warn

BASE = "base"
HELP = (
    "commands: /adapter [NAME] switch (or list), /compare answer the last prompt with every model, "
    "/system TEXT, /reset, /save FILE (.json or .jsonl), /help, /quit"
)


def parse_adapters(items: list[str] | None) -> dict[str, Path]:
    """``--adapter NAME=PATH`` (or a bare PATH, named by its folder) as {name: path}, each checked."""
    from smolora.merge import check_adapter_dir

    adapters: dict[str, Path] = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or Path(item).exists():
            name, path = Path(item).resolve().name, item
        if not name or name == BASE or "/" in name or name.startswith("/"):
            raise SmoLoRAError(f"--adapter {item}: the name must be a word other than {BASE!r} (NAME=PATH)")
        if name in adapters:
            raise SmoLoRAError(f"--adapter {item}: the name {name!r} is given twice")
        adapters[name] = check_adapter_dir(path)
    return adapters


def attach_adapters(base, adapters: dict[str, Path]):
    """``base`` with every adapter attached under its own name (the first one active); ``base`` as
    it is when there are none. An adapter that does not fit this base is a one-line error."""
    from peft import PeftModel

    from smolora.lora import quiet_peft

    model = base
    for name, path in adapters.items():
        try:
            with quiet_peft():
                if model is base:
                    model = PeftModel.from_pretrained(base, str(path), adapter_name=name)
                else:
                    model.load_adapter(str(path), adapter_name=name)
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise SmoLoRAError(f"{path}: cannot attach it to this base model ({reason(e)[:200]})") from None
    if adapters:
        model.set_adapter(next(iter(adapters)))
    return model.eval()


@dataclass
class Chat:
    """A conversation: the model, which adapter answers, the history the template renders, and the
    whole transcript (every reply, with the model that gave it) for ``/save``."""

    model: object
    tokenizer: object
    adapters: list[str]
    sample: dict
    stream: bool = True
    active: str = BASE
    system: str | None = None
    history: list[dict] = field(default_factory=list)  # user/assistant turns since the last /reset
    transcript: list[dict] = field(default_factory=list)

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def answer(self, name: str, messages: list[dict]) -> str:
        """The reply of adapter ``name`` (or the base) to ``messages``, streamed to stdout."""
        import contextlib

        from smolora.generate import generate
        from smolora.lora import quiet_peft

        if name == BASE and self.adapters:
            use = self.model.disable_adapter()
        else:
            if self.adapters:
                self.model.set_adapter(name)
            use = contextlib.nullcontext()
        sys.stdout.write(f"{name if self.adapters else 'model'}> ")
        sys.stdout.flush()
        with use, quiet_peft():  # (PEFT's generate asks transformers a deprecated question)
            reply = generate(self.model, self.tokenizer, messages, stream=self.stream, **self.sample)
        if self.adapters and self.active != BASE:
            self.model.set_adapter(self.active)
        if not self.stream:
            print(reply, flush=True)
        return reply

    def say_to(self, line: str) -> None:
        """``line`` answered by the active model; a reply stopped (Ctrl-C) or refused leaves no turn behind."""
        self.history.append({"role": "user", "content": line})
        try:
            reply = self.answer(self.active, self.messages())
        except BaseException:
            self.history.pop()
            raise
        self.history.append({"role": "assistant", "content": reply})
        self.transcript += [
            {"role": "user", "content": line},
            {"role": "assistant", "content": reply, "model": self.active},
        ]

    def compare(self) -> None:
        """The last prompt (with the conversation before it) answered by every adapter and the base;
        the history keeps the reply it had."""
        last = max((i for i, m in enumerate(self.history) if m["role"] == "user"), default=None)
        if last is None:
            print("nothing to compare yet: say something first", flush=True)
            return
        before = self.messages()[: len(self.messages()) - len(self.history) + last + 1]
        for name in [*self.adapters, BASE]:
            reply = self.answer(name, before)
            self.transcript.append({"role": "assistant", "content": reply, "model": name, "compare": True})

    def save(self, target: str) -> None:
        """The transcript as JSON ({"system", "messages"}) or JSONL (a line per message)."""
        from smolora.paths import publish

        path = Path(target)
        if path.suffix not in (".json", ".jsonl"):
            print(f"/save {target}: expected a .json or .jsonl file name", flush=True)
            return
        if path.suffix == ".jsonl":
            text = "".join(json.dumps(m, ensure_ascii=False) + "\n" for m in self.transcript)
        else:
            text = json.dumps({"system": self.system, "messages": self.transcript}, indent=1, ensure_ascii=False)
        try:
            publish(path, lambda tmp: tmp.write_text(text), folder=False)
        except (OSError, SmoLoRAError) as e:
            print(f"/save {target}: cannot write it ({reason(e)})", flush=True)
            return
        print(f"saved {len(self.transcript)} messages to {path}", flush=True)

    def command(self, line: str) -> bool:
        """Run a /command; False: quit."""
        name, _, rest = line[1:].partition(" ")
        rest = rest.strip()
        if name in ("quit", "exit"):
            return False
        if name == "reset":
            self.history.clear()
            print("history cleared", flush=True)
        elif name == "system":
            self.system = rest or None
            print(f"system prompt {'set' if rest else 'cleared'}", flush=True)
        elif name == "adapter":
            self.switch(rest)
        elif name == "compare":
            self.compare()
        elif name == "save" and rest:
            self.save(rest)
        else:
            print(HELP, flush=True)
        return True

    def switch(self, name: str) -> None:
        names = [*self.adapters, BASE]
        if not name:
            print("models: " + ", ".join(f"{n} (active)" if n == self.active else n for n in names), flush=True)
        elif name not in names:
            print(f"no adapter {name!r}; loaded: {', '.join(names)}", flush=True)
        else:
            self.active = name
            if name != BASE:
                self.model.set_adapter(name)
            print(f"now answering: {name}", flush=True)


def chat_repl(chat: Chat, stream_in=None) -> None:
    """Read lines until /quit or end of input: a /command, or a message for the active model."""
    stream_in = stream_in or sys.stdin
    interactive = stream_in.isatty()
    answers = f" ({chat.active} answers)" if chat.adapters else ""
    print(f"chat: type a message{answers}; {HELP}", flush=True)
    while True:
        if interactive:
            sys.stdout.write("you> ")
            sys.stdout.flush()
        try:
            line = stream_in.readline()
        except KeyboardInterrupt:
            print()
            return
        if not line:  # end of input (Ctrl-D, or the end of a pipe)
            return
        line = line.rstrip("\n")
        if not line.strip():
            continue
        try:
            if line.startswith("/"):
                if not chat.command(line.strip()):
                    return
            else:
                chat.say_to(line)
        except KeyboardInterrupt:  # stops a reply, not the chat
            print("\n(stopped)", flush=True)
        except SmoLoRAError as e:  # e.g. a conversation that fills the model's context
            print(flush=True)  # (after the reply's label)
            warn(str(e))


def open_chat(
    base, tokenizer, adapters: dict[str, Path], sample: dict, system: str | None = None, stream: bool = True
) -> Chat:
    """The chat over ``base`` with ``adapters`` attached; the first adapter answers, else the base."""
    model = attach_adapters(base, adapters)
    if adapters:
        say(f"adapters loaded: {', '.join(adapters)} (switch with /adapter NAME; /adapter base for none)")
    names = list(adapters)
    return Chat(model, tokenizer, names, sample, stream, active=names[0] if names else BASE, system=system)
