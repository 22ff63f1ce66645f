"""Quantised inference on CPU: int8 or 4-bit weights for a trained GPT, applied in place at load time.

`quantize(model, "int8" | "int4")` replaces the four Linear layers of every block and the output head;
the token embedding becomes an int8 table whose rows are dequantised when looked up. Weight tying
is broken on purpose: the head and the embedding each hold their own quantised copy, because the
kernels want the head's weights packed in their own layout, and 2 x int8 (or int4 + int8) is still
far below one fp32 copy. Position embeddings, LayerNorms and biases stay fp32 (a few hundred KB).

Kernels, measured on this project's CPU (Xeon, AVX-512 + AMX, 2 threads, torch 2.13; microseconds
per call for a 2304x768 / 768x3072 / 50304x768 weight; one token, then 32 prompt tokens):

    fp32 F.linear                        ~200 / 260 / 3000-8000     1.0-1.3 ms / 1.3 ms / 27 ms at 32
    dynamic int8 (fbgemm, per channel)   85 / 92 / 1984              494 / 420 / 6394 at 32
    _weight_int8pack_mm, bf16 input      129 / 122 / 4355            5041 / 1681 / 41649 at 32
    _weight_int8pack_mm, fp32 input      5618 / 2223 / 27937         (unusable: no vectorised path)
    _weight_int4pack_mm_for_cpu, bf16    109 / 115 / 2300            1219 / 1516 / 32175 at 32
    _weight_int4pack_mm_for_cpu, fp32    6940 / 4361 / 68622         (unusable)

So int8 uses torch's dynamic-quantised Linear (fbgemm; activations are quantised per call, weights
per output channel) and int4 uses `_weight_int4pack_mm_for_cpu` with bf16 activations and group-wise
asymmetric scales. There was no case left for a plain dequantise-then-matmul fallback.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptkit.errors import GptkitError
from gptkit.model import GPT

Mode = Literal["int8", "int4"]
INT4_GROUP = 64  # weights sharing one scale and zero point; 32 costs 12% more bytes for little gain


@dataclass
class QuantizeReport:
    """What `quantize` did: bytes of all weights before and after, and the layers it replaced."""

    mode: str
    bytes_before: int
    bytes_after: int
    layers: list[str] = field(default_factory=list)

    @property
    def saved(self) -> int:
        return self.bytes_before - self.bytes_after

    def __str__(self) -> str:
        mib = 2**20
        return (
            f"{self.mode}: weights {self.bytes_before / mib:.1f} MiB -> {self.bytes_after / mib:.1f} MiB "
            f"({self.bytes_after / self.bytes_before:.0%}), {len(self.layers)} layers quantised"
        )


class Int8Linear(nn.Module):
    """int8 weights with one scale per output channel, run by fbgemm's dynamic-quantised Linear.

    The activations are quantised per call (per tensor), which is what makes the kernel fast: an
    int8 x int8 matmul, 2-3x faster than fp32 at one token and at a prompt (see the module docstring).
    """

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        out_features, in_features = weight.shape
        self.in_features, self.out_features = in_features, out_features
        float_linear = nn.Linear(in_features, out_features, bias=bias is not None)
        with torch.no_grad():
            float_linear.weight.copy_(weight)
            if bias is not None:
                float_linear.bias.copy_(bias)
        float_linear.qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
        with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao
            warnings.simplefilter("ignore")
            self.inner = torch.ao.nn.quantized.dynamic.Linear.from_float(float_linear)

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x)

    def dequantized_weight(self) -> Tensor:
        return self.inner.weight().dequantize()

    def nbytes(self) -> int:
        """int8 weights, fp32 scales (fbgemm keeps them per channel) and the fp32 bias."""
        weight, bias = self.inner._weight_bias()
        return weight.numel() + 4 * self.out_features + (0 if bias is None else 4 * bias.numel())


class Int4Linear(nn.Module):
    """4-bit weights in groups of `group` inputs, each group with a bf16 scale and zero point.

    Runs `torch.ops.aten._weight_int4pack_mm_for_cpu`, which needs bf16 activations (with fp32 ones
    it takes 30-60x longer) and a multiple of 16 output rows: the rows are padded and cut off again.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, group: int = INT4_GROUP) -> None:
        super().__init__()
        out_features, in_features = weight.shape
        if in_features % group:
            raise GptkitError(f"int4: {in_features} inputs are not a multiple of the group size {group}")
        self.in_features, self.out_features, self.group = in_features, out_features, group
        rows = -(-out_features // 16) * 16
        w = F.pad(weight.detach().float(), (0, 0, 0, rows - out_features)).view(rows, -1, group)
        low, high = w.amin(-1), w.amax(-1)
        scale = ((high - low) / 15).clamp(min=1e-8)
        q = ((w - low[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32)
        zero = low + 8 * scale  # the kernel computes (q - 8) * scale + zero
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.view(rows, -1), 1)
        self.register_buffer("packed", packed)
        scales_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
        self.register_buffer("scales_zeros", scales_zeros.to(torch.bfloat16))  # (in / group, rows, 2)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, self.in_features).to(torch.bfloat16), self.packed, self.group, self.scales_zeros
        )
        y = y[:, : self.out_features].float()
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features)

    def dequantized_weight(self) -> Tensor:
        """The weights the kernel multiplies by, as fp32 (out, in): the product with the identity."""
        eye = torch.eye(self.in_features)
        bias, self.bias = self.bias, None
        try:
            return self(eye).T.contiguous()
        finally:
            self.bias = bias

    def nbytes(self) -> int:
        bias = 0 if self.bias is None else 4 * self.bias.numel()
        return self.packed.numel() * self.packed.element_size() + 2 * self.scales_zeros.numel() + bias


class Int8Embedding(nn.Module):
    """The token table as int8 rows with one fp32 scale each; a lookup dequantises only its rows."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        w = weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        self.register_buffer("qweight", (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)

    def forward(self, idx: Tensor) -> Tensor:
        return F.embedding(idx, self.qweight).float() * self.scale[idx, None]

    def nbytes(self) -> int:
        return self.qweight.numel() + 4 * self.scale.numel()


QUANTIZED = (Int8Linear, Int4Linear, Int8Embedding)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights: parameters and buffers (a shared tensor once), quantised layers by
    what they store (fbgemm's packed weights are no parameter, so they are counted by the layer)."""
    total, seen = 0, set()
    for module in model.modules():
        if isinstance(module, QUANTIZED):
            total += module.nbytes()
            continue
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if t is not None and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def quantize(model: GPT, mode: Mode) -> QuantizeReport:
    """Quantise `model` in place for CPU inference (`mode` "int8" or "int4"); returns the report.

    After this the model generates with the `Sampler` and computes losses (`model(idx, targets)`),
    but cannot be trained or saved as a checkpoint: quantise after loading, not before saving.
    """
    if mode not in ("int8", "int4"):
        raise GptkitError(f"unknown quantisation {mode!r}; choose int8 or int4")
    if model.device.type != "cpu":
        raise GptkitError(f"quantised inference runs on the CPU; the model is on {model.device}")
    model.float()  # a bf16 model is quantised from its fp32 values (no-op for fp32)
    before = weight_bytes(model)
    make = Int8Linear if mode == "int8" else Int4Linear
    layers = []
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, nn.Linear) and child is not model.lm_head:
                    setattr(module, child_name, make(child.weight, child.bias))
                    layers.append(f"{name}.{child_name}")
        # the head scores only the real vocabulary; its padding rows are left out
        model.lm_head = make(model.lm_head.weight[: model.config.vocab_size], None)
        layers.append("lm_head")
        model.transformer.wte = Int8Embedding(model.transformer.wte.weight)
        layers.append("transformer.wte")
    model.eval().requires_grad_(False)
    return QuantizeReport(mode, before, weight_bytes(model), layers)
