"""A checkpoint's answers to a file of test questions: to watch answers improve across checkpoints.

Each question (one per line) is answered greedily through `Chat`, so a checkpoint with a chat
template gets the question formatted as its fine-tuning examples were, and a base model continues
the question as plain text. The answers are kept in the run's eval.json (task "answers", one record
per checkpoint and questions file) and shown in `RUN/eval.md`, per checkpoint and question.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gptkit.errors import GptkitError
from gptkit.files import write_atomic
from gptkit.generate.chat import Chat
from gptkit.generate.settings import SampleSettings
from gptkit.generate.textmodel import TextModel
from gptkit.tracking import markdown_code

ANSWERS = "answers"  # the task name of answer records in eval.json


def read_questions(path: str | Path) -> list[str]:
    """The non-empty lines of a UTF-8 text file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GptkitError(
            f"questions file {str(path)!r} not found; pass a text file, one question a line"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise GptkitError(f"cannot read questions file {str(path)!r} ({e}); pass a UTF-8 text file") from None
    questions = [line.strip() for line in text.splitlines() if line.strip()]
    if not questions:
        raise GptkitError(f"questions file {str(path)!r} holds no question; write one question a line")
    return questions


def answer_questions(model: TextModel, questions: list[str], max_new_tokens: int) -> list[dict[str, str]]:
    """Each question answered alone (no earlier turns), greedily, with the model's chat template."""
    chat = Chat(model, settings=SampleSettings.of(temperature=0.0, max_new_tokens=max_new_tokens))
    out = []
    for question in questions:
        chat.reset()
        try:
            out.append({"question": question, "answer": "".join(chat.reply(question))})
        except GptkitError as e:
            raise GptkitError(f"question {question!r}: {e}") from None
    return out


def write_answers_file(records: list[dict[str, Any]], path: Path, title: str) -> bool:
    """`eval.md` from the answer records of eval.json: checkpoints in step order, each question and
    its answer. False (and nothing written) without answer records."""
    answers = sorted(
        (r for r in records if r.get("task") == ANSWERS and isinstance(r.get("answers"), list)),
        key=lambda r: (r.get("step") or 0, str(r.get("checkpoint")), str(r.get("file"))),
    )
    if not answers:
        return False
    parts = [f"# {title}: answers\n\n"]
    for r in answers:
        step = f"step {r['step']:,}" if isinstance(r.get("step"), int) else "no step"
        quantize = f", {r['quantize']}" if r.get("quantize") else ""
        parts.append(f"## {step}: {markdown_code(str(r.get('checkpoint')), block=False)}{quantize}\n\n")
        parts.append(f"Questions from {markdown_code(str(r.get('file')), block=False)}.\n\n")
        for i, qa in enumerate(r["answers"], 1):
            parts.append(f"{i}. {markdown_code(str(qa.get('question')), block=False)}\n\n")
            parts.append(markdown_code(str(qa.get("answer")), block=True) + "\n")
    write_atomic(path, "".join(parts).rstrip("\n") + "\n")
    return True


def answers_text(record: dict[str, Any]) -> str:
    """One checkpoint's questions and answers as markdown: what trackers log as text."""
    return "".join(
        f"**{qa['question']}**\n\n{markdown_code(qa['answer'], block=True)}\n" for qa in record["answers"]
    )
