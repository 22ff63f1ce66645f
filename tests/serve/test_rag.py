"""`serve --rag`: a chat request, and each prompt of a completions request, is answered from retrieved
passages, and the response carries their sources in an extension field, whole and streamed, as the
`openai` client receives them; `"rag": false` opts a request out."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
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
def retriever(chat_model: TextModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Retriever]:
    folder = tmp_path_factory.mktemp("docs")
    for name, text in DOCS.items():
        (folder / name).write_text(text, encoding="utf-8")
    out = folder / "index"
    index(
        [str(folder)], out, embedder=f"model:{chat_model.source}", chunk_tokens=64, overlap=0, progress=False
    )
    with Retriever(out, k=2) as opened:
        yield opened


@pytest.fixture(scope="module")
def rag_server(chat_model: TextModel, retriever: Retriever) -> Iterator[Server]:
    yield from start(chat_model, rag=retriever)


def composed(retriever: Retriever, model: TextModel, prompt: str, max_tokens: int) -> tuple[int, list[Any]]:
    """What `gptkit sample --rag` would give the model for `prompt`: its tokens, and its sources."""
    text, sources = retriever.augment(prompt, model, max_tokens)
    return len(model.tokenizer.encode(text)), [s.record() for s in sources]


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


def test_a_completion_prompt_is_composed_from_its_passages(rag_server: Server, retriever: Retriever) -> None:
    prompt = "Where do apples grow?"
    response = rag_server.client().completions.create(
        model=rag_server.model_id, prompt=prompt, max_tokens=4, temperature=0
    )
    tokens, sources = composed(retriever, rag_server.model, prompt, 4)
    assert response.model_extra["sources"] == sources and [s["number"] for s in sources] == [1, 2]
    assert response.usage.prompt_tokens == tokens > len(rag_server.model.tokenizer.encode(prompt)) + 60
    assert response.choices[0].text


def test_each_prompt_of_a_list_retrieves_on_its_own(rag_server: Server, retriever: Retriever) -> None:
    prompts = ["Where do apples grow?", "What pushes a sailing boat?"]
    response = rag_server.client().completions.create(
        model=rag_server.model_id, prompt=prompts, max_tokens=4, temperature=0, n=2
    )
    expected = [composed(retriever, rag_server.model, q, 4) for q in prompts]
    assert response.model_extra["sources"] == [sources for _, sources in expected]
    assert [s["doc"] for s in expected[0][1]] != [s["doc"] for s in expected[1][1]]  # not one list twice
    assert response.usage.prompt_tokens == sum(tokens for tokens, _ in expected)
    assert len(response.choices) == 4


def test_streamed_completion_chunks_carry_the_sources(rag_server: Server, retriever: Retriever) -> None:
    prompt = "Do cats hunt at night?"
    stream = rag_server.client().completions.create(
        model=rag_server.model_id, prompt=prompt, max_tokens=4, temperature=0, stream=True
    )
    chunks = list(stream)
    expected = composed(retriever, rag_server.model, prompt, 4)[1]
    assert chunks and all(c.model_extra["sources"] == expected for c in chunks)


def test_a_request_opts_out_with_rag_false(rag_server: Server) -> None:
    client, prompt = rag_server.client(), "Where do apples grow?"
    plain = client.completions.create(
        model=rag_server.model_id, prompt=prompt, max_tokens=4, temperature=0, extra_body={"rag": False}
    )
    assert "sources" not in (plain.model_extra or {})
    assert plain.usage.prompt_tokens == len(rag_server.model.tokenizer.encode(prompt))
    chat = client.chat.completions.create(
        model=rag_server.model_id,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=4,
        temperature=0,
        extra_body={"rag": False},
    )
    assert "sources" not in (chat.model_extra or {}) and chat.usage.prompt_tokens < 60


def test_rag_true_without_an_index_is_a_400(server: Server) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        server.client().completions.create(
            model=server.model_id, prompt="hello", max_tokens=2, extra_body={"rag": True}
        )
    assert e.value.body["param"] == "rag" and "--rag INDEX" in e.value.body["message"]
    body = {"model": server.model_id, "messages": [{"role": "user", "content": "hi"}], "rag": True}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "rag"
