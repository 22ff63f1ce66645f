"""Streamed training batches: sources shuffled, mixed at their weights and packed into windows.

Per source, documents flow from a `DocumentStream` into a shuffle buffer of `shuffle_buffer`
documents. A seeded generator picks the source of each next document with probability proportional
to weight / mean document length (so that token shares follow the weights), then a random document
of that source's buffer, whose place the source's next document takes. The packer fills windows:
`concat` cuts the concatenated documents into windows of block_size + 1 tokens (stride block_size,
as ordered shards are read); `best_fit` puts each document whole into the open window it fits
best (segments keep documents apart, the rest of a window is padding nobody learns from) and cuts
only documents longer than a window. Memory holds the buffers, the open windows and a few
tokenizing tasks, whatever the corpus size.

`state_dict()` holds everything a resume needs: per source its epoch, position and buffer, the
packer's open windows, the generator and the counters; a pipeline restored from it yields exactly
the batches the original would have yielded next.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from gptkit.config import DataConfig
from gptkit.data.batch import Batch
from gptkit.data.global_order import GlobalDocuments
from gptkit.data.sources import SkipLog
from gptkit.data.streams import DocumentStream, Position, skipped_before
from gptkit.errors import GptkitError
from gptkit.fused_loss import IGNORE_INDEX
from gptkit.tokenizer import Tokenizer


class SourceExhausted(GptkitError):
    """The mixture has no more documents: a source ran out under `stop`, or every source is spent.
    Training ends there like a finished run; the message says which source, after how many tokens."""


OPEN_WINDOWS = 16  # best_fit: windows filled at once; the fullest is sent when none has room


@dataclass
class SourceState:
    """One source's place in the pipeline (the same on every rank)."""

    docs: GlobalDocuments
    weight: float
    epochs: int  # epochs allowed before the source is exhausted (restart raises it)
    epoch: int = 0
    position: Position = None  # where the documents taken from the current epoch end (None: its start)
    reading: bool = False  # the reader stands at `position` (not state: rebuilt from epoch and position)
    active: bool = True
    docs_in: int = 0  # documents and tokens that entered the buffer (the mean length for the draw)
    tokens_in: int = 0
    tokens_out: int = 0  # tokens given to the packer: the source's share
    epoch_docs: int = 0  # documents in the current epoch, to catch a source with none
    skipped_epochs: int = 0  # bad rows skipped in the finished epochs (the current one's: in `position`)
    buffer: list[np.ndarray] = field(default_factory=list)

    @property
    def stream(self) -> DocumentStream:
        return self.docs.stream

    @property
    def skipped(self) -> int:
        """Bad rows skipped before `position`: those a resume from this state will not meet again
        (the reader runs ahead of it, through its read-ahead and the tokenizing workers)."""
        return self.skipped_epochs + skipped_before(self.position)

    def next_document(self) -> np.ndarray | None:
        """The next document of the source, over epochs; None when the allowed epochs are done."""
        while True:
            if not self.reading:
                if self.epoch >= self.epochs:
                    return None
                self.docs.start(self.position)
                self.reading = True
            got = self.docs.next()
            if got is None:
                if self.epoch_docs == 0:
                    raise GptkitError(
                        f"source {self.stream.name!r} has no documents after filtering; check the path, "
                        "text_field and filter (min_chars)"
                    )
                self.skipped_epochs += self.stream.skipped  # the reader has read the whole epoch
                self.close()
                self.epoch, self.position, self.epoch_docs = self.epoch + 1, None, 0
                continue
            doc, self.position = got
            if not len(doc):  # a piece of text that tokenizes to nothing
                continue
            doc = doc.astype(np.int32)  # held as is in the state (tensors share it: no copy a step)
            self.epoch_docs += 1
            self.docs_in += 1
            self.tokens_in += len(doc)
            return doc

    def close(self) -> None:
        self.docs.close()
        self.reading = False


class Packer:
    """Documents in, rows of `block_size` ids out (targets, and segments for best_fit)."""

    def __init__(self, block_size: int, mode: str, eot_id: int) -> None:
        self.block_size, self.mode, self.eot_id = block_size, mode, eot_id
        self.carry: list[np.ndarray] = []  # concat: tokens not yet in a full window
        self.carried = 0
        self.windows: list[list[np.ndarray]] = []  # best_fit: open windows, their documents in order
        self.ready: deque[tuple[np.ndarray, np.ndarray | None]] = deque()  # rows made, not yet taken
        self.documents = self.cut = self.padding = 0

    # -- in -------------------------------------------------------------------------------------

    def add(self, doc: np.ndarray) -> None:
        self.documents += 1
        if self.mode == "concat":
            self._add_concat(doc)
        else:
            self._add_best_fit(doc)

    def _add_concat(self, doc: np.ndarray) -> None:
        t = self.block_size
        before = self.carried
        self.carry.append(doc)
        self.carried += len(doc)
        if before // t != (before + len(doc) - 1) // t:  # the carry starts a window: ids of t each
            self.cut += 1
        if self.carried >= t + 1:
            flat = np.concatenate(self.carry)
            rows = (len(flat) - 1) // t  # windows of t + 1 tokens, t apart
            for k in range(rows):
                self.ready.append((flat[k * t : k * t + t + 1].astype(np.int64), None))
            rest = flat[rows * t :]
            self.carry, self.carried = [rest], len(rest)

    def _add_best_fit(self, doc: np.ndarray) -> None:
        t = self.block_size
        if len(doc) > t:
            self.cut += 1
            while len(doc) > t:
                self._emit([doc[:t]])
                doc = doc[t:]
        free = [t - sum(len(d) for d in w) for w in self.windows]
        fits = [i for i, f in enumerate(free) if f >= len(doc)]
        if fits:
            best = min(fits, key=lambda i: free[i])
            self.windows[best].append(doc)
            if free[best] == len(doc):
                self._emit(self.windows.pop(best))
            return
        if len(self.windows) >= OPEN_WINDOWS:
            fullest = min(range(len(free)), key=lambda i: free[i])
            self._emit(self.windows.pop(fullest))
        self.windows.append([doc])
        if len(doc) == t:
            self._emit(self.windows.pop())

    def _emit(self, docs: list[np.ndarray]) -> None:
        """A best_fit row: ids padded with end-of-text; each document's last position learns nothing
        (its next token belongs to another document), nor does the padding."""
        t = self.block_size
        ids = np.full(t, self.eot_id, dtype=np.int64)
        targets = np.full(t, IGNORE_INDEX, dtype=np.int64)
        segments = np.zeros(t, dtype=np.int64)
        at = 0
        for k, d in enumerate(docs):
            n = len(d)
            ids[at : at + n] = d
            targets[at : at + n - 1] = d[1:]
            segments[at : at + n] = k
            at += n
        segments[at:] = -1  # padding: its own segment
        self.padding += t - at
        self.ready.append((ids, np.stack([targets, segments])))

    # -- out ------------------------------------------------------------------------------------

    def row(self) -> tuple[np.ndarray, np.ndarray | None] | None:
        return self.ready.popleft() if self.ready else None

    def flush(self) -> None:
        """No more documents: send the open windows (best_fit); concat's short tail is dropped."""
        while self.windows:
            self._emit(self.windows.pop(0))

    def state_dict(self) -> dict[str, Any]:
        return {
            "carry": _pack_arrays(self.carry),
            "windows": [_pack_arrays(w) for w in self.windows],
            "ready": [
                {
                    "ids": torch.from_numpy(ids.copy()),
                    "extra": None if x is None else torch.from_numpy(x.copy()),
                }
                for ids, x in self.ready
            ],
            "counts": [self.documents, self.cut, self.padding],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.carry = _unpack_arrays(state["carry"])
        self.carried = sum(len(c) for c in self.carry)
        self.windows = [_unpack_arrays(w) for w in state["windows"]]
        self.ready = deque(
            (r["ids"].numpy().copy(), None if r["extra"] is None else r["extra"].numpy().copy())
            for r in state["ready"]
        )
        self.documents, self.cut, self.padding = state["counts"]


def _pack_arrays(arrays: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """A list of token arrays as two tensors (plain data: checkpoints load with weights_only)."""
    lengths = torch.tensor([len(a) for a in arrays], dtype=torch.int64)
    if not sum(len(a) for a in arrays):  # from_numpy of no tokens has stride 0: the digest refuses it
        return {"tokens": torch.zeros(0, dtype=torch.int64), "lengths": lengths}
    return {"tokens": torch.from_numpy(np.concatenate(arrays).astype(np.int64)), "lengths": lengths}


def _unpack_arrays(packed: dict[str, torch.Tensor]) -> list[np.ndarray]:
    flat = packed["tokens"].numpy()
    ends = np.cumsum(packed["lengths"].numpy())
    return [a.copy() for a in np.split(flat, ends[:-1])] if len(ends) else []


class StreamBatches:
    """Micro-batches of `batch_size` packed windows for this rank, from the mixture of sources.

    Ranks tokenize disjoint documents of every source and exchange them (`GlobalDocuments`), so every
    rank runs the same shuffle buffers, generator and packer on the same documents, makes the same
    global batch of `batch_size` x processes windows, and keeps its own slice, as `ShardBatches`
    does. The state is the same on every rank and holds no rank: a run resumes with any number of
    processes.
    """

    def __init__(
        self,
        data: DataConfig,
        tokenizer: Tokenizer,
        batch_size: int,
        block_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        skip_bad: bool | None = None,
    ) -> None:
        self.batch_size, self.block_size, self.seed = batch_size, block_size, seed
        self.rank, self.world_size = rank, world_size
        self.buffer_size, self.when_exhausted = data.shuffle_buffer, data.when_exhausted
        # whether bad rows are skipped, and the first few; their count goes with the sources' positions
        self.skips = SkipLog(data.skip_bad if skip_bad is None else skip_bad)
        configs = data.stream_sources()
        self.sources = [
            SourceState(
                GlobalDocuments(DocumentStream(c, tokenizer, rank, world_size, data.workers, self.skips)),
                c.weight,
                c.epochs,
            )
            for c in configs
        ]
        self.packer = Packer(block_size, data.pack, tokenizer.eot_id)
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.settings = {"sources": [c.path for c in configs], "pack": data.pack, "seed": seed}

    # -- the pipeline ---------------------------------------------------------------------------

    def _fill(self, s: SourceState) -> None:
        while len(s.buffer) < self.buffer_size:
            doc = s.next_document()
            if doc is None:
                return
            s.buffer.append(doc)

    def _pick_source(self) -> SourceState | None:
        while True:
            for s in self.sources:
                if s.active:
                    self._fill(s)
            live = [s for s in self.sources if s.active and s.buffer]
            spent = [s for s in self.sources if s.active and not s.buffer]
            if not spent:
                break
            for s in spent:
                self._exhausted(s)
        if not live:
            return None
        p = np.array([s.weight * s.docs_in / max(s.tokens_in, 1) for s in live])
        return live[int(self.rng.choice(len(live), p=p / p.sum()))]

    def _exhausted(self, s: SourceState) -> None:
        if self.when_exhausted == "restart":
            s.epochs = s.epoch + max(1, s.stream.config.epochs)
            return
        if self.when_exhausted == "stop":
            raise SourceExhausted(
                f"source {s.stream.name!r} ran out after {s.tokens_out:,} tokens and {s.epoch} epoch(s) "
                "(data.when_exhausted=stop)"
            )
        s.active = False

    def next_document(self) -> tuple[int, np.ndarray] | None:
        """(source index, document) drawn from the mixture; None when every source is spent."""
        s = self._pick_source()
        if s is None:
            return None
        i = int(self.rng.integers(len(s.buffer)))
        doc = s.buffer[i]
        s.buffer[i] = s.buffer[-1]
        s.buffer.pop()
        s.tokens_out += len(doc)
        return self.sources.index(s), doc

    def next_row(self) -> tuple[np.ndarray, np.ndarray | None]:
        while (row := self.packer.row()) is None:
            drawn = self.next_document()
            if drawn is None:
                self.packer.flush()
                if (row := self.packer.row()) is not None:
                    return row
                total = sum(s.tokens_out for s in self.sources)
                raise SourceExhausted(
                    f"every source ran out, after {total:,} tokens in all (data.when_exhausted=renormalise)"
                )
            self.packer.add(drawn[1])
        return row

    def next_batch(self) -> Batch:
        """This rank's slice of the global micro-batch (the same on every rank)."""
        rows = [self.next_row() for _ in range(self.batch_size * self.world_size)]
        rows = rows[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        if rows[0][1] is None:
            data = torch.from_numpy(np.stack([r for r, _ in rows]))
            return Batch(data[:, :-1], data[:, 1:])
        ids = torch.from_numpy(np.stack([r for r, _ in rows]))
        extra = np.stack([x for _, x in rows if x is not None])
        return Batch(ids, torch.from_numpy(extra[:, 0]), torch.from_numpy(extra[:, 1]))

    # -- reporting ------------------------------------------------------------------------------

    @property
    def skipped(self) -> int:
        """Bad rows skipped before the sources' positions: what a resume from this state will not meet
        again, so a stopped and resumed run counts each bad row once."""
        return sum(s.skipped for s in self.sources)

    def skip_log(self) -> SkipLog:
        """The skips as `prepare` reports them: that count, and the first few rows met."""
        return SkipLog(self.skips.skip_bad, self.skipped, self.skips.examples)

    def shares(self) -> dict[str, float]:
        """Each source's share of the tokens given to the packer so far (over all ranks)."""
        total = sum(s.tokens_out for s in self.sources) or 1
        return {s.stream.name: s.tokens_out / total for s in self.sources}

    # -- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "stream",
            "settings": self.settings,
            "rng": self.rng.bit_generator.state,
            "sources": [
                {
                    "epoch": s.epoch,
                    "position": s.position,
                    "epochs": s.epochs,
                    "active": s.active,
                    "counts": [s.docs_in, s.tokens_in, s.tokens_out, s.epoch_docs],
                    "skipped_epochs": s.skipped_epochs,
                    "buffer": [torch.from_numpy(d) for d in s.buffer],
                }
                for s in self.sources
            ],
            "packer": self.packer.state_dict(),
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "ranks" in state:
            raise GptkitError(
                "the checkpoint's streamed data state was written by an earlier gptkit (one per process); "
                "finish that run with the gptkit that made it, or start it again"
            )
        if state.get("kind") != "stream":
            raise GptkitError(
                "the checkpoint's data state is for prepared shards, the config streams (data.stream=true); "
                "resume with the checkpoint's data settings"
            )
        if state["settings"] != self.settings:
            raise GptkitError(
                f"the checkpoint's streamed data is {state['settings']}, the config's is {self.settings}; "
                "resume with the checkpoint's data.sources, data.pack and train.seed"
            )
        self.rng.bit_generator.state = state["rng"]
        for s, saved in zip(self.sources, state["sources"], strict=True):
            s.close()
            s.epoch, s.position, s.epochs, s.active = (
                saved["epoch"],
                saved["position"],
                saved["epochs"],
                saved["active"],
            )
            s.docs_in, s.tokens_in, s.tokens_out, s.epoch_docs = saved["counts"]
            s.skipped_epochs = saved.get("skipped_epochs", 0)
            s.buffer = [t.numpy() for t in saved["buffer"]]
        self.packer.load_state_dict(state["packer"])

    def close(self) -> None:
        for s in self.sources:
            s.close()
