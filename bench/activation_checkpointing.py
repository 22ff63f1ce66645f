"""Activation checkpointing (`train.activation_checkpointing`): peak memory, tokens/s and the largest
micro-batch that fits a memory budget, with and without it.

    .venv/bin/python bench/activation_checkpointing.py                  # GPT-2 124M at T=1024
    .venv/bin/python bench/activation_checkpointing.py --configs llama-tiny
    .venv/bin/python bench/activation_checkpointing.py --quick          # a small model, 1 round

Each measurement is a turn: a fresh process (this script with `--worker`) builds the real Trainer
(`Trainer.train_step()`: forward, backward, clipping, AdamW, as in bench/train_throughput.py) over
tiny Shakespeare batches (../shared/data), runs one untimed step and `--steps` timed steps inside
`fast_matmul`, as `Trainer.run` does, and reports its step times and its peak resident memory: the
kernel's `ru_maxrss` of that process (RSS, not torch's allocator: torch keeps no CPU allocator
statistics). A fresh process per turn is what makes the peak each variant's own. Without (A) and with
(B) checkpointing take turns A, B, A, B for `--rounds` rounds; the table gives the medians over the
turns and their spread (min-max).

The largest micro-batch that fits `--budget-gb` is searched each way by doubling from 1 and then
bisecting; each probe is a process running 2 training steps, watched every 20 ms and killed once its
RSS passes the budget (an out-of-memory kill counts as not fitting too), so no probe ends the script
or the machine. The README's table comes from the default run, on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from tables import markdown  # bench/tables.py: scripts run from bench/
from train_throughput import SHAKESPEARE, make_batches, ours, run_config

from gptkit.device import fast_matmul

# name: model shape, micro-batch of the timed turns, vocabulary (as in train_throughput.py), and
# the overrides beyond the shape
CONFIGS: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch=1, vocab="gpt2", extra=[]),
    "llama-tiny": dict(
        n_layer=4,
        n_head=4,
        n_embd=128,
        block_size=128,
        batch=16,
        vocab="gpt2",
        extra=["model.preset=llama-tiny", "model.n_kv_head=2", "model.mlp_hidden=352"],
    ),  # fmt: skip
    "quick": dict(n_layer=2, n_head=2, n_embd=64, block_size=128, batch=8, vocab="char", extra=[]),
}
MiB = 2**20


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One turn, in this process: build the trainer, take the steps, report times and peak RSS."""
    torch.set_num_threads(spec["threads"])
    shape = CONFIGS[spec["config"]]
    batch = spec["batch"]
    steps = spec["steps"]
    batches = make_batches(shape["vocab"], batch, shape["block_size"], steps + 1)
    with tempfile.TemporaryDirectory(prefix="gptkit-ac-bench-") as tmp:
        extra = [*shape["extra"], f"train.activation_checkpointing={str(spec['checkpointing']).lower()}"]
        cfg = run_config(shape | {"batch": batch}, spec["precision"], Path(tmp), 1000, *extra)
        trainer = ours(cfg, batches, Path(tmp))
        built = psutil.Process().memory_info().rss
        times = []
        with fast_matmul(trainer.device):
            trainer.train_step()  # untimed: the optimiser state and the allocator fill up
            for _ in range(steps):
                start = time.perf_counter()
                trainer.train_step()
                times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"times": times, "peak": peak, "built": built}


def turn(spec: dict[str, Any], budget: int | None = None) -> dict[str, Any] | None:
    """`worker(spec)` in a fresh process; None when it passed `budget` bytes of RSS or was killed."""
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watched = psutil.Process(proc.pid)
    over = False
    while proc.poll() is None:
        try:
            if budget is not None and watched.memory_info().rss > budget:
                proc.kill()
                over = True
        except psutil.Error:
            pass
        time.sleep(0.02)
    out, err = proc.communicate()
    if over or proc.returncode in (-9, 137):  # killed here, or by the kernel's out-of-memory killer
        return None
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    if budget is not None and result["peak"] > budget:
        return None  # a peak between two samples
    return result


def largest_batch(spec: dict[str, Any], budget: int, cap: int) -> tuple[int, int]:
    """(largest micro-batch whose 2 steps stay within `budget` bytes, probes taken); 0 if none does."""
    probes = 0

    def fits(batch: int) -> bool:
        nonlocal probes
        probes += 1
        ok = turn(spec | {"batch": batch, "steps": 1}, budget) is not None
        progress(f"    micro-batch {batch}: {'fits' if ok else 'does not fit'}")
        return ok

    good, bad = 0, None
    batch = 1
    while batch <= cap:
        if not fits(batch):
            bad = batch
            break
        good, batch = batch, batch * 2
    if bad is None:
        return good, probes  # the cap fits
    while bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if fits(middle) else (good, middle)
    return good, probes


def spread(values: list[float], fmt: str) -> str:
    """The median and the min-max of the turns, e.g. `1,234 (1,200-1,250)`."""
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.median(values), fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def measure(name: str, args: argparse.Namespace) -> list[list[str]]:
    shape = CONFIGS[name]
    base = {"config": name, "precision": args.precision, "threads": args.threads, "steps": args.steps}
    turns: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    for r in range(args.rounds):
        for checkpointing in (False, True):
            spec = base | {"checkpointing": checkpointing, "batch": shape["batch"]}
            result = turn(spec)
            assert result is not None
            turns[checkpointing].append(result)
        progress(f"  {name} round {r + 1}/{args.rounds} done")
    tokens = shape["batch"] * shape["block_size"]
    rows = []
    for checkpointing in (False, True):
        done = turns[checkpointing]
        speeds = [tokens / statistics.median(t["times"]) for t in done]
        peaks = [t["peak"] / MiB for t in done]
        over_built = [(t["peak"] - t["built"]) / MiB for t in done]
        largest = "-"
        if args.budget_gb:
            progress(f"  {name}: largest micro-batch in {args.budget_gb:g} GB, checkpointing {checkpointing}")
            spec = base | {"checkpointing": checkpointing}
            batch, probes = largest_batch(spec, int(args.budget_gb * 2**30), args.max_batch)
            largest = f"{batch}{'+' if batch == args.max_batch else ''} ({probes} probes)"
        rows.append(
            [
                name,
                "on" if checkpointing else "off",
                f"{shape['batch']} x {shape['block_size']}",
                spread(speeds, ",.0f"),
                spread(peaks, ",.0f"),
                spread(over_built, ",.0f"),
                largest,
            ]
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="gpt2", help="comma-separated: " + ", ".join(CONFIGS))
    parser.add_argument("--quick", action="store_true", help="a small model, 1 round, 0.5 GB budget")
    parser.add_argument("--rounds", type=int, default=3, help="turns A, B per round")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per turn")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget-gb", type=float, default=8.0, help="the batch search's budget (0: skip)")
    parser.add_argument("--max-batch", type=int, default=256, help="the batch search stops here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.quick:
        args.configs, args.rounds, args.steps, args.budget_gb = "quick", 1, 2, 0.5
    configs = [c for c in args.configs.split(",") if c]
    for c in configs:
        if c not in CONFIGS:
            parser.error(f"unknown config {c!r}; choose from {', '.join(CONFIGS)}")
    if not SHAKESPEARE.is_file():
        sys.exit(f"{SHAKESPEARE} is absent (tiny Shakespeare lives in ../shared/data)")
    print(
        f"torch {torch.__version__}, {args.precision}, {args.threads} threads, {args.rounds} rounds of "
        f"{args.steps} timed steps per turn, load average at start {os.getloadavg()[0]:.2f}"
    )
    start = time.perf_counter()
    rows = [row for name in configs for row in measure(name, args)]
    header = ["config", "checkpointing", "micro-batch x T", "tokens/s", "peak RSS MiB", "over built MiB"]
    header.append(f"largest micro-batch in {args.budget_gb:g} GB" if args.budget_gb else "largest batch")
    print()
    print(markdown(header, rows))
    print(
        "\nMedians over the turns (min-max); each turn a fresh process. Peak RSS: the process's ru_maxrss; "
        "over built: that peak less the RSS once the model and data were built."
    )
    print(f"\nload average at end {os.getloadavg()[0]:.2f}; {time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
