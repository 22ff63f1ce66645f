"""What the retrieval tests share: the SQuAD sample, MiniLM loaded once, a small GPT-2-tokenizer model
saved as checkpoints (base and instruction-templated), and the SQuAD index built once per session."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

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
def squad_qdrant(squad: Path, squad_faiss: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same index moved to Qdrant: the same vectors, reused (nothing is embedded again)."""
    from gptkit.rag import index

    out = tmp_path_factory.mktemp("squad") / "qdrant"
    shutil.copytree(squad_faiss, out, dirs_exist_ok=True)
    report = index([str(squad)], out, store="qdrant", progress=False)
    assert report.embedded == 0 and report.reused == report.chunks == 177
    return out
