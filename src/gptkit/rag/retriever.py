"""`Retriever(INDEX).search(question, k)`: the passages of an index nearest a question."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gptkit.errors import GptkitError
from gptkit.rag.chunking import Chunk, Hit
from gptkit.rag.compose import Source, completion_prompt, fit
from gptkit.rag.embedders import Embedder, make_embedder, truncate_query
from gptkit.rag.indexing import read_chunks, read_meta
from gptkit.rag.stores import open_store
from gptkit.templates import ChatTemplate
from gptkit.tokenizer import Tokenizer

if TYPE_CHECKING:
    from gptkit.generate.textmodel import TextModel

DEFAULT_K = 3  # passages put into a prompt


def check_k(k: int) -> int:
    if k < 1:
        raise GptkitError(f"-k {k}: ask for at least 1 passage")
    return k


class Retriever:
    """An index opened for queries. `embedder` names the one to query through (default: the index's);
    another than the index was built with is refused, since its vectors live in another space."""

    def __init__(
        self,
        index: str | Path,
        embedder: str | Embedder | None = None,
        device: str = "cpu",
        k: int = DEFAULT_K,
    ) -> None:
        self.k = check_k(k)  # passages composed into a prompt
        self.index = Path(index)
        self.meta = read_meta(self.index)
        built = self.meta["embedder"]
        if isinstance(embedder, str) and embedder != built:
            raise GptkitError(
                f"index {str(self.index)!r} was built with embedder {built!r}; it cannot be queried through "
                f"{embedder!r} (its vectors live in another space); query with --embedder {built} or index "
                "again"
            )
        self.embedder: Embedder = (
            embedder
            if embedder is not None and not isinstance(embedder, str)
            else make_embedder(built, device)
        )
        if self.embedder.identity != self.meta["embedder_id"]:
            raise GptkitError(
                f"index {str(self.index)!r} was built with {built} ({self.meta['embedder_id']}), but that "
                f"embedder is now {self.embedder.identity}; index the documents again"
            )
        folder = self.index / self.meta["data"]
        self.chunks: list[Chunk] = read_chunks(folder)
        self.owners = np.load(folder / "owners.npy")  # the chunk of each vector
        self.views = int(np.bincount(self.owners).max()) if len(self.owners) else 1
        self.store = open_store(self.meta["store"], folder)

    def __len__(self) -> int:
        return len(self.chunks)

    def search(self, question: str, k: int = 5) -> list[Hit]:
        """The k passages nearest `question`, best first (fewer if the index holds fewer)."""
        return self.search_many([question], k)[0]

    def search_many(self, questions: list[str], k: int = 5) -> list[list[Hit]]:
        check_k(k)
        if any(not q.strip() for q in questions):
            raise GptkitError("the question is empty; ask something")
        vectors = self.embedder.encode([truncate_query(self.embedder, q) for q in questions])
        # a chunk has at most `views` vectors, so the best k * views vectors hold the best k chunks,
        # each first met at its best vector: its score
        scores, ids = self.store.search(vectors, min(k * self.views, len(self.owners)))
        out = []
        for row_scores, row_ids in zip(scores, ids, strict=True):
            hits: list[Hit] = []
            seen: set[int] = set()
            for score, i in zip(row_scores, row_ids, strict=True):
                if i < 0 or (owner := int(self.owners[i])) in seen:
                    continue
                seen.add(owner)
                c = self.chunks[owner]
                hits.append(Hit(float(score), c.source, c.doc, c.start, c.end, c.text))
                if len(hits) == k:
                    break
            out.append(hits)
        return out

    def augment(self, prompt: str, model: TextModel, max_new_tokens: int) -> tuple[str, list[Source]]:
        """The whole prompt for `model` to answer `prompt` from the top passages (its chat template,
        if it has one), within its context less the reply's room; and the sources it cites."""
        stored = model.chat_template
        template = ChatTemplate.from_dict(stored, model.source or "the checkpoint") if stored else None
        context = model.model.tokens_that_fit()
        budget = context - min(max_new_tokens, context // 2)
        hits = self.search(prompt, self.k)
        return fit(prompt, hits, completion_prompt(template), model.tokenizer, budget)

    def message(self, question: str, tokenizer: Tokenizer, room: int) -> tuple[str, list[Source]]:
        """A chat turn's user message (passages and question) within `room` tokens, and its sources."""
        return fit(question, self.search(question, self.k), lambda content: content, tokenizer, room)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Retriever:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
