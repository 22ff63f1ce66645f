"""Quantised inference on CPU: int8 or 4-bit weights for a trained GPT, applied in place at load time.

`quantize(model, "int8" | "int4")` replaces the four Linear layers of every block and the output head;
the token embedding becomes an int8 table whose rows are dequantised when looked up. Weight tying
is broken on purpose: the head and the embedding each hold their own quantised copy, because the
kernels want the head's weights packed in their own layout, and 2 x int8 (or int4 + int8) is still
far below one fp32 copy. Position embeddings, LayerNorms and biases stay fp32 (a few hundred KB).

Kernels, measured on this project's CPU (AMD EPYC, AVX-512, 2 threads, torch 2.13; microseconds
per call for a 2304x768 / 768x3072 / 50257x768 weight, weights out of cache; one token, then 32):

    fp32: gptkit's kernel / oneDNN           145 / 184 / 5029        - ; oneDNN 699 / 730 / 13178 at 32
    int8 weights, gptkit's kernel            55 / 71 / 1260          (one token per sequence only)
    int8 x int8 torch._int_mm, per-row       77 / 88 / 1565          256 / 339 / 5649 at 32
    dynamic int8 (fbgemm, per tensor)        72 / 90 / 1587          219 / 282 / 4788 at 32

and on the Xeon (AVX-512 + AMX) of earlier sessions, for the int4 choice:

    _weight_int8pack_mm, bf16 input          129 / 122 / 4355        5041 / 1681 / 41649 at 32
    _weight_int4pack_mm_for_cpu, bf16        109 / 115 / 2300        1219 / 1516 / 32175 at 32
    _weight_int4pack_mm_for_cpu, fp32        6940 / 4361 / 68622     (unusable: no vectorised path)

So int8 keeps its weights as plain int8 rows with one scale each: decoding multiplies them in
gptkit's CPU kernel with fp32 activations (`gptkit.generate.cpu.build`; `gptkit.generate.cpu.decode`
runs a whole step of them in one call), and prompts quantise their activations per row for `torch._int_mm`
(fbgemm's packed weights were 10-20% faster at 32 rows but cannot be read by the kernel, and a
second copy would double the memory). int4 uses `_weight_int4pack_mm_for_cpu` with bf16
activations and group-wise asymmetric scales.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptkit.config import QUANTIZE_MODES, QuantizeMode
from gptkit.errors import GptkitError
from gptkit.generate.cpu.build import kernel, matvec
from gptkit.generate.cpu.linear import KERNEL_MAX_ROWS
from gptkit.model import GPT

Mode = QuantizeMode
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


def int8_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 quantisation with one fp32 scale per row: (int8 values, scales), row r ~ q[r] * s[r]."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    return (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


class Int8Linear(nn.Module):
    """int8 weights with one scale per output row.

    A few rows of x (decoding) go through gptkit's CPU kernel, which widens the weights to fp32 in
    registers, so the activations stay fp32 (and `gptkit.generate.cpu.decode` runs a whole step of
    such layers in one call). More rows (a prompt, scoring), or no kernel: the activations are
    quantised too, per row, and multiplied int8 x int8 by `torch._int_mm` (see the module docstring).
    """

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        qweight, scale = int8_rows(weight)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.kernel = kernel()

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features).float()
        if self.kernel is not None and x.size(0) <= KERNEL_MAX_ROWS:
            y = matvec(self.kernel, x.contiguous(), self.qweight, self.bias, self.scale)
        else:
            x_scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
            xq = (x / x_scale).round_().clamp_(-127, 127).to(torch.int8)
            y = torch._int_mm(xq, self.qweight.T).float().mul_(x_scale).mul_(self.scale)
            if self.bias is not None:
                y += self.bias
        return y.view(*lead, self.out_features)

    def dequantized_weight(self) -> Tensor:
        return self.qweight.float() * self.scale[:, None]

    def nbytes(self) -> int:
        """int8 weights, fp32 scales and the fp32 bias."""
        bias = 0 if self.bias is None else 4 * self.bias.numel()
        return self.qweight.numel() + 4 * self.out_features + bias


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
        qweight, scale = int8_rows(weight)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)

    def forward(self, idx: Tensor) -> Tensor:
        return F.embedding(idx, self.qweight).float() * self.scale[idx, None]

    def nbytes(self) -> int:
        return self.qweight.numel() + 4 * self.scale.numel()


QUANTIZED = (Int8Linear, Int4Linear, Int8Embedding)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights: parameters and buffers (a shared tensor once), quantised layers by
    what they store (int4's packed weights are buffers in their own layout: counted by the layer)."""
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

    After this the model generates with the `Sampler` and computes logits (`model(idx)`),
    but cannot be trained or saved as a checkpoint: quantise after loading, not before saving.
    """
    if mode not in QUANTIZE_MODES:
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
