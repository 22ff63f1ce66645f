"""Device and precision choices, made once here so that training and inference agree.

The same config runs on CUDA, MPS and CPU: "auto" picks the best device present, and
"auto" precision picks bf16 autocast only where the device multiplies bf16 natively (on a CPU, only
for models wide enough to gain from it).
"""

from __future__ import annotations

import contextlib
import ctypes
import platform
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from gptkit.errors import GptkitError

if TYPE_CHECKING:
    from gptkit.config import ModelConfig


def pick_device(name: str = "auto", local_rank: int | None = None) -> torch.device:
    """`auto`: cuda if present, then mps, then cpu. An explicit device must exist.

    `local_rank`: this process's GPU on its machine, in multi-process training (cuda -> cuda:N).
    """
    if name in ("auto", "cuda") and local_rank is not None and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GptkitError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GptkitError(
            f"device {name!r} asked for, but CUDA is not available here; use --device auto or --device cpu "
            "(in a config: train.device=auto)"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise GptkitError(
            f"device {name!r} asked for, but MPS is not available here; use --device auto or --device cpu "
            "(in a config: train.device=auto)"
        )
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether matmuls in bf16 run on dedicated hardware (so autocast to bf16 is a speed-up)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


# On CPU, bf16 autocast pays off from this model width on. bf16 / fp32 training tokens/s measured with
# bench/train_throughput.py --precision-only (2 cores with AMX): width 32 0.73x (casts cost more than
# the matmuls save), 64 1.10x, 128 1.38x (the tiny preset; 1.14x with GPT-2's vocabulary), 256
# 1.63x, 384 1.60x (the small preset). Below 128 the gain is too small to be worth the precision.
CPU_BF16_MIN_WIDTH = 128


def pick_precision(name: str, device: torch.device, model: ModelConfig | None = None) -> str:
    """Resolve `auto`; refuse fp16 on CPU (no speed-up there, and the gradient scaler is CUDA-first).

    auto: bf16 autocast where the device multiplies bf16 natively (CUDA with bf16, CPUs with
    AVX512-BF16 or AMX), except on a CPU for a `model` narrower than CPU_BF16_MIN_WIDTH: fp32 there.
    Without `model`, auto picks by the device alone.
    """
    if name == "auto":
        if not native_bf16(device):
            return "fp32"
        if device.type == "cpu" and model is not None and model.n_embd < CPU_BF16_MIN_WIDTH:
            return "fp32"
        return "bf16"
    if name == "fp16" and device.type == "cpu":
        raise GptkitError("precision fp16 is not supported on CPU; use bf16 or fp32")
    return name


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[None]:
    """Mixed-precision context for forward passes; a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def fast_matmul(device: torch.device) -> Iterator[None]:
    """Speed settings for a training loop on `device`, undone on exit.

    CUDA (Ampere and newer): TF32 matmuls, much faster and precise enough for training.
    CPU: freed memory is kept for reuse (`reuse_freed_memory`).
    """
    if device.type == "cpu":
        with reuse_freed_memory():
            yield
        return
    if device.type != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


# glibc's mallopt parameters and their defaults
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536
_reuse_depth = 0


def _glibc() -> ctypes.CDLL | None:
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


@contextlib.contextmanager
def reuse_freed_memory() -> Iterator[None]:
    """Keep freed memory in the process instead of giving it back to the OS (glibc; else a no-op).

    glibc serves every allocation above 32 MB (logits, their gradient, the fp32 copy of bf16 logits
    ...) with a fresh mmap and unmaps it when freed, so each training step page-faults its big
    tensors in again, zero-filled by the kernel: that costs as much as the softmax over the logits
    itself. Without mmap and without trimming, the heap grows to the step's peak once and each
    step reuses it (what jemalloc or tcmalloc, the usual LD_PRELOAD advice for PyTorch on CPU,
    achieve). The memory stays with the process until the context exits. Nestable.
    """
    global _reuse_depth
    libc = _glibc()
    if libc is None:
        yield
        return
    if _reuse_depth == 0:
        libc.mallopt(_M_MMAP_MAX, 0)
        libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    _reuse_depth += 1
    try:
        yield
    finally:
        _reuse_depth -= 1
        if _reuse_depth == 0:
            libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
            libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
            libc.malloc_trim(0)
