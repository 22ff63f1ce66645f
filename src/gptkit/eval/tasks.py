"""Zero-shot tasks from local files: where to find them, how to read them, what to score.

Every task turns its file into `Request`s, (context, continuation) string pairs, exactly as
EleutherAI's lm-evaluation-harness (v0.4) builds them, so that the same model gives the same numbers:

  hellaswag  context = preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()),
             continuations = " " + preprocess(ending) for the 4 endings   (harness task `hellaswag`)
  lambada    context = text up to its last space, continuation = " " + last word  (`lambada_openai`)
  piqa       context = "Question: " + goal + "\\nAnswer:", continuations = " " + sol1, " " + sol2  (`piqa`)

Files are looked up under a data folder (default `data/eval`), as `DIR/<task>/<file>` or
`DIR/<file>`, first the original release, then the other layouts accepted; `files={"piqa": PATH}`
names one directly. Lines that cannot be read are counted, skipped and reported, never fatal
unless no example is left.
"""

from __future__ import annotations

import bz2
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from gptkit.config import EVAL_DATA_DIR
from gptkit.errors import GptkitError


@dataclass(frozen=True)
class Example:
    """One item: the context, its candidate continuations and the index of the right one.

    Cloze tasks (LAMBADA) have a single continuation, the one to predict, and `label` 0.
    """

    context: str
    continuations: tuple[str, ...]
    label: int = 0


@dataclass
class TaskData:
    """A task's examples as read from `path`; `skipped` lines were malformed (first `problem`)."""

    task: str
    path: Path
    examples: list[Example]
    skipped: int = 0
    problem: str = ""


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # "choice" (acc, acc_norm) or "cloze" (acc, ppl)
    files: tuple[str, ...]  # accepted file names; the first is the original release
    url: str  # where the original release is downloaded from
    read: Callable[[Path], Iterator[Example | str]] = field(repr=False)  # str: a malformed line


# -- HellaSwag ---------------------------------------------------------------------------------


def hellaswag_preprocess(text: str) -> str:
    """The harness's cleaning of HellaSwag text (WikiHow items carry [title], [step], ... markers)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_example(doc: dict[str, Any]) -> Example:
    """An example from a record of the original `hellaswag_val.jsonl` (the harness's process_docs)."""
    ctx = doc["ctx_a"] + " " + str(doc.get("ctx_b", "")).capitalize() if "ctx_a" in doc else doc["ctx"]
    endings = doc["endings"]
    label = int(doc["label"])
    if not isinstance(endings, list) or len(endings) != 4 or not 0 <= label < 4:
        raise ValueError("needs 4 endings and a label 0-3")
    return Example(
        hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
        tuple(" " + hellaswag_preprocess(e) for e in endings),
        label,
    )


def _read_hellaswag(path: Path) -> Iterator[Example | str]:
    if path.name.endswith(".jsonl"):
        yield from _json_lines(path, hellaswag_example)
        return
    # llama.cpp's layout: per example, a context line, the label, 4 endings (text already cleaned)
    group: list[str] = []
    start = 1
    for line in _iter_lines(path):
        group.append(line)
        if len(group) < 6:
            continue
        ctx, label, *endings = group
        if label.strip() in ("0", "1", "2", "3"):
            yield Example(
                hellaswag_preprocess(ctx), tuple(" " + hellaswag_preprocess(e) for e in endings), int(label)
            )
        else:
            yield f"lines {start}-{start + 5}: label {label.strip()!r} is not 0-3"
        group, start = [], start + 6
    if group:
        yield f"{len(group)} trailing line(s) do not make a whole example (6 lines each)"


# -- LAMBADA -----------------------------------------------------------------------------------


def lambada_example(doc: dict[str, Any]) -> Example:
    """{"text"} (OpenAI's release): the last space-separated word is the target.
    {"context", "continuation"} (llm-foundry's copy): the same split, stored."""
    if "text" in doc:
        text = doc["text"]
        if not isinstance(text, str) or " " not in text:
            raise ValueError("text has no space to split the last word off")
        context, word = text.rsplit(" ", 1)
        return Example(context, (" " + word,))
    context, word = doc["context"], doc["continuation"]
    if not isinstance(context, str) or not isinstance(word, str) or not word.strip():
        raise ValueError("context and continuation must be non-empty strings")
    return Example(context.rstrip(" "), (" " + word.lstrip(" "),))


def _read_lambada(path: Path) -> Iterator[Example | str]:
    yield from _json_lines(path, lambada_example)


# -- PIQA --------------------------------------------------------------------------------------


def piqa_example(doc: dict[str, Any], label: Any) -> Example:
    goal, sol1, sol2 = doc["goal"], doc["sol1"], doc["sol2"]
    if not all(isinstance(s, str) for s in (goal, sol1, sol2)):
        raise ValueError("goal, sol1 and sol2 must be strings")
    label = int(label)
    if label not in (0, 1):
        raise ValueError(f"label {label} is not 0 or 1")
    return Example(f"Question: {goal}\nAnswer:", (" " + sol1, " " + sol2), label)


def _read_piqa(path: Path) -> Iterator[Example | str]:
    """`valid.jsonl` with its labels in `valid-labels.lst` beside it (one per line, same order), or
    records that carry their own `label`."""
    labels_path = path.with_name(path.name.removesuffix(".jsonl") + "-labels.lst")
    labels = _text_lines(labels_path) if labels_path.is_file() else None
    lines = _text_lines(path)
    if labels is not None and len(labels) != len(lines):
        raise GptkitError(
            f"{labels_path} has {len(labels)} labels but {path} has {len(lines)} examples; "
            "download both files of the same release again"
        )
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
            if labels is None and "label" not in doc:
                raise GptkitError(f"{path} has no labels: put {labels_path.name} (from {PIQA_URL}) beside it")
            yield piqa_example(doc, labels[i] if labels is not None else doc["label"])
        except (ValueError, KeyError, TypeError) as e:
            yield f"line {i + 1}: {_why(e)}"


# -- files -------------------------------------------------------------------------------------


def _open_text(path: Path) -> TextIO:
    if path.suffix == ".bz2":
        return bz2.open(path, "rt", encoding="utf-8", newline="\n")
    return path.open(encoding="utf-8", newline="\n")


def _iter_lines(path: Path) -> Iterator[str]:
    """A file's lines, read as needed (bz2 when it ends in .bz2): a --limit reads only the start.
    Only "\\n" ends a line (a stray "\\r" or U+2028 inside a record must not split it)."""
    try:
        with _open_text(path) as f:
            for line in f:
                yield line.rstrip("\r\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise GptkitError(f"cannot read {path} ({_why(e)}); download it again") from None


def _text_lines(path: Path) -> list[str]:
    return list(_iter_lines(path))


def _json_lines(path: Path, make: Callable[[dict[str, Any]], Example]) -> Iterator[Example | str]:
    for i, line in enumerate(_iter_lines(path)):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
            yield make(doc)
        except (ValueError, KeyError, TypeError) as e:
            yield f"line {i + 1}: {_why(e)}"


def _why(e: BaseException) -> str:
    if isinstance(e, KeyError):
        return f"missing field {e.args[0]!r}"
    return str(e).splitlines()[0][:100] if str(e) else type(e).__name__


PIQA_URL = "https://yonatanbisk.com/piqa/data/ (valid.jsonl and valid-labels.lst)"

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            "hellaswag",
            "choice",
            ("hellaswag_val.jsonl", "hellaswag_val_full.txt.bz2", "hellaswag_val_full.txt"),
            "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl",
            _read_hellaswag,
        ),
        TaskSpec(
            "lambada",
            "cloze",
            ("lambada_test.jsonl", "lambada_openai_llmfoundry.jsonl"),
            "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl",
            _read_lambada,
        ),
        TaskSpec("piqa", "choice", ("valid.jsonl",), PIQA_URL, _read_piqa),
    )
}
PERPLEXITY = "perplexity"
KNOWN_TASKS = (PERPLEXITY, *TASKS)


def parse_tasks(tasks: str | list[str] | tuple[str, ...]) -> list[str]:
    """ "perplexity,hellaswag" or a list → validated names, in order, without repeats."""
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    out: list[str] = []
    for name in (n.strip().lower() for n in names):
        if not name:
            continue
        if name not in KNOWN_TASKS:
            raise GptkitError(f"unknown task {name!r}; known tasks: {', '.join(KNOWN_TASKS)}")
        if name not in out:
            out.append(name)
    if not out:
        raise GptkitError(f"no task given; choose from {', '.join(KNOWN_TASKS)}")
    return out


def find_task_file(task: str, data_dir: str | Path = EVAL_DATA_DIR, path: str | Path | None = None) -> Path:
    """The file `task` reads: `path` if given, else the first accepted name found under `data_dir`."""
    spec = TASKS[task]
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise GptkitError(f"{task} file {str(path)!r} not found; download {spec.url}")
        return path
    folder = Path(data_dir)
    for name in spec.files:
        for candidate in (folder / task / name, folder / name):
            if candidate.is_file():
                return candidate
    others, where = "", "or directly"
    if len(spec.files) > 1:
        others, where = f", or {' or '.join(spec.files[1:])} beside it", "or any of them directly"
    raise GptkitError(
        f"{task} needs {folder / task / spec.files[0]}{others}, {where} in {folder}; download it from "
        f"{spec.url}, or pass its path (--file {task}=PATH)"
    )


def load_task(task: str, path: Path, limit: int | None = None) -> TaskData:
    """Read up to `limit` examples (all when None), counting malformed lines instead of stopping."""
    data = TaskData(task, path, [])
    for item in TASKS[task].read(path):
        if isinstance(item, str):
            data.skipped += 1
            data.problem = data.problem or item
            continue
        data.examples.append(item)
        if limit is not None and len(data.examples) >= limit:
            break
    if not data.examples:
        first = f" (first: {data.problem})" if data.problem else ""
        raise GptkitError(
            f"{path} holds no {task} example{first}; expected the layout of {TASKS[task].files[0]} "
            f"from {TASKS[task].url}"
        )
    return data
