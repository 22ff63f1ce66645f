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

On the Xeon (AVX-512 + AMX) of earlier sessions, torch's int4 kernel wanted bf16 activations and its
own packing (`_weight_int4pack_mm_for_cpu`: 109 / 115 / 2300 with bf16, 6940 / 4361 / 68622 with
fp32); run that way here, int4 decoded GPT-2 124M slower than int8 (120 against 152 tokens/s).

So int8 keeps its weights as plain int8 rows with one scale each: decoding multiplies them in
gptkit's CPU kernel with fp32 activations (`gptkit.generate.cpu.build`; `gptkit.generate.cpu.decode`
runs a whole step of them in one call), and prompts quantise their activations per row for `torch._int_mm`
(fbgemm's packed weights were 10-20% faster at 32 rows but cannot be read by the kernel, and a
second copy would double the memory). int4 packs two 4-bit codes a byte with a bf16 scale and zero
per group of INT4_GROUP inputs (`gptkit.generate.cpu.int4`), and the same kernel multiplies them:
with AVX512-VNNI as 4-bit codes times int8 activations (quantised per 64 inputs), elsewhere looking
the weights up in registers, with fp32 activations. The group size, measured (quality:
`bench/quantize_quality.py` on the tests' trained model; time: the best of 60 decoding steps of
GPT-2 124M on 1 thread): 32 inputs cost 0.625 bytes a weight, +0.28% perplexity, 96.0% of greedy
tokens equal to fp32's, and 12% more time than 64; 64: 0.5625 bytes, +0.85%, 95.1%; 128: 0.53
bytes, +1.09%, 92.1%, 1% less time than 64. 64 it is: nearly 128's speed, nearly 32's agreement.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptkit.config import QUANTIZE_MODES, QuantizeMode
from gptkit.errors import GptkitError
from gptkit.generate.cpu import int4
from gptkit.generate.cpu.build import kernel, matvec
from gptkit.model import GPT

Mode = QuantizeMode
INT4_GROUP = 64  # inputs sharing one scale and zero point (the choice: see above)
# rows of x up to which gptkit's kernel beats unpacking the weights for F.linear (measured, GPT-2's
# block matrices, 2 threads: 2.5 / 3.2 ms against 3.4 / 12.2 at 64 rows, 5.0 / 7.9 against 8.2 / 14.2 at 128)
INT4_KERNEL_ROWS = 128
# rows of x (sequences) up to which gptkit's kernel beats torch._int_mm for int8 weights: a decoding
# step of GPT-2 124M, 2 threads (bench/decode_rows.py, medians): 8 sequences 24.4 ms against 31.8
# (1.02-1.35x per round), 10 even (0.95-1.16x), 12 and 16 slower (_int_mm's int8 x int8 products
# need half the loads)
INT8_KERNEL_ROWS = 8


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
        if self.kernel is not None and x.size(0) <= INT8_KERNEL_ROWS:
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
    """4-bit weights in groups of `group` inputs, each group with a bf16 scale and zero point
    (`gptkit.generate.cpu.int4`).

    Up to INT4_KERNEL_ROWS rows of x (decoding, short prompts) go through gptkit's CPU kernel, which
    looks the weights up in registers and multiplies them with fp32 activations (and
    `gptkit.generate.cpu.decode` runs a whole step of such layers in one call). More rows, or no
    kernel: the weights are unpacked to fp32 for this call and multiplied by F.linear.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, group: int = INT4_GROUP) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.group = group
        codes, scales = int4.pack(weight, group)
        self.register_buffer("codes", codes)  # uint8 (out, 16 * ceil(in / 32))
        self.register_buffer("scales", scales)  # bf16 (out, ceil(in / group), 2): scale, zero
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.kernel = kernel()

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features).float()
        if self.kernel is not None and x.size(0) <= INT4_KERNEL_ROWS:
            y = matvec(self.kernel, x.contiguous(), self.codes, self.bias, self.scales, self.group)
        else:
            y = F.linear(x, self.dequantized_weight(), self.bias)
        return y.view(*lead, self.out_features)

    def dequantized_weight(self) -> Tensor:
        """The weights the kernel multiplies by, as fp32 (out, in), bit for bit."""
        return int4.dequantize(self.codes, self.scales, self.in_features, self.group)

    def nbytes(self) -> int:
        """4-bit codes, bf16 scales and zeros, and the fp32 bias."""
        bias = 0 if self.bias is None else 4 * self.bias.numel()
        return self.codes.numel() + 2 * self.scales.numel() + bias


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


def quantize(model: GPT, mode: Mode, *, group: int = INT4_GROUP) -> QuantizeReport:
    """Quantise `model` in place for CPU inference (`mode` "int8" or "int4"); returns the report.

    After this the model generates with the `Sampler` and computes logits (`model(idx)`),
    but cannot be trained or saved as a checkpoint: quantise after loading, not before saving.
    `group`: int4's group size (the benchmark compares them).
    """
    if mode not in QUANTIZE_MODES:
        raise GptkitError(f"unknown quantisation {mode!r}; choose int8 or int4")
    if model.device.type != "cpu":
        raise GptkitError(f"quantised inference runs on the CPU; the model is on {model.device}")
    int4.check_group(group)
    model.float()  # a bf16 model is quantised from its fp32 values (no-op for fp32)
    before = weight_bytes(model)

    def make(weight: Tensor, bias: Tensor | None) -> nn.Module:
        return Int8Linear(weight, bias) if mode == "int8" else Int4Linear(weight, bias, group)

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
