"""`gptkit prepare` streams its input: memory stays flat however large the corpus.

A generated corpus of about 100 MB is prepared with `--workers 2` in a subprocess, sampling the RSS
of its whole process tree (main process, forkserver, workers, resource tracker) every 50 ms. The
tree's fixed cost (4-5 Python interpreters with numpy and tiktoken, about 250-300 MB of RSS summed,
shared library pages counted in each process) does not depend on the corpus, so it is measured on
a small corpus first with the same command; the large corpus may add at most a quarter of its own
size on top. Holding the corpus (or its tokens, 2 bytes each, or its Python token lists, 36 bytes
each) in any one process would add at least its size, so this cannot pass unless prepare streams.
`bench/prepare_throughput.py` shows the same for corpora of several hundred MB.
"""

from __future__ import annotations

import contextlib
import json
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from gptkit.tokenizer import gpt2_tokenizer

psutil = pytest.importorskip("psutil")

MB = 1_000_000
CORPUS_BYTES = 100 * MB
BASELINE_BYTES = 5 * MB  # several 1 MB batches: both workers start, as in the large run
GROWTH_LIMIT = 0.25  # of the corpus size


def make_corpus(path: Path, lines: list[str], size: int, seed: int) -> tuple[int, int, int]:
    """A .jsonl of documents (runs of shuffled Shakespeare lines) drawn from a pool of 300.

    Returns (documents, text bytes, gpt2 tokens with one end-of-text per document); the pool is
    tokenized once, so the expected count costs nothing however large the corpus.
    """
    rng = random.Random(seed)
    tokenizer = gpt2_tokenizer()
    pool = []
    for _ in range(300):
        text = "".join(rng.sample(lines, rng.randint(8, 400)))
        pool.append((json.dumps({"text": text}) + "\n", len(text.encode()), len(tokenizer.encode(text)) + 1))
    docs = nbytes = tokens = 0
    with path.open("w", encoding="utf-8") as f:
        while nbytes < size:
            line, n, t = rng.choice(pool)
            f.write(line)
            docs, nbytes, tokens = docs + 1, nbytes + n, tokens + t
    return docs, nbytes, tokens


def prepare_peak(source: Path, out: Path) -> tuple[int, int]:
    """Run `gptkit prepare` with 2 workers; peak RSS of its process tree (sum) and of its main process."""
    cmd = [sys.executable, "-m", "gptkit", "prepare", str(source), "--out", str(out)]
    cmd += ["--tokenizer", "gpt2", "--workers", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = {"tree": 0, "main": 0}
    done = threading.Event()

    def sample() -> None:
        try:
            main = psutil.Process(proc.pid)
        except psutil.NoSuchProcess:
            return
        while not done.is_set():
            try:
                rss = main.memory_info().rss
                children = main.children(recursive=True)
            except psutil.NoSuchProcess:
                return
            tree = rss
            for child in children:
                with contextlib.suppress(psutil.NoSuchProcess):
                    tree += child.memory_info().rss
            peak["main"], peak["tree"] = max(peak["main"], rss), max(peak["tree"], tree)
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        _, stderr = proc.communicate(timeout=600)
    finally:
        proc.kill()
        done.set()
        sampler.join()
    assert proc.returncode == 0, stderr
    return peak["tree"], peak["main"]


@pytest.mark.slow
def test_prepare_memory_stays_flat_on_a_large_corpus(tmp_path: Path, shakespeare: Path) -> None:
    lines = shakespeare.read_text(encoding="utf-8").splitlines(keepends=True)
    small, large = tmp_path / "small.jsonl", tmp_path / "large.jsonl"
    make_corpus(small, lines, BASELINE_BYTES, seed=1)
    docs, nbytes, tokens = make_corpus(large, lines, CORPUS_BYTES, seed=2)

    base_tree, base_main = prepare_peak(small, tmp_path / "small-out")
    tree, main = prepare_peak(large, tmp_path / "large-out")

    meta = json.loads((tmp_path / "large-out" / "meta.json").read_text(encoding="utf-8"))
    splits = meta["splits"]
    assert splits["train"]["tokens"] + splits["val"]["tokens"] == tokens
    assert splits["train"]["documents"] + splits["val"]["documents"] == docs
    assert splits["val"]["documents"] > 0

    report = (
        f"corpus {nbytes / MB:.0f} MB, {tokens:,} tokens: peak RSS of the process tree {tree / MB:.0f} MB "
        f"(main {main / MB:.0f} MB); on a {BASELINE_BYTES / MB:.0f} MB corpus {base_tree / MB:.0f} MB "
        f"(main {base_main / MB:.0f} MB)"
    )
    print(report)
    assert tree - base_tree < GROWTH_LIMIT * nbytes, report
    assert main - base_main < GROWTH_LIMIT * nbytes, report
