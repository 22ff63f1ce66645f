"""Batches of token windows from prepared shards, with a state that makes resume exact.

The trainer sees a data source only through `TokenSource`: `next_batch()`, `state_dict()`,
`load_state_dict()`. A source restored from a state yields exactly the batches the original
would have yielded next. Every rank draws the same global batch and keeps its own slice, so the
state is the same on all ranks and a run can resume with another number of processes.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch

from gptkit.data.batch import Batch
from gptkit.errors import GptkitError


class TokenSource(Protocol):
    def next_batch(self) -> Batch: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _windows(
    shards: list[np.ndarray], starts: list[tuple[int, int]], block_size: int, vocab_size: int | None = None
) -> Batch:
    """Stack windows of block_size + 1 tokens; the targets are the ids shifted by one.

    With `vocab_size`, an id outside the vocabulary (a damaged shard) is a one-line error naming the
    shard, not an IndexError deep in the embedding; the max of a batch costs next to nothing."""
    rows = np.stack([np.asarray(shards[s][o : o + block_size + 1], dtype=np.int64) for s, o in starts])
    if vocab_size is not None and rows.size and int(rows.max()) >= vocab_size:
        row, col = divmod(int(rows.argmax()), rows.shape[1])
        shard, offset = starts[row]
        name = getattr(shards[shard], "filename", None) or f"shard {shard}"
        raise GptkitError(
            f"{name} holds token id {int(rows.max())} at token {offset + col}, but the vocabulary has "
            f"{vocab_size} ids; the data is damaged: prepare it again (gptkit info DATA --verify checks "
            "every shard's sha256)"
        )
    data = torch.from_numpy(rows)
    return Batch(data[:, :-1], data[:, 1:])


def _usable(shards: list[np.ndarray], block_size: int, split: str) -> np.ndarray:
    """Number of window starts in each shard; refuse data shorter than one window."""
    counts = np.array([max(0, len(s) - block_size) for s in shards], dtype=np.int64)
    if counts.sum() == 0:
        longest = max((len(s) for s in shards), default=0)
        raise GptkitError(
            f"the {split} split's longest shard has {longest} tokens, fewer than block_size + 1 "
            f"({block_size + 1}); prepare more data or lower model.block_size"
        )
    return counts


class ShardBatches:
    """Micro-batches of `batch_size` windows for this rank, drawn from a split's shards.

    random: windows at uniformly random positions (each start position equally likely).
    ordered: consecutive non-overlapping windows through each shard, the shard order reshuffled
    from the seed at every epoch.
    """

    def __init__(
        self,
        shards: list[np.ndarray],
        batch_size: int,
        block_size: int,
        mode: str = "random",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        split: str = "train",
        vocab_size: int | None = None,
    ) -> None:
        self.shards, self.batch_size, self.block_size = shards, batch_size, block_size
        self.vocab_size = vocab_size
        self.mode, self.seed, self.rank, self.world_size = mode, seed, rank, world_size
        self.counts = _usable(shards, block_size, split)
        self.cum = np.cumsum(self.counts)
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.epoch, self.shard_pos, self.offset = 0, 0, 0
        self.order = self._order(0)

    def _order(self, epoch: int) -> np.ndarray:
        rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
        return rng.permutation(len(self.shards))

    def next_batch(self) -> Batch:
        n = self.batch_size * self.world_size  # the global micro-batch, the same on every rank
        starts = self._random_starts(n) if self.mode == "random" else self._ordered_starts(n)
        mine = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return _windows(self.shards, mine, self.block_size, self.vocab_size)

    def _random_starts(self, n: int) -> list[tuple[int, int]]:
        flat = self.rng.integers(0, self.cum[-1], size=n)
        shard = np.searchsorted(self.cum, flat, side="right")
        offset = flat - (self.cum[shard] - self.counts[shard])
        return [(int(s), int(o)) for s, o in zip(shard, offset, strict=True)]

    def _ordered_starts(self, n: int) -> list[tuple[int, int]]:
        out = []
        while len(out) < n:
            shard = int(self.order[self.shard_pos])
            if self.offset + self.block_size + 1 <= len(self.shards[shard]):
                out.append((shard, self.offset))
                self.offset += self.block_size
                continue
            self.offset = 0
            self.shard_pos += 1
            if self.shard_pos == len(self.order):
                self.epoch, self.shard_pos = self.epoch + 1, 0
                self.order = self._order(self.epoch)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "seed": self.seed,
            "rng": self.rng.bit_generator.state,
            "epoch": self.epoch,
            "shard_pos": self.shard_pos,
            "offset": self.offset,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "mode" not in state:
            raise GptkitError(
                "the checkpoint's data state is for streamed sources (data.stream=true), the config reads "
                "prepared shards; resume with the checkpoint's data settings"
            )
        if state["mode"] != self.mode or state["seed"] != self.seed:
            raise GptkitError(
                f"the checkpoint's data state is for sampling={state['mode']} seed={state['seed']}, "
                f"the config says sampling={self.mode} seed={self.seed}; use the checkpoint's settings"
            )
        self.rng.bit_generator.state = state["rng"]
        self.epoch, self.shard_pos, self.offset = state["epoch"], state["shard_pos"], state["offset"]
        self.order = self._order(self.epoch)


def fixed_batches(
    shards: list[np.ndarray], n_batches: int, batch_size: int, block_size: int, vocab_size: int | None = None
) -> list[Batch]:
    """The same val batches every time: windows spread evenly over the whole split."""
    counts = _usable(shards, block_size, "val")
    cum = np.cumsum(counts)
    n = n_batches * batch_size
    flat = np.linspace(0, cum[-1] - 1, num=n).astype(np.int64) if n <= cum[-1] else np.arange(n) % cum[-1]
    shard = np.searchsorted(cum, flat, side="right")
    offset = flat - (cum[shard] - counts[shard])
    starts = [(int(s), int(o)) for s, o in zip(shard, offset, strict=True)]
    return [
        _windows(shards, starts[i * batch_size : (i + 1) * batch_size], block_size, vocab_size)
        for i in range(n_batches)
    ]
