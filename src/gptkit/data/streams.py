"""Documents of one source as token arrays, read in a fixed order, with a position to resume from.

A source is a prepared shard folder (its train split, cut at end-of-text), or raw text: text, jsonl or
parquet files or folders, or `hf:NAME[:CONFIG][@SPLIT]`, read by `data.sources` (the readers of
`prepare`) and tokenized by worker processes running `prepare`'s tokenizer code. Under several
processes, rank r keeps the documents whose index is r modulo the number of processes, so the ranks'
parts are disjoint. The position is the number of this rank's documents taken in the current epoch:
a resumed stream reads past that many documents without tokenizing them.
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


def is_prepared(path: str) -> bool:
    return not path.startswith("hf:") and (Path(path) / "meta.json").is_file()


class DocumentStream:
    """The documents of one source for one rank: `epoch(e, skip)` iterates epoch `e` from `skip`."""

    def __init__(
        self,
        config: SourceConfig,
        tokenizer: Tokenizer,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 1,
        skips: SkipLog | None = None,
    ) -> None:
        self.config, self.tokenizer = config, tokenizer
        self.rank, self.world_size, self.workers = rank, world_size, workers
        self.skips = skips or SkipLog(False)
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

    def epoch(self, skip: int = 0) -> Iterator[np.ndarray]:
        """This rank's documents, each ending with end-of-text, after the first `skip` of them."""
        if self.prepared is not None:
            return itertools.islice(self._mine(self._prepared_documents()), skip, None)
        texts = itertools.islice(self._mine(self._texts()), skip, None)
        return self._named(self._tokenized(texts))

    def _named(self, items: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        """A bad document's error (from a reader, or the tokenizer in a worker) names the source."""
        try:
            yield from items
        except GptkitError as e:
            raise GptkitError(f"source {self.name!r}: {e}") from None

    def _mine(self, items: Iterator) -> Iterator:
        return itertools.islice(items, self.rank, None, self.world_size)

    def _prepared_documents(self) -> Iterator[np.ndarray]:
        assert self.prepared is not None
        eot = self.tokenizer.eot_id
        for shard in self.prepared.shards("train"):
            start = 0
            for block in range(0, len(shard), SHARD_READ):
                chunk = np.asarray(shard[block : block + SHARD_READ])
                for end in np.flatnonzero(chunk == eot) + block:
                    yield np.array(shard[start : end + 1])
                    start = end + 1
            if start < len(shard):  # a shard's last document may end without end-of-text
                yield np.concatenate([shard[start:], np.array([eot], dtype=shard.dtype)])

    def _texts(self) -> Iterator[tuple[str, bool]]:
        """Pieces of text after the filter: (text, ends its document)."""
        lo, hi = self.config.filter.min_chars, self.config.filter.max_chars
        for src in self.sources:
            for piece in src.pieces(self.config.text_field, self.skips):
                if len(piece.text) >= lo:
                    yield (piece.text if hi is None else piece.text[:hi]), piece.last

    def _tokenized(self, texts: Iterator[tuple[str, bool]]) -> Iterator[np.ndarray]:
        """Token arrays in input order; with workers, a few tasks per worker in flight at most."""
        tasks = _chunks(texts, DOCS_PER_TASK)
        init = (self.tokenizer.describe(), self.dtype.str)
        if self.workers == 1:
            prepare._init_worker(*init)
            for task in tasks:
                yield from _encode(task)
            return
        ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
        pool = ProcessPoolExecutor(
            self.workers, mp_context=ctx, initializer=prepare._init_worker, initargs=(*init, os.getpid())
        )
        inflight: deque[Future[list[np.ndarray]]] = deque()
        with prepare._main_importable(), pool:
            try:
                for task in tasks:
                    inflight.append(pool.submit(_encode, task))
                    if len(inflight) >= self.workers * prepare.INFLIGHT_PER_WORKER:
                        yield from inflight.popleft().result()
                while inflight:
                    yield from inflight.popleft().result()
            finally:
                for f in inflight:
                    f.cancel()


def _chunks(items: Iterator[tuple[str, bool]], size: int) -> Iterator[list[tuple[str, bool]]]:
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
