"""The prompt composer: retrieved passages, numbered [1], [2]..., put before the question in the model's
template, within the tokens the model has left for a prompt.

Tokens are counted in the model's tokenizer on the text the sampler will encode. When the passages do
not all fit, whole passages go, the least relevant first; a passage is never cut. The numbers of the
passages kept are the citations the answer may use, and `Source` maps each back to its chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from gptkit.errors import GptkitError
from gptkit.rag.chunking import Hit
from gptkit.templates import ChatTemplate, Message
from gptkit.tokenizer import Tokenizer

INSTRUCTION = "Answer the question from the numbered passages below, citing them as [1], [2]."


@dataclass(frozen=True, slots=True)
class Source:
    """Citation `number` of an answer: the chunk it points at."""

    number: int
    source: str
    doc: str
    start: int
    end: int
    score: float

    def record(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        where = self.source if self.doc == self.source else f"{self.source} ({self.doc})"
        return f"[{self.number}] {where}, characters {self.start}-{self.end}, score {self.score:.3f}"


def user_content(question: str, hits: list[Hit]) -> str:
    """The passages, numbered, then the question: what the user's message becomes."""
    if not hits:
        return question
    passages = "\n\n".join(f"[{n}] {h.text}" for n, h in enumerate(hits, start=1))
    return f"{INSTRUCTION}\n\n{passages}\n\nQuestion: {question}"


def sources_of(hits: list[Hit]) -> list[Source]:
    return [Source(n, h.source, h.doc, h.start, h.end, h.score) for n, h in enumerate(hits, start=1)]


def fit(
    question: str, hits: list[Hit], render: Callable[[str], str], tokenizer: Tokenizer, budget: int
) -> tuple[str, list[Source]]:
    """The longest prefix of `hits` (most relevant first) whose rendered prompt fits in `budget`
    tokens: (prompt, its sources). Without any passage the question alone must fit."""
    for n in range(len(hits), -1, -1):
        prompt = render(user_content(question, hits[:n]))
        if len(tokenizer.encode(prompt)) <= budget:
            return prompt, sources_of(hits[:n])
    raise GptkitError(
        f"the question alone takes more than the {budget} tokens the model has for a prompt; shorten it "
        "or lower --max-new-tokens"
    )


def completion_prompt(template: ChatTemplate | None, system: str | None = None) -> Callable[[str], str]:
    """How a composed message becomes the whole prompt: the model's chat template (system prompt,
    the message, the generation prefix), or for a base model the message and "Answer:"."""
    if template is None:
        return lambda content: f"{content}\nAnswer:"
    system = template.default_system if system is None else system
    head: list[Message] = [{"role": "system", "content": system}] if system else []

    def render(content: str) -> str:
        return template.render([*head, {"role": "user", "content": content}], add_generation_prefix=True)

    return render


def format_sources(sources: list[Source]) -> str:
    return "Sources:\n" + "\n".join(s.line() for s in sources) if sources else "Sources: none retrieved"
