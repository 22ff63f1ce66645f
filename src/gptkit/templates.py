"""Prompt and chat templates: how a conversation becomes model input, shared by fine-tuning data and chat.

A `ChatTemplate` is plain data (stored under "chat_template" in a checkpoint's payload), so the
fine-tuning that writes instruction-tuned checkpoints and `gptkit chat` that reads them format
conversations with the same code: `ChatTemplate.encode` gives the exact token ids, and the loss mask,
the model sees. Every template string and every message's content is tokenized on its own, so the
prompt at chat time ends exactly where a training example's assistant content begins. A leaf module:
loading instruction data must not import the sampler.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gptkit.errors import GptkitError
from gptkit.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
Message = dict[str, str]


class RoleFormat(BaseModel):
    """The text around one message of a role: prefix + content + suffix."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    prefix: str = ""
    suffix: str = ""


class ChatTemplate(BaseModel):
    """How a list of messages becomes model input, and what ends an assistant's turn.

    The prompt for the assistant's next turn is the rendered messages plus `assistant.prefix` (the
    generation prefix). A finished assistant message is its content, `assistant.suffix` and, with
    `eot_after_assistant`, the end-of-text token; generation also stops at any of `stop`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    version: Literal[1] = 1
    name: str = Field(min_length=1)
    system: RoleFormat = RoleFormat()
    user: RoleFormat = RoleFormat()
    assistant: RoleFormat = RoleFormat()
    default_system: str = ""
    stop: list[str] = []
    eot_after_assistant: bool = True

    @classmethod
    def named(cls, name: str) -> ChatTemplate:
        """A built-in template by name (see BUILTIN_TEMPLATES)."""
        if name not in BUILTIN_TEMPLATES:
            raise GptkitError(
                f"unknown chat template {name!r}; built-in templates: {', '.join(BUILTIN_TEMPLATES)}"
            )
        return BUILTIN_TEMPLATES[name]

    @classmethod
    def from_dict(cls, data: Any, source: str = "the checkpoint") -> ChatTemplate:
        """Validate a stored template; anything malformed is a one-line error naming `source`."""
        if not isinstance(data, dict):
            raise GptkitError(
                f"the chat template stored in {source} is not a mapping (got {type(data).__name__}); "
                "use --template NAME to pick a built-in one"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(map(str, err['loc'])) or '(top level)'}: {err['msg']}" for err in e.errors()
            )
            raise GptkitError(
                f"the chat template stored in {source} is invalid ({problems}); "
                "use --template NAME to pick a built-in one"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the checkpoint payload (`save_checkpoint(..., chat_template=...)`)."""
        return self.model_dump(mode="json")

    def pieces(self, message: Message) -> list[tuple[str, bool]]:
        """(text, is_target) of one message: prefix, content, suffix; targets are what the model writes."""
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise GptkitError(f"a chat message must be a dict with role one of {ROLES}, not {message!r}")
        content = message.get("content")
        if not isinstance(content, str):
            raise GptkitError(f"a chat message's content must be text, not {content!r}")
        fmt: RoleFormat = getattr(self, message["role"])
        target = message["role"] == "assistant"
        return [(fmt.prefix, False), (content, target), (fmt.suffix, target)]

    def render(self, messages: list[Message], add_generation_prefix: bool = False) -> str:
        """The conversation as text (the end-of-text tokens of `encode` are not text, so not here)."""
        _check_order(messages)
        text = "".join(t for m in messages for t, _ in self.pieces(m))
        return text + self.assistant.prefix if add_generation_prefix else text

    def encode(
        self, tokenizer: Tokenizer, messages: list[Message], add_generation_prefix: bool = False
    ) -> tuple[list[int], list[bool]]:
        """Token ids of the conversation and, per id, whether it is a training target.

        The fine-tuner trains on the ids where the mask is True (assistant content, suffix and
        end-of-text); chat builds its prompt with the same call, `add_generation_prefix=True`.
        """
        _check_order(messages)
        ids: list[int] = []
        mask: list[bool] = []
        for m in messages:
            target = m["role"] == "assistant"
            for i, part in enumerate(self.encode_message(tokenizer, m)):
                ids += part
                mask += [target and i > 0] * len(part)
        if add_generation_prefix and self.assistant.prefix:
            ids += tokenizer.encode(self.assistant.prefix)
            mask += [False] * (len(ids) - len(mask))
        return ids, mask

    def encode_message(self, tokenizer: Tokenizer, message: Message) -> list[list[int]]:
        """Ids of the prefix, content and suffix of one message (plus [eot] after an assistant's)."""
        parts = [tokenizer.encode(t) if t else [] for t, _ in self.pieces(message)]
        if message["role"] == "assistant" and self.eot_after_assistant:
            parts.append([tokenizer.eot_id])
        return parts


def _check_order(messages: list[Message]) -> None:
    if any(m.get("role") == "system" for m in messages[1:] if isinstance(m, dict)):
        raise GptkitError("a system message may only come first in a conversation")


ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request."
)
ALPACA_SYSTEM_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)

BUILTIN_TEMPLATES: dict[str, ChatTemplate] = {
    # Stanford Alpaca's prompt, byte for byte, continued turn after turn
    "alpaca": ChatTemplate(
        name="alpaca",
        system=RoleFormat(suffix="\n\n"),
        user=RoleFormat(prefix="### Instruction:\n", suffix="\n\n"),
        assistant=RoleFormat(prefix="### Response:\n", suffix="\n\n"),
        default_system=ALPACA_SYSTEM,
        stop=["### Instruction:", "### Input:", "### Response:"],
    ),
    "chat": ChatTemplate(
        name="chat",
        system=RoleFormat(suffix="\n"),
        user=RoleFormat(prefix="User: ", suffix="\n"),
        assistant=RoleFormat(prefix="Assistant: ", suffix="\n"),
        stop=["\nUser:", "\nAssistant:"],
    ),
    # base models: the transcript is the user's text and the model's continuations, a newline after each
    "plain": ChatTemplate(
        name="plain",
        system=RoleFormat(suffix="\n"),
        assistant=RoleFormat(suffix="\n"),
        eot_after_assistant=False,
    ),
}


def alpaca_messages(example: dict[str, str]) -> list[Message]:
    """An Alpaca record ({instruction, input, output}) as messages; with the "alpaca" template they
    render to the original Alpaca prompt and response (the input goes under "### Input:")."""
    instruction, extra = example["instruction"], example.get("input", "")
    user = f"{instruction}\n\n### Input:\n{extra}" if extra else instruction
    return [
        {"role": "system", "content": ALPACA_SYSTEM_WITH_INPUT if extra else ALPACA_SYSTEM},
        {"role": "user", "content": user},
        {"role": "assistant", "content": example["output"]},
    ]
