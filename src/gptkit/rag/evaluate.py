"""`gptkit rag eval`: recall@k and MRR of an index on questions whose gold paragraph is known.

SQuAD JSON is read directly: a question's gold document is its paragraph (named as the indexer names
it, FILE#ARTICLE/PARAGRAPH), and a hit is a retrieved chunk of that paragraph which, where answers are
given, contains one of their texts. Unanswerable questions (SQuAD 2.0) have no gold text and are left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptkit.errors import GptkitError
from gptkit.rag.documents import squad_doc, squad_paragraphs
from gptkit.rag.retriever import Hit, Retriever, check_k


@dataclass(frozen=True, slots=True)
class Question:
    text: str
    doc: str
    answers: tuple[str, ...]


def squad_questions(path: str | Path) -> list[Question]:
    """The answerable questions of a SQuAD file with their gold paragraph and answer texts."""
    path = Path(path)
    if not path.is_file():
        raise GptkitError(f"question file {str(path)!r} not found")
    out = []
    for (i, j), paragraph in squad_paragraphs(path):
        for qa in paragraph.get("qas", []):
            answers = tuple(a["text"] for a in qa.get("answers", []) if a.get("text"))
            if qa.get("is_impossible") or not answers or not qa.get("question", "").strip():
                continue
            out.append(Question(qa["question"], squad_doc(path, i, j), answers))
    if not out:
        raise GptkitError(f"{path} holds no answerable question")
    return out


def is_hit(hit: Hit, question: Question) -> bool:
    return hit.doc == question.doc and (not question.answers or any(a in hit.text for a in question.answers))


def evaluate(retriever: Retriever, questions: list[Question], ks: list[int]) -> dict[str, Any]:
    """{"recall@K": ..., "mrr": ..., "questions": N}; MRR counts ranks up to the largest k."""
    for k in ks:
        check_k(k)
    depth = max(ks)
    found = {k: 0 for k in ks}
    reciprocal = 0.0
    for lo in range(0, len(questions), 256):
        batch = questions[lo : lo + 256]
        for question, hits in zip(batch, retriever.search_many([q.text for q in batch], depth), strict=True):
            rank = next((r for r, h in enumerate(hits, start=1) if is_hit(h, question)), None)
            if rank is None:
                continue
            reciprocal += 1 / rank
            for k in ks:
                found[k] += rank <= k
    n = len(questions)
    return {**{f"recall@{k}": found[k] / n for k in ks}, "mrr": reciprocal / n, "questions": n}
