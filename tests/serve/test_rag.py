"""`serve --rag`: a chat request is answered from retrieved passages, and the response carries their
sources in an extension field, whole and streamed, as the `openai` client receives them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from serve.servers import Server, start

from gptkit.generate.textmodel import TextModel
from gptkit.rag import Retriever, index

DOCS = {
    "apples.txt": "Apples grow on trees in orchards. Cider is pressed from apples in autumn.",
    "boats.txt": "A boat floats on water. Sailing boats are pushed by the wind across the sea.",
    "cats.txt": "Cats are small carnivorous mammals. A cat sleeps most of the day and hunts at night.",
}


@pytest.fixture(scope="module")
def rag_server(chat_model: TextModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("docs")
    for name, text in DOCS.items():
        (folder / name).write_text(text, encoding="utf-8")
    out = folder / "index"
    index(
        [str(folder)], out, embedder=f"model:{chat_model.source}", chunk_tokens=64, overlap=0, progress=False
    )
    with Retriever(out, k=2) as retriever:
        yield from start(chat_model, rag=retriever)


def test_chat_answer_carries_its_sources(rag_server: Server) -> None:
    client = rag_server.client()
    response = client.chat.completions.create(
        model=rag_server.model_id,
        messages=[{"role": "user", "content": "Where do apples grow?"}],
        max_tokens=4,
        temperature=0,
    )
    sources = response.model_extra["sources"]
    assert [s["number"] for s in sources] == [1, 2]
    for s in sources:
        text = Path(s["source"]).read_text(encoding="utf-8")
        assert 0 <= s["start"] < s["end"] <= len(text) and s["score"] <= 1.0001
    assert response.usage.prompt_tokens > 60  # the passages went into the prompt
    assert response.choices[0].message.content


def test_streamed_chunks_carry_the_sources(rag_server: Server) -> None:
    stream = rag_server.client().chat.completions.create(
        model=rag_server.model_id,
        messages=[{"role": "user", "content": "Do cats hunt at night?"}],
        max_tokens=4,
        temperature=0,
        stream=True,
    )
    chunks = list(stream)
    assert chunks and all(len(c.model_extra["sources"]) == 2 for c in chunks)
