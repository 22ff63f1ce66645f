"""GPT-2-style against Llama-style at (nearly) equal parameter count, same tokens, same CPU budget.

    .venv/bin/python bench/arch_compare.py [--steps 300] [--layers 4] [--width 256]

Both train on tiny Shakespeare (../shared/data, GPT-2 tokenizer) with the same seed, batch,
schedule and steps, each through `gptkit train` in its own process (so peak memory is its own).
Llama-style is RMSNorm, SwiGLU, RoPE, 2 kv heads for 4 query heads, no biases, tied head; its MLP
width takes the parameters GQA saves (3 x width), so the counts differ by GPT-2's position table and
biases only (both are printed). The table (markdown, for the README): parameters, final val loss,
bits per byte of the val split (`gptkit eval --tasks perplexity`), training tokens/s, peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def architectures(width: int) -> dict[str, list[str]]:
    llama = ["model.norm=rmsnorm", "model.mlp=swiglu", "model.position=rope", "model.n_kv_head=2"]
    llama += ["model.bias=false", f"model.mlp_hidden={3 * width}"]
    return {"GPT-2-style": [], "Llama-style": llama}


def gptkit(*args: str) -> tuple[str, float, int]:
    """stdout, wall seconds and peak RSS (bytes, sampled every 50 ms) of a gptkit command."""
    cmd = [sys.executable, "-m", "gptkit", *args]
    env = {**os.environ, "GPTKIT_NO_PROGRESS": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, done = 0, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            try:
                peak = max(peak, psutil.Process(proc.pid).memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    out, err = proc.communicate()
    done.set()
    watcher.join()
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{err}")
    return out, time.perf_counter() - start, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--context", type=int, default=256)
    args = parser.parse_args()
    if not TEXT.is_file():
        sys.exit(f"{TEXT} is absent (tiny Shakespeare lives in ../shared/data)")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        gptkit("prepare", str(TEXT), "--out", str(data), "--tokenizer", "gpt2")
        cfg = Path(tmp) / "run.yaml"
        cfg.write_text("")
        common = [
            f"model.n_layer={args.layers}", "model.n_head=4", f"model.n_embd={args.width}",
            f"model.block_size={args.context}", f"data.path={data}", f"runs_dir={tmp}/runs",
            f"train.max_steps={args.steps}", "train.micro_batch_size=8", "train.lr=1e-3",
            "train.warmup_steps=30", "train.precision=fp32", "eval.every=0", "eval.batches=20",
            "eval.sample_tokens=0", "checkpoint.every_steps=0", "train.seed=1",
        ]  # fmt: skip
        rows = []
        for name, switches in architectures(args.width).items():
            run = f"{tmp}/runs/{name}"
            _, seconds, peak = gptkit("train", str(cfg), *common, *switches, f"name={name}")
            info = json.loads(gptkit("info", run, "--json")[0])
            metrics = [json.loads(line) for line in Path(run, "metrics.jsonl").read_text().splitlines()]
            val = [m["val_loss"] for m in metrics if m["split"] == "val"][-1]
            evaluated = json.loads(
                gptkit("eval", run, "--tasks", "perplexity", "--text", str(data), "--json")[0]
            )
            bpb = _find(evaluated, "bits_per_byte")
            tokens = args.steps * 8 * args.context
            rows.append((name, info["params"], val, bpb, tokens / seconds, peak))
    print(f"{args.layers} layers, width {args.width}, context {args.context}, {args.steps} steps of 8 x "
          f"{args.context} tokens, fp32, {os.cpu_count()} CPUs\n")  # fmt: skip
    print("| architecture | parameters | val loss | bits/byte | tokens/s (incl. start-up) | peak RSS |")
    print("|---|---|---|---|---|---|")
    for name, params, val, bpb, speed, peak in rows:
        print(f"| {name} | {params:,} | {val:.3f} | {bpb:.3f} | {speed:,.0f} | {peak / 2**20:,.0f} MiB |")


def _find(tree: object, key: str) -> float:
    """The first value under `key` anywhere in a JSON tree (eval's output nests it per task)."""
    if isinstance(tree, dict):
        if key in tree:
            return float(tree[key])
        tree = list(tree.values())
    if isinstance(tree, list):
        for item in tree:
            try:
                return _find(item, key)
            except KeyError:
                continue
    raise KeyError(key)


if __name__ == "__main__":
    main()
