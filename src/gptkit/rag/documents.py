"""What `gptkit rag index` reads: the sources `prepare` takes, plus SQuAD JSON, as whole documents.

The readers are `gptkit.data.sources`' (text and markdown files, folders, .jsonl, .parquet); a text
file's pieces are joined back into its one document, so offsets count from the file's start. A SQuAD
file (`{"data": [{"paragraphs": [{"context": ...}]}]}`) gives one document per paragraph, named
`FILE#ARTICLE/PARAGRAPH`, the key `gptkit rag eval` finds its gold paragraph by.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptkit.data.sources import SkipLog, Source, resolve_sources
from gptkit.errors import GptkitError

BINARY_PROBE = 8192  # bytes looked at for a NUL: text never holds one


@dataclass(frozen=True, slots=True)
class Document:
    doc: str  # its name in citations and in the index
    text: str


@dataclass
class Input:
    """One input file of the index: its name, content hash and how to read it."""

    name: str
    sha256: str
    source: Source | None  # None: SQuAD JSON, read here
    path: Path

    def documents(self, text_field: str, skips: SkipLog) -> Iterator[Document]:
        if self.source is None:
            yield from squad_documents(self.path)
            return
        if self.source.kind == "text":
            text = "".join(p.text for p in self.source.pieces(text_field, skips))
            if text.strip():
                yield Document(self.name, text)
            return
        for piece in self.source.pieces(text_field, skips):
            _, _, row = piece.key.rpartition(":")
            yield Document(f"{self.name}:{row}", piece.text)


def resolve_inputs(specs: list[str]) -> tuple[list[Input], list[str]]:
    """The files behind `specs` with their hashes, and (counted, not fatal) the binary ones skipped."""
    if not specs:
        raise GptkitError(
            "no documents given; pass text or markdown files, folders, .jsonl, .parquet or SQuAD .json"
        )
    inputs: list[Input] = []
    skipped: list[str] = []
    for spec in specs:
        path = Path(spec)
        if path.is_file() and path.suffix.lower() == ".json":
            inputs.append(Input(str(path), _sha256(path), None, path))
            continue
        if spec.startswith(("hf:", "builtin:")):
            raise GptkitError(
                f"{spec!r}: rag indexes local files only; save the dataset as .jsonl or .parquet"
            )
        for source in resolve_sources([spec]):
            assert source.path is not None
            if source.once:
                raise GptkitError(f"{source.spec!r} is a pipe or device; index regular files")
            if source.kind == "text" and _is_binary(source.path):
                skipped.append(source.spec)
                continue
            inputs.append(Input(source.spec, _sha256(source.path), source, source.path))
    names = [i.name for i in inputs]
    if len(set(names)) != len(names):
        raise GptkitError("a file is given twice among the documents; name each file once")
    return inputs, skipped


def squad_documents(path: Path) -> Iterator[Document]:
    """Each paragraph's context of a SQuAD JSON file, named FILE#ARTICLE/PARAGRAPH."""
    for (i, j), paragraph in squad_paragraphs(path):
        yield Document(squad_doc(path, i, j), paragraph["context"])


def squad_doc(path: Path, article: int, paragraph: int) -> str:
    return f"{path.name}#{article}/{paragraph}"


def squad_paragraphs(path: Path) -> Iterator[tuple[tuple[int, int], dict[str, Any]]]:
    """((article, paragraph), paragraph record) of a SQuAD file; anything else is a one-line error."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise GptkitError(f"{path} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise GptkitError(f"{path} is not valid JSON ({e.msg}, line {e.lineno})") from None
    articles = data.get("data") if isinstance(data, dict) else None
    if not isinstance(articles, list):
        raise GptkitError(
            f"{path} is not SQuAD JSON (no 'data' list of articles); other JSON goes in as .jsonl lines"
        )
    for i, article in enumerate(articles):
        for j, paragraph in enumerate(article.get("paragraphs", []) if isinstance(article, dict) else []):
            if not isinstance(paragraph, dict) or not isinstance(paragraph.get("context"), str):
                raise GptkitError(f"{path}: article {i} paragraph {j} has no 'context' text")
            yield (i, j), paragraph


def _is_binary(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(BINARY_PROBE)
    if b"\x00" in head:
        return True
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start < len(head) - 3  # not just a character cut by the probe's end
    return False


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
