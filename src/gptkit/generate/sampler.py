"""The sampler: text from a model over its key/value cache, for many prompts and samples at once.

One sampler serves the trainer's samples, `gptkit sample`, `gptkit chat`, the server and the Python
API. Everything runs the one generation loop, `gptkit.generate.decoding.Decoding`: here a batch
whose sequences all join at the start (the server's engine lets them come and go). Prompts of
different lengths share the batch by left padding (see `KVCache`), so a batch gives each prompt the
tokens it would get alone, and each sequence draws with its own generator, seeded from
`settings.seed`. Past the model's context a sequence keeps its most recent half-context.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch import Tensor

from gptkit.console import notice
from gptkit.errors import GptkitError
from gptkit.generate.decoder import DecoderFor, forward_decoder
from gptkit.generate.decoding import Decoding, Sequence, row_seeds
from gptkit.generate.settings import SampleSettings
from gptkit.model import GPT
from gptkit.tokenizer import Tokenizer


@dataclass
class Piece:
    """A piece of text that became final in sequence `row` (prompt-major: prompt i, sample j)."""

    row: int
    text: str


class Sampler:
    """Generates from `model` with `tokenizer`; the model is put in eval mode while sampling.

    `decoder_for(model, number of sequences)` gives the decoder of each step (prompts go through
    `GPT.forward`); by default GPT.forward decodes too. `gptkit.load` passes
    `gptkit.generate.inference.fastest_decoder`, which picks gptkit's CPU kernel where it serves.
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer, decoder_for: DecoderFor = forward_decoder) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.decoder_for = decoder_for

    def decoding(self, rows: int, max_len: int | None = None, chunk: int | None = None) -> Decoding:
        """The generation loop for up to `rows` sequences at a time (see `Decoding`)."""
        return Decoding(self.model, self.tokenizer, self.decoder_for, rows, max_len, chunk)

    def generate(self, prompts: list[str], settings: SampleSettings) -> list[list[str]]:
        """For each prompt, `settings.num_samples` continuations (the prompt itself not included)."""
        texts = [[""] * settings.num_samples for _ in prompts]
        for piece in self.pieces(prompts, settings):
            i, j = divmod(piece.row, settings.num_samples)
            texts[i][j] += piece.text
        return texts

    def stream(self, prompt: str, settings: SampleSettings) -> Iterator[str]:
        """The continuation of one prompt (the first sample), piece by piece as it is generated."""
        for piece in self.pieces([prompt], settings.model_copy(update={"num_samples": 1})):
            if piece.text:
                yield piece.text

    def pieces(self, prompts: list[str], settings: SampleSettings) -> Iterator[Piece]:
        """Text pieces of every sequence as they become final; the joined pieces are the full texts."""
        rows = [self.encode_prompt(p) for p in prompts]
        decoding, sequences = self._start(rows, settings, settings.num_samples, text=True)
        index = {s: i for i, s in enumerate(sequences)}
        was_training = self.model.training
        self.model.eval()
        try:
            while decoding.busy:
                for step in decoding.step():
                    if step.text:
                        yield Piece(index[step.sequence], step.text)
        finally:
            self.model.train(was_training)

    def encode_prompt(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str) or not prompt:
            raise GptkitError("the prompt is empty; give some text (a newline is enough)")
        return self.tokenizer.encode(prompt)

    def generate_ids(self, rows: list[list[int]], settings: SampleSettings) -> list[list[int]]:
        """New token ids after each prompt in `rows` (ids in, ids out; stop strings do not apply)."""
        out: list[list[int]] = [[] for _ in rows]
        for step in self.token_steps(rows, settings):
            for row, token in enumerate(step):
                if token >= 0:
                    out[row].append(token)
        return out

    def token_steps(
        self, rows: list[list[int]], settings: SampleSettings, done: Tensor | None = None
    ) -> Iterator[list[int]]:
        """Each step's next token of every row (-1 for a row that got none), until every row ends.

        A row that draws one of the stop tokens ends: it is marked in `done` (the token is not
        yielded for it). The caller may mark rows in `done` too (a stop string): they end before the
        next step.
        """
        decoding, sequences = self._start(rows, settings, 1, text=False)
        index = {s: i for i, s in enumerate(sequences)}
        was_training = self.model.training
        self.model.eval()
        try:
            while decoding.busy:
                if done is not None:
                    for i, s in enumerate(sequences):
                        if s.finish_reason is not None:
                            done[i] = True
                        elif bool(done[i]):
                            s.cancel()
                ids = [-1] * len(rows)
                for step in decoding.step():
                    if step.token is not None:
                        ids[index[step.sequence]] = step.token
                    elif done is not None:
                        done[index[step.sequence]] = True
                if any(i >= 0 for i in ids):
                    yield ids
        finally:
            self.model.train(was_training)

    def _start(
        self, rows: list[list[int]], settings: SampleSettings, samples: int, text: bool
    ) -> tuple[Decoding, list[Sequence]]:
        """The loop with every row's `samples` sequences added (prompt-major), its cache no longer
        than they need: prompts longer than the context keep their end."""
        if not rows or any(not r for r in rows):
            raise GptkitError("the prompt is empty; give at least one token (a newline is enough)")
        fit = self.model.tokens_that_fit()
        longest = max(map(len, rows))
        if longest > fit:
            notice(f"a prompt of {longest} tokens keeps its last {fit} (the model's context)")
        room = self.model.n_prefix + min(fit, longest + settings.max_new_tokens)
        decoding = self.decoding(len(rows) * samples, max_len=room)
        seeds = row_seeds(settings.seed, len(rows) * samples)
        sequences = [
            s
            for i, r in enumerate(rows)
            for s in decoding.add(r[-fit:], settings, seeds[i * samples : (i + 1) * samples], text)
        ]
        return decoding, sequences
