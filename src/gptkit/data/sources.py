"""Text sources for `gptkit prepare`, streamed as pieces of documents.

A source is a text file, a folder of them, a .jsonl or .parquet file with a text field, an
`hf:NAME[:CONFIG][@SPLIT]` dataset, or the built-in corpus. Every source yields `Piece`s: a
document, or for a large text file a contiguous chunk of it, so that a single big file can
still be split into train and val. Nothing holds a whole file in memory.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptkit.errors import GptkitError

TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst"}
TABLE_SUFFIXES = {".jsonl", ".parquet"}
BUILTIN = "builtin:pydoc"
HF_STATE_ROWS = 64  # hf: rows between two copies of the `datasets` iterator's state

# Text files are cut into about 128 chunks (between 4 KiB and 1 MiB each) so that the val
# fraction holds for a single large file too.
MIN_CHUNK, MAX_CHUNK, CHUNKS_PER_FILE = 4 << 10, 1 << 20, 128


@dataclass(slots=True)
class Piece:
    """A unit of the train/val split: a document or a chunk of one."""

    key: str  # stable identity, hashed with the seed to pick the split
    text: str
    last: bool  # the end of its document: an end-of-text token follows it
    after: Any = None  # where reading stands after it: `pieces(start=after)` goes on with the next


@dataclass
class SkipLog:
    """Bad documents met with --skip-bad: counted, and the first few reported."""

    skip_bad: bool
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def bad(self, where: str, why: str) -> None:
        if not self.skip_bad:
            raise GptkitError(f"{where}: {why}; fix the data, or pass --skip-bad to count and skip it")
        self.count += 1
        if len(self.examples) < 5:
            self.examples.append(f"{where}: {why}")


@dataclass
class Source:
    """One resolved input; `pieces()` streams it and records its checksum when done."""

    spec: str
    kind: str  # text | jsonl | parquet | hf | builtin
    path: Path | None = None
    name: str = ""  # stable name used in piece keys
    sha256: str | None = None
    nbytes: int | None = None
    once: bool = False  # a pipe or device: its text can be read only once

    def pieces(self, text_field: str, skips: SkipLog, start: Any = None) -> Iterator[Piece]:
        """The pieces in order; from `start` (a piece's `after`) on, without reading what precedes it
        (text: the reader's offsets; jsonl: a byte offset; parquet: a row group and row; hf: the
        dataset iterator's state; the built-in corpus: a count of pieces, read past). The checksum
        is recorded only for a read from the start."""
        if self.kind == "builtin":  # positions are counts of pieces
            counted = (_at(p, n) for n, p in enumerate(_builtin_pieces(self, text_field, skips), start=1))
            return itertools.islice(counted, start or 0, None)
        readers: dict[str, Callable[..., Iterator[Piece]]] = {
            "text": _text_pieces,
            "jsonl": _jsonl_pieces,
            "parquet": _parquet_pieces,
            "hf": _hf_pieces,
        }
        return readers[self.kind](self, text_field, skips, start)

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source": self.spec, "kind": self.kind}
        if self.sha256:
            out["sha256"] = self.sha256
        if self.nbytes is not None:
            out["bytes"] = self.nbytes
        return out


def resolve_sources(specs: list[str]) -> list[Source]:
    """Check every source before any work starts; folders expand to their files, sorted."""
    if not specs:
        return [Source(BUILTIN, "builtin", name="pydoc")]
    out: list[Source] = []
    for spec in specs:
        if spec == BUILTIN:
            out.append(Source(spec, "builtin", name="pydoc"))
        elif spec.startswith("hf:"):
            if not spec[3:]:
                raise GptkitError("source 'hf:' names no dataset; write hf:NAME[:CONFIG][@SPLIT]")
            out.append(Source(spec, "hf", name=spec))
        else:
            out.extend(_resolve_path(spec))
    return out


def _resolve_path(spec: str) -> list[Source]:
    path = Path(spec)
    if not path.exists():
        raise GptkitError(
            f"source {spec!r} not found; pass text files, folders, .jsonl or .parquet files, or hf:NAME"
        )
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in TEXT_SUFFIXES | TABLE_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            kinds = ", ".join(sorted(TEXT_SUFFIXES | TABLE_SUFFIXES))
            raise GptkitError(f"folder {spec!r} holds no readable files ({kinds})")
        return [_file_source(p, f"{path.name}/{p.relative_to(path).as_posix()}") for p in files]
    return [_file_source(path, path.name)]


def _file_source(path: Path, name: str) -> Source:
    suffix = path.suffix.lower()
    kind = {".jsonl": "jsonl", ".parquet": "parquet"}.get(suffix, "text")
    if not path.is_file():  # a pipe (`<(cmd)`, a FIFO) or a device: opening it to look would take data
        if not os.access(path, os.R_OK):
            raise GptkitError(f"cannot read source {str(path)!r}: permission denied; check its permissions")
        return Source(str(path), kind, path=path, name=name, once=True)
    try:
        with path.open("rb"):
            pass
    except OSError as e:
        raise GptkitError(f"cannot read source {str(path)!r}: {e.strerror}; check its permissions") from None
    return Source(str(path), kind, path=path, name=name)


# ---------------------------------------------------------------------------------------------
# Readers


def _text_pieces(src: Source, text_field: str, skips: SkipLog, start: Any = None) -> Iterator[Piece]:
    """A text file is one document, cut before newlines into chunks of a size set by the file.

    `start`: the reader's state at the cut that made the next piece ([offset of the unread text,
    bytes read, more to read, piece index]; offset -1: the file's end), so that a resumed read cuts
    the same pieces as a whole one."""
    assert src.path is not None
    size = src.path.stat().st_size
    chunk = min(MAX_CHUNK, max(MIN_CHUNK, size // CHUNKS_PER_FILE))
    digest, nbytes, index, offset = hashlib.sha256(), 0, 0, 0
    buffer, more, resumed = b"", True, False
    pending: Piece | None = None  # held back one step so the final piece can be marked `last`
    with src.path.open("rb") as f:
        if start is not None:
            offset, end, more, index = start
            if offset < 0:
                return
            f.seek(offset)
            buffer, resumed = f.read(end - offset), True
        while True:
            if not resumed:
                block = f.read(chunk)
                digest.update(block)
                nbytes += len(block)
                buffer += block
                more = bool(block)
                if more and len(buffer) < chunk:
                    continue
            resumed = False
            here = [offset, offset + len(buffer), more, index]  # the buffer is the file from offset on
            cut = _cut_point(buffer, final=not more)
            raw, buffer = buffer[:cut], buffer[cut:]
            if raw:
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    skips.bad(f"{src.path} (byte {offset + e.start})", "invalid UTF-8")
                    text = ""
                offset += len(raw)
                if text:
                    if pending is not None:
                        pending.after = here
                        yield pending
                    pending = Piece(f"{src.name}#{index}", text, last=False)
                    index += 1
            if not more and not buffer:
                break
    if pending is not None:
        pending.last, pending.after = True, [-1, -1, False, index]
        yield pending
    if start is None:
        src.sha256, src.nbytes = digest.hexdigest(), nbytes


def _cut_point(buffer: bytes, final: bool) -> int:
    """Where a chunk ends: just before the last newline that is followed by a non-space character.

    The GPT-2 and bpe pre-tokenizers split the whole text there too (a newline before text is a
    pre-token of its own, and whatever precedes it ends there), so the chunks of a file tokenize to
    exactly the tokens of the whole file. After a newline would not do: a run of blank lines at the
    end of a chunk is one pre-token, while inside the text its last newline stands alone.
    Without such a newline (one very long line): after the last newline, else never inside a
    UTF-8 character.
    """
    if final:
        return len(buffer)
    nl = len(buffer)
    while (nl := buffer.rfind(b"\n", 1, nl)) > 0:
        lead = buffer[nl + 1] if nl + 1 < len(buffer) else None
        if lead is None:
            continue
        size = 1 if lead < 0x80 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
        try:
            after = buffer[nl + 1 : nl + 1 + size].decode("utf-8")
        except UnicodeDecodeError:
            continue
        if len(after) == 1 and not after.isspace():
            return nl
    nl = buffer.rfind(b"\n")
    if nl >= 0:
        return nl + 1
    cut = len(buffer)
    while cut > 0 and (buffer[cut - 1] & 0xC0) == 0x80:  # back off UTF-8 continuation bytes
        cut -= 1
    if cut > 0 and buffer[cut - 1] >= 0xC0:  # and the lead byte of the cut character
        cut -= 1
    return cut


def _jsonl_pieces(src: Source, text_field: str, skips: SkipLog, start: Any = None) -> Iterator[Piece]:
    """`start`: [byte offset, line number] after a line."""
    assert src.path is not None
    digest, nbytes = hashlib.sha256(), 0
    offset, first = start if start is not None else (0, 0)
    with src.path.open("rb") as f:
        f.seek(offset)
        for lineno, raw in enumerate(f, start=first + 1):
            digest.update(raw)
            nbytes += len(raw)
            offset += len(raw)
            if not raw.strip():
                continue
            where = f"{src.path}:{lineno}"
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                skips.bad(where, "invalid UTF-8")
                continue
            except json.JSONDecodeError as e:
                skips.bad(where, f"not valid JSON ({e.msg})")
                continue
            text = _field_text(record, text_field, where, skips)
            if text:
                yield Piece(f"{src.name}:{lineno}", text, last=True, after=[offset, lineno])
    if start is None:
        src.sha256, src.nbytes = digest.hexdigest(), nbytes


def _field_text(record: Any, text_field: str, where: str, skips: SkipLog) -> str | None:
    if not isinstance(record, dict):
        skips.bad(where, f"expected a JSON object with field {text_field!r}, got {type(record).__name__}")
        return None
    if text_field not in record:
        fields = ", ".join(list(record)[:8])
        skips.bad(
            where, f"missing text field {text_field!r} (fields: {fields}); choose one with --text-field"
        )
        return None
    text = record[text_field]
    if text is None:
        return None
    if not isinstance(text, str):
        skips.bad(where, f"field {text_field!r} holds {type(text).__name__}, not text")
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate, e.g. JSON "\ud800": not text any tokenizer takes
        skips.bad(where, f"invalid Unicode in field {text_field!r} (lone surrogate at character {e.start})")
        return None
    return text


def _parquet_pieces(src: Source, text_field: str, skips: SkipLog, start: Any = None) -> Iterator[Piece]:
    """`start`: [row group, rows of it read]."""
    assert src.path is not None
    first_group, skip = start if start is not None else (0, 0)
    pq = _optional("pyarrow.parquet", "pyarrow", "to read .parquet files")
    try:
        pf = pq.ParquetFile(src.path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise GptkitError(f"cannot read parquet file {str(src.path)!r}: {str(e).splitlines()[0]}") from None
    columns = pf.schema_arrow.names
    if text_field not in columns:
        names = ", ".join(columns)
        raise GptkitError(f"{src.path}: no column {text_field!r} (columns: {names}); set --text-field")
    row = sum(pf.metadata.row_group(g).num_rows for g in range(first_group))
    for group in range(first_group, pf.num_row_groups):  # a damaged row group is named; skip_bad skips it
        first, row = row, row + pf.metadata.row_group(group).num_rows
        batches = pf.iter_batches(columns=[text_field], batch_size=1024, row_groups=[group])
        n = first
        try:
            for batch in batches:
                column = batch.column(0)
                if group == first_group and n - first < skip:  # rows before `start`: not decoded
                    drop = min(len(column), skip - (n - first))
                    column, n = column.slice(drop), n + drop
                for text in column.to_pylist():
                    n += 1
                    text = _field_text({text_field: text}, text_field, f"{src.path} row {n}", skips)
                    if text:
                        yield Piece(f"{src.name}:{n}", text, last=True, after=[group, n - first])
        except (OSError, ValueError, KeyError) as e:  # pyarrow's ArrowException types derive from these
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            skips.bad(f"{src.path} row group {group} (rows {n + 1}-{row})", f"cannot be read: {msg}")
    if start is None:
        src.sha256, src.nbytes = _sha256_file(src.path), src.path.stat().st_size


def _hf_pieces(src: Source, text_field: str, skips: SkipLog, start: Any = None) -> Iterator[Piece]:
    """`hf:NAME[:CONFIG][@SPLIT]`: a HuggingFace dataset name or a local dataset folder, streamed.

    `start`: [a `datasets` iterator state (None: the dataset's start), rows after it, rows read in
    all]. The iterator's `state_dict()` is a copy of nested dicts: it is taken every HF_STATE_ROWS rows,
    not after each, and a resume reads past the few rows from that state to the position (not
    tokenized). A bare state is the position after it (an earlier gptkit's)."""
    datasets = _optional("datasets", "datasets", "to read hf: sources")
    spec = src.spec[3:]
    spec, _, split = spec.partition("@")
    name, _, config = spec.partition(":")
    state, after_state, n = start if isinstance(start, list) else (start, 0, 0)
    try:
        if _saved_dataset(name):  # a folder written by Dataset(Dict).save_to_disk
            ds = datasets.load_from_disk(name)
            ds = ds[split or "train"] if isinstance(ds, datasets.DatasetDict) else ds
            ds = ds.to_iterable_dataset()  # in order, with a state to resume from
        else:
            ds = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
        if state is not None:
            ds.load_state_dict(state)
        rows = iter(ds)
        for _ in range(after_state):  # from the state to the position
            next(rows, None)
        record = next(rows, None)
    except Exception as e:  # network, missing dataset, bad config: all surface here
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise GptkitError(f"cannot load dataset {src.spec!r}: {msg}") from None
    if record is not None and text_field not in record:
        fields = ", ".join(record)
        raise GptkitError(
            f"{src.spec}: no field {text_field!r} (fields: {fields}); choose one with --text-field"
        )
    while record is not None:
        n += 1
        after_state += 1
        if after_state == HF_STATE_ROWS:  # the iterator stands after row n
            state, after_state = ds.state_dict(), 0
        text = _field_text(record, text_field, f"{src.spec} row {n}", skips)
        if text:
            yield Piece(f"{src.name}:{n}", text, last=True, after=[state, after_state, n])
        record = next(rows, None)


def _at(piece: Piece, after: Any) -> Piece:
    piece.after = after
    return piece


def _saved_dataset(name: str) -> bool:
    folder = Path(name)
    return any((folder / f).is_file() for f in ("state.json", "dataset_dict.json"))


def _builtin_pieces(src: Source, text_field: str, skips: SkipLog) -> Iterator[Piece]:
    """The English text of Python's documentation, which every Python installation carries."""
    from pydoc_data.topics import topics

    digest = hashlib.sha256()
    for name in sorted(topics):
        digest.update(topics[name].encode("utf-8"))
        yield Piece(f"pydoc:{name}", topics[name], last=True)
    src.sha256 = digest.hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _optional(module: str, package: str, why: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise GptkitError(f"{package} is needed {why}; install it with: pip install 'gptkit[data]'") from None


__all__ = ["Piece", "SkipLog", "Source", "resolve_sources"]
