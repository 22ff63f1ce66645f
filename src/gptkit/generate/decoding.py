"""The one generation loop: a batch of sequences that join and leave between steps.

Each `Sequence` has its own settings (temperature, top-k, top-p, penalties, stop tokens and strings,
max_new_tokens), its own random generator (its seed) and its own text stream. `Decoding.step` feeds
every running sequence its last token in one decoder call, runs (a chunk of) the prompts waiting to
join, then draws each sequence's next token; a sequence that ends leaves its slot (`Slots`) at once,
and a cancelled one leaves at the next step. `Sampler` (a fixed batch: `generate`, `stream`,
`token_steps`) and the server's engine (requests that come and go) both run this loop.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gptkit.errors import GptkitError
from gptkit.generate.choose import choose_next, log_probabilities
from gptkit.generate.decoder import Decoder, DecoderFor
from gptkit.generate.settings import SampleSettings
from gptkit.generate.slots import Prefill, Slots
from gptkit.generate.text import TextStream
from gptkit.model import GPT
from gptkit.tokenizer import Tokenizer


def row_seeds(seed: int | None, count: int) -> list[int]:
    """A seed for each of `count` sequences: derived from `seed` (the same seed gives the same seeds,
    each different), or fresh random ones."""
    root = torch.Generator()
    if seed is None:
        root.seed()
    else:
        root.manual_seed(seed)
    return torch.randint(0, 2**62, (count,), generator=root).tolist()


@dataclass(eq=False)
class Sequence:
    """One sequence being generated: what it continues, how it draws, what it drew, why it ended."""

    prompt: list[int]
    settings: SampleSettings
    generator: torch.Generator
    stream: TextStream | None  # its text and stop strings; None: ids only
    stop_ids: frozenset[int]
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (a stop token or string), "length" or "cancelled"
    logits: Tensor | None = None  # the next token's logits, not drawn yet
    seen: Tensor | None = None  # (V,) tokens of the prompt and the output: the repetition penalty
    counts: Tensor | None = None  # (V,) how often each token was generated: presence and frequency
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Ask for the sequence to end; it leaves its slot at the next step (safe from any thread)."""
        self.cancelled.set()

    @property
    def history(self) -> list[int]:
        return self.prompt + self.tokens


@dataclass
class Step:
    """What one step gave one sequence."""

    sequence: Sequence
    token: int | None  # None: no token added (a stop token was drawn, or none could be)
    text: str = ""  # text that became final (whole characters; never part of a stop string)
    logprob: float | None = None  # the token's log-probability under the model (settings.logprobs)
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)  # the most likely alternatives
    finish_reason: str | None = None  # set on a sequence's last step


class Decoding:
    """Sequences decoding together: up to `rows` at a time in a cache of `max_len` positions (default:
    the context and a quarter, so moving rows left to make room is rare). `chunk`: prompt positions
    run per step while other sequences are running (None: whole prompts)."""

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer,
        decoder_for: DecoderFor,
        rows: int,
        max_len: int | None = None,
        chunk: int | None = None,
    ) -> None:
        block = model.config.block_size
        self.model, self.tokenizer, self.decoder_for = model, tokenizer, decoder_for
        self.slots: Slots[Sequence] = Slots(model, rows, max_len or block + block // 4)
        self.chunk = chunk
        self.waiting: deque[tuple[list[int], list[Sequence]]] = deque()
        self.prefill: Prefill | None = None
        self.staged: list[list[Sequence]] = []  # the sequences of each prompt in the prefill
        self.ended: list[Step] = []  # sequences that ended outside a step (nothing to generate)
        self._decoders: dict[int, Decoder] = {}

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.prefill or self.slots.owners or self.ended)

    def add(
        self, prompt: list[int], settings: SampleSettings, seeds: list[int], text: bool = True
    ) -> list[Sequence]:
        """Sequences continuing `prompt`, one per seed, to join at a next step (prompts join in order).
        `text`: follow their text (stop strings apply); else ids only."""
        fit = self.model.tokens_that_fit()
        if not prompt or len(prompt) > fit:
            raise GptkitError(
                f"a prompt must have 1 to {fit} tokens (the model's context), not {len(prompt)}"
            )
        rows = self.slots.cache.batch_size
        if len(seeds) > rows:
            raise GptkitError(f"{len(seeds)} sequences of one prompt exceed the batch's {rows} rows")
        stop = [self.tokenizer.eot_id] if settings.stop_tokens is None else settings.stop_tokens
        sequences = [
            Sequence(
                prompt=list(prompt),
                settings=settings,
                generator=torch.Generator(device=self.model.device).manual_seed(seed),
                stream=TextStream(self.tokenizer, settings.stop) if text else None,
                stop_ids=frozenset(stop),
            )
            for seed in seeds
        ]
        if settings.max_new_tokens == 0:
            for s in sequences:
                s.finish_reason = "length"
                self.ended.append(Step(s, None, finish_reason="length"))
        else:
            self.waiting.append((list(prompt), sequences))
        return sequences

    @torch.inference_mode()
    def step(self) -> list[Step]:
        """One step: the running sequences' last tokens fed, waiting prompts run (a chunk of them),
        and every sequence's next token drawn. What each sequence got, in slot order."""
        steps, self.ended = self.ended, []
        for s in list(self.slots.owners):
            if s.cancelled.is_set():
                steps.append(self._end(s, "cancelled"))
        steps += self._drop_cancelled_waiting()
        if self.slots.owners:
            self._feed()
        self._join()
        ready = [s for s in self.slots.owners if s.logits is not None]
        if ready:
            steps += self._draw(ready)
        return steps

    def _drop_cancelled_waiting(self) -> list[Step]:
        """Sequences cancelled before they joined end without a slot (and prompts without any leave; a
        prefill whose sequences are all cancelled stops)."""
        steps = []
        for _, sequences in self.waiting:
            for s in sequences:
                if s.cancelled.is_set() and s.finish_reason is None:
                    s.finish_reason = "cancelled"
                    steps.append(Step(s, None, finish_reason="cancelled"))
        kept = [(p, seqs) for p, seqs in self.waiting if any(s.finish_reason is None for s in seqs)]
        if len(kept) < len(self.waiting):
            self.waiting = deque(kept)
        staged = [s for sequences in self.staged for s in sequences]
        if staged and all(s.cancelled.is_set() for s in staged):  # nobody waits for this prefill
            for s in staged:
                s.finish_reason = "cancelled"
                steps.append(Step(s, None, finish_reason="cancelled"))
            self.prefill, self.staged = None, []
        return steps

    def _feed(self) -> None:
        """Feed every running sequence its last token: one decoder call, one position for all."""
        for s in self.slots.owners:
            if self.slots.length(s) >= self.model.config.block_size:
                self._slide(s)
        owners = self.slots.owners
        ids = torch.tensor([s.tokens[-1] for s in owners], device=self.model.device)
        view = self.slots.step_view()
        logits = self._decoder(len(owners)).step(view, ids)
        self.slots.advance()
        for s, row in zip(owners, logits, strict=True):
            s.logits = row

    def _slide(self, s: Sequence) -> None:
        """The context is full: keep the most recent half of it (the last token is fed by the step)."""
        keep = s.history[-(self.model.tokens_that_fit() // 2) : -1]
        prefill = Prefill(self.model, [keep])
        prefill.run()
        self.slots.place(s, prefill.cache, 0)

    def _decoder(self, rows: int) -> Decoder:
        if rows not in self._decoders:
            self._decoders[rows] = self.decoder_for(self.model, rows)
        return self._decoders[rows]

    def _join(self) -> None:
        """Start a prefill of the waiting prompts that fit, run a chunk of it; once done, its sequences
        join the batch with their first logits."""
        if self.prefill is None:
            self._start_prefill()
        if self.prefill is None:
            return
        # alone, the prompts run whole; with others running, one chunk per step
        chunk = self.chunk if self.slots.owners and self.chunk else None
        logits = self.prefill.run(None if chunk is None else max(1, chunk // len(self.staged)))
        if logits is None:
            return
        for row, sequences in enumerate(self.staged):
            for s in sequences:
                if s.cancelled.is_set():
                    s.finish_reason = "cancelled"
                    self.ended.append(Step(s, None, finish_reason="cancelled"))
                    continue
                self.slots.place(s, self.prefill.cache, row)
                s.logits = logits[row]
        self.prefill, self.staged = None, []

    def _start_prefill(self) -> None:
        prompts: list[list[int]] = []
        free = self.slots.free
        while self.waiting:
            prompt, sequences = self.waiting[0]
            sequences = [s for s in sequences if s.finish_reason is None]
            if len(sequences) > free:
                break
            longest = max([len(prompt), *map(len, prompts)])
            if prompts and self.chunk and (len(prompts) + 1) * longest > self.chunk:
                break  # enough for one prefill: the running sequences would wait longer
            self.waiting.popleft()
            if sequences:
                prompts.append(prompt)
                self.staged.append(sequences)
                free -= len(sequences)
        if prompts:
            self.prefill = Prefill(self.model, prompts)

    def _draw(self, ready: list[Sequence]) -> list[Step]:
        """Each ready sequence's next token; sequences with the same settings draw together."""
        logits = torch.stack([s.logits for s in ready]).float()
        ids = torch.empty(len(ready), dtype=torch.long)
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(ready):
            st = s.settings
            key = (st.temperature, st.top_k, st.top_p, st.repetition_penalty, st.presence_penalty,
                   st.frequency_penalty)  # fmt: skip
            groups.setdefault(key, []).append(i)
        for rows in groups.values():
            group = [ready[i] for i in rows]
            settings = group[0].settings
            draws = None
            if settings.temperature > 0:  # one number from each sequence's own generator
                draws = torch.cat(
                    [torch.rand(1, generator=s.generator, device=s.generator.device) for s in group]
                )
            seen = self._state(group, "seen", settings.repetition_penalty != 1.0)
            counted = bool(settings.presence_penalty or settings.frequency_penalty)
            counts = self._state(group, "counts", counted)
            ids[rows] = choose_next(logits[rows], settings, draws, seen, counts).cpu()
        top = max((s.settings.logprobs or 0) for s in ready)
        wanted = any(s.settings.logprobs is not None for s in ready)
        if wanted:
            chosen, best_ids, best = log_probabilities(logits, ids.to(logits.device), top)
        steps = []
        for i, (s, token) in enumerate(zip(ready, ids.tolist(), strict=True)):
            step = self._take(s, token)
            if wanted and s.settings.logprobs is not None:
                step.logprob = float(chosen[i])
                n = s.settings.logprobs
                step.top_logprobs = list(zip(best_ids[i, :n].tolist(), best[i, :n].tolist(), strict=True))
            steps.append(step)
        return steps

    def _state(self, group: list[Sequence], name: str, needed: bool) -> Tensor | None:
        """The group's (B, V) penalty state, made on first use: `seen` starts with the prompt."""
        if not needed:
            return None
        V = self.model.config.vocab_size
        for s in group:
            if getattr(s, name) is None:
                device = self.model.device
                if name == "seen":
                    s.seen = torch.zeros(V, dtype=torch.bool, device=device)
                    s.seen[s.history] = True
                else:
                    s.counts = torch.bincount(torch.tensor(s.tokens, dtype=torch.long), minlength=V).to(
                        device
                    )
        return torch.stack([getattr(s, name) for s in group])

    def _take(self, s: Sequence, token: int) -> Step:
        """Add the drawn token to its sequence (or end it there); the text that became final."""
        s.logits = None
        if token in s.stop_ids:
            return self._end(s, "stop", Step(s, None))
        s.tokens.append(token)
        if s.seen is not None:
            s.seen[token] = True
        if s.counts is not None:
            s.counts[token] += 1
        step = Step(s, token, s.stream.push(token) if s.stream else "")
        if s.stream is not None and s.stream.stopped:
            return self._end(s, "stop", step)
        if len(s.tokens) >= s.settings.max_new_tokens:
            return self._end(s, "length", step)
        return step

    def _end(self, s: Sequence, reason: str, step: Step | None = None) -> Step:
        """The sequence leaves its slot now; its held-back text is released."""
        s.finish_reason = reason
        self.slots.leave(s)
        step = step or Step(s, None)
        if s.stream is not None and reason != "cancelled":
            step.text += s.stream.finish()
        step.finish_reason = reason
        return step
