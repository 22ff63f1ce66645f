"""Chunking in the embedder's own tokens: exact offsets, the overlap as set, the limit kept, unicode."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gptkit.errors import GptkitError
from gptkit.rag.chunking import check_settings, chunk_text, views
from gptkit.rag.embedders import ModelEmbedder

PARAGRAPH = (
    "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy. "
    "They were descended from Norse raiders and pirates from Denmark, Iceland and Norway. "
    "Their leader Rollo agreed to swear fealty to King Charles III of West Francia! "
    "Did the distinct identity of the Normans emerge in the first half of the 10th century?"
)
TEXT = "\n\n".join(PARAGRAPH.replace("Normans", f"Normans{i}") for i in range(12))
UNICODE = (
    "Ünïcödé test: naïve café, e\u0301 (combining acute), Å\u030a, 日本語のテキストです。中文句子。"
    " Emoji 👩‍👩‍👧‍👦 family, 🇫🇷 flag, 👍🏽 thumbs; Ελληνικά, русский, עברית, हिन्दी.\n\n"
) * 40


def chunks_of(embedder: Any, text: str, chunk_tokens: int, overlap: int) -> list:
    return chunk_text(
        text,
        embedder.offsets(text),
        embedder.count,
        source="doc.txt",
        doc="doc.txt",
        chunk_tokens=chunk_tokens,
        overlap=overlap,
    )


@pytest.fixture(scope="module")
def gpt2_embedder(base_ckpt: Path) -> ModelEmbedder:
    return ModelEmbedder(str(base_ckpt))


@pytest.fixture(params=["minilm", "model"])
def embedder(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue("minilm" if request.param == "minilm" else "gpt2_embedder")


@pytest.mark.parametrize("text", [TEXT, UNICODE], ids=["english", "unicode"])
def test_offsets_give_each_chunk_exactly(embedder: Any, text: str) -> None:
    chunks = chunks_of(embedder, text, 64, 16)
    assert len(chunks) > 5
    for c in chunks:
        assert text[c.start : c.end] == c.text
        assert embedder.count(c.text) <= 64  # within the limit, counted again on the chunk's own text
    assert not text[: chunks[0].start].strip() and not text[chunks[-1].end :].strip()
    covered = set()
    for c in chunks:
        covered.update(range(c.start, c.end))
    assert all(i in covered for i, ch in enumerate(text.rstrip()) if not ch.isspace())  # nothing lost


def test_overlap_is_as_set(embedder: Any) -> None:
    for overlap in (0, 8, 20):
        chunks = chunks_of(embedder, TEXT, 64, overlap)
        offsets = embedder.offsets(TEXT)
        starts = {start: i for i, (start, _) in enumerate(offsets)}
        ends = {end: i + 1 for i, (_, end) in enumerate(offsets)}
        for a, b in zip(chunks, chunks[1:], strict=False):
            assert ends[a.end] - starts[b.start] == overlap  # tokens shared by consecutive chunks


def test_cuts_at_paragraphs_then_sentences(minilm: Any) -> None:
    paragraph_tokens = minilm.count(PARAGRAPH.replace("Normans", "Normans0"))
    chunks = chunks_of(minilm, TEXT, paragraph_tokens + 5, 0)  # room for one paragraph and a bit more
    assert all(c.text.startswith("The Normans") and c.text.endswith("century?") for c in chunks)
    chunks = chunks_of(minilm, TEXT, paragraph_tokens - 5, 0)  # a paragraph does not fit: sentences
    assert all(c.text.rstrip()[-1] in ".!?" for c in chunks[:-1])


def test_minilm_limit_and_bad_settings(minilm: Any) -> None:
    assert minilm.limit == 254  # 256 word pieces, less [CLS] and [SEP]
    long = "word " * 2000
    chunks = chunks_of(minilm, long, minilm.limit, 32)
    assert max(minilm.count(c.text) for c in chunks) == minilm.limit
    with pytest.raises(GptkitError, match="outside 1..254"):
        check_settings(300, 32, minilm.limit)
    with pytest.raises(GptkitError, match="less than half"):
        check_settings(64, 32, minilm.limit)


def test_views_are_the_chunk_and_its_sentence_windows() -> None:
    assert views("One. Two.", 2) == ["One. Two."]
    assert views("One. Two! Three?", 2) == ["One. Two! Three?", "One. Two!", "Two! Three?"]
    assert views("One. Two! Three?", 0) == ["One. Two! Three?"]
