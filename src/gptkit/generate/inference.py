"""A trained model made ready to generate or score: on its device, then quantised or given the fast
CPU layers. The one place `gptkit.load` and `gptkit eval` prepare a model, so both run the same
numbers (and an int8 score is the int8 model's that `gptkit sample --quantize int8` decodes with)."""

from __future__ import annotations

import torch

from gptkit.config import QUANTIZE_MODES
from gptkit.errors import GptkitError
from gptkit.model import GPT


def check_quantize(mode: str | None) -> None:
    """A one-line error for an unknown mode, before anything is loaded."""
    if mode not in (None, *QUANTIZE_MODES):
        raise GptkitError(f"quantize must be {' or '.join(QUANTIZE_MODES)}, not {mode!r}")


def prepare(model: GPT, device: torch.device, quantize: str | None = None) -> GPT:
    """`model` on `device` in eval mode: quantised (`quantize` int8 or int4, CPU only), or with
    gptkit's CPU layers for fp32 on the CPU (`gptkit.generate.cpu_linear`); elsewhere as it is."""
    check_quantize(quantize)
    model = model.to(device).eval()
    if quantize is not None:
        from gptkit.generate.quantize import quantize as quantize_model

        quantize_model(model, quantize)
    else:
        from gptkit.generate.cpu_linear import use_cpu_linear

        use_cpu_linear(model)  # a no-op off the CPU or outside fp32
    return model
