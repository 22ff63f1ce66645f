"""One source's documents in their global order on every rank: the ranks' tokenized documents,
exchanged in lockstep and interleaved back (a module of its own: it needs torch.distributed, which
`gptkit info` never loads through `gptkit.data.streams`)."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator
from typing import Any

import torch.distributed as dist

from gptkit.data.streams import Document, DocumentStream, Position
from gptkit.errors import GptkitError

EXCHANGE = 64  # documents each rank tokenizes and sends per exchange


class GlobalDocuments:
    """The documents of one source in their global order, the same on every rank.

    Each rank tokenizes its own documents; when the queue runs dry, every rank at once (they run
    the same logic on the same documents) sends its next `EXCHANGE` documents to all others, and
    they are interleaved back: rank r's k-th document is the (k * N + r)-th after the start. The
    epoch ends at the first rank that has no k-th document.
    """

    def __init__(self, stream: DocumentStream) -> None:
        self.stream = stream
        self.reader: Iterator[Document] | None = None
        self.queue: deque[Document] = deque()
        self.ended = False

    def start(self, position: Position) -> None:
        self.close()
        self.reader, self.ended = iter(self.stream.epoch(position)), False

    def next(self) -> Document | None:
        """The next document of the epoch and the position after it; None at the epoch's end, where
        this rank's reader has read the whole source (`stream.skipped` then counts all its bad rows)."""
        if not self.queue and not self.ended:
            self._exchange()
        if self.queue:
            return self.queue.popleft()
        if self.reader is not None:  # past another rank's last document: only rows that give none
            for _ in self.reader:
                pass
        return None

    def _exchange(self) -> None:
        assert self.reader is not None
        if self.stream.world_size == 1:
            parts = [list(itertools.islice(self.reader, EXCHANGE))]
        else:  # an error on one rank is raised on every rank, rather than leaving the others waiting
            try:
                mine: tuple[str, Any] = ("ok", list(itertools.islice(self.reader, EXCHANGE)))
            except GptkitError as e:
                mine = ("error", str(e))
            gathered: list[Any] = [None] * self.stream.world_size
            dist.all_gather_object(gathered, mine)
            errors = [msg for kind, msg in gathered if kind == "error"]
            if errors:
                raise GptkitError(errors[0])
            parts = [docs for _, docs in gathered]
        for k in range(EXCHANGE):
            for docs in parts:
                if k >= len(docs):
                    self.ended = True
                    return
                self.queue.append(docs[k])

    def close(self) -> None:
        close = getattr(self.reader, "close", None)
        if close is not None:
            close()
        self.reader, self.queue, self.ended = None, deque(), False
