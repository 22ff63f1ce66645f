"""Throughput and peak memory of `gptkit prepare` against raw tiktoken, measured in the same run.

For each corpus size this script

1. generates a corpus in a temporary folder from tiny Shakespeare (../shared/data beside the
   project root): its lines shuffled by a seeded RNG and grouped into documents of 8-400 lines,
   written as one .jsonl file (field "text"; the headline format) or with `--format txt` as a
   folder of ~1 MB .txt files (each file one document);
2. runs `python -m gptkit prepare CORPUS --tokenizer gpt2 --workers N --no-progress` as a
   subprocess: wall time of the whole command (interpreter start and imports included), tokens
   from meta.json, and the peak memory of its process tree (RSS of the process and all its
   children, sampled every 50 ms, max of the sum; the main process's own peak too). The sum counts
   pages shared between processes (libraries, the forkserver's preloaded modules) once per
   process, so it overstates the tree's real footprint;
3. runs the reference in a subprocess: the same documents read into a list and encoded by raw
   tiktoken `encode_ordinary_batch(docs, num_threads=N)` with the same gpt2 encoding, timing the
   encode alone and read+encode, with the same memory sampling;
4. checks the token counts agree (gptkit's tokens minus its end-of-text tokens = tiktoken's); for
   txt, gptkit tokenizes large files in chunks cut after newlines, so counts differ by a few
   tokens at the cuts, which is reported.

It prints a markdown table; "ratio" is gptkit's tok/s over raw tiktoken's encode-only tok/s (the
stricter of the two), "ratio r+e" over tiktoken's read+encode. tok/s counts text tokens only
(end-of-text tokens excluded) for both. MB = 10^6 bytes of UTF-8 text. "CPU-s" is the CPU
time of each whole process tree (sampled; tiktoken's includes its start and read): on a busy
machine it is steadier than wall time.

    .venv/bin/python bench/prepare_throughput.py                 # sizes 120,360 MB, workers 2
    .venv/bin/python bench/prepare_throughput.py --sizes 120 --workers 2 --format txt

The machine is shared with whatever else runs on it; the two measurements of a size run back to
back (in alternating order with `--repeat`, which keeps the fastest run of each and the highest
peaks), so they see about the same load; the load average is printed with the table. Progress
lines on stderr also give each run's CPU seconds (whole process tree, sampled).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
MB = 1_000_000
TXT_FILE_BYTES = 1 * MB  # --format txt: documents are grouped into files of about this size


# ---------------------------------------------------------------------------------------------
# Corpus


def shakespeare_lines() -> list[str]:
    if not SHAKESPEARE.is_file():
        sys.exit(
            f"error: {SHAKESPEARE} is absent; this benchmark builds its corpus from tiny Shakespeare "
            "(put input.txt in ../shared/data/tinyshakespeare/ beside the project root)"
        )
    return SHAKESPEARE.read_text(encoding="utf-8").splitlines(keepends=True)


def documents(lines: list[str], size_bytes: int, seed: int):
    """Yield documents (runs of 8-400 shuffled lines) until `size_bytes` of UTF-8 text."""
    rng = random.Random(seed)
    pool: list[str] = []
    total = 0
    while total < size_bytes:
        n = rng.randint(8, 400)
        while len(pool) < n:
            fresh = lines[:]
            rng.shuffle(fresh)
            pool.extend(fresh)
        doc, pool = "".join(pool[-n:]), pool[:-n]
        total += len(doc.encode("utf-8"))
        yield doc


def make_corpus(folder: Path, size_mb: float, fmt: str, seed: int) -> dict[str, Any]:
    """Write the corpus; return its path, document count and text bytes."""
    lines = shakespeare_lines()
    folder.mkdir(parents=True, exist_ok=True)
    n_docs = n_bytes = 0
    if fmt == "jsonl":
        path = folder / "corpus.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for doc in documents(lines, int(size_mb * MB), seed):
                f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
                n_docs += 1
                n_bytes += len(doc.encode("utf-8"))
    else:
        path = folder / "corpus"
        path.mkdir()
        buf: list[str] = []
        size = 0

        def flush() -> None:
            nonlocal n_docs, buf, size
            (path / f"{n_docs:06d}.txt").write_text("".join(buf), encoding="utf-8")
            n_docs += 1
            buf, size = [], 0

        for doc in documents(lines, int(size_mb * MB), seed):
            buf.append(doc)
            size += len(doc.encode("utf-8"))
            n_bytes += len(doc.encode("utf-8"))
            if size >= TXT_FILE_BYTES:
                flush()
        if buf:
            flush()
    return {"path": path, "documents": n_docs, "text_bytes": n_bytes}


def read_documents(path: Path, fmt: str) -> list[str]:
    if fmt == "jsonl":
        with path.open("rb") as f:
            return [json.loads(line)["text"] for line in f if line.strip()]
    return [p.read_text(encoding="utf-8") for p in sorted(path.glob("*.txt"))]


# ---------------------------------------------------------------------------------------------
# Measuring a subprocess


def run_measured(cmd: list[str], workdir: Path, interval: float = 0.05) -> dict[str, Any]:
    """Run `cmd`; wall time and peak RSS of its whole process tree (sum) and of the process itself."""
    import psutil

    out_path, err_path = workdir / "stdout.txt", workdir / "stderr.txt"
    with out_path.open("w") as out, err_path.open("w") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT)
        peak = {"tree": 0, "main": 0}
        cpu: dict[int, float] = {}  # pid -> last seen user+system CPU seconds
        stop = threading.Event()

        def sample() -> None:
            try:
                p = psutil.Process(proc.pid)
            except psutil.NoSuchProcess:
                return
            while not stop.is_set():
                try:
                    main = p.memory_info().rss
                    kids = p.children(recursive=True)
                except psutil.NoSuchProcess:
                    return
                tree = main
                for k in [p, *kids]:
                    try:
                        if k is not p:
                            tree += k.memory_info().rss
                        t = k.cpu_times()
                        cpu[k.pid] = t.user + t.system
                    except psutil.NoSuchProcess:
                        pass
                peak["main"] = max(peak["main"], main)
                peak["tree"] = max(peak["tree"], tree)
                stop.wait(interval)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        rc = proc.wait()
        wall = time.perf_counter() - t0
        stop.set()
        sampler.join()
    stdout, stderr = out_path.read_text(), err_path.read_text()
    if rc != 0:
        sys.exit(f"error: {' '.join(map(str, cmd))} failed ({rc}):\n{stderr[-3000:]}")
    return {
        "wall": wall,
        "peak_tree": peak["tree"],
        "peak_main": peak["main"],
        "cpu": sum(cpu.values()),
        "stdout": stdout,
    }


def run_gptkit(corpus: Path, workdir: Path, workers: int) -> dict[str, Any]:
    out = workdir / "prepared"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "gptkit", "prepare", str(corpus), "--out", str(out)]
    cmd += ["--tokenizer", "gpt2", "--workers", str(workers), "--no-progress"]
    r = run_measured(cmd, workdir)
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    splits = meta["splits"]
    r["tokens"] = sum(splits[s]["tokens"] for s in splits)
    r["pieces"] = sum(splits[s]["documents"] for s in splits)  # pieces (= documents for .jsonl)
    shutil.rmtree(out)
    return r


def run_reference(corpus: Path, workdir: Path, threads: int, fmt: str) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--reference", str(corpus)]
    cmd += ["--threads", str(threads), "--format", fmt]
    r = run_measured(cmd, workdir)
    r.update(json.loads(r["stdout"].strip().splitlines()[-1]))
    return r


def reference_main(corpus: Path, threads: int, fmt: str) -> None:
    """In a subprocess: raw tiktoken over the same documents; prints one JSON line."""
    from gptkit.tokenizer import gpt2_tokenizer

    enc = gpt2_tokenizer()._enc  # the tiktoken.Encoding gptkit uses (built from the shipped ranks)
    enc.encode_ordinary("warm up")
    t0 = time.perf_counter()
    docs = read_documents(corpus, fmt)
    t1 = time.perf_counter()
    ids = enc.encode_ordinary_batch(docs, num_threads=threads)
    t2 = time.perf_counter()
    tokens = sum(map(len, ids))
    print(json.dumps({"tokens": tokens, "documents": len(docs), "read_s": t1 - t0, "encode_s": t2 - t1}))


# ---------------------------------------------------------------------------------------------
# Report


def measure_size(size_mb: float, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    work = tmp / f"size-{size_mb:g}"
    t = time.perf_counter()
    corpus = make_corpus(work / "data", size_mb, args.format, args.seed)
    print(
        f"# {size_mb:g} MB: generated {corpus['text_bytes'] / MB:.1f} MB of text in "
        f"{corpus['documents']:,} documents ({args.format}) in {time.perf_counter() - t:.1f} s",
        file=sys.stderr,
    )
    gruns: list[dict[str, Any]] = []
    truns: list[dict[str, Any]] = []
    for rep in range(args.repeat):
        # Alternate which goes first, so neither always meets the machine in the same state.
        if rep % 2 == 0:
            truns.append(run_reference(corpus["path"], work, args.workers, args.format))
            gruns.append(run_gptkit(corpus["path"], work, args.workers))
        else:
            gruns.append(run_gptkit(corpus["path"], work, args.workers))
            truns.append(run_reference(corpus["path"], work, args.workers, args.format))
        g, t_ = gruns[-1], truns[-1]
        print(
            f"#   run {rep + 1}: gptkit {g['wall']:.1f} s, {g['cpu']:.1f} CPU-s "
            f"(peak {g['peak_tree'] / MB:.0f} MB); "
            f"tiktoken encode {t_['encode_s']:.1f} s, read+encode {t_['read_s'] + t_['encode_s']:.1f} s, "
            f"process {t_['wall']:.1f} s, {t_['cpu']:.1f} CPU-s (peak {t_['peak_tree'] / MB:.0f} MB)",
            file=sys.stderr,
        )
    shutil.rmtree(work)
    # The fastest run of each; the highest peaks of all runs.
    best_g = {
        **min(gruns, key=lambda r: r["wall"]),
        "peak_tree": max(r["peak_tree"] for r in gruns),
        "peak_main": max(r["peak_main"] for r in gruns),
    }
    best_t = {**min(truns, key=lambda r: r["encode_s"]), "peak_tree": max(r["peak_tree"] for r in truns)}
    best_t["read_s"] = min(r["read_s"] + r["encode_s"] for r in truns) - best_t["encode_s"]

    eot = corpus["documents"]  # one end-of-text per document (per file for txt)
    text_tokens = best_g["tokens"] - eot
    agree = text_tokens == best_t["tokens"]
    if args.format == "jsonl" and not agree:
        sys.exit(
            f"error: token counts disagree: gptkit {best_g['tokens']:,} - {eot:,} end-of-text = "
            f"{text_tokens:,}, tiktoken {best_t['tokens']:,}"
        )
    tokens = best_t["tokens"]
    return {
        "mb": corpus["text_bytes"] / MB,
        "tokens": tokens,
        "agree": agree,
        "diff": text_tokens - best_t["tokens"],
        "g_wall": best_g["wall"],
        "g_tps": tokens / best_g["wall"],
        "t_tps": tokens / best_t["encode_s"],
        "t_re_tps": tokens / (best_t["read_s"] + best_t["encode_s"]),
        "g_cpu": best_g["cpu"],
        "t_cpu": best_t["cpu"],
        "g_peak": best_g["peak_tree"] / MB,
        "g_main": best_g["peak_main"] / MB,
        "t_peak": best_t["peak_tree"] / MB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="120,360", help="corpus sizes in MB, comma-separated")
    parser.add_argument(
        "--size-mb", type=float, default=None, help="one corpus size in MB (overrides --sizes)"
    )
    parser.add_argument("--workers", type=int, default=2, help="gptkit workers = tiktoken threads")
    parser.add_argument("--format", choices=["jsonl", "txt"], default="jsonl", help="corpus format")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated corpus")
    parser.add_argument("--repeat", type=int, default=1, help="runs per size; the fastest is kept")
    parser.add_argument("--tmp", default=None, help="folder for the temporary corpus (default: system temp)")
    parser.add_argument("--reference", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference is not None:
        reference_main(args.reference, args.threads, args.format)
        return

    sizes = [args.size_mb] if args.size_mb is not None else [float(s) for s in args.sizes.split(",")]
    shakespeare_lines()  # fail early and clearly if absent
    try:
        import psutil  # noqa: F401
    except ImportError:
        sys.exit("error: the benchmark measures memory with psutil: pip install psutil (or gptkit[dev])")
    rows = []
    with tempfile.TemporaryDirectory(prefix="gptkit-bench-", dir=args.tmp) as tmp:
        for size in sizes:
            rows.append(measure_size(size, args, Path(tmp)))

    import numpy
    import tiktoken

    cpus = os.cpu_count()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"\nMachine: {cpus} cores ({platform.processor() or platform.machine()}, load average now {load}), "
        f"Python {platform.python_version()}, tiktoken {tiktoken.__version__}, numpy {numpy.__version__}; "
        f"gptkit --workers {args.workers} vs tiktoken num_threads={args.workers}; corpus: {args.format}\n"
    )
    print(
        "| corpus MB | tokens | gptkit tok/s | tiktoken tok/s (encode) | ratio | "
        "tiktoken tok/s (read+encode) | ratio r+e | gptkit peak MB (tree / main) | tiktoken peak MB | "
        "CPU-s gptkit / tiktoken |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['mb']:.0f} | {r['tokens']:,} | {r['g_tps'] / 1e6:.2f} M | {r['t_tps'] / 1e6:.2f} M | "
            f"{r['g_tps'] / r['t_tps']:.2f} | {r['t_re_tps'] / 1e6:.2f} M | "
            f"{r['g_tps'] / r['t_re_tps']:.2f} | "
            f"{r['g_peak']:.0f} / {r['g_main']:.0f} | {r['t_peak']:.0f} | "
            f"{r['g_cpu']:.1f} / {r['t_cpu']:.1f} |"
        )
    for r in rows:
        if not r["agree"]:
            print(
                f"\nnote ({r['mb']:.0f} MB, txt): gptkit tokenizes big files in chunks cut after newlines, "
                f"so its text tokens differ from whole-file tiktoken by {r['diff']:+,} at chunk boundaries"
            )
    print(
        "\ngptkit times are the whole command (interpreter start, imports, tokenizer build in each "
        "process, train/val split, shard writing, fsync); tiktoken's exclude its interpreter start "
        "and tokenizer build."
    )


if __name__ == "__main__":
    main()
