"""Retrieval quality on real SQuAD questions: `gptkit rag eval` with MiniLM on FAISS and on Qdrant."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rag.parts import gptkit_cli

from gptkit.rag.chunking import Hit
from gptkit.rag.evaluate import Question, is_hit, squad_questions


@pytest.mark.parametrize("store", ["faiss", "qdrant"])
def test_minilm_recall_at_5_on_squad(store: str, squad: Path, request: pytest.FixtureRequest) -> None:
    index = request.getfixturevalue(f"squad_{store}")
    done = gptkit_cli("rag", "eval", str(index), "--qa", str(squad), "-k", "1,5,10", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert set(result) == {"recall@1", "recall@5", "recall@10", "mrr", "questions"}
    assert result["questions"] == 705  # the answerable ones of the 1407
    assert result["recall@5"] >= 0.95
    assert result["recall@1"] <= result["recall@5"] <= result["recall@10"] <= 1
    assert result["recall@1"] <= result["mrr"] <= result["recall@10"]


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
