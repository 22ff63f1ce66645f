"""The composer and the commands that answer with sources: `rag ask`, `sample --rag`, `chat --rag`,
and `TextModel.generate(..., rag=retriever)`, all through the one sampler."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from rag.parts import gptkit_cli

import gptkit
from gptkit.generate.textmodel import Answer
from gptkit.rag import Retriever

QUESTION = "What is the capital of Victoria?"


@pytest.fixture(scope="module")
def retriever(squad_faiss: Path, minilm: Any) -> Retriever:
    return Retriever(squad_faiss, embedder=minilm, k=5)


@pytest.mark.parametrize("max_new_tokens", [8, 64])
def test_prompt_fits_and_drops_least_relevant_passages(
    retriever: Retriever, base_ckpt: Path, max_new_tokens: int
) -> None:
    model = gptkit.load(base_ckpt, device="cpu")
    context = model.model.tokens_that_fit()
    prompt, sources = retriever.augment(QUESTION, model, max_new_tokens)
    assert len(model.tokenizer.encode(prompt)) <= context - min(max_new_tokens, context // 2)
    hits = retriever.search(QUESTION, 5)
    assert 1 <= len(sources) < len(hits)  # 256 tokens hold some, not all five: the last ones went
    for source, hit in zip(sources, hits, strict=False):  # the kept ones are the most relevant, in order
        assert (source.doc, source.start, source.end) == (hit.doc, hit.start, hit.end)
        assert f"[{source.number}] {hit.text}" in prompt  # a citation's number is its passage, whole
    assert f"\n[{len(sources) + 1}] " not in prompt and prompt.endswith(f"Question: {QUESTION}\nAnswer:")


def test_prompt_uses_the_models_template(retriever: Retriever, tuned_ckpt: Path) -> None:
    model = gptkit.load(tuned_ckpt, device="cpu")
    prompt, sources = retriever.augment(QUESTION, model, 16)
    assert prompt.startswith("Below is an instruction") and "### Instruction:\nAnswer the question" in prompt
    assert prompt.endswith(f"Question: {QUESTION}\n\n### Response:\n") and sources


def test_generate_with_rag_is_the_sampler_on_the_composed_prompt(
    retriever: Retriever, base_ckpt: Path
) -> None:
    model = gptkit.load(base_ckpt, device="cpu")
    answer = model.generate(QUESTION, rag=retriever, max_new_tokens=6, temperature=0)
    assert isinstance(answer, Answer) and answer.sources[0].doc.endswith("#4/5")  # Victoria's first paragraph
    prompt, _ = retriever.augment(QUESTION, model, 6)
    assert str(answer) == model.generate(prompt, max_new_tokens=6, temperature=0)


SOURCE_LINE = re.compile(
    r"^\[(\d)\] \S+squad\S+\.json \(\S+#(\d+)/(\d+)\), characters (\d+)-(\d+), score 0\.\d{3}$"
)


def source_lines(stdout: str) -> list[re.Match]:
    return [m for line in stdout.splitlines() if (m := SOURCE_LINE.match(line))]


def test_rag_ask_prints_sources(base_ckpt: Path, squad_faiss: Path) -> None:
    done = gptkit_cli(
        "rag", "ask", str(base_ckpt), str(squad_faiss), QUESTION, "-k", "2", "--max-new-tokens", "4",
        "--temperature", "0",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "\nSources:\n" in done.stdout
    lines = source_lines(done.stdout)
    assert [m.group(1) for m in lines] == ["1", "2"][: len(lines)] and lines[0].group(2, 3) == ("4", "5")


def test_sample_with_rag(base_ckpt: Path, squad_faiss: Path) -> None:
    done = gptkit_cli(
        "sample", str(base_ckpt), "--rag", str(squad_faiss), "--rag-k", "1", "--prompt", QUESTION,
        "--max-new-tokens", "4", "--temperature", "0",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Answer the question from the numbered passages below")
    assert "[1] Victoria (abbreviated as Vic) is a state" in done.stdout
    assert [m.group(2, 3) for m in source_lines(done.stdout)] == [("4", "5")]


def test_chat_with_rag_retrieves_each_turn(tuned_ckpt: Path, squad_faiss: Path) -> None:
    done = gptkit_cli(
        "chat", str(tuned_ckpt), "--rag", str(squad_faiss), "--rag-k", "1", "--max-new-tokens", "4",
        "--temperature", "0",
        stdin=f"{QUESTION}\nWho was the leader of the Normans who swore fealty to King Charles III?\n",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("Sources:") == 2
    assert [m.group(2) for m in source_lines(done.stdout)] == ["4", "0"]  # Victoria, then the Normans
