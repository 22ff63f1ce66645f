"""Retrieval quality on real SQuAD questions: `gptkit rag eval` with MiniLM on FAISS (the real CLI),
and the same evaluation on Qdrant (in process, through the same questions' vectors)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rag.parts import gptkit_cli

from gptkit.rag.chunking import Hit
from gptkit.rag.evaluate import Question, evaluate, is_hit, squad_questions


def check_recall(result: dict[str, Any]) -> None:
    assert set(result) == {"recall@1", "recall@5", "recall@10", "mrr", "questions"}
    assert result["questions"] == 705  # the answerable ones of the 1407
    assert result["recall@5"] >= 0.95
    assert result["recall@1"] <= result["recall@5"] <= result["recall@10"] <= 1
    assert result["recall@1"] <= result["mrr"] <= result["recall@10"]


def test_minilm_recall_at_5_on_squad_with_faiss(squad_eval: dict[str, Any]) -> None:
    check_recall(squad_eval)


def test_minilm_recall_at_5_on_squad_with_qdrant(
    squad: Path, qdrant_retriever: Any, squad_eval: dict[str, Any]
) -> None:
    """All 705 questions again, through the Qdrant store: the figures FAISS gave through the CLI
    (to one question: the CLI embedded the questions in another process)."""
    assert qdrant_retriever.meta["store"] == "qdrant"
    result = evaluate(qdrant_retriever, squad_questions(squad), [1, 5, 10])
    check_recall(result)
    for key in ("recall@1", "recall@5", "recall@10", "mrr"):
        assert abs(result[key] - squad_eval[key]) <= 1 / 705 + 1e-9, key


def test_questions_and_hits(squad: Path) -> None:
    questions = squad_questions(squad)
    assert len(questions) == 705 and questions[0].doc == f"{squad.name}#0/0"
    q = Question("Where is Normandy?", "f.json#0/1", ("France",))
    hit = Hit(0.9, "f.json", "f.json#0/1", 0, 30, "Normandy is a region in France.")
    assert is_hit(hit, q)
    assert not is_hit(Hit(0.9, "f.json", "f.json#0/2", 0, 30, hit.text), q)  # another paragraph
    assert not is_hit(Hit(0.9, "f.json", "f.json#0/1", 0, 20, "Normandy is a region"), q)  # no answer text


def test_eval_bad_input(squad_faiss: Path, tmp_path: Path) -> None:
    bad_k = gptkit_cli("rag", "eval", str(squad_faiss), "--qa", str(tmp_path / "none.json"), "-k", "1,x")
    assert bad_k.returncode == 2 and "-k takes comma-separated numbers" in bad_k.stderr
    missing = gptkit_cli("rag", "eval", str(squad_faiss), "--qa", str(tmp_path / "none.json"))
    assert missing.returncode == 2 and "not found" in missing.stderr
    (tmp_path / "x.json").write_text('{"rows": []}')
    other = gptkit_cli("rag", "eval", str(squad_faiss), "--qa", str(tmp_path / "x.json"))
    assert other.returncode == 2 and "is not SQuAD JSON" in other.stderr
