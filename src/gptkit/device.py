"""Device and precision choices, made once here so that training and inference agree.

The same config runs on CUDA, MPS and CPU: "auto" picks the best device present, and
"auto" precision picks bf16 autocast only where the device multiplies bf16 natively.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from gptkit.errors import GptkitError


def pick_device(name: str = "auto") -> torch.device:
    """`auto`: cuda if present, then mps, then cpu. An explicit device must exist."""
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
            f"device {name!r} asked for, but CUDA is not available here; use device=auto or cpu"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise GptkitError(f"device {name!r} asked for, but MPS is not available here; use device=auto or cpu")
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether matmuls in bf16 run on dedicated hardware (so autocast to bf16 is a speed-up)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def pick_precision(name: str, device: torch.device) -> str:
    """Resolve `auto`; refuse fp16 on CPU (no speed-up there, and the gradient scaler is CUDA-first)."""
    if name == "auto":
        return "bf16" if native_bf16(device) else "fp32"
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
    """TF32 matmuls on CUDA (Ampere and newer): much faster, and precise enough for training."""
    if device.type != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
