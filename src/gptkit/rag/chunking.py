"""Documents into chunks that an embedder reads whole: token windows cut at paragraph, then sentence,
then word boundaries, overlapping by a set number of tokens.

Tokens are counted in the embedder's own tokenizer (what it truncates at is what matters), and every
chunk keeps its character offsets into its document, so that `text[start:end]` is the chunk exactly and
a citation can point at it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from gptkit.errors import GptkitError

Offsets = list[tuple[int, int]]  # the character span of each token

PARAGRAPH = re.compile(r"\n[ \t\r\f\v]*\n")
SENTENCE_END = re.compile(r"[.!?。！？][\"')\]»”’]*$")
SENTENCE_SPLIT = re.compile(r"(?<=[.!?。！？])\s+")


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of a document: `doc` names the document, `source` the input it came from."""

    source: str
    doc: str
    start: int
    end: int
    text: str
    sha256: str

    def record(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Hit:
    """A retrieved passage: its score (inner product of unit vectors) and where it is."""

    score: float
    source: str
    doc: str
    start: int
    end: int
    text: str

    def record(self) -> dict[str, Any]:
        return asdict(self)


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def views(chunk: str, window: int) -> list[str]:
    """The texts a chunk is embedded as: itself and each run of `window` consecutive sentences.

    A question usually matches one or two sentences of a passage; a vector per sentence window lets
    it match them without the rest of the passage diluting the match (the chunk scores its best).
    """
    if window < 1:
        return [chunk]
    sentences = [s for s in SENTENCE_SPLIT.split(chunk) if s.strip()]
    if len(sentences) <= window:
        return [chunk]
    return [chunk] + [" ".join(sentences[i : i + window]) for i in range(len(sentences) - window + 1)]


def check_settings(chunk_tokens: int, overlap: int, limit: int) -> None:
    """Chunks longer than the embedder reads would be cut silently; an overlap of half a chunk or
    more would make every token appear in three chunks or loop."""
    if not 1 <= chunk_tokens <= limit:
        raise GptkitError(f"--chunk-tokens {chunk_tokens} is outside 1..{limit} (the embedder reads {limit})")
    if not 0 <= overlap < max(1, chunk_tokens // 2):
        raise GptkitError(
            f"--overlap {overlap} must be at least 0 and less than half of --chunk-tokens ({chunk_tokens})"
        )


def chunk_text(
    text: str,
    offsets: Offsets,
    count: Callable[[str], int],
    *,
    source: str,
    doc: str,
    chunk_tokens: int,
    overlap: int,
) -> list[Chunk]:
    """Cut `text` (tokenized as `offsets`) into chunks of at most `chunk_tokens` tokens.

    Each chunk is a window of tokens [s, e); the next starts at e - overlap. The end e is the last
    paragraph break in the window's second half, else the last sentence end, else the last space,
    else the window's end. `count` re-counts a chunk's own text (a cut inside a word can tokenize
    differently on its own), and a window is shortened until it fits.
    """
    n = len(offsets)
    chunks: list[Chunk] = []
    s = 0
    while s < n:
        e = n if n - s <= chunk_tokens else _best_end(text, offsets, s, s + chunk_tokens)
        while True:
            start, end = offsets[s][0], offsets[e - 1][1]
            if e - s <= 1 or count(text[start:end]) <= chunk_tokens:
                break
            e -= 1
        piece = text[start:end]
        chunks.append(Chunk(source, doc, start, end, piece, content_hash(piece)))
        if e >= n:
            break
        s = max(e - overlap, s + 1)
    return chunks


def _best_end(text: str, offsets: Offsets, s: int, limit: int) -> int:
    """The token index to end a window [s, limit) at: the strongest boundary in its second half."""
    low = s + max(1, (limit - s) // 2)
    space = sentence = None
    for e in range(limit, low - 1, -1):
        gap = text[offsets[e - 1][1] : offsets[e][0]]
        if PARAGRAPH.search(gap):
            return e
        if gap and sentence is None and SENTENCE_END.search(text[offsets[e - 1][0] : offsets[e - 1][1]]):
            sentence = e
        if gap and space is None:
            space = e
    return sentence or space or limit
