"""A trained model made ready to generate or score: on its device, then quantised or given the fast
CPU layers. The one place `gptkit.load` and `gptkit eval` prepare a model, so both run the same
numbers (and an int8 score is the int8 model's that `gptkit sample --quantize int8` decodes with),
and the one place that chooses which decoder goes with a prepared model (`fastest_decoder`)."""

from __future__ import annotations

import torch

from gptkit.config import QUANTIZE_MODES
from gptkit.console import notice
from gptkit.errors import GptkitError
from gptkit.generate.cpu.decode import CPUDecoder, kernel_misfits
from gptkit.generate.cpu.linear import use_cpu_linear
from gptkit.generate.cpu.quantize import quantize as quantize_model
from gptkit.generate.decoder import Decoder, ForwardDecoder
from gptkit.model import GPT


def check_quantize(mode: str | None) -> None:
    """A one-line error for an unknown mode, before anything is loaded."""
    if mode not in (None, *QUANTIZE_MODES):
        raise GptkitError(f"quantize must be {' or '.join(QUANTIZE_MODES)}, not {mode!r}")


def prepare(model: GPT, device: torch.device, quantize: str | None = None) -> GPT:
    """`model` on `device` in eval mode: quantised (`quantize` int8 or int4, CPU only), or with
    gptkit's CPU layers for fp32 on the CPU (`gptkit.generate.cpu.linear`); elsewhere as it is."""
    check_quantize(quantize)
    model = model.to(device).eval()
    misfits = kernel_misfits(model.config)
    if device.type == "cpu" and misfits:
        notice(
            f"gptkit's CPU decoding kernel computes GPT-2's layers, not {', '.join(misfits)}: "
            "this model decodes through PyTorch (GPT.forward), the same logits, slower per token"
        )
    if quantize is not None:
        quantize_model(model, quantize)
    else:
        use_cpu_linear(model)  # a no-op off the CPU or outside fp32
    return model


def fastest_decoder(model: GPT, batch_size: int) -> Decoder:
    """A whole step in one call of gptkit's CPU kernel where it serves (fp32 and int8 models that
    `prepare` made, up to `decode.MAX_ROWS` sequences), else GPT.forward: the sampler's `decoder_for`."""
    return CPUDecoder.of(model, batch_size) or ForwardDecoder(model)
