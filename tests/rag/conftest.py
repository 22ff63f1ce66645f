"""What the retrieval tests share: the SQuAD sample, MiniLM loaded once, a small GPT-2-tokenizer model
saved as checkpoints (base and instruction-templated), and the SQuAD index built once per session, in
FAISS and in Qdrant, with retrievers that embed each SQuAD question once per session."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rag.parts import gptkit_cli, save_model, shared_file

SQUAD = "squad/squad_v2_dev_first5articles.json"


@pytest.fixture(scope="session")
def squad() -> Path:
    return shared_file(SQUAD)


@pytest.fixture(scope="session")
def minilm() -> Any:
    from gptkit.rag.embedders import MiniLM

    return MiniLM()


class Remembering:
    """MiniLM that embeds a text once per session and gives its vector again when asked again: the
    SQuAD questions go through the real model once, and the FAISS and Qdrant retrievers (and the
    eval) search with the very same vectors. A batch of new texts is embedded as one call, as
    `gptkit rag eval` embeds it, so the vectors are the ones the CLI gets."""

    def __init__(self, minilm: Any) -> None:
        self.inner = minilm
        self.name, self.identity, self.dim, self.limit = (
            minilm.name,
            minilm.identity,
            minilm.dim,
            minilm.limit,
        )
        self.vectors: dict[str, np.ndarray] = {}

    def offsets(self, text: str) -> Any:
        return self.inner.offsets(text)

    def count(self, text: str) -> int:
        return self.inner.count(text)

    def encode(self, texts: list[str]) -> np.ndarray:
        new = [t for t in dict.fromkeys(texts) if t not in self.vectors]
        if new:
            self.vectors.update(zip(new, self.inner.encode(new), strict=True))
        return np.stack([self.vectors[t] for t in texts]) if texts else np.zeros((0, self.dim), np.float32)


@pytest.fixture(scope="session")
def squad_minilm(minilm: Any) -> Remembering:
    return Remembering(minilm)


@pytest.fixture(scope="session")
def base_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained GPT-2-tokenizer model, context 256: a real model to embed with and compose for."""
    return save_model(tmp_path_factory.mktemp("base") / "base.pt", 256, None)


@pytest.fixture(scope="session")
def tuned_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gptkit.templates import ChatTemplate

    return save_model(
        tmp_path_factory.mktemp("tuned") / "sft.pt", 256, ChatTemplate.named("alpaca").to_dict()
    )


@pytest.fixture(scope="session")
def squad_faiss(squad: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SQuAD sample indexed with MiniLM into FAISS, through the real CLI."""
    out = tmp_path_factory.mktemp("squad") / "faiss"
    done = gptkit_cli("rag", "index", str(squad), "--out", str(out), "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "177 chunks of 1 sources; 177 embedded" in done.stdout
    return out


@pytest.fixture(scope="session")
def squad_qdrant(
    squad: Path, squad_faiss: Path, minilm: Any, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The same index moved to Qdrant: the same vectors, reused (nothing is embedded again)."""
    from gptkit.rag import index

    out = tmp_path_factory.mktemp("squad") / "qdrant"
    shutil.copytree(squad_faiss, out, dirs_exist_ok=True)
    report = index([str(squad)], out, embedder=minilm, store="qdrant", progress=False)
    assert report.embedded == 0 and report.reused == report.chunks == 177
    return out


@pytest.fixture(scope="session")
def faiss_retriever(squad_faiss: Path, squad_minilm: Remembering) -> Any:
    from gptkit.rag import Retriever

    with Retriever(squad_faiss, embedder=squad_minilm) as retriever:
        yield retriever


@pytest.fixture(scope="session")
def qdrant_retriever(squad_qdrant: Path, squad_minilm: Remembering) -> Any:
    from gptkit.rag import Retriever

    with Retriever(squad_qdrant, embedder=squad_minilm) as retriever:
        yield retriever


@pytest.fixture(scope="session")
def squad_eval(squad: Path, squad_faiss: Path) -> dict[str, Any]:
    """`gptkit rag eval` of the FAISS index on all 705 answerable questions, through the real CLI."""
    import json

    done = gptkit_cli("rag", "eval", str(squad_faiss), "--qa", str(squad), "-k", "1,5,10", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)
