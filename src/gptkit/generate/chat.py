"""Chat: a conversation with a model, formatted by a template of gptkit.templates.

`Chat` holds one conversation: it trims the oldest turns to fit the model's context and streams the
assistant's reply through the sampler. A checkpoint without a template (a base model) gets the
"plain" template: a running transcript the model simply continues.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator
from typing import Any, Protocol, TextIO

import torch

from gptkit.config import validate
from gptkit.console import notice
from gptkit.errors import GptkitError
from gptkit.generate.settings import SampleSettings
from gptkit.generate.text import TextStream
from gptkit.generate.textmodel import TextModel
from gptkit.templates import ChatTemplate, Message

CHANGEABLE = ("temperature", "top_k", "top_p", "max_new_tokens", "repetition_penalty", "seed")


class Retrieval(Protocol):
    """What `Chat(rag=...)` takes (a `gptkit.rag.Retriever`): a user message rewritten to carry the
    passages retrieved for it, within `room` tokens, and the sources it cites."""

    def message(self, question: str, tokenizer: Any, room: int) -> tuple[str, list[Any]]: ...


class Chat:
    """One conversation with a model: system prompt, messages so far and sampling settings.

    `template` None means the checkpoint's stored template, or "plain" completion for a base model.
    `system` None means the template's default system prompt; "" means none.
    """

    def __init__(
        self,
        model: TextModel,
        template: ChatTemplate | None = None,
        system: str | None = None,
        settings: SampleSettings | None = None,
        rag: Retrieval | None = None,
    ) -> None:
        self.model = model
        self.rag = rag  # each user turn retrieves again; the history keeps the plain messages
        self.sources: list[Any] = []  # what the last reply's citations point at
        self.fallback = template is None and model.chat_template is None  # a base model: plain completion
        if template is None:
            stored = model.chat_template
            template = (
                ChatTemplate.named("plain")
                if stored is None
                else ChatTemplate.from_dict(stored, model.source or "the checkpoint")
            )
        self.template = template
        self.system = template.default_system if system is None else system
        self.settings = settings or SampleSettings.of(model.settings)
        self.messages: list[Message] = []
        try:
            template.encode(model.tokenizer, [*self._system(), {"role": "user", "content": ""}], True)
        except GptkitError as e:
            raise GptkitError(
                f"the model's tokenizer cannot encode chat template {template.name!r} or the system prompt "
                f"({e})"
            ) from None
        self.check_fits()

    def _fixed_ids(self) -> tuple[list[int], list[int]]:
        """Ids of the system prompt and of the generation prefix: in every prompt."""
        tok, tmpl = self.model.tokenizer, self.template
        prefix = tok.encode(tmpl.assistant.prefix) if tmpl.assistant.prefix else []
        return tmpl.encode(tok, self._system())[0], prefix

    def check_fits(self) -> None:
        """Fail early (not at every message) when the template leaves no room for any message."""
        tok, user = self.model.tokenizer, self.template.user
        system_ids, prefix = self._fixed_ids()
        fixed = (
            len(system_ids) + len(prefix) + sum(len(tok.encode(t)) for t in (user.prefix, user.suffix) if t)
        )
        if fixed >= self.context - self.reply_room():
            raise GptkitError(
                f"the system prompt and template take {fixed} of the model's {self.context}-token context "
                f"(with {self.reply_room()} kept for the reply), leaving no room; shorten --system or lower "
                "max_new_tokens"
            )

    @property
    def context(self) -> int:
        return self.model.model.tokens_that_fit()

    def reply_room(self) -> int:
        """Tokens kept free for the reply: max_new_tokens, but at most half the context."""
        return min(self.settings.max_new_tokens, self.context // 2)

    def reset(self) -> None:
        """Forget the conversation (the system prompt and settings stay)."""
        self.messages = []

    def change_settings(self, assignments: str) -> SampleSettings:
        """Apply "temperature=0.7 top_p=0.9"; validated as a whole, so a bad value changes nothing."""
        changes: dict[str, Any] = {}
        for item in assignments.split():
            key, sep, raw = item.partition("=")
            key = key.replace("-", "_")
            if not sep or key not in CHANGEABLE:
                raise GptkitError(
                    f"cannot set {item!r}; use key=value with key one of {', '.join(CHANGEABLE)}"
                )
            changes[key] = _scalar(raw)
        old = self.settings
        self.settings = validate(SampleSettings, {**old.model_dump(), **changes}, "chat settings")
        try:
            self.check_fits()
        except GptkitError:
            self.settings = old
            raise
        return self.settings

    def describe_settings(self) -> str:
        s = self.settings
        values = " ".join(f"{k}={getattr(s, k)}" for k in CHANGEABLE)
        return f"{values}\ntemplate={self.template.name} system={self.system!r} context={self.context} tokens"

    def prompt_ids(self, user_text: str) -> list[int]:
        """The prompt for a reply to `user_text`: system prompt, the newest turns that fit, the message.

        It fits in context - reply_room(): the oldest whole turns go first; if the message alone is
        still too long, its most recent tokens are kept (with a notice).
        """
        tok, tmpl = self.model.tokenizer, self.template
        budget = self.context - self.reply_room()
        system_ids, generation_prefix = self._fixed_ids()
        if self.rag is not None:
            prefix, _, suffix = tmpl.encode_message(tok, {"role": "user", "content": ""})
            room = budget - len(system_ids) - len(prefix) - len(suffix) - len(generation_prefix)
            user_text, self.sources = self.rag.message(user_text, tok, room)
        prefix, content, suffix = tmpl.encode_message(tok, {"role": "user", "content": user_text})
        messages = [sum(tmpl.encode_message(tok, m), []) for m in self.messages]  # user, assistant, ...
        turns = [sum(messages[i : i + 2], []) for i in range(0, len(messages), 2)]  # oldest first
        fixed = len(system_ids) + len(prefix) + len(suffix) + len(generation_prefix)
        used = fixed + len(content)
        kept: list[list[int]] = []
        for turn in reversed(turns):
            if used + len(turn) > budget:
                break
            kept.insert(0, turn)
            used += len(turn)
        if used > budget:
            room = len(content) - (used - budget)
            if room < 1:
                self.check_fits()  # raises: the system prompt and template alone fill the budget
            notice(f"your message is {len(content)} tokens; kept its last {room} to fit the model's context")
            content = content[-room:]
        return system_ids + sum(kept, []) + prefix + content + suffix + generation_prefix

    def reply(self, user_text: str) -> Iterator[str]:
        """Stream the assistant's answer to `user_text`; once complete, both join the history.

        Trailing whitespace (the template's turn suffix) is held back, so what is shown is what is
        stored; an interrupted reply is not added to the history.
        """
        if not user_text.strip():
            raise GptkitError("the message is empty; type some text (or /help)")
        ids = self.prompt_ids(user_text)
        settings = self.settings.model_copy(update={"stop": [*self.template.stop, *self.settings.stop]})
        stream = TextStream(self.model.tokenizer, settings.stop)
        done = torch.zeros(1, dtype=torch.bool)
        shown, pending = "", ""
        for step in self.model.sampler.token_steps([ids], settings, done):
            if bool(done[0]):
                break
            text = stream.push(step[0])
            done[0] = stream.stopped
            pending += text
            if pending.rstrip():
                body = pending.rstrip()
                yield body
                shown, pending = shown + body, pending[len(body) :]
        last = (pending + stream.finish()).rstrip()
        if last:
            yield last
        self.messages += [
            {"role": "user", "content": user_text},
            {"role": "assistant", "content": shown + last},
        ]

    def _system(self) -> list[Message]:
        return [{"role": "system", "content": self.system}] if self.system else []


def _scalar(raw: str) -> Any:
    """A /settings value: none, an int or a float (validation reports anything else)."""
    if raw.lower() in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


HELP = """commands:
  /reset                  forget the conversation (keeps the system prompt and settings)
  /settings               show the sampling settings
  /settings KEY=VALUE ... change them, e.g. /settings temperature=0.7 top_p=0.9
  /help                   this list
  /exit                   leave (Ctrl+D and Ctrl+C too)"""


def input_lines(interactive: bool) -> Iterator[str]:
    """Lines typed at a "> " prompt (with line editing) on a terminal, else standard input's lines."""
    if not interactive:
        yield from sys.stdin
        return
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (input() gets line editing and history)
    while True:
        try:
            yield input("> ")
        except EOFError:
            print()
            return


def run_chat(chat: Chat, lines: Iterable[str], out: TextIO, err: TextIO) -> int:
    """The chat loop over input lines: commands, or messages answered on `out`; notices go to `err`.

    Every way out is a clean exit (code 0): /exit, the end of input (Ctrl+D) and Ctrl+C.
    """
    try:
        if chat.fallback:
            print(
                "gptkit: no chat template in this checkpoint (a base model): the model continues the "
                "transcript; --template NAME picks a chat template",
                file=err,
            )
        source = chat.model.source or "the model"
        print(
            f"gptkit: chat with {source} (template {chat.template.name}); /help lists the commands", file=err
        )
        err.flush()
        return _loop(chat, lines, out, err)
    except KeyboardInterrupt:
        print(file=out, flush=True)
        return 0


def _loop(chat: Chat, lines: Iterable[str], out: TextIO, err: TextIO) -> int:
    for line in lines:
        text = line.rstrip("\n")
        command, _, rest = text.strip().partition(" ")
        try:
            if command == "/exit":
                break
            if command == "/reset":
                chat.reset()
                print("(conversation cleared)", file=out, flush=True)
            elif command == "/settings":
                if rest.strip():
                    chat.change_settings(rest)
                print(chat.describe_settings(), file=out, flush=True)
            elif command == "/help":
                print(HELP, file=out, flush=True)
            elif command.startswith("/"):
                print(f"gptkit: unknown command {command}; /help lists the commands", file=err, flush=True)
            else:
                for piece in chat.reply(text):
                    print(piece, end="", file=out, flush=True)
                print(file=out, flush=True)
                if chat.rag is not None:  # the passages this answer was given, for its citations
                    lines = [source.line() for source in chat.sources] or ["none retrieved"]
                    print("Sources:", *lines, sep="\n", file=out, flush=True)
        except GptkitError as e:
            print(f"gptkit: error: {e}", file=err, flush=True)
    return 0
