"""One decoding step for B sequences: gptkit's kernel against PyTorch's products, B = 1 to 16.

The number behind `KERNEL_MAX_ROWS` (gptkit/generate/cpu/linear.py): up to how many sequences a
decoding step is faster through `gptkit_decode` (the whole step in one call of gptkit's kernel,
each weight read once for all sequences) than through `GPT.forward` with PyTorch's products
(oneDNN for fp32; `torch._int_mm` on int8 activations for int8), which win once the products stop
being bound by memory. The server's batch is that B: `gptkit serve --max-batch`.

GPT-2 124M with random weights (seeded), a cache holding 64 positions, one new token per sequence.
The two ways take turns (A, B, A, B) for `--rounds` rounds of `--steps` steps each; a figure is the
median step time over rounds, with the range of the rounds' medians.

    .venv/bin/python bench/decode_rows.py            # about 2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable

import torch
from tables import markdown  # bench/tables.py: scripts run from bench/

from gptkit.generate.cpu.build import kernel
from gptkit.generate.cpu.decode import CPUDecoder
from gptkit.generate.cpu.linear import KERNEL_MAX_ROWS, use_cpu_linear
from gptkit.generate.cpu.quantize import quantize
from gptkit.model import GPT, KVCache

VOCAB = 50257
CONTEXT = 64  # cached positions before the timed steps


def stepper(model: GPT, B: int, through_kernel: bool) -> Callable[[], None]:
    """One decoding step of B sequences after CONTEXT cached positions, through `gptkit_decode` or
    GPT.forward; the cache goes back one position after each step, so every step sees the same length."""
    cache: KVCache = model.new_cache(B, CONTEXT + 8)
    with torch.inference_mode():
        model(torch.randint(0, VOCAB, (B, CONTEXT)), cache=cache)
    token = torch.randint(0, VOCAB, (B,))
    decoder = CPUDecoder(model, kernel()) if through_kernel else None

    @torch.inference_mode()
    def step() -> None:
        if decoder is not None:
            decoder.step(cache, token)
        else:
            model(token[:, None], cache=cache)
        cache.pos -= 1

    return step


def prepared(base: GPT, mode: str, with_kernel: bool) -> GPT:
    """A copy of `base` as `gptkit.load` prepares it (fp32) or quantised (int8); without the kernel,
    its layers use PyTorch's products whatever the rows (fp32: oneDNN; int8: _int_mm)."""
    model = copy.deepcopy(base)
    if mode == "fp32":
        use_cpu_linear(model, use_kernel=with_kernel)
    else:
        quantize(model, mode)
    if not with_kernel:
        for m in model.modules():
            if hasattr(m, "kernel"):
                m.kernel = None
    return model


def timed(step: Callable[[], None], steps: int) -> float:
    """Median seconds per step over `steps` steps."""
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="1,2,4,6,8,10,12,16", help="sequences per step, comma-separated")
    parser.add_argument("--modes", default="fp32,int8")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if kernel() is None:
        raise SystemExit("gptkit's CPU kernel is unavailable here: nothing to compare")
    print(
        f"torch {torch.__version__}, {args.threads} threads, load average at start {os.getloadavg()[0]:.2f}, "
        f"KERNEL_MAX_ROWS = {KERNEL_MAX_ROWS}"
    )
    torch.manual_seed(0)
    base = GPT.from_preset("gpt2", VOCAB).eval()
    others = {"fp32": "oneDNN", "int8": "torch._int_mm"}
    table = []
    for mode in args.modes.split(","):
        model, plain = prepared(base, mode, True), prepared(base, mode, False)
        for B in map(int, args.rows.split(",")):
            ways = {"kernel": stepper(model, B, True), "torch": stepper(plain, B, False)}
            rounds: dict[str, list[float]] = {name: [] for name in ways}
            for step in ways.values():  # warm-up
                step()
            for _ in range(args.rounds):
                for name, step in ways.items():
                    rounds[name].append(timed(step, args.steps) * 1e3)
            cells = [mode, str(B)]
            for r in rounds.values():
                cells.append(f"{statistics.median(r):.1f} ({min(r):.1f}-{max(r):.1f})")
            ratios = [t / k for k, t in zip(rounds["kernel"], rounds["torch"], strict=True)]
            cells.append(f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")
            best = min(statistics.median(r) for r in rounds.values())
            cells.append(f"{B / best * 1e3:.0f}")
            table.append(cells)
            print(" | ".join(cells), flush=True)
    header = ["weights", "sequences", "kernel ms/step", "PyTorch ms/step", "kernel speed-up"]
    header.append("tokens/s (faster way)")
    print()
    print(f"PyTorch: {', '.join(f'{m} through {o}' for m, o in others.items())}")
    print(markdown(header, table))


if __name__ == "__main__":
    main()
