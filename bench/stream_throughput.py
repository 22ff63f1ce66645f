"""Streamed training data against prepared shards, and the streaming loader on its own.

1. Training: config S (6 layers, width 384, context 256, GPT-2 tokenizer, micro-batch `--batch`,
   fp32 unless `--precision`) trained by the real `Trainer.train_step()` on parts made by the real
   `pretraining_parts`: (A) `data.stream: true` from a generated jsonl corpus (`--train-mb` MB of
   tiny Shakespeare lines grouped into documents of 8-400 lines), shuffle buffer 1000, concat
   packing, `--workers` tokenizing processes; (B) the same corpus prepared by `gptkit prepare`
   (ordered windows). After one untimed step each, A and B take turns for `--rounds` rounds of
   `--steps` timed steps; tokens/s is batch x T over the median step time of each; the ratio is
   A / B. Taking turns spreads a shared machine's load over both alike.
2. The loader alone: a fresh process streams a `--loader-mb` MB jsonl (default 1000) through the
   pipeline to its end (GPT-2 tokens, `--workers` processes, buffer 1000, concat windows of 256 in
   micro-batches of 16) and reports tokens/s (tokens in windows over wall time, interpreter start
   excluded); the peak RSS of its process tree (the process and its tokenizing workers, sampled
   every 50 ms, sum; shared pages counted once per process) is measured from outside.

    .venv/bin/python bench/stream_throughput.py                     # about 15 minutes
    .venv/bin/python bench/stream_throughput.py --loader-mb 100 --rounds 2

Prints markdown tables and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
from tables import markdown  # bench/tables.py: scripts run from bench/

from gptkit.api import prepare
from gptkit.config import load_config
from gptkit.device import fast_matmul
from gptkit.runtime import Processes
from gptkit.training.parts import pretraining_parts
from gptkit.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
MB = 1_000_000

LOADER = """
import sys, time
from gptkit.config import load_config
from gptkit.data.mixing import SourceExhausted, StreamBatches
from gptkit.data.streams import stream_tokenizer
config = load_config(None, sys.argv[1:])
source = StreamBatches(config.data, stream_tokenizer(config.data).tokenizer(), 16, 256)
tokens, t0 = 0, time.perf_counter()
try:
    while True:
        tokens += source.next_batch().ids.numel()
except SourceExhausted:
    pass
print(tokens, time.perf_counter() - t0)
"""


def make_corpus(path: Path, size: int, seed: int = 0) -> None:
    """Documents of 8-400 shuffled Shakespeare lines from a pool of 300, until `size` bytes."""
    rng = random.Random(seed)
    lines = SHAKESPEARE.read_text().splitlines(keepends=True)
    pool = [json.dumps({"text": "".join(rng.sample(lines, rng.randint(8, 400)))}) + "\n" for _ in range(300)]
    written = 0
    with path.open("w") as f:
        while written < size:
            line = rng.choice(pool)
            f.write(line)
            written += len(line)


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def trainer(overrides: list[str], run_dir: Path) -> Trainer:
    config = load_config(None, overrides)
    parts = pretraining_parts(config, Processes(), torch.device("cpu"), None, None)
    return Trainer(parts, run_dir, run_dir.name)


def training(args: argparse.Namespace, tmp: Path) -> list[list[str]]:
    corpus = tmp / "train.jsonl"
    make_corpus(corpus, args.train_mb * MB)
    shards = tmp / "shards"
    prepare([corpus], shards, tokenizer="gpt2", progress=False, workers=args.workers, val_fraction=0.01)
    common = [
        "model.preset=small",
        f"train.micro_batch_size={args.batch}",
        f"train.precision={args.precision}",
    ]
    common += ["train.max_steps=100000", "train.warmup_steps=10", f"runs_dir={tmp / 'runs'}"]
    stream = [*common, "data.stream=true", f"data.path={corpus}", f"data.workers={args.workers}"]
    stream += ["data.shuffle_buffer=1000", "data.pack=concat"]
    variants = {
        "stream (jsonl)": trainer(stream, tmp / "runs" / "stream"),
        "prepared shards": trainer(
            [*common, f"data.path={shards}", "data.sampling=ordered"], tmp / "runs" / "shards"
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    with fast_matmul(torch.device("cpu")):
        for t in variants.values():
            t.model.train()
            t.train_step()  # untimed: first-step costs (allocation, the stream's first buffer fill)
        for r in range(args.rounds):
            for name, t in variants.items():
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    t.train_step()
                    times[name].append(time.perf_counter() - t0)
            progress(
                f"round {r + 1}/{args.rounds}: "
                + ", ".join(f"{n} {statistics.median(v):.3f}s" for n, v in times.items())
            )
    tokens = args.batch * 256
    rate = {name: tokens / statistics.median(v) for name, v in times.items()}
    spread = {name: (min(v), max(v)) for name, v in times.items()}
    reference = rate["prepared shards"]
    return [
        [
            name,
            f"{rate[name]:,.0f}",
            f"{spread[name][0]:.3f}-{spread[name][1]:.3f}",
            f"{rate[name] / reference:.3f}x",
        ]
        for name in variants
    ]


def loader(args: argparse.Namespace, tmp: Path) -> list[str]:
    corpus = tmp / "loader.jsonl"
    progress(f"writing a {args.loader_mb} MB corpus")
    make_corpus(corpus, args.loader_mb * MB, seed=1)
    overrides = ["data.stream=true", f"data.path={corpus}", f"data.workers={args.workers}"]
    overrides += ["data.shuffle_buffer=1000", "data.pack=concat", "data.when_exhausted=stop"]
    proc = subprocess.Popen([sys.executable, "-c", LOADER, *overrides], stdout=subprocess.PIPE, text=True)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
                peak[0] = max(peak[0], rss)
            except psutil.Error:
                pass
            time.sleep(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, _ = proc.communicate()
    done.set()
    thread.join()
    assert proc.returncode == 0
    tokens, seconds = out.split()
    corpus.unlink()
    tps = int(tokens) / float(seconds)
    return [
        f"{args.loader_mb:,} MB jsonl",
        f"{int(tokens):,}",
        f"{float(seconds):.0f}",
        f"{tps:,.0f}",
        f"{peak[0] / MB:,.0f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-mb", type=int, default=20, help="corpus of the training comparison")
    parser.add_argument("--loader-mb", type=int, default=1000, help="corpus streamed by the loader alone")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--workers", type=int, default=1, help="tokenizing processes (1: in process)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    os.environ["GPTKIT_NO_PROGRESS"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        rows = training(args, Path(tmp))
        print(
            f"\nTraining, config S (6L/384, T=256, GPT-2 tokens), micro-batch {args.batch}, "
            f"{args.precision}, "
            f"data.workers={args.workers}; {platform.processor() or platform.machine()}, "
            f"load average {os.getloadavg()[0]:.2f}\n"
        )
        print(markdown(["data", "tokens/s (median)", "step s (min-max)", "x shards"], rows))
        row = loader(args, Path(tmp))
        print(f"\nThe loader alone (data.workers={args.workers}), load average {os.getloadavg()[0]:.2f}\n")
        print(markdown(["corpus", "tokens", "seconds", "tokens/s", "peak RSS MB (tree)"], [row]))


if __name__ == "__main__":
    main()
