"""What a training step costs: FLOPs (for MFU), the matmul ceiling, and memory (for auto batch size)."""

from __future__ import annotations

import functools
import os
import time

import torch

from gptkit.config import ModelConfig


def flops_per_token(config: ModelConfig, n_params: int) -> int:
    """Training FLOPs per token: 6N for the weights (forward + backward) plus attention's
    12 * n_layer * n_embd * block_size (PaLM paper, appendix B)."""
    return 6 * n_params + 12 * config.n_layer * config.n_embd * config.block_size


@functools.cache
def matmul_ceiling(device_type: str, precision: str) -> float:
    """Measured FLOP/s of large matmuls in `precision` on this device: the physical ceiling MFU refers to.

    5 to 20 timed 2048^3 matmuls (about a second at most, into a preallocated output); the median of
    the fastest three: fast ones, so that other work on a shared machine does not lower the ceiling
    (which would inflate MFU), but not a single outlier.
    """
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    n = 2048
    g = torch.Generator(device_type).manual_seed(0)  # its own generator: training's RNG stays untouched
    a = torch.randn(n, n, device=device_type, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device_type, dtype=dtype, generator=g)
    out = torch.mm(a, b)  # warm-up: the first call may set kernels up
    times = []
    start = time.perf_counter()
    for i in range(20):
        _sync(device_type)
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        _sync(device_type)
        times.append(time.perf_counter() - t0)
        if i >= 4 and time.perf_counter() - start > 1.0:
            break
    return 2 * n**3 / sorted(times)[1]


def _sync(device_type: str) -> None:
    if device_type == "cuda":
        torch.cuda.synchronize()
    elif device_type == "mps":
        torch.mps.synchronize()


def memory_estimate(config: ModelConfig, n_params: int, micro_batch: int, precision: str) -> dict[str, int]:
    """Bytes for weights, gradients, AdamW state and activations of one micro-batch.

    Activations follow Korthikanti et al. (2022) with fused attention (no T x T scores kept):
    about 34 * B * T * n_embd values per layer, plus the logits and their gradient.
    """
    b, t = micro_batch, config.block_size
    per_layer = 34 * b * t * config.n_embd * (2 if precision == "fp32" else 1)  # 34sbh bytes at 16 bits
    logits = 3 * b * t * config.padded_vocab_size * 4  # logits, their fp32 copy and gradient
    return {
        "weights": 4 * n_params,
        "gradients": 4 * n_params,
        "optimizer": 8 * n_params,
        "activations": config.n_layer * per_layer + logits,
    }


def available_memory(device: torch.device) -> int:
    """Free bytes for a training process on the device."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
