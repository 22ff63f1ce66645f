"""Retrieval: indexing throughput against sentence-transformers, query latency, memory, and the
recall table on SQuAD (MiniLM on FAISS and Qdrant, a gptkit model's `model:` embedder, BM25).

    .venv/bin/python bench/rag_bench.py [--model RUN_OR_CKPT] [--rounds 3] [--queries 200]

1. Indexing: gptkit's embedding of the SQuAD sample's chunk views (`gptkit.rag.indexing`) against
   sentence-transformers' own `encode` of the same texts with the same model, alternating A, B, A, B;
   medians and spread of texts/s, and the ratio (target >= 0.9x).
2. Query latency, k=5, on an index of 10,000 chunks (FAISS exact; their vectors are random unit
   vectors, which costs a flat search the same as real ones), the question's embedding included:
   p50 and p99 over --queries SQuAD questions (target p50 < 20 ms on 2 cores).
3. Peak memory (max RSS) of this process.
4. recall@1/5/10 and MRR of `gptkit rag eval`'s definition on the 705 answerable questions: MiniLM on
   FAISS and on Qdrant, `model:` (with --model), and BM25 (rank_bm25, whitespace-lowercased words) on
   the same chunks as a lexical baseline.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SQUAD = ROOT.parent / "shared" / "data" / "squad" / "squad_v2_dev_first5articles.json"


def throughput(rounds: int) -> dict[str, float]:
    from gptkit.data.sources import SkipLog
    from gptkit.rag.chunking import views
    from gptkit.rag.documents import resolve_inputs
    from gptkit.rag.embedders import MiniLM
    from gptkit.rag.indexing import _chunk_input

    emb = MiniLM()
    (item,), _ = resolve_inputs([str(SQUAD)])
    chunks = _chunk_input(item, emb, emb.limit, 32, "text", SkipLog(True))
    texts = [t for c in chunks for t in views(c.text, 2)]
    ours, theirs = [], []
    for _ in range(rounds):
        for runs, encode in (
            (ours, lambda: emb.encode(texts)),
            (theirs, lambda: emb.model.encode(texts, batch_size=64, normalize_embeddings=True)),
        ):
            start = time.perf_counter()
            encode()
            runs.append(len(texts) / (time.perf_counter() - start))
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"indexing: {len(chunks)} chunks, {len(texts)} texts embedded per round, {rounds} rounds A,B,A,B")
    print(f"  gptkit                 {a:7.1f} texts/s (spread {min(ours):.1f}-{max(ours):.1f})")
    print(f"  sentence-transformers  {b:7.1f} texts/s (spread {min(theirs):.1f}-{max(theirs):.1f})")
    print(f"  ratio {a / b:.2f}x (target >= 0.9x); {a * len(chunks) / len(texts):.1f} chunks/s")
    return {"ours": a, "theirs": b}


def latency(queries: int) -> None:
    from gptkit.rag.chunking import Chunk, content_hash
    from gptkit.rag.embedders import MiniLM
    from gptkit.rag.evaluate import squad_questions
    from gptkit.rag.indexing import FORMAT, _write_generation
    from gptkit.rag.retriever import Retriever

    emb = MiniLM()
    n = 10_000
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n, emb.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    texts = [f"chunk {i}" for i in range(n)]
    chunks = [Chunk("synthetic", f"synthetic#{i}", 0, 8, t, content_hash(t)) for i, t in enumerate(texts)]
    meta = {
        "format": FORMAT, "embedder": "minilm", "embedder_id": emb.identity, "dim": emb.dim,
        "limit": emb.limit, "store": "faiss", "chunking": {}, "chunks": n, "sources": {},
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        _write_generation(Path(tmp), meta, chunks, vectors, np.arange(n))
        questions = [q.text for q in squad_questions(SQUAD)][:queries]
        with Retriever(tmp, embedder=emb) as r:
            r.search(questions[0], 5)  # warm-up
            times = []
            for q in questions:
                start = time.perf_counter()
                r.search(q, 5)
                times.append((time.perf_counter() - start) * 1000)
    p50, p99 = np.percentile(times, 50), np.percentile(times, 99)
    print(f"query latency, k=5, {n} chunks (FAISS exact), embedding included, {len(times)} questions:")
    print(f"  p50 {p50:.1f} ms, p99 {p99:.1f} ms (target p50 < 20 ms)")


def recall_table(model: str | None) -> None:
    from gptkit.rag import Retriever, index
    from gptkit.rag.evaluate import evaluate, is_hit, squad_questions

    questions = squad_questions(SQUAD)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        faiss_dir, qdrant_dir = Path(tmp) / "faiss", Path(tmp) / "qdrant"
        index([str(SQUAD)], faiss_dir, progress=False)
        index([str(SQUAD)], qdrant_dir, store="qdrant", progress=False)
        for name, folder in (("MiniLM, FAISS", faiss_dir), ("MiniLM, Qdrant", qdrant_dir)):
            with Retriever(folder) as r:
                rows.append((name, evaluate(r, questions, [1, 5, 10])))
                chunks = r.chunks
        if model:
            model_dir = Path(tmp) / "model"
            index([str(SQUAD)], model_dir, embedder=f"model:{model}", progress=False)
            with Retriever(model_dir) as r:
                rows.append((f"model:{model}", evaluate(r, questions, [1, 5, 10])))
    from rank_bm25 import BM25Okapi

    from gptkit.rag.chunking import Hit

    words = re.compile(r"\w+")
    bm25 = BM25Okapi([words.findall(c.text.lower()) for c in chunks])
    found, reciprocal = {1: 0, 5: 0, 10: 0}, 0.0
    for q in questions:
        scores = bm25.get_scores(words.findall(q.text.lower()))
        top = np.argsort(-scores)[:10]
        hits = [Hit(float(scores[i]), chunks[i].source, chunks[i].doc, chunks[i].start, chunks[i].end,
                    chunks[i].text) for i in top]  # fmt: skip
        rank = next((r for r, h in enumerate(hits, start=1) if is_hit(h, q)), None)
        if rank:
            reciprocal += 1 / rank
            for k in found:
                found[k] += rank <= k
    rows.append(("BM25 (rank_bm25)", {**{f"recall@{k}": v / len(questions) for k, v in found.items()},
                                      "mrr": reciprocal / len(questions)}))  # fmt: skip
    print(f"recall on SQuAD ({len(questions)} answerable questions, {len(chunks)} chunks):")
    print("| retriever | recall@1 | recall@5 | recall@10 | MRR |\n|---|---|---|---|---|")
    for name, r in rows:
        cells = " | ".join(f"{r[key]:.3f}" for key in ("recall@1", "recall@5", "recall@10", "mrr"))
        print(f"| {name} | {cells} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="a gptkit run or checkpoint for the model: row")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--parts", default="throughput,latency,recall", help="which parts to run")
    args = parser.parse_args()
    if not SQUAD.exists():
        sys.exit(f"{SQUAD} is absent (the benchmark reads ../shared/data)")
    parts = set(args.parts.split(","))
    if "throughput" in parts:
        throughput(args.rounds)
    if "latency" in parts:
        latency(args.queries)
    if "recall" in parts:
        recall_table(args.model)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak memory (max RSS of this process): {peak:.0f} MB")
    print(json.dumps({"done": True}))


if __name__ == "__main__":
    main()
