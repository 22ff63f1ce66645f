"""A trained model ready to talk to: `gptkit.load(path)` returns a TextModel."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from gptkit.generate.inference import fastest_decoder
from gptkit.generate.sampler import Sampler
from gptkit.generate.settings import SampleSettings
from gptkit.model import GPT
from gptkit.tokenizer import Tokenizer


class Augmenter(Protocol):
    """What `rag=` takes (a `gptkit.rag.Retriever`): the prompt that answers `prompt` from retrieved
    passages, within the model's context less `max_new_tokens`, and the sources it cites."""

    def augment(self, prompt: str, model: TextModel, max_new_tokens: int) -> tuple[str, list[Any]]: ...


class Answer(str):
    """Generated text that was composed from retrieved passages: `sources` maps its citations [1], [2]..."""

    sources: list[Any]

    def __new__(cls, text: str, sources: list[Any]) -> Answer:
        answer = super().__new__(cls, text)
        answer.sources = sources
        return answer


class TextModel:
    """A model with its tokenizer and default sampling settings; text in, text out.

    `generate` and `stream` take `SampleSettings` fields as keywords (`temperature=0.7`, ...); they
    override `self.settings` for that call only.
    """

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer,
        *,
        source: str = "",
        chat_template: dict[str, Any] | None = None,
        settings: SampleSettings | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.sampler = Sampler(model, tokenizer, fastest_decoder)  # gptkit's CPU kernel where it serves
        self.source = source  # where it was loaded from, for messages
        self.chat_template = chat_template  # stored by instruction tuning; None for base models
        self.settings = settings or SampleSettings()

    @property
    def device(self) -> str:
        return str(self.model.device)

    def generate(
        self, prompt: str | list[str], *, rag: Augmenter | None = None, **settings: Any
    ) -> str | list[str]:
        """The continuation of `prompt` (the prompt itself not included).

        One prompt and one sample give a string; a list of prompts or `num_samples` > 1 give a list,
        prompt by prompt, each prompt's samples together. With `rag` (a `gptkit.rag.Retriever`), each
        prompt is a question answered from retrieved passages, and each text is an `Answer` whose
        `sources` its citations point at.
        """
        s = SampleSettings.of(self.settings, **settings)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        composed = [rag.augment(p, self, s.max_new_tokens) for p in prompts] if rag is not None else None
        if composed is not None:
            prompts = [text for text, _ in composed]
        texts: list[str] = [t for samples in self.sampler.generate(prompts, s) for t in samples]
        if composed is not None:
            texts = [Answer(t, composed[i // s.num_samples][1]) for i, t in enumerate(texts)]
        return texts[0] if isinstance(prompt, str) and s.num_samples == 1 else texts

    def stream(self, prompt: str, **settings: Any) -> Iterator[str]:
        """The continuation of `prompt`, in pieces as they are generated (whole characters only)."""
        return self.sampler.stream(prompt, SampleSettings.of(self.settings, **settings))

    def __repr__(self) -> str:
        c = self.model.config
        return (
            f"TextModel({self.source or 'in memory'}: {c.n_layer} layers, width {c.n_embd}, "
            f"context {c.block_size}, {self.tokenizer!r}, on {self.device})"
        )
