"""`gptkit rag index`: documents to chunks to vectors to a store, in an index folder.

The folder holds `meta.json` and one generation folder (`v000001/`: chunks.jsonl, vectors.npy and the
store). Indexing again writes a new generation beside the old one, reusing the vectors of every
source whose hash has not changed, and only then replaces meta.json (atomically) to name it. A crash
or kill -9 at any moment leaves meta.json naming the previous, complete generation.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from gptkit.console import notice
from gptkit.data.sources import SkipLog
from gptkit.errors import GptkitError
from gptkit.files import fsync_dir, write_atomic
from gptkit.rag.chunking import Chunk, check_settings, chunk_text, views
from gptkit.rag.documents import Input, resolve_inputs
from gptkit.rag.embedders import Embedder, make_embedder
from gptkit.rag.stores import STORES, build_store

FORMAT = 1
META = "meta.json"
GENERATION = re.compile(r"^v(\d{6})$")
BATCH = 256  # chunks embedded per call


@dataclass
class IndexReport:
    """What an indexing run did, counted."""

    index: Path
    sources: int = 0
    chunks: int = 0
    embedded: int = 0  # chunks embedded in this run (new or changed sources)
    reused: int = 0  # chunks whose vectors were kept from the previous index
    removed: int = 0  # chunks of sources no longer given, or changed
    changed_sources: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # binary files, bad rows
    seconds: float = 0.0

    @property
    def chunks_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0


def read_meta(index: Path) -> dict[str, Any]:
    """meta.json of an index folder; a missing or damaged one is a one-line error."""
    path = index / META
    if not index.is_dir():
        raise GptkitError(
            f"index {str(index)!r} not found; build one with: gptkit rag index DOCS... --out {index}"
        )
    if not path.is_file():
        raise GptkitError(
            f"{str(index)!r} is not a gptkit index (no {META}); build one with gptkit rag index"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT or not GENERATION.match(meta["data"]):
            raise ValueError("unknown format")
        for key in ("embedder", "embedder_id", "dim", "store", "chunking", "sources"):
            meta[key]  # noqa: B018  (a KeyError names what is missing)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        why = f"missing {e}" if isinstance(e, KeyError) else str(e).splitlines()[0]
        raise GptkitError(
            f"{path} is corrupt ({why}); delete {str(index)!r} and index the documents again"
        ) from None
    if not (index / meta["data"]).is_dir():
        raise GptkitError(f"{path} names {meta['data']}/, which is missing; index the documents again")
    return meta


def read_chunks(folder: Path) -> list[Chunk]:
    with (folder / "chunks.jsonl").open(encoding="utf-8") as f:
        return [Chunk(**json.loads(line)) for line in f]


def build_index(
    docs: list[str | Path] | str | Path,
    out: str | Path,
    *,
    embedder: str | Embedder = "minilm",
    store: str = "faiss",
    chunk_tokens: int | None = None,
    overlap: int = 32,
    windows: int = 2,
    text_field: str = "text",
    progress: bool = True,
) -> IndexReport:
    """Index `docs` into `out`; the index then holds exactly these documents (see module docstring).

    `embedder` names one (minilm, model:PATH) or is one already loaded, as `Retriever` takes it."""
    if store not in STORES:
        raise GptkitError(f"unknown store {store!r}; use one of {', '.join(STORES)}")
    out = Path(out)
    inputs, skipped = resolve_inputs([str(d) for d in ([docs] if isinstance(docs, (str, Path)) else docs)])
    old = read_meta(out) if (out / META).exists() else None
    if old is None and out.exists() and any(p for p in out.iterdir() if not p.name.startswith(".")):
        raise GptkitError(
            f"{str(out)!r} exists and is not a gptkit index; choose an empty or new --out folder"
        )
    started = time.perf_counter()
    emb = make_embedder(embedder) if isinstance(embedder, str) else embedder
    chunk_tokens = chunk_tokens or emb.limit
    check_settings(chunk_tokens, overlap, emb.limit)
    settings = {
        "chunk_tokens": chunk_tokens,
        "overlap": overlap,
        "text_field": text_field,
        "windows": windows,
    }
    report = IndexReport(out, skipped=[f"{s}: binary, not text" for s in skipped])

    reusable = old is not None and old["embedder_id"] == emb.identity and old["chunking"] == settings
    if old is not None and not reusable:
        notice(f"{out}: embedder or chunking changed since it was built; every source is embedded again")
    old_rows: dict[str, list[int]] = {}
    chunks_before: list[Chunk] = []
    vectors_before: dict[int, np.ndarray] = {}  # old chunk row -> its vectors
    if old is not None:
        chunks_before = read_chunks(out / old["data"])
        for row, c in enumerate(chunks_before):
            old_rows.setdefault(c.source, []).append(row)
        if reusable:
            vectors, owners = _read_vectors(out / old["data"])
            for row in range(len(chunks_before)):
                vectors_before[row] = vectors[owners == row]
        report.removed = len(chunks_before)

    skips = SkipLog(skip_bad=True)
    chunks: list[Chunk] = []
    kept: dict[int, np.ndarray] = {}  # new chunk row -> reused vectors
    fresh: list[int] = []  # new chunk rows to embed
    sources: dict[str, dict[str, Any]] = {}
    for item in inputs:
        before = old["sources"].get(item.name) if reusable and old is not None else None
        if before is not None and before["sha256"] == item.sha256:
            rows = old_rows.get(item.name, [])
            kept.update({len(chunks) + i: vectors_before[r] for i, r in enumerate(rows)})
            chunks += [chunks_before[r] for r in rows]
            report.removed -= len(rows)
            count = len(rows)
        else:
            new = _chunk_input(item, emb, chunk_tokens, overlap, text_field, skips)
            fresh += range(len(chunks), len(chunks) + len(new))
            chunks += new
            count = len(new)
            if old is not None:
                report.changed_sources.append(item.name)
        sources[item.name] = {"sha256": item.sha256, "chunks": count}
    report.skipped += skips.examples + [f"... and {skips.count - len(skips.examples)} more"] * (
        skips.count > len(skips.examples)
    )
    if not chunks:
        raise GptkitError("the documents hold no text to index (empty files, or only skipped ones)")

    embed_started = time.perf_counter()
    made = _embed(emb, chunks, fresh, windows, progress)
    embed_seconds = time.perf_counter() - embed_started
    per_chunk = {**kept, **made}
    vectors = np.concatenate([per_chunk[row] for row in range(len(chunks))])
    owners = np.concatenate([np.full(len(per_chunk[row]), row, dtype=np.int64) for row in range(len(chunks))])

    meta = {
        "format": FORMAT,
        "embedder": emb.name,
        "embedder_id": emb.identity,
        "dim": emb.dim,
        "limit": emb.limit,
        "store": store,
        "chunking": settings,
        "chunks": len(chunks),
        "sources": sources,
    }
    _write_generation(out, meta, chunks, vectors, owners)
    report.sources, report.chunks = len(inputs), len(chunks)
    report.embedded, report.reused = len(fresh), len(kept)
    report.seconds = embed_seconds
    if progress:
        took = time.perf_counter() - started
        notice(
            f"indexed {len(chunks)} chunks of {len(inputs)} sources into {out} in {took:.1f}s: "
            f"{report.embedded} embedded ({report.chunks_per_second:.0f} chunks/s), {report.reused} reused, "
            f"{report.removed} removed, {len(report.skipped)} skipped"
        )
    return report


def _chunk_input(
    item: Input, emb: Embedder, chunk_tokens: int, overlap: int, text_field: str, skips: SkipLog
) -> list[Chunk]:
    out: list[Chunk] = []
    for document in item.documents(text_field, skips):
        if not document.text.strip():
            continue
        offsets = emb.offsets(document.text)
        out += chunk_text(
            document.text,
            offsets,
            emb.count,
            source=item.name,
            doc=document.doc,
            chunk_tokens=chunk_tokens,
            overlap=overlap,
        )
    return out


def _embed(
    emb: Embedder, chunks: list[Chunk], rows: list[int], windows: int, progress: bool
) -> dict[int, np.ndarray]:
    """The vectors of each chunk in `rows`: the chunk's own, then its sentence windows'."""
    texts = [(row, text) for row in rows for text in views(chunks[row].text, windows)]
    out: dict[int, list[np.ndarray]] = {row: [] for row in rows}
    with tqdm(total=len(rows), unit="chunk", desc="embedding", disable=not progress or not rows) as bar:
        for lo in range(0, len(texts), BATCH):
            batch = texts[lo : lo + BATCH]
            for (row, _), vector in zip(batch, emb.encode([t for _, t in batch]), strict=True):
                out[row].append(vector)
            ends = range(lo, lo + len(batch))  # a chunk is done with its last view
            bar.update(sum(1 for i in ends if i + 1 == len(texts) or texts[i + 1][0] != texts[i][0]))
    return {row: np.stack(vs) for row, vs in out.items()}


def _read_vectors(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    return np.load(folder / "vectors.npy"), np.load(folder / "owners.npy")


def _write_generation(
    out: Path, meta: dict[str, Any], chunks: list[Chunk], vectors: np.ndarray, owners: np.ndarray
) -> None:
    """The new generation in a temporary folder, renamed whole, then meta.json; then the old goes."""
    out.mkdir(parents=True, exist_ok=True)
    numbers = [int(m.group(1)) for p in out.iterdir() if (m := GENERATION.match(p.name))]
    name = f"v{max(numbers, default=0) + 1:06d}"
    tmp = out / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with (tmp / "chunks.jsonl").open("w", encoding="utf-8") as f:
        for c in chunks:
            f.write(json.dumps(c.record(), ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    for file, array in (("vectors.npy", vectors), ("owners.npy", owners)):
        with (tmp / file).open("wb") as f:
            np.save(f, array)
            f.flush()
            os.fsync(f.fileno())
    build_store(meta["store"], tmp, vectors)
    os.replace(tmp, out / name)
    fsync_dir(out)
    write_atomic(
        out / META, json.dumps({**meta, "data": name}, indent=1, ensure_ascii=False) + "\n", durable=True
    )
    for p in out.iterdir():  # earlier generations, and temporaries of killed runs
        if p.name != name and (GENERATION.match(p.name) or (p.name.startswith(".v") and ".tmp-" in p.name)):
            shutil.rmtree(p, ignore_errors=True)
