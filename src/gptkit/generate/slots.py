"""One key/value cache that sequences join and leave: the slots of a changing batch.

All sequences share one timeline, `pos`: the position every one of them writes at the next step,
which is what `KVCache`, `GPT.forward` and gptkit's CPU kernel take. A sequence of length L joins at
[pos - L, pos) of a free row (its slot), with `pad = pos - L` positions of left padding in front
that no query sees and positions count from, so it gets the logits it would get alone. Its keys and
values were computed beforehand by a `Prefill` (its prompt through `GPT.forward` into a cache of its
own, a chunk at a time, so the running sequences wait at most one chunk) and are copied in.

Occupied slots are the first rows, so a step runs on a view of exactly them (`KVCache.rows`); a
sequence that leaves is replaced by the last one. A sequence longer than `pos` moves the others
right to make room in front; when `pos` reaches the end of the cache, every row moves left by the
smallest padding (`step_view`): a sequence is at most a context long, so a cache of at least a
context always frees room.
"""

from __future__ import annotations

from typing import Generic, TypeVar

import torch
from torch import Tensor

from gptkit.errors import GptkitError
from gptkit.model import GPT, KVCache

T = TypeVar("T")


class Prefill:
    """Prompts run through the model into a cache of their own (left-padded), a chunk at a time."""

    def __init__(self, model: GPT, prompts: list[list[int]]) -> None:
        longest = max(map(len, prompts))
        self.model = model
        self.idx = torch.tensor([[0] * (longest - len(p)) + p for p in prompts], device=model.device)
        self.cache = model.new_cache(len(prompts), model.n_prefix + longest)
        self.cache.set_padding(torch.tensor([longest - len(p) for p in prompts]))
        self.done = 0  # positions of the padded rows already run

    @property
    def remaining(self) -> int:
        return self.idx.size(1) - self.done

    def run(self, tokens: int | None = None) -> Tensor | None:
        """Run the next `tokens` positions (all that remain if None); once all are run, the logits
        (B, V) of every prompt's next token, else None."""
        end = self.idx.size(1) if tokens is None else min(self.idx.size(1), self.done + max(tokens, 1))
        logits = self.model(self.idx[:, self.done : end], cache=self.cache, last_only=True)[:, -1]
        self.done = end
        return logits if self.remaining == 0 else None


class Slots(Generic[T]):
    """A cache of `rows` slots and `max_len` positions; `owners[i]` is the sequence in slot i."""

    def __init__(self, model: GPT, rows: int, max_len: int) -> None:
        c = model.config
        self.cache = KVCache(c.n_layer, rows, c.kv_heads, c.head_dim, max_len, model.device, model.dtype)
        self.pos = 0
        self.pad = torch.zeros(rows, dtype=torch.long)  # where each slot's sequence starts
        self.owners: list[T] = []
        self._views: dict[int, KVCache] = {}  # one per batch size: a decoder keeps its addresses

    @property
    def free(self) -> int:
        return self.cache.batch_size - len(self.owners)

    def length(self, owner: T) -> int:
        """Positions the owner's sequence takes (its prefix, prompt and tokens fed so far)."""
        return self.pos - int(self.pad[self.owners.index(owner)])

    def place(self, owner: T, staged: KVCache, row: int) -> None:
        """Put sequence `row` of `staged` (its positions after its padding) at [pos - L, pos): in the
        owner's slot if it has one (a sequence that slid its window), else in a free one."""
        start = 0 if staged.pad is None else int(staged.pad[row])
        n = staged.pos - start
        if n > self.cache.max_len:
            raise GptkitError(f"a sequence of {n} positions does not fit a cache of {self.cache.max_len}")
        if n > self.pos:
            self._shift(n - self.pos)
        if owner in self.owners:
            slot = self.owners.index(owner)
        elif self.free:
            slot = len(self.owners)
            self.owners.append(owner)
        else:
            raise GptkitError(f"all {self.cache.batch_size} slots are taken")
        for dst, src in zip(self.cache.k + self.cache.v, staged.k + staged.v, strict=True):
            dst[slot, :, self.pos - n : self.pos] = src[row, :, start : staged.pos]
        self.pad[slot] = self.pos - n

    def leave(self, owner: T) -> None:
        """Free the owner's slot at once; the last slot's sequence moves into it."""
        slot, last = self.owners.index(owner), len(self.owners) - 1
        if slot != last:
            start = int(self.pad[last])
            for t in self.cache.k + self.cache.v:
                t[slot, :, start : self.pos] = t[last, :, start : self.pos]
            self.pad[slot] = self.pad[last]
            self.owners[slot] = self.owners[last]
        self.owners.pop()
        if not self.owners:
            self.pos = 0

    def step_view(self) -> KVCache:
        """The cache of the occupied slots, ready for a step that writes position `pos` (room is made
        first if the cache is full); `advance` after the step."""
        n = len(self.owners)
        if self.pos == self.cache.max_len:
            room = int(self.pad[:n].min())
            if room == 0:
                raise GptkitError(
                    f"a sequence fills the cache's {self.cache.max_len} positions; it must slide first"
                )
            self._shift(-room)
        view = self._views.get(n)
        if view is None:
            view = self._views[n] = self.cache.rows(n)
        view.pos = self.pos
        view.set_padding(self.pad[:n].clone())
        return view

    def advance(self) -> None:
        self.pos += 1

    def _shift(self, delta: int) -> None:
        """Move every sequence `delta` positions along the timeline (right if > 0, left if < 0)."""
        n = len(self.owners)
        if n:
            start = int(self.pad[:n].min())
            for t in self.cache.k + self.cache.v:
                t[:n, :, start + delta : self.pos + delta] = t[:n, :, start : self.pos].clone()
            self.pad[:n] += delta
        self.pos += delta
