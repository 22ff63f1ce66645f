"""The sampler: text from a model over its key/value cache, for many prompts and samples at once.

One sampler serves the trainer's samples, `gptkit sample`, `gptkit chat`, the server and the Python
API. Prompts of different lengths are left-padded into one batch (the cache masks the padding, see
`KVCache`), so a batch gives each prompt the tokens it would get alone. Each step feeds one new token
per sequence; past the model's context the cache is rebuilt from the most recent half-context.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from gptkit.console import notice
from gptkit.errors import GptkitError
from gptkit.generate.choose import choose_next
from gptkit.generate.decoder import Decoder, DecoderFor, forward_decoder
from gptkit.generate.settings import SampleSettings
from gptkit.generate.text import TextStream
from gptkit.model import GPT, KVCache
from gptkit.tokenizer import Tokenizer


@dataclass
class Piece:
    """A piece of text that became final in sequence `row` (prompt-major: prompt i, sample j)."""

    row: int
    text: str


class Sampler:
    """Generates from `model` with `tokenizer`; the model is put in eval mode while sampling.

    `decoder_for(model, number of sequences)` gives the decoder of each batch's steps (prompts go
    through `GPT.forward`); by default GPT.forward decodes too. `gptkit.load` passes
    `gptkit.generate.inference.fastest_decoder`, which picks gptkit's CPU kernel where it serves.
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer, decoder_for: DecoderFor = forward_decoder) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.decoder_for = decoder_for

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
        rows = [self.encode_prompt(p) for p in prompts for _ in range(settings.num_samples)]
        streams = [TextStream(self.tokenizer, settings.stop) for _ in rows]
        done = torch.zeros(len(rows), dtype=torch.bool)
        for step in self.token_steps(rows, settings, done):
            for row in (~done).nonzero().flatten().tolist():
                text = streams[row].push(step[row])
                if streams[row].stopped:
                    done[row] = True
                if text:
                    yield Piece(row, text)
        for row, stream in enumerate(streams):
            if text := stream.finish():
                yield Piece(row, text)

    def encode_prompt(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str) or not prompt:
            raise GptkitError("the prompt is empty; give some text (a newline is enough)")
        return self.tokenizer.encode(prompt)

    def generate_ids(self, rows: list[list[int]], settings: SampleSettings) -> list[list[int]]:
        """New token ids after each prompt in `rows` (ids in, ids out; stop strings do not apply)."""
        out: list[list[int]] = [[] for _ in rows]
        done = torch.zeros(len(rows), dtype=torch.bool)
        for step in self.token_steps(rows, settings, done):
            for row in (~done).nonzero().flatten().tolist():
                out[row].append(step[row])
        return out

    def token_steps(
        self, rows: list[list[int]], settings: SampleSettings, done: Tensor
    ) -> Iterator[list[int]]:
        """Each step's next token of every row, until every row is `done` or has max_new_tokens.

        A row that draws one of the stop tokens is marked done here (the token is not yielded for it);
        the caller may mark rows done too (a stop string); done rows are still computed, but ignored.
        """
        if not rows or any(not r for r in rows):
            raise GptkitError("the prompt is empty; give at least one token (a newline is enough)")
        model = self.model
        block = model.tokens_that_fit()  # room for tokens (a soft prompt takes the rest)
        stop_ids = torch.tensor(
            [self.tokenizer.eot_id] if settings.stop_tokens is None else settings.stop_tokens,
            dtype=torch.long,
        )
        if max(map(len, rows)) > block:
            notice(f"a prompt of {max(map(len, rows))} tokens keeps its last {block} (the model's context)")
        history = [list(r[-block:]) for r in rows]  # every row's tokens so far (prompt + generated)
        generator = torch.Generator(device=model.device)
        if settings.seed is not None:
            generator.manual_seed(settings.seed)
        else:
            generator.seed()
        seen = None
        if settings.repetition_penalty != 1.0:
            seen = torch.zeros(len(rows), model.config.vocab_size, dtype=torch.bool, device=model.device)
            for i, r in enumerate(history):
                seen[i, r] = True
        longest = max(map(len, history))
        cache = model.new_cache(len(rows), model.n_prefix + min(block, longest + settings.max_new_tokens))
        decoder = self.decoder_for(model, len(rows))
        was_training = model.training
        model.eval()
        try:
            logits = self._prefill(cache, history)
            for _ in range(settings.max_new_tokens):
                if bool(done.all()):
                    return
                next_ids = choose_next(logits, settings, generator, seen).cpu()
                done |= torch.isin(next_ids, stop_ids)
                ids = next_ids.tolist()
                yield ids
                if seen is not None:
                    seen[torch.arange(len(rows)), next_ids.to(model.device)] = True
                for h, i in zip(history, ids, strict=True):
                    h.append(i)
                if cache.pos == cache.max_len:  # the context is full: slide the window
                    cache.reset()
                    logits = self._prefill(cache, [h[-(block // 2) :] for h in history])
                else:
                    logits = self._step(cache, next_ids, decoder)
        finally:
            model.train(was_training)

    # Inference mode around each model call, not around the loop: a generator's `with` block would
    # stay entered in the caller's code between yields.
    @torch.inference_mode()
    def _step(self, cache: KVCache, next_ids: Tensor, decoder: Decoder) -> Tensor:
        """Feed one token per row; the logits (B, V) of the next position."""
        return decoder.step(cache, next_ids)

    @torch.inference_mode()
    def _prefill(self, cache: KVCache, rows: list[list[int]]) -> Tensor:
        """Run the (left-padded) rows through the model into an empty cache; last logits (B, V)."""
        longest = max(map(len, rows))
        pad = torch.tensor([longest - len(r) for r in rows])
        idx = torch.tensor([[0] * (longest - len(r)) + r for r in rows], device=self.model.device)
        cache.set_padding(pad)
        return self.model(idx, cache=cache, last_only=True)[:, -1]
