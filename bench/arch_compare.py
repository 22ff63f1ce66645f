"""GPT-2-style against Llama-style at (nearly) equal parameter count, same tokens, same CPU budget.

    .venv/bin/python bench/arch_compare.py [--steps 300] [--layers 4] [--width 256] [--rounds 4]

Both train on tiny Shakespeare (../shared/data, GPT-2 tokenizer) with the same seed, batch,
schedule and steps, each through `gptkit train` in its own process (so peak memory is its own).
Llama-style is RMSNorm, SwiGLU, RoPE, 2 kv heads for 4 query heads, no biases, tied head; its MLP
width takes the parameters GQA saves (3 x width), so the counts differ by GPT-2's position table and
biases only (both are printed). The runs take turns A, B, A, B: round 1 trains `--steps` steps (the
quality figures); the further rounds train `--speed-steps` steps each, for speed alone (short runs in
quick turns see the same background load; a long run may not). The table (markdown, for the
README): parameters, final val loss and bits per byte of the val split of round 1's run (`gptkit
eval --tasks perplexity`), training tokens/s (the median over the speed rounds of each run's median
step after its first 10, with the spread; round 1's with `--rounds 1`), its ratio to GPT-2-style,
and peak RSS (the largest over rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from tables import markdown  # bench/tables.py: scripts run from bench/

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
    parser.add_argument("--rounds", type=int, default=4, help="rounds of runs; round 1 is the full one")
    parser.add_argument("--speed-steps", type=int, default=40, help="steps of the runs after round 1")
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
            "train.micro_batch_size=8", "train.lr=1e-3",
            "train.warmup_steps=30", "train.precision=fp32", "eval.every=0", "eval.batches=20",
            "eval.sample_tokens=0", "checkpoint.every_steps=0", "train.seed=1", "log.every=1",
        ]  # fmt: skip
        archs = architectures(args.width)
        results: dict[str, dict[str, Any]] = {name: {"speed": [], "peak": 0} for name in archs}
        for r in range(args.rounds):
            for name, switches in archs.items():
                run = f"{tmp}/runs/{name}-{r}"
                steps = f"train.max_steps={args.steps if r == 0 else args.speed_steps}"
                _, _, peak = gptkit("train", str(cfg), *common, *switches, steps, f"name={name}-{r}")
                metrics = [json.loads(line) for line in Path(run, "metrics.jsonl").read_text().splitlines()]
                res = results[name]
                speeds = [m["tokens_per_sec"] for m in metrics if m["split"] == "train"]
                res["speed"].append(statistics.median(speeds[10:]))
                res["peak"] = max(res["peak"], peak)
                if r == 0:
                    res["params"] = json.loads(gptkit("info", run, "--json")[0])["params"]
                    res["val"] = [m["val_loss"] for m in metrics if m["split"] == "val"][-1]
                    evaluated = gptkit("eval", run, "--tasks", "perplexity", "--text", str(data), "--json")[0]
                    res["bpb"] = _find(json.loads(evaluated), "bits_per_byte")
                print(
                    f"round {r + 1}/{args.rounds}: {name} {res['speed'][-1]:,.0f} tokens/s", file=sys.stderr
                )
    print(f"{args.layers} layers, width {args.width}, context {args.context}, {args.steps} steps of 8 x "
          f"{args.context} tokens, fp32, {os.cpu_count()} CPUs, {args.rounds} rounds (after the first, "
          f"{args.speed_steps} steps); load average at end "
          f"{os.getloadavg()[0]:.2f}\n")  # fmt: skip
    for res in results.values():
        res["speed"] = res["speed"][1:] or res["speed"]  # the speed rounds', if there were any
    base = statistics.median(results["GPT-2-style"]["speed"])
    rows = []
    for name, res in results.items():
        speed = res["speed"]
        rows.append([
            name, f"{res['params']:,}", f"{res['val']:.3f}", f"{res['bpb']:.3f}",
            f"{statistics.median(speed):,.0f} ({min(speed):,.0f}-{max(speed):,.0f})",
            f"{statistics.median(speed) / base:.2f}x", f"{res['peak'] / 2**20:,.0f} MiB",
        ])  # fmt: skip
    header = ["architecture", "parameters", "val loss", "bits/byte", "training tokens/s (spread)"]
    print(markdown([*header, "vs GPT-2-style", "peak RSS"], rows))


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
