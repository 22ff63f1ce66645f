"""Documents of one source as token arrays, in a fixed global order, with positions to resume from.

A source is a prepared shard folder (its train or val split, cut at end-of-text), or raw text: text,
jsonl or parquet files or folders, or `hf:NAME[:CONFIG][@SPLIT]`, read by `data.sources` (the
readers of `prepare`) and tokenized by worker processes running `prepare`'s tokenizer code.

Under several processes, every rank reads the source but tokenizes only the documents whose index
(counted from where the epoch resumed) is its rank modulo the number of processes;
`gptkit.data.global_order.GlobalDocuments` then exchanges the ranks' tokenized documents in lockstep
and interleaves them back, so that every rank holds the same documents in the same order as one
process would. Each document comes with the position after it: where reading stands (file and byte
offset for jsonl, file, row group and row for parquet, the `datasets` iterator's state for `hf:`,
shard and token offset for a prepared folder, see `Source.pieces`) and the count of bad rows skipped
before it in the epoch (`data.skip_bad`). A resumed stream starts there, reading nothing before it,
with any number of processes.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gptkit.config import DataConfig, SourceConfig
from gptkit.data import prepare
from gptkit.data.shards import PreparedData, token_dtype
from gptkit.data.sources import SkipLog, resolve_sources
from gptkit.errors import GptkitError
from gptkit.tokenizer import Tokenizer, from_description, gpt2_tokenizer

DOCS_PER_TASK = 64  # documents sent to a tokenizing worker at a time
SHARD_READ = 1 << 20  # tokens of a prepared shard read at a time

Position = Any  # where reading stands in an epoch (plain data: it goes into checkpoints); None: its start
Document = tuple[np.ndarray, Position]  # a document's tokens and the position after it


def is_prepared(path: str) -> bool:
    return not path.startswith("hf:") and (Path(path) / "meta.json").is_file()


def skipped_before(position: Position) -> int:
    """The bad rows skipped in an epoch before `position` (a prepared folder's have none)."""
    return position.get("skipped", 0) if isinstance(position, dict) else 0


class DocumentStream:
    """The documents of one source that one rank tokenizes: `epoch(start)` iterates an epoch from a
    position; `split` is a prepared folder's split (raw sources name their split in the path)."""

    def __init__(
        self,
        config: SourceConfig,
        tokenizer: Tokenizer,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 1,
        skips: SkipLog | None = None,
        split: str = "train",
    ) -> None:
        self.config, self.tokenizer, self.split = config, tokenizer, split
        self.rank, self.world_size, self.workers = rank, world_size, workers
        self.skips = skips or SkipLog(False)  # whether to skip bad rows, and the first few of them
        self.skipped = 0  # bad rows the reader met in the epoch so far (it reads ahead of the documents)
        self.read = 0  # pieces or documents the readers gave (a resume reads none before its position)
        self.dtype = token_dtype(tokenizer.vocab_size)
        self.prepared = PreparedData.open(config.path) if is_prepared(config.path) else None
        if self.prepared is not None:
            self.prepared.check_tokenizer(
                tokenizer.fingerprint(), f"the run's tokenizer ({tokenizer.kind}; source {config.path!r})"
            )
            self.sources = []
        else:
            self.sources = resolve_sources([config.path])

    @property
    def name(self) -> str:
        return self.config.path

    def epoch(self, start: Position = None) -> Iterator[Document]:
        """This rank's documents after `start`, each ending with end-of-text, with the position after it."""
        self.skipped = skipped_before(start)
        if self.prepared is not None:
            return self._mine(self._prepared_documents(start))
        return self._named(self._tokenized(self._mine(self._texts(start))))

    def _named(self, items: Iterator[Document]) -> Iterator[Document]:
        """A bad document's error (from a reader, or the tokenizer in a worker) names the source."""
        try:
            yield from items
        except GptkitError as e:
            raise GptkitError(f"source {self.name!r}: {e}") from None

    def _mine(self, items: Iterator) -> Iterator:
        return itertools.islice(items, self.rank, None, self.world_size)

    def _prepared_documents(self, start: Position) -> Iterator[Document]:
        """Documents of the split's shards from `start` ([shard, token offset]), cut after end-of-text."""
        assert self.prepared is not None
        eot = self.tokenizer.eot_id
        first, offset = start if start is not None else (0, 0)
        for index, shard in enumerate(self.prepared.shards(self.split)):
            if index < first:
                continue
            begin = offset if index == first else 0
            for block in range(begin, len(shard), SHARD_READ):
                chunk = np.asarray(shard[block : block + SHARD_READ])
                for end in np.flatnonzero(chunk == eot) + block:
                    self.read += 1
                    yield np.array(shard[begin : end + 1]), [index, int(end) + 1]
                    begin = int(end) + 1
            if begin < len(shard):  # a shard's last document may end without end-of-text
                self.read += 1
                tail = np.concatenate([shard[begin:], np.array([eot], dtype=shard.dtype)])
                yield tail, [index, len(shard)]

    def _texts(self, start: Position) -> Iterator[tuple[str, bool, Position]]:
        """Pieces of text after the filter, from `start` ({"file", "at", "skipped"}: the file's reader
        position, and the bad rows before it): (text, ends its document, position after it)."""
        lo, hi = self.config.filter.min_chars, self.config.filter.max_chars
        first = start["file"] if start is not None else 0
        # this epoch's count, from the start's; the first few bad rows go to the run's examples
        log = SkipLog(self.skips.skip_bad, skipped_before(start), self.skips.examples)
        for index, src in enumerate(self.sources):
            if index < first:
                continue
            at = start["at"] if start is not None and index == first else None
            for piece in src.pieces(self.config.text_field, log, at):
                self.read += 1
                self.skipped = log.count
                if len(piece.text) >= lo:
                    text = piece.text if hi is None else piece.text[:hi]
                    yield text, piece.last, {"file": index, "at": piece.after, "skipped": log.count}
        self.skipped = log.count

    def _tokenized(self, texts: Iterator[tuple[str, bool, Position]]) -> Iterator[Document]:
        """Token arrays in input order; with workers, a few tasks per worker in flight at most."""
        tasks = _chunks(texts, DOCS_PER_TASK)
        init = (self.tokenizer.describe(), self.dtype.str)
        if self.workers == 1:
            prepare._init_worker(*init)
            for task in tasks:
                yield from zip(
                    _encode([(t, last) for t, last, _ in task]), [p for *_, p in task], strict=True
                )
            return
        ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
        pool = ProcessPoolExecutor(
            self.workers, mp_context=ctx, initializer=prepare._init_worker, initargs=(*init, os.getpid())
        )
        inflight: deque[tuple[Future[list[np.ndarray]], list[Position]]] = deque()
        with prepare._main_importable(), pool:
            try:
                for task in tasks:
                    inflight.append(
                        (pool.submit(_encode, [(t, last) for t, last, _ in task]), [p for *_, p in task])
                    )
                    if len(inflight) >= self.workers * prepare.INFLIGHT_PER_WORKER:
                        future, positions = inflight.popleft()
                        yield from zip(future.result(), positions, strict=True)
                while inflight:
                    future, positions = inflight.popleft()
                    yield from zip(future.result(), positions, strict=True)
            finally:
                for f, _ in inflight:
                    f.cancel()


def _chunks(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    while chunk := list(itertools.islice(items, size)):
        yield chunk


def _encode(task: list[tuple[str, bool]]) -> list[np.ndarray]:
    """In a worker (or in process): each text's tokens, end-of-text after the end of a document."""
    tok, dtype = prepare._worker_tokenizer, prepare._worker_dtype
    assert tok is not None and dtype is not None
    arrays = tok.encode_arrays([t for t, _ in task], dtype)
    eot = np.array([tok.eot_id], dtype=dtype)
    return [np.concatenate([ids, eot]) if last else ids for ids, (_, last) in zip(arrays, task, strict=True)]


@dataclass
class StreamTokenizer:
    """The one tokenizer of a streamed run: gpt2, or the tokenizer of the prepared sources."""

    kind: str
    description: dict[str, Any]
    vocab_size: int

    def tokenizer(self) -> Tokenizer:
        return from_description(self.description)

    def check_tokenizer(self, fingerprint: str, what: str = "the model") -> None:
        if self.tokenizer().fingerprint() != fingerprint:
            raise GptkitError(
                f"the streamed sources are tokenized with {self.kind}, another tokenizer than {what}'s; "
                "set data.tokenizer (and the prepared sources) to the checkpoint's tokenizer"
            )


def stream_tokenizer(data: DataConfig) -> StreamTokenizer:
    """`data.tokenizer` for raw sources; prepared sources must have been made with that tokenizer
    (char and bpe are built by `gptkit prepare`, so a streamed char/bpe run names a prepared source)."""
    prepared = [c.path for c in data.stream_sources() if is_prepared(c.path)]
    if prepared:
        tok = PreparedData.open(prepared[0]).tokenizer()
        if tok.kind != data.tokenizer:
            raise GptkitError(
                f"source {prepared[0]!r} was prepared with the {tok.kind} tokenizer, but data.tokenizer is "
                f"{data.tokenizer}; all sources of a run share one tokenizer: set data.tokenizer={tok.kind} "
                "or prepare the source again"
            )
    elif data.tokenizer == "gpt2":
        tok = gpt2_tokenizer()
    else:
        raise GptkitError(
            f"data.tokenizer={data.tokenizer} is built from text by gptkit prepare; prepare one source "
            f"with --tokenizer {data.tokenizer} and list it among data.sources, or use data.tokenizer=gpt2"
        )
    return StreamTokenizer(tok.kind, tok.describe(), tok.vocab_size)
