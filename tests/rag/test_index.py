"""The index folder: incremental re-indexing (counted), deletions, both stores, kill -9, bad input."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rag.parts import gptkit_cli

from gptkit.rag import Retriever, index

DOCS = {
    "a.txt": "Apples are red or green fruit that grow on trees in orchards.\n\nCider is pressed from apples.",
    "b.md": "# Boats\n\nA boat floats on water. Sailing boats are pushed by the wind across the sea.",
    "c.txt": "Cats are small carnivorous mammals. A cat sleeps for most of the day and hunts at night.",
}


def write_docs(folder: Path, docs: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in docs.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


@pytest.fixture(params=["faiss", "qdrant"])
def store(request: pytest.FixtureRequest) -> str:
    return request.param


def test_incremental_indexing_embeds_only_what_changed(tmp_path: Path, base_ckpt: Path, store: str) -> None:
    docs = write_docs(tmp_path / "docs", DOCS)
    out = tmp_path / "index"
    embedder = f"model:{base_ckpt}"
    first = index(
        [str(docs)], out, embedder=embedder, store=store, chunk_tokens=16, overlap=4, progress=False
    )
    assert first.sources == 3 and first.embedded == first.chunks > 3 and first.reused == 0
    per_source = json.loads((out / "meta.json").read_text())["sources"]
    assert sum(s["chunks"] for s in per_source.values()) == first.chunks

    (docs / "b.md").write_text(DOCS["b.md"] + " Rowing boats are pushed by oars.", encoding="utf-8")
    second = index(
        [str(docs)], out, embedder=embedder, store=store, chunk_tokens=16, overlap=4, progress=False
    )
    b_chunks = json.loads((out / "meta.json").read_text())["sources"][str(docs / "b.md")]["chunks"]
    assert second.changed_sources == [str(docs / "b.md")]
    assert second.embedded == b_chunks  # only the changed file's chunks were embedded
    assert second.reused == second.chunks - b_chunks
    assert second.removed == per_source[str(docs / "b.md")]["chunks"]

    again = index(
        [str(docs)], out, embedder=embedder, store=store, chunk_tokens=16, overlap=4, progress=False
    )
    assert again.embedded == 0 and again.reused == again.chunks

    (docs / "c.txt").unlink()
    third = index(
        [str(docs)], out, embedder=embedder, store=store, chunk_tokens=16, overlap=4, progress=False
    )
    assert third.embedded == 0 and third.removed == per_source[str(docs / "c.txt")]["chunks"]
    with Retriever(out) as r:
        hits = r.search("cats hunting at night", k=len(r))
        assert len(r) == third.chunks and {h.source for h in hits} == {
            str(docs / "a.txt"),
            str(docs / "b.md"),
        }
        for h in hits:  # offsets still point into the sources as they are now
            assert Path(h.source).read_text(encoding="utf-8")[h.start : h.end] == h.text
    assert [p.name for p in out.iterdir() if p.name != "meta.json"] == [
        json.loads((out / "meta.json").read_text())["data"]
    ]


def test_faiss_and_qdrant_agree(squad: Path, faiss_retriever: Retriever, qdrant_retriever: Retriever) -> None:
    """The same vectors give the same top-k with the same scores in both stores: every SQuAD question."""
    from gptkit.rag.evaluate import squad_questions

    f, q = faiss_retriever, qdrant_retriever
    questions = [x.text for x in squad_questions(squad)]
    assert f.meta["store"] == "faiss" and q.meta["store"] == "qdrant"
    for a, b in zip(f.search_many(questions, 10), q.search_many(questions, 10), strict=True):
        assert [(h.doc, h.start) for h in a] == [(h.doc, h.start) for h in b]
        assert max(abs(x.score - y.score) for x, y in zip(a, b, strict=True)) < 1e-5


def test_minilm_loads_quietly(squad_faiss: Path) -> None:
    """`gptkit rag query` prints gptkit's own lines only: no "Loading weights" bar, no load report."""
    done = gptkit_cli("rag", "query", str(squad_faiss), "Who were the Normans?", "-k", "1")
    assert done.returncode == 0, done.stderr
    assert [line for line in done.stderr.splitlines() if not line.startswith("gptkit: ")] == []
    assert done.stdout.startswith("[1] ")


def test_quiet_loading_puts_the_settings_back() -> None:
    """Only the load is quiet: the user's log level and progress-bar switch stand after it."""
    import logging

    from transformers.utils import logging as tf_logging

    from gptkit.rag.embedders import MiniLM

    log = logging.getLogger("transformers")
    level, bars = log.level, tf_logging.is_progress_bar_enabled()
    try:
        log.setLevel(logging.INFO)
        tf_logging.enable_progress_bar()
        MiniLM()
        assert log.level == logging.INFO and tf_logging.is_progress_bar_enabled()
    finally:
        log.setLevel(level)
        (tf_logging.enable_progress_bar if bars else tf_logging.disable_progress_bar)()


def test_hnsw_store_finds_what_exact_search_finds(tmp_path: Path, base_ckpt: Path) -> None:
    docs = write_docs(tmp_path / "docs", DOCS)
    exact, hnsw = tmp_path / "exact", tmp_path / "hnsw"
    for out, kind in ((exact, "faiss"), (hnsw, "faiss-hnsw")):
        index(
            [str(docs)],
            out,
            embedder=f"model:{base_ckpt}",
            store=kind,
            chunk_tokens=16,
            overlap=4,
            progress=False,
        )
    with Retriever(exact) as a, Retriever(hnsw) as b:
        assert [h.text for h in a.search("boats", 3)] == [h.text for h in b.search("boats", 3)]


def test_kill_9_while_indexing_leaves_the_previous_index(tmp_path: Path, base_ckpt: Path) -> None:
    docs = write_docs(tmp_path / "docs", DOCS)
    out = tmp_path / "index"
    embedder = f"model:{base_ckpt}"
    index([str(docs)], out, embedder=embedder, store="qdrant", chunk_tokens=16, overlap=4, progress=False)
    with Retriever(out) as r:
        before = [(h.text, h.score) for h in r.search("apples", 3)]
    big = "\n\n".join(
        f"Paragraph {i} tells of harbour number {i} and its {i % 7} lighthouses." for i in range(3000)
    )
    (docs / "d.txt").write_text(big, encoding="utf-8")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptkit", "rag", "index", str(docs), "--out", str(out), "--embedder", embedder,
         "--store", "qdrant", "--chunk-tokens", "16", "--overlap", "4", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.time() + 300
    while not any(p.name.startswith(".v") for p in out.iterdir()):  # the new generation is being written
        assert proc.poll() is None and time.time() < deadline, "indexing ended before it was killed"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with Retriever(out) as r:  # the previous index, whole
        assert [(h.text, h.score) for h in r.search("apples", 3)] == before
        assert {c.source for c in r.chunks} == {str(docs / n) for n in DOCS}
    done = gptkit_cli(
        "rag", "index", str(docs), "--out", str(out), "--embedder", embedder, "--store", "qdrant",
        "--chunk-tokens", "16", "--overlap", "4", "--no-progress",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert not any(p.name.startswith(".") for p in out.iterdir())  # the killed run's leftovers are gone
    with Retriever(out) as r:
        assert str(docs / "d.txt") in {c.source for c in r.chunks}


def test_bad_input_is_one_line(tmp_path: Path, base_ckpt: Path) -> None:
    embedder = f"model:{base_ckpt}"
    empty = tmp_path / "empty"
    empty.mkdir()
    done = gptkit_cli("rag", "index", str(empty), "--out", str(tmp_path / "i0"), "--embedder", embedder)
    assert (
        done.returncode == 2 and "holds no readable files" in done.stderr and "Traceback" not in done.stderr
    )

    docs = write_docs(tmp_path / "docs", DOCS)
    (docs / "blob.txt").write_bytes(bytes(range(256)) * 10)  # binary under a text name: a counted skip
    out = tmp_path / "index"
    done = gptkit_cli("rag", "index", str(docs), "--out", str(out), "--embedder", embedder, "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "1 skipped" in done.stdout and f"skipped {docs / 'blob.txt'}: binary" in done.stderr
    assert "3 sources" in done.stdout

    missing = gptkit_cli("rag", "query", str(tmp_path / "nowhere"), "apples")
    assert missing.returncode == 2 and "not found; build one with: gptkit rag index" in missing.stderr

    zero = gptkit_cli("rag", "query", str(out), "apples", "-k", "0")
    assert zero.returncode == 2 and "-k 0: ask for at least 1 passage" in zero.stderr

    other = gptkit_cli("rag", "query", str(out), "apples", "--embedder", "minilm")
    assert other.returncode == 2 and "cannot be queried through 'minilm'" in other.stderr

    long = gptkit_cli("rag", "query", str(out), "apples " * 400, "--json")
    assert long.returncode == 0, long.stderr
    assert re.search(r"the question is 40\d tokens; .* embedder reads its first 256\n$", long.stderr)
    assert json.loads(long.stdout)["hits"]

    meta = out / "meta.json"
    meta.write_text(meta.read_text()[:50])
    corrupt = gptkit_cli("rag", "query", str(out), "apples")
    assert corrupt.returncode == 2 and "meta.json is corrupt" in corrupt.stderr
    assert len(corrupt.stderr.strip().splitlines()) == 1


def test_missing_extra_names_it(tmp_path: Path) -> None:
    """Without faiss installed, the one line names the extra (faiss hidden from the subprocess)."""
    code = (
        "import sys; sys.modules['faiss'] = None\n"
        "from gptkit.cli import main\n"
        f"sys.exit(main(['rag', 'index', {str(tmp_path)!r}, '--out', {str(tmp_path / 'i')!r}]))"
    )
    (tmp_path / "a.txt").write_text("some text", encoding="utf-8")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "faiss-cpu is needed for --store faiss; install it with: pip install 'gptkit[rag]'" in done.stderr
