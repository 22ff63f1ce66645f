"""Faster fp32 inference on CPUs: decoding's matrix-vector products at the speed of memory.

Decoding one token reads every weight once for a matrix-vector product, so its speed is set by how
close that product comes to the memory bandwidth. Measured on this project's CPU (AMD EPYC, 2
threads, GPT-2 124M's 48 block matrices then its 50257 x 768 head: 497 MB, far beyond the caches),
as one decode step's worth of products, median of 60:

    aten's F.linear (MKL sgemv)          about 11-13 GB/s
    oneDNN's linear                      about 24 GB/s
    gptkit's kernel (gptkit_matvec)      about 38 GB/s, within 5% of a plain `sum` of the weights

So a `CPULinear` multiplies up to `KERNEL_MAX_ROWS` rows (decoding: one token per sequence) with
gptkit's kernel (`gptkit.generate.cpu.build`: compiled on first use, cached); more rows (a prompt,
where the product is no longer bound by memory) go to oneDNN, and so does everything where no
compiler is found. With gradients enabled a layer is F.linear, so nothing about training changes.
The results are fp32 sums in another order: they agree with F.linear to rounding (about 1e-6
relative). A model whose layers are all CPULinear with the kernel also decodes through
`gptkit.generate.cpu.decode`, a whole step in one call.

`use_cpu_linear(model)` swaps the layers in place for inference; `gptkit.load` does it for fp32
models on the CPU. The output layer keeps sharing its weight with the token embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptkit.generate.cpu.build import kernel, matvec
from gptkit.model import GPT, LMHead

# rows of x (sequences) up to which the kernel beats oneDNN (it reads W once for all): a decoding step
# of GPT-2 124M, 2 threads (bench/decode_rows.py, medians): 8 sequences 26 ms against 50, 16 52 against 71
KERNEL_MAX_ROWS = 16


def onednn_available() -> bool:
    """oneDNN's fused linear op is built into this torch (x86 and most ARM builds)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class CPULinear(nn.Module):
    """y = x @ weight.T + bias: gptkit's kernel for a few rows, oneDNN for more, F.linear to train."""

    def __init__(
        self, weight: Tensor, bias: Tensor | None, *, rows: int | None = None, use_kernel: bool = True
    ) -> None:
        """`rows`: use only the first rows of `weight` (the head scores the real vocabulary, not the
        padding rows; the weight itself stays whole and tied, so state_dict() is the plain model's)."""
        super().__init__()
        if not isinstance(weight, nn.Parameter):
            weight = nn.Parameter(weight, requires_grad=False)
        self.weight = weight
        self.bias = bias
        self.rows = weight.size(0) if rows is None else rows
        self.kernel = kernel() if use_kernel and weight.is_contiguous() else None
        self.onednn = onednn_available()

    @property
    def matrix(self) -> Tensor:
        """The rows of `weight` this layer multiplies by (a view)."""
        return self.weight if self.rows == self.weight.size(0) else self.weight[: self.rows]

    def forward(self, x: Tensor) -> Tensor:
        weight = self.matrix
        if x.dtype != torch.float32 or weight.dtype != torch.float32 or torch.is_grad_enabled():
            return F.linear(x, weight, self.bias)
        n = x.numel() // x.size(-1)
        if self.kernel is not None and n <= KERNEL_MAX_ROWS:
            y = matvec(self.kernel, x.reshape(n, x.size(-1)).contiguous(), weight, self.bias)
            return y.view(*x.shape[:-1], y.size(-1))
        if self.onednn:
            return torch.ops.mkldnn._linear_pointwise(x, weight, self.bias, "none", [], "")
        return F.linear(x, weight, self.bias)


def use_cpu_linear(model: GPT, *, use_kernel: bool = True) -> int:
    """Replace the linear layers of a CPU fp32 model (and its output layer) in place; returns how many.

    Does nothing for a model elsewhere or in another dtype, or where neither gptkit's kernel nor
    oneDNN is available. `use_kernel=False` keeps to oneDNN (the benchmark's comparison).
    """
    if model.device.type != "cpu" or model.dtype != torch.float32:
        return 0
    if not onednn_available() and (not use_kernel or kernel() is None):
        return 0
    n = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and child is not model.lm_head:
                setattr(module, name, CPULinear(child.weight, child.bias, use_kernel=use_kernel))
                n += 1
    if type(model.lm_head) is LMHead:  # still tied to the embedding; scores the real vocabulary only
        rows = model.config.vocab_size
        model.lm_head = CPULinear(model.lm_head.weight, None, rows=rows, use_kernel=use_kernel)
        n += 1
    return n
