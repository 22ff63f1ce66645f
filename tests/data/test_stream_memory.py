"""The streamed pipeline's memory is bounded by its buffers, not by the corpus.

A generated 400 MB jsonl and a 40 MB one are each streamed to their end (every document tokenized,
shuffled through a buffer of 256 documents and packed) in a fresh process, which reports its peak
RSS. The char tokenizer (from a tiny prepared folder, the second source) keeps the 400 MB run to
about a minute. Holding the corpus, or its tokens, in memory would add hundreds of MB to the large
run's peak; it must stay within 10% of the small run's.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from gptkit.api import prepare

MB = 1_000_000
ALPHABET = "abcdefghijklmnopqrstuvwxyz ."

CHILD = """
import resource, sys
from gptkit.config import load_config
from gptkit.data.mixing import StreamBatches
from gptkit.data.streams import stream_tokenizer
from gptkit.errors import GptkitError
config = load_config(None, sys.argv[1:])
source = StreamBatches(config.data, stream_tokenizer(config.data).tokenizer(), 16, 1024)
tokens = 0
try:
    while True:
        tokens += source.next_batch().ids.numel()
except GptkitError as e:
    assert "every source ran out" in str(e), e
print(tokens, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def make_corpus(path: Path, size: int) -> None:
    """Documents of 1-8 KB from a pool of 200, written until the file holds `size` bytes."""
    rng = random.Random(0)
    pool = [
        json.dumps({"text": "".join(rng.choices(ALPHABET, k=rng.randint(1000, 8000)))}) + "\n"
        for _ in range(200)
    ]
    written = 0
    with path.open("w") as f:
        while written < size:
            line = rng.choice(pool)
            f.write(line)
            written += len(line)


def peak(corpus: Path, chars: Path) -> tuple[int, int]:
    sources = f"[{{path: '{corpus}', weight: 0.99}}, {{path: '{chars}', weight: 0.01}}]"
    args = ["data.stream=true", "data.tokenizer=char", f"data.sources={sources}", "data.shuffle_buffer=256"]
    args += ["data.pack=best_fit", "data.when_exhausted=renormalise"]
    out = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    tokens, rss = out.stdout.split()
    return int(tokens), int(rss)


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_corpus(tmp_path: Path) -> None:
    chars = tmp_path / "chars"
    (tmp_path / "alphabet.txt").write_text(ALPHABET * 50)
    prepare([str(tmp_path / "alphabet.txt")], chars, tokenizer="char", progress=False, workers=1)
    small, large = tmp_path / "small.jsonl", tmp_path / "large.jsonl"
    make_corpus(small, 40 * MB)
    make_corpus(large, 400 * MB)
    try:
        small_tokens, small_rss = peak(small, chars)
        large_tokens, large_rss = peak(large, chars)
    finally:
        large.unlink()
    assert large_tokens > 9 * small_tokens  # the whole of each corpus went through
    print(f"peak RSS: 40 MB corpus {small_rss / MB:.0f} MB, 400 MB corpus {large_rss / MB:.0f} MB")
    assert large_rss <= 1.10 * small_rss, (small_rss / MB, large_rss / MB)
